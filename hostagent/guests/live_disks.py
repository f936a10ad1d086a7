"""Each running domain's disks as its live XML has them, read from libvirt once
and kept until libvirt saves that domain's status again.

libvirt's qemu driver keeps a status file per running domain,
``<status dir>/<name>.xml`` (its own record for a restart of libvirtd), and
saves it, written aside and renamed over, inside every call that changes the
live definition, before the call returns: a hot-plug, a synchronous unplug,
a media change, a start, an incoming migration (measured: the rename is
queued before ``attachDeviceFlags`` returns). A domain that stops loses its
file. So a live XML kept while the file is unchanged (``watched_disks``)
misses no disk a finished call added.

What libvirt changes on its own, after an event, it saves a moment after the
change shows in the live XML: the end of an unplug (``DEVICE_REMOVED``, then
the save about a millisecond later), a block job that ends by itself. In
that moment a kept live XML can still show a disk that is gone, so a guard
that finds a live disk in a kept XML reads that domain's live XML again
before it answers (``DomainScan.live_now``). A block job's new
source shows the same moment before the save: for a host block device QEMU
holds it open from the job's start, and the guard's holder search finds it;
a network source (RBD) has no such second look. (A block copy's destination,
``<mirror>``, is not read from any XML, kept or not: a limit of its own.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hostagent.guests.watched_disks import WatchedDisks, watched_dir

# The system instance of libvirt's qemu driver keeps running domains' status here.
SYSTEM_STATUS_DIR = Path("/run/libvirt/qemu")


def status_dir_for(uri: str, configured: str) -> Path | None:
    """The directory that validates the live XMLs (``watched_dir``)."""
    return watched_dir(uri, configured, SYSTEM_STATUS_DIR)


class LiveDisks(WatchedDisks):
    """The disks of each running domain's live XML, cached while libvirt's
    status directory says the domain's status is unchanged. ``read_live(uuid)``
    is the libvirt read; it raises DomainNotFound for a domain gone meanwhile."""

    def __init__(self, read_live: Callable[[str], str], status_dir: Path | None) -> None:
        super().__init__(read_live, status_dir, what="live XML")
