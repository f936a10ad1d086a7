"""Restarts of the agent and of the host: reboot handling, lost or damaged state."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import libvirt
import pytest

from hostagent.client import ApiError, HostagentClient
from tests.conftest import DaemonFactory
from tests.integration.support import (
    Daemon,
    Guests,
    LoopDevices,
    assert_consistent,
    hand_made_disk,
    local_request,
    unique,
)


def daemon_with_boot_id(
    daemon_factory: DaemonFactory, short_dir: Path, boot: str
) -> tuple[Path, Daemon]:
    """A daemon reading its boot id from a file the test rewrites to "reboot"."""
    boot_id = short_dir / "boot_id"
    boot_id.write_text(boot + "\n")
    return boot_id, daemon_factory(**{"boot-id-path": str(boot_id)})


def test_host_reboot_reconnects_what_guests_can_start_with_and_releases_the_rest(
    daemon_factory: DaemonFactory, guests: Guests, loops: LoopDevices, short_dir: Path
) -> None:
    boot_id, daemon = daemon_with_boot_id(daemon_factory, short_dir, "11111111-boot-a")
    client = daemon.client
    kept_device, gone_device = loops.make(), loops.make()
    persistent, transient = guests.make(persistent=True), guests.make()
    kept, shared_gone, gone = unique("att"), unique("att"), unique("att")
    client.attach(kept, local_request(kept_device, persistent, volume_id="v1", multiattach=True))
    client.attach(
        shared_gone, local_request(kept_device, transient, volume_id="v1", multiattach=True)
    )
    client.attach(gone, local_request(gone_device, transient, volume_id="v2"))
    assert {c.boot_id for c in client.connections().connections} == {"11111111-boot-a"}

    # The host goes down: the agent dies, every guest stops (the transient one
    # is gone for good), the devices disappear and come back after boot.
    daemon.kill()
    persistent.dom.destroy()
    transient.dom.destroy()
    loops.recreate(kept_device)
    loops.recreate(gone_device)
    boot_id.write_text("22222222-boot-b\n")
    daemon.start()

    [attachment] = client.list()
    assert attachment.attachment_id == kept and attachment.state == "attached"
    [connection] = client.connections().connections
    assert connection.device_path == kept_device
    assert connection.state == "connected" and connection.boot_id == "22222222-boot-b"
    assert "reconnected_after_reboot" in daemon.log()

    # The callers' DELETEs of the released attachments learn the outcome.
    assert client.detach(shared_gone).terminate_connection is False
    assert client.detach(gone).terminate_connection is True

    # The persistent guest starts with its disk, on the reconnected device.
    persistent.dom.create()
    assert persistent.open_block_devices() == {f"ua-{kept}": kept_device}
    assert_consistent(client, [persistent, transient])
    assert client.detach(kept).terminate_connection is True


def test_a_connection_kept_across_a_reboot_is_connected_again_before_it_is_used(
    daemon_factory: DaemonFactory, guests: Guests, loops: LoopDevices, short_dir: Path
) -> None:
    boot_id, daemon = daemon_with_boot_id(daemon_factory, short_dir, "11111111-boot-a")
    client = daemon.client
    device = loops.make()
    guest = guests.make(persistent=True)
    first = unique("att")
    client.attach(first, local_request(device, guest, volume_id="v", multiattach=True))
    # An operator's disk on the same device keeps the connection after the last detach.
    guest.attach_raw(hand_made_disk(device, target_dev="sdz", unit=9))
    assert client.detach(first).terminate_connection is False

    daemon.kill()
    guest.dom.destroy()
    loops.recreate(device)
    boot_id.write_text("22222222-boot-b\n")
    daemon.start()
    [kept] = client.connections().connections
    assert (kept.host_refcount, kept.boot_id) == (0, "11111111-boot-a"), "kept, not remade"

    # The next attach must not trust a connection from the earlier boot.
    second = unique("att")
    client.attach(second, local_request(device, guest, volume_id="v", multiattach=True))
    [connection] = client.connections().connections
    assert connection.state == "connected" and connection.boot_id == "22222222-boot-b"
    assert "was connected in an earlier boot" in daemon.log()
    assert client.detach(second).terminate_connection is False, "the operator's disk stays"


def test_corrupt_state_file_is_refused_and_nothing_is_served(
    daemon_factory: DaemonFactory, short_dir: Path
) -> None:
    daemon = daemon_factory()
    state_file = daemon.state_dir / "hostagent.sqlite3"
    assert daemon.stop() == 0
    with state_file.open("r+b") as f:
        f.seek(100)
        f.write(b"\xde\xad\xbe\xef" * 512)
    with pytest.raises(RuntimeError, match="exited 1"):
        daemon.start(timeout=20)
    assert "hostagentd cannot start: state file" in daemon.log()
    assert not daemon.socket_path.exists(), "nothing may be served on a damaged state"


def test_missing_state_with_agent_disks_in_guests_is_said_loudly_and_can_be_rebuilt(
    daemon: Daemon, client: HostagentClient, device: str, guests: Guests
) -> None:
    guest, other = guests.make(), guests.make(persistent=True)
    first, second = unique("att"), unique("att")
    client.attach(
        first, local_request(device, guest, volume_id="vol-r", multiattach=True, mode="ro")
    )
    client.attach(second, local_request(device, other, volume_id="vol-r", multiattach=True))
    assert daemon.stop() == 0
    for leftover in daemon.state_dir.glob("hostagent.sqlite3*"):
        leftover.unlink()

    daemon.start()
    log = daemon.log()
    assert "no state" in log and "2 disks" in log and "--rebuild-state" in log
    assert client.list() == []
    assert daemon.stop() == 0

    rebuild = daemon.run_once("--rebuild-state")
    assert rebuild.returncode == 0, rebuild.stdout
    assert "rebuilt 2 attachments" in rebuild.stdout
    daemon.start()
    listed = {a.attachment_id: a for a in client.list()}
    assert set(listed) == {first, second}
    assert listed[first].mode == "ro" and listed[first].shareable
    assert listed[first].volume_id == "vol-r"
    [connection] = client.connections().connections
    assert connection.device_path == device and connection.host_refcount == 2
    assert_consistent(client, [guest, other])

    # A rebuilt attachment detaches like any other; its old PUT cannot be matched.
    with pytest.raises(ApiError) as conflict:
        client.attach(
            first, local_request(device, guest, volume_id="vol-r", multiattach=True, mode="ro")
        )
    assert conflict.value.code == "attachment_conflict"
    assert client.detach(first).terminate_connection is False
    assert client.detach(second).terminate_connection is True
    assert other.disk(f"ua-{second}", inactive=True) is None


def test_rebuild_leaves_alone_a_ua_disk_on_a_bus_the_agent_never_uses(
    daemon: Daemon, guests: Guests, loops: LoopDevices
) -> None:
    guest = guests.make(persistent=True)
    sata = (
        "<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
        f"<source dev='{loops.make()}'/><target dev='sdx' bus='sata'/>"
        "<alias name='ua-sata-by-hand'/></disk>"
    )
    guest.dom.attachDeviceFlags(sata, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    assert daemon.stop() == 0
    rebuild = daemon.run_once("--rebuild-state")
    assert rebuild.returncode == 0, rebuild.stdout
    assert "left alone: ua-sata-by-hand" in rebuild.stdout and "bus sata" in rebuild.stdout
    daemon.start()
    assert daemon.client.list() == [], "nothing recorded, and the list still answers"


def test_state_file_is_private(daemon: Daemon) -> None:
    state_file = daemon.state_dir / "hostagent.sqlite3"
    assert state_file.stat().st_mode & 0o077 == 0
    with sqlite3.connect(state_file) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
