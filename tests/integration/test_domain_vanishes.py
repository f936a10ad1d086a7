"""A domain that goes away between the listing and the read of its XML.

Real libvirt and guests; the race is made certain by a ``Guests`` whose
listing destroys one of the (transient) guests it has just listed, as an
operator's ``virsh destroy`` at that moment would.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.attachments.rebuild import unrecorded_disks
from hostagent.attachments.service import AttachmentService, ServiceSettings
from hostagent.connectors import ConnectorRegistry
from hostagent.connectors.local import LocalConnector
from hostagent.daemon.main import warn_about_unrecorded_disks
from hostagent.guests.domains import DomainInfo
from hostagent.guests.domains import Guests as HostGuests
from hostagent.locks import HostLocks
from hostagent.state.store import Store
from tests.integration.support import Guest, Guests, LoopDevices, hand_made_disk


class GuestsLosingOneAfterListing(HostGuests):
    """hostagent's Guests, destroying ``victim`` right after each listing."""

    victim: Guest | None = None

    def list_domains(self) -> list[DomainInfo]:
        listed = super().list_domains()
        if self.victim is not None:
            self.victim.dom.destroy()
            self.victim = None
        return listed


@pytest.fixture
def host_guests() -> Iterator[GuestsLosingOneAfterListing]:
    guests = GuestsLosingOneAfterListing("qemu:///system", connections=1)
    guests.start()
    yield guests
    guests.stop()


def test_startup_scan_skips_a_domain_that_vanished(
    tmp_path: Path,
    host_guests: GuestsLosingOneAfterListing,
    guests: Guests,
    loops: LoopDevices,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = AttachmentService(
        store=Store(tmp_path / "state.sqlite3"),
        guests=host_guests,
        registry=ConnectorRegistry({"local": LocalConnector()}),
        locks=HostLocks(tmp_path / "locks"),
        settings=ServiceSettings(),
    )
    holder, vanishing = guests.make(), guests.make()
    device = loops.make()
    holder.attach_raw(hand_made_disk(device, target_dev="sdb", unit=1, alias="ua-left-behind"))

    host_guests.victim = vanishing
    [found] = unrecorded_disks(service.store, service.guests)
    assert (found.domain.name, found.disk.alias) == (holder.name, "ua-left-behind")
    assert vanishing.name not in [d.name for d in host_guests.list_domains()]

    # What a first start runs: it warns about the other guest's disk, and a
    # vanishing domain does not stop the daemon from starting.
    host_guests.victim = guests.make()
    warn_about_unrecorded_disks(service.store, service.guests)
    assert "ua-left-behind on " + holder.name in caplog.text
