"""Processes that hold a host block device open, found through /proc.

A QEMU that holds the device without libvirt knowing (libvirtd killed in the
middle of a hot-plug leaves such a disk behind) still uses it.

Looking costs about 4 µs a descriptor (the kernel's /proc lookups; stat,
readlink and threads all cost the same), so a host with tens of thousands of
open descriptors would pay a tenth of a second per search. A process with
many descriptors is therefore remembered: what block devices it holds, and
how long each of its threads has run (``/proc/PID/task/TID/schedstat``, in
nanoseconds). A process whose threads are the same and have not run since
cannot have opened or closed anything, so it is not searched again. Only a
process whose descriptor table no other process shares is remembered (a
sharer could open a descriptor into it without it running).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass


def device_number(path: str) -> int | None:
    """The device number of a block device node, None if ``path`` is not one."""
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode):
            return st.st_rdev
    return None


@dataclass(frozen=True)
class OpenHandle:
    """A process that has the device open."""

    pid: int
    command: str


@dataclass(frozen=True)
class _Remembered:
    """A searched process: its identity, its threads' run times before the
    search, and the block devices it held."""

    started: str
    runtimes: dict[str, int]
    blocks: frozenset[int]
    command: str


class HolderSearch:
    """Finds the processes that hold a block device open, remembering
    processes with at least ``remember_from`` descriptors (see the module)."""

    def __init__(self, proc: str = "/proc", *, remember_from: int = 256) -> None:
        self._proc = proc
        self._remember_from = remember_from
        self._remembered: dict[str, _Remembered] = {}
        self._mutex = threading.Lock()

    def holding(self, device_path: str, *, among: Iterable[int] | None = None) -> list[OpenHandle]:
        """Every process with an open file descriptor on the block device (only
        those of the pids ``among``, when given: always searched afresh)."""
        rdev = device_number(device_path)
        if rdev is None:
            return []
        own_pid = str(os.getpid())
        everyone = among is None
        pids = os.listdir(self._proc) if among is None else [str(pid) for pid in among]
        holders = []
        for pid in pids:
            if not pid.isdigit() or pid == own_pid:
                continue
            found = self._holds(pid, rdev, remember=everyone)
            if found is not None:
                holders.append(OpenHandle(int(pid), found))
        if everyone:
            listed = set(pids)
            with self._mutex:
                for gone in [p for p in self._remembered if p not in listed]:
                    del self._remembered[gone]
        return holders

    def _holds(self, pid: str, rdev: int, *, remember: bool) -> str | None:
        """The command of ``pid`` if it holds ``rdev``, else None."""
        with self._mutex:
            known = self._remembered.get(pid)
        if known is not None and remember and self._unchanged(pid, known):
            return known.command if rdev in known.blocks else None
        # Run times are read before the search, so a change during it shows
        # next time; only for a process worth remembering (the size of its
        # fd directory is its number of descriptors, 0 on kernels before 6.2).
        remember = remember and _descriptors(f"{self._proc}/{pid}") >= self._remember_from
        runtimes = self._runtimes(pid) if remember else {}
        searched = _block_devices_open(f"{self._proc}/{pid}")
        if searched is None:  # exited, or not ours to look at
            return None
        blocks, count = searched
        if remember and count >= self._remember_from:
            started = self._started(pid)
            if runtimes and started and self._table_is_its_own(pid, count):
                command = _command(f"{self._proc}/{pid}")
                with self._mutex:
                    self._remembered[pid] = _Remembered(started, runtimes, blocks, command)
        return _command(f"{self._proc}/{pid}") if rdev in blocks else None

    def _unchanged(self, pid: str, known: _Remembered) -> bool:
        return self._started(pid) == known.started and self._runtimes(pid) == known.runtimes

    def _started(self, pid: str) -> str:
        """Its start time (field 22 of stat): a reused pid is another process."""
        try:
            with open(f"{self._proc}/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            return ""
        return fields[19].decode() if len(fields) > 19 else ""

    def _runtimes(self, pid: str) -> dict[str, int]:
        """Nanoseconds each thread has run; empty if it cannot be read."""
        runtimes = {}
        try:
            for tid in os.listdir(f"{self._proc}/{pid}/task"):
                with open(f"{self._proc}/{pid}/task/{tid}/schedstat", "rb") as f:
                    runtimes[tid] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return {}
        return runtimes

    def _table_is_its_own(self, pid: str, count: int) -> bool:
        """No other process shares its descriptor table: a sharer has the same
        number of descriptors (the size of /proc/PID/fd), and kcmp tells."""
        for other in os.listdir(self._proc):
            if not other.isdigit() or other == pid:
                continue
            try:
                if os.stat(f"{self._proc}/{other}/fd").st_size != count:
                    continue
            except OSError:
                continue
            if not _other_table(int(pid), int(other)):
                return False
        return True


# kcmp(2) by architecture; KCMP_FILES compares two processes' descriptor tables.
_KCMP = {"x86_64": 312, "aarch64": 272, "ppc64le": 354, "s390x": 343}.get(platform.machine())
_KCMP_FILES = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _other_table(pid: int, other: int) -> bool:
    """Whether ``other`` certainly has a descriptor table of its own (False if
    it shares ``pid``'s, or if the kernel cannot say)."""
    if _KCMP is None:
        return False
    return int(_libc.syscall(_KCMP, pid, other, _KCMP_FILES, 0, 0)) > 0


def _descriptors(proc_dir: str) -> int:
    try:
        return os.stat(f"{proc_dir}/fd").st_size
    except OSError:
        return 0


def _block_devices_open(proc_dir: str) -> tuple[frozenset[int], int] | None:
    """(device numbers of the block devices it has open, how many descriptors
    it has), or None if it cannot be looked at. Each process's ``fd``
    directory is opened once and its entries are stat'ed relative to it."""
    try:
        fd_dir = os.open(f"{proc_dir}/fd", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return None
    else:
        blocks = set()
        for name in names:
            try:
                st = os.stat(name, dir_fd=fd_dir)
            except OSError:  # closed meanwhile
                continue
            if stat.S_ISBLK(st.st_mode):
                blocks.add(st.st_rdev)
        return frozenset(blocks), len(names)
    finally:
        os.close(fd_dir)


def _command(proc_dir: str) -> str:
    try:
        with open(f"{proc_dir}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


_SEARCH = HolderSearch()


def processes_holding(device_path: str, *, among: Iterable[int] | None = None) -> list[OpenHandle]:
    """``HolderSearch.holding`` on this host's /proc, remembering across calls."""
    return _SEARCH.holding(device_path, among=among)
