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


class ProbeThatLetsGo:
    """Recording fake of the /proc holder search: a brief holder (a udev probe)
    on the first look, gone after; ``meanwhile`` runs during that first look."""

    def __init__(self, meanwhile: Any) -> None:
        self.meanwhile = meanwhile
        self.looks = 0

    def __call__(self, device_path: str) -> list[OpenHandle]:
        self.looks += 1
        if self.looks > 1:
            return []
        self.meanwhile()
        return [OpenHandle(pid=1, command="udev-probe")]


def test_a_domain_that_takes_the_device_during_the_holder_grace_keeps_it(
    tmp_path: Path,
    host_guests: HostGuests,
    guests: Guests,
    loops: LoopDevices,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last detach waits out a brief holder; an operator's disk added in
    those moments must keep the connection: the domains are read again after
    the wait, not trusted from before it."""
    service = service_with(LocalConnector(), tmp_path, host_guests)
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
    service.store.close()


def started_before_config_detach(
    host_guests: HostGuests, dom: Any, live_answer: Exception | None
) -> Any:
    """Wrap ``detach_alias``: the guest starts (with the disk, from its config)
    just before a config-only detach reaches libvirt, as a ``virsh start``
    between the lookup and the detach would. A live unplug then gets
    ``live_answer`` raised instead (a recording fake of libvirt's refusal) if
    one is given, else goes to libvirt."""
    real = host_guests.detach_alias
    calls: list[tuple[bool, bool]] = []

    def detach_alias(domain_uuid: str, alias: str, *, live: bool, config: bool) -> None:
        calls.append((live, config))
        if not live and not dom.isActive():
            dom.create()
        if live and live_answer is not None:
            raise live_answer
        real(domain_uuid, alias, live=live, config=config)

    detach_alias.calls = calls  # type: ignore[attr-defined]
    return detach_alias


def test_a_guest_started_before_a_config_only_detach_is_unplugged_live_too(
    tmp_path: Path,
    host_guests: HostGuests,
    guests: Guests,
    loops: LoopDevices,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = service_with(LocalConnector(), tmp_path, host_guests)
    guest, device = guests.make(persistent=True), loops.make()
    guest.dom.destroy()
    attachment_id = attach(service, device, guest)
    assert guest.disk(f"ua-{attachment_id}", inactive=True) is not None
    wrapped = started_before_config_detach(host_guests, guest.dom, None)
    monkeypatch.setattr(host_guests, "detach_alias", wrapped)

    result = service.detach(attachment_id)
    assert wrapped.calls == [(False, True), (True, False)], "config, then the live disk"
    assert guest.disk(f"ua-{attachment_id}") is None, "gone from the running guest"
    assert guest.disk(f"ua-{attachment_id}", inactive=True) is None
    assert (result.host_disconnected, result.terminate_connection) == (True, True)
    service.store.close()


def test_a_refused_live_unplug_after_a_config_only_detach_is_answered_not_waited_out(
    tmp_path: Path,
    host_guests: HostGuests,
    guests: Guests,
    loops: LoopDevices,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only a live unplug libvirt took can be pending; a refusal of the first
    live request is libvirt's answer (502), not something to wait for (504)."""
    service = service_with(LocalConnector(), tmp_path, host_guests)
    guest, device = guests.make(persistent=True), loops.make()
    guest.dom.destroy()
    attachment_id = attach(service, device, guest)
    refusal = LibvirtError("detach ua-x from domain: operation failed: unplug refused")
    wrapped = started_before_config_detach(host_guests, guest.dom, refusal)
    monkeypatch.setattr(host_guests, "detach_alias", wrapped)

    with pytest.raises(LibvirtError, match="unplug refused"):
        service.detach(attachment_id)
    assert wrapped.calls == [(False, True), (True, False)], "asked once, answered at once"
    record = service.store.get_attachment(attachment_id)
    assert record is not None and record.state.value == "detaching", "a retry continues"
    assert service.store.get_connection(f"local:{device}") is not None
    service.store.close()


def test_reconcile_does_not_connect_again_what_an_attach_just_reconnected(
    tmp_path: Path, host_guests: HostGuests, guests: Guests, loops: LoopDevices
) -> None:
    """Reconcile's reboot pass works from a listing taken before it locks the
    connection; an attach may have connected it again in this boot meanwhile."""
    guest, device = guests.make(persistent=True), loops.make()
    key = f"local:{device}"
    request = AttachRequest.model_validate(
        local_request(device, guest, volume_id="v", multiattach=True)
    )
    before = service_with(LocalConnector(), tmp_path, host_guests, boot_id="boot-a")
    before.attach(unique("att"), request)
    before.store.close()

    connector = FailingFirstDisconnect()
    after = service_with(connector, tmp_path, host_guests, boot_id="boot-b")
    listed = after.store.get_connection(key)
    assert listed is not None and listed.boot_id == "boot-a"
    second = AttachRequest.model_validate(
        local_request(device, guests.make(), volume_id="v", multiattach=True)
    )
    after.attach(unique("att"), second)  # connects it again, in this boot
    assert connector.connects == [key]

    actions = reconciler_for(after)._after_reboot(listed)
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
    before = service_with(LocalConnector(), tmp_path, host_guests, boot_id="boot-a")
    stale = unique("att")
    before.attach(
        stale,
        AttachRequest.model_validate(local_request(device, gone, volume_id="v", multiattach=True)),
    )
    before.store.close()
    gone.dom.destroy()  # transient: gone with the reboot

    connector = FailingFirstDisconnect(failures=0)
    after = service_with(connector, tmp_path, host_guests, boot_id="boot-b")
    listed = after.store.get_connection(key)
    assert listed is not None and listed.boot_id == "boot-a"
    fresh = unique("att")
    after.attach(
        fresh,
        AttachRequest.model_validate(
            local_request(device, guests.make(), volume_id="v", multiattach=True)
        ),
    )
    after.detach(fresh)  # shared with the stale one: the connection stays, of boot-b
    assert connector.connects == [key] and connector.disconnects == []

    actions = reconciler_for(after)._after_reboot(listed)
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
    service = service_with(LocalConnector(), tmp_path, host_guests)
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
