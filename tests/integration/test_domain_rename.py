"""``virsh domrename`` (issue 14, item 2): the attachment stays, and the name
the agent reports follows the domain, by libvirt's event or by reconcile."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

from tests.conftest import DaemonFactory
from tests.integration.support import (
    LIBVIRT_URI,
    Guest,
    Guests,
    LoopDevices,
    guest_xml,
    local_request,
    unique,
)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def rename(guest: Guest, new_name: str) -> None:
    """What an operator runs (libvirt renames only a domain that is shut off)."""
    subprocess.run(
        ["virsh", "-c", LIBVIRT_URI, "-q", "domrename", guest.name, new_name], check=True
    )
    guest.name = new_name


def take_the_name(guests: Guests, name: str) -> Guest:
    """Another persistent domain under ``name``, removed at cleanup."""
    dom = guests.conn.defineXML(guest_xml(name))
    other = Guest(guests.conn, name, dom.UUIDString(), persistent=True)
    guests.created.append(other)
    return other


def test_renamed_domain_keeps_its_attachment_under_its_new_name(
    daemon_factory: DaemonFactory, guests: Guests, loops: LoopDevices
) -> None:
    daemon = daemon_factory(**{"reconcile.interval": "0"})
    client = daemon.client
    guest = guests.make(persistent=True)
    old_name = guest.name
    attachment_id = unique("att")
    client.attach(attachment_id, local_request(loops.make(), guest, volume_id="v"))
    guest.dom.destroy()

    rename(guest, old_name + "-renamed")
    wait_for(lambda: client.get(attachment_id).domain_name == guest.name, 10, "the new name")
    other = take_the_name(guests, old_name)
    time.sleep(0.5)  # the other domain's define event, handled too

    [attachment] = client.list()
    assert (attachment.attachment_id, attachment.domain_name) == (attachment_id, guest.name)
    assert attachment.domain_uuid == guest.uuid != other.uuid
    assert "released" not in daemon.log(), "a rename released the attachment"
    result = client.detach(attachment_id)
    assert result.terminate_connection
    assert guest.disk(f"ua-{attachment_id}", inactive=True) is None
    assert f"from {guest.name}" in daemon.log()


def test_rename_while_the_daemon_was_down_is_picked_up_at_start(
    daemon_factory: DaemonFactory, guests: Guests, loops: LoopDevices
) -> None:
    daemon = daemon_factory()
    client = daemon.client
    guest = guests.make(persistent=True)
    old_name = guest.name
    attachment_id = unique("att")
    client.attach(attachment_id, local_request(loops.make(), guest, volume_id="v"))
    daemon.kill()
    guest.dom.destroy()
    rename(guest, old_name + "-renamed")
    take_the_name(guests, old_name)
    daemon.start()

    [attachment] = client.list()
    assert (attachment.attachment_id, attachment.domain_name) == (attachment_id, guest.name)
    assert f"domain {old_name} is now {guest.name}" in daemon.log()
