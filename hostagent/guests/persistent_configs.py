"""Every persistent domain's disks, read from libvirt once and kept until
libvirt writes that domain's config again; and which domains are persistent,
listed once and kept until libvirt defines, undefines or renames one.

libvirt sends no event for a config-only change (``virsh attach-disk
--config`` on a running domain), so a cache of the persistent configs needs a
validator that cannot lag: libvirt's qemu driver saves each persistent config
as ``<config dir>/<name>.xml`` (written aside, then renamed over) inside the
API call that changes it, and inotify queues the rename's event in the same
system call. Draining the queue before every use therefore sees each change
made before the use began; what a drain reports is read again from libvirt
(never from the file). An overflowed queue, a watch that ends, or a libvirt
reconnect empties the cache; a domain whose file is not where expected (or
names another UUID) is never cached, so a wrong directory costs reads, not
safety.

The same watch keeps the list of persistent domains: defining, undefining or
renaming one (also a running domain turned persistent or transient, and an
incoming migration made persistent) saves or removes its file in the same
call. While no file changed since a full listing, every domain is that
listing's persistent ones plus whatever runs now (one round trip instead of
two, and no handle for each domain defined but shut off); any change, an
overflow or a reconnect lists everything again. A listing is kept only if
every persistent domain in it has its file in the directory.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from inotify_simple import INotify, flags

from hostagent.guests.domains import DomainInfo
from hostagent.libvirt_xml.disk import DiskRef, parse_disk_refs

LOG = logging.getLogger(__name__)

# The system instance of libvirt's qemu driver keeps persistent configs here.
SYSTEM_CONFIG_DIR = Path("/etc/libvirt/qemu")
SYSTEM_URIS = frozenset({"qemu:///system", "qemu+unix:///system"})

_CHANGES = (
    flags.CREATE
    | flags.CLOSE_WRITE
    | flags.MOVED_TO
    | flags.MOVED_FROM
    | flags.DELETE
    | flags.DELETE_SELF
    | flags.MOVE_SELF
)
_WATCH_GONE = flags.IGNORED | flags.DELETE_SELF | flags.MOVE_SELF | flags.UNMOUNT
_UUID = re.compile(rb"<uuid>\s*([0-9a-fA-F-]{36})\s*</uuid>")


def config_dir_for(uri: str, configured: str) -> Path | None:
    """The directory whose files validate the cache: ``configured`` if set
    ("none" switches the cache off), else the system instance's own directory
    when ``uri`` is the local system instance, else none (no cache)."""
    if configured:
        return None if configured == "none" else Path(configured)
    return SYSTEM_CONFIG_DIR if uri in SYSTEM_URIS else None


@dataclass(frozen=True)
class _Entry:
    name: str
    disks: tuple[DiskRef, ...]


class PersistentConfigs:
    """The disks of each persistent domain's config, cached while libvirt's
    config directory says the config is unchanged. Thread-safe.

    ``read_config(uuid)`` is the libvirt read (the inactive XML); it raises
    DomainNotFound for a domain undefined meanwhile.
    """

    def __init__(self, read_config: Callable[[str], str], config_dir: Path | None) -> None:
        self._read_config = read_config
        self._dir = config_dir
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        # Bumped per config file name by each change drained, and for all of
        # them (``_epoch``) by an overflow: a read that began before a bump
        # is not kept.
        self._generation: dict[str, int] = {}
        self._epoch = 0
        # (UUID, name) of every persistent domain as last listed; None when a
        # change drained since says the list may be old. ``_changes`` counts
        # the config changes drained, so a listing that began before one is
        # not kept.
        self._persistent: tuple[tuple[str, str], ...] | None = None
        self._changes = 0
        self._uncacheable_told: set[str] = set()
        self._unlisted_told = False
        self._inotify: INotify | None = None
        if config_dir is not None:
            self._watch(config_dir)

    def _watch(self, config_dir: Path) -> None:
        try:
            inotify = INotify(nonblocking=True)
        except OSError as exc:
            LOG.warning("domain configs are read from libvirt every time: inotify: %s", exc)
            return
        try:
            inotify.add_watch(config_dir, _CHANGES)
        except OSError as exc:
            inotify.close()
            LOG.warning(
                "domain configs are read from libvirt every time: cannot watch %s: %s",
                config_dir,
                exc,
            )
            return
        self._inotify = inotify
        LOG.info("domain configs are cached while %s says they are unchanged", config_dir)

    @property
    def caching(self) -> bool:
        return self._inotify is not None

    def forget_all(self) -> None:
        """Drop every entry (libvirt reconnected: it may have reloaded its configs)."""
        with self._lock:
            self._entries.clear()
            self._persistent = None
            self._epoch += 1

    def close(self) -> None:
        with self._lock:
            if self._inotify is not None:
                self._inotify.close()
                self._inotify = None
            self._entries.clear()
            self._persistent = None

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
        if kept is not None:
            active = dict(running())
            with self._lock:
                self._drain()
                unchanged, started = self._stamp() == started, self._stamp()
            if unchanged:
                return _with_running(kept, active)
        domains = every()
        if self._inotify is not None and self._all_filed(domains):
            with self._lock:
                self._drain()
                if self._stamp() == started and self._inotify is not None:
                    self._persistent = tuple((d.uuid, d.name) for d in domains if d.persistent)
        return domains

    def _stamp(self) -> tuple[int, int]:
        return self._epoch, self._changes

    def disks_of(self, uuid: str, name: str) -> tuple[DiskRef, ...]:
        """The disks of persistent domain ``uuid`` (named ``name``) as its config
        has them now. Raises DomainNotFound if it was undefined meanwhile."""
        with self._lock:
            self._drain()
            entry = self._entries.get(uuid)
            if entry is not None and entry.name == name:
                return entry.disks
            started = (self._epoch, self._generation.get(name, 0))
        disks = parse_disk_refs(self._read_config(uuid)).disks
        if self._inotify is not None and self._file_names(name, uuid):
            with self._lock:
                if (self._epoch, self._generation.get(name, 0)) == started:
                    self._entries[uuid] = _Entry(name, disks)
        return disks

    def known(self, domains: Iterable[tuple[str, str]]) -> dict[str, tuple[DiskRef, ...]]:
        """The cached disks of those of ``domains`` (UUID, name) whose config is
        unchanged, after one look at the changes; every other domain is
        forgotten (undefined since it was cached)."""
        wanted = dict(domains)
        with self._lock:
            self._drain()
            for uuid in [u for u in self._entries if u not in wanted]:
                del self._entries[uuid]
            return {
                uuid: entry.disks
                for uuid, entry in self._entries.items()
                if entry.name == wanted[uuid]
            }

    def _drain(self) -> None:
        """Apply every change queued so far; the caller holds the lock."""
        if self._inotify is None:
            return
        try:
            events = self._inotify.read(timeout=0)
        except OSError as exc:
            LOG.warning("domain config cache off: reading inotify failed: %s", exc)
            self._stop_caching()
            return
        for event in events:
            if event.mask & flags.Q_OVERFLOW:
                LOG.info("domain config changes overflowed inotify's queue: all read again")
                self._entries.clear()
                self._persistent = None
                self._epoch += 1
            elif event.mask & _WATCH_GONE:
                LOG.warning("the domain config directory went away: cache off")
                self._stop_caching()
                return
            elif event.name.endswith(".xml"):
                name = event.name[: -len(".xml")]
                self._generation[name] = self._generation.get(name, 0) + 1
                self._changes += 1
                self._persistent = None
                for uuid in [u for u, e in self._entries.items() if e.name == name]:
                    del self._entries[uuid]

    def _stop_caching(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._entries.clear()
        self._persistent = None
        self._epoch += 1

    def _all_filed(self, domains: list[DomainInfo]) -> bool:
        """Whether every persistent domain of a listing has ``<name>.xml`` in
        the directory (else it is not the one libvirt saves them in, and its
        changes would not say the listing is old). Said once when not."""
        assert self._dir is not None
        try:
            files = set(os.listdir(self._dir))
        except OSError:
            files = set()
        unfiled = [d.name for d in domains if d.persistent and f"{d.name}.xml" not in files]
        if unfiled and not self._unlisted_told:
            self._unlisted_told = True
            LOG.warning(
                "persistent domains %s have no config in %s: every domain is listed "
                "from libvirt every time",
                ", ".join(sorted(unfiled)[:5]),
                self._dir,
            )
        return not unfiled

    def _file_names(self, name: str, uuid: str) -> bool:
        """Whether ``<dir>/<name>.xml`` is this domain's config: only then do its
        changes reach the watch. Said once per domain when it is not."""
        assert self._dir is not None
        try:
            with open(self._dir / f"{name}.xml", "rb") as config:
                found = _UUID.search(config.read())
        except OSError:
            found = None
        if found is not None and found.group(1).decode().lower() == uuid.lower():
            return True
        if uuid not in self._uncacheable_told:
            self._uncacheable_told.add(uuid)
            LOG.warning(
                "domain %s (%s): no config of it in %s; its config is read from libvirt "
                "every time",
                name,
                uuid,
                self._dir,
            )
        return False


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
