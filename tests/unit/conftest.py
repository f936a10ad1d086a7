"""Unit-test fixtures: a real block device (tests run as root), and the
attach/detach core between recording fakes of libvirt and os-brick."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hostagent.api.models import AttachRequest
from hostagent.attachments.reconcile import Reconciler
from hostagent.attachments.service import AttachmentService, ServiceSettings
from hostagent.connectors import ConnectorRegistry
from hostagent.daemon.main import build_core
from hostagent.guests.domains import DomainInfo
from hostagent.locks import HostLocks
from hostagent.observability.metrics import Metrics
from hostagent.state.store import Store
from tests.unit.recording import RecordingConnector, RecordingGuests


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A real block device: a loop device over a small sparse file."""
    backing = tmp_path / "backing.img"
    with backing.open("wb") as f:
        f.truncate(1024 * 1024)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    yield device
    subprocess.run(["losetup", "-d", device], check=False)


@dataclass
class Core:
    """The attach/detach core as the daemon wires it (``build_core``), on a real
    sqlite store and real locks in tmp_path, between recording fakes of libvirt
    and os-brick; ``device`` is a path the fake connector hands out."""

    guests: RecordingGuests
    connector: RecordingConnector
    store: Store
    service: AttachmentService
    reconciler: Reconciler
    device: str
    clock: list[float]

    @property
    def key(self) -> str:
        return f"local:{self.device}"

    def request(self, domain: DomainInfo, **extra: Any) -> AttachRequest:
        body: dict[str, Any] = {
            "volume_id": "vol-1",
            "domain": domain.name,
            "connection_info": {
                "driver_volume_type": "local",
                "data": {"device_path": self.device},
            },
            "bus": "virtio",
        }
        body.update(extra)
        return AttachRequest.model_validate(body)

    def again(self, *, boot_id: str) -> Core:
        """The same state, guests and host after a restart in boot ``boot_id``."""
        self.store.close()
        return make_core(self.store.path.parent, self.guests, self.connector, boot_id=boot_id)


def make_core(
    state_dir: Path, guests: RecordingGuests, connector: RecordingConnector, *, boot_id: str
) -> Core:
    device = state_dir / "vol-1"
    device.touch()
    clock = [1_000_000.0]
    store = Store(state_dir / "state.sqlite3", clock=lambda: clock[0])
    service, reconciler = build_core(
        store=store,
        guests=guests,
        registry=ConnectorRegistry({"local": connector}),
        locks=HostLocks(state_dir / "locks"),
        settings=ServiceSettings(detach_timeout=2, detach_retry_interval=0.1, boot_id=boot_id),
        metrics=Metrics(),
        tombstone_ttl=3600,
        clock=lambda: clock[0],
    )
    return Core(guests, connector, store, service, reconciler, str(device), clock)


@pytest.fixture
def core(tmp_path: Path) -> Iterator[Core]:
    made = make_core(tmp_path, RecordingGuests(), RecordingConnector(), boot_id="boot-a")
    yield made
    made.store.close()
