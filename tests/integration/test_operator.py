"""The operator surface on real parts: show, doctor, reconcile, connector, metrics, peers."""

from __future__ import annotations

import json
import os
import pwd
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from hostagent.client import ApiError, HostagentClient
from tests.conftest import DaemonFactory
from tests.integration.support import (
    Daemon,
    Guest,
    Guests,
    LoopDevices,
    hand_made_disk,
    local_request,
    unique,
)
from tests.integration.test_cli import ctl


def test_show_prints_the_attachment_its_connection_and_libvirts_disk(
    daemon: Daemon, guests: Guests, loops: LoopDevices
) -> None:
    guest = guests.make(persistent=True)
    device = loops.make()
    attachment_id = unique("att")
    daemon.client.attach(
        attachment_id, local_request(device, guest, volume_id="vol-s", multiattach=True)
    )
    shown = ctl("show", attachment_id, socket=daemon.socket_path)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"attachment {attachment_id}" in out and f"host connection local:{device}" in out
    assert "live XML:" in out and "persistent config:" in out
    assert out.count(f'<alias name="ua-{attachment_id}"/>') == 2
    assert (
        f"virsh dumpxml {guest.name} --xpath \"//disk[alias/@name='ua-{attachment_id}']\"" in out
    )

    data = json.loads(ctl("show", attachment_id, "--json", socket=daemon.socket_path).stdout)
    assert data["attachment"]["attachment_id"] == attachment_id
    assert data["connection"]["device_path"] == device
    live = data["libvirt"]["live_disk_xml"]
    assert "<shareable/>" in live and f'<source dev="{device}" index=' in live
    # The virsh command it prints shows the same disk.
    dumped = subprocess.run(
        ["virsh", "dumpxml", guest.name, "--xpath", f"//disk[alias/@name='ua-{attachment_id}']"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert same_xml(dumped, live)


def same_xml(a: str, b: str) -> bool:
    parser = etree.XMLParser(remove_blank_text=True)
    return bool(
        etree.tostring(etree.fromstring(a, parser)) == etree.tostring(etree.fromstring(b, parser))
    )


def test_doctor_lists_each_disagreement_with_a_suggestion_and_reconcile_fixes_some(
    daemon: Daemon, guests: Guests, loops: LoopDevices
) -> None:
    sock = daemon.socket_path
    guest, other = guests.make(), guests.make()
    device = loops.make()
    ours = unique("att")
    daemon.client.attach(ours, local_request(device, guest, volume_id="v", multiattach=True))
    clean = ctl("doctor", socket=sock)
    assert clean.returncode == 0 and clean.stdout.startswith("ok:"), clean.stdout

    # Disagreements made by hand, as an operator with virsh would.
    guest.dom.detachDeviceAlias(f"ua-{ours}", 1)  # live only: the disk vanishes under us
    other.attach_raw(hand_made_disk(device, target_dev="sdq", unit=7, alias="ua-handmade"))
    sick = ctl("doctor", socket=sock)
    assert sick.returncode == 1
    report = json.loads(ctl("doctor", "--json", socket=sock).stdout)
    kinds = {f["kind"]: f for f in report["findings"]}
    assert set(kinds) == {"missing_disk", "unrecorded_disk", "foreign_disk"}, kinds
    assert kinds["missing_disk"]["subject"] == ours
    assert "hostagentctl detach" in kinds["missing_disk"]["suggestion"]
    assert "ua-handmade" in kinds["unrecorded_disk"]["detail"]
    assert "--rebuild-state" in kinds["unrecorded_disk"]["suggestion"]
    assert "  try: " in sick.stdout

    reconciled = ctl("reconcile", socket=sock)
    assert reconciled.returncode == 0
    assert "missing_disk" in reconciled.stdout and "foreign_disk" in reconciled.stdout
    # The device stays connected while the hand-made disk uses it.
    result = daemon.client.detach(ours)
    assert result.terminate_connection is False
    assert daemon.client.connections().connections[0].host_refcount == 0


def default_route_source() -> str:
    route = json.loads(
        subprocess.run(
            ["ip", "-j", "route", "get", "8.8.8.8"], capture_output=True, text=True, check=True
        ).stdout
    )
    return str(route[0]["prefsrc"])


@pytest.fixture
def initiator_file() -> Iterator[str]:
    """An initiator name for os-brick to report (made only if the host has none)."""
    path = Path("/etc/iscsi/initiatorname.iscsi")
    if path.exists():
        yield path.read_text().split("=", 1)[1].strip()
        return
    path.parent.mkdir(exist_ok=True)
    iqn = "iqn.1993-08.org.debian:01:hatest"
    path.write_text(f"InitiatorName={iqn}\n")
    try:
        yield iqn
    finally:
        path.unlink()


def test_connector_properties_with_route_lookup(
    daemon_factory: DaemonFactory, initiator_file: str
) -> None:
    daemon = daemon_factory(**{"connector.host": "compute-7"})
    client = daemon.client
    plain = client.connector()
    assert plain.host == "compute-7"
    assert plain.ip == default_route_source()
    assert plain.initiator == initiator_file
    assert plain.multipath is False
    assert client.connector("127.0.0.1").ip == "127.0.0.1"
    with pytest.raises(ApiError) as bad:
        client.connector("storage.example")
    assert (bad.value.status, bad.value.code) == (400, "invalid_request")
    configured = daemon_factory(**{"connector.my_ip": "192.0.2.123"}).client
    assert configured.connector().ip == "192.0.2.123"
    assert configured.connector("127.0.0.1").ip == "127.0.0.1", "a target beats my_ip"
    cli = ctl("connector", "--target", "127.0.0.1", "--json", socket=daemon.socket_path)
    assert json.loads(cli.stdout)["ip"] == "127.0.0.1"


def scrape(daemon: Daemon) -> dict[str, float]:
    status, _ = 0, None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(daemon.socket_path))
    conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = b""
    while chunk := conn.recv(65536):
        raw += chunk
    conn.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"200 OK" in head.split(b"\r\n")[0] and b"text/plain" in head
    samples = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    del status
    return samples


def test_metrics_count_results_time_phases_and_report_states(
    daemon: Daemon, client: HostagentClient, guest: Guest, device: str
) -> None:
    first, second = unique("att"), unique("att")
    client.attach(first, local_request(device, guest, volume_id="v", multiattach=True))
    client.attach(first, local_request(device, guest, volume_id="v", multiattach=True))
    with pytest.raises(ApiError):
        client.attach(second, local_request(device, guest, volume_id="v", multiattach=True))
    during = scrape(daemon)
    assert during['hostagent_operations_total{operation="attach",result="created"}'] == 1
    assert during['hostagent_operations_total{operation="attach",result="exists"}'] == 1
    assert (
        during['hostagent_operations_total{operation="attach",result="volume_already_attached"}']
        == 1
    )
    assert during['hostagent_attachments{state="attached"}'] == 1
    assert during['hostagent_connections{state="connected"}'] == 1
    assert during["hostagent_libvirt_up"] == 1
    client.detach(first)
    after = scrape(daemon)
    assert after['hostagent_operations_total{operation="detach",result="detached"}'] == 1
    for phase in ("connect", "libvirt_attach", "removal_wait", "guard", "disconnect"):
        assert after[f'hostagent_phase_seconds_count{{phase="{phase}"}}'] == 1, phase
        assert after[f'hostagent_phase_seconds_sum{{phase="{phase}"}}'] > 0, phase
    assert after['hostagent_attachments{state="attached"}'] == 0
    assert after['hostagent_connections{state="connected"}'] == 0


TEST_USER = "hatest-caller"


@pytest.fixture
def unprivileged_user() -> Iterator[pwd.struct_passwd]:
    subprocess.run(["userdel", "-r", TEST_USER], check=False, capture_output=True)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--user-group", TEST_USER], check=True
    )
    try:
        yield pwd.getpwnam(TEST_USER)
    finally:
        subprocess.run(["userdel", TEST_USER], check=False, capture_output=True)


def as_user(
    user: pwd.struct_passwd, socket_path: Path, *args: str, groups: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
            sys.executable,
            "-m",
            "hostagent.cli",
            "--socket",
            str(socket_path),
            *args,
        ],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(Path.cwd())},
    )


def test_only_root_and_allowed_peers_may_call(
    daemon_factory: DaemonFactory, unprivileged_user: pwd.struct_passwd
) -> None:
    user = unprivileged_user
    refusing = daemon_factory()
    assert oct(refusing.socket_path.stat().st_mode & 0o777) == "0o660"
    # Let the user reach the socket at all (the group permission would do
    # this in production), so the daemon's own check is what answers.
    refusing.socket_path.parent.chmod(0o755)
    refusing.socket_path.chmod(0o666)
    denied = as_user(user, refusing.socket_path, "list")
    assert denied.returncode == 2
    assert "403 forbidden" in denied.stderr
    log = refusing.log()
    assert re.search(
        rf"refused GET /v1/attachments from pid \d+ uid {user.pw_uid} gid "
        rf"{user.pw_gid}",
        log,
    ), log[-2000:]
    assert refusing.client.list() == [], "root still passes"

    by_gid = daemon_factory(**{"api.allowed_gids": str(user.pw_gid)})
    by_uid = daemon_factory(**{"api.allowed_uids": str(user.pw_uid)})
    for allowing in (by_gid, by_uid):
        allowing.socket_path.parent.chmod(0o755)
        allowing.socket_path.chmod(0o666)
        allowed = as_user(user, allowing.socket_path, "list")
        assert allowed.returncode == 0, allowed.stderr

    # A supplementary group counts too (read from /proc only for such a check).
    extra_gid = 4242
    by_group = daemon_factory(**{"api.allowed_gids": str(extra_gid)})
    by_group.socket_path.parent.chmod(0o755)
    by_group.socket_path.chmod(0o666)
    assert as_user(user, by_group.socket_path, "list").returncode == 2
    member = as_user(user, by_group.socket_path, "list", groups=(extra_gid,))
    assert member.returncode == 0, member.stderr


def test_connector_reports_do_local_attach_in_krbd_mode(daemon_factory: DaemonFactory) -> None:
    krbd = daemon_factory(**{"rbd.attach_mode": "krbd"}).client.connector("127.0.0.1")
    assert krbd.model_dump()["do_local_attach"] is True
    librbd = daemon_factory().client.connector("127.0.0.1")
    assert librbd.model_dump()["do_local_attach"] is False
