"""Logs: every line of a request names it, secrets never appear, journald gets fields."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.client import ApiError, HostagentClient
from tests.conftest import DaemonFactory
from tests.integration.support import Daemon, Guest, Guests, LoopDevices, local_request, unique

SECRETS = {
    "auth_password": "chap-Pa55word-1",
    "auth_username": "chapuser",
    "secret": "cephx-Secret-2",
    "key": "AQBcephxKey3==",
    "target_discovery_password": "disco-Pa55-4",
}
REQUEST_LINE = re.compile(r"\[(req-[0-9a-f-]+) att=(\S+) vol=(\S+)\] (.*)")


def with_secrets(device: str, guest: object, volume_id: str, **extra: object) -> dict[str, object]:
    body = local_request(device, guest, volume_id=volume_id, **extra)  # type: ignore[arg-type]
    body["connection_info"]["data"].update(SECRETS)
    return body


@pytest.mark.daemon_options(debug="")
def test_secrets_never_reach_logs_responses_or_state(
    daemon: Daemon, client: HostagentClient, guest: Guest, device: str
) -> None:
    attachment_id = unique("att")
    attached, _ = client.attach(
        attachment_id, with_secrets(device, guest, "vol-sec", multiattach=True)
    )
    # A refused request that echoes its input must not echo the secrets either.
    with pytest.raises(ApiError) as refused:
        client.attach(unique("att"), with_secrets(device, guest, "vol-sec", mode="bogus"))
    listed = client.list()
    shown = client.libvirt_view(attachment_id)
    result = client.detach(attachment_id)
    texts = [
        daemon.log(),
        attached.model_dump_json(),
        str(refused.value),
        json.dumps([a.model_dump() for a in listed]),
        shown.model_dump_json(),
        result.model_dump_json(),
    ]
    with sqlite3.connect(daemon.state_dir / "hostagent.sqlite3") as db:
        texts += [
            repr(row)
            for table in ("connections", "attachments", "tombstones")
            for row in db.execute(f"SELECT * FROM {table}")  # noqa: S608
        ]
    for text in texts:
        for name, value in SECRETS.items():
            if name != "auth_username":
                assert value not in text, f"{name} leaked"
    assert "DEBUG" in daemon.log(), "debug logging was on, and still nothing leaked"


def test_every_line_of_a_request_carries_its_attachment_and_volume(
    daemon: Daemon, client: HostagentClient, guests: Guests, guest: Guest, device: str
) -> None:
    ids = [unique("att"), unique("att")]
    for attachment_id in ids:
        client.attach(
            attachment_id,
            local_request(
                device,
                guest if attachment_id == ids[0] else guests.make(),
                volume_id="vol-ctx",
                multiattach=True,
            ),
        )
    for attachment_id in ids:
        client.detach(attachment_id)

    by_request: dict[str, list[tuple[str, str, str]]] = {}
    for line in daemon.log().splitlines():
        match = REQUEST_LINE.search(line)
        if match:
            request_id, att, vol, message = match.groups()
            by_request.setdefault(request_id, []).append((att, vol, message))
    ours = {r: lines for r, lines in by_request.items() if any(a in ids for a, _, _ in lines)}
    assert len(ours) == 4, "two PUTs and two DELETEs"
    for lines in ours.values():
        assert len({(att, vol) for att, vol, _ in lines}) == 1, lines
        att, vol, _ = lines[0]
        assert att in ids and vol == "vol-ctx", lines
    messages = [m for lines in ours.values() for _, _, m in lines]
    assert any("connecting local:" in m for m in messages)
    assert any("detached from" in m for m in messages)
    assert any(m.startswith("disconnecting local:") for m in messages)


class JournalStandIn:
    """A stand-in for journald's socket, where systemd's native protocol
    arrives, read by a thread as it comes: the kernel queues only
    net.unix.max_dgram_qlen datagrams (10 here) before a sender blocks, and a
    daemon blocked on its log hangs the request it serves."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.datagrams: list[bytes] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):  # the socket closed under it
            while True:
                try:
                    self.datagrams.append(self.sock.recv(1 << 20))
                except TimeoutError:
                    if self._done.is_set():
                        return

    def entries(self) -> list[dict[str, str]]:
        """Every entry so far, once nothing more came for 0.2 s (the socket's timeout)."""
        self._done.set()
        self._thread.join()
        entries: list[dict[str, str]] = []
        for datagram in self.datagrams:
            entry = {}
            for line in datagram.decode(errors="replace").split("\n"):
                if "=" in line:
                    key, value = line.split("=", 1)
                    entry[key] = value
            entries.append(entry)
        return entries


@pytest.fixture
def journal() -> Iterator[JournalStandIn]:
    """journald's socket, ours for the test (skipped where a real journald runs)."""
    path = Path("/run/systemd/journal/socket")
    if path.exists():
        pytest.skip(f"{path} exists: a real journald runs here, not ours to stand in for")
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    try:
        yield JournalStandIn(sock)
    finally:
        sock.close()
        path.unlink()


def test_journald_gets_structured_fields(
    daemon_factory: DaemonFactory,
    guests: Guests,
    loops: LoopDevices,
    journal: JournalStandIn,
) -> None:
    daemon = daemon_factory(**{"use-journal": ""})
    attachment_id = unique("att")
    daemon.client.attach(
        attachment_id, local_request(loops.make(), guests.make(), volume_id="vol-j")
    )
    daemon.client.detach(attachment_id)
    entries = journal.entries()
    mine = [e for e in entries if e.get("ATTACHMENT_ID") == attachment_id]
    assert mine, entries[-5:]
    assert all(e.get("VOLUME_ID") == "vol-j" for e in mine)
    assert all(e.get("REQUEST_ID", "").startswith("req-") for e in mine)
    assert all(e.get("SYSLOG_IDENTIFIER") for e in mine)
    assert any("attached to" in e.get("MESSAGE", "") for e in mine)
