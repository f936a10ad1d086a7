"""Named locks: the only wrapper of oslo.concurrency in hostagent.

The daemon holds its state dir exclusively (``state_dir_guard``), so no other
process can take a lock on it: given that proof (``StateDirHeld``), every
lock is in-process, a ``threading.Lock`` per name kept only while held or
awaited. Without it (a service built outside the daemon), connection and
domain locks are external as well (a file under ``<state_dir>/locks``, taken
through oslo.concurrency), so nothing else that takes them on this state
dir can interleave; that costs a makedirs, an open, a lockf and a close per
acquisition. Attachment locks are always in-process only: ids are
single-use, a file per id would pile up forever. There is no global lock:
work on different attachments, volumes and guests proceeds in parallel.

Order, whenever more than one is held::

    attachment lock  ->  connection lock  ->  domain lock

- attachment (per attachment_id): one PUT/DELETE of an id at a time, so a
  retry waits for the request it repeats instead of racing it.
- connection (per connection_key): connect/disconnect and every change of the
  set of attachments that derive its refcount.
- domain (per domain UUID): target-dev/address choice and device changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from oslo_concurrency import lockutils

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def lock_file_name(kind: str, key: str) -> str:
    """A file name for ``kind``/``key``: readable prefix plus a hash, so
    keys with ``/`` or ``:`` never collide or escape the lock dir."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    readable = _UNSAFE.sub("_", key)[-48:]
    return f"{kind}-{readable}-{digest}"


@dataclass(frozen=True)
class StateDirHeld:
    """Proof that this process holds ``state_dir`` exclusively: what
    ``state_dir_guard`` yields."""

    state_dir: Path


class _NamedLocks:
    """In-process locks by name; a name's lock lives only while someone holds
    or awaits it, so single-use names never pile up."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        with self._mutex:
            lock, users = self._locks.get(name) or (threading.Lock(), 0)
            self._locks[name] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._mutex:
                users = self._locks[name][1] - 1
                if users:
                    self._locks[name] = (lock, users)
                else:
                    del self._locks[name]


# One table per process, as oslo's semaphores: two HostLocks on one lock dir
# exclude each other.
_IN_PROCESS = _NamedLocks()


class HostLocks:
    """Factory of the named locks, rooted at ``lock_dir``; in-process only when
    ``held`` proves this process holds the state dir that ``lock_dir`` is in."""

    def __init__(self, lock_dir: Path, *, held: StateDirHeld | None = None) -> None:
        if held is not None and lock_dir.parent != held.state_dir:
            raise ValueError(f"{lock_dir} is not the lock dir of {held.state_dir}")
        self.lock_dir = lock_dir
        self._external = held is None
        lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    @contextlib.contextmanager
    def _lock(self, kind: str, key: str, *, external: bool = True) -> Iterator[None]:
        name = lock_file_name(kind, key)
        if not (external and self._external):
            with _IN_PROCESS.hold(f"{self.lock_dir}/{name}"):
                yield
            return
        with lockutils.lock(
            name, lock_file_prefix="hostagent-", external=True, lock_path=str(self.lock_dir)
        ):
            yield

    def attachment(self, attachment_id: str) -> contextlib.AbstractContextManager[None]:
        return self._lock("attachment", attachment_id, external=False)

    def connection(self, connection_key: str) -> contextlib.AbstractContextManager[None]:
        return self._lock("connection", connection_key)

    def domain(self, domain_uuid: str) -> contextlib.AbstractContextManager[None]:
        return self._lock("domain", domain_uuid)


@contextlib.contextmanager
def state_dir_guard(state_dir: Path) -> Iterator[StateDirHeld]:
    """Hold ``<state_dir>/hostagentd.lock`` for the daemon's lifetime, so a
    second daemon on the same state dir fails at start instead of racing."""
    path = state_dir / "hostagentd.lock"
    guard = lockutils.InterProcessLock(str(path))
    if not guard.acquire(blocking=False):
        raise StateDirBusy(f"another hostagentd holds {path}")
    try:
        yield StateDirHeld(state_dir)
    finally:
        guard.release()


class StateDirBusy(RuntimeError):
    """The state dir is in use by another running daemon."""
