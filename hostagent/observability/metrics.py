"""Prometheus metrics (``GET /metrics``): results, phase latencies, states.

Counters and histograms are updated where the work happens; the gauges of
connections and attachments by state, and whether libvirt is connected, are
read from the store and the session at scrape time, so they cannot drift.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from hostagent.state.store import AttachmentState, ConnectionState, Store

# "guard": the look for users before a disconnect (every domain, every
# holder, the grace for a brief one), at a last detach or in reconcile
PHASES = ("connect", "libvirt_attach", "removal_wait", "guard", "disconnect")
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)


class Metrics:
    """The daemon's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.results = Counter(
            "hostagent_operations",
            "Attach, detach and extend requests by result (created, exists, detached, "
            "resized, unchanged, or error code)",
            ["operation", "result"],
            registry=self.registry,
        )
        self.phase_seconds = Histogram(
            "hostagent_phase_seconds",
            "Seconds spent in each phase of attach and detach",
            ["phase"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        for phase in PHASES:
            self.phase_seconds.labels(phase)

    def result(self, operation: str, result: str) -> None:
        self.results.labels(operation, result).inc()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.phase_seconds.labels(name).observe(time.monotonic() - started)

    def watch(self, store: Store, libvirt_connected: Callable[[], bool]) -> None:
        """Report states from ``store`` and libvirt's connection at every scrape."""
        self.registry.register(_StateCollector(store, libvirt_connected))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, store: Store, libvirt_connected: Callable[[], bool]) -> None:
        self._store = store
        self._libvirt_connected = libvirt_connected

    def collect(self) -> Iterator[GaugeMetricFamily]:
        attachments, connections = self._store.state_counts()
        family = GaugeMetricFamily(
            "hostagent_attachments", "Attachments by state", labels=["state"]
        )
        for state in AttachmentState:
            family.add_metric([state.value], attachments.get(state.value, 0))
        yield family
        family = GaugeMetricFamily(
            "hostagent_connections", "Host connections by state", labels=["state"]
        )
        for conn_state in ConnectionState:
            family.add_metric([conn_state.value], connections.get(conn_state.value, 0))
        yield family
        yield GaugeMetricFamily(
            "hostagent_libvirt_up",
            "1 while the daemon is connected to libvirt",
            value=1 if self._libvirt_connected() else 0,
        )
