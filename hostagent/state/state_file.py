"""The state file: sqlite, its schema, and how it is opened.

WAL journal; each transaction says how it reaches the disk (``Sync``): an
intent is fsync'd before the act it announces, a completion is not (see
``Sync``). Every commit survives a crash of the daemon. The file holds what
os-brick needs to disconnect (possibly credentials), hence mode 0600, its WAL
and shared-memory sidecars too.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from enum import StrEnum
from pathlib import Path

SCHEMA_VERSION = 2

# Schema 2 (live migration) adds the state incoming.
_ATTACHMENT_COLUMNS = """
    attachment_id  TEXT PRIMARY KEY,
    volume_id      TEXT NOT NULL,
    domain_uuid    TEXT NOT NULL,
    domain_name    TEXT NOT NULL,
    connection_key TEXT NOT NULL REFERENCES connections (connection_key),
    state          TEXT NOT NULL
        CHECK (state IN ('attaching', 'attached', 'detaching', 'incoming')),
    multiattach    INTEGER NOT NULL,
    mode           TEXT NOT NULL,
    bus            TEXT NOT NULL,
    serial         TEXT NOT NULL,
    alias          TEXT NOT NULL,
    request_hash   TEXT NOT NULL,
    target_dev     TEXT,
    disk_xml       TEXT,
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL,
    UNIQUE (domain_uuid, volume_id),
    UNIQUE (domain_uuid, connection_key),
    UNIQUE (domain_uuid, target_dev)
"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS connections (
    connection_key     TEXT PRIMARY KEY,
    driver_volume_type TEXT NOT NULL,
    connection_data    TEXT NOT NULL,
    disk_format        TEXT NOT NULL,
    device_path        TEXT,
    device_info        TEXT,
    state              TEXT NOT NULL
        CHECK (state IN ('connecting', 'connected', 'disconnecting')),
    boot_id            TEXT NOT NULL,
    created_at         REAL NOT NULL,
    connected_at       REAL
);
CREATE TABLE IF NOT EXISTS attachments ({_ATTACHMENT_COLUMNS});
CREATE INDEX IF NOT EXISTS attachments_by_connection ON attachments (connection_key);
CREATE INDEX IF NOT EXISTS attachments_by_volume ON attachments (volume_id);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tombstones (
    attachment_id TEXT PRIMARY KEY,
    volume_id     TEXT NOT NULL,
    domain_uuid   TEXT NOT NULL,
    result        TEXT NOT NULL,
    detached_at   REAL NOT NULL
);
"""

_COPY_INTO_SCHEMA_2 = f"""
BEGIN IMMEDIATE;
ALTER TABLE attachments RENAME TO attachments_v1;
CREATE TABLE attachments ({_ATTACHMENT_COLUMNS});
INSERT INTO attachments SELECT * FROM attachments_v1;
DROP TABLE attachments_v1;
COMMIT;
"""  # noqa: S608 (constants only, no input)


class Sync(StrEnum):
    """The ``synchronous`` level of one transaction (WAL).

    A FULL commit fsyncs the WAL, and with it every frame before it: what a
    power cut can lose is only a suffix of NORMAL commits after the last FULL
    one, so the file is always as it was right after some commit at or after
    the last intent. Hence INTENT for every row written before an act;
    COMPLETION only for rows reconcile derives again from libvirt and the
    host when they are lost (README "After a crash": power cut), and for an
    intent whose act comes only after a later intent's FULL commit, which
    carries it: the attach intent on a connection already up, whose act is
    libvirt's attach, asked only after the placement row is fsync'd.
    """

    INTENT = "FULL"
    COMPLETION = "NORMAL"


class StoreError(RuntimeError):
    """The state file cannot be used (corrupt, newer schema, unreadable)."""


def open_state_file(path: Path) -> sqlite3.Connection:
    """The writer connection to ``path`` (created 0600 if missing), checked and
    migrated to this hostagent's schema; StoreError if it cannot be used."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        _check_and_migrate(db, path)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"state file {path} is unusable: {exc}") from exc
    return db


def _add_incoming_state(db: sqlite3.Connection) -> None:
    """Schema 1 to 2: sqlite cannot change a CHECK constraint, so the
    attachments table is copied into one that allows ``incoming``."""
    db.execute("PRAGMA foreign_keys=OFF")
    db.executescript(_COPY_INTO_SCHEMA_2)
    db.execute("PRAGMA foreign_keys=ON")


def _check_and_migrate(db: sqlite3.Connection, path: Path) -> None:
    result = db.execute("PRAGMA quick_check").fetchone()[0]
    if result != "ok":
        raise StoreError(f"state file {path} failed integrity check: {result}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={Sync.INTENT}")  # Store keeps this default
    db.execute("PRAGMA foreign_keys=ON")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"state file {path} has schema {version}, newer than this hostagent's {SCHEMA_VERSION}"
        )
    if version == 1:
        _add_incoming_state(db)
    db.executescript(_SCHEMA)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    for sidecar in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{sidecar}", 0o600)
