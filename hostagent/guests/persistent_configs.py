"""Every persistent domain's disks, read from libvirt once and kept until
libvirt writes that domain's config again; and which domains are persistent,
listed once and kept until libvirt defines, undefines or renames one.

libvirt sends no event for a config-only change (``virsh attach-disk
--config`` on a running domain), so a cache of the persistent configs needs a
validator that cannot lag: libvirt's qemu driver saves each persistent config
as ``<config dir>/<name>.xml`` inside the API call that changes it, watched
as ``watched_disks`` describes.

The same watch keeps the list of persistent domains: defining, undefining or
renaming one (also a running domain turned persistent or transient, and an
incoming migration made persistent) saves or removes its file in the same
call. While no file changed since a full listing, every domain is that
listing's persistent ones plus whatever runs now (one round trip instead of
two, and no handle for each domain defined but shut off); any change, an
overflow, a reconnect or a lifecycle event lists everything again, and so
does a listing kept ``KEEP_AT_MOST`` seconds. A listing is kept only if the
directory holds exactly its persistent domains' files, each naming its
domain's UUID, and it has at least one (an empty directory may be anyone's):
a config dropped in by hand and not loaded yet, or a directory that is not
libvirt's, costs listings, not safety.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from hostagent.guests.domains import DomainInfo
from hostagent.guests.watched_disks import KEEP_AT_MOST, WatchedDisks, file_uuid, watched_dir

LOG = logging.getLogger(__name__)

# The system instance of libvirt's qemu driver keeps persistent configs here.
SYSTEM_CONFIG_DIR = Path("/etc/libvirt/qemu")


def config_dir_for(uri: str, configured: str) -> Path | None:
    """The directory that validates the configs (``watched_dir``)."""
    return watched_dir(uri, configured, SYSTEM_CONFIG_DIR)


class PersistentConfigs(WatchedDisks):
    """The disks of each persistent domain's config, cached while libvirt's
    config directory says the config is unchanged, and the list of persistent
    domains (``domains``). Thread-safe.

    ``read_config(uuid)`` is the libvirt read (the inactive XML); it raises
    DomainNotFound for a domain undefined meanwhile.
    """

    def __init__(
        self,
        read_config: Callable[[str], str],
        config_dir: Path | None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        # (UUID, name) of every persistent domain as last listed; None once
        # anything was forgotten since (``_forgot``): the list may be old.
        self._persistent: tuple[tuple[str, str], ...] | None = None
        self._persistent_at = 0.0
        self._listing_unkept_told = False
        super().__init__(read_config, config_dir, what="domain configs", monotonic=monotonic)

    def domains(
        self,
        every: Callable[[], list[DomainInfo]],
        running: Callable[[], list[tuple[str, str]]],
    ) -> list[DomainInfo]:
        """Every domain, sorted by name: ``every()`` (libvirt's full listing)
        unless the directory says no domain was defined, undefined or renamed
        since the last one; then that listing's persistent domains and
        ``running()`` ((UUID, name) of each domain running now: one not among
        the persistent is transient)."""
        with self._lock:
            self._drain()
            kept, started = self._persistent, self._stamp()
            if self._monotonic() - self._persistent_at > KEEP_AT_MOST:
                kept = None
        if kept is not None:
            active = dict(running())
            with self._lock:
                self._drain()
                unchanged, started = self._stamp() == started, self._stamp()
            if unchanged:
                return _with_running(kept, active)
        listed_at = self._monotonic()
        domains = every()
        if self._inotify is not None and self._files_are(domains):
            with self._lock:
                self._drain()
                if self._stamp() == started and self._inotify is not None:
                    self._persistent = tuple((d.uuid, d.name) for d in domains if d.persistent)
                    self._persistent_at = listed_at
        return domains

    def _forgot(self) -> None:
        self._persistent = None

    def _files_are(self, domains: list[DomainInfo]) -> bool:
        """Whether the directory holds exactly the listing's persistent domains'
        files (``<name>.xml``, each naming its UUID), and at least one: only
        then do its changes say when the listing is old. Said once when not."""
        assert self._dir is not None
        persistent = {d.name: d.uuid for d in domains if d.persistent}
        try:
            names = {n[: -len(".xml")] for n in os.listdir(self._dir) if n.endswith(".xml")}
        except OSError:
            names = set()
        # A kept config vouches for its file: it was read only after the file
        # was seen to name its UUID, and any change to the file since dropped it.
        with self._lock:
            vouched = {u for u, entry in self._entries.items() if persistent.get(entry.name) == u}
        kept = bool(persistent) and names == set(persistent)
        kept = kept and all(
            u in vouched or file_uuid(self._dir / f"{n}.xml") == u.lower()
            for n, u in persistent.items()
        )
        if not kept and not self._listing_unkept_told:
            self._listing_unkept_told = True
            LOG.info(
                "%s does not hold exactly the %d persistent domains' configs: every domain "
                "is listed from libvirt until it does",
                self._dir,
                len(persistent),
            )
        return kept


def _with_running(
    persistent: tuple[tuple[str, str], ...], running: dict[str, str]
) -> list[DomainInfo]:
    """The persistent domains (running or not) and the transient ones, which
    run by definition, as one listing sorted by name."""
    named = dict(persistent)
    domains = [
        DomainInfo(uuid=uuid, name=name, active=uuid in running, persistent=True)
        for uuid, name in persistent
    ]
    domains += [
        DomainInfo(uuid=uuid, name=name, active=True, persistent=False)
        for uuid, name in running.items()
        if uuid not in named
    ]
    return sorted(domains, key=lambda domain: domain.name)
