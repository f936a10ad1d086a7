"""The client: ids travel as themselves, a slow answer is not "unreachable", and the
typed methods still return the API models (pydantic is loaded on their first call)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.api.models import Attachment
from hostagent.client import ApiError, HostagentClient


class RecordingServer:
    """A unix socket that records the request line it gets, then answers
    ``reply`` (or nothing at all, to let the client time out)."""

    def __init__(self, path: Path, reply: bytes | None) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.request_lines: list[str] = []
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            self.request_lines.append(data.split(b"\r\n", 1)[0].decode())
            if self.reply is None:
                conn.recv(1)  # hold the connection open until the client gives up
                return
            conn.sendall(self.reply)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "d.sock"


def test_an_id_is_one_path_segment(socket_path: Path) -> None:
    body = b'{"error": {"code": "invalid_request", "message": "bad id"}}'
    reply = b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    server = RecordingServer(socket_path, reply)
    with pytest.raises(ApiError) as refused:
        HostagentClient(str(socket_path)).detach("a1?x#y")
    server.thread.join(5)
    server.close()
    # Sent as itself (and refused), never as "a1" with a query string.
    assert server.request_lines == ["DELETE /v1/attachments/a1%3Fx%23y HTTP/1.1"]
    assert refused.value.code == "invalid_request"


def test_no_answer_in_time_is_a_timeout_not_unreachable(socket_path: Path) -> None:
    server = RecordingServer(socket_path, None)
    with pytest.raises(ApiError) as slow:
        HostagentClient(str(socket_path), timeout=0.3).list()
    server.close()
    assert (slow.value.status, slow.value.code) == (0, "timeout")
    assert "repeating it is safe" in slow.value.message
    with pytest.raises(ApiError) as down:
        HostagentClient(str(socket_path)).list()
    assert down.value.code == "unreachable"


def test_typed_methods_return_the_api_models(socket_path: Path) -> None:
    attachment = {
        "attachment_id": "a1",
        "volume_id": "v1",
        "domain_uuid": "b4f69ee9-b2a7-4507-91d8-c49a753f8f04",
        "domain_name": "demo-1",
        "state": "attached",
        "target_dev": "sda",
        "bus": "scsi",
        "mode": "rw",
        "multiattach": False,
        "shareable": False,
        "connection_key": "local:/dev/loop0",
        "device_path": "/dev/loop0",
        "host_refcount": 1,
        "disk_xml": None,
    }
    body = json.dumps({"attachments": [attachment]}).encode()
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    server = RecordingServer(socket_path, reply)
    listed = HostagentClient(str(socket_path)).list()
    server.thread.join(5)
    server.close()
    assert server.request_lines == ["GET /v1/attachments HTTP/1.1"]
    assert listed == [Attachment.model_validate(attachment)]
    assert isinstance(listed[0], Attachment)
