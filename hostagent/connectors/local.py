"""``local``: a block device already present on the host, through os-brick's LocalConnector.

A device is keyed by what the kernel knows it as (its number, named
``/dev/<kernel name>``), so a second node or a bind mount of the same device
is the same connection, and every conflict rule and the refcount see one
device. A device the host itself uses (mounted, swap, held exclusively, or
under something that is) is refused before anything is touched, and so is
one outside the operator's ``[local] allowed_devices``.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from os_brick.initiator.connectors.local import LocalConnector as BrickLocalConnector

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
    os_brick_errors,
)
from hostagent.host.host_use import BlockDevice, allowed, host_uses, identify

DEV_ROOT = "/dev/"


def canonical_block_device(device_path: object) -> str:
    """Resolve ``device_path`` to a real block device under /dev, or raise InvalidTarget.

    Symlinks are followed (``/dev/disk/by-id/...`` is fine) but the end of the
    chain must stay under /dev: regular files, ``..`` tricks and links out of
    /dev are refused before anything is opened.
    """
    if not isinstance(device_path, str) or not device_path:
        raise InvalidTarget("connection_info.data.device_path must be a non-empty string")
    if "\x00" in device_path or not device_path.startswith("/"):
        raise InvalidTarget(f"device_path {device_path!r} must be an absolute path")
    real = os.path.realpath(device_path)
    if not real.startswith(DEV_ROOT):
        raise InvalidTarget(f"device_path {device_path!r} resolves to {real!r}, outside /dev")
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:
        raise InvalidTarget(f"device_path {device_path!r}: {exc.strerror}") from None
    if not stat.S_ISBLK(mode):
        raise InvalidTarget(f"device_path {device_path!r} ({real}) is not a block device")
    return real


class LocalConnector:
    """A host block device that needs no login: connect checks it, disconnect is a no-op."""

    driver_volume_type: ClassVar[str] = "local"

    def __init__(self, brick: Any | None = None, *, allowed_devices: tuple[str, ...] = ()) -> None:
        self._brick = brick if brick is not None else BrickLocalConnector(root_helper=None)
        self._allowed_devices = allowed_devices

    @classmethod
    def configured(cls, settings: ConnectorSettings, secrets: SecretKeeper | None) -> Self:
        return cls(allowed_devices=settings.local_allowed_devices)

    def parse_target(self, data: Mapping[str, Any]) -> Target:
        given = data.get("device_path")
        real = canonical_block_device(given)
        disk_format = data.get("format", "raw")
        if not isinstance(disk_format, str):
            raise InvalidTarget("connection_info.data.format must be a string")
        device = identify(real)
        if device is None:
            raise InvalidTarget(f"device_path {given!r} ({real}): the kernel does not name it")
        if not allowed(device, real, self._allowed_devices):
            raise InvalidTarget(
                f"device_path {given!r} ({device.path}) is not in [local] allowed_devices"
            )
        reasons = host_uses(device, real)
        if reasons:
            raise InvalidTarget(
                f"device_path {given!r} ({device.path}) is used by the host itself: "
                f"{'; '.join(reasons)}"
            )
        return _keyed(device, real, disk_format)

    @staticmethod
    def canonical(target: Target) -> Target:
        """A stored target under its kernel identity (older versions keyed a device
        by its resolved path); unchanged if the device is not there now."""
        path = str(target.properties["device_path"])
        device = identify(path)
        if device is None:
            return target
        return _keyed(device, path, target.disk_format)

    def guard(self, target: Target) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def connect(self, target: Target) -> HostDevice:
        try:
            info = self._brick.connect_volume(dict(target.properties))
            path = canonical_block_device(info["path"])
        except (InvalidTarget, OSError, ValueError, KeyError) as exc:
            raise ConnectorError(
                f"local device {target.properties['device_path']}: {exc}"
            ) from exc
        return HostDevice(path=path, device_info=dict(info))

    def disconnect(self, target: Target, device: HostDevice) -> None:
        with os_brick_errors(f"releasing local device {device.path}", target.properties):
            self._brick.disconnect_volume(dict(target.properties), dict(device.device_info))

    def extend(self, target: Target, device: HostDevice, new_size: int | None) -> int:
        """The device's size now: a local device grows by its owner's hand
        (``losetup -c``, an LV resize), there is nothing to rescan."""
        path = device.path or str(target.properties["device_path"])
        try:
            return block_device_size(path)
        except OSError as exc:
            raise ConnectorError(f"reading the size of local device {path}: {exc}") from exc

    @staticmethod
    def disk_source(target: Target, device: HostDevice) -> BlockDiskSource | None:
        return connected_block_device(device)

    @staticmethod
    def offline_disk_source(target: Target) -> BlockDiskSource:
        """The device itself: parse_target resolved it already."""
        return BlockDiskSource(str(target.properties["device_path"]))


def _keyed(device: BlockDevice, node: str, disk_format: str) -> Target:
    """The target of ``device``: keyed, and given to guests, by its kernel name
    (``node``, the path that led to it, only if the kernel's node is missing)."""
    kernel_node = identify(device.path)
    path = device.path if kernel_node == device else node
    return Target(
        driver_volume_type=LocalConnector.driver_volume_type,
        connection_key=f"local:{device.path}",
        properties={"device_path": path},
        disk_format=disk_format,
    )
