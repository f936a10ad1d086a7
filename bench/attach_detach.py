#!/usr/bin/env python3
"""Attach/detach latency and throughput: hostagentd against raw libvirt-python.

The same disk XML (the one hostagentd generates: shareable, cache none, a
drive address) is attached and detached N times

  (a) through hostagentd's API (PUT then DELETE), and
  (b) by raw libvirt-python (attachDeviceFlags, then detachDeviceAlias and a
      wait for DEVICE_REMOVED, which is what a virt driver must do),

in interleaved rounds (every side once per round, so drift hits all alike),
measuring the targets of issue 11:

- G1, single stream on one guest while another guest keeps the same
  multiattach volume attached (through hostagentd, for the whole run): no
  DELETE is the last, none disconnects. Cycle p50 against raw's: <= 1.10.
- G2, single stream, nothing else holds the volume: every DELETE is the
  last, so every cycle connects, runs the guard and disconnects. <= 1.20.
- G3 (``--defined N``, ``--holders N``): G2 again with N shut-off persistent
  domains of four disks each defined and helper processes holding N open
  descriptors (bench/host_load.py), against G2 without them: <= 1.30.
  ``--fds-per-holder 100 --busy-holders`` spreads them like a host's running
  guests (a QEMU each, threads that keep waking) instead of over a few idle
  processes of 10,000. The
  load is made and removed in every round (3-5 s here for 200 domains and
  30,000 descriptors), the loaded runs first in every other round: drift
  (this machine's speed varies from day to day and within a run) then hits
  G2 quiet and loaded alike, where a quiet phase followed by a loaded one
  would count it as the load's cost.
- G4 (``--storm``): one volume attached to all the parallel guests at once
  (concurrent PUTs), then detached from all at once (concurrent DELETEs),
  repeated; attachments per second against raw libvirt doing the same with
  its own threads: >= 0.85.
- G5 (``--proxy-floor``): hostagentd's CPU per cycle in the parallel run
  against the bare proxy's: <= 2.

The parallel run (8 guests, one thread each, each its own attachment of the
one shared loop device) stays as before. With ``--proxy-floor`` a third side,
(c) a bare HTTP-to-libvirt proxy (bench/proxy_floor.py), runs in the same
rounds: what any daemon in front of libvirt costs on this machine before it
does any work of its own. Prints p50/p95 per operation, the ratios, the CPU
per cycle of the server process, libvirtd and the machine, and a table of
the targets measured. Run as root on a host with libvirtd and /dev/kvm:

    .venv/bin/python bench/attach_detach.py --iterations 100 --proxy-floor \
        --storm --defined 200 --holders 30000
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from host_load import FDS_PER_HOLDER, DefinedDomains, FdHolders

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

    def cycle_p50(self) -> float:
        """The median of attach + detach, cycle by cycle."""
        return statistics.median(x + y for x, y in zip(self.attach, self.detach, strict=True))

    def cpu_per_cycle(self) -> float:
        """The server process's CPU seconds per cycle (hostagentd, the proxy)."""
        return self.daemon_cpu / len(self.attach) if self.attach else 0.0


@dataclass
class Tally:
    """How many of a stream's DELETEs released the host connection: a G1 cycle
    must never, a G2 cycle always (else the run measured something else)."""

    disconnected: int = 0
    kept: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, disconnected: bool) -> None:
        with self.lock:
            if disconnected:
                self.disconnected += 1
            else:
                self.kept += 1

    def describe(self) -> str:
        total = self.disconnected + self.kept
        return f"{self.disconnected} of {total} DELETEs disconnected the device"


CORES = os.cpu_count() or 1
ROUNDS = 5


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


def settle(pids: list[int], limit: float = 20.0, window: float = 0.5) -> float:
    """Wait until ``pids`` (hostagentd, libvirtd) are idle again: defining and
    undefining domains sends them events whose handling is not the cycle's
    cost. Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = sum(cpu_seconds(pid) for pid in pids)
        time.sleep(window)
        if sum(cpu_seconds(pid) for pid in pids) - before <= 0.04 * window:
            break
    return time.monotonic() - started


def raw_cycle(
    guest: Guest, dom: Any, xml: str, alias: str, removals: RemovalEvents
) -> tuple[float, float]:
    started = time.perf_counter()
    dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    attached = time.perf_counter()
    raw_detach(guest, dom, alias, removals)
    return attached - started, time.perf_counter() - attached


def raw_detach(guest: Guest, dom: Any, alias: str, removals: RemovalEvents) -> None:
    with removals.expect(guest.uuid, alias) as removed:
        dom.detachDeviceAlias(alias, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        if not removed.wait(20):
            raise RuntimeError(f"{alias} was not removed from {guest.name}")


def hostagent_cycle(
    daemon: Daemon,
    guest: Guest,
    device: str,
    attachment_id: str,
    *,
    volume_id: str = "bench",
    tally: Tally | None = None,
) -> tuple[float, float]:
    client = daemon.client
    started = time.perf_counter()
    client.attach(
        attachment_id, local_request(device, guest, volume_id=volume_id, multiattach=True)
    )
    attached = time.perf_counter()
    result = client.detach(attachment_id)
    finished = time.perf_counter()
    if tally is not None:
        tally.count(result.host_disconnected)
    return attached - started, finished - attached


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


class Storm:
    """A boot storm as one cycle: every guest attaches at once (one thread
    each), then, once all are attached, every guest detaches at once. The
    cycle's "attach" is the wall time until the last attach answered, its
    "detach" that until the last detach did."""

    def __init__(
        self,
        guests: list[Guest],
        attach: Callable[[Guest], str],
        detach: Callable[[Guest, str], None],
    ) -> None:
        self.guests = guests
        self.attach = attach
        self.detach = detach
        self.pool = ThreadPoolExecutor(len(guests), thread_name_prefix="storm")

    def cycle(self, guest: Guest, i: int) -> tuple[float, float]:
        started = time.perf_counter()
        tokens = list(self.pool.map(self.attach, self.guests))
        attached = time.perf_counter()
        list(self.pool.map(self.detach, self.guests, tokens))
        return attached - started, time.perf_counter() - attached

    def close(self) -> None:
        self.pool.shutdown()


def attachments_per_second(storms: Samples, size: int) -> float:
    return size * len(storms.attach) / storms.wall if storms.wall else 0.0


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def report(
    name: str,
    agent: Samples,
    raw: Samples,
    side: str = "hostagent",
    compare: Samples | None = None,
) -> list[str]:
    """``side`` (hostagent, or the proxy floor) against raw libvirt; for the
    proxy floor, ``compare`` is hostagent's run, for the CPU ratio (G5)."""
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
            f"| {op} | {ms(percentile(a, 0.5))} | {ms(percentile(a, 0.95))}"
            f" | {ms(percentile(r, 0.5))} | {ms(percentile(r, 0.95))}"
            f" | {percentile(a, 0.5) / percentile(r, 0.5):.2f} |"
        )
    cycle_agent, cycle_raw = agent.cycle_p50(), raw.cycle_p50()
    lines += [
        "",
        f"attach+detach cycle p50: {side} {ms(cycle_agent)}, raw "
        f"{ms(cycle_raw)}, ratio {cycle_agent / cycle_raw:.2f}",
        f"throughput: {side} {agent.cycles_per_second():.1f} cycles/s, raw "
        f"{raw.cycles_per_second():.1f} cycles/s, {side}/raw "
        f"{agent.cycles_per_second() / raw.cycles_per_second():.2f}",
        f"CPU per cycle: {process} {ms(agent.cpu_per_cycle())}; "
        f"libvirtd {ms(agent.libvirtd_cpu / len(agent.attach))} with {side}, "
        f"{ms(raw.libvirtd_cpu / len(raw.attach))} raw; whole machine "
        f"{ms(agent.busy / len(agent.attach))} with {side}, "
        f"{ms(raw.busy / len(raw.attach))} raw",
        f"machine CPU use: {agent.busy / agent.wall / CORES * 100:.0f} % of "
        f"{CORES} cores with {side}, "
        f"{raw.busy / raw.wall / CORES * 100:.0f} % raw",
    ]
    if compare is not None:
        lines.append(
            f"CPU per cycle, hostagentd / {process}: {ms(compare.cpu_per_cycle())} / "
            f"{ms(agent.cpu_per_cycle())} = "
            f"{compare.cpu_per_cycle() / agent.cpu_per_cycle():.2f} (G5: at most 2)"
        )
    return [*lines, ""]


def storm_report(name: str, agent: Samples, raw: Samples, size: int, side: str) -> list[str]:
    """Boot storms of ``size`` guests: ``side`` against raw libvirt."""
    process = "hostagentd" if side == "hostagent" else side
    lines = [
        f"## {name}",
        "",
        f"| all {size} at once | {side} p50 | {side} p95 | raw p50 | raw p95 | ratio p50 |",
        "|---|---|---|---|---|---|",
    ]
    for op in ("attach", "detach"):
        a, r = getattr(agent, op), getattr(raw, op)
        lines.append(
            f"| {op} | {ms(percentile(a, 0.5))} | {ms(percentile(a, 0.95))}"
            f" | {ms(percentile(r, 0.5))} | {ms(percentile(r, 0.95))}"
            f" | {percentile(a, 0.5) / percentile(r, 0.5):.2f} |"
        )
    rate_agent, rate_raw = attachments_per_second(agent, size), attachments_per_second(raw, size)
    count_agent, count_raw = size * len(agent.attach), size * len(raw.attach)
    lines += [
        "",
        f"throughput ({len(agent.attach)} storms): {side} {rate_agent:.1f} attachments/s, "
        f"raw {rate_raw:.1f} attachments/s, {side}/raw {rate_agent / rate_raw:.2f}",
        f"CPU per attachment: {process} {ms(agent.daemon_cpu / count_agent)}; "
        f"libvirtd {ms(agent.libvirtd_cpu / count_agent)} with {side}, "
        f"{ms(raw.libvirtd_cpu / count_raw)} raw; whole machine "
        f"{ms(agent.busy / count_agent)} with {side}, {ms(raw.busy / count_raw)} raw",
        f"machine CPU use: {agent.busy / agent.wall / CORES * 100:.0f} % of "
        f"{CORES} cores with {side}, {raw.busy / raw.wall / CORES * 100:.0f} % raw",
        "",
    ]
    return lines


@dataclass(frozen=True)
class Goal:
    """One target of issue 11 and what this run measured for it."""

    number: str
    what: str
    measured: float
    limit: float
    at_most: bool  # the target is measured <= limit (else >= limit)
    detail: str = ""

    @property
    def met(self) -> bool:
        return self.measured <= self.limit if self.at_most else self.measured >= self.limit

    def row(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        bound = "≤" if self.at_most else "≥"
        return (
            f"| {self.number} | {self.what} | {self.measured:.2f}{detail} "
            f"| {bound} {self.limit:.2f} | {'yes' if self.met else 'NO'} |"
        )


def goal_table(goals: list[Goal]) -> list[str]:
    """The summary: one row per target measured in this run."""
    return [
        "## targets (issue 11)",
        "",
        "| # | what | measured | target | met |",
        "|---|---|---|---|---|",
        *(goal.row() for goal in goals),
        "",
    ]


def cycle_goal(number: str, what: str, agent: Samples, base: Samples, limit: float) -> Goal:
    """Cycle p50 of ``agent`` against that of ``base``."""
    a, b = agent.cycle_p50(), base.cycle_p50()
    return Goal(number, what, a / b, limit, at_most=True, detail=f"{ms(a)} / {ms(b)}")


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
    """One side of one run: where its samples go, its cycle, its guests, the
    process whose CPU is its own (hostagentd, the proxy; none for raw), and
    whether it runs with the host load on (G3)."""

    samples: Samples
    cycle: Cycle
    streams: list[Guest]
    server_pid: int | None
    loaded: bool = False


def phase_order(round_number: int) -> tuple[bool, bool]:
    """Which runs go first in a round: the quiet ones (False) or the loaded
    ones (True). Alternating cancels what the order itself costs."""
    return (True, False) if round_number % 2 else (False, True)


HostLoad = Callable[[], contextlib.AbstractContextManager[object]]


def measure_one(run: Run, per_round: int, libvirtd: int) -> None:
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


def measure(
    plan: list[Run],
    rounds: int,
    per_round: int,
    load: HostLoad | None = None,
    quiet_pids: list[int] | None = None,
) -> None:
    """Run every entry of ``plan`` once per round, so drift hits all of them
    equally; the ``loaded`` ones inside ``load()``, made anew each round. With
    a load, each phase starts once ``quiet_pids`` are idle."""
    libvirtd = libvirtd_pid()
    pids = [libvirtd, *(quiet_pids or [])]
    for number in range(rounds):
        for loaded in phase_order(number):
            runs = [run for run in plan if run.loaded == loaded]
            if not runs:
                continue
            assert load is not None or not loaded, "loaded runs need a load"
            with load() if loaded and load else contextlib.nullcontext():
                if load is not None and (waited := settle(pids)) > 2:
                    print(
                        f"waited {waited:.0f} s for an idle libvirtd, hostagentd", file=sys.stderr
                    )
                if loaded:
                    warm_up(runs)
                for run in runs:
                    measure_one(run, per_round, libvirtd)


def warm_up(runs: list[Run]) -> None:
    """One unmeasured cycle per run once the load is on: the first guard after
    it reads every new domain's config and walks every new descriptor once
    (what the daemon then remembers); G3 compares the cycles after that."""
    for run in runs:
        attach, detach = run.cycle(run.streams[0], 0)
        print(f"first cycle with the load on: {(attach + detach) * 1000:.0f} ms", file=sys.stderr)


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

    def attach(self, guest: Guest, attachment_id: str, xml: str) -> None:
        body = {"domain_uuid": guest.uuid, "xml": xml, "alias": "ua-raw"}
        self.client.request("PUT", f"/v1/attachments/{attachment_id}", body)

    def detach(self, attachment_id: str) -> None:
        self.client.request("DELETE", f"/v1/attachments/{attachment_id}")

    def cycle(self, guest: Guest, attachment_id: str, xml: str) -> tuple[float, float]:
        started = time.perf_counter()
        self.attach(guest, attachment_id, xml)
        attached = time.perf_counter()
        self.detach(attachment_id)
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
    parser.add_argument(
        "--storm",
        action="store_true",
        help="also measure boot storms (G4): the --parallel guests attach one volume "
        "at once, then detach it at once, --iterations times",
    )
    parser.add_argument(
        "--defined",
        type=int,
        default=0,
        metavar="N",
        help="G3: measure the single stream again with N shut-off persistent domains "
        "(four disks each) defined",
    )
    parser.add_argument(
        "--holders",
        type=int,
        default=0,
        metavar="N",
        help="G3: ... and with helper processes holding N open descriptors in all",
    )
    parser.add_argument(
        "--fds-per-holder",
        type=int,
        default=FDS_PER_HOLDER,
        metavar="N",
        help=f"G3: at most N descriptors per helper process (default {FDS_PER_HOLDER}: "
        "a few big holders); 100 with --busy-holders is a host's running guests' shape",
    )
    parser.add_argument(
        "--busy-holders",
        action="store_true",
        help="G3: a thread of each helper wakes every 10 ms, as a running guest's do",
    )
    args = parser.parse_args()
    if args.fds_per_holder <= 0:
        parser.error("--fds-per-holder must be at least 1")
    return args


@dataclass
class Results:
    """Every side's samples of one run, and how its single streams' DELETEs went."""

    single: Samples = field(default_factory=Samples)  # G2: hostagent, every detach the last
    shared: Samples = field(default_factory=Samples)  # G1: hostagent, the volume kept
    single_raw: Samples = field(default_factory=Samples)
    parallel: Samples = field(default_factory=Samples)
    parallel_raw: Samples = field(default_factory=Samples)
    loaded: Samples = field(default_factory=Samples)  # G3: G2 with the host load on
    loaded_raw: Samples = field(default_factory=Samples)
    storm: Samples = field(default_factory=Samples)  # G4: one sample per storm
    storm_raw: Samples = field(default_factory=Samples)
    single_proxy: Samples = field(default_factory=Samples)
    parallel_proxy: Samples = field(default_factory=Samples)
    storm_proxy: Samples = field(default_factory=Samples)
    single_tally: Tally = field(default_factory=Tally)
    shared_tally: Tally = field(default_factory=Tally)
    loaded_tally: Tally = field(default_factory=Tally)


def holder_shape(args: argparse.Namespace) -> str:
    """How the held descriptors are spread, for the report."""
    per = min(args.fds_per_holder, args.holders) if args.holders else 0
    return f"at most {per} a process{', busy' if args.busy_holders else ', idle'}"


def loaded(args: argparse.Namespace) -> bool:
    return bool(args.defined or args.holders)


def goals(results: Results, args: argparse.Namespace) -> list[Goal]:
    """The targets of issue 11 this run measured (G3-G5 only with their flags)."""
    found = [
        cycle_goal(
            "G1",
            "volume kept by another guest: cycle p50 / raw",
            results.shared,
            results.single_raw,
            1.10,
        ),
        cycle_goal(
            "G2",
            "every detach the last: cycle p50 / raw",
            results.single,
            results.single_raw,
            1.20,
        ),
    ]
    if loaded(args):
        what = (
            f"G2 with {args.defined} domains, {args.holders} fds ({holder_shape(args)}) / G2 quiet"
        )
        found.append(cycle_goal("G3", what, results.loaded, results.single, 1.30))
    if args.storm:
        size = args.parallel
        agent = attachments_per_second(results.storm, size)
        raw = attachments_per_second(results.storm_raw, size)
        what = f"boot storm, {size} at once: attachments/s / raw"
        detail = f"{agent:.1f} / {raw:.1f} per s"
        found.append(Goal("G4", what, agent / raw, 0.85, at_most=False, detail=detail))
    if args.proxy_floor:
        agent, proxy = results.parallel.cpu_per_cycle(), results.parallel_proxy.cpu_per_cycle()
        what = "parallel: hostagentd CPU per cycle / bare proxy's"
        detail = f"{ms(agent)} / {ms(proxy)}"
        found.append(Goal("G5", what, agent / proxy, 2.0, at_most=True, detail=detail))
    return found


def full_report(results: Results, args: argparse.Namespace, cycles: int) -> list[str]:
    """Every section of the run, then the targets table."""
    r = results
    single, parallel = "single stream (1 guest)", f"parallel ({args.parallel} guests)"
    lines = [
        f"# attach/detach benchmark: {cycles} cycles per stream, "
        f"{args.parallel} guests in parallel, {args.parallel + 1} guests running",
        "",
        *report(f"G2: {single}, every detach the last", r.single, r.single_raw),
        r.single_tally.describe(),
        "",
        *report(f"G1: {single}, the volume kept by another guest", r.shared, r.single_raw),
        r.shared_tally.describe(),
        "",
        *report(parallel, r.parallel, r.parallel_raw),
    ]
    if loaded(args):
        shape = holder_shape(args)
        load = f"{args.defined} domains defined, {args.holders} descriptors held ({shape})"
        lines += [
            *report(f"G3: {single} with {load}", r.loaded, r.loaded_raw),
            r.loaded_tally.describe(),
            f"loaded / quiet cycle p50: hostagent "
            f"{r.loaded.cycle_p50() / r.single.cycle_p50():.2f}, raw "
            f"{r.loaded_raw.cycle_p50() / r.single_raw.cycle_p50():.2f}",
            "",
        ]
    storm = f"boot storm ({args.parallel} guests)"
    if args.storm:
        lines += storm_report(f"G4: {storm}", r.storm, r.storm_raw, args.parallel, "hostagent")
    if args.proxy_floor:
        lines += report(f"{single}, the proxy floor", r.single_proxy, r.single_raw, "proxy")
        lines += report(
            f"{parallel}, the proxy floor", r.parallel_proxy, r.parallel_raw, "proxy", r.parallel
        )
        if args.storm:
            lines += storm_report(
                f"{storm}, the proxy floor", r.storm_proxy, r.storm_raw, args.parallel, "proxy"
            )
    return lines + goal_table(goals(results, args))


class Bench:
    """The cycles of every side on this run's guests and devices, and the plan
    that runs them; ``close`` ends what it started (the proxy, storm threads)."""

    def __init__(
        self,
        args: argparse.Namespace,
        conn: Any,
        *,
        daemon: Daemon,
        guests: list[Guest],
        device: str,
        workdir: Path,
    ) -> None:
        self.args = args
        self.conn = conn
        self.daemon = daemon
        self.guests = guests
        self.device = device  # nothing but the measured attachments ever hold it
        self.workdir = workdir
        self.results = Results()
        self.removals = RemovalEvents(conn)
        self.handles = {guest.uuid: guest.dom for guest in guests}  # raw keeps its handles
        self.xml_of = raw_disk_xml(daemon, guests, device)
        self.ids = itertools.count()
        self.proxy: ProxyFloor | None = None
        self.storms: list[Storm] = []

    @property
    def daemon_pid(self) -> int:
        assert self.daemon.process is not None
        return self.daemon.process.pid

    def hostagent(self, volume_id: str, device: str, tally: Tally | None = None) -> Cycle:
        def cycle(guest: Guest, i: int) -> tuple[float, float]:
            # Attachment ids are single-use: a fresh one per cycle.
            attachment_id = f"bench-{next(self.ids)}"
            return hostagent_cycle(
                self.daemon, guest, device, attachment_id, volume_id=volume_id, tally=tally
            )

        return cycle

    def raw(self, guest: Guest, i: int) -> tuple[float, float]:
        dom, xml = self.handles[guest.uuid], self.xml_of[guest.uuid]
        return raw_cycle(guest, dom, xml, "ua-raw", self.removals)

    def plan(self, holder: Guest, shared_device: str) -> list[Run]:
        """Warm every path, attach the volume G1 shares to ``holder``, and list the runs."""
        r, one, pid = self.results, self.guests[:1], self.daemon_pid
        agent = self.hostagent("bench", self.device)
        run_streams(one, 3, agent)
        run_streams(one, 3, self.raw)
        self.daemon.client.attach(
            "bench-holder",
            local_request(shared_device, holder, volume_id="bench-shared", multiattach=True),
        )
        run_streams(one, 3, self.hostagent("bench-shared", shared_device))
        shared = self.hostagent("bench-shared", shared_device, r.shared_tally)
        plan = [
            Run(r.single, self.hostagent("bench", self.device, r.single_tally), one, pid),
            Run(r.shared, shared, one, pid),
            Run(r.single_raw, self.raw, one, None),
            Run(r.parallel, agent, self.guests, pid),
            Run(r.parallel_raw, self.raw, self.guests, None),
        ]
        if self.args.storm:
            plan += [
                self._storm(r.storm, self.storm_attach, self.storm_detach, pid),
                self._storm(r.storm_raw, self.raw_attach, self.raw_detach, None),
            ]
        if self.args.proxy_floor:
            plan += self._proxy_runs()
        if loaded(self.args):
            loaded_agent = self.hostagent("bench", self.device, r.loaded_tally)
            plan += [
                Run(r.loaded, loaded_agent, one, pid, loaded=True),
                Run(r.loaded_raw, self.raw, one, None, loaded=True),
            ]
        return plan

    def _storm(
        self,
        samples: Samples,
        attach: Callable[[Guest], str],
        detach: Callable[[Guest, str], None],
        pid: int | None,
    ) -> Run:
        storm = Storm(self.guests, attach, detach)
        self.storms.append(storm)
        run_streams(self.guests[:1], 1, storm.cycle)  # warm its threads and paths
        return Run(samples, storm.cycle, self.guests[:1], pid)

    def storm_attach(self, guest: Guest) -> str:
        attachment_id = f"bench-{next(self.ids)}"
        request = local_request(self.device, guest, volume_id="bench", multiattach=True)
        self.daemon.client.attach(attachment_id, request)
        return attachment_id

    def storm_detach(self, guest: Guest, attachment_id: str) -> None:
        self.daemon.client.detach(attachment_id)

    def raw_attach(self, guest: Guest) -> str:
        self.handles[guest.uuid].attachDeviceFlags(
            self.xml_of[guest.uuid], libvirt.VIR_DOMAIN_AFFECT_LIVE
        )
        return "ua-raw"

    def raw_detach(self, guest: Guest, alias: str) -> None:
        raw_detach(guest, self.handles[guest.uuid], alias, self.removals)

    def _proxy_runs(self) -> list[Run]:
        r, one = self.results, self.guests[:1]
        floor = self.proxy = ProxyFloor(self.workdir / "proxy.sock", self.workdir / "proxy.log")

        def bare(guest: Guest, i: int) -> tuple[float, float]:
            return floor.cycle(guest, f"proxy-{next(self.ids)}", self.xml_of[guest.uuid])

        def proxy_attach(guest: Guest) -> str:
            attachment_id = f"proxy-{next(self.ids)}"
            floor.attach(guest, attachment_id, self.xml_of[guest.uuid])
            return attachment_id

        def proxy_detach(guest: Guest, attachment_id: str) -> None:
            floor.detach(attachment_id)

        run_streams(one, 3, bare)
        pid = floor.process.pid
        runs = [Run(r.single_proxy, bare, one, pid), Run(r.parallel_proxy, bare, self.guests, pid)]
        if self.args.storm:
            runs.append(self._storm(r.storm_proxy, proxy_attach, proxy_detach, pid))
        return runs

    def load(self) -> HostLoad | None:
        """G3's load, made anew on each entry; None without --defined or --holders."""
        if not loaded(self.args):
            return None
        defined, holders = self.args.defined, self.args.holders

        @contextlib.contextmanager
        def host_load() -> Iterator[None]:
            started = time.monotonic()
            fd_holders = FdHolders(
                holders, per_process=self.args.fds_per_holder, busy=self.args.busy_holders
            )
            with DefinedDomains(self.conn, defined, self.workdir), fd_holders:
                took = time.monotonic() - started
                print(
                    f"load on in {took:.1f} s: {defined} domains defined, {holders} fds held "
                    f"by {len(fd_holders.processes)} processes",
                    file=sys.stderr,
                )
                yield

        return host_load

    def server_pids(self) -> list[int]:
        return [self.daemon_pid] + ([self.proxy.process.pid] if self.proxy else [])

    def close(self) -> None:
        for storm in self.storms:
            storm.close()
        if self.proxy is not None:
            self.proxy.stop()


def main() -> int:
    args = parse_args()

    conn = start_libvirt_events()
    remove_stale_guests(conn)
    workdir = Path(tempfile.mkdtemp(prefix="ha-bench-", dir="/tmp"))
    loops = LoopDevices(workdir)
    made = Guests(conn)
    daemon = Daemon(
        workdir / "state",
        workdir / "d.sock",
        workdir / "daemon.log",
        options={"reconcile.interval": "0", **daemon_options(args.daemon_option)},
    )
    bench: Bench | None = None
    try:
        device = loops.make(16)  # G2, the parallel run, storms: nothing else holds it
        shared_device = loops.make(16)  # G1: the holder guest keeps it attached
        guests = [made.make() for _ in range(args.parallel)]
        holder = made.make()  # apart: its disk would take the unit the raw XML names
        daemon.start()
        print(f"guests idle after {wait_until_idle([*guests, holder]):.0f} s", file=sys.stderr)
        bench = Bench(args, conn, daemon=daemon, guests=guests, device=device, workdir=workdir)
        plan = bench.plan(holder, shared_device)
        per_round = max(1, args.iterations // ROUNDS)
        measure(plan, ROUNDS, per_round, bench.load(), bench.server_pids())
        daemon.client.detach("bench-holder")
        print("\n".join(full_report(bench.results, args, per_round * ROUNDS)))
    finally:
        if bench is not None:
            bench.close()
        daemon.stop()
        made.cleanup()
        loops.cleanup()
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
