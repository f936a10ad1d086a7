"""The rules for the disks we attach: a validated request in, a ``DiskSpec`` out.

``disk.py`` only describes XML; every decision (cache mode, io mode, which
formats may be shared, which bus gets which name and address) is made here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Final

from hostagent.libvirt_xml.disk import DiskSpec, DriveAddress, IoTune, SourceHost

__all__ = [
    "BUS_TARGET_PREFIX",
    "BlockSource",
    "DiskPolicyError",
    "DiskRequest",
    "NetworkSource",
    "build_disk",
    "user_alias",
]


class DiskPolicyError(ValueError):
    """A request the rules refuse; message is shown to the API caller (HTTP 400)."""


@dataclass(frozen=True)
class BlockSource:
    """A host block device, e.g. the multipath device os-brick connected."""

    dev: str


@dataclass(frozen=True)
class NetworkSource:
    """A disk QEMU opens itself over the network, e.g. an RBD image."""

    protocol: str
    name: str
    hosts: tuple[SourceHost, ...]
    auth_username: str | None = None
    secret_type: str | None = None
    secret_uuid: str | None = None


@dataclass(frozen=True)
class DiskRequest:
    """What the caller asked for, already mapped from the API and the connector."""

    attachment_id: str
    serial: str
    source: BlockSource | NetworkSource
    multiattach: bool
    mode: str  # 'rw' | 'ro'
    bus: str  # 'scsi' | 'virtio'
    disk_format: str  # 'raw', 'qcow2', ...
    target_dev: str
    address: DriveAddress | None  # required for bus scsi, must be None for virtio
    iotune: IoTune | None = None  # the guest disk's own I/O limits
    discard: bool = False  # pass the guest's discards (TRIM/UNMAP) to the storage


# Guest device name prefix per bus; placement.py names devices from the same table.
BUS_TARGET_PREFIX: Final[Mapping[str, str]] = MappingProxyType({"scsi": "sd", "virtio": "vd"})

MODES: Final = ("rw", "ro")
FORMATS: Final = ("raw", "qcow2")
# Shared writers need a format without metadata that each opener caches and rewrites.
SHAREABLE_FORMAT: Final = "raw"
USER_ALIAS_PREFIX: Final = "ua-"
# libvirt keeps a user alias only if it uses these characters.
_ALIAS_ID_RE = re.compile(r"[A-Za-z0-9_-]+")
# libvirt's RNG (diskSerial) and QEMU accept only these characters in a serial.
_SERIAL_RE = re.compile(r"[A-Za-z0-9_.+\- ]+")
# QEMU (and libvirt's schema) take a total limit or read/write ones, never both.
_IOTUNE_GROUPS: Final = tuple(
    f"{{}}_{kind}_sec{suffix}"
    for suffix in ("", "_max", "_max_length")
    for kind in ("bytes", "iops")
)


def user_alias(attachment_id: str) -> str:
    """The libvirt user alias (``ua-`` prefix) that names our disk in the domain."""
    if not _ALIAS_ID_RE.fullmatch(attachment_id):
        raise DiskPolicyError(
            f"attachment_id {attachment_id!r} must be non-empty and use only "
            "letters, digits, '_' and '-' (it becomes a libvirt device alias)"
        )
    return USER_ALIAS_PREFIX + attachment_id


def build_disk(request: DiskRequest) -> DiskSpec:
    """Apply the rules to ``request``; raise ``DiskPolicyError`` if it breaks one."""
    _check_mode(request.mode)
    _check_format(request.disk_format, request.multiattach)
    _check_bus_placement(request.bus, request.target_dev, request.address)
    _check_serial(request.serial)
    _check_iotune(request.iotune)
    common = DiskSpec(
        disk_type="block",
        driver_name="qemu",
        driver_type=request.disk_format,
        # No host page cache: required for shared disks and for io='native'.
        driver_cache="none",
        driver_discard="unmap" if request.discard else None,
        iotune=request.iotune if request.iotune and request.iotune.limits() else None,
        target_dev=request.target_dev,
        target_bus=request.bus,
        readonly=request.mode == "ro",
        shareable=request.multiattach,
        serial=request.serial,
        alias=user_alias(request.attachment_id),
        address=request.address,
    )
    return _with_source(common, request.source)


def _with_source(common: DiskSpec, source: BlockSource | NetworkSource) -> DiskSpec:
    if isinstance(source, BlockSource):
        return replace(common, disk_type="block", driver_io="native", source_dev=source.dev)
    auth = (source.auth_username, source.secret_type, source.secret_uuid)
    if any(auth) and not all(auth):
        raise DiskPolicyError(
            "network disk auth needs auth_username, secret_type and secret_uuid together"
        )
    return replace(
        common,
        disk_type="network",
        source_protocol=source.protocol,
        source_name=source.name,
        source_hosts=source.hosts,
        auth_username=source.auth_username,
        auth_secret_type=source.secret_type,
        auth_secret_uuid=source.secret_uuid,
    )


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise DiskPolicyError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")


def _check_format(disk_format: str, multiattach: bool) -> None:
    if multiattach and disk_format != SHAREABLE_FORMAT:
        raise DiskPolicyError(
            f"a multiattach (shareable) disk must be {SHAREABLE_FORMAT!r}, not {disk_format!r}"
        )
    if disk_format not in FORMATS:
        raise DiskPolicyError(
            f"disk format must be one of {', '.join(FORMATS)}, not {disk_format!r}"
        )


def _check_iotune(iotune: IoTune | None) -> None:
    limits = iotune.limits() if iotune is not None else {}
    for group in _IOTUNE_GROUPS:
        total, split = group.format("total"), [group.format(w) for w in ("read", "write")]
        if total in limits and any(name in limits for name in split):
            raise DiskPolicyError(
                f"I/O limits: {total} cannot be combined with {' or '.join(split)}"
            )


def _check_serial(serial: str) -> None:
    if not _SERIAL_RE.fullmatch(serial):
        raise DiskPolicyError(
            f"serial {serial!r} must be non-empty and use only "
            "letters, digits, space and '_', '.', '+', '-'"
        )


def _check_bus_placement(bus: str, target_dev: str, address: DriveAddress | None) -> None:
    prefix = BUS_TARGET_PREFIX.get(bus)
    if prefix is None:
        raise DiskPolicyError(f"bus must be one of {', '.join(BUS_TARGET_PREFIX)}, not {bus!r}")
    if not re.fullmatch(f"{prefix}[a-z]+", target_dev):
        raise DiskPolicyError(
            f"target_dev for bus {bus!r} must look like {prefix}a, {prefix}b, ..., "
            f"not {target_dev!r}"
        )
    if bus == "scsi" and address is None:
        raise DiskPolicyError("a scsi disk needs an explicit drive address")
    if bus != "scsi" and address is not None:
        raise DiskPolicyError(f"a drive address is only for scsi disks, not bus {bus!r}")
