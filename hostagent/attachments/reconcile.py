"""Reconcile the store against libvirt's domains and the host's devices.

Runs at start-up before the socket accepts requests, after every libvirt
reconnect, periodically, and on ``POST /v1/reconcile``. It finishes or rolls
back interrupted steps, releases attachments of domains that no longer exist,
disconnects connections nobody uses, and reports disks that domains hold on
our devices without a record of ours (their devices stay connected).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable

from hostagent.api.models import ReconcileAction, ReconcileReport
from hostagent.attachments.service import AttachmentService
from hostagent.errors import HostagentError
from hostagent.guests.domain_scan import scan_domain_disks
from hostagent.host.device_users import matcher_for, references_in
from hostagent.observability import logctx
from hostagent.state.store import (
    AttachmentRecord,
    AttachmentState,
    ConnectionRecord,
    ConnectionState,
)

LOG = logging.getLogger(__name__)


class Reconciler:
    """One pass over attachments, then connections, then foreign disks."""

    def __init__(
        self,
        service: AttachmentService,
        *,
        tombstone_ttl: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.tombstone_ttl = tombstone_ttl
        self._clock = clock

    def run(self) -> ReconcileReport:
        actions: list[ReconcileAction] = []
        boot_id = self.service.settings.boot_id
        for connection in self.service.store.list_connections():
            if connection.from_earlier_boot(boot_id):
                actions += self._after_reboot(connection)
        for record in self.service.store.list_attachments():
            actions += self.attachment(record.attachment_id)
        for connection in self.service.store.list_connections():
            actions += self._connection(connection.connection_key)
        actions += self._foreign_disks()
        purged = self.service.store.purge_tombstones(self._clock() - self.tombstone_ttl)
        if purged:
            actions.append(
                ReconcileAction(
                    action="purged_tombstones",
                    subject="tombstones",
                    detail=f"{purged} tombstones older than {self.tombstone_ttl:g}s",
                )
            )
        for a in actions:
            LOG.info("reconcile: %s %s: %s", a.action, a.subject, a.detail)
        if not actions:
            LOG.debug("reconcile: records, domains and devices agree")
        return ReconcileReport(actions=actions)

    def attachment(self, attachment_id: str) -> list[ReconcileAction]:
        """Finish, roll back or release one attachment against its domain now."""
        service = self.service
        with (
            logctx.request_context(attachment_id=attachment_id),
            service.locks.attachment(attachment_id),
        ):
            record = service.store.get_attachment(attachment_id)
            if record is None:
                return []
            logctx.note(volume_id=record.volume_id)
            domain = service.guests.find(record.domain_uuid)
            try:
                if domain is None:
                    result = service.connections.release(record)
                    return [
                        _act(
                            "released",
                            record,
                            f"domain {record.domain_name} no longer "
                            f"exists; terminate_connection={result.terminate_connection}",
                        )
                    ]
                in_live, in_config = service.disk_presence(record, domain)
                present = in_live or in_config
                if record.state is AttachmentState.ATTACHING:
                    if present and record.disk_xml:
                        service.finish_interrupted_attach(record, domain)
                        return [_act("finished_attach", record, f"disk is on {domain.name}")]
                    service.roll_back_interrupted_attach(record)
                    return [_act("rolled_back", record, "interrupted attach left no disk")]
                if record.state is AttachmentState.DETACHING:
                    if present:
                        return [
                            _act(
                                "detach_pending",
                                record,
                                f"{domain.name} still holds {record.alias}",
                            )
                        ]
                    result = service.connections.release(record)
                    return [
                        _act(
                            "finished_detach",
                            record,
                            f"terminate_connection={result.terminate_connection}",
                        )
                    ]
                if not present:
                    return [
                        _act(
                            "missing_disk",
                            record,
                            f"{domain.name} no longer has {record.alias}; "
                            "DELETE the attachment to release it",
                        )
                    ]
            except HostagentError as exc:
                return [_act("failed", record, exc.message)]
        return []

    def _after_reboot(self, connection: ConnectionRecord) -> list[ReconcileAction]:
        """A connection made in an earlier boot is gone with it. Connect it again
        for every guest that can still start with the disk (a persistent domain
        whose config holds it, or a domain already running with it); release
        every other attachment."""
        service = self.service
        key = connection.connection_key
        actions = []
        for record in service.store.list_attachments(connection_key=key):
            with service.locks.attachment(record.attachment_id):
                current = service.store.get_attachment(record.attachment_id)
                if current is None:
                    continue
                domain = service.guests.find(current.domain_uuid)
                if domain is not None and any(service.disk_presence(current, domain)):
                    continue
                result = service.connections.release_after_reboot(current)
                actions.append(
                    _act(
                        "released_after_reboot",
                        current,
                        f"domain {current.domain_name} is gone or no longer holds the disk; "
                        f"terminate_connection={str(result.terminate_connection).lower()}",
                    )
                )
        with service.connections.exclusive(key):
            current_connection = service.store.get_connection(key)
            if (
                current_connection is None
                or service.store.refcount(key) == 0
                or not current_connection.from_earlier_boot(service.connections.boot_id)
            ):
                # gone, unused (the connection pass releases it), or connected
                # again meanwhile by an attach (join): nothing left to do here.
                return actions
            try:
                service.connections.reconnect(current_connection)
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
                detail=f"connected again for {service.store.refcount(key)} attachments whose "
                "guests still hold the disk",
            )
        )
        return actions

    def _connection(self, connection_key: str) -> list[ReconcileAction]:
        service = self.service
        with service.connections.exclusive(connection_key):
            connection = service.store.get_connection(connection_key)
            if connection is None:
                return []
            users = service.store.refcount(connection_key)
            try:
                if users == 0:
                    return self._unused_connection(connection)
                if connection.state is ConnectionState.DISCONNECTING and all(
                    record.state is AttachmentState.DETACHING
                    for record in service.store.list_attachments(connection_key=connection_key)
                ):
                    # A last detach whose disconnect failed: the DELETE's retry (or
                    # the attachment pass) finishes the release; logging in again
                    # now would only undo what it already did.
                    return []
                if connection.state is not ConnectionState.CONNECTED:
                    service.connections.reconnect(connection)
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
                    service.connections.reconnect(connection)
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
        users = self.service.connections.device_users(connection)
        if users:
            return [
                ReconcileAction(
                    action="kept",
                    subject=key,
                    detail="no attachments, but used by " + "; ".join(users),
                )
            ]
        if not self.service.connections.disconnect_unused(connection):
            return []  # attached again meanwhile: in use, nothing to do
        return [
            ReconcileAction(
                action="disconnected",
                subject=key,
                detail=f"no attachments and nothing uses {connection.device_path or key}",
            )
        ]

    def _foreign_disks(self) -> list[ReconcileAction]:
        store = self.service.store
        connections = [(c, m) for c in store.list_connections() if (m := matcher_for(c))]
        if not connections:
            return []
        ours = {(a.domain_uuid, a.alias) for a in store.list_attachments()}
        disks = scan_domain_disks(self.service.guests)
        found = []
        for connection, matcher in connections:
            for ref in references_in(disks, matcher):
                if (ref.domain_uuid, ref.alias) in ours:
                    continue
                found.append(
                    ReconcileAction(
                        action="foreign_disk",
                        subject=connection.connection_key,
                        detail=f"domain {ref.domain_name} ({ref.where}) uses "
                        f"{ref.source} as {ref.target_dev} without an attachment "
                        "of ours; the device stays connected",
                    )
                )
        return found


def _act(action: str, record: AttachmentRecord, detail: str) -> ReconcileAction:
    return ReconcileAction(action=action, subject=record.attachment_id, detail=detail)


class VanishedDomains:
    """Releases the attachments of a domain as soon as libvirt reports it gone.

    Fed by lifecycle events (a transient domain destroyed, a persistent one
    undefined); works on its own thread, never on libvirt's event loop. The
    periodic reconcile is the safety net for events missed while libvirtd
    was unreachable.
    """

    def __init__(self, reconciler: Reconciler) -> None:
        self._reconciler = reconciler
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="vanished-domains", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join()

    def notify(self, domain_uuid: str, event: int, detail: int) -> None:
        self._queue.put(domain_uuid)

    def _loop(self) -> None:
        while (domain_uuid := self._queue.get()) is not None:
            try:
                self.release_if_gone(domain_uuid)
            except HostagentError as exc:
                LOG.warning(
                    "domain %s: release after it vanished failed: %s; the periodic "
                    "reconcile will retry",
                    domain_uuid,
                    exc.message,
                )
            except Exception:
                LOG.exception("domain %s: release after it vanished failed", domain_uuid)

    def release_if_gone(self, domain_uuid: str) -> list[ReconcileAction]:
        service = self._reconciler.service
        records = service.store.list_attachments(domain_uuid=domain_uuid)
        if not records or service.guests.find(domain_uuid) is not None:
            return []  # nothing of ours, or a persistent domain that only stopped
        actions = []
        for record in records:
            actions += self._reconciler.attachment(record.attachment_id)
        for action in actions:
            LOG.info(
                "domain %s gone: %s %s: %s",
                domain_uuid,
                action.action,
                action.subject,
                action.detail,
            )
        return actions
