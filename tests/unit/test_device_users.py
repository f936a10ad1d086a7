"""host/device_users.py and host/holders.py: disks and processes that use a host block device."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.host.device_users import HostDeviceMatcher, matcher_for
from hostagent.host.holders import processes_holding
from hostagent.libvirt_xml.disk import DiskRef
from hostagent.state.records import ConnectionRecord, ConnectionState


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
