"""SIGKILL between an extend's host refresh and its guest resizes, restart, repeat.

Nothing of an extend is recorded, so there is nothing for reconcile to
finish: the caller's repeat refreshes the host again and resizes every guest
not yet at size.
"""

from __future__ import annotations

import os

from tests.conftest import DaemonFactory
from tests.faults.test_crash_points import expect_kill, restart_clean, start_crashing
from tests.integration.support import (
    Guests,
    LoopDevices,
    assert_consistent,
    local_request,
    run,
    unique,
)
from tests.integration.test_extend import qemu_size

MIB = 1024 * 1024


def test_crash_after_the_host_refresh(
    daemon_factory: DaemonFactory, guests: Guests, loops: LoopDevices
) -> None:
    daemon = start_crashing(daemon_factory, "extend.after_host_refresh", 1)
    client = daemon.client
    device = loops.make(16)
    trio = [guests.make(), guests.make(persistent=True), guests.make()]
    volume = unique("vol")
    ids = [unique("att") for _ in trio]
    for attachment_id, guest in zip(ids, trio, strict=True):
        client.attach(
            attachment_id, local_request(device, guest, volume_id=volume, multiattach=True)
        )
    os.truncate(loops.backing[device], 40 * MIB)
    run("losetup", "-c", device)

    expect_kill(daemon, lambda: client.extend(ids[0], 40 * MIB))
    for attachment_id, guest in zip(ids, trio, strict=True):
        assert qemu_size(guest, f"ua-{attachment_id}") == 16 * MIB, "killed before any resize"

    restart_clean(daemon)
    assert_consistent(client, trio)
    repeated = client.extend(ids[0], 40 * MIB)  # the caller's repeat
    assert sorted(g.attachment_id for g in repeated.guests) == sorted(ids)
    assert all(g.resized and g.size == 40 * MIB for g in repeated.guests)
    for attachment_id, guest in zip(ids, trio, strict=True):
        assert qemu_size(guest, f"ua-{attachment_id}") == 40 * MIB
    assert not any(g.resized for g in client.extend(ids[2]).guests)
    assert_consistent(client, trio)
