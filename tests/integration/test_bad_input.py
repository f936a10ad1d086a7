"""Bad input gets a clear 4xx and changes nothing in libvirt or the store."""

from __future__ import annotations

import http.client
import json
import os
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent.client import ApiError, HostagentClient
from tests.integration.support import Daemon, Guest, Guests, LoopDevices, local_request, unique


@pytest.fixture
def dev_symlink_out() -> Iterator[str]:
    """A symlink under /dev that points outside it."""
    link = Path(f"/dev/hatest-escape-{os.getpid()}")
    link.unlink(missing_ok=True)
    link.symlink_to("/etc/passwd")
    yield str(link)
    link.unlink(missing_ok=True)


def snapshot(daemon: Daemon, guest: Guest) -> tuple[Any, ...]:
    db = sqlite3.connect(daemon.state_dir / "hostagent.sqlite3")
    try:
        rows = tuple(
            tuple(db.execute(f"SELECT * FROM {table}").fetchall())  # noqa: S608
            for table in ("connections", "attachments", "tombstones")
        )
    finally:
        db.close()
    return rows, len(guest.disks()), daemon.client.list(), daemon.client.connections()


def raw(
    client: HostagentClient, method: str, path: str, payload: bytes, *, chunked: bool = False
) -> tuple[int, Any]:
    """Send bytes as they are (the client would encode them); ``chunked`` sends
    them with Transfer-Encoding: chunked, in 64 KiB chunks, and no Content-Length."""
    conn = http.client.HTTPConnection("localhost")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(client.socket_path)
    conn.sock = sock
    headers = {"Content-Type": "application/json"}
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
        chunks = (payload[i : i + 65536] for i in range(0, len(payload), 65536))
        conn.request(method, path, body=chunks, headers=headers, encode_chunked=True)
    else:
        conn.request(method, path, body=payload, headers=headers)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, json.loads(body)


def test_bad_requests_are_refused_and_change_nothing(
    daemon: Daemon, guests: Guests, loops: LoopDevices, dev_symlink_out: str, tmp_path: Path
) -> None:
    guest = guests.make()
    device = loops.make()
    client = daemon.client
    regular_file = tmp_path / "not-a-device"
    regular_file.write_bytes(b"x" * 4096)
    shm_file = Path(f"/dev/shm/hatest-{os.getpid()}")
    shm_file.write_bytes(b"x")
    good = local_request(device, guest, volume_id="vol-1", multiattach=True)

    def with_data(**data: Any) -> dict[str, Any]:
        return dict(good, connection_info={"driver_volume_type": "local", "data": data})

    bad_bodies: list[tuple[str, Any, int, str]] = [
        ("empty object", {}, 400, "invalid_request"),
        (
            "missing domain",
            {k: v for k, v in good.items() if k != "domain"},
            400,
            "invalid_request",
        ),
        (
            "unknown protocol",
            dict(good, connection_info={"driver_volume_type": "nfs", "data": {}}),
            400,
            "invalid_request",
        ),
        ("no device path", with_data(), 400, "invalid_request"),
        ("/etc/passwd", with_data(device_path="/etc/passwd"), 400, "invalid_request"),
        ("traversal", with_data(device_path="/dev/../etc/passwd"), 400, "invalid_request"),
        ("relative", with_data(device_path="dev/loop0"), 400, "invalid_request"),
        ("symlink out of /dev", with_data(device_path=dev_symlink_out), 400, "invalid_request"),
        ("regular file", with_data(device_path=str(regular_file)), 400, "invalid_request"),
        ("file under /dev", with_data(device_path=str(shm_file)), 400, "invalid_request"),
        ("missing device", with_data(device_path="/dev/hatest-nothing"), 400, "invalid_request"),
        ("device path not a string", with_data(device_path=7), 400, "invalid_request"),
        ("qcow2 shareable", with_data(device_path=device, format="qcow2"), 400, "invalid_request"),
        ("encrypted", with_data(device_path=device, encrypted=True), 400, "invalid_request"),
        ("bool as string", dict(good, multiattach="yes"), 400, "invalid_request"),
        ("bad mode", dict(good, mode="rx"), 400, "invalid_request"),
        ("bad bus", dict(good, bus="ide"), 400, "invalid_request"),
        ("bad target dev", dict(good, target_dev="hda"), 400, "invalid_request"),
        ("virtio dev on scsi", dict(good, target_dev="vdb"), 400, "invalid_request"),
        ("bad volume id", dict(good, volume_id="a.b"), 400, "invalid_request"),
        ("unknown field", dict(good, multiatach=True), 400, "invalid_request"),
        ("unknown domain", dict(good, domain="no-such-domain"), 404, "domain_not_found"),
    ]
    before = snapshot(daemon, guest)
    for name, body, status, code in bad_bodies:
        with pytest.raises(ApiError) as refused:
            client.attach(unique("att"), body)
        assert (refused.value.status, refused.value.code) == (status, code), name
        assert refused.value.message, name

    for name, payload in [
        ("not JSON", b"{not json"),
        ("JSON array", b"[1, 2]"),
        ("JSON string", b'"x"'),
        ("not UTF-8", b"\xff\xfe"),
        ("empty", b""),
        ("nested deeper than Python goes", b"[" * 200_000),
    ]:
        status, reply = raw(client, "PUT", f"/v1/attachments/{unique('att')}", payload)
        assert (status, reply["error"]["code"]) == (400, "invalid_request"), name

    huge = b'{"volume_id": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    for method, path in [
        ("PUT", f"/v1/attachments/{unique('att')}"),
        ("DELETE", f"/v1/attachments/{unique('att')}"),
        ("POST", "/v1/reconcile"),
        ("GET", "/v1/attachments"),
    ]:
        status, reply = raw(client, method, path, huge)
        assert (status, reply["error"]["code"]) == (413, "request_too_large"), method

    for bad_id in ("a.b", "x" * 65, "a%20b", "%2e%2e"):
        for call in (
            lambda i: client.attach(i, good),
            client.detach,
            client.get,
        ):
            with pytest.raises(ApiError) as refused:
                call(bad_id)
            assert refused.value.status == 400, bad_id
            assert refused.value.code == "invalid_request"

    with pytest.raises(ApiError) as missing:
        client.detach(unique("never-seen"))
    assert (missing.value.status, missing.value.code) == (404, "attachment_not_found")
    with pytest.raises(ApiError) as missing:
        client.get(unique("never-seen"))
    assert missing.value.code == "attachment_not_found"
    with pytest.raises(ApiError) as no_route:
        client.request("GET", "/v1/nothing")
    assert (no_route.value.status, no_route.value.code) == (404, "not_found")
    with pytest.raises(ApiError) as wrong_method:
        client.request("POST", "/v1/attachments")
    assert (wrong_method.value.status, wrong_method.value.code) == (405, "method_not_allowed")

    assert snapshot(daemon, guest) == before
    shm_file.unlink()


def test_chunked_body_over_1mib_is_413_and_changes_nothing(
    daemon: Daemon, guests: Guests, loops: LoopDevices
) -> None:
    """API.md: a body over 1 MiB is 413 on every route. A chunked body has no
    Content-Length to check up front; the DELETE of a live attachment and the
    reconcile that would otherwise run must still be refused, and do nothing."""
    guest = guests.make()
    client = daemon.client
    attachment_id = unique("att")
    # A small chunked body is served: the middleware reads it, the handler gets it.
    small = json.dumps(local_request(loops.make(), guest, volume_id="vol-1")).encode()
    status, reply = raw(client, "PUT", f"/v1/attachments/{attachment_id}", small, chunked=True)
    assert (status, reply["attachment_id"]) == (201, attachment_id), reply
    before = snapshot(daemon, guest)
    huge = b'{"volume_id": "' + b"x" * (1024 * 1024 + 100 * 1024) + b'"}'  # ~1.1 MiB
    for method, path in [
        ("DELETE", f"/v1/attachments/{attachment_id}"),
        ("POST", "/v1/reconcile"),
        ("GET", "/v1/attachments"),
    ]:
        status, reply = raw(client, method, path, huge, chunked=True)
        assert status == 413, (method, status, reply)
        assert reply == {
            "error": {
                "code": "request_too_large",
                "message": "request body larger than 1048576 bytes",
            }
        }, method
        assert snapshot(daemon, guest) == before, method
    status, reply = raw(client, "POST", "/v1/reconcile", b"{}", chunked=True)
    assert status == 200, reply
    client.detach(attachment_id)


def test_iscsi_login_failure_is_502_leaves_nothing_and_hides_chap(
    daemon: Daemon, guests: Guests
) -> None:
    """This host has no iSCSI initiator: os-brick's real connect fails, and the
    agent must answer connect_failed, keep nothing, and not echo the password."""
    guest = guests.make()
    password = "Chap-Pa55-Never-Shown"
    body = {
        "volume_id": "vol-iscsi",
        "domain": guest.name,
        "multiattach": True,
        "connection_info": {
            "driver_volume_type": "iscsi",
            "data": {
                "target_portal": "127.0.0.1:3260",
                "target_iqn": "iqn.2026-11.test.hostagent:nowhere",
                "target_lun": 0,
                "auth_method": "CHAP",
                "auth_username": "user",
                "auth_password": password,
            },
        },
    }
    before = snapshot(daemon, guest)
    with pytest.raises(ApiError) as failed:
        daemon.client.attach(unique("att"), body)
    assert (failed.value.status, failed.value.code) == (502, "connect_failed")
    assert password not in failed.value.message
    assert password not in daemon.log()
    assert snapshot(daemon, guest) == before
