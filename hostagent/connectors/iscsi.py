"""``iscsi``: a LUN reached through the kernel initiator, by os-brick's ISCSIConnector.

The connection key names the LUN by every (portal, IQN, LUN) path to it,
sorted and with the default port filled in, so the same LUN reached with
portals in another order, or as ``target_portal`` instead of a one-element
``target_portals``, is one connection. CHAP credentials travel in the
properties (never in a log line or an error message) because os-brick needs
them again to log out.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from os_brick.initiator.connectors.iscsi import ISCSIConnector as BrickISCSIConnector
from os_brick.initiator.utils import guard_connection

from hostagent.connectors.base import (
    BlockDiskSource,
    ConnectorError,
    ConnectorSettings,
    HostDevice,
    InvalidTarget,
    SecretKeeper,
    Target,
    block_device_size,
    connected_block_device,
    named_block_device,
    os_brick_errors,
)

DEFAULT_PORT = 3260
_IQN = re.compile(
    r"^(iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[^\s]+)?|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$"
)
_HOST = re.compile(r"^[A-Za-z0-9.-]{1,253}$")
MAX_LUN = 16383
_GUARD_KEYS = ("shared_targets", "service_uuid")


def canonical_portal(portal: object) -> str:
    """``host:port`` (``[v6]:port``) with the default port filled in; InvalidTarget if odd."""
    if not isinstance(portal, str) or not portal:
        raise InvalidTarget("an iSCSI portal must be a non-empty string like 192.0.2.5:3260")
    match = re.fullmatch(
        r"\[(?P<v6>[^\]]+)\](?::(?P<p6>\d+))?|(?P<host>[^:]+)(?::(?P<port>\d+))?", portal
    )
    if match is None:
        raise InvalidTarget(f"iSCSI portal {portal!r} is not host:port")
    host = match["v6"] or match["host"]
    port = int(match["p6"] or match["port"] or DEFAULT_PORT)
    if not 0 < port < 65536:
        raise InvalidTarget(f"iSCSI portal {portal!r} has no valid port")
    if match["v6"]:
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise InvalidTarget(f"iSCSI portal {portal!r} has no valid IPv6 address") from None
        return f"[{host}]:{port}"
    if not _HOST.fullmatch(host):
        raise InvalidTarget(f"iSCSI portal {portal!r} has no valid host")
    return f"{host.lower()}:{port}"


def _iqn(value: object) -> str:
    if not isinstance(value, str) or not _IQN.fullmatch(value):
        raise InvalidTarget(f"{value!r} is not an iSCSI qualified name (iqn., eui. or naa.)")
    return value


def _lun(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LUN:
        raise InvalidTarget(f"iSCSI LUN {value!r} must be an integer from 0 to {MAX_LUN}")
    return value


@dataclass(frozen=True, order=True)
class ISCSIPath:
    """One way to the LUN: a portal, the target's IQN and the LUN number there."""

    portal: str
    iqn: str
    lun: int

    def by_path_link(self) -> str:
        """udev's name for the LUN reached this way (it survives /dev/sdX renumbering)."""
        return f"/dev/disk/by-path/ip-{self.portal}-iscsi-{self.iqn}-lun-{self.lun}"


def _paths(data: Mapping[str, Any], multipath: bool) -> list[ISCSIPath]:
    """Every path the properties name, validated and canonical."""
    plural = all(k in data for k in ("target_portals", "target_iqns", "target_luns"))
    if plural and (multipath or "target_portal" not in data):
        portals, iqns, luns = data["target_portals"], data["target_iqns"], data["target_luns"]
        if not all(isinstance(v, list) for v in (portals, iqns, luns)) or not portals:
            raise InvalidTarget("target_portals, target_iqns, target_luns must be non-empty lists")
        if not len(portals) == len(iqns) == len(luns):
            raise InvalidTarget("target_portals, target_iqns, target_luns differ in length")
        return [
            ISCSIPath(canonical_portal(p), _iqn(i), _lun(n))
            for p, i, n in zip(portals, iqns, luns, strict=True)
        ]
    missing = [k for k in ("target_portal", "target_iqn", "target_lun") if k not in data]
    if missing:
        raise InvalidTarget(f"iSCSI connection_info.data lacks {', '.join(missing)}")
    return [
        ISCSIPath(
            canonical_portal(data["target_portal"]),
            _iqn(data["target_iqn"]),
            _lun(data["target_lun"]),
        )
    ]


def _connection_key(paths: Sequence[ISCSIPath]) -> str:
    """The LUN's key: every path to it, sorted, each once."""
    return "iscsi:" + ",".join(f"{p.portal}/{p.iqn}/{p.lun}" for p in sorted(set(paths)))


def target_paths(target: Target) -> tuple[ISCSIPath, ...]:
    """The paths the target was connected by: those of the properties' single
    or multipath form, whichever made its key (the daemon's multipath setting
    may have changed since); empty if neither did."""
    for multipath in (False, True):
        with contextlib.suppress(InvalidTarget):
            paths = _paths(target.properties, multipath)
            if _connection_key(paths) == target.connection_key:
                return tuple(sorted(set(paths)))
    return ()


def _check_auth(data: Mapping[str, Any]) -> None:
    method = data.get("auth_method")
    if method is None:
        return
    if method != "CHAP":
        raise InvalidTarget(f"auth_method {method!r} is not supported (only CHAP)")
    for field in ("auth_username", "auth_password"):
        if not isinstance(data.get(field), str) or not data[field]:
            raise InvalidTarget(f"CHAP needs a non-empty {field}")


def stable_path(target: Target, info: Mapping[str, Any]) -> str:
    """The name to give guests: a udev link that survives /dev/sdX renumbering
    (os-brick reports the kernel name): /dev/mapper/<wwid> for multipath, the
    by-path link for a single path, when it points at the same device."""
    path = str(info["path"])
    real = os.path.realpath(path)
    candidates = []
    if info.get("multipath_id"):
        candidates.append(f"/dev/mapper/{info['multipath_id']}")
    paths = target_paths(target)
    if len(paths) == 1:
        candidates.append(paths[0].by_path_link())
    for candidate in candidates:
        if os.path.exists(candidate) and os.path.realpath(candidate) == real:
            return candidate
    return path


class ISCSIConnector:
    """iSCSI LUNs, single path or multipath, optionally with CHAP."""

    driver_volume_type: ClassVar[str] = "iscsi"

    def __init__(self, *, use_multipath: bool = False, brick: Any | None = None) -> None:
        self.use_multipath = use_multipath
        self._brick = (
            brick
            if brick is not None
            else BrickISCSIConnector(root_helper=None, use_multipath=use_multipath)
        )

    @classmethod
    def configured(cls, settings: ConnectorSettings, secrets: SecretKeeper | None) -> Self:
        return cls(use_multipath=settings.iscsi_use_multipath)

    def parse_target(self, data: Mapping[str, Any]) -> Target:
        paths = _paths(data, self.use_multipath)
        _check_auth(data)
        disk_format = data.get("format", "raw")
        if not isinstance(disk_format, str):
            raise InvalidTarget("connection_info.data.format must be a string")
        properties = dict(data)  # os-brick wants Cinder's shape back, CHAP included
        if len(paths) == 1 and "target_portal" in data:
            properties["target_portal"] = paths[0].portal
        return Target(self.driver_volume_type, _connection_key(paths), properties, disk_format)

    @contextlib.contextmanager
    def guard(self, target: Target) -> Iterator[None]:
        """os-brick's lock for targets shared by several volumes of one backend
        (Cinder's tri-state ``shared_targets`` with ``service_uuid``)."""
        if all(k in target.properties for k in _GUARD_KEYS) and target.properties["service_uuid"]:
            with guard_connection({k: target.properties[k] for k in _GUARD_KEYS}):
                yield
        else:
            yield

    def connect(self, target: Target) -> HostDevice:
        with os_brick_errors(f"iSCSI login to {target.connection_key}", target.properties):
            info = self._brick.connect_volume(dict(target.properties))
        if not info or not info.get("path"):
            raise ConnectorError(f"iSCSI {target.connection_key}: os-brick found no device")
        return HostDevice(path=stable_path(target, info), device_info=dict(info))

    def disconnect(self, target: Target, device: HostDevice) -> None:
        """Flush and log out; a failed flush fails the detach (force=False), it
        never loses data."""
        with os_brick_errors(f"iSCSI logout of {target.connection_key}", target.properties):
            self._brick.disconnect_volume(
                dict(target.properties), dict(device.device_info), force=False
            )

    def extend(self, target: Target, device: HostDevice, new_size: int | None) -> int:
        """Rescan every path of the LUN (and resize its multipath map) with
        os-brick's extend_volume; the size it reports, else the device's."""
        with os_brick_errors(f"iSCSI rescan of {target.connection_key}", target.properties):
            size = self._brick.extend_volume(dict(target.properties))
        if isinstance(size, int) and not isinstance(size, bool):
            return size
        if device.path is None:
            raise ConnectorError(f"iSCSI {target.connection_key}: no device to read the size of")
        try:
            return block_device_size(device.path)
        except OSError as exc:
            raise ConnectorError(f"reading the size of {device.path}: {exc}") from exc

    @staticmethod
    def canonical(target: Target) -> Target:
        return target

    @staticmethod
    def disk_source(target: Target, device: HostDevice) -> BlockDiskSource | None:
        return connected_block_device(device)

    @staticmethod
    def offline_disk_source(target: Target) -> BlockDiskSource:
        """The by-path link of a single-path LUN (or a device_path nova recorded);
        a multipath device is named only when it appears."""
        named = named_block_device(target)
        if named is not None:
            return named
        paths = target_paths(target)
        if len(paths) != 1:
            raise InvalidTarget(
                f"offline rendering cannot know the device of this {target.driver_volume_type} "
                "target (multipath devices are named when they appear)"
            )
        return BlockDiskSource(paths[0].by_path_link())
