#!/usr/bin/env python3
"""Attach/detach latency and throughput: hostagentd against raw libvirt-python.

The same disk XML (the one hostagentd generates: shareable, cache none, a
drive address) is attached and detached N times

  (a) through hostagentd's API (PUT then DELETE), and
  (b) by raw libvirt-python (attachDeviceFlags, then detachDeviceAlias and a
      wait for DEVICE_REMOVED, which is what a virt driver must do),

single stream on one guest, then 8 guests in parallel (one thread each), all
sharing one loop device. Prints p50/p95 per operation and the ratios
hostagent/raw. With ``--proxy-floor`` it measures a third side in the same
run, (c) a bare HTTP-to-libvirt proxy (bench/proxy_floor.py): what any
daemon in front of libvirt costs on this machine before it does any work of
its own. Run as root on a host with libvirtd and /dev/kvm:

    .venv/bin/python bench/attach_detach.py --iterations 100 [--proxy-floor]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hostagent.client import ApiError, HostagentClient
from tests.integration.support import (
    Daemon,
    Guest,
    Guests,
    LoopDevices,
    local_request,
    remove_stale_guests,
)


@dataclass
class Samples:
    """Latencies (seconds) of one operation, and the wall time of the run."""

    attach: list[float] = field(default_factory=list)
    detach: list[float] = field(default_factory=list)
    wall: float = 0.0
    daemon_cpu: float = 0.0
    libvirtd_cpu: float = 0.0
    busy: float = 0.0  # CPU seconds the whole machine spent (all cores), during the runs
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, attach: float, detach: float) -> None:
        with self.lock:
            self.attach.append(attach)
            self.detach.append(detach)

    def cycles_per_second(self) -> float:
        return len(self.attach) / self.wall if self.wall else 0.0


CORES = os.cpu_count() or 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class RemovalEvents:
    """DEVICE_REMOVED rendezvous for the raw libvirt side."""

    def __init__(self, conn: Any) -> None:
        self._events: dict[tuple[str, str], threading.Event] = {}
        self._mutex = threading.Lock()
        conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._removed, None
        )

    def _removed(self, conn: Any, dom: Any, alias: str, opaque: Any) -> None:
        with self._mutex:
            event = self._events.get((dom.UUIDString(), alias))
        if event:
            event.set()

    @contextlib.contextmanager
    def expect(self, uuid: str, alias: str) -> Any:
        event = threading.Event()
        with self._mutex:
            self._events[(uuid, alias)] = event
        try:
            yield event
        finally:
            with self._mutex:
                self._events.pop((uuid, alias), None)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def libvirtd_pid() -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "libvirtd":
                    return int(entry.name)
    raise RuntimeError("libvirtd is not running")


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent on anything but idle and iowait, since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def qemu_cpu_seconds(guest: Guest) -> float:
    return cpu_seconds(int(Path(f"/run/libvirt/qemu/{guest.name}.pid").read_text()))


def wait_until_idle(guests: list[Guest], limit: float = 90.0) -> float:
    """SeaBIOS probes for a boot device for ~15 s after start, at full CPU;
    measuring before that measures the probe. Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = sum(qemu_cpu_seconds(g) for g in guests)
        time.sleep(1.0)
        if sum(qemu_cpu_seconds(g) for g in guests) - before < 0.05 * len(guests):
            break
    return time.monotonic() - started


def raw_cycle(
    guest: Guest, dom: Any, xml: str, alias: str, removals: RemovalEvents
) -> tuple[float, float]:
    started = time.perf_counter()
    dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    attached = time.perf_counter()
    with removals.expect(guest.uuid, alias) as removed:
        dom.detachDeviceAlias(alias, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        if not removed.wait(20):
            raise RuntimeError(f"{alias} was not removed from {guest.name}")
    return attached - started, time.perf_counter() - attached


def hostagent_cycle(
    daemon: Daemon, guest: Guest, device: str, attachment_id: str
) -> tuple[float, float]:
    client = daemon.client
    started = time.perf_counter()
    client.attach(attachment_id, local_request(device, guest, volume_id="bench", multiattach=True))
    attached = time.perf_counter()
    client.detach(attachment_id)
    return attached - started, time.perf_counter() - attached


def run_streams(
    guests: list[Guest], iterations: int, cycle: Callable[[Guest, int], tuple[float, float]]
) -> Samples:
    samples = Samples()

    def stream(guest: Guest) -> None:
        for i in range(iterations):
            samples.add(*cycle(guest, i))

    started = time.perf_counter()
    with ThreadPoolExecutor(len(guests)) as pool:
        list(pool.map(stream, guests))
    samples.wall = time.perf_counter() - started
    return samples


def report(name: str, agent: Samples, raw: Samples, side: str = "hostagent") -> list[str]:
    """``side`` (hostagent, or the proxy floor) against raw libvirt."""
    process = "hostagentd" if side == "hostagent" else side
    lines = [
        f"## {name}",
        "",
        f"| op | {side} p50 | {side} p95 | raw p50 | raw p95 | ratio p50 |",
        "|---|---|---|---|---|---|",
    ]
    for op in ("attach", "detach"):
        a, r = getattr(agent, op), getattr(raw, op)
        lines.append(
            f"| {op} | {percentile(a, 0.5) * 1000:.1f} ms | {percentile(a, 0.95) * 1000:.1f} ms"
            f" | {percentile(r, 0.5) * 1000:.1f} ms | {percentile(r, 0.95) * 1000:.1f} ms"
            f" | {percentile(a, 0.5) / percentile(r, 0.5):.2f} |"
        )
    cycle_agent = statistics.median(x + y for x, y in zip(agent.attach, agent.detach, strict=True))
    cycle_raw = statistics.median(x + y for x, y in zip(raw.attach, raw.detach, strict=True))
    lines += [
        "",
        f"attach+detach cycle p50: {side} {cycle_agent * 1000:.1f} ms, raw "
        f"{cycle_raw * 1000:.1f} ms, ratio {cycle_agent / cycle_raw:.2f}",
        f"throughput: {side} {agent.cycles_per_second():.1f} cycles/s, raw "
        f"{raw.cycles_per_second():.1f} cycles/s, {side}/raw "
        f"{agent.cycles_per_second() / raw.cycles_per_second():.2f}",
        f"CPU per cycle: {process} {agent.daemon_cpu / len(agent.attach) * 1000:.1f} ms; "
        f"libvirtd {agent.libvirtd_cpu / len(agent.attach) * 1000:.1f} ms with {side}, "
        f"{raw.libvirtd_cpu / len(raw.attach) * 1000:.1f} ms raw; whole machine "
        f"{agent.busy / len(agent.attach) * 1000:.1f} ms with {side}, "
        f"{raw.busy / len(raw.attach) * 1000:.1f} ms raw",
        f"machine CPU use: {agent.busy / agent.wall / CORES * 100:.0f} % of "
        f"{CORES} cores with {side}, "
        f"{raw.busy / raw.wall / CORES * 100:.0f} % raw",
        "",
    ]
    return lines


def start_libvirt_events() -> Any:
    libvirt.registerErrorHandler(lambda opaque, error: None, None)
    libvirt.virEventRegisterDefaultImpl()

    def loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, daemon=True).start()
    return libvirt.open("qemu:///system")


def raw_disk_xml(daemon: Daemon, guests: list[Guest], device: str) -> dict[str, str]:
    """The disk XML hostagentd makes for each guest, renamed for the raw side."""
    xml_of: dict[str, str] = {}
    for guest in guests:
        attachment, _ = daemon.client.attach(
            f"probe-{guest.name}",
            local_request(device, guest, volume_id="bench", multiattach=True),
        )
        assert attachment.disk_xml is not None
        xml_of[guest.uuid] = attachment.disk_xml.replace(f"ua-probe-{guest.name}", "ua-raw")
        daemon.client.detach(f"probe-{guest.name}")
    return xml_of


Cycle = Callable[[Guest, int], tuple[float, float]]


@dataclass
class Run:
    """One side of one run: where its samples go, its cycle, its guests, and
    the process whose CPU is its own (hostagentd, the proxy; none for raw)."""

    samples: Samples
    cycle: Cycle
    streams: list[Guest]
    server_pid: int | None


def measure(plan: list[Run], rounds: int, per_round: int) -> None:
    """Run every entry of ``plan`` once per round, so drift hits all of them equally."""
    libvirtd = libvirtd_pid()
    for _ in range(rounds):
        for run in plan:
            target, pid = run.samples, run.server_pid
            cpu_before = cpu_seconds(pid) if pid else 0.0
            libvirtd_before = cpu_seconds(libvirtd)
            busy_before = machine_busy_seconds()
            part = run_streams(run.streams, per_round, run.cycle)
            target.busy += machine_busy_seconds() - busy_before
            target.libvirtd_cpu += cpu_seconds(libvirtd) - libvirtd_before
            target.daemon_cpu += (cpu_seconds(pid) - cpu_before) if pid else 0.0
            target.attach += part.attach
            target.detach += part.detach
            target.wall += part.wall


def daemon_options(pairs: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--daemon-option wants SECTION.KEY=VALUE, got {pair!r}")
        options[key] = value
    return options


class ProxyFloor:
    """bench/proxy_floor.py in a subprocess on its own socket."""

    def __init__(self, socket_path: Path, log_path: Path) -> None:
        self.client = HostagentClient(str(socket_path))
        program = Path(__file__).with_name("proxy_floor.py")
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(program), str(socket_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            with contextlib.suppress(ApiError):
                self.client.request("GET", "/v1/health")
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the proxy floor did not start; see {log_path}")

    def cycle(self, guest: Guest, attachment_id: str, xml: str) -> tuple[float, float]:
        path = f"/v1/attachments/{attachment_id}"
        body = {"domain_uuid": guest.uuid, "xml": xml, "alias": "ua-raw"}
        started = time.perf_counter()
        self.client.request("PUT", path, body)
        attached = time.perf_counter()
        self.client.request("DELETE", path)
        return attached - started, time.perf_counter() - attached

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=50, help="cycles per stream")
    parser.add_argument("--parallel", type=int, default=8, help="guests in the parallel run")
    parser.add_argument(
        "--daemon-option",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a config option for the measured hostagentd (repeatable), "
        "e.g. DEFAULT.default_log_levels=hostagent=WARN",
    )
    parser.add_argument(
        "--proxy-floor",
        action="store_true",
        help="also measure a bare HTTP-to-libvirt proxy (bench/proxy_floor.py) in the same run",
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()

    conn = start_libvirt_events()
    remove_stale_guests(conn)
    removals = RemovalEvents(conn)
    workdir = Path(tempfile.mkdtemp(prefix="ha-bench-", dir="/tmp"))
    loops = LoopDevices(workdir)
    made = Guests(conn)
    daemon = Daemon(
        workdir / "state",
        workdir / "d.sock",
        workdir / "daemon.log",
        options={"reconcile.interval": "0", **daemon_options(args.daemon_option)},
    )
    proxy: ProxyFloor | None = None
    try:
        device = loops.make(16)
        guests = [made.make() for _ in range(args.parallel)]
        daemon.start()
        assert daemon.process is not None
        print(f"guests idle after {wait_until_idle(guests):.0f} s", file=sys.stderr)
        xml_of = raw_disk_xml(daemon, guests, device)
        ids = itertools.count()

        def agent(guest: Guest, i: int) -> tuple[float, float]:
            # Attachment ids are single-use: a fresh one per cycle.
            return hostagent_cycle(daemon, guest, device, f"bench-{next(ids)}")

        handles = {guest.uuid: guest.dom for guest in guests}  # raw keeps its handles

        def raw(guest: Guest, i: int) -> tuple[float, float]:
            return raw_cycle(guest, handles[guest.uuid], xml_of[guest.uuid], "ua-raw", removals)

        run_streams(guests[:1], 3, agent)  # warm every path
        run_streams(guests[:1], 3, raw)
        single_agent, single_raw = Samples(), Samples()
        parallel_agent, parallel_raw = Samples(), Samples()
        plan = [
            Run(single_agent, agent, guests[:1], daemon.process.pid),
            Run(single_raw, raw, guests[:1], None),
            Run(parallel_agent, agent, guests, daemon.process.pid),
            Run(parallel_raw, raw, guests, None),
        ]
        single_proxy, parallel_proxy = Samples(), Samples()
        if args.proxy_floor:
            floor = proxy = ProxyFloor(workdir / "proxy.sock", workdir / "proxy.log")

            def bare(guest: Guest, i: int) -> tuple[float, float]:
                return floor.cycle(guest, f"proxy-{next(ids)}", xml_of[guest.uuid])

            run_streams(guests[:1], 3, bare)
            plan += [
                Run(single_proxy, bare, guests[:1], floor.process.pid),
                Run(parallel_proxy, bare, guests, floor.process.pid),
            ]
        rounds = 5
        per_round = max(1, args.iterations // rounds)
        measure(plan, rounds, per_round)
        lines = [
            f"# attach/detach benchmark: {per_round * rounds} cycles per stream, "
            f"{args.parallel} guests in parallel, {len(guests)} guests defined",
            "",
        ]
        single, parallel = "single stream (1 guest)", f"parallel ({args.parallel} guests)"
        lines += report(single, single_agent, single_raw)
        lines += report(parallel, parallel_agent, parallel_raw)
        if proxy is not None:
            lines += report(f"{single}, the proxy floor", single_proxy, single_raw, "proxy")
            lines += report(f"{parallel}, the proxy floor", parallel_proxy, parallel_raw, "proxy")
        print("\n".join(lines))
    finally:
        if proxy is not None:
            proxy.stop()
        daemon.stop()
        made.cleanup()
        loops.cleanup()
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
