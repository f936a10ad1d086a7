"""SIGKILL at every step of attach and detach, restart, and check what is left.

Each case runs a real daemon with ``HOSTAGENT_FAILPOINTS=<point>:<n>`` so it
kills itself the n-th time it reaches the point, restarts it without the
failpoint (start-up reconcile runs before the socket accepts requests), and
asserts: store, API and guests' XML agree; no connection without users; no
device taken from a guest; the caller's retry of the same request completes
with the documented result; terminate_connection came exactly once.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest

from hostagent.client import ApiError
from tests.conftest import DaemonFactory
from tests.integration.support import (
    Daemon,
    Guest,
    Guests,
    assert_consistent,
    local_request,
    unique,
)

# (failpoint, pass that kills, what the killed request was)
ATTACH_CASES = [
    ("attach.after_intent", 1, "first attach, new connection"),
    ("attach.after_intent", 2, "second attach, shared connection"),
    ("attach.after_connect", 1, "first attach, connected not recorded"),
    ("attach.after_placement", 1, "first attach, disk XML recorded"),
    ("attach.after_placement", 2, "second attach, disk XML recorded"),
    ("attach.after_libvirt", 1, "first attach, disk on the guest"),
    ("attach.after_libvirt", 2, "second attach, disk on the guest"),
]
DETACH_CASES = [
    ("detach.after_intent", 1, "shared detach, nothing asked"),
    ("detach.after_intent", 2, "last detach, nothing asked"),
    ("detach.after_request", 1, "shared detach, unplug requested"),
    ("detach.after_request", 2, "last detach, unplug requested"),
    ("detach.after_removal", 1, "shared detach, disk gone"),
    ("detach.after_removal", 2, "last detach, disk gone"),
    ("detach.after_mark_disconnecting", 1, "last detach, disconnect intended"),
    ("detach.after_disconnect", 1, "last detach, disconnected not recorded"),
]


def crash_cases(cases: list[tuple[str, int, str]]) -> pytest.MarkDecorator:
    """Parametrize over (failpoint, nth, what), each case named ``<failpoint>-<nth>``."""
    return pytest.mark.parametrize(
        ("failpoint", "nth", "what"), cases, ids=[f"{p}-{n}" for p, n, _ in cases]
    )


def start_crashing(daemon_factory: DaemonFactory, failpoint: str, nth: int) -> Daemon:
    """hostagentd that SIGKILLs itself the ``nth`` time it reaches ``failpoint``."""
    return daemon_factory(
        **{"reconcile.interval": "0"}, _env={"HOSTAGENT_FAILPOINTS": f"{failpoint}:{nth}"}
    )


@pytest.fixture
def crashing_daemon(daemon_factory: DaemonFactory, failpoint: str, nth: int) -> Daemon:
    """``start_crashing`` with the test's ``failpoint`` and ``nth`` parameters."""
    return start_crashing(daemon_factory, failpoint, nth)


def shared_volume(device: str, domains: list[Guest]) -> tuple[list[str], list[dict[str, Any]]]:
    """Fresh attachment ids and multiattach PUT bodies of one new volume on
    ``device``, one of each per guest."""
    volume = unique("vol")
    bodies = [local_request(device, g, volume_id=volume, multiattach=True) for g in domains]
    return [unique("att") for _ in domains], bodies


def expect_kill(daemon: Daemon, request: object) -> None:
    with pytest.raises(ApiError) as dropped:
        request()  # type: ignore[operator]
    assert dropped.value.status == 0, "the request must die with the daemon"
    assert daemon.wait_killed() == -signal.SIGKILL


def restart_clean(daemon: Daemon) -> None:
    daemon.env = {}
    daemon.start()


@crash_cases(ATTACH_CASES)
def test_crash_during_attach(
    crashing_daemon: Daemon, device: str, guests: Guests, failpoint: str, nth: int, what: str
) -> None:
    daemon, client = crashing_daemon, crashing_daemon.client
    trio = [guests.make(), guests.make(persistent=True)]
    ids, bodies = shared_volume(device, trio)
    if nth == 2:
        client.attach(ids[0], bodies[0])
    crashed = nth - 1
    expect_kill(daemon, lambda: client.attach(ids[crashed], bodies[crashed]))

    restart_clean(daemon)
    assert_consistent(client, trio)
    attachment, created = client.attach(ids[crashed], bodies[crashed])  # the caller's retry
    assert attachment.state == "attached"
    assert attachment.host_refcount == nth
    assert created is (failpoint != "attach.after_libvirt"), "finished by reconcile: 200"
    assert_consistent(client, trio)

    results = [client.detach(i) for i in ids[:nth]]
    assert [r.terminate_connection for r in results].count(True) == 1
    assert results[-1].terminate_connection
    assert client.connections().connections == []
    assert_consistent(client, trio)


@crash_cases(DETACH_CASES)
def test_crash_during_detach(
    crashing_daemon: Daemon, device: str, guests: Guests, failpoint: str, nth: int, what: str
) -> None:
    daemon, client = crashing_daemon, crashing_daemon.client
    pair = [guests.make(persistent=True), guests.make()]
    ids, bodies = shared_volume(device, pair)
    for attachment_id, body in zip(ids, bodies, strict=True):
        client.attach(attachment_id, body)
    last_user_crashes = "shared" not in what
    if last_user_crashes:
        first = client.detach(ids[0])
        assert not first.terminate_connection
        crashed = ids[1]
    else:
        crashed = ids[0]
    expect_kill(daemon, lambda: client.detach(crashed))

    restart_clean(daemon)
    assert_consistent(client, pair)
    retried = client.detach(crashed)  # the caller's retry
    assert retried.state == "detached"
    assert retried.terminate_connection is last_user_crashes
    assert client.detach(crashed) == retried, "and a replay repeats it"
    if not last_user_crashes:
        assert client.connections().connections[0].host_refcount == 1
        assert pair[1].open_block_devices(), "the other guest keeps its device"
        final = client.detach(ids[1])
        assert final.terminate_connection
    assert client.connections().connections == []
    assert client.list() == []
    assert_consistent(client, pair)
