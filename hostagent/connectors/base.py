"""The Connector protocol and the typed values that cross it.

A connector turns Cinder's ``connection_info`` into a canonical ``Target``
(validation happens here, before anything is touched), connects it once per
host and disconnects it. It knows nothing of libvirt: ``service`` maps a
``HostDevice`` to a disk source.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol


class InvalidTarget(ValueError):
    """connection_info that a connector refuses; the message goes to the caller (400)."""


class ConnectorError(RuntimeError):
    """os-brick failed to connect or disconnect; the message says what it reported."""


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
