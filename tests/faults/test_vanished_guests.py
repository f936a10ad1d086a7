"""Guests that vanish: destroyed transient domains, undefined persistent ones."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from hostagent.api.models import DetachResult
from hostagent.client import ApiError, HostagentClient
from tests.integration.support import (
    Daemon,
    Guest,
    Guests,
    LoopDevices,
    hand_made_disk,
    local_request,
    unique,
)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - started


def attached_ids(client: HostagentClient) -> set[str]:
    return {a.attachment_id for a in client.list()}


# The periodic sweep is off: the lifecycle event alone must do it.
@pytest.mark.daemon_options(**{"reconcile.interval": "0"})
def test_destroyed_transient_guest_releases_its_attachments(
    client: HostagentClient, guests: Guests, loops: LoopDevices
) -> None:
    device, own_device = loops.make(), loops.make()
    doomed, survivor = guests.make(), guests.make()
    shared_doomed, shared_survivor, alone = unique("att"), unique("att"), unique("att")
    client.attach(shared_doomed, local_request(device, doomed, volume_id="v", multiattach=True))
    client.attach(
        shared_survivor, local_request(device, survivor, volume_id="v", multiattach=True)
    )
    client.attach(alone, local_request(own_device, doomed, volume_id="w"))

    doomed.dom.destroy()
    seconds = wait_for(lambda: attached_ids(client) == {shared_survivor}, 10, "release")
    print(f"released {seconds:.2f} s after destroy")
    connections = {c.device_path: c for c in client.connections().connections}
    assert set(connections) == {device}, "the doomed guest's own device was released"
    assert connections[device].host_refcount == 1
    assert survivor.open_block_devices(), "the survivor keeps the shared device"

    # The caller's DELETEs learn what happened: only the last user's says terminate.
    assert client.detach(alone).terminate_connection is True
    assert client.detach(shared_doomed).terminate_connection is False
    assert client.detach(shared_survivor).terminate_connection is True


@pytest.mark.daemon_options(**{"reconcile.interval": "0"})
def test_undefined_persistent_guest_releases_but_a_stopped_one_keeps(
    client: HostagentClient, device: str, guests: Guests
) -> None:
    guest = guests.make(persistent=True)
    attachment_id = unique("att")
    client.attach(attachment_id, local_request(device, guest, volume_id="v"))

    guest.dom.destroy()  # shut off: its config still holds the disk
    time.sleep(1)
    assert attached_ids(client) == {attachment_id}
    assert client.connections().connections[0].host_refcount == 1

    guest.dom.undefine()
    wait_for(lambda: attached_ids(client) == set(), 10, "release after undefine")
    assert client.connections().connections == []
    assert client.detach(attachment_id).terminate_connection is True


@pytest.mark.daemon_options(**{"detach-timeout": "30", "reconcile.interval": "0"})
def test_guest_destroyed_while_its_detach_waits(
    client: HostagentClient, guest: Guest, device: str
) -> None:
    attachment_id = unique("att")
    client.attach(attachment_id, local_request(device, guest, volume_id="v", bus="virtio"))
    outcome: dict[str, object] = {}

    def detach() -> None:
        started = time.monotonic()
        try:
            outcome["result"] = client.detach(attachment_id)
        except ApiError as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=detach)
    worker.start()
    wait_for(lambda: client.get(attachment_id).state == "detaching", 5, "detaching")
    time.sleep(1)
    guest.dom.destroy()
    worker.join(40)
    assert "error" not in outcome, outcome
    result = outcome["result"]
    seconds = outcome["seconds"]
    assert isinstance(result, DetachResult) and isinstance(seconds, float)
    assert result.terminate_connection
    assert seconds < 10, "the waiting detach noticed the domain was gone"
    assert client.list() == [] and client.connections().connections == []


def test_guest_gone_while_the_daemon_was_down_is_released_at_start(
    daemon: Daemon, client: HostagentClient, device: str, guest: Guest
) -> None:
    attachment_id = unique("att")
    client.attach(attachment_id, local_request(device, guest, volume_id="v"))
    daemon.kill()
    guest.dom.destroy()
    daemon.start()
    assert client.list() == []
    assert client.connections().connections == []
    assert client.detach(attachment_id).terminate_connection is True
    assert "released" in daemon.log()


@pytest.mark.daemon_options(**{"reconcile.interval": "1"})
def test_periodic_reconcile_is_the_safety_net(
    daemon: Daemon, client: HostagentClient, device: str, guests: Guests
) -> None:
    """No event tells the agent that a hand-added disk went away: the periodic
    sweep notices and releases the connection it was keeping for it."""
    ours, theirs = guests.make(), guests.make()
    attachment_id = unique("att")
    client.attach(attachment_id, local_request(device, ours, volume_id="v", multiattach=True))
    theirs.attach_raw(hand_made_disk(device, target_dev="sdz", unit=9))
    assert client.detach(attachment_id).host_disconnected is False
    assert client.connections().connections, "kept for the hand-added disk"
    theirs.dom.detachDeviceFlags(
        f"<disk type='block' device='disk'><source dev='{device}'/>"
        "<target dev='sdz' bus='scsi'/></disk>",
        1,
    )
    wait_for(lambda: client.connections().connections == [], 15, "the periodic sweep")
    assert "periodic reconcile: 1 actions" in daemon.log()
