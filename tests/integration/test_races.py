"""Work that races something else on the host: a domain that takes the
device while the last detach waits out a brief holder, a guest started
between the lookup and a config-only detach, an attach that reconnects a
connection of an earlier boot while reconcile is about to.

The service runs in-process on real libvirt, guests, loop devices and sqlite.
Where a race must happen at an exact step, a recording fake stands in for the
boundary that decides its timing (the /proc holder search, libvirt's answer
to one unplug) and is named so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hostagent.api.models import AttachRequest
from hostagent.attachments.service import AttachmentService
from hostagent.connectors.local import LocalConnector
from hostagent.errors import DetachTimeout, LibvirtError
from hostagent.guests.domains import Guests as HostGuests
from hostagent.host import device_users
from hostagent.host.holders import OpenHandle
from tests.integration.support import (
    Guest,
    Guests,
    LoopDevices,
    hand_made_disk,
    local_request,
    reconciler_for,
    service_with,
    unique,
)
from tests.integration.test_disconnect_failure import FailingFirstDisconnect


def attach(service: AttachmentService, device: str, guest: Guest, **extra: Any) -> str:
    """Attach ``device`` to ``guest`` as volume v under a fresh id; returns the id."""
    attachment_id = unique("att")
    request = local_request(device, guest, volume_id="v", **extra)
    service.attach(attachment_id, AttachRequest.model_validate(request))
    return attachment_id


@pytest.fixture
def service(tmp_path: Path, host_guests: HostGuests) -> Iterator[AttachmentService]:
    """The service in-process with the real local connector; its store closed after."""
    made = service_with(LocalConnector(), tmp_path, host_guests)
    yield made
    made.store.close()


def attached_in_boot_a(tmp_path: Path, host_guests: HostGuests, device: str, guest: Guest) -> str:
    """Attach ``device`` to ``guest`` (multiattach) with a service of boot "boot-a",
    whose store is closed after, as a host's previous boot would; returns the id."""
    before = service_with(LocalConnector(), tmp_path, host_guests, boot_id="boot-a")
    attachment_id = attach(before, device, guest, multiattach=True)
    before.store.close()
    return attachment_id


class ProbeThatLetsGo:
    """Recording fake of the /proc holder search: a brief holder (a udev probe)
    on the first look, gone after; ``meanwhile`` runs during that first look."""

    def __init__(self, meanwhile: Any) -> None:
        self.meanwhile = meanwhile
        self.looks = 0

    def __call__(self, device_path: str, among: object = None) -> list[OpenHandle]:
        self.looks += 1
        if self.looks > 1:
            return []
        self.meanwhile()
        return [OpenHandle(pid=1, command="udev-probe")]


def test_a_domain_that_takes_the_device_during_the_holder_grace_keeps_it(
    service: AttachmentService, guests: Guests, loops: LoopDevices, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last detach waits out a brief holder; an operator's disk added in
    those moments must keep the connection: the domains are read again after
    the wait, not trusted from before it."""
    ours, theirs, device = guests.make(), guests.make(), loops.make()
    attachment_id = attach(service, device, ours)
    probe = ProbeThatLetsGo(
        lambda: theirs.attach_raw(hand_made_disk(device, target_dev="sdy", unit=8))
    )
    monkeypatch.setattr(device_users, "processes_holding", probe)

    result = service.detach(attachment_id)
    assert probe.looks >= 2, "the holder was waited out"
    assert (result.host_disconnected, result.terminate_connection) == (False, False)
    kept = service.store.get_connection(f"local:{device}")
    assert kept is not None, "kept for the disk the operator added meanwhile"


@dataclass
class ConfigOnlyDetach:
    """A persistent guest, shut off, with our disk in its config only, and the
    ``detach_alias`` calls of the detach that races its start."""

    guest: Guest
    device: str
    attachment_id: str
    calls: list[tuple[bool, bool]]


RaceFactory = Callable[[Exception | None], ConfigOnlyDetach]


@pytest.fixture
def started_before_config_detach(
    service: AttachmentService,
    host_guests: HostGuests,
    guests: Guests,
    loops: LoopDevices,
    monkeypatch: pytest.MonkeyPatch,
) -> RaceFactory:
    """Makes a shut-off guest with a config-only disk and wraps ``detach_alias``:
    the guest starts (with the disk, from its config) just before a config-only
    detach reaches libvirt, as a ``virsh start`` between the lookup and the
    detach would. A live unplug then gets ``live_answer`` raised instead (a
    recording fake of libvirt's refusal) if one is given, else goes to libvirt."""

    def make(live_answer: Exception | None) -> ConfigOnlyDetach:
        guest, device = guests.make(persistent=True), loops.make()
        guest.dom.destroy()
        race = ConfigOnlyDetach(guest, device, attach(service, device, guest), [])
        real, dom = host_guests.detach_alias, guest.dom

        def detach_alias(domain_uuid: str, alias: str, *, live: bool, config: bool) -> None:
            race.calls.append((live, config))
            if not live and not dom.isActive():
                dom.create()
            if live and live_answer is not None:
                raise live_answer
            real(domain_uuid, alias, live=live, config=config)

        monkeypatch.setattr(host_guests, "detach_alias", detach_alias)
        return race

    return make


def test_a_guest_started_before_a_config_only_detach_is_unplugged_live_too(
    service: AttachmentService, started_before_config_detach: RaceFactory
) -> None:
    race = started_before_config_detach(None)
    guest, attachment_id = race.guest, race.attachment_id
    assert guest.disk(f"ua-{attachment_id}", inactive=True) is not None

    result = service.detach(attachment_id)
    assert race.calls == [(False, True), (True, False)], "config, then the live disk"
    assert guest.disk(f"ua-{attachment_id}") is None, "gone from the running guest"
    assert guest.disk(f"ua-{attachment_id}", inactive=True) is None
    assert (result.host_disconnected, result.terminate_connection) == (True, True)


def test_a_refused_live_unplug_after_a_config_only_detach_is_answered_not_waited_out(
    service: AttachmentService, started_before_config_detach: RaceFactory
) -> None:
    """Only a live unplug libvirt took can be pending; a refusal of the first
    live request is libvirt's answer (502), not something to wait for (504)."""
    refusal = LibvirtError("detach ua-x from domain: operation failed: unplug refused")
    race = started_before_config_detach(refusal)

    with pytest.raises(LibvirtError, match="unplug refused"):
        service.detach(race.attachment_id)
    assert race.calls == [(False, True), (True, False)], "asked once, answered at once"
    record = service.store.get_attachment(race.attachment_id)
    assert record is not None and record.state.value == "detaching", "a retry continues"
    assert service.store.get_connection(f"local:{race.device}") is not None


def test_reconcile_does_not_connect_again_what_an_attach_just_reconnected(
    tmp_path: Path, host_guests: HostGuests, guests: Guests, loops: LoopDevices
) -> None:
    """Reconcile's reboot pass works from a listing taken before it locks the
    connection; an attach may have connected it again in this boot meanwhile."""
    guest, device = guests.make(persistent=True), loops.make()
    key = f"local:{device}"
    attached_in_boot_a(tmp_path, host_guests, device, guest)

    connector = FailingFirstDisconnect()
    after = service_with(connector, tmp_path, host_guests, boot_id="boot-b")
    listed = after.store.get_connection(key)
    assert listed is not None and listed.boot_id == "boot-a"
    attach(after, device, guests.make(), multiattach=True)  # connects it again, in this boot
    assert connector.connects == [key]

    actions = reconciler_for(after).connection_pass.after_reboot(listed)
    assert [a.action for a in actions] == [], actions
    assert connector.connects == [key], "not logged in a second time"
    connection = after.store.get_connection(key)
    assert connection is not None and connection.boot_id == "boot-b"
    after.store.close()


def test_reconcile_releases_for_real_a_connection_reconnected_since_its_listing(
    tmp_path: Path, host_guests: HostGuests, guests: Guests, loops: LoopDevices
) -> None:
    """The reboot pass drops, without a disconnect, the connection of an
    attachment whose guest is gone: the reboot took it down. Not if an attach
    connected it again in this boot since the listing: then dropping it would
    leak a live connection; it is released like any last detach."""
    gone, device = guests.make(), loops.make()
    key = f"local:{device}"
    stale = attached_in_boot_a(tmp_path, host_guests, device, gone)
    gone.dom.destroy()  # transient: gone with the reboot

    connector = FailingFirstDisconnect(failures=0)
    after = service_with(connector, tmp_path, host_guests, boot_id="boot-b")
    listed = after.store.get_connection(key)
    assert listed is not None and listed.boot_id == "boot-a"
    fresh = attach(after, device, guests.make(), multiattach=True)
    after.detach(fresh)  # shared with the stale one: the connection stays, of boot-b
    assert connector.connects == [key] and connector.disconnects == []

    actions = reconciler_for(after).connection_pass.after_reboot(listed)
    assert [(a.action, a.subject) for a in actions] == [("released_after_reboot", stale)]
    assert connector.disconnects == [key], "disconnected, not dropped while connected"
    assert after.store.get_connection(key) is None
    tombstone = after.store.get_tombstone(stale)
    assert tombstone is not None and tombstone.result["terminate_connection"] is True
    after.store.close()


def test_a_retried_delete_waits_for_the_unplug_qemu_refuses_to_repeat(
    tmp_path: Path,
    host_guests: HostGuests,
    guests: Guests,
    loops: LoopDevices,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a 504 the unplug is still pending in the guest. Newer QEMUs refuse
    to repeat it ("already in the process of unplug"; this machine's accepts
    the repeat, so a recording fake gives that answer): the retried DELETE
    must wait for the guest again (504), not report libvirt's refusal (502)."""
    # Both detaches wait out the whole timeout: 2 s each is enough to tell.
    service = service_with(LocalConnector(), tmp_path, host_guests, detach_timeout=2)
    guest, device = guests.make(), loops.make()
    attachment_id = attach(service, device, guest, bus="virtio")
    with pytest.raises(DetachTimeout):
        service.detach(attachment_id)  # a firmware-only guest never acks a PCIe unplug

    def refuse_repeat(domain_uuid: str, alias: str, *, live: bool, config: bool) -> None:
        raise LibvirtError(f"detach {alias}: Device {alias} is already in the process of unplug")

    monkeypatch.setattr(host_guests, "detach_alias", refuse_repeat)
    with pytest.raises(DetachTimeout):
        service.detach(attachment_id)
    record = service.store.get_attachment(attachment_id)
    assert record is not None and record.state.value == "detaching"
    service.store.close()
