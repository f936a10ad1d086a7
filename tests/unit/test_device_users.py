"""host/device_users.py and host/holders.py: disks and processes that use a host block device."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.guests.domain_scan import DomainScan
from hostagent.host.device_users import HostDeviceMatcher, device_users, matcher_for
from hostagent.host.holders import processes_holding
from hostagent.libvirt_xml.disk import DiskRef
from hostagent.state.records import ConnectionRecord, ConnectionState
from tests.unit.recording import RecordingGuests


@pytest.fixture
def dev_link(loop_device: str) -> Iterator[str]:
    link = Path(f"/dev/hatest-ref-{os.getpid()}")
    link.unlink(missing_ok=True)
    link.symlink_to(loop_device)
    yield str(link)
    link.unlink(missing_ok=True)


def test_a_disk_matches_by_path_symlink_or_device_number(
    loop_device: str, dev_link: str, tmp_path: Path
) -> None:
    matcher = HostDeviceMatcher(loop_device)
    assert matcher.matches(DiskRef(source_dev=loop_device))
    assert matcher.matches(DiskRef(source_dev=dev_link))
    twin = tmp_path / "twin"  # another node for the same device number
    st = os.stat(loop_device)
    os.mknod(twin, 0o600 | 0o060000, st.st_rdev)
    assert matcher.matches(DiskRef(source_file=str(twin)))
    assert not matcher.matches(DiskRef(source_dev="/dev/null"))
    assert not matcher.matches(DiskRef(source_protocol="rbd", source_name="pool/image"))


def recorded(
    driver_volume_type: str,
    key: str,
    data: dict[str, object],
    device_path: str | None = None,
    device_info: dict[str, object] | None = None,
) -> ConnectionRecord:
    return ConnectionRecord(
        connection_key=key,
        driver_volume_type=driver_volume_type,
        connection_data=data,
        disk_format="raw",
        state=ConnectionState.CONNECTED,
        boot_id="boot-1",
        created_at=0.0,
        device_path=device_path,
        device_info=device_info,
    )


RBD_DATA: dict[str, object] = {
    "name": "volumes/volume-1",
    "hosts": ["192.0.2.1"],
    "ports": ["6789"],
    "cluster_name": "ceph",
    "auth_username": "cinder",
}


def test_a_connections_disk_is_recognised_by_what_its_connector_says_it_names(
    loop_device: str, dev_link: str
) -> None:
    local = matcher_for(recorded("local", f"local:{loop_device}", {}, loop_device))
    assert local is not None and local.matches(DiskRef(source_dev=dev_link))
    image = matcher_for(
        recorded("rbd", "rbd:ceph/volumes/volume-1", RBD_DATA, device_info={"secret_uuid": "u"})
    )
    assert image is not None
    assert image.matches(DiskRef(source_protocol="rbd", source_name="volumes/volume-1"))
    assert not image.matches(DiskRef(source_protocol="nbd", source_name="volumes/volume-1"))
    assert not image.matches(DiskRef(source_protocol="rbd", source_name="volumes/volume-2"))
    # A connect that never got recorded: the image is known, the secret is not needed.
    assert matcher_for(recorded("rbd", "rbd:ceph/volumes/volume-1", RBD_DATA)) is not None
    mapped = matcher_for(recorded("rbd", "rbd:ceph/volumes/volume-1", RBD_DATA, loop_device))
    assert mapped is not None and mapped.matches(DiskRef(source_dev=loop_device))
    assert not mapped.matches(DiskRef(source_protocol="rbd", source_name="volumes/volume-1"))
    # Nothing connected yet names nothing; a protocol no longer served, its device.
    assert matcher_for(recorded("iscsi", "iscsi:192.0.2.5:3260/iqn.x/1", {})) is None
    gone = matcher_for(recorded("nfs", "nfs:server:/export", {}, loop_device))
    assert gone is not None and gone.matches(DiskRef(source_dev=loop_device))


def test_processes_holding_finds_an_open_descriptor(loop_device: str) -> None:
    assert processes_holding(loop_device) == []
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os, time; fd = os.open({loop_device!r}, os.O_RDONLY);"
            " print('open', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        [found] = processes_holding(loop_device)
        assert found.pid == holder.pid
        assert found.command.startswith("python")
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 5
    while processes_holding(loop_device):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_processes_holding_ignores_what_is_not_a_block_device() -> None:
    assert processes_holding("/dev/null") == []
    assert processes_holding("/dev/hatest-missing") == []


def test_a_network_disk_only_a_running_domain_has_keeps_its_connection() -> None:
    """An rbd image only a running domain's live XML names (migrated in, or
    hot-plugged live) keeps its connection."""
    guests = RecordingGuests()
    guests.arrive(
        str(uuid.uuid4()),
        "other",
        "<disk type='network' device='disk'><source protocol='rbd' name='volumes/volume-1'/>"
        "<target dev='sdb' bus='scsi'/><alias name='scsi0-0-0-1'/></disk>",
    )
    key = "rbd:ceph/volumes/volume-1"
    image = recorded("rbd", key, RBD_DATA, device_info={"secret_uuid": "u"})
    assert device_users(DomainScan(guests), image) == ["domain other (live, disk scsi0-0-0-1)"]


def test_a_host_device_in_a_running_domains_live_disks_keeps_its_connection(
    loop_device: str,
) -> None:
    guests = RecordingGuests()
    running = guests.define("running", persistent=False)
    guests.add_disk(running, loop_device, alias="ua-x", dev="sdc")
    local = recorded("local", f"local:{loop_device}", {}, loop_device)
    assert device_users(DomainScan(guests), local) == ["domain running (live, disk ua-x)"]


def hold(device: str) -> subprocess.Popen[str]:
    """A process that opens ``device`` and keeps it open until killed."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os, time; fd = os.open({device!r}, os.O_RDONLY);"
            " print('open', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
    return holder


def test_a_holder_that_comes_during_the_grace_keeps_the_connection(loop_device: str) -> None:
    """The grace watches only the processes it found; the one that opens the
    device while it waits is found by the full search after it."""
    brief = hold(loop_device)
    holders: list[subprocess.Popen[str]] = [brief]

    def meanwhile(seconds: float) -> None:
        if len(holders) == 1:  # the first wait: another process opens, the first closes
            holders.append(hold(loop_device))
            brief.kill()
            brief.wait()
        time.sleep(seconds)

    local = recorded("local", f"local:{loop_device}", {}, loop_device)
    try:
        users = device_users(DomainScan(RecordingGuests()), local, sleep=meanwhile)
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    [user] = users
    assert user.startswith(f"process {holders[1].pid} (python")
