"""hostagentd: wire the parts together, reconcile, serve the API until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web
from os_brick import privileged as os_brick_privileged
from oslo_concurrency import lockutils
from oslo_config import cfg
from oslo_log import log

from hostagent import connectors
from hostagent.api.http_server import ApiRunner, ConnectionLimits
from hostagent.api.openapi import build_openapi
from hostagent.api.peer_auth import PeerPolicy
from hostagent.api.server import ApiHandlers, make_app
from hostagent.api.views import ReadViews
from hostagent.attachments.extend import VolumeExtender
from hostagent.attachments.guest_disks import GuestDisks
from hostagent.attachments.host_connections import HostConnections
from hostagent.attachments.migration import Arrivals
from hostagent.attachments.rebuild import rebuild_state, unrecorded_disks
from hostagent.attachments.reconcile import Reconciler
from hostagent.attachments.service import AttachmentService, ServiceSettings
from hostagent.attachments.vanished_domains import VanishedDomains
from hostagent.daemon.conf import load_config
from hostagent.daemon.systemd import inherited_socket, notify, watchdog_interval
from hostagent.errors import HostagentError
from hostagent.guests.domain_scan import DomainScan
from hostagent.guests.domains import Guests
from hostagent.locks import HostLocks, StateDirBusy, state_dir_guard
from hostagent.observability.logctx import install_filters
from hostagent.observability.metrics import Metrics
from hostagent.state.store import Store, StoreError

LOG = logging.getLogger("hostagent")

STATE_FILE = "hostagent.sqlite3"
# meta key: when a start that could serve had looked for ua- disks the state
# does not record (the first-start warning); until then every start looks.
UNRECORDED_DISKS_CHECKED = "unrecorded_disks_checked_at"


class StateDirUnsafe(RuntimeError):
    """The state dir may be read or changed by others than the daemon's user."""


def private_state_dir(state_dir: Path) -> None:
    """Make the state dir (0700) or check the one that exists: it holds the
    connection data os-brick needs to disconnect (credentials). One that others
    may read or write is refused, not changed: it may be shared on purpose
    (a state dir of /tmp), and its contents may have been tampered with."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = state_dir.stat()
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077 or st.st_uid != os.geteuid():
        raise StateDirUnsafe(
            f"state dir {state_dir} has mode {mode:04o} and owner uid {st.st_uid}; it must "
            f"be 0700 and owned by uid {os.geteuid()} (it holds the data needed to "
            f"disconnect volumes, credentials included): check its contents, then "
            f"chown {os.geteuid()} {state_dir}; chmod 700 {state_dir}"
        )


def read_boot_id(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        LOG.warning("cannot read boot id from %s: %s", path, exc)
        return ""


def bind_unix_socket(path: Path) -> socket.socket:
    """Bind the API socket (mode 0660), replacing a stale file but never a live server."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            path.unlink(missing_ok=True)
        else:
            raise RuntimeError(f"another server is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o660)
    sock.listen(128)
    return sock


class PeriodicReconcile:
    """Runs the reconciler every ``interval`` seconds on its own thread."""

    def __init__(self, reconciler: Reconciler, guests: Guests, interval: float) -> None:
        self._reconciler = reconciler
        self._guests = guests
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reconcile", daemon=True)

    def start(self) -> None:
        if self._interval > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            if self._guests.connected:
                run_reconcile(self._reconciler, "periodic")


def rebuild(store: Store, guests: Guests, *, boot_id: str) -> int:
    """``--rebuild-state``: record the ua- disks libvirt holds, print what was done."""
    guests.start()
    try:
        if not guests.connected:
            LOG.error("cannot rebuild state: libvirt %s is unreachable", guests.uri)
            return 1
        for line in rebuild_state(store, guests, boot_id=boot_id):
            print(line)
            LOG.info("rebuild-state: %s", line)
    finally:
        guests.stop()
        store.close()
    return 0


def warn_about_unrecorded_disks(store: Store, guests: Guests) -> bool:
    """A first start is normal, unless guests already hold disks this agent made.
    Only a warning: if libvirt cannot be read now, serving still starts (and
    False says the look did not happen)."""
    try:
        found = unrecorded_disks(store, guests)
    except HostagentError as exc:
        LOG.warning("could not look for disks made by an earlier hostagent: %s", exc.message)
        return False
    if found:
        LOG.error(
            "there is no state at %s yet (no start that looked has served from it), "
            "but guests hold %d disks made by hostagent (%s). "
            "They are not recorded, so this agent will not detach or disconnect them. If "
            "the state was lost: stop hostagentd and run 'hostagentd --rebuild-state'.",
            store.path,
            len(found),
            ", ".join(f"{f.disk.alias} on {f.domain.name}" for f in found[:10]),
        )
    return True


def build_core(
    *,
    store: Store,
    guests: Guests,
    registry: connectors.ConnectorRegistry,
    locks: HostLocks,
    settings: ServiceSettings,
    metrics: Metrics,
    tombstone_ttl: float,
    clock: Callable[[], float] = time.time,
    scan: DomainScan | None = None,
) -> tuple[AttachmentService, Reconciler]:
    """The attachment service and the reconciler on one set of parts: the same
    host connections and guest disks, so both take the same locks. ``clock``
    ages tombstones; ``scan`` reads every domain's disks (uncached if None)."""
    connections = HostConnections(
        store=store,
        guests=guests,
        registry=registry,
        locks=locks,
        boot_id=settings.boot_id,
        metrics=metrics,
        scan=scan,
    )
    disks = GuestDisks(
        guests=guests,
        store=store,
        locks=locks,
        metrics=metrics,
        disk_discard=settings.disk_discard,
    )
    service = AttachmentService(
        store=store,
        guests=guests,
        registry=registry,
        locks=locks,
        settings=settings,
        metrics=metrics,
        connections=connections,
        disks=disks,
    )
    reconciler = Reconciler(
        store=store,
        guests=guests,
        locks=locks,
        connections=connections,
        disks=disks,
        boot_id=settings.boot_id,
        tombstone_ttl=tombstone_ttl,
        clock=clock,
        migrations=service.migrations,
    )
    return service, reconciler


def run_reconcile(reconciler: Reconciler, why: str) -> None:
    try:
        report = reconciler.run()
    except HostagentError as exc:
        LOG.warning("%s reconcile did not complete: %s", why, exc.message)
    except Exception:
        LOG.exception("%s reconcile failed", why)
    else:
        LOG.info("%s reconcile: %d actions", why, len(report.actions))


def _watchdog(loop: asyncio.AbstractEventLoop, interval: float) -> None:
    """Ping systemd from the event loop itself: a stuck loop stops the pings."""
    loop.call_later(interval, _watchdog, loop, interval)
    notify("WATCHDOG=1")


async def serve(
    app: web.Application, sock: socket.socket, shutdown_timeout: float, limits: ConnectionLimits
) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting and finish in-flight requests."""
    runner = ApiRunner(
        app, limits, handle_signals=False, access_log=None, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    LOG.info("serving on %s", sock.getsockname())
    notify("READY=1", f"STATUS=serving on {sock.getsockname()}")
    interval = watchdog_interval()
    if interval:
        _watchdog(loop, interval)
    await stop.wait()
    LOG.info("stopping: no new connections; finishing requests in flight")
    notify("STOPPING=1")
    await runner.cleanup()


def _already_stopping(signum: int, frame: object) -> None:
    LOG.info("signal %d: already stopping", signum)


def setup_logging(conf: cfg.ConfigOpts) -> None:
    """oslo.log as configured (stderr by default, journald with use_journal), every
    line carrying its request, attachment and volume, secrets masked."""
    log.setup(conf, "hostagent")
    install_filters()


def prepare_os_brick(lock_dir: Path) -> None:
    """os-brick's own external locks (connect_volume, shared targets) live in our
    lock dir; a daemon running as root runs its privileged calls in-process."""
    lockutils.set_defaults(lock_path=str(lock_dir))
    if os.geteuid() == 0:
        os_brick_privileged.default.set_client_mode(False)


def listen_to_libvirt(
    guests: Guests, service: AttachmentService, reconciler: Reconciler
) -> tuple[VanishedDomains, Arrivals]:
    """What libvirt's events start: releases of vanished domains (and a look at
    domains defined again), arrivals by migration, a reconcile on reconnect."""
    vanished = VanishedDomains(reconciler)
    guests.on_lifecycle(vanished.notify)
    guests.on_defined(vanished.defined)
    arrivals = Arrivals(service.migrations)
    guests.on_arrival(arrivals.notify)
    guests.on_connected(lambda: run_reconcile(reconciler, "after libvirt connect"))
    return vanished, arrivals


def run(conf: cfg.ConfigOpts) -> int:
    state_dir = Path(conf.state_dir).absolute()
    private_state_dir(state_dir)
    prepare_os_brick(state_dir / "locks")
    with state_dir_guard(state_dir) as held:
        store = Store(state_dir / STATE_FILE)
        # In the state, not "the file is missing": a first start that failed
        # (socket taken) leaves a file, and the next start must still look.
        state_is_new = store.get_meta(UNRECORDED_DISKS_CHECKED) is None
        guests = Guests(conf.libvirt_uri, connections=conf.libvirt.connections)
        boot_id = read_boot_id(conf.boot_id_path)
        if conf.rebuild_state:
            return rebuild(store, guests, boot_id=boot_id)
        registry = connectors.ConnectorRegistry.default(
            connectors.ConnectorSettings(
                iscsi_use_multipath=conf.iscsi.use_multipath,
                rbd_attach_mode=conf.rbd.attach_mode,
                local_allowed_devices=tuple(conf.local.allowed_devices),
            ),
            secrets=guests,
        )
        metrics = Metrics()
        scan = DomainScan.watching(
            guests,
            conf.libvirt_uri,
            config_dir=conf.libvirt.domain_config_dir,
            status_dir=conf.libvirt.domain_status_dir,
        )
        service, reconciler = build_core(
            store=store,
            guests=guests,
            registry=registry,
            locks=HostLocks(state_dir / "locks", held=held),
            settings=ServiceSettings(
                detach_timeout=conf.detach_timeout,
                detach_retry_interval=conf.libvirt.detach_retry_interval,
                boot_id=boot_id,
                disk_discard=conf.disk_discard,
                incoming_migration_timeout=conf.incoming_migration_timeout,
            ),
            metrics=metrics,
            tombstone_ttl=conf.reconcile.tombstone_ttl,
            scan=scan,
        )
        metrics.watch(store, lambda: guests.connected)
        service.connections.move_to_current_keys()
        vanished, arrivals = listen_to_libvirt(guests, service, reconciler)
        guests.start()  # connects (and reconciles) now if libvirtd answers
        looked = state_is_new and guests.connected and warn_about_unrecorded_disks(store, guests)
        executor = ThreadPoolExecutor(conf.api.workers, thread_name_prefix="api")
        periodic = PeriodicReconcile(reconciler, guests, conf.reconcile.interval)
        policy = PeerPolicy.of(conf.api.allowed_uids, conf.api.allowed_gids)
        handlers = ApiHandlers(
            service,
            reconciler,
            executor,
            build_openapi(),
            views=ReadViews(
                store=store, guests=guests, boot_id=boot_id, scan=service.connections.scan
            ),
            metrics=metrics,
            libvirt_connected=lambda: guests.connected,
            extender=VolumeExtender(
                store=store,
                guests=guests,
                registry=registry,
                locks=service.locks,
                connections=service.connections,
            ),
            connector_host=conf.connector.host,
            connector_my_ip=conf.connector.my_ip,
            connector_multipath=conf.iscsi.use_multipath,
            connector_rbd_local_attach=conf.rbd.attach_mode == "krbd",
        )
        app = make_app(handlers, policy)
        inherited = inherited_socket()
        socket_path = Path(conf.socket_path).absolute()
        sock = inherited or bind_unix_socket(socket_path)
        if looked:  # this start can serve: later ones need not look again
            store.set_meta(UNRECORDED_DISKS_CHECKED, str(time.time()))
        periodic.start()
        vanished.start()
        arrivals.start()
        try:
            limits = ConnectionLimits(conf.api.header_timeout, conf.api.max_connections)
            asyncio.run(serve(app, sock, conf.detach_timeout + 30, limits))
        finally:
            # asyncio restored the default handlers; a repeated SIGTERM must not
            # cut the clean shutdown short.
            signal.signal(signal.SIGTERM, _already_stopping)
            signal.signal(signal.SIGINT, _already_stopping)
            periodic.stop()
            vanished.stop()
            arrivals.stop()
            executor.shutdown(wait=True)
            guests.stop()
            scan.close()
            store.close()
            if inherited is None:  # a socket systemd passed is systemd's to remove
                with contextlib.suppress(FileNotFoundError):
                    socket_path.unlink()
    LOG.info("stopped cleanly")
    return 0


def main(argv: list[str] | None = None) -> int:
    conf = load_config(sys.argv[1:] if argv is None else argv)
    setup_logging(conf)
    try:
        return run(conf)
    except (StoreError, StateDirBusy, RuntimeError, OSError) as exc:
        LOG.error("hostagentd cannot start: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
