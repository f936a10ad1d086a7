"""A persistent guest undefined and defined again (same UUID) with our disk in
its config (issue 14, item 1).

Real libvirt, KVM guests, loop devices and hostagentd. The daemon tests run
``virsh`` as an operator does; the in-process ones make the race certain with
hostagent's own ``Guests`` that defines the domain back right before the
guard lists the domains, which is where the report caught it: the release had
found no domain, its guard then saw "domain D (config, disk ua-q2)".
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from hostagent.api.models import AttachRequest
from hostagent.attachments.service import AttachmentService
from hostagent.connectors.local import LocalConnector
from hostagent.guests.domains import DomainInfo
from hostagent.guests.domains import Guests as HostGuests
from tests.conftest import DaemonFactory
from tests.integration.support import (
    LIBVIRT_URI,
    Guest,
    Guests,
    LoopDevices,
    local_request,
    reconciler_for,
    service_with,
    unique,
)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def virsh(*commands: str) -> None:
    subprocess.run(["virsh", "-c", LIBVIRT_URI, "-q", "; ".join(commands)], check=True)


def shut_off_with_disk(guest: Guest, alias: str, tmp_path: Path) -> Path:
    """Stop the persistent ``guest`` (its config keeps ``alias``); returns its
    config saved as an operator's ``D.xml``."""
    guest.dom.destroy()
    assert guest.disk(alias, inactive=True) is not None
    saved = tmp_path / f"{guest.name}.xml"
    saved.write_text(guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    return saved


def test_undefine_and_define_at_once_keeps_the_attachment(
    daemon_factory: DaemonFactory, guests: Guests, loops: LoopDevices, tmp_path: Path
) -> None:
    """The report's loop: ``virsh "undefine D; define D.xml"``. Each time the
    attachment stays (or, had the define come after the whole release, the
    daemon says at once that D holds a disk it released); the DELETE then
    removes the disk and is the one that says terminate_connection."""
    daemon = daemon_factory(**{"reconcile.interval": "0"})
    client = daemon.client
    guest = guests.make(persistent=True)
    attachment_id = unique("q")
    alias = f"ua-{attachment_id}"
    client.attach(attachment_id, local_request(loops.make(), guest, volume_id="v"))
    saved = shut_off_with_disk(guest, alias, tmp_path)

    released_and_warned = 0
    for attempt in range(15):
        log_before = len(daemon.log())
        virsh(f"undefine {guest.name}", f"define {saved}")
        time.sleep(0.5)  # the daemon's event thread handles the undefine, then the define
        assert guest.disk(alias, inactive=True) is not None
        if {a.attachment_id for a in client.list()} == {attachment_id}:
            continue
        # Only a release that finished before the define landed may drop it, and
        # then the daemon says so at once.
        new_log = daemon.log()[log_before:]
        assert alias in new_log and "released that attachment" in new_log, (
            f"attempt {attempt}: the attachment was released while {guest.name} "
            f"was defined again holding {alias}:\n{new_log}"
        )
        released_and_warned += 1
        break
    print(f"released before the define landed: {released_and_warned}")
    if released_and_warned:
        return
    result = client.detach(attachment_id)
    assert guest.disk(alias, inactive=True) is None, "detached, yet the disk is in the config"
    assert result.terminate_connection and result.host_disconnected
    assert client.connections().connections == []


def test_undefine_then_define_later_is_reported_at_once(
    daemon_factory: DaemonFactory, guests: Guests, loops: LoopDevices, tmp_path: Path
) -> None:
    """Two commands: the release (and disconnect) runs before the define, the
    domain comes back holding a ``ua-`` disk with no record: a warning at once,
    and a doctor finding that does not send the operator to --rebuild-state
    (it adopts no released id)."""
    daemon = daemon_factory(**{"reconcile.interval": "0"})
    client = daemon.client
    guest = guests.make(persistent=True)
    attachment_id = unique("q")
    alias = f"ua-{attachment_id}"
    client.attach(attachment_id, local_request(loops.make(), guest, volume_id="v"))
    saved = shut_off_with_disk(guest, alias, tmp_path)

    virsh(f"undefine {guest.name}")
    wait_for(lambda: client.list() == [], 10, "the release after undefine")
    assert client.connections().connections == []
    virsh(f"define {saved}")
    wait_for(lambda: "released that attachment" in daemon.log(), 10, "the warning")
    assert f"{guest.name} holds {alias} (config)" in daemon.log()

    [finding] = [  # other tests' guests on this libvirtd may have findings too
        f
        for f in client.doctor().findings
        if f.kind == "unrecorded_disk" and f.subject == guest.name
    ]
    assert "released that attachment" in finding.detail
    assert "--rebuild-state" not in finding.suggestion
    assert f"virsh detach-device-alias {guest.name} {alias} --config" in finding.suggestion
    # The caller's DELETE replays the release, which was the last user's, and
    # the log says why the disk is still on the domain.
    assert client.detach(attachment_id).terminate_connection is True
    assert f"{attachment_id} was released when domain {guest.uuid} was gone" in daemon.log()


class GuestsDefiningBackBeforeListing(HostGuests):
    """hostagent's Guests, defining ``xml`` again right before the next listing
    of every domain (the guard's scan), as an operator's ``virsh define`` landing
    at that moment would."""

    xml: str | None = None

    def list_domains(self) -> list[DomainInfo]:
        if self.xml is not None:
            xml, self.xml = self.xml, None
            self.session.call("define", lambda conn: conn.defineXML(xml))
        return super().list_domains()


@pytest.fixture
def defining_guests() -> Iterator[GuestsDefiningBackBeforeListing]:
    host_guests = GuestsDefiningBackBeforeListing(LIBVIRT_URI, connections=1)
    host_guests.start()
    yield host_guests
    host_guests.stop()


def attached_and_undefined(
    service: AttachmentService, guest: Guest, device: str, tmp_path: Path
) -> tuple[str, str]:
    attachment_id = unique("q")
    service.attach(attachment_id, request(device, guest))
    saved = shut_off_with_disk(guest, f"ua-{attachment_id}", tmp_path)
    guest.dom.undefine()
    return attachment_id, saved.read_text()


def request(device: str, guest: Guest) -> AttachRequest:
    return AttachRequest.model_validate(local_request(device, guest, volume_id="v"))


def test_release_of_an_undefined_domain_defined_again_keeps_the_attachment(
    defining_guests: GuestsDefiningBackBeforeListing,
    guests: Guests,
    loops: LoopDevices,
    tmp_path: Path,
) -> None:
    service = service_with(LocalConnector(), tmp_path, defining_guests)
    guest = guests.make(persistent=True)
    attachment_id, xml = attached_and_undefined(service, guest, loops.make(), tmp_path)

    defining_guests.xml = xml  # defined again while the release's guard looks
    actions = reconciler_for(service).domain_gone(guest.uuid)

    assert [a.action for a in actions] == ["domain_back"], actions
    record = service.store.get_attachment(attachment_id)
    assert record is not None and record.state.value == "attached"
    assert service.store.get_tombstone(attachment_id) is None
    assert len(service.store.list_connections()) == 1


def test_delete_while_the_domain_is_defined_again_removes_the_disk(
    defining_guests: GuestsDefiningBackBeforeListing,
    guests: Guests,
    loops: LoopDevices,
    tmp_path: Path,
) -> None:
    service = service_with(LocalConnector(), tmp_path, defining_guests)
    guest = guests.make(persistent=True)
    attachment_id, xml = attached_and_undefined(service, guest, loops.make(), tmp_path)
    alias = f"ua-{attachment_id}"

    defining_guests.xml = xml  # the DELETE found no domain; it is back for the guard
    result = service.detach(attachment_id)

    assert guest.disk(alias, inactive=True) is None, "detached, yet the disk is in the config"
    assert result.terminate_connection and result.host_disconnected
    assert service.store.list_connections() == []
