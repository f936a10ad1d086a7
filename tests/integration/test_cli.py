"""hostagentctl against a real daemon, and ``xml`` with no daemon at all."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.integration.support import Daemon, Guests, LoopDevices, unique


def ctl(
    *args: str, socket: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "hostagent.cli"]
    if socket is not None:
        command += ["--socket", str(socket)]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, input=stdin, check=False, timeout=120
    )


def test_attach_list_connections_detach_through_the_cli(
    daemon: Daemon, guests: Guests, loops: LoopDevices
) -> None:
    guest = guests.make()
    device = loops.make()
    attachment_id = unique("att")
    sock = daemon.socket_path

    attach = ["attach", attachment_id, "--volume-id", "vol-cli", "--domain", guest.name]
    attach += ["--local-device", device, "--multiattach"]
    attached = ctl(*attach, socket=sock)
    assert attached.returncode == 0, attached.stderr
    assert f"attached: {attachment_id} -> {guest.name} sda" in attached.stdout

    again = ctl(*attach, "--json", socket=sock)
    assert again.returncode == 0
    assert json.loads(again.stdout)["state"] == "attached"

    listing = ctl("list", socket=sock)
    assert listing.returncode == 0
    header, row = listing.stdout.splitlines()
    assert header.split()[:4] == ["ATTACHMENT_ID", "VOLUME_ID", "DOMAIN_NAME", "STATE"]
    assert row.split()[:4] == [attachment_id, "vol-cli", guest.name, "attached"]
    # --json prints what the API returns: the list inside {"attachments": [...]}.
    listed = json.loads(ctl("list", "--json", socket=sock).stdout)
    assert listed == daemon.client.request("GET", "/v1/attachments")[1]
    assert [a["attachment_id"] for a in listed["attachments"]] == [attachment_id]

    shown = ctl("show", attachment_id, socket=sock)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert f"  attachments: {attachment_id}" in lines and "  shareable: true" in lines
    # libvirt's live <disk> keeps the domain's indentation; show prints it evenly.
    start = lines.index("  live XML:") + 1
    end = lines.index("    </disk>", start)
    assert lines[start].startswith("    <disk ")
    children = lines[start + 1 : end]
    assert min(len(line) - len(line.lstrip()) for line in children) == 6, lines
    assert f'      <alias name="ua-{attachment_id}"/>' in children

    connections = json.loads(ctl("connections", "--json", socket=sock).stdout)
    assert connections["connections"][0]["connection_key"] == f"local:{device}"
    assert f"local:{device}" in ctl("connections", socket=sock).stdout

    logged = len(daemon.log())
    status = ctl("status", socket=sock)
    assert status.returncode == 0
    assert "ok (libvirt connected)" in status.stdout
    assert "attachments: 1   host connections: 1" in status.stdout
    # status counts from the metrics' state gauges: its cost does not grow with
    # the attachments (the lists it used to fetch do).
    asked = re.findall(r"\b(GET \S+) -> 200", daemon.log()[logged:])
    assert asked == ["GET /v1/health", "GET /metrics"], asked
    summary = json.loads(ctl("status", "--json", socket=sock).stdout)
    assert (summary["attachments"], summary["connections"]) == (1, 1)

    detached = ctl("detach", attachment_id, "--json", socket=sock)
    assert detached.returncode == 0, detached.stderr
    assert json.loads(detached.stdout)["terminate_connection"] is True
    assert "terminate_connection=true" in ctl("detach", attachment_id, socket=sock).stdout


def test_cli_errors_are_one_line_and_exit_2(daemon: Daemon, guests: Guests) -> None:
    missing = ctl("detach", unique("never"), socket=daemon.socket_path)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1
    assert "404 attachment_not_found" in missing.stderr

    bad = ctl(
        "attach",
        unique("att"),
        "--volume-id",
        "v",
        "--domain",
        "nowhere",
        "--local-device",
        "/etc/passwd",
        socket=daemon.socket_path,
    )
    assert bad.returncode == 2
    assert "400 invalid_request" in bad.stderr and "outside /dev" in bad.stderr

    nobody = ctl("status", socket=Path("/tmp/hatest-no-such.sock"))
    assert nobody.returncode == 2
    assert "unreachable" in nobody.stderr


def test_xml_renders_offline_what_the_daemon_would_attach(
    daemon: Daemon, guests: Guests, loops: LoopDevices, tmp_path: Path
) -> None:
    device = loops.make()
    info = tmp_path / "connection_info.json"
    info.write_text(json.dumps({"driver_volume_type": "local", "data": {"device_path": device}}))
    offline = ctl(
        "xml",
        "--connection-info",
        str(info),
        "--multiattach",
        "--attachment-id",
        "a1",
        "--serial",
        "vol-x",
    )
    assert offline.returncode == 0, offline.stderr
    assert "<shareable/>" in offline.stdout
    assert f'<source dev="{device}"/>' in offline.stdout
    assert 'cache="none"' in offline.stdout and 'io="native"' in offline.stdout

    # The same disk, attached by hand, is accepted by libvirt.
    guest = guests.make()
    guest.attach_raw(offline.stdout)
    assert guest.disk("ua-a1") is not None

    # And the daemon, asked for the same attach on another guest, makes the same disk.
    other = guests.make()
    attachment, _ = daemon.client.attach(
        "a1",
        {
            "volume_id": "vol-x",
            "domain": other.name,
            "multiattach": True,
            "serial": "vol-x",
            "connection_info": {"driver_volume_type": "local", "data": {"device_path": device}},
        },
    )
    assert attachment.disk_xml == offline.stdout

    refused = ctl(
        "xml",
        "--connection-info",
        "-",
        stdin=json.dumps({"driver_volume_type": "local", "data": {"device_path": "/etc/passwd"}}),
    )
    assert refused.returncode == 2
    assert "outside /dev" in refused.stderr
    qcow2 = ctl(
        "xml",
        "--connection-info",
        "-",
        "--multiattach",
        stdin=json.dumps(
            {"driver_volume_type": "local", "data": {"device_path": device, "format": "qcow2"}}
        ),
    )
    assert qcow2.returncode == 2 and "raw" in qcow2.stderr


def test_served_openapi_is_the_checked_in_one(daemon: Daemon) -> None:
    status, served = daemon.client.request("GET", "/v1/openapi.json")
    assert status == 200
    checked_in = Path(__file__).parents[2] / "docs" / "openapi.json"
    assert served == json.loads(checked_in.read_text())
