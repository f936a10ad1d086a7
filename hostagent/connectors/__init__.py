"""Storage protocols: an explicit registry of real Connector classes by driver_volume_type."""

from __future__ import annotations

from collections.abc import Mapping

from hostagent.connectors.base import (
    BlockDiskSource,
    Connector,
    ConnectorError,
    ConnectorSettings,
    DiskSource,
    HostDevice,
    InvalidTarget,
    NetworkDiskSource,
    NetworkHost,
    SecretKeeper,
    SecretKeeperFailed,
    Target,
    connected_block_device,
)
from hostagent.connectors.iscsi import ISCSIConnector
from hostagent.connectors.local import LocalConnector
from hostagent.connectors.rbd import RBDConnector

# The protocols this agent serves, by driver_volume_type: real classes, no strings.
CONNECTOR_CLASSES: Mapping[str, type[Connector]] = {
    kind.driver_volume_type: kind for kind in (LocalConnector, ISCSIConnector, RBDConnector)
}


def disk_source(target: Target, device: HostDevice) -> DiskSource | None:
    """What a guest's disk of a connection names, as its protocol's connector
    says; for a protocol this agent does not serve (any more), its host device."""
    kind = CONNECTOR_CLASSES.get(target.driver_volume_type)
    if kind is None:
        return connected_block_device(device)
    return kind.disk_source(target, device)


class ConnectorRegistry:
    """The connectors this daemon serves, built once, looked up per request."""

    def __init__(self, connectors: Mapping[str, Connector]) -> None:
        self._connectors = dict(connectors)

    @classmethod
    def default(
        cls, settings: ConnectorSettings | None = None, secrets: SecretKeeper | None = None
    ) -> ConnectorRegistry:
        """Every protocol, configured; ``secrets`` is where rbd keeps cephx keys
        (libvirt; None where nothing will be connected, as for offline rendering)."""
        settings = settings or ConnectorSettings()
        return cls(
            {name: kind.configured(settings, secrets) for name, kind in CONNECTOR_CLASSES.items()}
        )

    def names(self) -> list[str]:
        return sorted(self._connectors)

    def get(self, driver_volume_type: str) -> Connector:
        try:
            return self._connectors[driver_volume_type]
        except KeyError:
            raise InvalidTarget(
                f"unknown driver_volume_type {driver_volume_type!r}; "
                f"this host serves {', '.join(self.names())}"
            ) from None


__all__ = [
    "CONNECTOR_CLASSES",
    "BlockDiskSource",
    "Connector",
    "ConnectorError",
    "ConnectorRegistry",
    "ConnectorSettings",
    "DiskSource",
    "HostDevice",
    "InvalidTarget",
    "NetworkDiskSource",
    "NetworkHost",
    "SecretKeeper",
    "SecretKeeperFailed",
    "Target",
    "disk_source",
]
