"""The records the store keeps, as typed values, and how a sqlite row becomes one."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


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


def attachment_from_row(row: sqlite3.Row) -> AttachmentRecord:
    return AttachmentRecord(
        attachment_id=row["attachment_id"],
        volume_id=row["volume_id"],
        domain_uuid=row["domain_uuid"],
        domain_name=row["domain_name"],
        connection_key=row["connection_key"],
        state=AttachmentState(row["state"]),
        multiattach=bool(row["multiattach"]),
        mode=row["mode"],
        bus=row["bus"],
        serial=row["serial"],
        alias=row["alias"],
        request_hash=row["request_hash"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        target_dev=row["target_dev"],
        disk_xml=row["disk_xml"],
    )
