"""Each domain's disks as libvirt gave them, kept while the file libvirt saves
for that domain is unchanged.

libvirt's qemu driver saves a file per domain, ``<dir>/<name>.xml``, written
aside and renamed over, inside the call that changes what the file holds
(persistent configs, ``persistent_configs``; running domains' status,
``live_disks``). inotify queues the rename's event in the same system call,
so draining the queue before every use sees each change made before the use
began. What a drain reports is read again from libvirt (never from the
file). An overflowed queue, a watch that ends, or a libvirt reconnect
empties the cache; a domain whose file is not where expected (or names
another UUID) is never cached, so a wrong directory costs reads, not safety.

libvirt writes ``<name>.xml.new`` first: its events count as a change to
``<name>`` too, so a save that fails after creating it (libvirt logs a
failed status or config save and goes on) still says the domain changed.
One that fails before creating it makes no event at all, so nothing is
kept longer than ``KEEP_AT_MOST`` seconds either. libvirt's lifecycle
events (a domain defined or undefined, also by a reload that wrote no
file) drop what is kept of that domain as well (``changed``), as late as
they arrive.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from inotify_simple import INotify, flags

from hostagent.libvirt_xml.disk import DiskRef, parse_disk_refs

LOG = logging.getLogger(__name__)

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

# The longest a domain's disks are kept without a read from libvirt, change or not.
KEEP_AT_MOST = 60.0

# The URIs of the local system instance, whose directories are known.
SYSTEM_URIS = frozenset({"qemu:///system", "qemu+unix:///system"})


def watched_dir(uri: str, configured: str, system_dir: Path) -> Path | None:
    """The directory whose files validate a cache: ``configured`` if set
    ("none" switches the cache off), else ``system_dir`` when ``uri`` is the
    local system instance, else none (no cache)."""
    if configured:
        return None if configured == "none" else Path(configured)
    return system_dir if uri in SYSTEM_URIS else None


@dataclass(frozen=True)
class _Entry:
    name: str
    disks: tuple[DiskRef, ...]
    read_at: float  # monotonic


def _named(file_name: str) -> str | None:
    """The domain name a file in the directory stands for (``<name>.xml`` and
    libvirt's ``<name>.xml.new`` while it saves), None for any other file."""
    for suffix in (".xml", ".xml.new"):
        if file_name.endswith(suffix):
            return file_name[: -len(suffix)]
    return None


class WatchedDisks:
    """The disks of each domain's XML as ``read(uuid)`` gives it (raising
    DomainNotFound for a domain gone meanwhile), cached while ``directory``
    says that domain's file is unchanged; ``what`` names them in logs.
    Without a directory (or a watch on it) every use reads. Thread-safe."""

    def __init__(
        self,
        read: Callable[[str], str],
        directory: Path | None,
        *,
        what: str,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._monotonic = monotonic
        self._dir = directory
        self._what = what
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        # Bumped per file name by each change drained, and for all of them
        # (``_epoch``) by whatever forgets more than one file's worth (an
        # overflow, a reconnect, a lifecycle event, the end of the watch): a
        # read that began before a bump is not kept.
        self._generation: dict[str, int] = {}
        self._epoch = 0
        self._changes = 0  # file changes drained, all names
        self._uncacheable_told: set[str] = set()
        self._inotify: INotify | None = None
        if directory is not None:
            self._watch(directory)

    def _watch(self, directory: Path) -> None:
        try:
            inotify = INotify(nonblocking=True)
        except OSError as exc:
            LOG.warning("%s: read from libvirt every time (inotify: %s)", self._what, exc)
            return
        try:
            inotify.add_watch(directory, _CHANGES)
        except OSError as exc:
            inotify.close()
            LOG.warning(
                "%s: read from libvirt every time (cannot watch %s: %s)",
                self._what,
                directory,
                exc,
            )
            return
        self._inotify = inotify
        LOG.info("%s: cached while %s says unchanged", self._what, directory)

    @property
    def caching(self) -> bool:
        return self._inotify is not None

    def forget_all(self) -> None:
        """Drop every entry (libvirt reconnected: it may have reloaded its files)."""
        with self._lock:
            self._reset()

    def close(self) -> None:
        with self._lock:
            if self._inotify is not None:
                self._inotify.close()
                self._inotify = None
            self._reset()

    def changed(self, uuid: str) -> None:
        """libvirt says domain ``uuid`` changed (a lifecycle event): forget
        what is kept of it, and let no read under way be kept."""
        with self._lock:
            self._entries.pop(uuid, None)
            self._new_epoch()

    def disks_of(self, uuid: str, name: str, *, fresh: bool = False) -> tuple[DiskRef, ...]:
        """The disks of domain ``uuid`` (named ``name``) as its XML has them now,
        read from libvirt if not cached (always if ``fresh``). Raises
        DomainNotFound if it went away meanwhile."""
        with self._lock:
            self._drain()
            entry = self._entries.get(uuid)
            if entry is not None and entry.name == name and not fresh and self._young(entry):
                return entry.disks
            started = (self._epoch, self._generation.get(name, 0))
        read_at = self._monotonic()
        disks = parse_disk_refs(self._read(uuid)).disks
        if self._inotify is not None and self._file_names(name, uuid):
            with self._lock:
                if (self._epoch, self._generation.get(name, 0)) == started:
                    self._entries[uuid] = _Entry(name, disks, read_at)
        return disks

    def _young(self, entry: _Entry) -> bool:
        return self._monotonic() - entry.read_at <= KEEP_AT_MOST

    def known(self, domains: Iterable[tuple[str, str]]) -> dict[str, tuple[DiskRef, ...]]:
        """The cached disks of those of ``domains`` (UUID, name) whose file is
        unchanged, after one look at the changes; every other domain is
        forgotten (gone since it was cached)."""
        wanted = dict(domains)
        with self._lock:
            self._drain()
            for uuid in [u for u in self._entries if u not in wanted]:
                del self._entries[uuid]
            return {
                uuid: entry.disks
                for uuid, entry in self._entries.items()
                if entry.name == wanted[uuid] and self._young(entry)
            }

    def _drain(self) -> None:
        """Apply every change queued so far; the caller holds the lock."""
        if self._inotify is None:
            return
        try:
            events = self._inotify.read(timeout=0)
        except OSError as exc:
            LOG.warning("%s: cache off, reading inotify failed: %s", self._what, exc)
            self._stop_caching()
            return
        for event in events:
            if event.mask & flags.Q_OVERFLOW:
                LOG.info("%s: changes overflowed inotify's queue, all read again", self._what)
                self._reset()
            elif event.mask & _WATCH_GONE:
                LOG.warning("%s: the directory went away: cache off", self._what)
                self._stop_caching()
                return
            elif (name := _named(event.name)) is not None:
                self._generation[name] = self._generation.get(name, 0) + 1
                for uuid in [u for u, e in self._entries.items() if e.name == name]:
                    del self._entries[uuid]
                self._changes += 1
                self._forgot()

    def _forgot(self) -> None:
        """Something kept was forgotten (a file changed, a lifecycle event, a
        reset); the caller holds the lock. For what a subclass keeps besides."""

    def _stamp(self) -> tuple[int, int]:
        """Moves whenever anything is forgotten: a read or listing that began
        under another stamp is not kept."""
        return self._epoch, self._changes

    def _reset(self) -> None:
        """Forget everything, and every read under way; the caller holds the lock."""
        self._entries.clear()
        self._new_epoch()

    def _new_epoch(self) -> None:
        """No read or listing under way may be kept; the caller holds the lock.
        The per-name generations start again (only a stamp's epoch tells now),
        so they do not grow with every name ever seen."""
        self._epoch += 1
        self._generation.clear()
        self._forgot()

    def _stop_caching(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._reset()

    def _file_names(self, name: str, uuid: str) -> bool:
        """Whether ``<dir>/<name>.xml`` is this domain's file: only then do its
        changes reach the watch. Said once per domain when it is not."""
        assert self._dir is not None
        if file_uuid(self._dir / f"{name}.xml") == uuid.lower():
            return True
        if uuid not in self._uncacheable_told:
            self._uncacheable_told.add(uuid)
            LOG.warning(
                "domain %s (%s): no file of it in %s; read from libvirt every time (%s)",
                name,
                uuid,
                self._dir,
                self._what,
            )
        return False


def file_uuid(path: Path) -> str | None:
    """The (lower-case) UUID a saved domain file names first, None if it cannot
    be read or names none."""
    try:
        with open(path, "rb") as saved:
            found = _UUID.search(saved.read())
    except OSError:
        return None
    return found.group(1).decode().lower() if found is not None else None
