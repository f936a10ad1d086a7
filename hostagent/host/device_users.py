"""The check before every disconnect: who still uses a connection's device.

API.md's rule that no input can break: a host connection is never
disconnected while a domain (live XML or persistent config) names its
device, whatever the agent's records say. A process that holds the device
open counts too (a QEMU left with a disk libvirt lost track of when libvirtd
was killed in the middle of a hot-plug).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from hostagent.connectors import (
    BlockDiskSource,
    HostDevice,
    NetworkDiskSource,
    Target,
    disk_source,
)
from hostagent.guests.domain_scan import DomainDisk, DomainScan
from hostagent.host.holders import device_number, processes_holding
from hostagent.libvirt_xml.disk import DiskLayer, DiskRef
from hostagent.state.records import ConnectionRecord


@dataclass(frozen=True)
class DeviceReference:
    """A disk of a domain that uses a host device."""

    domain_uuid: str
    domain_name: str
    where: Literal["live", "config"]
    alias: str | None
    target_dev: str | None
    source: str
    layer: DiskLayer | None  # None: the disk's own source

    @property
    def use(self) -> str:
        """How the disk uses the source, for an operator: "as sdb", "in the
        backing chain of sdb"."""
        disk = self.target_dev or self.alias or "a disk"
        return f"as {disk}" if self.layer is None else f"in the {self.layer} of {disk}"


# The device number of each disk source path seen in one pass (None: not a block device).
DeviceNumbers = dict[str, int | None]


class HostDeviceMatcher:
    """Matches disk sources against one host block device."""

    def __init__(self, device_path: str) -> None:
        self.device_path = device_path
        self._real = os.path.realpath(device_path)
        self._rdev = device_number(device_path)

    def matches(self, disk: DiskRef, numbers: DeviceNumbers | None = None) -> bool:
        """``numbers`` keeps each source's device number for one pass over many
        connections (a stat per source, not per source and connection)."""
        for source in (disk.source_dev, disk.source_file):
            if not source:
                continue
            if source == self.device_path:
                return True
            # By device number while the node exists (a stat: every other name
            # of the device, whatever the path), else by the path it resolves to.
            if self._rdev is not None:
                if numbers is None:
                    number = device_number(source)
                elif source in numbers:
                    number = numbers[source]
                else:
                    number = numbers[source] = device_number(source)
                if number == self._rdev:
                    return True
            elif os.path.realpath(source) == self._real:
                return True
        return False


class NetworkDiskMatcher:
    """Matches network disks (protocol and name, e.g. a Ceph pool/image)."""

    def __init__(self, protocol: str, name: str) -> None:
        self.protocol = protocol
        self.name = name

    def matches(self, disk: DiskRef, numbers: DeviceNumbers | None = None) -> bool:
        return disk.source_protocol == self.protocol and disk.source_name == self.name


DiskMatcher = HostDeviceMatcher | NetworkDiskMatcher


def target_of(connection: ConnectionRecord) -> tuple[Target, HostDevice]:
    """The connector's view of a recorded connection: its target and host device."""
    target = Target(
        driver_volume_type=connection.driver_volume_type,
        connection_key=connection.connection_key,
        properties=connection.connection_data,
        disk_format=connection.disk_format,
    )
    device = HostDevice(path=connection.device_path, device_info=connection.device_info or {})
    return target, device


def matcher_for(connection: ConnectionRecord) -> DiskMatcher | None:
    """How to recognise a connection's disk in a domain's XML: by what its
    connector says a guest's disk names, or None if it names nothing yet."""
    source = disk_source(*target_of(connection))
    if isinstance(source, BlockDiskSource):
        return HostDeviceMatcher(source.path)
    if isinstance(source, NetworkDiskSource):
        return NetworkDiskMatcher(source.protocol, source.name)
    return None


def references_in(
    disks: list[DomainDisk], matcher: DiskMatcher, numbers: DeviceNumbers | None = None
) -> list[DeviceReference]:
    """The disks among ``disks`` that ``matcher`` recognises (``numbers``: see
    ``HostDeviceMatcher.matches``)."""
    return [
        DeviceReference(
            domain_uuid=dd.domain.uuid,
            domain_name=dd.domain.name,
            where=dd.where,
            alias=dd.disk.alias,
            target_dev=dd.disk.target_dev,
            source=dd.disk.source_dev or dd.disk.source_file or dd.disk.source_name or "",
            layer=dd.disk.layer,
        )
        for dd in disks
        if matcher.matches(dd.disk, numbers)
    ]


# Our attachments by (domain UUID, alias): the connection key each is on.
OurDisks = Mapping[tuple[str, str], str]


def accounted_for(ref: DeviceReference, ours: OurDisks, connection_key: str) -> bool:
    """Whether an attachment of ours accounts for this use of ``connection_key``'s
    device: its own disk does; a layer of it (a backing chain, a block copy)
    only when that attachment is on this very connection. An operator's block
    copy of our disk onto another of our connections' devices is not ours there."""
    key = ours.get((ref.domain_uuid, ref.alias or ""))
    return key is not None and (ref.layer is None or key == connection_key)


def find_references(scan: DomainScan, matcher: DiskMatcher) -> list[DeviceReference]:
    """Every disk, in any domain's live XML or persistent config, ``matcher``
    recognises. A domain whose kept live XML shows such a disk is looked at
    again in its live XML read now: a kept one can show, for a moment, a disk
    libvirt removed on its own after an unplug (``guests.live_disks``)."""
    snapshot = scan.snapshot()
    refs = references_in(snapshot.disks, matcher)
    shown = {ref.domain_uuid for ref in refs if ref.where == "live"}
    if not (scan.live.caching and shown):
        return refs
    now = references_in(scan.live_now([d for d in snapshot.domains if d.uuid in shown]), matcher)
    return now + [ref for ref in refs if ref.where != "live"]  # a snapshot's order


# A process found holding a device no domain names is looked at again for this
# long before it keeps the connection: closing a device a guest wrote to makes
# udev probe it (blkid, through its inotify watch), and that brief open must
# not turn the last detach into one that never reports terminate_connection.
HOLDER_GRACE_SECONDS = 2.0
HOLDER_POLL_SECONDS = 0.05


def device_users(
    scan: DomainScan,
    connection: ConnectionRecord,
    *,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Who still uses the connection's device: domains (live or config) that
    name it, else processes that hold it open. Empty: safe to disconnect.
    ``monotonic`` and ``sleep`` time the grace given to a brief holder.

    Raises LibvirtUnavailable if libvirt cannot be asked: no answer is never
    taken as "unused".
    """
    matcher = matcher_for(connection)
    if matcher is None:
        return []
    users = _domains_using(scan, matcher)
    if users or connection.device_path is None:
        return users
    # After the domain scan, not beside it: run together, the two contend
    # for the GIL and took longer than one after the other (measured).
    holders = processes_holding(connection.device_path)
    if not holders:
        return []
    # The grace watches only the processes found: a brief holder (udev's
    # probe) is waited out without a walk of every descriptor on the host
    # each time; one full search after it finds any holder that came since.
    deadline = monotonic() + HOLDER_GRACE_SECONDS
    while holders and monotonic() < deadline:
        sleep(HOLDER_POLL_SECONDS)
        holders = processes_holding(connection.device_path, among=[h.pid for h in holders])
    if not holders:
        holders = processes_holding(connection.device_path)
    if holders:
        return [f"process {h.pid} ({h.command}) that holds it open" for h in holders]
    # The grace took up to seconds: a domain may have taken the device
    # meanwhile, and the disconnect must not act on a scan that old.
    return _domains_using(scan, matcher)


def _domains_using(scan: DomainScan, matcher: DiskMatcher) -> list[str]:
    refs = find_references(scan, matcher)
    return [
        f"domain {ref.domain_name} ({ref.where}, disk {ref.alias or ref.target_dev}"
        f"{'' if ref.layer is None else ', its ' + ref.layer})"
        for ref in refs
    ]
