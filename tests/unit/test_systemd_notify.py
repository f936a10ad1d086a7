"""sd_notify is best effort: a notify socket that went away is logged, not raised."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from hostagent.daemon.systemd import notify


def test_notify_sends_and_survives_a_vanished_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    assert notify("WATCHDOG=1") is True
    assert receiver.recv(100) == b"WATCHDOG=1"
    receiver.close()
    path.unlink()
    assert notify("WATCHDOG=1") is False, "no exception: the watchdog chain goes on"
    assert "sd_notify" in caplog.text and "WATCHDOG=1" in caplog.text
