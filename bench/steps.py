#!/usr/bin/env python3
"""Where an attach/detach cycle's time goes inside hostagent (issue 11: G1, G2, G5).

bench/attach_detach.py measures a cycle through hostagentd from outside; this
script says what the cycle is made of. It builds the attachment service in
this process as hostagentd builds it (``build_core`` on a real state file,
this host's libvirtd, the local connector on a loop device), leaves out the
HTTP layer, and times every step of a cycle: its wall time and the CPU time
of the thread that runs it. Beside it, in the same interleaved rounds, the
same disk attached and detached by raw libvirt-python on the same guest.

Two streams, as in attach_detach.py: ``shared`` (another guest keeps the
volume, G1's path) and ``last`` (every detach the last: connect, guard,
disconnect, G2's path). Steps nest (``GuestDisks.attach`` holds
``Guests.attach_device``); the table lists each once with what it includes.
Run as root, alone on the machine:

    .venv/bin/python bench/steps.py [--cycles 100]
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hostagent import connectors
from hostagent.api.models import AttachRequest
from hostagent.attachments.service import AttachmentService, ServiceSettings
from hostagent.daemon.main import build_core, prepare_os_brick
from hostagent.guests.domain_scan import DomainScan
from hostagent.guests.domains import Guests as LibvirtGuests
from hostagent.host import device_users
from hostagent.locks import HostLocks, state_dir_guard
from hostagent.observability.metrics import Metrics
from hostagent.state.store import Store
from tests.integration.support import Guest, Guests, LoopDevices, local_request

URI = "qemu:///system"
ROUNDS = 5
STREAMS = ("raw", "shared", "last")


@dataclass
class Spent:
    """Wall and thread-CPU seconds of one step, summed over its calls."""

    calls: int = 0
    wall: float = 0.0
    cpu: float = 0.0


@dataclass
class Stream:
    """One stream's cycles: per-step sums, and the cycles' own totals."""

    steps: dict[str, Spent] = field(default_factory=lambda: defaultdict(Spent))
    cycles: int = 0
    wall: float = 0.0
    cpu: float = 0.0  # the calling thread's
    process_cpu: float = 0.0  # every thread of this process (libvirt's event loop too)


class StepTimer:
    """Wraps methods of the service's parts so each call adds to the current stream."""

    def __init__(self) -> None:
        self.stream: Stream | None = None

    def wrap(self, owner: object, name: str, label: str) -> None:
        method = getattr(owner, name)

        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            return self.call(label, method, *args, **kwargs)

        setattr(owner, name, timed)

    def call(self, label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, its time added to ``label`` of the current stream."""
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            if self.stream is not None:
                spent = self.stream.steps[label]
                spent.calls += 1
                spent.wall += time.perf_counter() - wall
                spent.cpu += time.thread_time() - cpu

    @contextmanager
    def cycle(self, stream: Stream) -> Iterator[None]:
        self.stream = stream
        wall, cpu, process = time.perf_counter(), time.thread_time(), time.process_time()
        try:
            yield
        finally:
            stream.cycles += 1
            stream.wall += time.perf_counter() - wall
            stream.cpu += time.thread_time() - cpu
            stream.process_cpu += time.process_time() - process
            self.stream = None


# (owner in Parts, method, what it includes when it is not obvious)
STEPS: tuple[tuple[str, str, str], ...] = (
    ("service", "parse_target", "the connector's checks of the request (local: host use)"),
    ("guests", "lookup", "the domain by name or UUID: 2 round trips"),
    ("guests", "find", "the same for the detach (its lookup is counted above too)"),
    ("connections", "join", "the attach intent; a connect when the volume is new"),
    ("store", "begin_attach", "intent row (fsync'd unless the connection is up)"),
    ("connector", "connect", "os-brick connect_volume"),
    ("disks", "attach", "live XML read and parsed, placement, libvirt attach"),
    ("disks", "_place", "target dev and address, disk XML built, placement row (fsync'd)"),
    ("guests", "domain_xml", "one XMLDesc round trip"),
    ("guests", "attach_device", "attachDeviceFlags"),
    ("store", "set_attachment_state", "attached (NORMAL) / detaching (fsync'd)"),
    ("migrations", "check_detach", "a migration job under way? (jobStats)"),
    ("removal", "remove", "detachDeviceAlias, DEVICE_REMOVED wait, live XML check"),
    ("guests", "detach_alias", "detachDeviceAlias"),
    ("presence", "in_live_xml", "live XML read to confirm the removal"),
    ("connections", "release", "drop the attachment; the guard and disconnect when last"),
    ("store", "release_if_shared", "the shared release (one transaction)"),
    ("connections", "_still_referenced", "the guard: every domain's disks and every holder"),
    ("scan", "snapshot", "the running listed, the persistent kept; live XMLs; configs"),
    ("device_users", "processes_holding", "the holders search: every process's descriptors"),
    ("connector", "disconnect", "os-brick disconnect_volume"),
    ("store", "finish_detach", "the last release's rows"),
)


@dataclass
class Parts:
    service: AttachmentService
    guests: LibvirtGuests
    store: Store
    connector: connectors.Connector

    def owner(self, name: str) -> object:
        service = self.service
        return {
            "service": service,
            "guests": self.guests,
            "store": self.store,
            "connections": service.connections,
            "disks": service.disks,
            "migrations": service.migrations,
            "presence": service.presence,
            "removal": service.removal,
            "connector": self.connector,
            "scan": service.connections.scan,
            "device_users": device_users,
        }[name]


def raw_xml(service: AttachmentService, guest: Guest, device: str) -> str:
    """The disk XML the service makes for ``guest``, renamed for the raw side."""
    request = AttachRequest.model_validate(
        local_request(device, guest, volume_id="probe", multiattach=True)
    )
    attachment, _ = service.attach("probe", request)
    service.detach("probe")
    assert attachment.disk_xml is not None
    return attachment.disk_xml.replace("ua-probe", "ua-raw")


def run(args: argparse.Namespace, work: Path, made: Guests, loops: LoopDevices) -> list[str]:
    state = work / "state"
    prepare_os_brick(state / "locks")
    guests = LibvirtGuests(URI)
    with state_dir_guard(state) as held:
        store = Store(state / "state.db")
        shared_device, last_device = loops.make(16), loops.make(16)
        registry = connectors.ConnectorRegistry.default(
            connectors.ConnectorSettings(local_allowed_devices=(shared_device, last_device)),
            secrets=guests,
        )
        service, _ = build_core(
            store=store,
            guests=guests,
            registry=registry,
            locks=HostLocks(state / "locks", held=held),
            settings=ServiceSettings(),
            metrics=Metrics(),
            tombstone_ttl=3600,
            scan=DomainScan.watching(guests, URI, config_dir="", status_dir=""),
        )
        guests.start()
        try:
            return measure(
                args,
                Parts(service, guests, store, registry.get("local")),
                made,
                {
                    "shared": shared_device,
                    "last": last_device,
                },
            )
        finally:
            guests.stop()
            store.close()


def measure(
    args: argparse.Namespace, parts: Parts, made: Guests, devices: dict[str, str]
) -> list[str]:
    holder, guest = made.make(), made.make()
    service = parts.service

    def request(device: str) -> AttachRequest:
        return AttachRequest.model_validate(
            local_request(device, guest, volume_id="bench", multiattach=True)
        )

    holder_request = local_request(devices["shared"], holder, volume_id="bench", multiattach=True)
    service.attach("holder", AttachRequest.model_validate(holder_request))
    xml = raw_xml(service, guest, devices["last"])
    dom = libvirt.open(URI).lookupByUUIDString(guest.uuid)
    removals = parts.guests.removals

    timer = StepTimer()

    def raw_cycle(number: int) -> None:
        timer.call(
            "raw attachDeviceFlags", dom.attachDeviceFlags, xml, libvirt.VIR_DOMAIN_AFFECT_LIVE
        )
        with removals.expect(guest.uuid, "ua-raw") as removal:
            timer.call(
                "raw detachDeviceAlias",
                dom.detachDeviceAlias,
                "ua-raw",
                libvirt.VIR_DOMAIN_AFFECT_LIVE,
            )
            if not timer.call("raw DEVICE_REMOVED wait", removal.event.wait, 20):
                raise RuntimeError("ua-raw was not removed")

    def service_cycle(kind: str) -> Callable[[int], None]:
        def cycle(number: int) -> None:
            attachment_id = f"{kind}-{number}"
            service.attach(attachment_id, request(devices[kind]))
            result = service.detach(attachment_id)
            if result.host_disconnected != (kind == "last"):
                raise RuntimeError(f"{attachment_id}: {result}")

        return cycle

    for owner, name, _ in STEPS:
        timer.wrap(parts.owner(owner), name, f"{owner}.{name}")
    cycles: dict[str, Callable[[int], None]] = {
        "raw": raw_cycle,
        "shared": service_cycle("shared"),
        "last": service_cycle("last"),
    }
    streams = {kind: Stream() for kind in STREAMS}
    for kind in STREAMS:  # warm every path once, unmeasured
        cycles[kind](-1)
    per_round = max(1, args.cycles // ROUNDS)
    numbers = iter(range(args.cycles * len(STREAMS) + 1))
    for round_number in range(ROUNDS):
        order = STREAMS[round_number % 3 :] + STREAMS[: round_number % 3]
        for kind in order:
            for _ in range(per_round):
                with timer.cycle(streams[kind]):
                    cycles[kind](next(numbers))
    service.detach("holder")
    return report(streams, per_round * ROUNDS)


def _ms(seconds: float, cycles: int) -> str:
    return f"{seconds / cycles * 1000:.2f}"


def report(streams: dict[str, Stream], cycles: int) -> list[str]:
    raw = streams["raw"]
    lines = [
        f"# where a cycle goes: {cycles} cycles per stream, {ROUNDS} interleaved rounds",
        "",
        "| stream | wall per cycle | over raw | CPU per cycle (its thread) "
        "| CPU per cycle (process) |",
        "|---|---|---|---|---|",
    ]
    for kind in STREAMS:
        s = streams[kind]
        over = (s.wall - raw.wall) / s.cycles * 1000
        lines.append(
            f"| {kind} | {_ms(s.wall, s.cycles)} ms | {over:+.2f} ms | "
            f"{_ms(s.cpu, s.cycles)} ms | {_ms(s.process_cpu, s.cycles)} ms |"
        )
    what = {f"{owner}.{name}": text for owner, name, text in STEPS}
    for kind in STREAMS:
        s = streams[kind]
        lines += [
            "",
            f"## {kind}: steps per cycle (nested steps counted in their parents too)",
            "",
            "| step | calls | wall ms | CPU ms | what |",
            "|---|---|---|---|---|",
        ]
        for label, spent in sorted(s.steps.items(), key=lambda item: -item[1].cpu):
            lines.append(
                f"| {label} | {spent.calls / s.cycles:.1f} | {_ms(spent.wall, s.cycles)} | "
                f"{_ms(spent.cpu, s.cycles)} | {what.get(label, '')} |"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=100, help="cycles per stream")
    args = parser.parse_args()
    conn = libvirt.open(URI)
    work = Path(tempfile.mkdtemp(prefix="ha-steps-", dir="/tmp"))
    made, loops = Guests(conn), LoopDevices(work)
    try:
        lines = run(args, work, made, loops)
    finally:
        made.cleanup()
        loops.cleanup()
        conn.close()
    lines.append(f"\ncommand: {' '.join(sys.argv)}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
