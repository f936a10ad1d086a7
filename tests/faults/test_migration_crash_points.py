"""SIGKILL at each step of the live migration hand-off, restart, and check
what is left: the incoming PUT (record, connect, disk XML), the arrival, the
release of an incoming and the source's release of a disk that left with its
domain. One host suffices: an "arriving" domain is a guest started with the
incoming attachment's UUID and alias, which is what the agent sees of one."""

from __future__ import annotations

import time
import uuid

import pytest

from hostagent.client import HostagentClient
from tests.conftest import DaemonFactory
from tests.faults.test_crash_points import expect_kill, restart_clean, start_crashing
from tests.integration.support import (
    Guest,
    Guests,
    LoopDevices,
    guest_xml,
    hand_made_disk,
    local_request,
    unique,
)

ALIAS = "ua-from-source"
INCOMING_CASES = [
    ("attach.after_intent", "incoming recorded, not connected"),
    ("attach.after_connect", "connected, not recorded"),
    ("incoming.after_connect", "connected and recorded, no disk XML"),
]


def incoming_body(device: str, domain_uuid: str) -> dict[str, object]:
    return {
        **local_request(device, domain_uuid, volume_id="vol-m", multiattach=True),
        "incoming_migration": {"alias": ALIAS},
    }


def arrive(guests: Guests, domain_uuid: str, device: str) -> Guest:
    """The domain starts here with the disk under the source's alias."""
    name = f"hatest-arrived-{uuid.uuid4().hex[:8]}"
    dom = guests.conn.createXML(_with_uuid(guest_xml(name), domain_uuid), 0)
    guest = Guest(guests.conn, name, str(dom.UUIDString()), persistent=False)
    guests.created.append(guest)
    guest.attach_raw(hand_made_disk(device, target_dev="sdb", unit=1, alias=ALIAS))
    return guest


def _with_uuid(xml: str, domain_uuid: str) -> str:
    start, end = xml.index("<uuid>") + len("<uuid>"), xml.index("</uuid>")
    return xml[:start] + domain_uuid + xml[end:]


def released_once(client: HostagentClient, attachment_id: str) -> None:
    result = client.detach(attachment_id)
    assert (result.host_disconnected, result.terminate_connection) == (True, True)
    assert client.detach(attachment_id) == result
    assert client.connections().connections == []


@pytest.mark.parametrize(("failpoint", "what"), INCOMING_CASES, ids=[p for p, _ in INCOMING_CASES])
def test_crash_during_an_incoming_put(
    daemon_factory: DaemonFactory, loops: LoopDevices, failpoint: str, what: str
) -> None:
    daemon = start_crashing(daemon_factory, failpoint, 1)
    client = daemon.client
    device = loops.make()
    body = incoming_body(device, str(uuid.uuid4()))
    expect_kill(daemon, lambda: client.attach("d1", body))

    restart_clean(daemon)
    attachment, _ = client.attach("d1", body)  # the caller's retry
    assert (attachment.state, attachment.alias, attachment.host_refcount) == (
        "incoming",
        ALIAS,
        1,
    )
    assert attachment.disk_xml is not None and device in attachment.disk_xml
    (connection,) = client.connections().connections
    assert connection.state == "connected"
    released_once(client, "d1")


def test_crash_during_the_arrival(
    daemon_factory: DaemonFactory, guests: Guests, loops: LoopDevices
) -> None:
    daemon = start_crashing(daemon_factory, "arrival.before_record", 1)
    client = daemon.client
    device = loops.make()
    domain_uuid = str(uuid.uuid4())
    client.attach("d1", incoming_body(device, domain_uuid))
    guest = arrive(guests, domain_uuid, device)
    expect_kill(daemon, lambda: client.confirm("d1"))

    restart_clean(daemon)  # start-up reconcile records the arrival
    assert client.get("d1").state == "attached"
    confirmed = client.confirm("d1")
    assert (confirmed.state, confirmed.domain_name, confirmed.target_dev) == (
        "attached",
        guest.name,
        "sdb",
    )
    released_once(client, "d1")
    assert guest.disk(ALIAS) is None, "the detach found the disk by the recorded alias"


def test_crash_while_releasing_an_incoming(
    daemon_factory: DaemonFactory, loops: LoopDevices
) -> None:
    daemon = start_crashing(daemon_factory, "incoming.release_after_intent", 1)
    client = daemon.client
    device = loops.make()
    client.attach("d1", incoming_body(device, str(uuid.uuid4())))
    expect_kill(daemon, lambda: client.detach("d1"))

    restart_clean(daemon)  # reconcile finishes the release
    assert client.list() == []
    result = client.detach("d1")  # the caller's retry replays it
    assert result.terminate_connection
    assert client.connections().connections == []


@pytest.mark.parametrize("failpoint", ["detach.after_intent", "detach.after_removal"])
def test_crash_during_the_source_release_of_a_disk_that_left(
    daemon_factory: DaemonFactory, guests: Guests, loops: LoopDevices, failpoint: str
) -> None:
    daemon = start_crashing(daemon_factory, failpoint, 1)
    client = daemon.client
    device = loops.make()
    guest = guests.make(persistent=True)
    attachment, _ = client.attach(unique("m"), local_request(device, guest, volume_id="v"))
    # the domain no longer holds the disk (what a migration away leaves of a
    # persistent domain whose definition stays), nothing to unplug
    guest.dom.detachDeviceAlias(attachment.alias, 3)  # live and config
    deadline = time.monotonic() + 10
    while guest.disk(attachment.alias) is not None:
        assert time.monotonic() < deadline, "the hand-made unplug did not finish"
        time.sleep(0.1)
    expect_kill(daemon, lambda: client.detach(attachment.attachment_id))

    restart_clean(daemon)
    released_once(client, attachment.attachment_id)
