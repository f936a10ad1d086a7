"""host/device_users.py and host/holders.py: disks and processes that use a host block device."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.host.device_users import HostDeviceMatcher
from hostagent.host.holders import processes_holding
from hostagent.libvirt_xml.disk import DiskRef


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
