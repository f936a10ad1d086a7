"""systemd: the units verify, socket activation serves, sd_notify and the watchdog speak."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.client import ApiError, HostagentClient

REPO = Path(__file__).parents[2]


def verify(root: Path) -> str:
    done = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            f"--root={root}",
            "hostagent.service",
            "hostagent.socket",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=root,
    )
    return f"rc={done.returncode} {done.stdout}{done.stderr}".strip()


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    root = tmp_path / "root"
    subprocess.run(
        [str(REPO / "scripts" / "install"), "--root", str(root), "--units-only"],
        check=True,
        capture_output=True,
    )
    for name in (
        "usr/lib/systemd/system/hostagent.service",
        "usr/lib/systemd/system/hostagent.socket",
        "usr/lib/sysusers.d/hostagent.conf",
        "usr/lib/tmpfiles.d/hostagent.conf",
        "etc/hostagent/hostagent.conf",
    ):
        assert (root / name).is_file(), name
    # systemd-analyze resolves dependencies against the root's unit files and
    # wants ExecStart to exist there.
    shutil.copytree(
        "/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True
    )
    (root / "usr/bin/hostagentd").write_text("#!/bin/sh\n")
    (root / "usr/bin/hostagentd").chmod(0o755)
    assert verify(root) == "rc=0"

    # And the check is not blind: a broken unit is reported.
    unit = root / "usr/lib/systemd/system/hostagent.service"
    unit.write_text(unit.read_text().replace("TimeoutStopSec=", "TimeoutStopSecs="))
    assert "Unknown key" in verify(root)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A real NOTIFY_SOCKET, as systemd would give the service."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    yield sock, path
    sock.close()


def messages(sock: socket.socket, until: str, timeout: float = 30) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            seen += sock.recv(4096).decode().split("\n")
        except TimeoutError:
            break
        if until in seen:
            return seen
    raise AssertionError(f"no {until} from hostagentd; got {seen}")


def daemon_args(state: Path, sock: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "hostagent.daemon",
        "--config-file",
        "/dev/null",
        "--state-dir",
        str(state),
        "--socket-path",
        str(sock),
    ]


def test_socket_activation_and_notify(
    short_dir: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    notify, notify_path = notify_socket
    api_socket = short_dir / "activated.sock"
    ignored = short_dir / "never.sock"
    env = dict(os.environ)
    # systemd-socket-activate binds the socket, waits for the first client and
    # execs hostagentd with LISTEN_FDS=1 -- what hostagent.socket does.
    process = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            str(api_socket),
            # the activator passes on only the environment it is told to
            "-E",
            f"NOTIFY_SOCKET={notify_path}",
            *daemon_args(short_dir / "state", ignored),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not api_socket.exists():
            assert time.monotonic() < deadline, "the activator did not bind the socket"
            time.sleep(0.05)
        client = HostagentClient(str(api_socket))
        assert client.health().status == "ok", "the first request starts and reaches it"
        ready = messages(notify, "READY=1")
        assert any(m.startswith("STATUS=serving") for m in ready)
        assert not ignored.exists(), "an inherited socket replaces --socket-path"
        assert client.list() == []
        process.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in messages(notify, "STOPPING=1")
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = process.stderr.read().decode() if process.stderr else ""
    assert "stopped cleanly" in stderr
    with pytest.raises(ApiError):
        client.health()


def test_watchdog_pings_while_the_event_loop_runs(
    short_dir: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    notify, notify_path = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "400000"}
    process = subprocess.Popen(
        daemon_args(short_dir / "state", short_dir / "wd.sock"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        messages(notify, "READY=1")
        started = time.monotonic()
        pings = 0
        while time.monotonic() - started < 1.5:
            if "WATCHDOG=1" in messages(notify, "WATCHDOG=1", timeout=1):
                pings += 1
        assert pings >= 4, f"{pings} pings in 1.5 s at a 0.4 s WatchdogSec"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
