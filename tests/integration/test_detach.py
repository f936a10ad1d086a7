"""Detach edge cases on real guests: a guest that never lets go, a disk added by hand."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import libvirt
import pytest

from hostagent.client import ApiError, HostagentClient
from tests.integration.support import Daemon, Guest, Guests, hand_made_disk, local_request, unique


@pytest.mark.daemon_options(**{"detach-timeout": "2"})
def test_guest_that_never_releases_gets_504_and_keeps_the_connection(
    client: HostagentClient, device: str, guests: Guests
) -> None:
    # virtio-blk unplug is a PCIe hot-unplug: it needs the guest OS to agree,
    # and a firmware-only guest never does.
    stuck, other = guests.make(), guests.make()
    stuck_id, other_id = unique("att"), unique("att")
    volume = unique("vol")
    client.attach(
        stuck_id, local_request(device, stuck, volume_id=volume, bus="virtio", multiattach=True)
    )
    client.attach(other_id, local_request(device, other, volume_id=volume, multiattach=True))
    client.detach(other_id)

    started = time.monotonic()
    with pytest.raises(ApiError) as timed_out:
        client.detach(stuck_id)
    elapsed = time.monotonic() - started
    assert (timed_out.value.status, timed_out.value.code) == (504, "detach_timeout")
    assert 2 <= elapsed < 10
    assert client.get(stuck_id).state == "detaching"
    [connection] = client.connections().connections
    assert connection.state == "connected"
    assert connection.host_refcount == 1
    assert stuck.disk(f"ua-{stuck_id}") is not None

    # A second attempt also times out and still keeps everything (QEMU refuses
    # to repeat the pending unplug: that is no answer, the guest's is awaited).
    with pytest.raises(ApiError) as again:
        client.detach(stuck_id)
    assert (again.value.status, again.value.code) == (504, "detach_timeout")
    assert client.connections().connections[0].attachments == [stuck_id]

    # While it is detaching, a PUT of the same id is a conflict.
    with pytest.raises(ApiError) as conflict:
        client.attach(
            stuck_id,
            local_request(device, stuck, volume_id=volume, bus="virtio", multiattach=True),
        )
    assert conflict.value.code == "attachment_conflict"

    stuck.dom.destroy()
    result = client.detach(stuck_id)
    assert result.host_disconnected and result.terminate_connection
    assert client.connections().connections == []


def test_disk_added_by_hand_keeps_the_host_connection(
    client: HostagentClient, device: str, guests: Guests
) -> None:
    ours, theirs = guests.make(), guests.make()
    attachment_id = unique("att")
    client.attach(attachment_id, local_request(device, ours, volume_id="v", multiattach=True))
    theirs.attach_raw(hand_made_disk(device, target_dev="sdz", unit=9))

    result = client.detach(attachment_id)
    assert result.host_refcount == 0
    assert result.host_disconnected is False
    assert result.terminate_connection is False
    [connection] = client.connections().connections
    assert connection.state == "connected" and connection.host_refcount == 0
    assert theirs.open_block_devices(), "the hand-added disk still has its device"

    report = client.reconcile()
    assert [a.action for a in report.actions] == ["kept", "foreign_disk"]
    assert theirs.name in report.actions[0].detail

    theirs.dom.destroy()
    report = client.reconcile()
    assert [a.action for a in report.actions] == ["disconnected"]
    assert client.connections().connections == []


@contextlib.contextmanager
def hold_open(device: str, *, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """A plain process that has ``device`` open for ``seconds``, from when the
    block starts; killed (if still there) and reaped when it ends."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "print('open', flush=True); time.sleep(float(sys.argv[2]))",
            device,
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline() == "open\n", f"{device} could not be opened"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_a_process_holding_the_device_keeps_the_host_connection(
    daemon: Daemon, client: HostagentClient, device: str, guest: Guest
) -> None:
    """No domain names the device, yet a process has it open (as a QEMU left
    with a disk libvirt lost track of would): the last detach keeps it."""
    attachment_id = unique("att")
    client.attach(attachment_id, local_request(device, guest, volume_id="v"))
    with hold_open(device, seconds=120) as holder:
        result = client.detach(attachment_id)
        assert (result.host_disconnected, result.terminate_connection) == (False, False)
        [connection] = client.connections().connections
        assert connection.state == "connected" and connection.host_refcount == 0
        assert f"process {holder.pid} (python" in daemon.log()
    report = client.reconcile()
    assert [a.action for a in report.actions] == ["disconnected"]
    assert client.connections().connections == []


def test_a_brief_open_of_the_device_does_not_keep_the_connection(
    client: HostagentClient, device: str, guest: Guest
) -> None:
    """udev probes a device right after QEMU closes it (blkid, from its inotify
    watch): a holder that lets go within the grace is not a user, and the last
    detach still reports terminate_connection."""
    attachment_id = unique("att")
    client.attach(attachment_id, local_request(device, guest, volume_id="v"))
    with hold_open(device, seconds=0.5):
        result = client.detach(attachment_id)
    assert (result.host_disconnected, result.terminate_connection) == (True, True)
    assert client.connections().connections == []


def test_persistent_config_reference_also_keeps_the_connection(
    client: HostagentClient, device: str, guests: Guests, libvirt_conn: object
) -> None:
    """A shut-off persistent guest whose config names the device counts too."""
    ours, theirs = guests.make(), guests.make(persistent=True)
    attachment_id = unique("att")
    client.attach(attachment_id, local_request(device, ours, volume_id="v"))
    theirs.dom.destroy()
    theirs.dom.attachDeviceFlags(
        f"<disk type='block' device='disk'><source dev='{device}'/>"
        "<target dev='sdy' bus='scsi'/></disk>",
        libvirt.VIR_DOMAIN_AFFECT_CONFIG,
    )
    result = client.detach(attachment_id)
    assert (result.host_disconnected, result.terminate_connection) == (False, False)


@pytest.mark.daemon_options(**{"detach-timeout": "3"})
def test_sigterm_finishes_requests_in_flight_and_exits_zero(
    daemon: Daemon, client: HostagentClient, device: str, guest: Guest
) -> None:
    attachment_id = unique("att")
    client.attach(attachment_id, local_request(device, guest, volume_id="v", bus="virtio"))
    outcome: dict[str, object] = {}

    def slow_detach() -> None:
        try:
            client.detach(attachment_id)
        except ApiError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=slow_detach)
    worker.start()
    deadline = time.monotonic() + 5
    while client.get(attachment_id).state != "detaching":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert daemon.process is not None
    daemon.process.terminate()
    time.sleep(0.3)
    with pytest.raises(ApiError) as refused:
        client.health()
    assert refused.value.status == 0, "no new connections after SIGTERM"
    worker.join(30)
    error = outcome.get("error")
    assert isinstance(error, ApiError) and error.code == "detach_timeout", outcome
    assert daemon.process.wait(30) == 0
