"""The guard before a disconnect on real libvirt: its round trips do not grow
with the domains defined but not running, and it still sees every disk of
every domain, live and persistent, the persistent configs cached while
libvirt's config directory says they are unchanged."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from hostagent.guests.domain_scan import DomainScan
from hostagent.guests.domains import Guests as HostGuests
from hostagent.guests.persistent_configs import SYSTEM_CONFIG_DIR, PersistentConfigs
from hostagent.host.device_users import HostDeviceMatcher, device_users, find_references
from hostagent.state.records import ConnectionRecord, ConnectionState
from tests.integration.support import Guests, LoopDevices, hand_made_disk, run


def local_connection(device: str) -> ConnectionRecord:
    return ConnectionRecord(
        connection_key=f"local:{device}",
        driver_volume_type="local",
        connection_data={"device_path": device},
        disk_format="raw",
        state=ConnectionState.CONNECTED,
        boot_id="boot-1",
        created_at=0.0,
        device_path=device,
    )


class CountedConfigReads:
    """The daemon's read of a persistent config, counted; ``during_read`` runs
    inside the next one (a change that lands while a scan reads)."""

    def __init__(self, guests: HostGuests) -> None:
        self.guests = guests
        self.count = 0
        self.during_read: Callable[[], None] | None = None

    def __call__(self, domain_uuid: str) -> str:
        self.count += 1
        xml = self.guests.domain_xml(domain_uuid, inactive=True)
        if self.during_read is not None:
            meanwhile, self.during_read = self.during_read, None
            meanwhile()
        return xml


@pytest.fixture
def reads(host_guests: HostGuests) -> CountedConfigReads:
    return CountedConfigReads(host_guests)


@pytest.fixture
def scan(host_guests: HostGuests, reads: CountedConfigReads) -> Iterator[DomainScan]:
    configs = PersistentConfigs(reads, SYSTEM_CONFIG_DIR)
    assert configs.caching, f"libvirt's config directory {SYSTEM_CONFIG_DIR} can be watched"
    yield DomainScan(host_guests, configs)
    configs.close()


def test_a_disk_added_to_a_running_domains_config_alone_is_seen(
    scan: DomainScan, guests: Guests, loops: LoopDevices
) -> None:
    """``virsh attach-disk --config`` on a running domain: no libvirt event,
    not in the live XML; its cached config is stale the moment libvirt saves
    the new one."""
    device = loops.make()
    guest = guests.make(persistent=True)
    assert device_users(scan, local_connection(device)) == []  # every config now cached
    guest.dom.attachDeviceFlags(
        hand_made_disk(device, target_dev="sdy", unit=8, alias="ua-operator"),
        libvirt.VIR_DOMAIN_AFFECT_CONFIG,
    )
    assert device_users(scan, local_connection(device)) == [
        f"domain {guest.name} (config, disk ua-operator)"
    ]


def test_a_domain_redefined_during_a_scan_is_seen_by_the_next(
    scan: DomainScan, reads: CountedConfigReads, guests: Guests, loops: LoopDevices
) -> None:
    device = loops.make()
    shut_off = guests.define()
    assert device_users(scan, local_connection(device)) == []  # its config is cached
    newcomer = guests.define()  # not cached: the next scan reads it

    def redefine_with_the_disk() -> None:
        xml = shut_off.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        disk = hand_made_disk(device, target_dev="sdz", unit=9)
        guests.conn.defineXML(xml.replace("</devices>", disk + "</devices>"))

    reads.during_read = redefine_with_the_disk
    device_users(scan, local_connection(device))  # may or may not see it: it is mid-change
    assert reads.during_read is None, f"the scan read {newcomer.name}'s config"
    assert device_users(scan, local_connection(device)) == [
        f"domain {shut_off.name} (config, disk sdz)"
    ]


class CountedCalls:
    """Counts the round trips the daemon's libvirt session makes."""

    def __init__(self, guests: HostGuests, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        session = guests.session
        for name in ("call", "on_domain"):
            monkeypatch.setattr(session, name, self._counted(getattr(session, name)))

    def _counted(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return method(*args, **kwargs)

        return counted


def test_the_guard_asks_libvirt_the_same_few_times_whatever_the_number_of_shut_off_domains(
    scan: DomainScan,
    host_guests: HostGuests,
    guests: Guests,
    loops: LoopDevices,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    device, elsewhere = loops.make(), loops.make()
    running = guests.make(persistent=True)
    running.attach_raw(hand_made_disk(elsewhere, target_dev="sdb", unit=1))
    calls = CountedCalls(host_guests, monkeypatch)

    def round_trips() -> int:
        device_users(scan, local_connection(device))  # fills the cache
        before = calls.count
        assert device_users(scan, local_connection(device)) == []
        return calls.count - before

    few = round_trips()
    for _ in range(6):
        guests.define(hand_made_disk(elsewhere, target_dev="sdc", unit=2))
    assert round_trips() == few <= 3  # the two lists, the running domain's live XML
    running.attach_raw(hand_made_disk(device, target_dev="sdd", unit=3))
    assert device_users(scan, local_connection(device)) == [
        f"domain {running.name} (live, disk scsi0-0-0-3)",  # libvirt's own alias
        f"domain {running.name} (config, disk sdd)",
    ]


class CountedListings:
    """Which of the daemon's two domain listings each guard asks libvirt for."""

    def __init__(self, guests: HostGuests, monkeypatch: pytest.MonkeyPatch) -> None:
        self.asked: list[str] = []
        for name in ("list_domains", "list_running"):
            monkeypatch.setattr(guests, name, self._counted(name, getattr(guests, name)))

    def _counted(self, name: str, method: Callable[[], Any]) -> Callable[[], Any]:
        def counted() -> Any:
            self.asked.append(name)
            return method()

        return counted


def test_domains_defined_or_made_after_the_list_was_kept_are_seen(
    host_guests: HostGuests,
    reads: CountedConfigReads,
    guests: Guests,
    loops: LoopDevices,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The persistent domains are listed once and kept while libvirt's config
    directory is quiet; a guard then asks only for the running ones. A domain
    defined with the device (shut off: no live XML, no lifecycle event a guard
    could wait for) and a transient one holding it are in the next guard."""
    listings = CountedListings(host_guests, monkeypatch)
    configs = PersistentConfigs(reads, SYSTEM_CONFIG_DIR)
    scan = DomainScan(host_guests, configs)
    try:
        device = loops.make()
        guests.define()  # a list is kept only with a domain in it: an empty directory is anyone's
        assert device_users(scan, local_connection(device)) == []
        assert device_users(scan, local_connection(device)) == []
        assert listings.asked == ["list_domains", "list_running"]
        shut_off = guests.define(hand_made_disk(device, target_dev="sdc", unit=2))
        assert device_users(scan, local_connection(device)) == [
            f"domain {shut_off.name} (config, disk sdc)"
        ]
        assert listings.asked[-1] == "list_domains", "the definition's file said: list again"
        transient = guests.make()
        transient.attach_raw(hand_made_disk(device, target_dev="sdd", unit=3))
        users = device_users(scan, local_connection(device))
        assert listings.asked[-1] == "list_running", "no file changed: the kept list"
        assert sorted(users) == [
            f"domain {shut_off.name} (config, disk sdc)",
            f"domain {transient.name} (live, disk scsi0-0-0-3)",
        ]
    finally:
        configs.close()


def test_a_disk_whose_backing_chain_reaches_the_device_is_a_use(
    scan: DomainScan, guests: Guests, loops: LoopDevices, tmp_path: Path
) -> None:
    """A qcow2 overlay on the device (what an external snapshot leaves): the
    disk's own source is the overlay file; libvirt's live XML names the device
    as its backing layer, and so must the guard."""
    device = loops.make()
    overlay = tmp_path / "overlay.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", device, "-F", "raw", str(overlay))
    guest = guests.make()
    guest.dom.attachDeviceFlags(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{overlay}'/><target dev='sdx' bus='scsi'/>"
        "<alias name='ua-overlay'/>"
        "<address type='drive' controller='0' bus='0' target='0' unit='7'/></disk>",
        libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )
    uses = find_references(scan, HostDeviceMatcher(device))
    assert [(u.domain_name, u.where, u.alias, u.source, u.use) for u in uses] == [
        (guest.name, "live", "ua-overlay", device, "in the backing chain of sdx")
    ]
