"""The release side of host connections: drop an attachment, and disconnect
when it was the connection's last user and the guard (``host.device_users``)
finds nobody else using the device. ``HostConnections`` adds the connect side.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping

from hostagent import connectors, failpoints
from hostagent.api.models import DetachResult
from hostagent.connectors import ConnectorError, SecretKeeperFailed, Target
from hostagent.errors import DisconnectFailed, HostagentError, LibvirtUnavailable
from hostagent.guests.domain_scan import DomainScan
from hostagent.guests.domains import Guests
from hostagent.host.device_users import device_users, target_of
from hostagent.locks import HostLocks
from hostagent.observability.metrics import Metrics
from hostagent.state.store import AttachmentRecord, ConnectionRecord, Store

LOG = logging.getLogger("hostagent.attachments.host_connections")  # one logger for both sides


def detach_body(record: AttachmentRecord, users_left: int, *, released: bool) -> dict[str, object]:
    """The DELETE answer (and tombstone) for ``record``; ``released``: this detach
    let go of the host connection, so the caller may terminate the export."""
    return DetachResult(
        attachment_id=record.attachment_id,
        connection_key=record.connection_key,
        host_refcount=users_left,
        host_disconnected=released,
        terminate_connection=released,
    ).model_dump()


def _kept_for(record: AttachmentRecord) -> Callable[[int], dict[str, object]]:
    """The answer of a detach that leaves the connection to ``users_left`` others."""
    return functools.partial(detach_body, record, released=False)


class DomainBack(Exception):
    """A release of a domain that was not found met a domain with its UUID again
    (undefined and defined again meanwhile): the attachment was not dropped."""


def why_failed(exc: Exception) -> str:
    """What an os-brick or libvirt failure says, without the error's prefix."""
    return exc.message if isinstance(exc, HostagentError) else str(exc)


class ConnectionReleases:
    """Releases of attachments and disconnects of host connections, each
    behind the connection's lock and the guard."""

    store: Store
    guests: Guests
    scan: DomainScan
    registry: connectors.ConnectorRegistry
    locks: HostLocks
    boot_id: str
    metrics: Metrics

    @contextlib.contextmanager
    def exclusive(self, key: str, target: Target | None = None) -> Iterator[None]:
        """The connection's lock, inside os-brick's guard when the target shares
        its iSCSI target with other volumes (the nesting nova uses)."""
        if target is None:
            connection = self.store.get_connection(key)
            target = target_of(connection)[0] if connection is not None else None
        guard = (
            self.registry.get(target.driver_volume_type).guard(target)
            if target is not None
            else contextlib.nullcontext()
        )
        with guard, self.locks.connection(key):
            yield

    def release_after_reboot(self, record: AttachmentRecord) -> DetachResult:
        """Drop an attachment whose host connection the reboot already took down.

        No os-brick disconnect: there is nothing left to undo. The last user of
        the connection reports the release (``terminate_connection``), as a
        detach would have.
        """
        key = record.connection_key
        body = self.store.release_if_shared(record, _kept_for(record))
        if body is None:
            with self.exclusive(key):
                connection = self.store.get_connection(key)
                if connection is not None and not connection.from_earlier_boot(self.boot_id):
                    # Connected again in this boot since reconcile listed it (an
                    # attach did): a real last release, guarded, with its disconnect.
                    body = self._release_last(record)
                elif self.store.mark_disconnecting(key, excluding=record.attachment_id):
                    body = detach_body(record, 0, released=True)
                    self.store.finish_detach(record, body, drop_connection=True)
                else:  # an attach joined it meanwhile
                    body = self._keep(record)
        return DetachResult.model_validate(body)

    def disconnect_unused(self, connection: ConnectionRecord) -> bool:
        """Disconnect and drop a connection no attachment uses; False if one
        attached meanwhile. Caller holds the connection lock and has checked
        that no domain references the device."""
        if not self.store.mark_disconnecting(connection.connection_key):
            return False
        self._disconnect(connection)
        self.store.drop_connection(connection.connection_key)
        return True

    def release(
        self, record: AttachmentRecord, *, domain_back: Callable[[], bool] | None = None
    ) -> DetachResult:
        """Drop an attachment whose disk is gone; disconnect if it was the last user.

        While other attachments use the connection this is one transaction
        and no lock. The last user takes the connection lock, scans every
        domain (live and config) for the device, and disconnects only if none
        uses it. Raises DisconnectFailed (the attachment stays detaching)
        when os-brick cannot release the connection. ``domain_back``, for a
        record whose domain was not found, is asked under the domain's lock
        right before the record is dropped (after the guard's scan): True
        raises DomainBack and drops nothing.
        """
        key = record.connection_key
        with self._unless_back(record, domain_back):
            body = self.store.release_if_shared(record, _kept_for(record))
        if body is None:
            with self.exclusive(key):
                body = self._release_last(record, domain_back)
        result = DetachResult.model_validate(body)
        LOG.info(
            "attachment %s: volume %s detached from %s; %s refcount %d%s",
            record.attachment_id,
            record.volume_id,
            record.domain_name,
            key,
            result.host_refcount,
            ", host connection released" if result.host_disconnected else "",
        )
        return result

    @contextlib.contextmanager
    def _unless_back(
        self, record: AttachmentRecord, domain_back: Callable[[], bool] | None
    ) -> Iterator[None]:
        """Raise DomainBack if ``domain_back()``, else run the block, both under
        the domain's lock (nothing of ours changes that domain meanwhile)."""
        if domain_back is None:
            yield
            return
        with self.locks.domain(record.domain_uuid):
            if domain_back():
                raise DomainBack(record.domain_uuid)
            yield

    def _release_last(
        self, record: AttachmentRecord, domain_back: Callable[[], bool] | None = None
    ) -> Mapping[str, object]:
        """The caller holds the connection lock and was the last user a moment ago."""
        key = record.connection_key
        connection = self.store.get_connection(key)
        assert connection is not None
        referenced = self._still_referenced(record, connection)
        with self._unless_back(record, domain_back):
            if referenced or not self.store.mark_disconnecting(
                key, excluding=record.attachment_id
            ):
                # Kept for a domain that still uses the device, or attached again meanwhile.
                return self._keep(record)
        failpoints.hit("detach.after_mark_disconnecting")
        self._disconnect(connection)
        failpoints.hit("detach.after_disconnect")
        body = detach_body(record, 0, released=True)
        self.store.finish_detach(record, body, drop_connection=True)
        return body

    def _keep(self, record: AttachmentRecord) -> Mapping[str, object]:
        """Drop the attachment but keep the connection; the caller holds its lock."""
        body = detach_body(record, self.store.refcount(record.connection_key) - 1, released=False)
        self.store.finish_detach(record, body, drop_connection=False)
        return body

    def users_of(self, connection: ConnectionRecord) -> list[str]:
        """The guard before any disconnect: who still uses the connection's
        device (``device_users``), timed as the ``guard`` phase."""
        with self.metrics.phase("guard"):
            return device_users(self.scan, connection)

    def _still_referenced(self, record: AttachmentRecord, connection: ConnectionRecord) -> bool:
        users = self.users_of(connection)
        if users:
            LOG.warning(
                "attachment %s: %s is still used by %s; keeping the host connection",
                record.attachment_id,
                connection.device_path,
                "; ".join(users),
            )
        return bool(users)

    def _disconnect(self, connection: ConnectionRecord) -> None:
        """os-brick disconnect; the caller recorded the intent (``mark_disconnecting``)."""
        connector = self.registry.get(connection.driver_volume_type)
        target, device = target_of(connection)
        LOG.info("disconnecting %s (no users left)", connection.connection_key)
        try:
            with self.metrics.phase("disconnect"):
                connector.disconnect(target, device)
        except ConnectorError as exc:
            if isinstance(exc, SecretKeeperFailed) and isinstance(exc.cause, LibvirtUnavailable):
                # 503: the same retry, once libvirtd is back
                raise exc.cause from exc.cause.__cause__
            raise DisconnectFailed(
                f"disconnecting {connection.connection_key} failed: {why_failed(exc)}; the "
                "connection stays; retry the DELETE (or reconcile)"
            ) from None
