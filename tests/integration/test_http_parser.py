"""What hostagentd answers on the HTTP layer, below the routes, to raw bytes on
its socket: a request it cannot parse, an HTTP version it does not serve,
headers that do not arrive, more connections than it keeps open."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.support import Daemon

HEADER_TIMEOUT = 1.0
MAX_CONNECTIONS = 5
HEALTH = b"GET /v1/health HTTP/1.1\r\nHost: hostagent\r\n\r\n"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the module, with a short header timeout and a small bound."""
    base = Path(str(tmp_path_factory.mktemp("hp", numbered=True)))
    short = Path("/tmp") / f"hahp-{base.name}"
    short.mkdir(exist_ok=True)
    daemon = Daemon(
        short / "state",
        short / "d.sock",
        short / "log",
        options={
            "api.header_timeout": str(HEADER_TIMEOUT),
            "api.max_connections": str(MAX_CONNECTIONS),
        },
    )
    daemon.start()
    try:
        yield daemon
    finally:
        code, log = daemon.stop(), daemon.log()
        shutil.rmtree(short, ignore_errors=True)
        assert code == 0, log[-4000:]


@dataclass(frozen=True)
class Answer:
    status_line: str
    headers: dict[str, str]
    body: bytes
    seconds: float  # from connecting until the daemon closed the connection

    @property
    def status(self) -> int:
        return int(self.status_line.split()[1])

    def error(self) -> dict[str, Any]:
        assert self.headers["content-type"].startswith("application/json"), self
        error = json.loads(self.body)["error"]
        assert set(error) == {"code", "message"}
        return dict(error)


def connect(daemon: Daemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(daemon.socket_path))  # blocking: waits while the backlog is full
    sock.settimeout(15)
    return sock


def read_until_closed(sock: socket.socket, started: float) -> Answer:
    """Everything until the daemon closes the connection (a timeout fails the test)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass  # the daemon closed with some of our bytes unread; what it sent is in data
    finally:
        sock.close()
    seconds = time.monotonic() - started
    if not data:
        return Answer("", {}, b"", seconds)
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return Answer(status_line, headers, body, seconds)


def exchange(daemon: Daemon, data: bytes) -> Answer:
    started = time.monotonic()
    sock = connect(daemon)
    with contextlib.suppress(BrokenPipeError):  # refused before it read all; the answer waits
        sock.sendall(data)
    return read_until_closed(sock, started)


BIG = b"a" * 9000
MALFORMED = {
    "header over 8190 bytes": b"GET /v1/health HTTP/1.1\r\nHost: h\r\nX-Big: " + BIG + b"\r\n\r\n",
    "9000-byte URL": b"GET /v1/health?q=" + BIG + b" HTTP/1.1\r\nHost: h\r\n\r\n",
    "Content-Length -1": b"PUT /v1/attachments/a HTTP/1.1\r\nHost: h\r\n"
    b"Content-Length: -1\r\n\r\n",
    "Content-Length and Transfer-Encoding": b"PUT /v1/attachments/a HTTP/1.1\r\nHost: h\r\n"
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "garbage method": b"G@T /v1/health HTTP/1.1\r\nHost: h\r\n\r\n",
    "not HTTP at all": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_request_the_parser_refuses_gets_the_json_error_body(
    daemon: Daemon, data: bytes
) -> None:
    answer = exchange(daemon, data)
    assert answer.status == 400, answer
    error = answer.error()
    assert error["code"] == "invalid_request"
    assert error["message"].startswith("malformed request: ")
    assert "aaaa" not in error["message"], "the client's bytes are not echoed"
    assert answer.seconds < HEADER_TIMEOUT, "answered and closed at once"


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9"])
def test_versions_other_than_1_0_and_1_1_are_505(daemon: Daemon, version: bytes) -> None:
    answer = exchange(daemon, b"GET /v1/health " + version + b"\r\nHost: h\r\n\r\n")
    assert answer.status == 505, answer
    assert answer.error()["code"] == "http_version_not_supported"
    assert version.decode() in answer.error()["message"]


@pytest.mark.parametrize("version", [b"HTTP/1.0", b"HTTP/1.1"])
def test_http_1_0_and_1_1_are_served(daemon: Daemon, version: bytes) -> None:
    request = b"GET /v1/health " + version + b"\r\nHost: h\r\nConnection: close\r\n\r\n"
    answer = exchange(daemon, request)
    assert answer.status_line.startswith(version.decode() + " 200"), answer
    assert json.loads(answer.body)["status"] in ("ok", "degraded")


def test_headers_that_trickle_in_get_408_after_the_header_timeout(daemon: Daemon) -> None:
    started = time.monotonic()
    sock = connect(daemon)
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: h\r\n")
    with pytest.raises(OSError):  # the daemon closes while we are still sending
        for line in range(40):
            time.sleep(0.25)
            sock.sendall(b"X-Line-%d: x\r\n" % line)
    answer = read_until_closed(sock, started)
    assert answer.status == 408, answer
    assert answer.error() == {
        "code": "request_timeout",
        "message": f"the request headers did not arrive within {HEADER_TIMEOUT:g}s",
    }
    assert HEADER_TIMEOUT <= answer.seconds < HEADER_TIMEOUT + 3


def test_a_slow_body_is_not_cut_by_the_header_timeout(daemon: Daemon) -> None:
    """The body has its own 30 s timeout; the header timeout ends with the headers."""
    started = time.monotonic()
    sock = connect(daemon)
    sock.sendall(
        b"PUT /v1/attachments/a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
        b"Content-Length: 8\r\n\r\n"
    )
    for part in (b"[1,", b"2,", b"3]", b" "):
        time.sleep(HEADER_TIMEOUT / 2)
        sock.sendall(part)
    answer = read_until_closed(sock, started)
    assert answer.status == 400, answer
    assert answer.error()["message"] == "request body must be a JSON object"


def test_idle_connections_are_closed_after_the_header_timeout(daemon: Daemon) -> None:
    started = time.monotonic()
    silent = read_until_closed(connect(daemon), started)
    assert silent.status_line == "", "nothing was asked, nothing is answered"
    assert HEADER_TIMEOUT <= silent.seconds < HEADER_TIMEOUT + 3

    started = time.monotonic()
    sock = connect(daemon)
    sock.sendall(HEALTH)
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200 "), first
    time.sleep(HEADER_TIMEOUT / 2)  # a kept-alive connection serves a second request
    sock.sendall(HEALTH)
    assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    idle = read_until_closed(sock, started)
    assert idle.status_line == "", "an idle keep-alive connection is closed without a word"


def test_connections_over_the_bound_are_503_and_the_bound_frees_up(daemon: Daemon) -> None:
    """300 connections that send only a request line hold MAX_CONNECTIONS slots
    for HEADER_TIMEOUT at most; the others are refused at once."""
    started = time.monotonic()
    with ExitStack() as stack, ThreadPoolExecutor(64) as pool:
        held = []
        for _ in range(300):
            sock = connect(daemon)
            stack.callback(sock.close)
            # A connection over the bound may be answered and closed before its
            # line is sent (EPIPE); the 503 stays readable.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(b"GET /v1/health HTTP/1.1\r\n")
            held.append(sock)
        answers = list(pool.map(lambda sock: read_until_closed(sock, started), held))
    statuses = [answer.status for answer in answers]
    assert statuses.count(408) <= MAX_CONNECTIONS, statuses
    assert statuses.count(503) >= 300 - MAX_CONNECTIONS, statuses
    assert set(statuses) <= {408, 503}
    refused = next(answer for answer in answers if answer.status == 503)
    assert refused.error() == {
        "code": "too_many_connections",
        "message": f"{MAX_CONNECTIONS} connections are open already; retry later",
    }
    assert max(answer.seconds for answer in answers) < HEADER_TIMEOUT + 5
    assert (
        exchange(daemon, HEALTH.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")).status
        == 200
    )
