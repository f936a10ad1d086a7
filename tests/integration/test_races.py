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

from hostagent import host_connections
from hostagent.connectors.local import LocalConnector
from hostagent.errors import LibvirtError
from hostagent.guests import Guests as HostGuests
from hostagent.models import AttachRequest
from hostagent.reconcile import Reconciler
from hostagent.references import OpenHandle
from tests.integration.support import (
    Guests,
    LoopDevices,
    hand_made_disk,
    local_request,
    service_with,
    unique,
)
from tests.integration.test_disconnect_failure import FailingFirstDisconnect


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
    attachment_id = unique("att")
    service.attach(
        attachment_id, AttachRequest.model_validate(local_request(device, ours, volume_id="v"))
    )
    probe = ProbeThatLetsGo(
        lambda: theirs.attach_raw(hand_made_disk(device, target_dev="sdy", unit=8))
    )
    monkeypatch.setattr(host_connections, "processes_holding", probe)

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
    attachment_id = unique("att")
    service.attach(
        attachment_id, AttachRequest.model_validate(local_request(device, guest, volume_id="v"))
    )
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
    attachment_id = unique("att")
    service.attach(
        attachment_id, AttachRequest.model_validate(local_request(device, guest, volume_id="v"))
    )
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

    actions = Reconciler(after, tombstone_ttl=86400)._after_reboot(listed)
    assert [a.action for a in actions] == [], actions
    assert connector.connects == [key], "not logged in a second time"
    connection = after.store.get_connection(key)
    assert connection is not None and connection.boot_id == "boot-b"
    after.store.close()
