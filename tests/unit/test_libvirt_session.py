"""guests/session.py: what runs when the connections to libvirtd are made again.

Caches of libvirt's answers must be emptied before any call can use new
connections (the libvirtd behind them may have reloaded its files), and a
reconcile must run only once calls can be made. libvirt.open is replaced by
a recording fake of a connection: no libvirtd is asked.
"""

from __future__ import annotations

from typing import Any

import libvirt
import pytest

from hostagent.guests.session import LibvirtSession


class RecordingConnection:
    """Takes what the session sets up on a new connection, and records it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def setKeepAlive(self, interval: int, count: int) -> None:  # noqa: N802 (libvirt's name)
        self.calls.append("setKeepAlive")

    def registerCloseCallback(self, callback: Any, opaque: Any) -> None:  # noqa: N802
        self.calls.append("registerCloseCallback")


def test_caches_are_emptied_before_new_connections_are_used_and_reconcile_runs_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: list[RecordingConnection] = []

    def open_connection(uri: str) -> RecordingConnection:
        opened.append(RecordingConnection())
        return opened[-1]

    monkeypatch.setattr(libvirt, "open", open_connection)
    session = LibvirtSession("qemu:///system", register_events=lambda conn: None, connections=2)
    seen: list[tuple[str, bool]] = []
    session.on_connecting(lambda: seen.append(("forget kept answers", session.connected)))
    session.on_connected(lambda: seen.append(("reconcile", session.connected)))

    assert session._try_connect()
    assert seen == [("forget kept answers", False), ("reconcile", True)]
    assert len(opened) == 2

    session.drop(session._channels[0].conn)  # libvirtd went away
    assert not session.connected
    seen.clear()
    assert session._try_connect(), "a reconnect"
    assert seen == [("forget kept answers", False), ("reconcile", True)]


def test_a_listener_that_fails_does_not_stop_the_connect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(libvirt, "open", lambda uri: RecordingConnection())
    session = LibvirtSession("qemu:///system", register_events=lambda conn: None, connections=1)
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("a listener's bug")

    session.on_connecting(broken)
    session.on_connecting(lambda: ran.append("next one"))
    assert session._try_connect()
    assert session.connected and ran == ["next one"]
