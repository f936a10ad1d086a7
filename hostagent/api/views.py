"""Read-only API views built from the store."""

from __future__ import annotations

import datetime

from hostagent.api.models import Connection, ConnectionList
from hostagent.state.store import Store


def iso_utc(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    moment = datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def connection_list(store: Store) -> ConnectionList:
    """Every host connection with the attachments that derive its refcount."""
    attachments = store.list_attachments()
    connections = []
    for record in store.list_connections():
        users = [a.attachment_id for a in attachments if a.connection_key == record.connection_key]
        connections.append(
            Connection(
                connection_key=record.connection_key,
                driver_volume_type=record.driver_volume_type,
                device_path=record.device_path,
                state=record.state.value,
                host_refcount=len(users),
                attachments=users,
                connected_at=iso_utc(record.connected_at),
                boot_id=record.boot_id,
            )
        )
    return ConnectionList(connections=connections)
