"""Storage protocols: an explicit registry of real Connector classes by driver_volume_type."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hostagent.connectors.base import (
    Connector,
    ConnectorError,
    HostDevice,
    InvalidTarget,
    Target,
)
from hostagent.connectors.iscsi import ISCSIConnector
from hostagent.connectors.local import LocalConnector

# The protocols this agent serves, by driver_volume_type: real classes, no strings.
CONNECTOR_CLASSES: Mapping[str, type[Connector]] = {
    LocalConnector.driver_volume_type: LocalConnector,
    ISCSIConnector.driver_volume_type: ISCSIConnector,
}


@dataclass(frozen=True)
class ConnectorSettings:
    """What the config says about protocols."""

    iscsi_use_multipath: bool = False


class ConnectorRegistry:
    """The connectors this daemon serves, built once, looked up per request."""

    def __init__(self, connectors: Mapping[str, Connector]) -> None:
        self._connectors = dict(connectors)

    @classmethod
    def default(cls, settings: ConnectorSettings | None = None) -> ConnectorRegistry:
        settings = settings or ConnectorSettings()
        return cls(
            {
                LocalConnector.driver_volume_type: LocalConnector(),
                ISCSIConnector.driver_volume_type: ISCSIConnector(
                    use_multipath=settings.iscsi_use_multipath
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
    "Target",
]
