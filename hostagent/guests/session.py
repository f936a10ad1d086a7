"""The daemon's libvirt connections: a small pool, kept alive and reconnected.

libvirtd serves at most ``max_client_requests`` (5 by default) calls at once
per client connection and stops reading a client that has more in flight,
keepalives included, until the connection times out. So the daemon opens a
few connections and keeps fewer than that many calls in flight on each. A
dedicated thread runs libvirt's default event loop (events arrive on the
first connection); a supervisor reconnects with backoff when libvirtd goes
away, and meanwhile every call raises ``LibvirtUnavailable`` at once (503).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import libvirt

from hostagent.errors import DomainNotFound, LibvirtError, LibvirtUnavailable

LOG = logging.getLogger(__name__)

# libvirt error codes that mean "the connection is gone", not "the call failed".
_CONNECTION_ERRORS = frozenset(
    {
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
    }
)
# A system error (a socket or file call failing) is the connection's only when
# it comes from the RPC layer: "Unable to read from monitor: Connection reset
# by peer" is a QEMU dying under a call (VIR_FROM_QEMU), and the connection to
# libvirtd is fine.
_CONNECTION_ERROR_DOMAINS = frozenset({libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE})


def connection_lost(exc: libvirt.libvirtError) -> bool:
    """Whether ``exc`` says the connection to libvirtd failed (not just the call)."""
    code = exc.get_error_code()
    return code in _CONNECTION_ERRORS or (
        code == libvirt.VIR_ERR_SYSTEM_ERROR
        and exc.get_error_domain() in _CONNECTION_ERROR_DOMAINS
    )


_event_loop_lock = threading.Lock()
_event_loop_thread: list[threading.Thread] = []


def _ignore_libvirt_error(opaque: Any, error: Any) -> None:
    """libvirt's default handler prints to stderr; errors are raised and logged instead."""


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:  # a failing callback must not stop event delivery
            LOG.exception("libvirt event loop iteration failed")


def start_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a thread.

    Must happen before the first connection is opened; later calls are no-ops.
    """
    with _event_loop_lock:
        if _event_loop_thread:
            return
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)
        libvirt.virEventRegisterDefaultImpl()
        thread = threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True)
        thread.start()
        _event_loop_thread.append(thread)


@dataclass
class _Channel:
    """One libvirt connection, its cap on calls in flight, its domain handles.

    libvirt resolves a virDomain handle by UUID on every call, so a cached one
    is never stale; it saves a lookup round trip per call.
    """

    conn: Any
    slots: threading.BoundedSemaphore
    handles: dict[str, Any] = field(default_factory=dict)


Listener = Callable[[], None]


class LibvirtSession:
    """A pool of connections to one libvirt URI, used as one."""

    def __init__(
        self,
        uri: str,
        *,
        register_events: Callable[[Any], None],
        connections: int = 4,
        calls_per_connection: int = 4,
        keepalive_interval: int = 5,
        keepalive_count: int = 3,
        reconnect_min: float = 0.2,
        reconnect_max: float = 10.0,
    ) -> None:
        self.uri = uri
        self._register_events = register_events
        self._size = connections
        self._calls = calls_per_connection
        self._keepalive = (keepalive_interval, keepalive_count)
        self._backoff = (reconnect_min, reconnect_max)
        self._channels: list[_Channel] = []
        self._closing: list[Any] = []
        self._turn = itertools.count()
        self._mutex = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._listeners: list[Listener] = []
        self._before_use: list[Listener] = []

    def on_connected(self, listener: Listener) -> None:
        """Call ``listener`` (on the connecting thread) after every (re)connect."""
        self._listeners.append(listener)

    def on_connecting(self, listener: Listener) -> None:
        """Call ``listener`` (on the connecting thread) at every (re)connect, before
        any call can use the new connections: what keeps answers of the libvirtd
        before forgets them there (it may have reloaded its files meanwhile)."""
        self._before_use.append(listener)

    @property
    def connected(self) -> bool:
        with self._mutex:
            return bool(self._channels)

    def start(self) -> None:
        """Connect now if libvirtd answers; keep trying in the background if not."""
        start_event_loop()
        self._try_connect()
        threading.Thread(target=self._supervise, name="libvirt-reconnect", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        with self._mutex:
            channels, self._channels = self._channels, []
        self._close([c.conn for c in channels])

    @staticmethod
    def _close(conns: list[Any]) -> None:
        for conn in conns:
            with contextlib.suppress(libvirt.libvirtError):
                conn.unregisterCloseCallback()
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def _open(self, primary: bool) -> Any:
        conn = libvirt.open(self.uri)
        try:
            conn.setKeepAlive(*self._keepalive)
            conn.registerCloseCallback(self._closed, None)
            if primary:
                self._register_events(conn)
        except libvirt.libvirtError:
            self._close([conn])
            raise
        return conn

    def _try_connect(self) -> bool:
        opened: list[Any] = []
        try:
            for n in range(self._size):
                opened.append(self._open(primary=n == 0))
        except libvirt.libvirtError as exc:
            LOG.warning("libvirt %s unreachable: %s", self.uri, exc.get_error_message())
            self._close(opened)
            return False
        self._call_each(self._before_use, "before libvirt connections are used")
        with self._mutex:
            self._channels = [
                _Channel(conn, threading.BoundedSemaphore(self._calls)) for conn in opened
            ]
        LOG.info("connected to libvirt %s (%d connections)", self.uri, len(opened))
        self._call_each(self._listeners, "after libvirt connect")
        return True

    @staticmethod
    def _call_each(listeners: list[Listener], when: str) -> None:
        for listener in listeners:
            try:
                listener()
            except Exception:
                LOG.exception("listener %s failed", when)

    def _supervise(self) -> None:
        delay = self._backoff[0]
        while not self._stopping.is_set():
            with self._mutex:
                closing, self._closing = self._closing, []
            self._close(closing)
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
        self.drop(conn)

    def drop(self, conn: Any) -> None:
        """Give up the whole pool if ``conn`` is one of its connections."""
        with self._mutex:
            if not any(c.conn is conn for c in self._channels):
                return
            self._closing += [c.conn for c in self._channels]
            self._channels = []
        self._wake.set()

    def _channel(self) -> _Channel:
        with self._mutex:
            channels = self._channels
        if not channels:
            raise LibvirtUnavailable(f"libvirt {self.uri} is not connected; retry later")
        return channels[next(self._turn) % len(channels)]

    def _translate(self, conn: Any, exc: libvirt.libvirtError, what: str) -> Exception:
        code = exc.get_error_code()
        message = exc.get_error_message() or str(exc)
        if code == libvirt.VIR_ERR_NO_DOMAIN:
            return DomainNotFound(f"{what}: no such domain")
        alive = False
        with contextlib.suppress(libvirt.libvirtError):
            alive = bool(conn.isAlive())
        if connection_lost(exc) or not alive:
            self.drop(conn)
            return LibvirtUnavailable(f"{what}: libvirt connection lost: {message}")
        return LibvirtError(f"{what}: {message}")

    def call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """``fn(virConnect)`` on one of the connections; libvirt errors translated."""
        channel = self._channel()
        with channel.slots:
            try:
                return fn(channel.conn)
            except libvirt.libvirtError as exc:
                raise self._translate(channel.conn, exc, what) from exc

    def remember(self, conn: Any, dom: Any) -> Any:
        """Cache a handle looked up on ``conn`` for later calls on that connection."""
        with self._mutex:
            channel = next((c for c in self._channels if c.conn is conn), None)
        if channel is not None:
            channel.handles[str(dom.UUIDString())] = dom
        return dom

    def on_domain(self, domain_uuid: str, what: str, fn: Callable[[Any], Any]) -> Any:
        """``fn(virDomain)`` on a cached handle (looked up on first use)."""
        channel = self._channel()
        with channel.slots:
            dom = channel.handles.get(domain_uuid)
            try:
                if dom is None:
                    dom = channel.conn.lookupByUUIDString(domain_uuid)
                    channel.handles[domain_uuid] = dom
                return fn(dom)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    channel.handles.pop(domain_uuid, None)
                raise self._translate(channel.conn, exc, f"{what} domain {domain_uuid}") from exc
