"""The guard's view of running domains on real libvirt: each live XML is kept
while libvirt's status directory says the domain's status is unchanged, a
disk hot-plugged after it was kept is still seen, and a live disk found in a
kept XML is looked for again in a fresh read before it keeps a connection."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from hostagent.guests.domain_scan import DomainScan
from hostagent.guests.domains import Guests as HostGuests
from hostagent.guests.live_disks import SYSTEM_STATUS_DIR, LiveDisks
from hostagent.guests.persistent_configs import SYSTEM_CONFIG_DIR, PersistentConfigs
from hostagent.host.device_users import device_users
from tests.integration.support import Guests, LoopDevices, hand_made_disk
from tests.integration.test_guard_scan import local_connection


class CountedLiveReads:
    """The daemon's read of a live XML, counted."""

    def __init__(self, guests: HostGuests) -> None:
        self.guests = guests
        self.count = 0

    def __call__(self, domain_uuid: str) -> str:
        self.count += 1
        return self.guests.domain_xml(domain_uuid)


def watching_scan(
    guests: HostGuests, reads: Callable[[str], str], status_dir: Path
) -> tuple[DomainScan, Callable[[], None]]:
    configs = PersistentConfigs(
        lambda uuid: guests.domain_xml(uuid, inactive=True), SYSTEM_CONFIG_DIR
    )
    live = LiveDisks(reads, status_dir)
    assert live.caching, f"{status_dir} can be watched"
    scan = DomainScan(guests, configs, live)
    return scan, scan.close


@pytest.fixture
def reads(host_guests: HostGuests) -> CountedLiveReads:
    return CountedLiveReads(host_guests)


@pytest.fixture
def scan(host_guests: HostGuests, reads: CountedLiveReads) -> Iterator[DomainScan]:
    scan, close = watching_scan(host_guests, reads, SYSTEM_STATUS_DIR)
    yield scan
    close()


def test_a_running_domains_live_xml_is_read_again_only_after_libvirt_saves_its_status(
    scan: DomainScan, reads: CountedLiveReads, guests: Guests, loops: LoopDevices
) -> None:
    """A disk hot-plugged by hand (no record of ours) after the live XML was
    kept: libvirt saved the status before the attach returned, so the next
    guard reads that domain again and sees it."""
    device = loops.make()
    running = [guests.make(), guests.make()]
    assert device_users(scan, local_connection(device)) == []
    before = reads.count
    assert device_users(scan, local_connection(device)) == []
    assert reads.count == before, "nothing changed: no live XML read"
    running[1].attach_raw(hand_made_disk(device, target_dev="sdb", unit=1))
    before = reads.count
    assert device_users(scan, local_connection(device)) == [
        f"domain {running[1].name} (live, disk scsi0-0-0-1)"
    ]
    assert reads.count - before == 2, "that domain, then it again, fresh; not the other one"


def test_a_disk_found_in_a_kept_live_xml_is_looked_for_again_before_it_counts(
    host_guests: HostGuests,
    reads: CountedLiveReads,
    guests: Guests,
    loops: LoopDevices,
    tmp_path: Path,
) -> None:
    """libvirt saves the status about a millisecond after an unplug's removal
    shows. To hold that moment still, the cache watches a copy of the status
    file that never changes: the kept live XML still has the disk, and the
    guard must not keep the connection for it."""
    device = loops.make()
    guest = guests.make()
    disk = hand_made_disk(device, target_dev="sdb", unit=1, alias="ua-by-hand")
    guest.attach_raw(disk)
    frozen = tmp_path / "status"
    frozen.mkdir()
    shutil.copy(SYSTEM_STATUS_DIR / f"{guest.name}.xml", frozen / f"{guest.name}.xml")
    scan, close = watching_scan(host_guests, reads, frozen)
    try:
        assert device_users(scan, local_connection(device)) == [
            f"domain {guest.name} (live, disk ua-by-hand)"
        ]
        guest.dom.detachDeviceFlags(disk, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        assert device not in guest.dom.XMLDesc()
        assert device_users(scan, local_connection(device)) == []
    finally:
        close()
