"""Reconcile's pass over host connections: connected again after a reboot for
the guests that can still start with the disk, connected again when their
device went missing, disconnected when nothing uses them (the guard decides),
and disks on our devices that no attachment of ours accounts for."""

from __future__ import annotations

import os

from hostagent.api.models import ReconcileAction
from hostagent.attachments.host_connections import HostConnections
from hostagent.errors import HostagentError
from hostagent.guests.disk_presence import DiskPresence
from hostagent.guests.domain_scan import DomainDisk
from hostagent.guests.domains import Guests
from hostagent.host.device_users import (
    DeviceNumbers,
    OurDisks,
    accounted_for,
    matcher_for,
    references_in,
)
from hostagent.locks import HostLocks
from hostagent.state.store import (
    AttachmentRecord,
    AttachmentState,
    ConnectionRecord,
    ConnectionState,
    Store,
)


def act(action: str, record: AttachmentRecord, detail: str) -> ReconcileAction:
    """A reconcile action on one attachment."""
    return ReconcileAction(action=action, subject=record.attachment_id, detail=detail)


class ConnectionPass:
    """The connections' part of a reconcile pass (see ``Reconciler``)."""

    def __init__(
        self,
        *,
        store: Store,
        guests: Guests,
        locks: HostLocks,
        connections: HostConnections,
        presence: DiskPresence,
        boot_id: str,
    ) -> None:
        self._store = store
        self._guests = guests
        self._locks = locks
        self._connections = connections
        self._presence = presence
        self._boot_id = boot_id

    def after_reboot(self, connection: ConnectionRecord) -> list[ReconcileAction]:
        """A connection made in an earlier boot is gone with it. Connect it again
        for every guest that can still start with the disk (a persistent domain
        whose config holds it, or a domain already running with it); release
        every other attachment."""
        key = connection.connection_key
        actions = []
        for record in self._store.list_attachments(connection_key=key):
            with self._locks.attachment(record.attachment_id):
                current = self._store.get_attachment(record.attachment_id)
                if current is None or current.state is AttachmentState.INCOMING:
                    continue  # awaited: connected again below; released by its timeout
                domain = self._guests.find(current.domain_uuid)
                if domain is not None and any(self._presence.of(domain, current.alias)):
                    continue
                result = self._connections.release_after_reboot(current)
                actions.append(
                    act(
                        "released_after_reboot",
                        current,
                        f"domain {current.domain_name} is gone or no longer holds the disk; "
                        f"terminate_connection={str(result.terminate_connection).lower()}",
                    )
                )
        with self._connections.exclusive(key):
            current_connection = self._store.get_connection(key)
            if (
                current_connection is None
                or self._store.refcount(key) == 0
                or not current_connection.from_earlier_boot(self._boot_id)
            ):
                # gone, unused (the connection pass releases it), or connected
                # again meanwhile by an attach (join): nothing left to do here.
                return actions
            try:
                self._connections.reconnect(current_connection)
            except HostagentError as exc:
                return [
                    *actions,
                    ReconcileAction(
                        action="failed",
                        subject=key,
                        detail=f"reconnect after reboot: {exc.message}",
                    ),
                ]
        actions.append(
            ReconcileAction(
                action="reconnected_after_reboot",
                subject=key,
                detail=f"connected again for {self._store.refcount(key)} attachments whose "
                "guests still hold the disk",
            )
        )
        return actions

    def connection(self, connection_key: str) -> list[ReconcileAction]:
        with self._connections.exclusive(connection_key):
            connection = self._store.get_connection(connection_key)
            if connection is None:
                return []
            users = self._store.refcount(connection_key)
            try:
                if users == 0:
                    return self._unused_connection(connection)
                if connection.state is ConnectionState.DISCONNECTING and all(
                    record.state is AttachmentState.DETACHING
                    for record in self._store.list_attachments(connection_key=connection_key)
                ):
                    # A last detach whose disconnect failed: the DELETE's retry (or
                    # the attachment pass) finishes the release; logging in again
                    # now would only undo what it already did.
                    return []
                if connection.state is not ConnectionState.CONNECTED:
                    self._connections.reconnect(connection)
                    return [
                        ReconcileAction(
                            action="reconnected",
                            subject=connection_key,
                            detail=f"was {connection.state.value} with {users} attachments",
                        )
                    ]
                if connection.device_path and not os.path.exists(connection.device_path):
                    missing = ReconcileAction(
                        action="device_missing",
                        subject=connection_key,
                        detail=f"{connection.device_path} is gone while {users} attachments "
                        "use it; connecting again",
                    )
                    self._connections.reconnect(connection)
                    return [
                        missing,
                        ReconcileAction(
                            action="reconnected",
                            subject=connection_key,
                            detail=f"{connection.device_path} is back",
                        ),
                    ]
            except HostagentError as exc:
                return [
                    ReconcileAction(action="failed", subject=connection_key, detail=exc.message)
                ]
        return []

    def _unused_connection(self, connection: ConnectionRecord) -> list[ReconcileAction]:
        key = connection.connection_key
        users = self._connections.users_of(connection)
        if users:
            return [
                ReconcileAction(
                    action="kept",
                    subject=key,
                    detail="no attachments, but used by " + "; ".join(users),
                )
            ]
        if not self._connections.disconnect_unused(connection):
            return []  # attached again meanwhile: in use, nothing to do
        return [
            ReconcileAction(
                action="disconnected",
                subject=key,
                detail=f"no attachments and nothing uses {connection.device_path or key}",
            )
        ]

    def foreign_disks(self, disks: list[DomainDisk], ours: OurDisks) -> list[ReconcileAction]:
        """Disks on our connections' devices that no attachment of ours
        (``accounted_for``) accounts for."""
        connections = [(c, m) for c in self._store.list_connections() if (m := matcher_for(c))]
        # A fast path for accounted_for below (keep the two in step): our own
        # disks are skipped before matching; a layer is looked at on each
        # connection, as it is ours only on its attachment's.
        others = [d for d in disks if d.disk.layer or (d.domain.uuid, d.disk.alias) not in ours]
        if not connections or not others:
            return []
        found = []
        numbers: DeviceNumbers = {}
        for connection, matcher in connections:
            for ref in references_in(others, matcher, numbers):
                if accounted_for(ref, ours, connection.connection_key):
                    continue
                found.append(
                    ReconcileAction(
                        action="foreign_disk",
                        subject=connection.connection_key,
                        detail=f"domain {ref.domain_name} ({ref.where}) uses "
                        f"{ref.source} {ref.use} without an attachment "
                        "of ours; the device stays connected",
                    )
                )
        return found
