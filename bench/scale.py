#!/usr/bin/env python3
"""Scale: reconcile time, CLI reads and memory of hostagentd with hundreds of attachments.

Against a real hostagentd on this host's libvirtd it measures

  G6  ``POST /v1/reconcile`` wall time with 400 attachments over 200 domains,
      and its ratio to the time with 50 attachments over 25 domains;
  G7  ``hostagentctl status`` and ``hostagentctl list`` wall time (the
      installed console script, as an operator runs it) with 400 attachments;
  G8  hostagentd's VmRSS and VmHWM with 400 attachments.

Domains are persistent and mostly shut off (an attach to a shut-off domain
goes to its config only; API.md): 200 running guests would need 200 QEMUs.
A few (``--running``, same share in both sizes) run, so reconcile reads live
XML too. Volumes are loop devices, each attached multiattach to many domains.

One daemon, sizes interleaved: small (50), grown to large (400), shrunk back
to small (detach and undefine what the growth added). Reconcile scans every
domain of the host, so the small size must have only its own domains; both
small passes bracket the large one, so drift on this shared machine shows as
a difference between them instead of hiding in the ratio. Run as root:

    .venv/bin/python bench/scale.py [--attachments 400 --domains 200 --small 50]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hostagent.client import ApiError, HostagentClient
from tests.integration.support import (
    GUEST_PREFIX,
    LIBVIRT_URI,
    QBOOT,
    Daemon,
    Guest,
    Guests,
    LoopDevices,
    guest_xml,
    local_request,
    remove_domain,
    remove_stale_guests,
)

RECONCILE_TARGET_S = 2.0
RECONCILE_RATIO_TARGET = 1.5
CLI_TARGET_MS = 150.0
RSS_TARGET_MB = 80.0  # decimal MB (10^6 bytes): the stricter reading of "80 MB"

T = TypeVar("T")


@dataclass(frozen=True)
class Placement:
    """The ``round``-th attachment of domain number ``domain``, of volume ``volume``."""

    domain: int
    round: int
    volume: int

    @property
    def attachment_id(self) -> str:
        return f"scale-d{self.domain}-r{self.round}"


def spread(attachments: int, domains: int, volumes: int) -> list[Placement]:
    """Attachment i goes to domain i % domains, so attaches made one after another
    hit different domains (and rarely wait on one domain's lock); a domain's r-th
    goes to volume (domain + r) % volumes, never one volume twice on a domain."""
    if domains < 1 or volumes < 1 or attachments < 0:
        raise ValueError("domains and volumes must be at least 1")
    if -(-attachments // domains) > volumes:
        raise ValueError(
            f"{attachments} attachments over {domains} domains put more than "
            f"{volumes} on a domain: a domain would get one volume twice"
        )
    return [
        Placement(i % domains, i // domains, (i % domains + i // domains) % volumes)
        for i in range(attachments)
    ]


def small_domain_count(small: int, attachments: int, domains: int) -> int:
    """The domains of the small size: the large size's attachments per domain."""
    return max(1, round(small * domains / attachments))


def running_domains(running: int, small_domains: int, domains: int) -> tuple[set[int], set[int]]:
    """Which domains run, in the small size and in the large: the same share of each
    (at least one in the small size if any run), the small size's first in both."""
    running = min(running, domains)
    in_small = min(small_domains, max(1, round(running * small_domains / domains)))
    in_small = in_small if running else 0
    grown = range(small_domains, min(domains, small_domains + running - in_small))
    return set(range(in_small)), set(range(in_small)) | set(grown)


def median_ms(values: Sequence[float]) -> float:
    return statistics.median(values) * 1000


def spread_text(values: Sequence[float]) -> str:
    """median, min, max in ms, and every value: the raw figures."""
    raw = ", ".join(f"{v * 1000:.0f}" for v in values)
    return (
        f"median {median_ms(values):.0f} ms, min {min(values) * 1000:.0f}, "
        f"max {max(values) * 1000:.0f} (ms: {raw})"
    )


def row(number: str, what: str, measured: float, target: float, unit: str) -> str:
    """One line of the summary table; ``met`` is measured ≤ target."""
    met = "yes" if measured <= target else "NO"
    return f"| {number} | {what} | {measured:.2f} {unit} | ≤ {target:g} {unit} | {met} |"


@dataclass
class Phase:
    """One size of the run: what was on the host and how long reconcile took."""

    name: str
    attachments: int
    domains: int
    running: int
    host_domains: int = 0
    reconcile: list[float] = field(default_factory=list)
    actions: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        return (
            f"{self.name}: {self.attachments} attachments over {self.domains} domains "
            f"({self.running} running; {self.host_domains} domains on the host)"
        )


def in_parallel(work: Callable[[T], Any], items: Iterable[T], workers: int) -> float:
    """Run ``work`` on every item with ``workers`` threads; returns the wall time.
    The first failure is raised once all have run."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(work, items))
    return time.perf_counter() - started


def define_guest(made: Guests, index: int, *, start: bool) -> Guest:
    """A persistent test domain (qboot if QEMU has it), started only if asked.
    Its name has the test-guest prefix and this pid: a killed run's domains go
    with the next run's stale-guest cleanup."""
    name = f"{GUEST_PREFIX}{os.getpid()}-scale-{index}"
    dom = made.conn.defineXML(guest_xml(name))
    guest = Guest(made.conn, name, dom.UUIDString(), persistent=True)
    made.created.append(guest)  # before the start: a failed start is still undefined
    if start:
        dom.create()
    return guest


def reconcile_times(client: HostagentClient, repeats: int, phase: Phase) -> None:
    """``repeats`` timed reconciles after one untimed (first touches of caches)."""
    client.request("POST", "/v1/reconcile")
    for _ in range(repeats):
        started = time.perf_counter()
        _, report = client.request("POST", "/v1/reconcile")
        phase.reconcile.append(time.perf_counter() - started)
        phase.actions.update(action["action"] for action in report["actions"])


def compile_bytecode() -> str:
    """Write hostagent's bytecode, as installing it from a wheel does (pip
    compiles at install). An editable checkout has it only where some earlier
    run wrote it, and with PYTHONDONTWRITEBYTECODE set (this sandbox) never:
    every CLI start would compile the changed modules from source again
    (~20 ms for cli.py and client.py), which no installed host pays."""
    package = Path(__file__).resolve().parents[1] / "hostagent"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)
    return f"bytecode of {package} compiled first, as an install does"


def cli_program() -> list[str]:
    """The installed console script beside this Python (what an operator runs),
    else the module."""
    script = Path(sys.executable).parent / "hostagentctl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "hostagent.cli"]


def wall_times(programs: dict[str, list[str]], repeats: int) -> dict[str, list[float]]:
    """Wall time of each program, interleaved, after one untimed run of each."""
    times: dict[str, list[float]] = {name: [] for name in programs}
    for round_number in range(repeats + 1):
        for name, program in programs.items():
            started = time.perf_counter()
            result = subprocess.run(program, capture_output=True, text=True, check=False)
            elapsed = time.perf_counter() - started
            if result.returncode != 0:
                raise RuntimeError(f"{shlex.join(program)} exited {result.returncode}: {result}")
            if round_number:
                times[name].append(elapsed)
    return times


def cli_times(socket_path: Path, repeats: int) -> dict[str, list[float]]:
    """``hostagentctl status`` and ``list``, as an operator runs them."""
    program = [*cli_program(), "--socket", str(socket_path)]
    return wall_times({c: [*program, c] for c in ("status", "list")}, repeats)


def cli_parts(client: HostagentClient, repeats: int) -> dict[str, list[float]]:
    """What a CLI run is made of: the interpreter's start, the CLI's imports, and
    the daemon's answers (in-process requests: ``status`` sends the health and
    metrics ones, ``list`` the attachments one)."""
    times = wall_times(
        {
            "python -c pass": [sys.executable, "-c", "pass"],
            "python -c 'import hostagent.cli'": [sys.executable, "-c", "import hostagent.cli"],
        },
        repeats,
    )
    for path in ("/v1/health", "/metrics", "/v1/attachments", "/v1/connections"):
        client.text(path)
        times[f"GET {path}"] = []
        for _ in range(repeats):
            started = time.perf_counter()
            client.text(path)
            times[f"GET {path}"].append(time.perf_counter() - started)
    return times


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB, from /proc/PID/status."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def mb(kib: int) -> float:
    return kib * 1024 / 1e6


class Fleet:
    """The domains and volumes of the run, attached and detached through the API."""

    def __init__(self, made: Guests, loops: LoopDevices, client: HostagentClient, workers: int):
        self.made = made
        self.loops = loops
        self.client = client
        self.workers = workers
        self.guests: dict[int, Guest] = {}
        self.devices: dict[int, str] = {}

    def volumes(self, count: int) -> None:
        for volume in range(len(self.devices), count):
            self.devices[volume] = self.loops.make(16)

    def define(self, indices: Iterable[int], running: set[int]) -> float:
        def one(index: int) -> None:
            self.guests[index] = define_guest(self.made, index, start=index in running)

        return in_parallel(one, [i for i in indices if i not in self.guests], self.workers)

    def attach(self, placements: Sequence[Placement]) -> float:
        def one(placement: Placement) -> None:
            body = local_request(
                self.devices[placement.volume],
                self.guests[placement.domain],
                volume_id=f"scale-vol-{placement.volume}",
                multiattach=True,
            )
            self.client.request("PUT", f"/v1/attachments/{placement.attachment_id}", body)

        return in_parallel(one, placements, self.workers)

    def detach(self, attachment_ids: Sequence[str]) -> float:
        def one(attachment_id: str) -> None:
            self.client.request("DELETE", f"/v1/attachments/{attachment_id}")

        return in_parallel(one, attachment_ids, self.workers)

    def undefine(self, indices: Iterable[int]) -> float:
        chosen = [self.guests.pop(i) for i in indices if i in self.guests]

        def one(guest: Guest) -> None:
            remove_domain(self.made.conn, guest.uuid)
            self.made.created.remove(guest)

        return in_parallel(one, chosen, self.workers)


def tear_down(daemon: Daemon, made: Guests, loops: LoopDevices, workers: int) -> list[str]:
    """Detach every attachment, stop the daemon, undefine our domains, free the loop
    devices; each step runs even if the one before it failed. Returns what failed."""
    problems: list[str] = []
    if daemon.process is not None and daemon.process.poll() is None:
        client = daemon.client
        try:
            ids = [
                a["attachment_id"]
                for a in client.request("GET", "/v1/attachments")[1]["attachments"]
            ]
        except ApiError as exc:
            ids, problems = [], [f"listing attachments: {exc}"]

        def one(attachment_id: str) -> None:
            try:
                client.request("DELETE", f"/v1/attachments/{attachment_id}")
            except ApiError as exc:
                problems.append(f"detach {attachment_id}: {exc}")

        in_parallel(one, ids, workers)
    # Stopped before the undefines: it would only answer their events.
    code = daemon.stop()
    if code != 0:
        problems.append(f"hostagentd exited {code}")
    made.cleanup()
    loops.cleanup()
    return problems


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--attachments", type=int, default=400, help="the large size")
    parser.add_argument("--domains", type=int, default=200, help="domains of the large size")
    parser.add_argument(
        "--small",
        type=int,
        default=50,
        help="attachments of the small size, over the same share of domains",
    )
    parser.add_argument("--volumes", type=int, default=20, help="loop devices, multiattach")
    parser.add_argument("--running", type=int, default=8, help="running domains of the large size")
    parser.add_argument("--repeats", type=int, default=7, help="timed reconciles per pass")
    parser.add_argument("--cli-repeats", type=int, default=10, help="timed runs per command")
    parser.add_argument("--workers", type=int, default=8, help="concurrent API requests")
    args = parser.parse_args(argv)
    if not 0 < args.small < args.attachments:
        parser.error("--small must be between 0 and --attachments")
    return args


def stop_on_sigterm() -> None:
    """SIGTERM ends the run like ^C: through the tear-down."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def report(
    args: argparse.Namespace,
    phases: Sequence[Phase],
    *,
    cli: dict[str, list[float]],
    parts: dict[str, list[float]],
    memory: dict[str, int],
    builds: list[str],
) -> list[str]:
    small_before, large, small_after = phases
    small = small_before.reconcile + small_after.reconcile
    large_s = statistics.median(large.reconcile)
    ratio = large_s / statistics.median(small)
    n = args.attachments
    lines = [
        f"# hostagentd at scale: {n} attachments over {args.domains} domains",
        "",
        "| # | what | measured | target | met |",
        "|---|---|---|---|---|",
        row("G6", f"reconcile, {n} attachments (median)", large_s, RECONCILE_TARGET_S, "s"),
        row(
            "G6", f"reconcile {n} / reconcile {args.small}", ratio, RECONCILE_RATIO_TARGET, "times"
        ),
    ]
    for command, times in cli.items():
        lines.append(
            row("G7", f"hostagentctl {command} (median)", median_ms(times), CLI_TARGET_MS, "ms")
        )
    for key in ("VmRSS", "VmHWM"):
        lines.append(row("G8", f"hostagentd {key}", mb(memory[key]), RSS_TARGET_MB, "MB"))
    lines += ["", "## raw figures", ""]
    for phase in phases:
        seen = ", ".join(f"{k} x{v}" for k, v in sorted(phase.actions.items())) or "none"
        lines += [
            f"- {phase.describe()}",
            f"  - reconcile: {spread_text(phase.reconcile)}; actions reported: {seen}",
        ]
    lines.append(f"- small passes pooled: {spread_text(small)}")
    for command, times in cli.items():
        lines.append(f"- `hostagentctl {command}`: {spread_text(times)}")
    lines += [f"  - part: `{name}`: {spread_text(times)}" for name, times in parts.items()]
    lines += [
        f"- hostagentd with {n} attachments: VmRSS {memory['VmRSS']} KiB, "
        f"VmHWM {memory['VmHWM']} KiB (the peak since its start, building included)",
        f"- CLI run as: {shlex.join(cli_program())}",
        *(f"- {line}" for line in builds),
        "",
        f"command: {shlex.join([sys.executable, *sys.argv])}",
    ]
    return lines


@dataclass(frozen=True)
class Plan:
    """What each size holds: the small size is the first part of the large one."""

    small_domains: int
    small: list[Placement]
    growth: list[Placement]
    running_small: set[int]
    running_large: set[int]


def make_plan(attachments: int, domains: int, small: int, volumes: int, running: int) -> Plan:
    """The placements of both sizes; ValueError if the sizes do not fit together."""
    small_domains = small_domain_count(small, attachments, domains)
    large_plan = spread(attachments, domains, volumes)
    small_plan = spread(small, small_domains, volumes)
    if not set(small_plan) <= set(large_plan):
        raise ValueError(
            f"{small} attachments over {small_domains} domains is not a part of "
            f"{attachments} over {domains}: pick sizes with the same attachments per domain"
        )
    growth = [p for p in large_plan if p not in set(small_plan)]
    running_small, running_large = running_domains(running, small_domains, domains)
    return Plan(small_domains, small_plan, growth, running_small, running_large)


def measure(
    args: argparse.Namespace, plan: Plan, fleet: Fleet, daemon: Daemon, conn: Any
) -> list[str]:
    """Small, grown to large, shrunk back to small; returns the report."""
    assert daemon.process is not None
    pid, client, small_domains = daemon.process.pid, fleet.client, plan.small_domains
    phases = [
        Phase("small, before growing", args.small, small_domains, len(plan.running_small)),
        Phase("large", args.attachments, args.domains, len(plan.running_large)),
        Phase("small, after shrinking", args.small, small_domains, len(plan.running_small)),
    ]
    builds: list[str] = []
    fleet.volumes(args.volumes)
    took = fleet.define(range(small_domains), plan.running_small)
    took_attach = fleet.attach(plan.small)
    builds.append(
        f"built the small size: {small_domains} domains defined in {took:.1f} s, "
        f"{len(plan.small)} attaches in {took_attach:.1f} s ({args.workers} at a time)"
    )
    phases[0].host_domains = len(conn.listAllDomains(0))
    reconcile_times(client, args.repeats, phases[0])
    small_memory = memory_kib(pid)
    builds.append(
        f"hostagentd with {args.small} attachments: VmRSS {small_memory['VmRSS']} KiB, "
        f"VmHWM {small_memory['VmHWM']} KiB"
    )

    grown = range(small_domains, args.domains)
    took = fleet.define(grown, plan.running_large)
    took_attach = fleet.attach(plan.growth)
    builds.append(
        f"grew to the large size: {len(grown)} domains defined in {took:.1f} s, "
        f"{len(plan.growth)} attaches in {took_attach:.1f} s "
        f"({len(plan.growth) / took_attach:.0f}/s)"
    )
    phases[1].host_domains = len(conn.listAllDomains(0))
    reconcile_times(client, args.repeats, phases[1])
    cli = cli_times(daemon.socket_path, args.cli_repeats)
    parts = cli_parts(client, args.cli_repeats)
    memory = memory_kib(pid)

    took = fleet.detach([p.attachment_id for p in plan.growth])
    took_undefine = fleet.undefine(grown)
    builds.append(
        f"shrank back: {len(plan.growth)} detaches in {took:.1f} s, "
        f"{len(grown)} domains undefined in {took_undefine:.1f} s"
    )
    phases[2].host_domains = len(conn.listAllDomains(0))
    reconcile_times(client, args.repeats, phases[2])
    return report(args, phases, cli=cli, parts=parts, memory=memory, builds=builds)


def main() -> int:
    args = parse_args()
    try:
        plan = make_plan(args.attachments, args.domains, args.small, args.volumes, args.running)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    stop_on_sigterm()
    started = time.monotonic()
    if not QBOOT.exists():
        print(f"no {QBOOT}: running guests probe with SeaBIOS first", file=sys.stderr)

    libvirt.registerErrorHandler(lambda opaque, error: None, None)
    conn = libvirt.open(LIBVIRT_URI)
    remove_stale_guests(conn)
    workdir = Path(tempfile.mkdtemp(prefix="ha-scale-", dir="/tmp"))
    loops = LoopDevices(workdir)
    made = Guests(conn)
    daemon = Daemon(
        workdir / "state",
        workdir / "d.sock",
        workdir / "daemon.log",
        options={"reconcile.interval": "0"},  # only the reconciles we ask for
    )
    lines: list[str] = []
    problems: list[str] = []
    try:
        compiled = compile_bytecode()  # before hostagentd starts: G7 and G8 both
        daemon.start()
        lines = measure(args, plan, Fleet(made, loops, daemon.client, args.workers), daemon, conn)
    finally:
        problems = tear_down(daemon, made, loops, args.workers)
        conn.close()
        if problems:
            print(f"tear-down: {'; '.join(problems)}", file=sys.stderr)
        if problems or not lines:
            print(f"the daemon's log and state stay in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if lines:
        lines.append(compiled)
    lines.append(f"run took {time.monotonic() - started:.0f} s")
    print("\n".join(lines))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
