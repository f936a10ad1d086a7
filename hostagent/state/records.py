"""The records the store keeps, as typed values, and how a sqlite row becomes one."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple


class AttachmentState(StrEnum):
    ATTACHING = "attaching"
    ATTACHED = "attached"
    DETACHING = "detaching"
    # connected and counted for a domain expected to arrive by live migration
    INCOMING = "incoming"


class ConnectionState(StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTING = "disconnecting"


@dataclass(frozen=True)
class ConnectionRecord:
    """One host connection; ``connection_data`` is what os-brick needs to disconnect."""

    connection_key: str
    driver_volume_type: str
    connection_data: Mapping[str, Any] = field(repr=False)
    disk_format: str
    state: ConnectionState
    boot_id: str
    created_at: float
    device_path: str | None = None
    device_info: Mapping[str, Any] | None = field(default=None, repr=False)
    connected_at: float | None = None

    def from_earlier_boot(self, boot_id: str) -> bool:
        """Made before the host's last reboot (unknown boot ids never count):
        the connection went with that boot, its device path may name another
        device now."""
        return bool(boot_id and self.boot_id and self.boot_id != boot_id)


@dataclass(frozen=True)
class AttachmentRecord:
    """One guest's use of a host connection."""

    attachment_id: str
    volume_id: str
    domain_uuid: str
    domain_name: str
    connection_key: str
    state: AttachmentState
    multiattach: bool
    mode: str
    bus: str
    serial: str
    alias: str
    request_hash: str
    created_at: float
    updated_at: float
    target_dev: str | None = None
    disk_xml: str | None = None


class AttachmentSummary(NamedTuple):
    """What a reconcile pass needs of every attachment to tell whether it is
    settled: a tuple, read without building a whole record for each."""

    attachment_id: str
    domain_uuid: str
    domain_name: str
    alias: str
    state: AttachmentState
    connection_key: str


SELECT_ATTACHMENT_SUMMARY = (
    "SELECT " + ", ".join(AttachmentSummary._fields) + " FROM attachments"  # noqa: S608 (field names only)
)


@dataclass(frozen=True)
class Tombstone:
    """A finished detach; ``result`` is the DELETE body, replayed on a retry."""

    attachment_id: str
    volume_id: str
    domain_uuid: str
    result: Mapping[str, Any]
    detached_at: float


def connection_from_row(row: sqlite3.Row) -> ConnectionRecord:
    return ConnectionRecord(
        connection_key=row["connection_key"],
        driver_volume_type=row["driver_volume_type"],
        connection_data=json.loads(row["connection_data"]),
        disk_format=row["disk_format"],
        state=ConnectionState(row["state"]),
        boot_id=row["boot_id"],
        created_at=row["created_at"],
        device_path=row["device_path"],
        device_info=json.loads(row["device_info"]) if row["device_info"] else None,
        connected_at=row["connected_at"],
    )


# The attachments table's columns in AttachmentRecord's field order: a query
# that selects them (SELECT_ATTACHMENT) gives rows that build a record by
# position, about twice as fast as by name (a reconcile or a listing reads
# every attachment; 400 rows: 9 -> 4 ms).
ATTACHMENT_FIELDS = tuple(f.name for f in dataclasses.fields(AttachmentRecord))
SELECT_ATTACHMENT = "SELECT " + ", ".join(ATTACHMENT_FIELDS) + " FROM attachments"  # noqa: S608 (field names only)
_STATE_INDEX = ATTACHMENT_FIELDS.index("state")
_MULTIATTACH_INDEX = ATTACHMENT_FIELDS.index("multiattach")
_ATTACHMENT_STATES = {state.value: state for state in AttachmentState}
INSERT_ATTACHMENT = (
    f"INSERT INTO attachments ({', '.join(ATTACHMENT_FIELDS)})"  # noqa: S608 (field names only)
    f" VALUES ({', '.join('?' for _ in ATTACHMENT_FIELDS)})"
)


def _attachment_state(value: str) -> AttachmentState:
    """The state a row stores; an unknown one (a damaged file) raises ValueError,
    as the enum does."""
    return _ATTACHMENT_STATES.get(value) or AttachmentState(value)


def attachment_row(attachment: AttachmentRecord, now: float) -> tuple[Any, ...]:
    """The values of ``INSERT_ATTACHMENT`` for a new row, stamped ``now``."""
    stamped = dataclasses.replace(attachment, created_at=now, updated_at=now)
    values = [getattr(stamped, name) for name in ATTACHMENT_FIELDS]
    values[_MULTIATTACH_INDEX] = int(stamped.multiattach)
    return tuple(values)


def attachment_summary_from_row(row: Sequence[Any]) -> AttachmentSummary:
    """A summary from a row of ``SELECT_ATTACHMENT_SUMMARY``."""
    attachment_id, domain_uuid, domain_name, alias, state, connection_key = row
    return AttachmentSummary(
        attachment_id,
        domain_uuid,
        domain_name,
        alias,
        _attachment_state(state),
        connection_key,
    )


def attachment_from_row(row: Sequence[Any]) -> AttachmentRecord:
    """A record from a row of ``SELECT_ATTACHMENT`` (columns in field order)."""
    values = list(row)
    values[_STATE_INDEX] = _attachment_state(values[_STATE_INDEX])
    values[_MULTIATTACH_INDEX] = bool(values[_MULTIATTACH_INDEX])
    return AttachmentRecord(*values)
