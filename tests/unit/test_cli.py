"""hostagentctl against a recording daemon: what the read commands print, and what
they import (a read command must not pay for os-brick or pydantic)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent import cli
from hostagent.cli import main, parse_size

REPO = Path(__file__).parents[2]

ATTACHMENT = {
    "attachment_id": "att-1",
    "volume_id": "vol-1",
    "domain_uuid": "b4f69ee9-b2a7-4507-91d8-c49a753f8f04",
    "domain_name": "demo-1",
    "state": "attached",
    "alias": "ua-att-1",
    "target_dev": "sda",
    "bus": "scsi",
    "mode": "rw",
    "multiattach": True,
    "shareable": True,
    "connection_key": "local:/dev/loop0",
    "device_path": "/dev/loop0",
    "host_refcount": 2,
    "disk_xml": '<disk type="block" device="disk">\n  <alias name="ua-att-1"/>\n</disk>\n',
}
CONNECTION = {
    "connection_key": "local:/dev/loop0",
    "driver_volume_type": "local",
    "device_path": "/dev/loop0",
    "state": "connected",
    "host_refcount": 2,
    "attachments": ["att-1", "att-2"],
    "connected_at": "2026-12-04T20:07:25Z",
    "boot_id": "e6bddb3c-ea8f-4b4f-932d-31eb857b7238",
}
# A <disk> as libvirt returns it cut out of the live domain: the first line at
# column 0, the rest still indented as they were inside <devices>.
LIVE_DISK_XML = (
    '<disk type="block" device="disk">\n'
    '      <driver name="qemu" type="raw" cache="none" io="native"/>\n'
    '      <source dev="/dev/loop0" index="1"/>\n'
    "      <backingStore/>\n"
    '      <target dev="sda" bus="scsi"/>\n'
    "      <shareable/>\n"
    '      <alias name="ua-att-1"/>\n'
    "    </disk>"
)
LIBVIRT_VIEW = {
    "attachment_id": "att-1",
    "domain_uuid": ATTACHMENT["domain_uuid"],
    "domain_name": "demo-1",
    "domain_exists": True,
    "active": True,
    "persistent": False,
    "live_disk_xml": LIVE_DISK_XML,
    "config_disk_xml": None,
    "virsh_commands": ["virsh domblklist demo-1 --details"],
}
REPLIES: dict[str, Any] = {
    "/v1/health": {"status": "ok", "libvirt": "connected", "version": "0.1.0"},
    "/v1/attachments": {"attachments": [ATTACHMENT]},
    "/v1/connections": {"connections": [CONNECTION]},
    "/v1/attachments/att-1": ATTACHMENT,
    "/v1/attachments/att-1/libvirt": LIBVIRT_VIEW,
    "/v1/doctor": {"ok": True, "findings": [], "attachments": 1, "connections": 1, "domains": 1},
    "/v1/connector": {"ip": "192.0.2.2", "host": "vm", "multipath": False},
    # Prometheus text (a str reply is served as text/plain), trimmed to the state gauges.
    "/metrics": (
        "# HELP hostagent_attachments Attachments by state\n"
        "# TYPE hostagent_attachments gauge\n"
        'hostagent_attachments{state="attaching"} 0.0\n'
        'hostagent_attachments{state="attached"} 5.0\n'
        'hostagent_attachments{state="detaching"} 2.0\n'
        "# HELP hostagent_connections Host connections by state\n"
        "# TYPE hostagent_connections gauge\n"
        'hostagent_connections{state="connected"} 3.0\n'
        'hostagent_connections{state="disconnecting"} 1.0\n'
        "hostagent_libvirt_up 1.0\n"
    ),
}


class RecordingDaemon:
    """A unix socket answering each GET with its canned reply (404 otherwise),
    recording the request lines."""

    def __init__(self, path: Path, replies: dict[str, Any]) -> None:
        self.path = path
        self.replies = replies
        self.request_lines: list[str] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                line = head.split(b"\r\n", 1)[0].decode()
                self.request_lines.append(line)
                conn.sendall(self._reply(line))

    def _reply(self, request_line: str) -> bytes:
        method, path, _ = request_line.split(" ")
        kind = "application/json"
        if method == "GET" and path in self.replies:
            reply = self.replies[path]
            status = "200 OK"
            if isinstance(reply, str):
                kind, body = "text/plain; version=0.0.4", reply.encode()
            else:
                body = json.dumps(reply).encode()
        else:
            status, body = "404 Not Found", b'{"error": {"code": "not_found", "message": "no"}}'
        return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            status.encode(),
            kind.encode(),
            len(body),
            body,
        )

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[RecordingDaemon]:
    recording = RecordingDaemon(tmp_path / "d.sock", REPLIES)
    yield recording
    recording.close()


def run_ctl(daemon: RecordingDaemon, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["--socket", str(daemon.path), *args]) == 0
    return capsys.readouterr().out


READ_COMMANDS = [
    ["status"],
    ["list"],
    ["connections"],
    ["show", "att-1"],
    ["doctor"],
    ["connector"],
    ["list", "--json"],
    ["show", "att-1", "--json"],
]
HEAVY = ("os_brick", "oslo_concurrency", "oslo_config", "oslo_log", "pydantic", "lxml", "aiohttp")


def modules_a_command_imports(daemon: RecordingDaemon, command: list[str]) -> tuple[str, set[str]]:
    """Run ``command`` in a fresh interpreter (this test process has imported
    everything already): its exit code and the top-level modules it imported."""
    probe = (
        "import sys\n"
        "from hostagent.cli import main\n"
        f"code = main({['--socket', str(daemon.path), *command]!r})\n"
        "print('MODULES', code, ' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    _, code, *modules = result.stdout.splitlines()[-1].split(" ")
    return code, set(modules)


@pytest.mark.parametrize("command", READ_COMMANDS, ids=" ".join)
def test_a_read_command_imports_neither_os_brick_nor_pydantic(
    daemon: RecordingDaemon, command: list[str]
) -> None:
    code, modules = modules_a_command_imports(daemon, command)
    assert (code, sorted(modules & set(HEAVY))) == ("0", [])


def test_a_read_command_does_not_import_shutil_for_the_help_width(
    daemon: RecordingDaemon,
) -> None:
    """argparse imports shutil to ask the terminal's width for each formatter
    it makes (about 4 ms of a start): the width is found once instead."""
    code, modules = modules_a_command_imports(daemon, ["list"])
    assert (code, "shutil" in modules) == ("0", False)


@pytest.mark.parametrize(("columns", "width"), [("61", 59), ("", 78), ("wide", 78), ("0", 78)])
def test_the_help_is_as_wide_as_argparse_makes_it(
    monkeypatch: pytest.MonkeyPatch, columns: str, width: int
) -> None:
    """COLUMNS, else the terminal (none here: 80), less 2, as argparse's own."""
    monkeypatch.setenv("COLUMNS", columns)
    cli.help_width.cache_clear()
    try:
        assert cli.help_width() == width
    finally:
        cli.help_width.cache_clear()


def test_show_prints_lists_and_booleans_as_words_and_the_disk_evenly_indented(
    daemon: RecordingDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = run_ctl(daemon, capsys, "show", "att-1").splitlines()
    assert "  attachments: att-1, att-2" in lines
    assert "  multiattach: true" in lines
    assert not any("[" in line or "True" in line or "None" in line for line in lines)
    start = lines.index("  live XML:") + 1
    assert lines[start : start + 8] == [
        '    <disk type="block" device="disk">',
        '      <driver name="qemu" type="raw" cache="none" io="native"/>',
        '      <source dev="/dev/loop0" index="1"/>',
        "      <backingStore/>",
        '      <target dev="sda" bus="scsi"/>',
        "      <shareable/>",
        '      <alias name="ua-att-1"/>',
        "    </disk>",
    ]
    assert lines[start + 8] == "the same in virsh:"
    assert daemon.request_lines == [
        "GET /v1/attachments/att-1 HTTP/1.1",
        "GET /v1/connections HTTP/1.1",
        "GET /v1/attachments/att-1/libvirt HTTP/1.1",
    ]


def test_show_says_when_the_domain_has_no_disk_with_the_alias(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gone = dict(LIBVIRT_VIEW, live_disk_xml=None)
    daemon = RecordingDaemon(
        tmp_path / "g.sock", {**REPLIES, "/v1/attachments/att-1/libvirt": gone}
    )
    lines = run_ctl(daemon, capsys, "show", "att-1").splitlines()
    daemon.close()
    assert lines[lines.index("  live XML:") + 1] == "    (no disk with this alias)"


@pytest.mark.parametrize(
    ("command", "path"),
    [
        (["list"], "/v1/attachments"),
        (["connections"], "/v1/connections"),
        (["doctor"], "/v1/doctor"),
        (["connector"], "/v1/connector"),
    ],
)
def test_json_is_the_apis_reply_as_sent(
    daemon: RecordingDaemon, capsys: pytest.CaptureFixture[str], command: list[str], path: str
) -> None:
    printed = json.loads(run_ctl(daemon, capsys, *command, "--json"))
    assert printed == REPLIES[path]


def test_list_prints_one_row_per_attachment_with_words_for_booleans(
    daemon: RecordingDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    header, row = run_ctl(daemon, capsys, "list").splitlines()
    assert header.split() == [
        "ATTACHMENT_ID",
        "VOLUME_ID",
        "DOMAIN_NAME",
        "STATE",
        "ALIAS",
        "TARGET_DEV",
        "BUS",
        "MODE",
        "SHAREABLE",
        "HOST_REFCOUNT",
        "CONNECTION_KEY",
    ]
    assert row.split() == [
        "att-1",
        "vol-1",
        "demo-1",
        "attached",
        "ua-att-1",
        "sda",
        "scsi",
        "rw",
        "true",
        "2",
        "local:/dev/loop0",
    ]


def test_an_attach_body_the_api_would_refuse_is_named_before_sending(
    daemon: RecordingDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    attach = ["attach", "a1", "--volume-id", "bad id!", "--domain", "demo-1"]
    code = main(["--socket", str(daemon.path), *attach, "--local-device", "/dev/loop0"])
    assert code == 2
    assert capsys.readouterr().err.startswith("hostagentctl: volume_id: String should match")
    assert daemon.request_lines == []


def test_sizes_take_binary_units() -> None:
    assert parse_size("2147483648") == 2 << 30
    assert parse_size("2G") == parse_size("2GiB") == 2 << 30
    assert parse_size("512m") == 512 << 20
    for bad in ("", "G", "-1", "0", "1.5G", "2X"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def test_status_counts_every_state_from_the_metrics_without_fetching_the_lists(
    daemon: RecordingDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    printed = json.loads(run_ctl(daemon, capsys, "status", "--json"))
    assert (printed["attachments"], printed["connections"]) == (7, 4)
    assert daemon.request_lines == ["GET /v1/health HTTP/1.1", "GET /metrics HTTP/1.1"]


@pytest.mark.parametrize("metrics", [None, "hostagent_libvirt_up 1.0\n"], ids=["404", "no gauges"])
def test_status_counts_the_lists_of_a_daemon_without_the_state_gauges(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], metrics: str | None
) -> None:
    replies = {k: v for k, v in REPLIES.items() if k != "/metrics"}
    if metrics is not None:
        replies["/metrics"] = metrics
    recording = RecordingDaemon(tmp_path / "old.sock", replies)
    try:
        printed = json.loads(run_ctl(recording, capsys, "status", "--json"))
    finally:
        recording.close()
    assert (printed["attachments"], printed["connections"]) == (1, 1)
