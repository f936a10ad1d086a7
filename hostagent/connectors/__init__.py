"""Storage protocols: an explicit registry of real Connector classes by driver_volume_type."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hostagent.connectors.base import (
    Connector,
    ConnectorError,
    HostDevice,
    InvalidTarget,
    SecretKeeper,
    Target,
)
from hostagent.connectors.iscsi import ISCSIConnector
from hostagent.connectors.local import LocalConnector
from hostagent.connectors.rbd import RBDConnector

# The protocols this agent serves, by driver_volume_type: real classes, no strings.
CONNECTOR_CLASSES: Mapping[str, type[Connector]] = {
    LocalConnector.driver_volume_type: LocalConnector,
    ISCSIConnector.driver_volume_type: ISCSIConnector,
    RBDConnector.driver_volume_type: RBDConnector,
}


@dataclass(frozen=True)
class ConnectorSettings:
    """What the config says about protocols."""

    iscsi_use_multipath: bool = False
    rbd_attach_mode: str = "librbd"


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
            {
                LocalConnector.driver_volume_type: LocalConnector(),
                ISCSIConnector.driver_volume_type: ISCSIConnector(
                    use_multipath=settings.iscsi_use_multipath
                ),
                RBDConnector.driver_volume_type: RBDConnector(
                    attach_mode=settings.rbd_attach_mode, secrets=secrets
                ),
            }
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
    "Connector",
    "ConnectorError",
    "ConnectorRegistry",
    "ConnectorSettings",
    "HostDevice",
    "InvalidTarget",
    "SecretKeeper",
    "Target",
]
