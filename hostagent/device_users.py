"""The check before every disconnect: who still uses a connection's device.

API.md's rule that no input can break: a host connection is never
disconnected while a domain (live XML or persistent config) names its
device, whatever the agent's records say. A process that holds the device
open counts too (a QEMU left with a disk libvirt lost track of when libvirtd
was killed in the middle of a hot-plug).
"""

from __future__ import annotations

import time

from hostagent.guests import Guests
from hostagent.records import ConnectionRecord
from hostagent.references import DiskMatcher, find_references, matcher_for, processes_holding

# A process found holding a device no domain names is looked at again for this
# long before it keeps the connection: closing a device a guest wrote to makes
# udev probe it (blkid, through its inotify watch), and that brief open must
# not turn the last detach into one that never reports terminate_connection.
HOLDER_GRACE_SECONDS = 2.0
HOLDER_POLL_SECONDS = 0.05


def device_users(guests: Guests, connection: ConnectionRecord) -> list[str]:
    """Who still uses the connection's device: domains (live or config) that
    name it, else processes that hold it open. Empty: safe to disconnect.

    Raises LibvirtUnavailable if libvirt cannot be asked: no answer is never
    taken as "unused".
    """
    matcher = matcher_for(connection)
    if matcher is None:
        return []
    users = _domains_using(guests, matcher)
    if users or connection.device_path is None:
        return users
    # After the domain scan, not beside it: run together, the two contend
    # for the GIL and took longer than one after the other (measured).
    holders = processes_holding(connection.device_path)
    if not holders:
        return []
    deadline = time.monotonic() + HOLDER_GRACE_SECONDS
    while holders and time.monotonic() < deadline:
        time.sleep(HOLDER_POLL_SECONDS)
        holders = processes_holding(connection.device_path)
    if holders:
        return [f"process {h.pid} ({h.command}) that holds it open" for h in holders]
    # The grace took up to seconds: a domain may have taken the device
    # meanwhile, and the disconnect must not act on a scan that old.
    return _domains_using(guests, matcher)


def _domains_using(guests: Guests, matcher: DiskMatcher) -> list[str]:
    return [
        f"domain {ref.domain_name} ({ref.where}, disk {ref.alias or ref.target_dev})"
        for ref in find_references(guests, matcher)
    ]
