"""attachments/service.py: the rules of attach and detach, one per test.

The core runs as the daemon wires it, on a real sqlite store and real locks,
between recording fakes of libvirt and os-brick (tests/unit/recording.py).
The same flows run on real libvirt in tests/integration.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from lxml import etree

from hostagent.attachments.diagnostics import diagnose
from hostagent.connectors import ConnectorError
from hostagent.errors import (
    AttachmentConflict,
    AttachmentIdReused,
    AttachmentNotFound,
    ConnectFailed,
    LibvirtError,
)
from tests.unit.conftest import Core


def test_an_attach_puts_the_disk_in_the_live_domain_and_its_config(core: Core) -> None:
    guest = core.guests.define("g1")
    attachment, created = core.service.attach("a1", core.request(guest))
    assert created and attachment.state == "attached"
    assert core.guests.calls == [("attach", "ua-a1", True, True)]
    assert core.guests.holds(guest, "ua-a1") == (True, True)
    assert core.connector.connects == [core.key]


def test_the_same_put_again_is_the_same_attachment(core: Core) -> None:
    guest = core.guests.define("g1")
    first, _ = core.service.attach("a1", core.request(guest))
    again, created = core.service.attach("a1", core.request(guest))
    assert not created and again == first
    assert core.connector.connects == [core.key], "connected once"


def test_another_request_under_the_same_id_conflicts(core: Core) -> None:
    guest = core.guests.define("g1")
    core.service.attach("a1", core.request(guest))
    with pytest.raises(AttachmentConflict):
        core.service.attach("a1", core.request(guest, mode="ro"))


def test_a_second_attachment_joins_the_connection_without_connecting(core: Core) -> None:
    one, two = core.guests.define("g1"), core.guests.define("g2")
    core.service.attach("a1", core.request(one, multiattach=True))
    attachment, _ = core.service.attach("a2", core.request(two, multiattach=True))
    assert attachment.host_refcount == 2
    assert core.connector.connects == [core.key]


def test_the_last_detach_disconnects_and_reports_terminate_connection(core: Core) -> None:
    guest = core.guests.define("g1")
    core.service.attach("a1", core.request(guest))
    result = core.service.detach("a1")
    assert (result.host_disconnected, result.terminate_connection) == (True, True)
    assert result.host_refcount == 0
    assert core.connector.disconnects == [core.key]
    assert core.guests.holds(guest, "ua-a1") == (False, False)
    assert core.store.get_connection(core.key) is None


def test_a_repeated_delete_answers_the_same_without_a_second_disconnect(core: Core) -> None:
    guest = core.guests.define("g1")
    core.service.attach("a1", core.request(guest))
    first = core.service.detach("a1")
    assert core.service.detach("a1") == first
    assert core.connector.disconnects == [core.key], "terminate_connection reported once"


def test_a_detach_that_leaves_other_users_keeps_the_connection(core: Core) -> None:
    one, two = core.guests.define("g1"), core.guests.define("g2")
    core.service.attach("a1", core.request(one, multiattach=True))
    core.service.attach("a2", core.request(two, multiattach=True))
    result = core.service.detach("a1")
    assert (result.host_disconnected, result.terminate_connection) == (False, False)
    assert result.host_refcount == 1
    assert core.connector.disconnects == []


@pytest.mark.parametrize("event", [True, False], ids=["device-removed", "no-event"])
def test_a_removal_is_confirmed_in_the_live_xml_with_or_without_its_event(
    core: Core, event: bool
) -> None:
    """Without DEVICE_REMOVED the read is the only answer; with it, the read
    returns only once libvirt saved the removal (it holds the domain until
    then), so a libvirtd killed right after the event cannot bring it back."""
    one, two = core.guests.define("g1"), core.guests.define("g2")
    core.service.attach("a1", core.request(one, multiattach=True))
    core.service.attach("a2", core.request(two, multiattach=True))
    core.guests.removal_events = event
    core.guests.xml_reads.clear()
    result = core.service.detach("a1")
    assert core.store.get_attachment("a1") is None and result.host_refcount == 1
    assert core.guests.xml_reads == [(one.uuid, False)], "the live XML says it is gone"
    assert [call for call in core.guests.calls if call[0] == "detach"] == [
        ("detach", "ua-a1", True, True)
    ]


def test_a_domain_that_names_the_device_keeps_the_connection(core: Core) -> None:
    ours, theirs = core.guests.define("g1"), core.guests.define("operator")
    core.service.attach("a1", core.request(ours))
    core.guests.add_disk(theirs, core.device, alias="virtio-disk9", dev="vdz")
    result = core.service.detach("a1")
    assert (result.host_disconnected, result.terminate_connection) == (False, False)
    assert core.connector.disconnects == []
    assert core.store.get_connection(core.key) is not None, "kept for the operator's disk"


def overlay_disk(backing_dev: str, alias: str) -> str:
    """A qcow2 overlay on ``backing_dev``, as libvirt's live XML shows an
    external snapshot's disk: the device only as its backing layer."""
    return (
        "<disk type='file' device='disk'><source file='/var/lib/overlay.qcow2'/>"
        "<backingStore type='block'><format type='raw'/>"
        f"<source dev='{backing_dev}'/><backingStore/></backingStore>"
        f"<target dev='vdz' bus='virtio'/><alias name='{alias}'/></disk>"
    )


def test_a_disk_whose_backing_layer_is_the_device_keeps_the_connection(
    core: Core, caplog: pytest.LogCaptureFixture
) -> None:
    ours, theirs = core.guests.define("g1"), core.guests.define("operator")
    core.service.attach("a1", core.request(ours))
    core.guests._apply(
        theirs.uuid, overlay_disk(core.device, "virtio-disk9"), live=True, config=False
    )
    with caplog.at_level(logging.WARNING, logger="hostagent.attachments"):
        result = core.service.detach("a1")
    assert (result.host_disconnected, result.terminate_connection) == (False, False)
    assert core.connector.disconnects == []
    assert "still used by domain operator (live, disk virtio-disk9, its backing chain)" in (
        caplog.text
    )
    # the doctor says how the operator's disk uses the device
    report = diagnose(core.store, core.guests, boot_id="boot-a")
    assert [f.detail for f in report.findings if f.kind == "foreign_disk"] == [
        f"operator (live) uses {core.device} in the backing chain of vdz without an "
        "attachment of the agent; the device stays connected while it does"
    ]


def test_a_block_copy_of_our_disk_onto_another_connections_device_is_foreign_there(
    core: Core, tmp_path: Path
) -> None:
    """ua-a1 is ours on its own connection; an operator's block copy of it onto
    the device of another of our connections is no attachment of ours there."""
    g1, g2 = core.guests.define("g1"), core.guests.define("g2")
    other = tmp_path / "vol-2"
    other.touch()
    core.service.attach("a1", core.request(g1))
    core.service.attach(
        "a2",
        core.request(
            g2,
            volume_id="vol-2",
            connection_info={"driver_volume_type": "local", "data": {"device_path": str(other)}},
        ),
    )
    (disk,) = core.guests._state(g1.uuid).live.xpath("./devices/disk[alias/@name='ua-a1']")
    disk.append(
        etree.fromstring(f"<mirror type='block' job='copy'><source dev='{other}'/></mirror>")
    )
    expected = (
        f"g1 (live) uses {other} in the block copy of vda without an attachment of the agent; "
        "the device stays connected while it does"
    )
    report = diagnose(core.store, core.guests, boot_id="boot-a")
    assert [(f.kind, f.subject, f.detail) for f in report.findings] == [
        ("foreign_disk", f"local:{other}", expected)
    ], "and none on a1's own connection"
    foreign = [a for a in core.reconciler.run().actions if a.action == "foreign_disk"]
    assert [(a.subject, a.detail) for a in foreign] == [
        (
            f"local:{other}",
            f"domain g1 (live) uses {other} in the block copy of vda without an attachment "
            "of ours; the device stays connected",
        )
    ]


def test_an_unrecorded_disk_with_a_backing_layer_is_reported_once(core: Core) -> None:
    guest = core.guests.define("g1")
    core.guests._apply(guest.uuid, overlay_disk("/dev/loop9", "ua-lost"), live=True, config=False)
    report = diagnose(core.store, core.guests, boot_id="boot-a")
    assert [(f.kind, f.subject) for f in report.findings] == [("unrecorded_disk", "g1")]


def test_a_failed_connect_leaves_no_record(core: Core) -> None:
    guest = core.guests.define("g1")
    core.connector.connect_error = ConnectorError("target refused the login")
    with pytest.raises(ConnectFailed):
        core.service.attach("a1", core.request(guest))
    assert core.store.get_attachment("a1") is None
    assert core.store.get_tombstone("a1") is None, "the id may be used again"
    assert core.store.get_connection(core.key) is None
    assert core.guests.calls == [], "libvirt never asked"


def test_a_disk_libvirt_refuses_rolls_the_attach_back(core: Core) -> None:
    guest = core.guests.define("g1")
    core.guests.refuse_attach = "internal error: unable to execute QEMU command"
    with pytest.raises(LibvirtError):
        core.service.attach("a1", core.request(guest))
    assert core.store.get_attachment("a1") is None
    assert core.connector.disconnects == [core.key], "the connection it made is released"
    assert core.store.get_connection(core.key) is None


def test_a_detached_id_is_not_used_again(core: Core) -> None:
    guest = core.guests.define("g1")
    core.service.attach("a1", core.request(guest))
    core.service.detach("a1")
    with pytest.raises(AttachmentIdReused):
        core.service.attach("a1", core.request(guest))


def test_a_delete_of_an_unknown_id_is_not_found(core: Core) -> None:
    with pytest.raises(AttachmentNotFound):
        core.service.detach("never")


def test_a_detach_removes_the_disk_only_where_the_domain_has_it(core: Core) -> None:
    guest = core.guests.define("g1")
    core.service.attach("a1", core.request(guest))
    core.guests.drop_disk(guest, "ua-a1", "config")
    core.guests.calls.clear()
    core.service.detach("a1")
    assert core.guests.calls == [
        ("detach", "ua-a1", True, True),  # optimistic: refused, the config has none
        ("detach", "ua-a1", True, False),  # asked again where the disk is
    ]
