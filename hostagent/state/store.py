"""Durable state in sqlite: host connections, attachments, tombstones.

The file, its schema and its pragmas are ``hostagent.state.state_file``'s. The
refcount of a connection is never stored; it is the number of attachment
rows that reference it (any state), so it cannot drift from them. Every
check-and-write runs in one ``BEGIN IMMEDIATE`` transaction, so two requests
can never both pass a conflict check. Every write is an intent (fsync'd,
``Sync.INTENT``) but four completions: ``connected``, ``attached``, and the
two ends of a detach (``release_if_shared``, ``finish_detach``), which a
power cut may lose back to the intent before them (``Sync``); and the attach
intent on a connection already up is NORMAL, carried by the placement's fsync
before libvirt is asked (``begin_attach``'s ``sync``).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from hostagent.errors import TargetDevInUse
from hostagent.state.attach_rules import refusal
from hostagent.state.records import (
    INSERT_ATTACHMENT,
    SELECT_ATTACHMENT,
    SELECT_ATTACHMENT_SUMMARY,
    AttachmentRecord,
    AttachmentState,
    AttachmentSummary,
    ConnectionRecord,
    ConnectionState,
    Tombstone,
    attachment_from_row,
    attachment_row,
    attachment_summary_from_row,
    connection_from_row,
)
from hostagent.state.state_file import StoreError, Sync, open_state_file

# The records are defined in hostagent.state.records; callers import them from here.
__all__ = [
    "AttachmentRecord",
    "AttachmentState",
    "AttachmentSummary",
    "ConnectionRecord",
    "ConnectionReleasing",
    "ConnectionState",
    "Store",
    "StoreError",
    "Sync",
    "Tombstone",
]


class ConnectionReleasing(RuntimeError):
    """The connection is being disconnected; wait for its lock, then try again."""


class Store:
    """sqlite state shared by the daemon's threads.

    All writes go through one connection under a mutex (tiny transactions,
    never ``database is locked``); each thread reads through its own
    connection, which WAL lets proceed while a commit is being synced.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._mutex = threading.RLock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._db = open_state_file(path)
        self._sync = Sync.INTENT  # the writer's level as opened
        self._summaries: tuple[int, tuple[AttachmentSummary, ...]] | None = None
        # Called after each commit with its level, under the writer mutex:
        # tests copy the file at each intent to model a power cut.
        self.on_commit: Callable[[Sync], None] | None = None

    def close(self) -> None:
        with self._mutex:
            for reader in self._readers:
                reader.close()
            self._readers.clear()
            self._db.close()

    def _reader(self) -> sqlite3.Connection:
        reader: sqlite3.Connection | None = getattr(self._local, "reader", None)
        if reader is None:
            reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            reader.row_factory = sqlite3.Row
            reader.execute("PRAGMA query_only=ON")
            self._local.reader = reader
            with self._mutex:
                self._readers.append(reader)
        return reader

    @contextlib.contextmanager
    def _tx(self, sync: Sync = Sync.INTENT) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed at ``sync`` (an intent unless the
        caller says it is a completion reconcile can derive again)."""
        with self._mutex:
            if sync is not self._sync:
                # synchronous is the connection's; it may change between transactions
                self._db.execute(f"PRAGMA synchronous={sync}")
                self._sync = sync
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
                if self.on_commit is not None:
                    self.on_commit(sync)
            except BaseException:
                # A COMMIT that fails (disk full, I/O error) may leave the
                # transaction open: end it, or every later write would fail.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return self._reader().execute(sql, params).fetchall()

    # reads

    def get_attachment(self, attachment_id: str) -> AttachmentRecord | None:
        rows = self._read(f"{SELECT_ATTACHMENT} WHERE attachment_id = ?", (attachment_id,))
        return attachment_from_row(rows[0]) if rows else None

    def list_attachments(
        self, *, connection_key: str | None = None, domain_uuid: str | None = None
    ) -> list[AttachmentRecord]:
        sql, params = f"{SELECT_ATTACHMENT} WHERE 1=1", []
        if connection_key is not None:
            sql += " AND connection_key = ?"
            params.append(connection_key)
        if domain_uuid is not None:
            sql += " AND domain_uuid = ?"
            params.append(domain_uuid)
        rows = self._read(sql + " ORDER BY created_at, attachment_id", tuple(params))
        return [attachment_from_row(r) for r in rows]

    def writes(self) -> int:
        """How many rows the writer has changed since the file was opened: equal
        counts mean nothing was written in between (every write goes through
        the writer; one rolled back still counts, which only costs a read)."""
        with self._mutex:
            return self._db.total_changes

    def attachment_summaries(self) -> tuple[int, tuple[AttachmentSummary, ...]]:
        """Every attachment's id, domain, alias and state, in ``list_attachments``'
        order, with ``writes()`` as of before the read: the same count means the
        same rows. Read again only after a write (reconcile asks every pass)."""
        writes = self.writes()  # before the read: a write in between makes it older
        kept = self._summaries
        if kept is not None and kept[0] == writes:
            return kept
        rows = self._read(f"{SELECT_ATTACHMENT_SUMMARY} ORDER BY created_at, attachment_id")
        self._summaries = (writes, tuple(attachment_summary_from_row(r) for r in rows))
        return self._summaries

    def get_connection(self, connection_key: str) -> ConnectionRecord | None:
        rows = self._read("SELECT * FROM connections WHERE connection_key = ?", (connection_key,))
        return connection_from_row(rows[0]) if rows else None

    def list_connections(self) -> list[ConnectionRecord]:
        rows = self._read("SELECT * FROM connections ORDER BY created_at, connection_key")
        return [connection_from_row(r) for r in rows]

    def refcount(self, connection_key: str) -> int:
        """Attachments (any state) that use the connection: the derived refcount."""
        rows = self._read(
            "SELECT count(*) FROM attachments WHERE connection_key = ?", (connection_key,)
        )
        return int(rows[0][0])

    def state_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(attachments by state, connections by state), for metrics."""
        attachments = self._read("SELECT state, count(*) FROM attachments GROUP BY state")
        connections = self._read("SELECT state, count(*) FROM connections GROUP BY state")
        return (
            {row[0]: int(row[1]) for row in attachments},
            {row[0]: int(row[1]) for row in connections},
        )

    def get_tombstone(self, attachment_id: str) -> Tombstone | None:
        rows = self._read("SELECT * FROM tombstones WHERE attachment_id = ?", (attachment_id,))
        if not rows:
            return None
        row = rows[0]
        return Tombstone(
            attachment_id=row["attachment_id"],
            volume_id=row["volume_id"],
            domain_uuid=row["domain_uuid"],
            result=json.loads(row["result"]),
            detached_at=row["detached_at"],
        )

    def get_meta(self, key: str) -> str | None:
        """A fact about the state itself (``meta`` table), None if never set."""
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    # writes

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def begin_attach(
        self,
        attachment: AttachmentRecord,
        connection: ConnectionRecord,
        *,
        while_releasing: bool = False,
        sync: Sync = Sync.INTENT,
    ) -> ConnectionRecord:
        """Record the intent to attach (and to connect, if the connection is new).

        Refuses, atomically, everything API.md orders after the id checks
        (``attach_rules.refusal``): a reused id, the volume or device already
        on this domain, a non-multiattach sharing, a target dev our records
        already hold.
        Raises ConnectionReleasing, recording nothing, while the connection is
        ``disconnecting``, unless ``while_releasing`` (the caller holds the
        connection lock and will connect it again). Returns the connection
        row as it now stands. ``sync`` is ``Sync.COMPLETION`` only when the
        caller's next act waits for a later intent (``Sync``).
        """
        with self._tx(sync) as db:
            state = db.execute(
                "SELECT state FROM connections WHERE connection_key = ?",
                (connection.connection_key,),
            ).fetchone()
            if state and state[0] == ConnectionState.DISCONNECTING and not while_releasing:
                raise ConnectionReleasing(connection.connection_key)
            a = attachment
            tombstone = db.execute(
                "SELECT 1 FROM tombstones WHERE attachment_id = ?", (a.attachment_id,)
            ).fetchone()
            sharing = [
                attachment_from_row(r)
                for r in db.execute(
                    f"{SELECT_ATTACHMENT} WHERE (volume_id = ? OR connection_key = ?)"
                    " AND attachment_id != ?",
                    (a.volume_id, a.connection_key, a.attachment_id),
                )
            ]
            dev_taken = (
                a.target_dev is not None
                and db.execute(
                    "SELECT 1 FROM attachments WHERE domain_uuid = ? AND target_dev = ?",
                    (a.domain_uuid, a.target_dev),
                ).fetchone()
            )
            refused = refusal(
                a,
                id_detached=tombstone is not None,
                sharing=sharing,
                target_dev_taken=bool(dev_taken),
            )
            if refused is not None:
                raise refused
            db.execute(
                "INSERT OR IGNORE INTO connections (connection_key, driver_volume_type,"
                " connection_data, disk_format, state, boot_id, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    connection.connection_key,
                    connection.driver_volume_type,
                    json.dumps(dict(connection.connection_data), sort_keys=True),
                    connection.disk_format,
                    ConnectionState.CONNECTING,
                    connection.boot_id,
                    self._clock(),
                ),
            )
            self._insert_attachment(db, attachment)
            row = db.execute(
                "SELECT * FROM connections WHERE connection_key = ?", (connection.connection_key,)
            ).fetchone()
            return connection_from_row(row)

    def _insert_attachment(self, db: sqlite3.Connection, a: AttachmentRecord) -> None:
        db.execute(INSERT_ATTACHMENT, attachment_row(a, self._clock()))

    def set_connection_state(
        self,
        connection_key: str,
        state: ConnectionState,
        *,
        device_path: str | None = None,
        device_info: Mapping[str, Any] | None = None,
        boot_id: str | None = None,
        keep_device: bool = False,
    ) -> None:
        """Move a connection to ``state``; on ``connected`` record the device
        (or, with ``keep_device``, put it back as it was recorded).

        Recording a device is a completion: lost, the row is ``connecting``
        (an intent) of a boot that the power cut ended, which reconcile
        connects again for its users or releases."""
        records_device = state is ConnectionState.CONNECTED and not keep_device
        with self._tx(Sync.COMPLETION if records_device else Sync.INTENT) as db:
            if records_device:
                db.execute(
                    "UPDATE connections SET state = ?, device_path = ?, device_info = ?,"
                    " connected_at = ?, boot_id = coalesce(?, boot_id)"
                    " WHERE connection_key = ?",
                    (
                        state,
                        device_path,
                        json.dumps(dict(device_info or {}), sort_keys=True),
                        self._clock(),
                        boot_id,
                        connection_key,
                    ),
                )
            else:
                db.execute(
                    "UPDATE connections SET state = ? WHERE connection_key = ?",
                    (state, connection_key),
                )

    def set_attachment_placement(
        self, attachment_id: str, *, target_dev: str, disk_xml: str
    ) -> None:
        """Record the chosen target dev and disk XML before libvirt is asked."""
        with self._tx() as db:
            clash = db.execute(
                "SELECT attachment_id FROM attachments WHERE target_dev = ? AND"
                " domain_uuid = (SELECT domain_uuid FROM attachments WHERE attachment_id = ?)"
                " AND attachment_id != ?",
                (target_dev, attachment_id, attachment_id),
            ).fetchone()
            if clash:
                raise TargetDevInUse(f"target dev {target_dev} is held by {clash[0]}")
            db.execute(
                "UPDATE attachments SET target_dev = ?, disk_xml = ?, updated_at = ?"
                " WHERE attachment_id = ?",
                (target_dev, disk_xml, self._clock(), attachment_id),
            )

    def set_incoming_disk(self, attachment_id: str, disk_xml: str) -> None:
        """Record the disk an incoming attachment's domain is to arrive with."""
        with self._tx() as db:
            db.execute(
                "UPDATE attachments SET disk_xml = ?, updated_at = ? WHERE attachment_id = ?",
                (disk_xml, self._clock(), attachment_id),
            )

    def record_arrival(
        self, attachment_id: str, *, domain_name: str, target_dev: str | None, disk_xml: str
    ) -> None:
        """An incoming attachment's domain runs here with the disk: ``attached``,
        with the name, target dev and disk the domain has now."""
        with self._tx() as db:
            db.execute(
                "UPDATE attachments SET state = ?, domain_name = ?, target_dev = ?,"
                " disk_xml = ?, updated_at = ? WHERE attachment_id = ? AND state = ?",
                (
                    AttachmentState.ATTACHED,
                    domain_name,
                    target_dev,
                    disk_xml,
                    self._clock(),
                    attachment_id,
                    AttachmentState.INCOMING,
                ),
            )

    def set_attachment_state(self, attachment_id: str, state: AttachmentState) -> None:
        """``attached`` is a completion (lost: ``attaching`` with its disk XML,
        which reconcile finishes if the domain holds the disk, else rolls
        back); every other state is the intent of what follows."""
        sync = Sync.COMPLETION if state is AttachmentState.ATTACHED else Sync.INTENT
        with self._tx(sync) as db:
            db.execute(
                "UPDATE attachments SET state = ?, updated_at = ? WHERE attachment_id = ?",
                (state, self._clock(), attachment_id),
            )

    def rename_domain(self, domain_uuid: str, name: str) -> int:
        """Record ``name`` as the name of the domain with ``domain_uuid`` (``virsh
        domrename``); returns how many attachments had another name."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE attachments SET domain_name = ?"
                " WHERE domain_uuid = ? AND domain_name != ?",
                (name, domain_uuid, name),
            )
            return cur.rowcount

    def adopt(self, attachment: AttachmentRecord, connection: ConnectionRecord) -> bool:
        """Record an attachment found in libvirt (``--rebuild-state``) as it is,
        with its connection up; False if its id is already known."""
        with self._tx() as db:
            known = db.execute(
                "SELECT 1 FROM attachments WHERE attachment_id = ? UNION ALL"
                " SELECT 1 FROM tombstones WHERE attachment_id = ?",
                (attachment.attachment_id, attachment.attachment_id),
            ).fetchone()
            if known:
                return False
            db.execute(
                "INSERT OR IGNORE INTO connections (connection_key, driver_volume_type,"
                " connection_data, disk_format, device_path, device_info, state, boot_id,"
                " created_at, connected_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    connection.connection_key,
                    connection.driver_volume_type,
                    json.dumps(dict(connection.connection_data), sort_keys=True),
                    connection.disk_format,
                    connection.device_path,
                    json.dumps(dict(connection.device_info or {}), sort_keys=True),
                    connection.state,
                    connection.boot_id,
                    connection.created_at,
                    connection.connected_at,
                ),
            )
            self._insert_attachment(db, attachment)
            db.execute(
                "UPDATE attachments SET state = ? WHERE attachment_id = ?",
                (attachment.state, attachment.attachment_id),
            )
            return True

    def forget_attachment(self, attachment_id: str) -> None:
        """Drop a rolled-back attach: no tombstone, its id may be used again."""
        with self._tx() as db:
            db.execute("DELETE FROM attachments WHERE attachment_id = ?", (attachment_id,))

    def release_if_shared(
        self,
        attachment: AttachmentRecord,
        result_for: Callable[[int], Mapping[str, Any]],
    ) -> Mapping[str, Any] | None:
        """If other attachments still use the connection, drop this one and write
        its tombstone (``result_for(users left)``) in one transaction and return
        that result; if it is the last user, change nothing and return None.
        A completion: lost, the record is as its ``detaching`` intent (or, for
        a vanished domain, as before) left it, and the release is repeated."""
        with self._tx(Sync.COMPLETION) as db:
            others = db.execute(
                "SELECT count(*) FROM attachments WHERE connection_key = ? AND attachment_id != ?",
                (attachment.connection_key, attachment.attachment_id),
            ).fetchone()[0]
            if others == 0:
                return None
            result = result_for(int(others))
            self._write_detached(db, attachment, result, drop_connection=False)
            return result

    def mark_disconnecting(self, connection_key: str, *, excluding: str | None = None) -> bool:
        """Move the connection to ``disconnecting`` if no attachment (but
        ``excluding``) uses it; atomic with every attach's intent record."""
        with self._tx() as db:
            users = db.execute(
                "SELECT count(*) FROM attachments WHERE connection_key = ?"
                " AND attachment_id IS NOT ?",
                (connection_key, excluding),
            ).fetchone()[0]
            if users:
                return False
            db.execute(
                "UPDATE connections SET state = ? WHERE connection_key = ?",
                (ConnectionState.DISCONNECTING, connection_key),
            )
            return True

    def finish_detach(
        self,
        attachment: AttachmentRecord,
        result: Mapping[str, Any],
        *,
        drop_connection: bool,
    ) -> None:
        """Drop the attachment (and its connection if released) and write the
        tombstone. A completion: lost, the rows are as the intents before it
        (``detaching``, ``disconnecting``) left them, and the release, done
        again, writes the same answer."""
        with self._tx(Sync.COMPLETION) as db:
            self._write_detached(db, attachment, result, drop_connection=drop_connection)

    def _write_detached(
        self,
        db: sqlite3.Connection,
        attachment: AttachmentRecord,
        result: Mapping[str, Any],
        *,
        drop_connection: bool,
    ) -> None:
        db.execute("DELETE FROM attachments WHERE attachment_id = ?", (attachment.attachment_id,))
        if drop_connection:
            db.execute(
                "DELETE FROM connections WHERE connection_key = ?", (attachment.connection_key,)
            )
        db.execute(
            "INSERT OR REPLACE INTO tombstones (attachment_id, volume_id, domain_uuid,"
            " result, detached_at) VALUES (?, ?, ?, ?, ?)",
            (
                attachment.attachment_id,
                attachment.volume_id,
                attachment.domain_uuid,
                json.dumps(dict(result), sort_keys=True),
                self._clock(),
            ),
        )

    def drop_connection(self, connection_key: str) -> None:
        """Remove a connection row that no attachment references any more."""
        with self._tx() as db:
            db.execute(
                "DELETE FROM connections WHERE connection_key = ? AND NOT EXISTS"
                " (SELECT 1 FROM attachments WHERE connection_key = ?)",
                (connection_key, connection_key),
            )

    def rekey_connection(
        self, old_key: str, new_key: str, connection_data: Mapping[str, Any]
    ) -> bool:
        """Move a connection and its attachments to ``new_key`` (a key an older
        version gave it); False, nothing changed, if ``new_key`` is taken."""
        with self._tx() as db:
            if db.execute(
                "SELECT 1 FROM connections WHERE connection_key = ?", (new_key,)
            ).fetchone():
                return False
            db.execute("PRAGMA defer_foreign_keys = ON")
            db.execute(
                "UPDATE connections SET connection_key = ?, connection_data = ?"
                " WHERE connection_key = ?",
                (new_key, json.dumps(dict(connection_data), sort_keys=True), old_key),
            )
            db.execute(
                "UPDATE attachments SET connection_key = ? WHERE connection_key = ?",
                (new_key, old_key),
            )
            return True

    def purge_tombstones(self, older_than: float) -> int:
        """Delete tombstones written before ``older_than`` (epoch seconds)."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM tombstones WHERE detached_at < ?", (older_than,))
            return cur.rowcount
