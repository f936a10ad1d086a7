"""Random load while the daemon is SIGKILLed and restarted, and SIGTERM under load.

Seeds are printed; ``HOSTAGENT_CHAOS_SEED=<n>`` replays one.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import libvirt

from hostagent.api.models import DetachResult
from hostagent.client import ApiError, HostagentClient
from hostagent.host.holders import processes_holding
from tests.conftest import DaemonFactory
from tests.integration.support import (
    Daemon,
    Guest,
    Guests,
    LoopDevices,
    assert_consistent,
    local_request,
    unique,
)

GUESTS = 4
VOLUMES = 3
WORKERS = 8
KILL_ROUNDS = 5


class Abandoned(Exception):
    """A retried request given up because the test is stopping."""


def seeded() -> random.Random:
    seed = int(os.environ.get("HOSTAGENT_CHAOS_SEED", random.randrange(1 << 30)))
    print(f"chaos seed {seed} (HOSTAGENT_CHAOS_SEED={seed} replays it)")
    return random.Random(seed)


@dataclass
class Load:
    """Workers attaching and detaching (guest, volume) pairs at random.

    Each request is retried, with the same attachment id, until the daemon
    answers it: what a virt driver does across an agent restart.
    """

    client: HostagentClient
    guests: list[Guest]
    devices: list[str]
    rng: random.Random
    retry: bool = True
    retry_codes: frozenset[str] = frozenset({"unreachable", "libvirt_unavailable"})
    attached: dict[tuple[int, int], str] = field(default_factory=dict)
    detached: dict[str, DetachResult] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    answered_during_stop: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    paused: threading.Event = field(default_factory=threading.Event)
    busy: int = 0
    mutex: threading.Lock = field(default_factory=threading.Lock)
    pair_locks: dict[tuple[int, int], threading.Lock] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pair_locks = {
            (g, v): threading.Lock()
            for g in range(len(self.guests))
            for v in range(len(self.devices))
        }

    def _call(self, request: Callable[[], Any]) -> Any:
        while True:
            try:
                return request()
            except ApiError as exc:
                if exc.code in self.retry_codes and self.retry:
                    if self.stop.is_set():
                        raise Abandoned(str(exc)) from exc
                    time.sleep(0.05)
                    continue
                raise

    def _one(self, rng: random.Random) -> None:
        pair = (rng.randrange(len(self.guests)), rng.randrange(len(self.devices)))
        with self.pair_locks[pair]:
            g, v = pair
            if pair in self.attached:
                attachment_id = self.attached[pair]
                result = self._call(lambda: self.client.detach(attachment_id))
                del self.attached[pair]
                self.detached[attachment_id] = result
            else:
                attachment_id = unique("chaos")
                body = local_request(
                    self.devices[v], self.guests[g], volume_id=f"vol{v}", multiattach=True
                )
                self._call(lambda: self.client.attach(attachment_id, body))
                self.attached[pair] = attachment_id

    def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            if self.paused.is_set():
                time.sleep(0.02)
                continue
            with self.mutex:
                self.busy += 1
            try:
                self._one(rng)
            except Abandoned:
                pass
            except ApiError as exc:
                self.errors.append(str(exc))
            finally:
                with self.mutex:
                    self.busy -= 1

    def quiesce(self) -> None:
        self.paused.set()
        deadline = time.monotonic() + 60
        while self.busy:
            assert time.monotonic() < deadline, "workers did not settle"
            time.sleep(0.02)

    def start(self) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self.worker, args=(self.rng.randrange(1 << 30),))
            for _ in range(WORKERS)
        ]
        for thread in threads:
            thread.start()
        return threads


def assert_detach_results_sound(
    client: HostagentClient,
    load: Load,
    kept: frozenset[str] = frozenset(),
    *,
    released_later: bool = False,
) -> None:
    """terminate_connection exactly when the release happened; ``kept`` are the
    connections held for a device still open in a process. With
    ``released_later`` a last detach may also have kept a connection that is
    gone now: its holder (an orphan disk in a guest the test destroyed) went
    away and reconcile released it."""
    live_keys = {c.connection_key for c in client.connections().connections}
    for attachment_id, result in load.detached.items():
        assert result.terminate_connection == result.host_disconnected, result
        if result.terminate_connection:
            assert result.host_refcount == 0, result
        elif result.host_refcount == 0:
            gone = released_later and result.connection_key not in live_keys
            assert result.connection_key in kept or gone, result
        assert client.detach(attachment_id) == result, "a replay repeats the first answer"


def finish(
    client: HostagentClient, load: Load, guests: list[Guest], *, orphans_allowed: bool = False
) -> None:
    """Detach everything left; then nothing may remain but, when allowed,
    connections whose device a QEMU still holds open without libvirt knowing."""
    for pair, attachment_id in list(load.attached.items()):
        load.detached[attachment_id] = client.detach(attachment_id)
        del load.attached[pair]
    assert client.list() == []
    kept = frozenset(c.connection_key for c in client.connections().connections)
    for connection in client.connections().connections:
        assert orphans_allowed, f"{connection.connection_key} left connected"
        assert connection.device_path is not None
        holders = processes_holding(connection.device_path)
        assert holders, f"{connection.connection_key} kept, yet nobody holds it"
        print(f"kept {connection.connection_key}: open in {holders}")
    for guest in guests:
        with contextlib.suppress(libvirt.libvirtError):  # a guest the test destroyed
            assert not any(a.startswith("ua-") for a in guest.aliases()), guest.name
    assert_detach_results_sound(client, load, kept, released_later=orphans_allowed)


def make_world(guests: Guests, loops: LoopDevices) -> tuple[list[Guest], list[str]]:
    domains = [guests.make(persistent=n % 2 == 0) for n in range(GUESTS)]
    return domains, [loops.make(4) for _ in range(VOLUMES)]


def test_sigkill_at_random_moments_under_load(
    daemon_factory: DaemonFactory, guests: Guests, loops: LoopDevices
) -> None:
    rng = seeded()
    daemon = daemon_factory(**{"reconcile.interval": "0"})
    domains, devices = make_world(guests, loops)
    load = Load(daemon.client, domains, devices, rng)
    threads = load.start()
    try:
        for round_ in range(KILL_ROUNDS):
            time.sleep(rng.uniform(0.3, 2.0))
            daemon.kill()
            time.sleep(rng.uniform(0.0, 0.5))
            daemon.start()
            load.quiesce()
            assert_consistent(daemon.client, domains)
            listed = {a.attachment_id for a in daemon.client.list()}
            assert listed == set(load.attached.values()), f"round {round_}"
            load.paused.clear()
    finally:
        load.stop.set()
        load.paused.clear()
        for thread in threads:
            thread.join(120)
    assert load.errors == []
    assert daemon.log().count("connecting local:") >= 1
    finish(daemon.client, load, domains)


def unfinished_rows(daemon: Daemon) -> list[tuple[str, str]]:
    with sqlite3.connect(daemon.state_dir / "hostagent.sqlite3") as db:
        return db.execute(
            "SELECT attachment_id, state FROM attachments WHERE state != 'attached'"
            " UNION ALL SELECT connection_key, state FROM connections"
            " WHERE state != 'connected'"
        ).fetchall()


def test_sigterm_under_load_finishes_requests_in_flight_and_exits_zero(
    daemon_factory: DaemonFactory, guests: Guests, loops: LoopDevices
) -> None:
    rng = seeded()
    daemon = daemon_factory(**{"reconcile.interval": "0"})
    domains, devices = make_world(guests, loops)
    load = Load(daemon.client, domains, devices, rng, retry=False)
    threads = load.start()
    time.sleep(rng.uniform(1.0, 2.0))
    assert daemon.process is not None
    daemon.process.terminate()
    load.stop.set()
    for thread in threads:
        thread.join(120)
    assert daemon.process.wait(60) == 0
    assert "stopped cleanly" in daemon.log()
    # Requests cut off before a handler took them did nothing; those taken finished.
    assert all(e.startswith("0 unreachable") for e in load.errors), load.errors
    assert unfinished_rows(daemon) == [], "SIGTERM left a half-done step"

    daemon.start()
    assert_consistent(daemon.client, domains)
    listed = {a.attachment_id for a in daemon.client.list()}
    assert set(load.attached.values()) <= listed
    for attachment_id in listed - set(load.attached.values()):
        # an attach that completed after its caller lost the connection
        load.attached[(-1, len(load.attached))] = attachment_id
    finish(daemon.client, load, domains)
