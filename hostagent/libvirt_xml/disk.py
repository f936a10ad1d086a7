"""libvirt domain XML for disks and controllers, as pure data (no policy here).

Each field declares its xpath once; ``xmlmodel`` uses it both to format the
``<disk>`` we attach and to parse the live domain XML libvirt returns.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lxml import etree

from hostagent.libvirt_xml.xmlmodel import (
    XmlModel,
    attr,
    child,
    children,
    flag,
    int_attr,
    int_text,
    parse_xml,
    text,
)

__all__ = [
    "ControllerSpec",
    "DiskRef",
    "DiskSpec",
    "DomainDevices",
    "DomainDiskRefs",
    "DriveAddress",
    "IoTune",
    "SourceHost",
    "disk_fragment",
    "parse_disk_refs",
    "parse_domain",
]


@dataclass(frozen=True)
class DriveAddress(XmlModel):
    """``<address type='drive' .../>``: where a disk sits on a SCSI controller."""

    XML_ROOT = "address[@type='drive']"

    controller: int = field(metadata=int_attr("./@controller"))
    bus: int = field(metadata=int_attr("./@bus"))
    target: int = field(metadata=int_attr("./@target"))
    unit: int = field(metadata=int_attr("./@unit"))


@dataclass(frozen=True)
class SourceHost(XmlModel):
    """``<host name= port=/>`` under a network disk's ``<source>`` (e.g. a Ceph monitor)."""

    XML_ROOT = "host"

    name: str = field(metadata=attr("./@name"))
    port: str | None = field(default=None, metadata=attr("./@port"))


@dataclass(frozen=True)
class IoTune(XmlModel):
    """``<iotune>``: QEMU's I/O limits of one guest disk, each in bytes or
    operations per second (``_max``: the burst, ``_max_length``: its seconds)."""

    XML_ROOT = "iotune"

    total_bytes_sec: int | None = field(default=None, metadata=int_text("./total_bytes_sec"))
    read_bytes_sec: int | None = field(default=None, metadata=int_text("./read_bytes_sec"))
    write_bytes_sec: int | None = field(default=None, metadata=int_text("./write_bytes_sec"))
    total_iops_sec: int | None = field(default=None, metadata=int_text("./total_iops_sec"))
    read_iops_sec: int | None = field(default=None, metadata=int_text("./read_iops_sec"))
    write_iops_sec: int | None = field(default=None, metadata=int_text("./write_iops_sec"))
    total_bytes_sec_max: int | None = field(
        default=None, metadata=int_text("./total_bytes_sec_max")
    )
    read_bytes_sec_max: int | None = field(default=None, metadata=int_text("./read_bytes_sec_max"))
    write_bytes_sec_max: int | None = field(
        default=None, metadata=int_text("./write_bytes_sec_max")
    )
    total_iops_sec_max: int | None = field(default=None, metadata=int_text("./total_iops_sec_max"))
    read_iops_sec_max: int | None = field(default=None, metadata=int_text("./read_iops_sec_max"))
    write_iops_sec_max: int | None = field(default=None, metadata=int_text("./write_iops_sec_max"))
    total_bytes_sec_max_length: int | None = field(
        default=None, metadata=int_text("./total_bytes_sec_max_length")
    )
    read_bytes_sec_max_length: int | None = field(
        default=None, metadata=int_text("./read_bytes_sec_max_length")
    )
    write_bytes_sec_max_length: int | None = field(
        default=None, metadata=int_text("./write_bytes_sec_max_length")
    )
    total_iops_sec_max_length: int | None = field(
        default=None, metadata=int_text("./total_iops_sec_max_length")
    )
    read_iops_sec_max_length: int | None = field(
        default=None, metadata=int_text("./read_iops_sec_max_length")
    )
    write_iops_sec_max_length: int | None = field(
        default=None, metadata=int_text("./write_iops_sec_max_length")
    )
    size_iops_sec: int | None = field(default=None, metadata=int_text("./size_iops_sec"))

    def limits(self) -> dict[str, int]:
        """The limits that are set, by libvirt's (and Cinder's) name."""
        return {name: value for name, value in vars(self).items() if value is not None}


@dataclass(frozen=True)
class DiskSpec(XmlModel):
    """One ``<disk>`` element: what we attach, or what a live domain already has."""

    XML_ROOT = "disk"

    disk_type: str = field(metadata=attr("./@type"))
    device: str = field(default="disk", metadata=attr("./@device"))
    driver_name: str | None = field(default="qemu", metadata=attr("./driver/@name"))
    driver_type: str | None = field(default=None, metadata=attr("./driver/@type"))
    driver_cache: str | None = field(default=None, metadata=attr("./driver/@cache"))
    driver_io: str | None = field(default=None, metadata=attr("./driver/@io"))
    driver_discard: str | None = field(default=None, metadata=attr("./driver/@discard"))
    source_dev: str | None = field(default=None, metadata=attr("./source/@dev"))
    source_file: str | None = field(default=None, metadata=attr("./source/@file"))
    source_protocol: str | None = field(default=None, metadata=attr("./source/@protocol"))
    source_name: str | None = field(default=None, metadata=attr("./source/@name"))
    # Only hosts with a name: an NBD unix-socket host has none and is not ours to model.
    source_hosts: tuple[SourceHost, ...] = field(
        default=(), metadata=children("./source/host[@name]", SourceHost)
    )
    auth_username: str | None = field(default=None, metadata=attr("./auth/@username"))
    auth_secret_type: str | None = field(default=None, metadata=attr("./auth/secret/@type"))
    auth_secret_uuid: str | None = field(default=None, metadata=attr("./auth/secret/@uuid"))
    target_dev: str | None = field(default=None, metadata=attr("./target/@dev"))
    target_bus: str | None = field(default=None, metadata=attr("./target/@bus"))
    readonly: bool = field(default=False, metadata=flag("./readonly"))
    shareable: bool = field(default=False, metadata=flag("./shareable"))
    serial: str | None = field(default=None, metadata=text("./serial"))
    iotune: IoTune | None = field(default=None, metadata=child("./iotune", IoTune))
    alias: str | None = field(default=None, metadata=attr("./alias/@name"))
    # A virtio disk's <address type='pci'> is not a drive address and reads as None.
    address: DriveAddress | None = field(
        default=None, metadata=child("./address[@type='drive']", DriveAddress)
    )


@dataclass(frozen=True)
class ControllerSpec(XmlModel):
    """``<controller type= index= model=/>``: we only need to find virtio-scsi ones."""

    XML_ROOT = "controller"

    controller_type: str = field(metadata=attr("./@type"))
    index: int = field(metadata=int_attr("./@index"))
    model: str | None = field(default=None, metadata=attr("./@model"))


@dataclass(frozen=True)
class DomainDevices(XmlModel):
    """The parts of a domain's XML that attach/detach decisions look at."""

    XML_ROOT = "domain"

    uuid: str = field(metadata=text("./uuid"))
    name: str = field(metadata=text("./name"))
    disks: tuple[DiskSpec, ...] = field(default=(), metadata=children("./devices/disk", DiskSpec))
    controllers: tuple[ControllerSpec, ...] = field(
        default=(), metadata=children("./devices/controller", ControllerSpec)
    )

    def disk_by_alias(self, alias: str) -> DiskSpec | None:
        """The disk whose ``<alias name=>`` is ``alias``, if the domain has one."""
        return next((disk for disk in self.disks if disk.alias == alias), None)

    def scsi_controller_indexes(self) -> tuple[int, ...]:
        """Indexes of the virtio-scsi controllers, sorted: where drive addresses may point."""
        return tuple(
            sorted(
                c.index
                for c in self.controllers
                if c.controller_type == "scsi" and c.model == "virtio-scsi"
            )
        )


def _as_in_disk_spec(name: str) -> Mapping[str, Any]:
    """The metadata of DiskSpec's field ``name``: a slimmer view reuses the declaration."""
    return DiskSpec.__dataclass_fields__[name].metadata


# Where a ``DiskRef``'s source sits in its disk, when it is not the disk's own
# ``<source>``: a layer of the backing chain, or the ``<mirror>`` of a job under
# way: a block copy's destination and its own chain, or an active commit's base.
DiskLayer = Literal["backing chain", "block copy", "block commit"]


@dataclass(frozen=True)
class DiskRef(XmlModel):
    """What a ``<disk>`` uses and how it is named: DiskSpec's declarations for just
    these fields, so scanning every domain for a device reads a fifth as much.

    ``layer`` has no XML path: ``parse_disk_refs`` sets it on the one more
    ``DiskRef`` it makes for each backing layer and block-copy source.
    """

    XML_ROOT = "disk"

    alias: str | None = field(default=None, metadata=_as_in_disk_spec("alias"))
    target_dev: str | None = field(default=None, metadata=_as_in_disk_spec("target_dev"))
    source_dev: str | None = field(default=None, metadata=_as_in_disk_spec("source_dev"))
    source_file: str | None = field(default=None, metadata=_as_in_disk_spec("source_file"))
    source_protocol: str | None = field(default=None, metadata=_as_in_disk_spec("source_protocol"))
    source_name: str | None = field(default=None, metadata=_as_in_disk_spec("source_name"))
    layer: DiskLayer | None = None  # None: the disk's own <source>


@dataclass(frozen=True)
class DomainDiskRefs(XmlModel):
    """The disks of a domain as ``DiskRef``s."""

    XML_ROOT = "domain"

    disks: tuple[DiskRef, ...] = field(default=(), metadata=children("./devices/disk", DiskRef))

    def has_alias(self, alias: str) -> bool:
        return any(disk.alias == alias for disk in self.disks)


# The disks that may have a layer, found in one look: every disk ``_layers``
# could yield a source for has a <mirror> or a backingStore/source, so this is
# a superset of the disks with layers (a test holds the two to that).
_LAYERED_DISKS = etree.XPath("./devices/disk[mirror or backingStore/source]")


def parse_disk_refs(xml: str | bytes) -> DomainDiskRefs:
    """Parse only what each disk of a domain uses and how it is named: each
    disk's own source, then one more ``DiskRef`` (the same alias and target)
    for every backing layer and block-copy destination it has."""
    root = parse_xml(xml)
    refs = DomainDiskRefs.from_element(root)
    # one look for the few disks with layers (most have none, or an empty
    # <backingStore/>), then a walk of only those
    if not _LAYERED_DISKS(root):
        return refs
    disks: list[DiskRef] = []
    for ref, element in zip(refs.disks, root.iterfind("./devices/disk"), strict=True):
        disks.append(ref)
        disks += (_layer_ref(ref, source, layer) for source, layer in _layers(element))
    return DomainDiskRefs(disks=tuple(disks))


def _layers(disk: etree._Element) -> Iterator[tuple[etree._Element, DiskLayer]]:
    """Beside its own source, a disk uses every layer of its backing chain (a
    qcow2 overlay on a block device, as an external snapshot makes: libvirt
    writes the chain it found into the live XML) and the destination of a
    block copy under way (``<mirror>``, with a chain of its own). A source is
    given once: an active commit's ``<mirror>`` names its base, which the chain
    already gave."""
    given = {_identity(source) for source in disk.iterfind("source")}
    mirror = disk.find("mirror")
    job: DiskLayer = (
        "block commit"
        if mirror is not None and mirror.get("job") == "active-commit"
        else "block copy"
    )
    layers: list[tuple[etree._Element, DiskLayer]] = [
        (source, "backing chain") for source in _chain(disk)
    ]
    if mirror is not None:
        if (destination := mirror.find("source")) is not None:
            layers.append((destination, job))
        layers += ((source, job) for source in _chain(mirror))
    for source, layer in layers:
        if (identity := _identity(source)) not in given:
            given.add(identity)
            yield source, layer


def _identity(source: etree._Element) -> tuple[str | None, ...]:
    return (source.get("dev"), source.get("file"), source.get("protocol"), source.get("name"))


def _chain(holder: etree._Element) -> Iterator[etree._Element]:
    layer = holder.find("backingStore")
    while layer is not None and (source := layer.find("source")) is not None:
        yield source
        layer = layer.find("backingStore")


def _layer_ref(disk: DiskRef, source: etree._Element, layer: DiskLayer) -> DiskRef:
    """A backing layer's or block-copy source's ``<source>``, named as its disk."""
    return DiskRef(
        alias=disk.alias,
        target_dev=disk.target_dev,
        source_dev=source.get("dev"),
        source_file=source.get("file"),
        source_protocol=source.get("protocol"),
        source_name=source.get("name"),
        layer=layer,
    )


def disk_fragment(domain_xml: str | bytes, alias: str) -> str | None:
    """The ``<disk>`` element with user alias ``alias``, as libvirt wrote it, or None."""
    root = parse_xml(domain_xml)
    for disk in root.iterfind("./devices/disk"):
        found = disk.find("./alias")
        if found is not None and found.get("name") == alias:
            return etree.tostring(disk, encoding="unicode").strip()
    return None


def parse_domain(xml: str | bytes) -> DomainDevices:
    """Parse ``virDomainGetXMLDesc`` output (live or inactive) into ``DomainDevices``."""
    return DomainDevices.from_element(parse_xml(xml))
