"""hostagentctl on a migration's destination: an incoming attachment is made,
listed and shown with its state and alias, confirmed (refused before the
domain arrives) and released."""

from __future__ import annotations

import json
import uuid

from tests.integration.support import Daemon, LoopDevices, unique
from tests.integration.test_cli import ctl


def test_an_incoming_attachment_through_the_cli(daemon: Daemon, loops: LoopDevices) -> None:
    device = loops.make()
    attachment_id = unique("in")
    arriving = str(uuid.uuid4())
    sock = daemon.socket_path

    made = ctl(
        "attach",
        attachment_id,
        "--volume-id",
        "vol-cli",
        "--domain",
        arriving,
        "--local-device",
        device,
        "--multiattach",
        "--incoming-alias",
        "ua-on-source",
        socket=sock,
    )
    assert made.returncode == 0, made.stderr
    assert f"incoming: {attachment_id} ready for {arriving} to arrive with ua-on-source" in (
        made.stdout
    )
    assert f"<source dev='{device}'/>" in made.stdout or f'<source dev="{device}"/>' in made.stdout

    header, row = ctl("list", socket=sock).stdout.splitlines()
    assert header.split()[3:5] == ["STATE", "ALIAS"]
    assert row.split()[3:5] == ["incoming", "ua-on-source"]
    shown = ctl("show", attachment_id, socket=sock).stdout
    assert "state: incoming" in shown and "alias: ua-on-source" in shown
    assert "(not arrived yet)" in shown

    early = ctl("confirm", attachment_id, socket=sock)
    assert early.returncode == 2 and "409 migration_not_finished" in early.stderr

    released = json.loads(ctl("detach", attachment_id, "--json", socket=sock).stdout)
    assert released["terminate_connection"] is True
