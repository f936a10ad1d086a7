"""Thin libvirt-python wrapper: domains, device attach/detach, events.

Calls go through a ``LibvirtSession`` (a few connections, kept alive and
reconnected; 503 while libvirtd is away). libvirt's event loop delivers
``DEVICE_REMOVED`` / ``DEVICE_REMOVAL_FAILED`` to the ``DeviceRemovedWaiter``
and lifecycle events (a domain stopped or undefined; a domain defined) to
listeners.
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

from hostagent.errors import DomainNotFound, LibvirtError
from hostagent.guests.session import LibvirtSession
from hostagent.libvirt_xml.disk import parse_disk_refs
from hostagent.libvirt_xml.secret import SecretSpec

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class DomainInfo:
    """What the service needs to know about a domain right now."""

    uuid: str
    name: str
    active: bool
    persistent: bool


class _PendingRemoval:
    """One wait for a removal: ``event`` is set when libvirt says the device
    left, or that the removal failed, or that the domain stopped. A waiter
    reads the live XML after it either way (``attachments.disk_removal``)."""

    def __init__(self) -> None:
        self.event = threading.Event()


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

    def _wake(self, domain_uuid: str, alias: str) -> None:
        with self._mutex:
            pending = self._pending.get((domain_uuid, alias))
        if pending is not None:
            pending.event.set()

    def device_removed(self, domain_uuid: str, alias: str) -> None:
        self._wake(domain_uuid, alias)

    def domain_stopped(self, domain_uuid: str) -> None:
        """Wake every wait on a domain that stopped or vanished: its live disks are gone."""
        with self._mutex:
            pending = [p for (uuid, _), p in self._pending.items() if uuid == domain_uuid]
        for waiting in pending:
            waiting.event.set()

    def removal_failed(self, domain_uuid: str, alias: str) -> None:
        self._wake(domain_uuid, alias)


ConnectionListener = Callable[[], None]
# (domain UUID, libvirt lifecycle event, detail), called on the event-loop thread
LifecycleListener = Callable[[str, int, int], None]
# (domain UUID), called on the event-loop thread
DefinedListener = Callable[[str], None]

# (domain UUID) of a domain starting or resuming here by migration, on the event-loop thread
ArrivalListener = Callable[[str], None]
# The lifecycle events of a destination: Started/Migrated, then Resumed/Migrated.
_ARRIVAL_EVENTS = frozenset(
    {
        (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED),
        (libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_MIGRATED),
    }
)

# Lifecycle events after which a domain has no live devices (and may be gone).
_STOPPING_EVENTS = frozenset(
    {
        libvirt.VIR_DOMAIN_EVENT_STOPPED,
        libvirt.VIR_DOMAIN_EVENT_UNDEFINED,
        libvirt.VIR_DOMAIN_EVENT_CRASHED,
    }
)


class Guests:
    """The host's libvirt domains, through a pooled, self-healing session."""

    def __init__(self, uri: str, *, connections: int = 4) -> None:
        self.uri = uri
        self.removals = DeviceRemovedWaiter()
        self._lifecycle_listeners: list[LifecycleListener] = []
        self._arrival_listeners: list[ArrivalListener] = []

        self._defined_listeners: list[DefinedListener] = []
        self.session = LibvirtSession(
            uri, register_events=self._register_events, connections=connections
        )

    def start(self) -> None:
        """Connect now if libvirtd answers; keep trying in the background if not."""
        self.session.start()

    def stop(self) -> None:
        self.session.stop()

    def on_connected(self, listener: ConnectionListener) -> None:
        """Call ``listener`` (on the reconnect thread) after every (re)connect."""
        self.session.on_connected(listener)

    def on_connecting(self, listener: ConnectionListener) -> None:
        """Call ``listener`` (on the reconnect thread) at every (re)connect, before
        any call uses the new connections."""
        self.session.on_connecting(listener)

    def on_lifecycle(self, listener: LifecycleListener) -> None:
        """Call ``listener(uuid, event, detail)`` for domains that stop or are undefined.

        It runs on libvirt's event-loop thread: it must hand work off, not do it.
        """
        self._lifecycle_listeners.append(listener)

    def on_arrival(self, listener: ArrivalListener) -> None:
        """Call ``listener(uuid)`` when a domain starts or resumes here by migration
        (on libvirt's event-loop thread: hand work off)."""
        self._arrival_listeners.append(listener)

    def on_defined(self, listener: DefinedListener) -> None:
        """Call ``listener(uuid)`` for every domain defined: new, changed, renamed
        (its new name), or defined again after an undefine.

        It runs on libvirt's event-loop thread: it must hand work off, not do it.
        """
        self._defined_listeners.append(listener)

    @property
    def connected(self) -> bool:
        return self.session.connected

    def _register_events(self, conn: Any) -> None:
        conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._device_removed, None
        )
        conn.domainEventRegisterAny(
            None,
            libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED,
            self._device_removal_failed,
            None,
        )
        conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None
        )

    def _device_removed(self, conn: Any, dom: Any, alias: str, opaque: Any) -> None:
        LOG.debug("DEVICE_REMOVED %s on %s", alias, dom.name())
        self.removals.device_removed(dom.UUIDString(), alias)

    def _device_removal_failed(self, conn: Any, dom: Any, alias: str, opaque: Any) -> None:
        LOG.info("DEVICE_REMOVAL_FAILED %s on %s", alias, dom.name())
        self.removals.removal_failed(dom.UUIDString(), alias)

    def _lifecycle(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        self._migrated_here(dom, event, detail)

        if event == libvirt.VIR_DOMAIN_EVENT_DEFINED:
            self._defined(dom, detail)
            return
        if event not in _STOPPING_EVENTS:
            return
        domain_uuid = str(dom.UUIDString())
        LOG.info("domain %s (%s): lifecycle event %d/%d", dom.name(), domain_uuid, event, detail)
        if (event, detail) == (
            libvirt.VIR_DOMAIN_EVENT_UNDEFINED,
            libvirt.VIR_DOMAIN_EVENT_UNDEFINED_RENAMED,
        ):
            return  # its old name: the domain goes on under the new one (DEFINED/RENAMED)
        self.removals.domain_stopped(domain_uuid)
        for listener in self._lifecycle_listeners:
            try:
                listener(domain_uuid, event, detail)
            except Exception:
                LOG.exception("lifecycle listener failed")

    def _migrated_here(self, dom: Any, event: int, detail: int) -> None:
        """libvirt takes one lifecycle callback per connection: ``_lifecycle`` calls this."""
        if (event, detail) not in _ARRIVAL_EVENTS:
            return
        domain_uuid = str(dom.UUIDString())
        LOG.info(
            "domain %s (%s): arriving by migration (%d/%d)", dom.name(), domain_uuid, event, detail
        )
        for listener in self._arrival_listeners:
            try:
                listener(domain_uuid)
            except Exception:
                LOG.exception("arrival listener failed")

    def _defined(self, dom: Any, detail: int) -> None:
        domain_uuid = str(dom.UUIDString())
        LOG.info("domain %s (%s): defined (detail %d)", dom.name(), domain_uuid, detail)
        for listener in self._defined_listeners:
            try:
                listener(domain_uuid)
            except Exception:
                LOG.exception("define listener failed")

    # calls

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
            info: DomainInfo = self.session.call(
                f"domain {name_or_uuid}",
                lambda conn: self._info(
                    self.session.remember(conn, self._domain(conn, name_or_uuid))
                ),
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
        """Every domain, live or defined, in two round trips whatever their number:
        all of them (a handle knows whether it runs), then the transient ones
        (every other domain is persistent)."""

        def run(conn: Any) -> list[DomainInfo]:
            every = conn.listAllDomains(0)
            transient = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT)
            transient_uuids = {str(d.UUIDString()) for d in transient}
            found = []
            for dom in every:
                uuid = str(dom.UUIDString())
                found.append(
                    DomainInfo(
                        uuid=uuid,
                        name=str(dom.name()),
                        active=int(dom.ID()) != -1,
                        persistent=uuid not in transient_uuids,
                    )
                )
            return sorted(found, key=lambda domain: domain.name)

        domains: list[DomainInfo] = self.session.call("list domains", run)
        return domains

    def list_running(self) -> list[tuple[str, str]]:
        """(UUID, name) of every running domain, in one round trip."""

        def run(conn: Any) -> list[tuple[str, str]]:
            running = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            return [(str(dom.UUIDString()), str(dom.name())) for dom in running]

        found: list[tuple[str, str]] = self.session.call("list running domains", run)
        return found

    def domain_xml(self, domain_uuid: str, *, inactive: bool = False) -> str:
        """Live XML (or the persistent config with ``inactive``)."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        xml: str = self.session.on_domain(
            domain_uuid, "XML of", lambda dom: str(dom.XMLDesc(flags))
        )
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
        self.session.on_domain(
            domain_uuid, "attach device to", lambda dom: dom.attachDeviceFlags(xml, flags)
        )

    def detach_alias(self, domain_uuid: str, alias: str, *, live: bool, config: bool) -> None:
        """Ask for removal of device ``alias``; returns before a live unplug completes."""
        flags = self._affect(live, config)
        self.session.on_domain(
            domain_uuid, f"detach {alias} from", lambda dom: dom.detachDeviceAlias(alias, flags)
        )

    # block size: libvirt names a disk by its target, we by its alias

    @staticmethod
    def _live_target(dom: Any, alias: str) -> str | None:
        disk = next((d for d in parse_disk_refs(dom.XMLDesc(0)).disks if d.alias == alias), None)
        return disk.target_dev if disk is not None else None

    def disk_size(self, domain_uuid: str, alias: str) -> int | None:
        """The size in bytes QEMU gives the running domain's disk ``alias``
        (virDomainGetBlockInfo's capacity); None if it has no such disk."""

        def run(dom: Any) -> int | None:
            target = self._live_target(dom, alias)
            return None if target is None else int(dom.blockInfo(target, 0)[0])

        size: int | None = self.session.on_domain(domain_uuid, f"size of {alias} in", run)
        return size

    def block_resize(self, domain_uuid: str, alias: str, size: int) -> None:
        """Grow the running domain's disk ``alias`` to exactly ``size`` bytes
        (virDomainBlockResize with VIR_DOMAIN_BLOCK_RESIZE_BYTES)."""

        def run(dom: Any) -> None:
            target = self._live_target(dom, alias)
            if target is None:
                raise LibvirtError(f"no disk {alias} in the running domain")
            dom.blockResize(target, size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)

        self.session.on_domain(domain_uuid, f"resize {alias} in", run)

    def migrating(self, domain_uuid: str) -> bool:
        """Whether a migration of the domain is under way: one out of this host
        (a libvirt job), or one into it that has not resumed the guest yet.
        False once the domain is gone."""

        def run(dom: Any) -> bool:
            try:
                operation = dom.jobStats(0).get("operation")
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                    return False  # not running: no job
                if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_UNSUPPORTED:
                    raise
                # "migration statistics are available only on the source host":
                # the destination's side of a migration job
                operation = libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN
            if operation == libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT:
                return True
            # an arriving domain is here once libvirt resumed it, its job ending
            return bool(
                operation == libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN
                and dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING
            )

        try:
            migrating: bool = self.session.on_domain(domain_uuid, "job of", run)
        except DomainNotFound:
            return False
        return migrating

    # secrets (connectors.SecretKeeper): the cephx keys QEMU's librbd reads

    def define_secret(self, uuid: str, usage_name: str, value: bytes) -> None:
        """A private (unreadable through the API), persistent ceph secret."""
        xml = SecretSpec(
            ephemeral="no", private="yes", uuid=uuid, usage_type="ceph", usage_name=usage_name
        ).to_xml()

        def run(conn: Any) -> None:
            conn.secretDefineXML(xml, 0).setValue(value, 0)

        self.session.call(f"define secret {uuid}", run)

    def undefine_secret(self, uuid: str) -> None:
        def run(conn: Any) -> None:
            try:
                conn.secretLookupByUUIDString(uuid).undefine()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_SECRET:
                    raise

        self.session.call(f"undefine secret {uuid}", run)

    def has_secret(self, uuid: str) -> bool:
        def run(conn: Any) -> bool:
            try:
                conn.secretLookupByUUIDString(uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
                    return False
                raise
            return True

        found: bool = self.session.call(f"look up secret {uuid}", run)
        return found
