"""Recording fakes at the two boundaries of the attach/detach core: libvirt
(``RecordingGuests``) and os-brick (``RecordingConnector``). Everything
between them (service, host connections, guest disks, reconcile, the sqlite
store, the locks) is the real thing."""

from __future__ import annotations

import contextlib
import copy
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

from lxml import etree

from hostagent.connectors import HostDevice, Target
from hostagent.connectors.base import ConnectorSettings, DiskSource, SecretKeeper
from hostagent.connectors.local import LocalConnector
from hostagent.errors import DomainNotFound, LibvirtError
from hostagent.guests.domains import DeviceRemovedWaiter, DomainInfo, Guests

Where = Literal["live", "config"]


class SimulatedCrash(BaseException):
    """The daemon dying at this step: no handler of the service catches it."""


@dataclass
class _Domain:
    info: DomainInfo
    live: Any  # lxml element, or None while the domain is not running
    config: Any  # lxml element, or None for a transient domain


class RecordingGuests(Guests):
    """Recording fake of libvirt: domains are XML held in memory, and every
    device change asked of them is recorded in ``calls`` as (call, disk alias
    or device kind, live, config), and every XML read in ``xml_reads`` as
    (domain UUID, inactive). ``refuse_attach`` is libvirt's refusal of every
    attach; ``crash_on_attach`` dies before or after libvirt takes one;
    ``removal_events`` False makes a live unplug send no DEVICE_REMOVED (an
    event lost with a dropped connection)."""

    def __init__(self) -> None:  # no libvirt session: nothing to connect to
        self.uri = "recording:///"
        self.removals = DeviceRemovedWaiter()
        self.calls: list[tuple[str, str, bool, bool]] = []
        self.xml_reads: list[tuple[str, bool]] = []
        self.removal_events = True
        self.refuse_attach: str | None = None
        self.crash_on_attach: Literal["before", "after"] | None = None
        self.migrating_domains: set[str] = set()  # UUIDs in a libvirt migration job
        self._domains: dict[str, _Domain] = {}
        # The size QEMU gives each live disk, by (domain UUID, alias); a disk
        # attached live starts at ``disk_size_at_attach``.
        self.disk_sizes: dict[tuple[str, str], int] = {}
        self.disk_size_at_attach = 1 << 30
        self.refuse_resize: set[str] = set()  # aliases whose blockResize libvirt refuses

    # setting the scene

    def define(self, name: str, *, active: bool = True, persistent: bool = True) -> DomainInfo:
        info = DomainInfo(str(uuid.uuid4()), name, active=active, persistent=persistent)
        xml = f"<domain type='kvm'><name>{name}</name><uuid>{info.uuid}</uuid><devices/></domain>"
        self._domains[info.uuid] = _Domain(
            info,
            etree.fromstring(xml) if active else None,
            etree.fromstring(xml) if persistent else None,
        )
        return info

    def arrive(self, domain_uuid: str, name: str, *disks: str) -> DomainInfo:
        """A transient domain with these disks (XML) starts here by migration."""
        info = DomainInfo(domain_uuid, name, active=True, persistent=False)
        xml = (
            f"<domain type='kvm'><name>{name}</name><uuid>{domain_uuid}</uuid><devices/></domain>"
        )
        self._domains[domain_uuid] = _Domain(info, etree.fromstring(xml), None)
        for disk in disks:
            self._apply(domain_uuid, disk, live=True, config=False)
        return info

    def vanish(self, domain: DomainInfo) -> None:
        """The domain is destroyed (transient) or undefined."""
        del self._domains[domain.uuid]

    def add_disk(self, domain: DomainInfo, source_dev: str, *, alias: str, dev: str) -> None:
        """An operator's disk on ``source_dev``, live and in config."""
        xml = (
            f"<disk type='block' device='disk'><source dev='{source_dev}'/>"
            f"<target dev='{dev}' bus='virtio'/><alias name='{alias}'/></disk>"
        )
        self._apply(domain.uuid, xml, live=domain.active, config=domain.persistent)

    def drop_disk(self, domain: DomainInfo, alias: str, where: Where) -> None:
        """The disk leaves one place behind our back (an operator, a crash)."""
        root = self._place(self._domains[domain.uuid], where)
        root.find("./devices").remove(_find(root, alias))

    def holds(self, domain: DomainInfo, alias: str) -> tuple[bool, bool]:
        """(live, config), as the test sees libvirt."""
        state = self._domains[domain.uuid]
        return (
            state.live is not None and _find(state.live, alias) is not None,
            state.config is not None and _find(state.config, alias) is not None,
        )

    # the Guests calls the core makes

    @property
    def connected(self) -> bool:
        return True

    def lookup(self, name_or_uuid: str) -> DomainInfo:
        for state in self._domains.values():
            if name_or_uuid in (state.info.uuid, state.info.name):
                return state.info
        raise DomainNotFound(f"no libvirt domain named or with UUID {name_or_uuid!r}")

    def find(self, domain_uuid: str) -> DomainInfo | None:
        state = self._domains.get(domain_uuid)
        return state.info if state else None

    def list_domains(self) -> list[DomainInfo]:
        return sorted((s.info for s in self._domains.values()), key=lambda d: d.name)

    def domain_xml(self, domain_uuid: str, *, inactive: bool = False) -> str:
        self.xml_reads.append((domain_uuid, inactive))
        state = self._state(domain_uuid)
        # libvirt: a stopped domain's live XML is its config, a transient one's
        # inactive XML its live XML
        wanted = state.config if inactive else state.live
        root = wanted if wanted is not None else (state.live if inactive else state.config)
        return str(etree.tostring(root, encoding="unicode"))

    def migrating(self, domain_uuid: str) -> bool:
        return domain_uuid in self.migrating_domains and domain_uuid in self._domains

    def attach_device(self, domain_uuid: str, xml: str, *, live: bool, config: bool) -> None:
        self.calls.append(("attach", _describe(xml), live, config))
        if self.refuse_attach is not None:
            raise LibvirtError(self.refuse_attach)
        if self.crash_on_attach == "before":
            raise SimulatedCrash
        self._apply(domain_uuid, xml, live=live, config=config)
        if self.crash_on_attach == "after":
            raise SimulatedCrash

    def disk_size(self, domain_uuid: str, alias: str) -> int | None:
        state = self._state(domain_uuid)
        if state.live is None or _find(state.live, alias) is None:
            return None
        return self.disk_sizes.get((domain_uuid, alias), self.disk_size_at_attach)

    def block_resize(self, domain_uuid: str, alias: str, size: int) -> None:
        self.calls.append(("resize", alias, True, False))
        if alias in self.refuse_resize:
            raise LibvirtError(f"resizing {alias}: refused")
        if self.disk_size(domain_uuid, alias) is None:
            raise LibvirtError(f"no disk {alias} in the running domain")
        self.disk_sizes[domain_uuid, alias] = size

    def detach_alias(self, domain_uuid: str, alias: str, *, live: bool, config: bool) -> None:
        self.calls.append(("detach", alias, live, config))
        state = self._state(domain_uuid)
        places = [p for p, wanted in (("live", live), ("config", config)) if wanted]
        roots = [self._place(state, p) for p in places]  # type: ignore[arg-type]
        if any(root is None or _find(root, alias) is None for root in roots):
            raise LibvirtError(f"no device with alias {alias} in {state.info.name}")
        for root in roots:
            root.find("./devices").remove(_find(root, alias))
        if live and self.removal_events:
            self.removals.device_removed(domain_uuid, alias)

    # inside

    def _state(self, domain_uuid: str) -> _Domain:
        state = self._domains.get(domain_uuid)
        if state is None:
            raise DomainNotFound(f"domain {domain_uuid} is gone")
        return state

    @staticmethod
    def _place(state: _Domain, where: Where) -> Any:
        return state.live if where == "live" else state.config

    def _apply(self, domain_uuid: str, xml: str, *, live: bool, config: bool) -> None:
        state = self._state(domain_uuid)
        element = etree.fromstring(xml)
        for root, wanted in ((state.live, live), (state.config, config)):
            if wanted:
                root.find("./devices").append(copy.deepcopy(element))


def _find(root: Any, alias: str) -> Any:
    found = root.xpath("./devices/disk[alias/@name=$alias]", alias=alias)
    return found[0] if found else None


def _describe(xml: str) -> str:
    """A disk by its alias, any other device by its kind."""
    element = etree.fromstring(xml)
    alias = element.find("./alias")
    return str(alias.get("name")) if alias is not None else str(element.tag)


class RecordingConnector:
    """Recording fake of an os-brick connector for ``local``: any path is a
    device; ``connects``, ``disconnects`` and ``extends`` list the connection
    keys asked; an extend finds the device at ``device_size`` bytes."""

    driver_volume_type: ClassVar[str] = "local"

    def __init__(
        self, *, connect_error: Exception | None = None, disconnect_error: Exception | None = None
    ) -> None:
        self.connects: list[str] = []
        self.disconnects: list[str] = []
        self.extends: list[str] = []
        self.device_size = 1 << 30
        self.extend_error: Exception | None = None
        self.extend_gate: threading.Event | None = None  # an extend waits for it
        self.connect_error = connect_error
        self.disconnect_error = disconnect_error

    def parse_target(self, data: Mapping[str, Any]) -> Target:
        path = str(data["device_path"])
        return Target(
            driver_volume_type="local",
            connection_key=f"local:{path}",
            properties={"device_path": path},
            disk_format="raw",
        )

    def guard(self, target: Target) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def connect(self, target: Target) -> HostDevice:
        self.connects.append(target.connection_key)
        if self.connect_error is not None:
            raise self.connect_error
        path = str(target.properties["device_path"])
        return HostDevice(path=path, device_info={"type": "local", "path": path})

    @classmethod
    def configured(cls, settings: ConnectorSettings, secrets: SecretKeeper | None) -> Self:
        return cls()

    # What a guest's disk names is local's own answer: only connect and
    # disconnect are faked.
    @staticmethod
    def disk_source(target: Target, device: HostDevice) -> DiskSource | None:
        return LocalConnector.disk_source(target, device)

    @staticmethod
    def canonical(target: Target) -> Target:
        return target

    @staticmethod
    def offline_disk_source(target: Target) -> DiskSource:
        return LocalConnector.offline_disk_source(target)

    def extend(self, target: Target, device: HostDevice, new_size: int | None) -> int:
        self.extends.append(target.connection_key)
        if self.extend_gate is not None:
            self.extend_gate.wait(5)
        if self.extend_error is not None:
            raise self.extend_error
        return self.device_size

    def disconnect(self, target: Target, device: HostDevice) -> None:
        self.disconnects.append(target.connection_key)
        if self.disconnect_error is not None:
            raise self.disconnect_error
