"""store.py on a real sqlite file: intent rows, derived refcount, tombstones, conflicts."""

from __future__ import annotations

import sqlite3
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from hostagent.errors import (
    AttachmentIdReused,
    TargetDevInUse,
    VolumeAlreadyAttached,
    VolumeNotMultiattach,
)
from hostagent.state.store import (
    AttachmentRecord,
    AttachmentState,
    ConnectionRecord,
    ConnectionReleasing,
    ConnectionState,
    Store,
    StoreError,
)


class FakeClock:
    """A settable clock, so tombstone ages are exact."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Store:
    return Store(tmp_path / "state" / "hostagent.sqlite3", clock=clock)


def connection(key: str = "local:/dev/loop7") -> ConnectionRecord:
    return ConnectionRecord(
        connection_key=key,
        driver_volume_type="local",
        connection_data={"device_path": key.split(":", 1)[1]},
        disk_format="raw",
        state=ConnectionState.CONNECTING,
        boot_id="boot-1",
        created_at=0.0,
    )


def attachment(
    attachment_id: str,
    *,
    domain: str = "dom-1",
    volume: str = "vol-1",
    key: str = "local:/dev/loop7",
    multiattach: bool = True,
    target_dev: str | None = None,
) -> AttachmentRecord:
    return AttachmentRecord(
        attachment_id=attachment_id,
        volume_id=volume,
        domain_uuid=domain,
        domain_name=f"name-{domain}",
        connection_key=key,
        state=AttachmentState.ATTACHING,
        multiattach=multiattach,
        mode="rw",
        bus="scsi",
        serial=volume,
        alias=f"ua-{attachment_id}",
        request_hash="hash",
        created_at=0.0,
        updated_at=0.0,
        target_dev=target_dev,
    )


def test_file_is_private_and_durable(store: Store) -> None:
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # synchronous is per connection; check the store's own.
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_refcount_is_derived_from_attachment_rows(store: Store) -> None:
    assert store.refcount("local:/dev/loop7") == 0
    first = store.begin_attach(attachment("a1"), connection())
    assert first.state is ConnectionState.CONNECTING
    store.set_connection_state(
        "local:/dev/loop7",
        ConnectionState.CONNECTED,
        device_path="/dev/loop7",
        device_info={"path": "/dev/loop7"},
    )
    again = store.begin_attach(attachment("a2", domain="dom-2"), connection())
    assert again.state is ConnectionState.CONNECTED, "a second attach reuses the connection"
    assert again.device_path == "/dev/loop7"
    assert store.refcount("local:/dev/loop7") == 2
    store.forget_attachment("a2")
    assert store.refcount("local:/dev/loop7") == 1
    assert "host_refcount" not in {
        row[1] for row in store._db.execute("PRAGMA table_info(connections)")
    }


def test_conflicts_are_checked_atomically_in_api_order(store: Store) -> None:
    store.begin_attach(attachment("a1", target_dev="sdb"), connection())
    with pytest.raises(VolumeAlreadyAttached):
        store.begin_attach(attachment("a2"), connection())
    with pytest.raises(VolumeAlreadyAttached, match="already attached"):
        # another volume id, same device, same domain
        store.begin_attach(attachment("a3", volume="vol-2"), connection())
    with pytest.raises(VolumeNotMultiattach):
        store.begin_attach(attachment("a4", domain="dom-2", multiattach=False), connection())
    with pytest.raises(TargetDevInUse):
        store.begin_attach(
            attachment("a5", volume="vol-9", key="local:/dev/loop9", target_dev="sdb"),
            connection("local:/dev/loop9"),
        )
    assert [a.attachment_id for a in store.list_attachments()] == ["a1"]
    assert [c.connection_key for c in store.list_connections()] == ["local:/dev/loop7"]


def test_non_multiattach_first_refuses_any_second(store: Store) -> None:
    store.begin_attach(attachment("a1", multiattach=False), connection())
    with pytest.raises(VolumeNotMultiattach):
        store.begin_attach(attachment("a2", domain="dom-2"), connection())


def test_finish_detach_writes_the_tombstone_and_releases(store: Store, clock: FakeClock) -> None:
    record = attachment("a1")
    store.begin_attach(record, connection())
    result = {"attachment_id": "a1", "terminate_connection": True}
    store.finish_detach(record, result, drop_connection=True)
    assert store.get_attachment("a1") is None
    assert store.list_connections() == []
    tombstone = store.get_tombstone("a1")
    assert tombstone is not None
    assert tombstone.result == result
    with pytest.raises(AttachmentIdReused):
        store.begin_attach(attachment("a1"), connection())

    clock.now += 86400
    assert store.purge_tombstones(clock.now - 86400 - 1) == 0, "kept for at least the ttl"
    assert store.purge_tombstones(clock.now - 10) == 1
    assert store.get_tombstone("a1") is None


def test_a_failed_commit_is_rolled_back_and_the_store_stays_usable(store: Store) -> None:
    store.begin_attach(attachment("a1"), connection())
    with pytest.raises(sqlite3.IntegrityError), store._tx() as db:
        # The check is deferred to COMMIT, so the COMMIT itself fails, as it
        # would on a full disk.
        db.execute("PRAGMA defer_foreign_keys = ON")
        db.execute("DELETE FROM connections")
    assert store.get_connection("local:/dev/loop7") is not None, "nothing of it stays"
    store.begin_attach(attachment("a2", domain="dom-2"), connection())
    assert store.refcount("local:/dev/loop7") == 2, "the next write works"


def test_drop_connection_refuses_while_referenced(store: Store) -> None:
    store.begin_attach(attachment("a1"), connection())
    store.drop_connection("local:/dev/loop7")
    assert store.get_connection("local:/dev/loop7") is not None


def test_placement_rejects_a_target_dev_held_by_another_record(store: Store) -> None:
    store.begin_attach(attachment("a1", target_dev="sdc"), connection())
    store.begin_attach(
        attachment("a2", volume="vol-2", key="local:/dev/loop9"), connection("local:/dev/loop9")
    )
    with pytest.raises(TargetDevInUse):
        store.set_attachment_placement("a2", target_dev="sdc", disk_xml="<disk/>")
    store.set_attachment_placement("a2", target_dev="sdd", disk_xml="<disk/>")
    stored = store.get_attachment("a2")
    assert stored is not None
    assert (stored.target_dev, stored.disk_xml) == ("sdd", "<disk/>")


def test_state_survives_reopen(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "s.sqlite3"
    first = Store(path, clock=clock)
    first.begin_attach(attachment("a1"), connection())
    first.set_attachment_state("a1", AttachmentState.DETACHING)
    first.close()
    reopened = Store(path, clock=clock)
    stored = reopened.get_attachment("a1")
    assert stored is not None
    assert replace(stored, updated_at=0.0, created_at=0.0) == replace(
        attachment("a1"), state=AttachmentState.DETACHING
    )


def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="unusable"):
        Store(path)


def test_release_if_shared_is_one_transaction_and_only_when_shared(store: Store) -> None:
    store.begin_attach(attachment("a1"), connection())
    store.begin_attach(attachment("a2", domain="dom-2"), connection())

    def body(users_left: int) -> dict[str, object]:
        return {"attachment_id": "a1", "host_refcount": users_left}

    assert store.release_if_shared(attachment("a1"), body) == {
        "attachment_id": "a1",
        "host_refcount": 1,
    }
    assert store.get_attachment("a1") is None
    assert store.get_tombstone("a1") is not None
    assert store.release_if_shared(attachment("a2", domain="dom-2"), body) is None
    assert store.get_attachment("a2") is not None, "the last user is left to the caller"


def test_a_connection_being_released_refuses_new_intents(store: Store) -> None:
    store.begin_attach(attachment("a1"), connection())
    assert not store.mark_disconnecting("local:/dev/loop7"), "a1 still uses it"
    assert store.mark_disconnecting("local:/dev/loop7", excluding="a1")
    marked = store.get_connection("local:/dev/loop7")
    assert marked is not None and marked.state is ConnectionState.DISCONNECTING
    with pytest.raises(ConnectionReleasing):
        store.begin_attach(attachment("a2", domain="dom-2"), connection())
    assert store.get_attachment("a2") is None
    store.begin_attach(attachment("a2", domain="dom-2"), connection(), while_releasing=True)
    assert store.refcount("local:/dev/loop7") == 2


def test_records_read_back_whole_and_summaries_agree_with_them(store: Store) -> None:
    # rows are built by position: every field must come back as written
    first = attachment("a1", target_dev="sda")
    second = replace(
        attachment(
            "a2", domain="dom-2", volume="vol-2", key="local:/dev/loop8", multiattach=False
        ),
        disk_xml="<disk/>",
    )
    store.begin_attach(first, connection())
    store.begin_attach(second, connection("local:/dev/loop8"))
    store.set_attachment_state("a2", AttachmentState.ATTACHED)
    now = 1_000_000.0  # the store stamps both times with its clock
    listed = store.list_attachments()
    assert listed == [
        replace(first, created_at=now, updated_at=now),
        replace(second, state=AttachmentState.ATTACHED, created_at=now, updated_at=now),
    ]
    assert store.get_attachment("a2") == listed[1]
    assert [type(a.state) for a in listed] == [AttachmentState, AttachmentState]
    assert [type(a.multiattach) for a in listed] == [bool, bool]
    _, summaries = store.attachment_summaries()
    assert list(summaries) == [
        (a.attachment_id, a.domain_uuid, a.domain_name, a.alias, a.state, a.connection_key)
        for a in listed
    ]


def test_summaries_are_read_again_only_after_a_write(store: Store) -> None:
    store.begin_attach(attachment("a1"), connection())
    reads: list[str] = []
    store._reader().set_trace_callback(reads.append)
    first = store.attachment_summaries()
    assert store.attachment_summaries() == first
    assert len(reads) == 1, "nothing written: the rows read are the rows"
    store.set_attachment_state("a1", AttachmentState.ATTACHED)
    writes, summaries = store.attachment_summaries()
    assert len(reads) == 2 and writes > first[0]
    assert [s.state for s in summaries] == [AttachmentState.ATTACHED]
