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

import pytest

from hostagent.client import ApiError
from tests.conftest import DaemonFactory
from tests.integration.support import (
    Daemon,
    Guests,
    LoopDevices,
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


def crashing_daemon(daemon_factory: DaemonFactory, failpoint: str, nth: int) -> Daemon:
    return daemon_factory(
        **{"reconcile.interval": "0"}, _env={"HOSTAGENT_FAILPOINTS": f"{failpoint}:{nth}"}
    )


def expect_kill(daemon: Daemon, request: object) -> None:
    with pytest.raises(ApiError) as dropped:
        request()  # type: ignore[operator]
    assert dropped.value.status == 0, "the request must die with the daemon"
    assert daemon.wait_killed() == -signal.SIGKILL


def restart_clean(daemon: Daemon) -> None:
    daemon.env = {}
    daemon.start()


@pytest.mark.parametrize(
    ("failpoint", "nth", "what"), ATTACH_CASES, ids=[f"{p}-{n}" for p, n, _ in ATTACH_CASES]
)
def test_crash_during_attach(
    daemon_factory: DaemonFactory,
    guests: Guests,
    loops: LoopDevices,
    failpoint: str,
    nth: int,
    what: str,
) -> None:
    daemon = crashing_daemon(daemon_factory, failpoint, nth)
    client = daemon.client
    device = loops.make()
    trio = [guests.make(), guests.make(persistent=True)]
    volume = unique("vol")
    ids = [unique("att") for _ in trio]
    bodies = [local_request(device, g, volume_id=volume, multiattach=True) for g in trio]
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


@pytest.mark.parametrize(
    ("failpoint", "nth", "what"), DETACH_CASES, ids=[f"{p}-{n}" for p, n, _ in DETACH_CASES]
)
def test_crash_during_detach(
    daemon_factory: DaemonFactory,
    guests: Guests,
    loops: LoopDevices,
    failpoint: str,
    nth: int,
    what: str,
) -> None:
    daemon = crashing_daemon(daemon_factory, failpoint, nth)
    client = daemon.client
    device = loops.make()
    pair = [guests.make(persistent=True), guests.make()]
    volume = unique("vol")
    ids = [unique("att") for _ in pair]
    for attachment_id, guest in zip(ids, pair, strict=True):
        client.attach(
            attachment_id, local_request(device, guest, volume_id=volume, multiattach=True)
        )
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
