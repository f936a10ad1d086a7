"""Host connections: connect once per host, disconnect on the last release.

The refcount is the number of attachment rows of a connection. Attaching to
a connection that is up, and releasing one of several users, are single
store transactions and take no lock; connect and disconnect run under the
connection's lock. Every release re-counts users in the transaction that
marks the connection ``disconnecting``, and an attach intent is refused
while that mark stands, so a disconnect never races an attach. Every
disconnect first asks ``hostagent.host.device_users`` who still uses the
device, and keeps the connection if anyone does.
"""

from __future__ import annotations

import logging
import time

from hostagent import connectors, failpoints
from hostagent.attachments.connection_release import (
    ConnectionReleases,
    why_failed,
)
from hostagent.connectors import (
    Connector,
    ConnectorError,
    HostDevice,
    InvalidTarget,
    SecretKeeperFailed,
    Target,
)
from hostagent.errors import ConnectFailed
from hostagent.guests.domain_scan import DomainScan
from hostagent.guests.domains import Guests
from hostagent.host.device_users import target_of
from hostagent.host.host_use import host_uses, identify
from hostagent.locks import HostLocks
from hostagent.observability.metrics import Metrics
from hostagent.state.store import (
    AttachmentRecord,
    ConnectionRecord,
    ConnectionReleasing,
    ConnectionState,
    Store,
    Sync,
)

LOG = logging.getLogger(__name__)


class HostUsesDevice(ConnectorError):
    """A connect produced a device the host itself uses."""


def refuse_a_device_the_host_uses(device: HostDevice) -> None:
    """A connect that produced a device the host itself uses (a LUN that is the
    host's root disk, a misconfigured target) fails. What it connected is left
    in place: a session or map the host uses was there before this connect
    (os-brick reuses it), and tearing it down would take the host's disk."""
    if device.path is None:
        return
    found = identify(device.path)
    reasons = host_uses(found, device.path) if found is not None else []
    if reasons:
        raise HostUsesDevice(
            f"the device it produced, {device.path}, is used by the host itself: "
            f"{'; '.join(reasons)}"
        )


class HostConnections(ConnectionReleases):
    """The per-host connections behind attachments, and their refcounts: the
    connect side here, the release side in ``ConnectionReleases``."""

    def __init__(
        self,
        *,
        store: Store,
        guests: Guests,
        registry: connectors.ConnectorRegistry,
        locks: HostLocks,
        boot_id: str,
        metrics: Metrics,
        scan: DomainScan | None = None,
    ) -> None:
        self.metrics = metrics
        self.store = store
        self.guests = guests
        # What the guard before a disconnect reads every domain's disks with.
        self.scan = scan or DomainScan(guests)
        self.registry = registry
        self.locks = locks
        self.boot_id = boot_id

    def _connection_intent(self, target: Target) -> ConnectionRecord:
        return ConnectionRecord(
            connection_key=target.connection_key,
            driver_volume_type=target.driver_volume_type,
            connection_data=dict(target.properties),
            disk_format=target.disk_format,
            state=ConnectionState.CONNECTING,
            boot_id=self.boot_id,
            created_at=time.time(),
        )

    def join(
        self, record: AttachmentRecord, connector: Connector, target: Target, *, new: bool
    ) -> bool:
        """Record the attach intent and make the host connection if it is not up.

        The common case, a connection already up, takes no connection lock:
        the intent row alone keeps it from being released (every release
        re-counts users in the transaction that marks it ``disconnecting``).
        Returns True when this call made the connection.
        """
        key = target.connection_key
        connection: ConnectionRecord | None
        # Durable before a connect: a row committed NORMAL here (the connection
        # looked up) is fsync'd before any connect by the FULL write below.
        carried = False
        if new:
            known = self.store.get_connection(key)
            carried = known is not None and self._usable(known)
            try:
                # On a connection already up the next act is libvirt's attach,
                # asked only after the placement row's FULL commit carries this one.
                connection = self.store.begin_attach(
                    record,
                    self._connection_intent(target),
                    sync=Sync.COMPLETION if carried else Sync.INTENT,
                )
                failpoints.hit("attach.after_intent")
                new = False
            except ConnectionReleasing:
                connection = None  # a release is disconnecting it: wait for its lock
        else:
            connection = self.store.get_connection(key)
        if connection is not None and self._usable(connection):
            return False
        with self.exclusive(key, target):
            if new:
                self.store.begin_attach(
                    record, self._connection_intent(target), while_releasing=True
                )
                failpoints.hit("attach.after_intent")
            connection = self.store.get_connection(key)
            assert connection is not None, "an attachment row always has its connection"
            if self._usable(connection):
                return False
            if connection.state is ConnectionState.CONNECTED:
                LOG.info("%s was connected in an earlier boot", key)
            if carried or connection.state is not ConnectionState.CONNECTING:
                self.store.set_connection_state(key, ConnectionState.CONNECTING)
            LOG.info("attachment %s: connecting %s", record.attachment_id, key)
            try:
                with self.metrics.phase("connect"):
                    device = connector.connect(target)
                refuse_a_device_the_host_uses(device)
            except ConnectorError as exc:
                LOG.error(
                    "attachment %s: connect %s failed: %s",
                    record.attachment_id,
                    key,
                    why_failed(exc),
                )
                self.store.forget_attachment(record.attachment_id)
                if isinstance(exc, HostUsesDevice):
                    self._forget_unless_used(key, connection)
                    raise ConnectFailed(
                        f"connecting {key} failed: {exc}; nothing was disconnected"
                    ) from None
                cleaned = self._clean_up_failed_connect(record, connector, target, connection)
                if isinstance(exc, SecretKeeperFailed):
                    # libvirt failing a connector's secrets: its own error, as it was raised
                    raise exc.cause from exc.cause.__cause__
                left = "" if cleaned else "; its cleanup failed too, reconcile will release it"
                raise ConnectFailed(f"connecting {key} failed: {exc}{left}") from None
            failpoints.hit("attach.after_connect")
            self.store.set_connection_state(
                key,
                ConnectionState.CONNECTED,
                device_path=device.path,
                device_info=device.device_info,
                boot_id=self.boot_id,
            )
            return True

    def _clean_up_failed_connect(
        self,
        record: AttachmentRecord,
        connector: Connector,
        target: Target,
        connection: ConnectionRecord,
    ) -> bool:
        """Undo what a failed connect may have left, unless someone still needs
        it; False if a cleanup disconnect was needed and failed.

        ``connection`` is the row as it was before the connect. One an earlier
        boot made (connected, or left connecting by a crash) may be kept for a
        domain that names its device: like every release, the cleanup
        disconnects only when no attachment uses it and no domain or process
        holds the device. Otherwise the row goes back to its state, for the
        attach that waits on it or for reconcile's guarded release; a failed
        cleanup leaves it ``disconnecting`` with no users, never forgotten.
        """
        key = target.connection_key
        unused = self.store.refcount(key) == 0 and not self._still_referenced(record, connection)
        if not (unused and self.store.mark_disconnecting(key)):
            self.store.set_connection_state(key, connection.state, keep_device=True)
            return True
        if not self._best_effort_disconnect(connector, target, None):
            return False
        self.store.drop_connection(key)
        return True

    def _forget_unless_used(self, key: str, connection: ConnectionRecord) -> None:
        """Drop the record of a connection no attachment uses, touching nothing
        on the host; one with users goes back to its state."""
        if self.store.refcount(key) == 0 and self.store.mark_disconnecting(key):
            self.store.drop_connection(key)
        else:
            self.store.set_connection_state(key, connection.state, keep_device=True)

    def _best_effort_disconnect(
        self, connector: Connector, target: Target, device: HostDevice | None
    ) -> bool:
        """Undo a connect that failed half way; False if even that failed."""
        try:
            connector.disconnect(target, device or HostDevice(path=None, device_info={}))
        except ConnectorError as exc:
            LOG.warning(
                "cleanup disconnect of %s failed (%s); reconcile will retry it",
                target.connection_key,
                why_failed(exc),
            )
            return False
        return True

    def _usable(self, connection: ConnectionRecord) -> bool:
        """Connected in this boot: a connection recorded in an earlier boot is
        gone with it (its device path may even name another device now)."""
        return connection.state is ConnectionState.CONNECTED and not (
            connection.from_earlier_boot(self.boot_id)
        )

    def forget(self, record: AttachmentRecord, *, may_disconnect: bool) -> None:
        """Drop a record whose disk is not on its domain (no tombstone: the id
        may be used again) and, if allowed, the connection nobody else uses."""
        key = record.connection_key
        with self.exclusive(key):
            self.store.forget_attachment(record.attachment_id)
            if not may_disconnect or self.store.refcount(key) > 0:
                return
            connection = self.store.get_connection(key)
            if connection is None or self._still_referenced(record, connection):
                return
            self.disconnect_unused(connection)

    def move_to_current_keys(self) -> None:
        """At start, before serving: a connection stored under a key an older
        version gave it (a local device by the path it was named by) moves to
        the key its connector gives it now, with its attachments."""
        for connection in self.store.list_connections():
            try:
                connector = self.registry.get(connection.driver_volume_type)
            except InvalidTarget:
                continue  # a protocol no longer served: reconcile reports it
            target, _ = target_of(connection)
            current = connector.canonical(target)
            old, new = connection.connection_key, current.connection_key
            if new == old:
                continue
            if self.store.rekey_connection(old, new, current.properties):
                LOG.info("connection %s is now keyed %s", old, new)
            else:
                LOG.warning(
                    "connections %s and %s are one host device; both stay as they are "
                    "(detach the attachments of one of them)",
                    old,
                    new,
                )

    def reconnect(self, connection: ConnectionRecord) -> None:
        """Bring a connection that has users back to ``connected`` (reconcile).
        Caller holds the connection lock."""
        connector = self.registry.get(connection.driver_volume_type)
        target, _ = target_of(connection)
        self.store.set_connection_state(connection.connection_key, ConnectionState.CONNECTING)
        try:
            with self.metrics.phase("connect"):
                device = connector.connect(target)
        except ConnectorError as exc:
            if isinstance(exc, SecretKeeperFailed):
                # libvirt failing a connector's secrets: its own error, as it was raised
                raise exc.cause from exc.cause.__cause__
            raise ConnectFailed(
                f"reconnecting {connection.connection_key} failed: {exc}"
            ) from None
        self.store.set_connection_state(
            connection.connection_key,
            ConnectionState.CONNECTED,
            device_path=device.path,
            device_info=device.device_info,
            boot_id=self.boot_id,
        )

    # detach
