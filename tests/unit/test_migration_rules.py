"""Live migration hand-off (API.md v1.1): the alias as recorded data, incoming
attachments, arrival, the source's release and the abandoned incoming, one
rule per test, on the core between recording fakes of libvirt and os-brick."""

from __future__ import annotations

import dataclasses
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from hostagent.api.models import Attachment, AttachRequest
from hostagent.attachments.diagnostics import diagnose
from hostagent.attachments.rebuild import unrecorded_disks
from hostagent.errors import DomainExists, DomainMigrating, InvalidRequest, MigrationNotFinished
from hostagent.guests.domains import DomainInfo
from hostagent.state.store import AttachmentState, Store
from tests.unit.conftest import Core


def test_every_read_reports_the_recorded_alias(core: Core) -> None:
    guest = core.guests.define("g1")
    attachment, _ = core.service.attach("a1", core.request(guest))
    assert attachment.alias == "ua-a1"
    record = core.store.get_attachment("a1")
    assert record is not None and record.alias == "ua-a1"


def test_a_disk_whose_alias_is_not_its_attachment_id_counts_as_recorded(core: Core) -> None:
    """A migrated disk keeps the source's alias: rebuild must not adopt it twice."""
    guest = core.guests.define("g1")
    core.guests.add_disk(guest, core.device, alias="ua-from-source", dev="vdb")
    assert [f.disk.alias for f in unrecorded_disks(core.store, core.guests)] == ["ua-from-source"]
    core.service.attach("a1", core.request(guest))
    record = core.store.get_attachment("a1")
    assert record is not None
    # the recorded alias, not the id, is what names the disk
    core.store.forget_attachment("a1")
    core.store.adopt(
        dataclasses.replace(record, alias="ua-from-source", state=AttachmentState.ATTACHED),
        core.store.get_connection(core.key),  # type: ignore[arg-type]
    )
    assert [f.disk.alias for f in unrecorded_disks(core.store, core.guests)] == ["ua-a1"]


SOURCE_ALIAS = "ua-src-1"


def incoming(core: Core, domain_uuid: str, **extra: Any) -> AttachRequest:
    return core.request(
        DomainInfo(domain_uuid, domain_uuid, active=False, persistent=False),
        multiattach=True,
        incoming_migration={"alias": SOURCE_ALIAS},
        **extra,
    )


def disk_of(attachment: Attachment) -> str:
    assert attachment.disk_xml is not None
    return attachment.disk_xml


def test_an_incoming_attach_connects_and_records_without_libvirt(core: Core) -> None:
    arriving = str(uuid.uuid4())
    attachment, created = core.service.attach("d1", incoming(core, arriving))
    assert created and attachment.state == "incoming"
    assert attachment.alias == SOURCE_ALIAS and attachment.host_refcount == 1
    assert attachment.device_path == core.device
    disk = etree.fromstring(disk_of(attachment))
    assert disk.xpath("string(./alias/@name)") == SOURCE_ALIAS
    assert disk.xpath("string(./source/@dev)") == core.device
    assert disk.find("./shareable") is not None
    assert core.connector.connects == [core.key]
    assert core.guests.calls == [], "nothing asked of libvirt"


def test_an_incoming_attach_joins_a_connection_another_guest_uses(core: Core) -> None:
    other = core.guests.define("b")
    core.service.attach("b1", core.request(other, multiattach=True))
    attachment, _ = core.service.attach("d1", incoming(core, str(uuid.uuid4())))
    assert attachment.host_refcount == 2
    assert core.connector.connects == [core.key], "joined, not connected again"


def test_the_same_incoming_put_again_is_the_same_attachment(core: Core) -> None:
    arriving = str(uuid.uuid4())
    first, _ = core.service.attach("d1", incoming(core, arriving))
    again, created = core.service.attach("d1", incoming(core, arriving.upper()))
    assert not created and again == first
    assert core.connector.connects == [core.key]


def test_an_incoming_attach_names_its_domain_by_uuid(core: Core) -> None:
    with pytest.raises(InvalidRequest):
        core.service.attach("d1", incoming(core, "guest-m"))


def test_an_incoming_attach_for_a_domain_running_here_outside_a_migration_is_refused(
    core: Core,
) -> None:
    here = core.guests.define("m")
    with pytest.raises(DomainExists):
        core.service.attach("d1", incoming(core, here.uuid))
    core.guests.migrating_domains.add(here.uuid)  # the same domain, arriving now
    attachment, _ = core.service.attach("d1", incoming(core, here.uuid))
    assert attachment.state == "incoming"


def test_confirm_before_the_domain_arrives_is_refused(core: Core) -> None:
    arriving = str(uuid.uuid4())
    core.service.attach("d1", incoming(core, arriving))
    with pytest.raises(MigrationNotFinished):
        core.service.migrations.confirm("d1")
    core.guests.arrive(arriving, "m")  # here, but without the disk
    with pytest.raises(MigrationNotFinished):
        core.service.migrations.confirm("d1")
    assert core.service.store.get_attachment("d1").state is AttachmentState.INCOMING  # type: ignore[union-attr]


def test_confirm_after_the_arrival_attaches(core: Core) -> None:
    arriving = str(uuid.uuid4())
    prepared, _ = core.service.attach("d1", incoming(core, arriving))
    core.guests.arrive(arriving, "m", live_disk(prepared))
    core.guests.migrating_domains.add(arriving)
    with pytest.raises(MigrationNotFinished):
        core.service.migrations.confirm("d1")  # still in its migration job
    core.guests.migrating_domains.clear()
    attachment = core.service.migrations.confirm("d1")
    assert (attachment.state, attachment.domain_name, attachment.target_dev) == (
        "attached",
        "m",
        "vdc",
    )
    assert core.service.migrations.confirm("d1") == attachment, "confirm again: the same"


def live_disk(prepared: Attachment) -> str:
    """The disk as libvirt shows it in the arrived domain (its source domain's target)."""
    disk = etree.fromstring(disk_of(prepared))
    target = disk.find("./target")
    assert target is not None
    target.set("dev", "vdc")
    return str(etree.tostring(disk, encoding="unicode"))


def test_the_arrival_event_attaches_every_incoming_disk_of_the_domain(core: Core) -> None:
    arriving = str(uuid.uuid4())
    prepared, _ = core.service.attach("d1", incoming(core, arriving))
    assert core.service.migrations.arrived(arriving) == []
    core.guests.arrive(arriving, "m", live_disk(prepared))
    assert core.service.migrations.arrived(arriving) == ["d1"]
    assert core.service.store.get_attachment("d1").state is AttachmentState.ATTACHED  # type: ignore[union-attr]


def test_reconcile_attaches_an_arrived_incoming(core: Core) -> None:
    arriving = str(uuid.uuid4())
    prepared, _ = core.service.attach("d1", incoming(core, arriving))
    core.guests.arrive(arriving, "m", live_disk(prepared))
    actions = core.reconciler.run().actions
    assert [(a.action, a.subject) for a in actions] == [("arrived", "d1")]


def test_reconcile_keeps_an_incoming_until_its_timeout_then_releases_it(core: Core) -> None:
    arriving = str(uuid.uuid4())
    core.service.attach("d1", incoming(core, arriving))
    assert core.reconciler.run().actions == []
    core.clock[0] += 3600
    actions = core.reconciler.run().actions
    assert [(a.action, a.subject) for a in actions] == [("abandoned_incoming", "d1")]
    assert core.connector.disconnects == [core.key]
    assert core.service.detach("d1").terminate_connection, "the DELETE replays the release"


def test_an_abandoned_incoming_keeps_the_connection_of_another_guest(core: Core) -> None:
    other = core.guests.define("b")
    core.service.attach("b1", core.request(other, multiattach=True))
    core.service.attach("d1", incoming(core, str(uuid.uuid4())))
    core.clock[0] += 3600
    core.reconciler.run()
    assert core.store.get_attachment("d1") is None
    assert core.connector.disconnects == []


def test_delete_of_an_incoming_releases_it_without_libvirt(core: Core) -> None:
    other = core.guests.define("b")
    core.service.attach("b1", core.request(other, multiattach=True))
    core.service.attach("d1", incoming(core, str(uuid.uuid4())))
    calls = list(core.guests.calls)
    result = core.service.detach("d1")
    assert (result.host_refcount, result.terminate_connection) == (1, False)
    assert core.guests.calls == calls, "nothing to unplug"
    last = core.service.detach("b1")
    assert last.terminate_connection and core.connector.disconnects == [core.key]


def test_the_last_incoming_released_disconnects(core: Core) -> None:
    core.service.attach("d1", incoming(core, str(uuid.uuid4())))
    result = core.service.detach("d1")
    assert (result.host_disconnected, result.terminate_connection) == (True, True)
    assert core.connector.disconnects == [core.key]


def test_delete_of_an_incoming_whose_domain_arrived_detaches_the_disk(core: Core) -> None:
    arriving = str(uuid.uuid4())
    prepared, _ = core.service.attach("d1", incoming(core, arriving))
    domain = core.guests.arrive(arriving, "m", live_disk(prepared))
    core.service.detach("d1")
    assert core.guests.holds(domain, SOURCE_ALIAS) == (False, False)
    assert ("detach", SOURCE_ALIAS, True, False) in core.guests.calls


def test_a_detach_while_the_domain_migrates_is_refused(core: Core) -> None:
    guest = core.guests.define("m")
    core.service.attach("a1", core.request(guest))
    core.guests.migrating_domains.add(guest.uuid)
    with pytest.raises(DomainMigrating):
        core.service.detach("a1")
    assert core.store.get_attachment("a1").state is AttachmentState.ATTACHED  # type: ignore[union-attr]


def test_the_source_release_after_the_move_unplugs_nothing(core: Core) -> None:
    moving = core.guests.define("m", persistent=False)
    other = core.guests.define("a")
    core.service.attach("m1", core.request(moving, multiattach=True))
    core.service.attach("a1", core.request(other, multiattach=True))
    core.guests.vanish(moving)  # migrated away
    calls = list(core.guests.calls)
    result = core.service.detach("m1")
    assert (result.host_disconnected, result.terminate_connection) == (False, False)
    assert core.guests.calls == calls
    assert core.guests.holds(other, "ua-a1") == (True, True)


def test_the_last_source_release_after_the_move_disconnects_once(core: Core) -> None:
    moving = core.guests.define("m", persistent=False)
    core.service.attach("m1", core.request(moving))
    core.guests.vanish(moving)
    result = core.service.detach("m1")
    assert (result.host_disconnected, result.terminate_connection) == (True, True)
    assert core.service.detach("m1") == result
    assert core.connector.disconnects == [core.key]


def test_a_detach_after_arrival_finds_the_disk_by_the_recorded_alias(core: Core) -> None:
    arriving = str(uuid.uuid4())
    prepared, _ = core.service.attach("d1", incoming(core, arriving))
    domain = core.guests.arrive(arriving, "m", live_disk(prepared))
    core.service.migrations.confirm("d1")
    result = core.service.detach("d1")
    assert result.terminate_connection
    assert core.guests.holds(domain, SOURCE_ALIAS) == (False, False)


def test_a_v1_state_file_is_migrated_to_allow_incoming(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.execute(
        "INSERT INTO connections VALUES ('local:/dev/x', 'local', '{}', 'raw', '/dev/x', '{}',"
        " 'connected', 'b', 1.0, 1.0)"
    )
    db.execute(
        "INSERT INTO attachments VALUES ('a1', 'v1', 'u1', 'g1', 'local:/dev/x', 'attached', 1,"
        " 'rw', 'scsi', 'v1', 'ua-a1', 'h', 'sda', '<disk/>', 1.0, 1.0)"
    )
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    store = Store(path)
    try:
        record = store.get_attachment("a1")
        assert record is not None and record.alias == "ua-a1" and record.target_dev == "sda"
        store.set_attachment_state("a1", AttachmentState.INCOMING)
        assert store.get_attachment("a1").state is AttachmentState.INCOMING  # type: ignore[union-attr]
        assert store.refcount("local:/dev/x") == 1
    finally:
        store.close()


V1_SCHEMA = """
CREATE TABLE connections (
    connection_key TEXT PRIMARY KEY, driver_volume_type TEXT NOT NULL,
    connection_data TEXT NOT NULL, disk_format TEXT NOT NULL, device_path TEXT,
    device_info TEXT,
    state TEXT NOT NULL CHECK (state IN ('connecting', 'connected', 'disconnecting')),
    boot_id TEXT NOT NULL, created_at REAL NOT NULL, connected_at REAL
);
CREATE TABLE attachments (
    attachment_id TEXT PRIMARY KEY, volume_id TEXT NOT NULL, domain_uuid TEXT NOT NULL,
    domain_name TEXT NOT NULL,
    connection_key TEXT NOT NULL REFERENCES connections (connection_key),
    state TEXT NOT NULL CHECK (state IN ('attaching', 'attached', 'detaching')),
    multiattach INTEGER NOT NULL, mode TEXT NOT NULL, bus TEXT NOT NULL,
    serial TEXT NOT NULL, alias TEXT NOT NULL, request_hash TEXT NOT NULL,
    target_dev TEXT, disk_xml TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    UNIQUE (domain_uuid, volume_id), UNIQUE (domain_uuid, connection_key),
    UNIQUE (domain_uuid, target_dev)
);
CREATE INDEX attachments_by_connection ON attachments (connection_key);
CREATE INDEX attachments_by_volume ON attachments (volume_id);
CREATE TABLE tombstones (
    attachment_id TEXT PRIMARY KEY, volume_id TEXT NOT NULL, domain_uuid TEXT NOT NULL,
    result TEXT NOT NULL, detached_at REAL NOT NULL
);
"""


def test_the_doctor_sees_an_awaited_incoming_as_no_disagreement(core: Core) -> None:
    arriving = str(uuid.uuid4())
    prepared, _ = core.service.attach("d1", incoming(core, arriving))
    assert diagnose(core.store, core.guests, boot_id="boot-a").findings == []
    core.guests.arrive(arriving, "m", live_disk(prepared))
    core.guests.migrating_domains.add(arriving)  # not recorded yet
    (finding,) = diagnose(core.store, core.guests, boot_id="boot-a").findings
    assert (finding.kind, finding.suggestion) == ("arrived_unconfirmed", "hostagentctl confirm d1")
