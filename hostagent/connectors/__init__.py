"""Storage protocols: an explicit registry of real Connector classes by driver_volume_type."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from hostagent.connectors.base import (
    Connector,
    ConnectorError,
    HostDevice,
    InvalidTarget,
    Target,
)
from hostagent.connectors.local import LocalConnector

CONNECTOR_CLASSES: Mapping[str, Callable[[], Connector]] = {
    LocalConnector.driver_volume_type: LocalConnector,
}


class ConnectorRegistry:
    """The connectors this daemon serves, built once, looked up per request."""

    def __init__(self, connectors: Mapping[str, Connector]) -> None:
        self._connectors = dict(connectors)

    @classmethod
    def default(cls) -> ConnectorRegistry:
        return cls({name: make() for name, make in CONNECTOR_CLASSES.items()})

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
    "HostDevice",
    "InvalidTarget",
    "Target",
]
