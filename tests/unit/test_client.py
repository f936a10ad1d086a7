"""The client: ids travel as themselves, a slow answer is not "unreachable", and the
typed methods still return the API models (pydantic is loaded on their first call)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from hostagent.api.models import Attachment
from hostagent.client import ApiError, HostagentClient, destination_xml


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
        "alias": "ua-a1",
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


def test_destination_xml_gives_each_agent_disk_the_destination_source() -> None:
    domain = (
        "<domain><name>m</name><devices>"
        "<disk type='block' device='disk'><driver name='qemu' type='raw' cache='none'/>"
        "<source dev='/dev/on-source'/><target dev='sdb' bus='scsi'/><shareable/>"
        "<alias name='ua-s1'/><address type='drive' controller='0' bus='0' target='0' unit='1'/>"
        "</disk><disk type='file' device='cdrom'><source file='/x.iso'/>"
        "<target dev='sdc' bus='scsi'/></disk></devices></domain>"
    )
    incoming = Attachment(
        attachment_id="d1",
        volume_id="v",
        domain_uuid="u",
        domain_name="u",
        state="incoming",
        alias="ua-s1",
        target_dev=None,
        bus="scsi",
        mode="rw",
        multiattach=True,
        shareable=True,
        connection_key="local:/dev/on-destination",
        device_path="/dev/on-destination",
        host_refcount=1,
        disk_xml="<disk type='block' device='disk'><source dev='/dev/on-destination'/>"
        "<target dev='sda' bus='scsi'/><alias name='ua-s1'/></disk>",
    )
    out = etree.fromstring(destination_xml(domain, [incoming]).encode())
    disk = out.find("./devices/disk[@device='disk']")
    assert disk is not None
    assert disk.xpath("string(./source/@dev)") == "/dev/on-destination"
    assert disk.xpath("string(./target/@dev)") == "sdb", "the source's target stays"
    assert disk.xpath("string(./address/@unit)") == "1"
    assert out.xpath("string(./devices/disk[@device='cdrom']/source/@file)") == "/x.iso"
    with pytest.raises(ValueError, match="ua-s1"):
        destination_xml("<domain><devices/></domain>", [incoming])
