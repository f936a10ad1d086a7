"""Thin libvirt-python wrapper: domains, device attach/detach, events, reconnect.

One ``virConnect`` is shared by all request threads (libvirt connections are
thread-safe). A dedicated thread runs libvirt's default event loop, which
delivers ``DEVICE_REMOVED`` / ``DEVICE_REMOVAL_FAILED`` to the
``DeviceRemovedWaiter`` and notices a dropped connection (keepalive + close
callback). While libvirtd is unreachable every call raises
``LibvirtUnavailable`` at once (HTTP 503) and a supervisor thread reconnects
with backoff.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import libvirt

from hostagent.errors import DomainNotFound, LibvirtError, LibvirtUnavailable

LOG = logging.getLogger(__name__)

# libvirt error codes that mean "the connection is gone", not "the call failed".
_CONNECTION_ERRORS = frozenset(
    {
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
    }
)

_event_loop_lock = threading.Lock()
_event_loop_thread: list[threading.Thread] = []


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:  # a failing callback must not stop event delivery
            LOG.exception("libvirt event loop iteration failed")


def _ignore_libvirt_error(opaque: Any, error: Any) -> None:
    """libvirt's default handler prints to stderr; errors are raised and logged instead."""


def start_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a thread.

    Must happen before the first connection is opened; later calls are no-ops.
    """
    with _event_loop_lock:
        if _event_loop_thread:
            return
        # libvirt-python prints every error to stderr by default; we log
        # the ones that matter ourselves, with context.
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)
        libvirt.virEventRegisterDefaultImpl()
        thread = threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True)
        thread.start()
        _event_loop_thread.append(thread)


@dataclass(frozen=True)
class DomainInfo:
    """What the service needs to know about a domain right now."""

    uuid: str
    name: str
    active: bool
    persistent: bool


class _PendingRemoval:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.removed = False
        self.failed = False


class DeviceRemovedWaiter:
    """Rendezvous between a detach and the DEVICE_REMOVED event for its alias.

    Register before asking libvirt to detach, so an event that arrives before
    the detach call returns is not lost.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._pending: dict[tuple[str, str], _PendingRemoval] = {}

    @contextlib.contextmanager
    def expect(self, domain_uuid: str, alias: str) -> Iterator[_PendingRemoval]:
        key = (domain_uuid, alias)
        pending = _PendingRemoval()
        with self._mutex:
            self._pending[key] = pending
        try:
            yield pending
        finally:
            with self._mutex:
                if self._pending.get(key) is pending:
                    del self._pending[key]

    def _notify(self, domain_uuid: str, alias: str, *, removed: bool) -> None:
        with self._mutex:
            pending = self._pending.get((domain_uuid, alias))
        if pending is None:
            return
        if removed:
            pending.removed = True
        else:
            pending.failed = True
        pending.event.set()

    def device_removed(self, domain_uuid: str, alias: str) -> None:
        self._notify(domain_uuid, alias, removed=True)

    def removal_failed(self, domain_uuid: str, alias: str) -> None:
        self._notify(domain_uuid, alias, removed=False)


ConnectionListener = Callable[[], None]


class Guests:
    """The host's libvirt: one shared connection, kept alive and reconnected."""

    def __init__(
        self,
        uri: str,
        *,
        keepalive_interval: int = 5,
        keepalive_count: int = 3,
        reconnect_min: float = 0.2,
        reconnect_max: float = 10.0,
    ) -> None:
        self.uri = uri
        self.removals = DeviceRemovedWaiter()
        self._keepalive = (keepalive_interval, keepalive_count)
        self._backoff = (reconnect_min, reconnect_max)
        self._conn: Any = None
        self._mutex = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._connected_listeners: list[ConnectionListener] = []
        # virDomain handles by UUID, for this connection only. libvirt resolves
        # a handle by UUID on every call, so a cached one is never stale; it
        # saves a lookup round trip per call.
        self._handles: dict[str, Any] = {}
        self._supervisor: threading.Thread | None = None

    # connection management

    def start(self) -> None:
        """Connect now if libvirtd answers; keep trying in the background if not."""
        start_event_loop()
        self._try_connect()
        self._supervisor = threading.Thread(
            target=self._supervise, name="libvirt-reconnect", daemon=True
        )
        self._supervisor.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        with self._mutex:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.unregisterCloseCallback()
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def on_connected(self, listener: ConnectionListener) -> None:
        """Call ``listener`` (on the reconnect thread) after every (re)connect."""
        self._connected_listeners.append(listener)

    @property
    def connected(self) -> bool:
        with self._mutex:
            return self._conn is not None

    def _try_connect(self) -> bool:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            LOG.warning("libvirt %s unreachable: %s", self.uri, exc.get_error_message())
            return False
        try:
            conn.setKeepAlive(*self._keepalive)
            conn.registerCloseCallback(self._closed, None)
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._device_removed, None
            )
            conn.domainEventRegisterAny(
                None,
                libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED,
                self._device_removal_failed,
                None,
            )
        except libvirt.libvirtError as exc:
            LOG.warning("libvirt %s: registering callbacks failed: %s", self.uri, exc)
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
            return False
        with self._mutex:
            self._conn = conn
            self._handles = {}
        LOG.info("connected to libvirt %s", self.uri)
        for listener in self._connected_listeners:
            try:
                listener()
            except Exception:
                LOG.exception("listener after libvirt connect failed")
        return True

    def _supervise(self) -> None:
        delay = self._backoff[0]
        while not self._stopping.is_set():
            if self.connected:
                delay = self._backoff[0]
                self._wake.wait()
                self._wake.clear()
                continue
            if self._try_connect():
                continue
            self._stopping.wait(delay)
            delay = min(delay * 2, self._backoff[1])

    def _closed(self, conn: Any, reason: int, opaque: Any) -> None:
        LOG.warning("libvirt connection to %s closed (reason %s); reconnecting", self.uri, reason)
        self._drop(conn)

    def _drop(self, conn: Any) -> None:
        with self._mutex:
            if self._conn is not conn:
                return
            self._conn = None
            self._handles = {}
        self._wake.set()

    def _device_removed(self, conn: Any, dom: Any, alias: str, opaque: Any) -> None:
        LOG.debug("DEVICE_REMOVED %s on %s", alias, dom.name())
        self.removals.device_removed(dom.UUIDString(), alias)

    def _device_removal_failed(self, conn: Any, dom: Any, alias: str, opaque: Any) -> None:
        LOG.info("DEVICE_REMOVAL_FAILED %s on %s", alias, dom.name())
        self.removals.removal_failed(dom.UUIDString(), alias)

    # calls

    def _connection(self) -> Any:
        with self._mutex:
            conn = self._conn
        if conn is None:
            raise LibvirtUnavailable(f"libvirt {self.uri} is not connected; retry later")
        return conn

    def _translate(self, conn: Any, exc: libvirt.libvirtError, what: str) -> Exception:
        code = exc.get_error_code()
        message = exc.get_error_message() or str(exc)
        if code == libvirt.VIR_ERR_NO_DOMAIN:
            return DomainNotFound(f"{what}: no such domain")
        alive = False
        with contextlib.suppress(libvirt.libvirtError):
            alive = bool(conn.isAlive())
        if code in _CONNECTION_ERRORS or not alive:
            self._drop(conn)
            return LibvirtUnavailable(f"{what}: libvirt connection lost: {message}")
        return LibvirtError(f"{what}: {message}")

    def _domain(self, conn: Any, name_or_uuid: str) -> Any:
        lookups = [conn.lookupByName]
        with contextlib.suppress(ValueError):
            uuid.UUID(name_or_uuid)
            lookups.insert(0, conn.lookupByUUIDString)
        last: libvirt.libvirtError | None = None
        for lookup in lookups:
            try:
                return lookup(name_or_uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                last = exc
        assert last is not None
        raise last

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        conn = self._connection()
        try:
            return fn(conn)
        except libvirt.libvirtError as exc:
            raise self._translate(conn, exc, what) from exc

    def _remember(self, dom: Any) -> Any:
        self._handles[str(dom.UUIDString())] = dom
        return dom

    def _on_domain(self, domain_uuid: str, what: str, fn: Callable[[Any], Any]) -> Any:
        """Call ``fn(virDomain)`` on a cached handle (looked up on first use)."""

        def run(conn: Any) -> Any:
            dom = self._handles.get(domain_uuid)
            if dom is None:
                dom = self._remember(conn.lookupByUUIDString(domain_uuid))
            try:
                return fn(dom)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    self._handles.pop(domain_uuid, None)
                raise

        return self._call(f"{what} domain {domain_uuid}", run)

    @staticmethod
    def _info(dom: Any) -> DomainInfo:
        # A domain handle carries its id from the lookup: -1 means inactive,
        # so only persistence costs a round trip.
        return DomainInfo(
            uuid=str(dom.UUIDString()),
            name=str(dom.name()),
            active=int(dom.ID()) != -1,
            persistent=bool(dom.isPersistent()),
        )

    def lookup(self, name_or_uuid: str) -> DomainInfo:
        """The domain by UUID or name; DomainNotFound if there is none."""
        try:
            info: DomainInfo = self._call(
                f"domain {name_or_uuid}",
                lambda conn: self._info(self._remember(self._domain(conn, name_or_uuid))),
            )
        except DomainNotFound:
            raise DomainNotFound(
                f"no libvirt domain named or with UUID {name_or_uuid!r}"
            ) from None
        return info

    def find(self, domain_uuid: str) -> DomainInfo | None:
        """The domain if it still exists, else None."""
        try:
            return self.lookup(domain_uuid)
        except DomainNotFound:
            return None

    def list_domains(self) -> list[DomainInfo]:
        """Every domain, live or defined, in two round trips whatever their number."""

        def run(conn: Any) -> list[DomainInfo]:
            active = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            persistent = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT)
            active_uuids = {str(d.UUIDString()) for d in active}
            persistent_uuids = {str(d.UUIDString()) for d in persistent}
            by_uuid = {str(d.UUIDString()): str(d.name()) for d in [*active, *persistent]}
            return [
                DomainInfo(
                    uuid=uuid,
                    name=name,
                    active=uuid in active_uuids,
                    persistent=uuid in persistent_uuids,
                )
                for uuid, name in sorted(by_uuid.items(), key=lambda item: item[1])
            ]

        domains: list[DomainInfo] = self._call("list domains", run)
        return domains

    def domain_xml(self, domain_uuid: str, *, inactive: bool = False) -> str:
        """Live XML (or the persistent config with ``inactive``)."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        xml: str = self._on_domain(domain_uuid, "XML of", lambda dom: str(dom.XMLDesc(flags)))
        return xml

    @staticmethod
    def _affect(live: bool, config: bool) -> int:
        flags = 0
        if live:
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        if config:
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
        return flags

    def attach_device(self, domain_uuid: str, xml: str, *, live: bool, config: bool) -> None:
        flags = self._affect(live, config)
        self._on_domain(
            domain_uuid, "attach device to", lambda dom: dom.attachDeviceFlags(xml, flags)
        )

    def detach_device(self, domain_uuid: str, xml: str, *, live: bool, config: bool) -> None:
        flags = self._affect(live, config)
        self._on_domain(
            domain_uuid, "detach device from", lambda dom: dom.detachDeviceFlags(xml, flags)
        )

    def detach_alias(self, domain_uuid: str, alias: str, *, live: bool, config: bool) -> None:
        """Ask for removal of device ``alias``; returns before a live unplug completes."""
        flags = self._affect(live, config)
        self._on_domain(
            domain_uuid, f"detach {alias} from", lambda dom: dom.detachDeviceAlias(alias, flags)
        )
