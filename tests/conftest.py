"""Fixtures on real parts: the host's libvirtd, KVM guests, loop devices, hostagentd.

Used by tests/integration and tests/faults; unit tests need none of them.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from hostagent.client import HostagentClient
from hostagent.guests.domains import Guests as HostGuests
from tests.integration.support import (
    LIBVIRT_URI,
    Daemon,
    Guest,
    Guests,
    LoopDevices,
    ReconnectingConnection,
    remove_stale_guests,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "daemon_options(**options): hostagentd options for the test's `daemon` fixture",
    )


def _run_order(item: pytest.Item) -> int:
    """Unit tests first, the storage lab last: in a full run (scripts/test) the
    lab's image may still be building, at low priority, while the unit tests run;
    the lab's tests wait for it, the others never need it."""
    path = str(item.fspath)
    if "tests/unit/" in path:
        return 0
    return 2 if "tests/lab/" in path else 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(f"tests/{d}/" in str(item.fspath) for d in ("integration", "faults", "ceph")):
            item.add_marker(pytest.mark.integration)
    items.sort(key=_run_order)  # stable: each group keeps its files' order


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[Any]:
    try:
        conn = ReconnectingConnection(LIBVIRT_URI)
    except libvirt.libvirtError as exc:
        pytest.fail(
            f"integration tests need a running libvirtd at {LIBVIRT_URI} ({exc}); "
            "scripts/setup-host starts one"
        )
    libvirt.registerErrorHandler(lambda opaque, error: None, None)
    remove_stale_guests(conn)
    yield conn
    conn.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short path for unix sockets (108-byte limit) and state."""
    path = Path(tempfile.mkdtemp(prefix="ha-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[LoopDevices]:
    devices = LoopDevices(tmp_path)
    yield devices
    devices.cleanup()


@pytest.fixture
def guests(libvirt_conn: Any) -> Iterator[Guests]:
    made = Guests(libvirt_conn)
    yield made
    made.cleanup()


DaemonFactory = Callable[..., Daemon]


@pytest.fixture
def daemon_factory(short_dir: Path) -> Iterator[DaemonFactory]:
    """Start hostagentd processes; each must exit 0 on SIGTERM at teardown."""
    started: list[Daemon] = []
    counter = itertools.count()

    def start(_env: dict[str, str] | None = None, **options: str) -> Daemon:
        n = next(counter)
        daemon = Daemon(
            state_dir=short_dir / f"state{n}",
            socket_path=short_dir / f"d{n}.sock",
            log_path=short_dir / f"daemon{n}.log",
            options={"detach-timeout": "5", "libvirt.detach_retry_interval": "1", **options},
            env=dict(_env or {}),
        )
        daemon.start()
        started.append(daemon)
        return daemon

    yield start
    failures = []
    for daemon in started:
        code = daemon.stop()
        if code != 0:
            failures.append(f"hostagentd exited {code}:\n{daemon.log()[-4000:]}")
    assert not failures, "\n".join(failures)


@pytest.fixture
def daemon(daemon_factory: DaemonFactory, request: pytest.FixtureRequest) -> Daemon:
    """hostagentd with the test defaults and the options of the test's
    ``daemon_options`` mark, e.g. ``@pytest.mark.daemon_options(debug="")``."""
    mark = request.node.get_closest_marker("daemon_options")
    return daemon_factory(**(mark.kwargs if mark else {}))


@pytest.fixture
def client(daemon: Daemon) -> HostagentClient:
    """A client of the test's ``daemon``."""
    return daemon.client


@pytest.fixture
def device(loops: LoopDevices) -> str:
    """One loop device (16 MiB)."""
    return loops.make()


@pytest.fixture
def guest(guests: Guests) -> Guest:
    """One running transient guest."""
    return guests.make()


@pytest.fixture
def host_guests() -> Iterator[HostGuests]:
    """The daemon's own libvirt wrapper, for tests that run the service in-process."""
    guests = HostGuests(LIBVIRT_URI, connections=1)
    guests.start()
    yield guests
    guests.stop()
