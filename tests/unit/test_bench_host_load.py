"""bench/host_load.py's helpers: how descriptors are split over holder
processes, what a busy holder does, and the domains it defines (named so a
killed run's are removed)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from lxml import etree

# bench/ holds scripts, not a package: its modules import as the scripts do
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import host_load

from tests.integration import support


def attribute(disk: etree._Element, tag: str, name: str) -> str | None:
    found = disk.find(tag)
    return None if found is None else found.get(name)


def test_descriptors_are_split_evenly_over_the_fewest_processes() -> None:
    assert host_load.fd_shares(30_000) == [10_000, 10_000, 10_000]
    assert host_load.fd_shares(25_001) == [8_334, 8_334, 8_333]
    assert host_load.fd_shares(200) == [200]
    assert host_load.fd_shares(0) == []


def test_a_hosts_guests_shape_is_many_holders_of_a_hundred() -> None:
    assert host_load.fd_shares(30_000, 100) == [100] * 300
    assert host_load.fd_shares(250, 100) == [84, 83, 83]


def _runtime_ns(pid: int) -> int:
    """How long the threads of ``pid`` have run, in all (schedstat)."""
    task = Path(f"/proc/{pid}/task")
    return sum(int((task / tid / "schedstat").read_text().split()[0]) for tid in os.listdir(task))


def test_a_busy_holder_keeps_running_and_an_idle_one_does_not(tmp_path: Path) -> None:
    """What the guard sees of a running guest's QEMU: a process whose threads
    run between two searches is searched again (host/holders.py)."""
    with (
        host_load.FdHolders(20, tmp_path, per_process=10, busy=True) as busy,
        host_load.FdHolders(20, tmp_path, per_process=10) as idle,
    ):
        assert len(busy.pids) == len(idle.pids) == 2
        started = [*busy.pids, *idle.pids]
        for pid in started:
            assert len(os.listdir(f"/proc/{pid}/fd")) >= 10
        time.sleep(0.2)  # both settle after their start
        before = {pid: _runtime_ns(pid) for pid in started}
        time.sleep(0.2)
        assert all(_runtime_ns(pid) > before[pid] for pid in busy.pids)
        assert all(_runtime_ns(pid) == before[pid] for pid in idle.pids)
    assert not any(Path(f"/proc/{pid}").exists() for pid in started)


def test_no_holder_needs_more_than_the_hard_limit_allows() -> None:
    for total in (1, 9_999, 10_001, 30_000, 100_003):
        shares = host_load.fd_shares(total)
        assert sum(shares) == total
        assert max(shares) + host_load.FD_MARGIN <= 20_000


def test_defined_domains_are_removed_by_the_stale_guest_cleanup_once_we_are_gone() -> None:
    assert host_load.GUEST_PREFIX == support.GUEST_PREFIX
    dead = host_load.defined_domain_name(7, pid=2**22 + 1)  # above pid_max: never running
    assert not support._owner_alive(dead)
    assert support._owner_alive(host_load.defined_domain_name(7, pid=1))


def test_a_defined_domain_has_four_file_disks_on_its_own_files() -> None:
    files = [Path(f"/tmp/bench/idle-3-{unit}.img") for unit in range(4)]
    xml = host_load.defined_domain_xml(host_load.defined_domain_name(3), files)
    root = etree.fromstring(xml.encode())
    assert root.findtext("name") == f"{support.GUEST_PREFIX}{os.getpid()}-idle-3"
    disks = root.findall("./devices/disk")
    assert [d.get("type") for d in disks] == ["file"] * 4
    assert [attribute(d, "source", "file") for d in disks] == [str(f) for f in files]
    assert [attribute(d, "target", "dev") for d in disks] == ["sda", "sdb", "sdc", "sdd"]
    assert [attribute(d, "address", "unit") for d in disks] == ["0", "1", "2", "3"]
    assert root.find("./devices/controller[@model='virtio-scsi']") is not None
