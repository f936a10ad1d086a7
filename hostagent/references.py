"""Who still uses a host device, whatever our records say.

This is the check behind the rule no input can break: before a disconnect,
every domain's live XML and persistent config is read, and any disk whose
source is the device (same path after symlinks, or the same device number)
keeps the host connection. Then the host's processes are asked too: a QEMU
that holds the device open without libvirt knowing (libvirtd killed in the
middle of a hot-plug leaves such a disk behind) keeps it just the same.
"""

from __future__ import annotations

import contextlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from hostagent.errors import DomainNotFound
from hostagent.guests import DomainInfo, Guests
from hostagent.libvirt_xml.disk import DiskRef, parse_disk_refs
from hostagent.store import ConnectionRecord


@dataclass(frozen=True)
class DeviceReference:
    """A disk of a domain that uses a host device."""

    domain_uuid: str
    domain_name: str
    where: Literal["live", "config"]
    alias: str | None
    target_dev: str | None
    source: str


def _device_number(path: str) -> int | None:
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode):
            return st.st_rdev
    return None


class HostDeviceMatcher:
    """Matches disk sources against one host block device."""

    def __init__(self, device_path: str) -> None:
        self.device_path = device_path
        self._real = os.path.realpath(device_path)
        self._rdev = _device_number(device_path)

    def matches(self, disk: DiskRef) -> bool:
        for source in (disk.source_dev, disk.source_file):
            if not source:
                continue
            if source == self.device_path or os.path.realpath(source) == self._real:
                return True
            if self._rdev is not None and _device_number(source) == self._rdev:
                return True
        return False


@dataclass(frozen=True)
class DomainDisk:
    """One disk of one domain, from its live XML or its persistent config."""

    domain: DomainInfo
    where: Literal["live", "config"]
    disk: DiskRef


@dataclass(frozen=True)
class DomainXml:
    """A domain's live XML or its persistent config, as libvirt gave it."""

    domain: DomainInfo
    where: Literal["live", "config"]
    xml: str


def _xml_of(guests: Guests, domain: DomainInfo) -> list[DomainXml]:
    views: list[DomainXml] = []
    try:
        if domain.active:
            views.append(DomainXml(domain, "live", guests.domain_xml(domain.uuid)))
        if domain.persistent:
            config = guests.domain_xml(domain.uuid, inactive=True)
            views.append(DomainXml(domain, "config", config))
    except DomainNotFound:  # undefined while we looked: it holds nothing any more
        return []
    return views


# XML of many domains is fetched concurrently: the round trips overlap on
# libvirt's one (thread-safe) connection.
_FETCHERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="domain-scan")


def scan_domain_xml(guests: Guests) -> list[DomainXml]:
    """The live XML and persistent config of every domain, skipping domains
    undefined since the listing.

    Raises LibvirtUnavailable if libvirt cannot be asked: no answer is never
    taken as "unused".
    """
    domains = guests.list_domains()
    if len(domains) <= 1:
        return [view for domain in domains for view in _xml_of(guests, domain)]
    per_domain = _FETCHERS.map(lambda domain: _xml_of(guests, domain), domains)
    return [view for views in per_domain for view in views]


def scan_domain_disks(guests: Guests) -> list[DomainDisk]:
    """Every disk of every domain, live and config (see ``scan_domain_xml``)."""
    return [
        DomainDisk(view.domain, view.where, disk)
        for view in scan_domain_xml(guests)
        for disk in parse_disk_refs(view.xml).disks
    ]


class NetworkDiskMatcher:
    """Matches network disks (protocol and name, e.g. rbd pool/image)."""

    def __init__(self, protocol: str, name: str) -> None:
        self.protocol = protocol
        self.name = name

    def matches(self, disk: DiskRef) -> bool:
        return disk.source_protocol == self.protocol and disk.source_name == self.name


DiskMatcher = HostDeviceMatcher | NetworkDiskMatcher


def matcher_for(connection: ConnectionRecord) -> DiskMatcher | None:
    """How to recognise a connection's disk in a domain's XML, or None if it
    has nothing a disk could name."""
    if connection.device_path is not None:
        return HostDeviceMatcher(connection.device_path)
    name = connection.connection_data.get("name")
    if connection.driver_volume_type == "rbd" and isinstance(name, str):
        return NetworkDiskMatcher("rbd", name)
    return None


def references_in(disks: list[DomainDisk], matcher: DiskMatcher) -> list[DeviceReference]:
    """The disks among ``disks`` that ``matcher`` recognises."""
    return [
        DeviceReference(
            domain_uuid=dd.domain.uuid,
            domain_name=dd.domain.name,
            where=dd.where,
            alias=dd.disk.alias,
            target_dev=dd.disk.target_dev,
            source=dd.disk.source_dev or dd.disk.source_file or dd.disk.source_name or "",
        )
        for dd in disks
        if matcher.matches(dd.disk)
    ]


def find_references(guests: Guests, matcher: DiskMatcher) -> list[DeviceReference]:
    """Every disk, in any domain's live XML or persistent config, ``matcher`` recognises."""
    return references_in(scan_domain_disks(guests), matcher)


@dataclass(frozen=True)
class OpenHandle:
    """A process that has the device open."""

    pid: int
    command: str


def processes_holding(device_path: str, proc: str = "/proc") -> list[OpenHandle]:
    """Every process with an open file descriptor on the block device.

    Each process's ``fd`` directory is opened once and its entries are
    stat'ed relative to it (the kernel's /proc lookups are most of the cost:
    about 4 µs a descriptor).
    """
    rdev = _device_number(device_path)
    if rdev is None:
        return []
    own_pid = str(os.getpid())
    holders = []
    for pid in os.listdir(proc):
        if not pid.isdigit() or pid == own_pid:
            continue
        try:
            fd_dir = os.open(f"{proc}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # exited, or not ours to look at
            continue
        try:
            if _holds(fd_dir, rdev):
                holders.append(OpenHandle(int(pid), _command(f"{proc}/{pid}")))
        finally:
            os.close(fd_dir)
    return holders


def _holds(fd_dir: int, rdev: int) -> bool:
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names:
        try:
            st = os.stat(name, dir_fd=fd_dir)
        except OSError:  # closed meanwhile
            continue
        if st.st_rdev == rdev and stat.S_ISBLK(st.st_mode):
            return True
    return False


def _command(proc_dir: str) -> str:
    try:
        with open(f"{proc_dir}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"
