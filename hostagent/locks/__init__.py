"""Named locks: the only wrapper of oslo.concurrency in hostagent.

Connection and domain locks are external (a file under ``<state_dir>/locks``
plus oslo's in-process semaphore), so nothing else that takes them on this
state dir can interleave. Attachment locks are in-process only: ids are
single-use, a file per id would pile up forever, and the daemon holds the
state dir exclusively (``state_dir_guard``). There is no global lock: work
on different attachments, volumes and guests proceeds in parallel.

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
from collections.abc import Iterator
from pathlib import Path

from oslo_concurrency import lockutils

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def lock_file_name(kind: str, key: str) -> str:
    """A file name for ``kind``/``key``: readable prefix plus a hash, so
    keys with ``/`` or ``:`` never collide or escape the lock dir."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    readable = _UNSAFE.sub("_", key)[-48:]
    return f"{kind}-{readable}-{digest}"


class HostLocks:
    """Factory of the named external locks, rooted at ``lock_dir``."""

    def __init__(self, lock_dir: Path) -> None:
        self.lock_dir = lock_dir
        lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    @contextlib.contextmanager
    def _lock(self, kind: str, key: str, *, external: bool = True) -> Iterator[None]:
        with lockutils.lock(
            lock_file_name(kind, key),
            lock_file_prefix="hostagent-",
            external=external,
            lock_path=str(self.lock_dir),
        ):
            yield

    def attachment(self, attachment_id: str) -> contextlib.AbstractContextManager[None]:
        return self._lock("attachment", attachment_id, external=False)

    def connection(self, connection_key: str) -> contextlib.AbstractContextManager[None]:
        return self._lock("connection", connection_key)

    def domain(self, domain_uuid: str) -> contextlib.AbstractContextManager[None]:
        return self._lock("domain", domain_uuid)


@contextlib.contextmanager
def state_dir_guard(state_dir: Path) -> Iterator[None]:
    """Hold ``<state_dir>/hostagentd.lock`` for the daemon's lifetime, so a
    second daemon on the same state dir fails at start instead of racing."""
    path = state_dir / "hostagentd.lock"
    guard = lockutils.InterProcessLock(str(path))
    if not guard.acquire(blocking=False):
        raise StateDirBusy(f"another hostagentd holds {path}")
    try:
        yield
    finally:
        guard.release()


class StateDirBusy(RuntimeError):
    """The state dir is in use by another running daemon."""
