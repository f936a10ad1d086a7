"""The Connector protocol and the typed values that cross it.

A connector turns Cinder's ``connection_info`` into a canonical ``Target``
(validation happens here, before anything is touched), connects it once per
host and disconnects it. It also answers, for its own protocol, what a
guest's disk of a connection names (a ``DiskSource``): the attach renders it,
the check before a disconnect looks for it in every domain. It knows nothing
of libvirt's XML: ``attachments/render.py`` maps a ``DiskSource`` onto it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self


class InvalidTarget(ValueError):
    """connection_info that a connector refuses; the message goes to the caller (400)."""


class ConnectorError(RuntimeError):
    """os-brick failed to connect or disconnect; the message says what it reported."""


class SecretKeeperFailed(ConnectorError):
    """The ``SecretKeeper`` failed a connector's call (libvirt refused, or is
    away); ``cause`` is the keeper's own error, for the caller to report as is."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(frozen=True)
class Target:
    """What to connect, validated: the canonical key plus os-brick's properties."""

    driver_volume_type: str
    connection_key: str
    properties: Mapping[str, Any] = field(repr=False)
    disk_format: str = "raw"


@dataclass(frozen=True)
class HostDevice:
    """What a connect produced: the host block device (None for network disks)
    and os-brick's own device info, kept because disconnect needs it back."""

    path: str | None
    device_info: Mapping[str, Any]


@dataclass(frozen=True)
class BlockDiskSource:
    """A guest's disk on a host block device."""

    path: str


@dataclass(frozen=True)
class NetworkHost:
    """One server a network disk is reached through (a Ceph monitor, say)."""

    name: str
    port: str | None = None


@dataclass(frozen=True)
class NetworkDiskSource:
    """A guest's disk that QEMU opens itself over the network: ``name`` on the
    ``hosts`` of ``protocol``, with the user and the secret holding its key."""

    protocol: str
    name: str
    hosts: tuple[NetworkHost, ...]
    auth_username: str | None = None
    secret_type: str | None = None
    secret_uuid: str | None = None


DiskSource = BlockDiskSource | NetworkDiskSource


def connected_block_device(device: HostDevice) -> BlockDiskSource | None:
    """The host block device a connect produced, if it produced one."""
    return BlockDiskSource(device.path) if device.path is not None else None


def named_block_device(target: Target) -> BlockDiskSource | None:
    """The device ``connection_info`` names itself (``device_path``: the local
    protocol's own, or the one nova records there after its connect)."""
    path = target.properties.get("device_path")
    return BlockDiskSource(path) if isinstance(path, str) else None


# linux/fs.h: _IOR(0x12, 114, size_t), the size of a block device in bytes
BLKGETSIZE64 = 0x80081272


def block_device_size(path: str) -> int:
    """The size the kernel gives the block device at ``path`` now (BLKGETSIZE64);
    raise OSError if it cannot be read."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = fcntl.ioctl(fd, BLKGETSIZE64, bytes(8))
    finally:
        os.close(fd)
    size: int = struct.unpack("@Q", raw)[0]
    return size


@dataclass(frozen=True)
class ConnectorSettings:
    """What the config says about protocols."""

    iscsi_use_multipath: bool = False
    rbd_attach_mode: str = "librbd"
    local_allowed_devices: tuple[str, ...] = ()


class SecretKeeper(Protocol):
    """Where connectors keep credentials QEMU must read: libvirt's secrets."""

    def define_secret(self, uuid: str, usage_name: str, value: bytes) -> None:
        """Define (or redefine) a private, persistent ceph secret with ``value``."""
        ...

    def undefine_secret(self, uuid: str) -> None:
        """Remove the secret; gone already is fine."""
        ...

    def has_secret(self, uuid: str) -> bool: ...


class Connector(Protocol):
    """One storage protocol (a ``driver_volume_type``) on this host."""

    driver_volume_type: ClassVar[str]

    @classmethod
    def configured(cls, settings: ConnectorSettings, secrets: SecretKeeper | None) -> Self:
        """The connector as the config asks; ``secrets`` is where credentials QEMU
        reads are kept (None where nothing will be connected)."""
        ...

    def parse_target(self, data: Mapping[str, Any]) -> Target:
        """Validate ``connection_info['data']``; raise InvalidTarget, touch nothing."""
        ...

    def guard(self, target: Target) -> AbstractContextManager[None]:
        """A lock to hold around connect and disconnect beyond the agent's own
        (os-brick's guard for shared iSCSI targets); a no-op for most."""
        ...

    def connect(self, target: Target) -> HostDevice:
        """Make the host connection (idempotent); raise ConnectorError."""
        ...

    def disconnect(self, target: Target, device: HostDevice) -> None:
        """Release the host connection; raise ConnectorError if it could not."""
        ...

    def extend(self, target: Target, device: HostDevice, new_size: int | None) -> int:
        """Make the host see the volume's grown size (os-brick's extend_volume)
        and return it in bytes. ``new_size`` is the caller's word for it; a
        protocol with no host device to read (librbd) needs it (InvalidTarget
        without). Raise ConnectorError if the host could not be refreshed."""
        ...

    # What a guest's disk names depends on the target and device alone, not on
    # how the connector is configured: the check before a disconnect asks the
    # class, for any recorded connection, with no connector made.

    @staticmethod
    def disk_source(target: Target, device: HostDevice) -> DiskSource | None:
        """What a guest's disk of this connection names, from what its connect
        produced; None while there is nothing a disk could name."""
        ...

    @staticmethod
    def canonical(target: Target) -> Target:
        """The target under the key this version gives it (a local device by its
        kernel name); a connection stored under an older key moves to it at start."""
        ...

    @staticmethod
    def offline_disk_source(target: Target) -> DiskSource:
        """The disk source without connecting (``hostagentctl xml``); raise
        InvalidTarget if only the connect can tell it."""
        ...


_SECRET_NAMES = frozenset({"password", "secret", "key", "keyring", "token"})
_SECRET_SUFFIXES = ("_password", "_secret", "_key", "_keyring", "_token")


def is_secret_field(name: str) -> bool:
    """auth_password, key, keyring, ...; not secret_type or secret_uuid, which only name one."""
    return name in _SECRET_NAMES or name.endswith(_SECRET_SUFFIXES)


def scrub(message: str, properties: Mapping[str, Any]) -> str:
    """``message`` with every secret value of ``properties`` blanked out, so an
    error from a tool that echoed its command line cannot carry one."""
    for name, value in properties.items():
        if isinstance(value, str) and len(value) >= 4 and is_secret_field(name):
            message = message.replace(value, "***")
    return message


@contextlib.contextmanager
def os_brick_errors(what: str, properties: Mapping[str, Any]) -> Iterator[None]:
    """Turn whatever os-brick raises in the block (it raises many unrelated
    types) into a ConnectorError saying that ``what`` failed, with every secret
    of ``properties`` blanked out of the message."""
    try:
        yield
    except Exception as exc:
        message = f"{what} failed: {type(exc).__name__}: {exc}"
        raise ConnectorError(scrub(message, properties)) from exc


@contextlib.contextmanager
def secret_keeper_errors() -> Iterator[None]:
    """Turn what the SecretKeeper raises in the block (libvirt's errors) into the
    contract's SecretKeeperFailed; a ConnectorError passes as it is."""
    try:
        yield
    except ConnectorError:
        raise
    except Exception as exc:
        raise SecretKeeperFailed(exc) from exc
