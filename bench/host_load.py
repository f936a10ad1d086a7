#!/usr/bin/env python3
"""Load on the host that the check before a disconnect must look through.

hostagentd's guard reads every domain's XML (live and persistent config) and
every process's open file descriptors before it disconnects a device, so its
cost grows with what the host carries besides the benchmarked guests:

- ``DefinedDomains``: shut-off persistent domains (``defineXML`` only, never
  started), each with four ``type='file'`` disks on sparse files of its own:
  never the benchmarked device, so they add work to the scan, never a user;
- ``FdHolders``: helper processes holding open file descriptors: a few
  idle ones with thousands each by default; ``per_process=100, busy=True``
  is the shape of a host's running guests (a QEMU per guest, a hundred
  descriptors or so, its threads waking all the time).

Both are context managers that make their load on entry and remove exactly
what they made on exit (the domains they defined, the processes they
started, by pid). Domain names follow the test guests' convention
(``hatest-<pid>-...``), so ``remove_stale_guests`` removes the leftovers of a
killed run. A holder also exits by itself when its parent goes away (its
stdin closes).

    python bench/host_load.py hold DIRECTORY COUNT [busy]   # one holder, by FdHolders
"""

from __future__ import annotations

import itertools
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

# Not tests.integration.support at the top: it loads libvirt and hostagent,
# and every holder process runs this file (2 s to start instead of 0.1 s).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
GUEST_PREFIX = "hatest-"  # tests/integration/support.py's, checked by a unit test

DISKS_PER_DOMAIN = 4
DISK_SIZE = 1024 * 1024  # sparse: no block of it is ever written
# The hard RLIMIT_NOFILE here is 20,000 a process: half of it per holder
# leaves room, and many holders of a few thousand fds look more like a host
# (QEMUs, libvirtd, agents) than one process with all of them.
FDS_PER_HOLDER = 10_000
DEFINE_THREADS = 8
FD_MARGIN = 64  # the interpreter's own descriptors
# A busy holder's thread wakes this often, as a running guest's vCPU and
# timer threads do: the guard cannot take it for a process that did nothing.
BUSY_WAKE_SECONDS = 0.01


def defined_domain_name(number: int, pid: int | None = None) -> str:
    """``hatest-<pid>-idle-<n>``: the pid is what ``remove_stale_guests`` checks."""
    return f"{GUEST_PREFIX}{os.getpid() if pid is None else pid}-idle-{number}"


def defined_domain_xml(name: str, disk_files: list[Path]) -> str:
    """A test guest's XML (q35, virtio-scsi) with one file-backed SCSI disk per file."""
    from tests.integration.support import guest_xml  # noqa: PLC0415  (see the imports)

    disks = "".join(
        "    <disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        f"<source file='{path}'/><target dev='sd{chr(ord('a') + unit)}' bus='scsi'/>"
        f"<address type='drive' controller='0' bus='0' target='0' unit='{unit}'/></disk>\n"
        for unit, path in enumerate(disk_files)
    )
    return guest_xml(name).replace("  </devices>", f"{disks}  </devices>")


def fd_shares(total: int, per_process: int = FDS_PER_HOLDER) -> list[int]:
    """``total`` descriptors split as evenly as possible over the fewest processes
    that each hold at most ``per_process``."""
    if total <= 0:
        return []
    processes = -(-total // per_process)
    base, extra = divmod(total, processes)
    return [base + 1 if i < extra else base for i in range(processes)]


class _Load:
    """A load that removes what it made on exit (``_remove``), as on a failed entry."""

    def _remove(self) -> None:
        raise NotImplementedError

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._remove()


class DefinedDomains(_Load):
    """``count`` shut-off persistent domains with four file disks each."""

    def __init__(self, conn: Any, count: int, directory: Path) -> None:
        self.conn = conn
        self.count = count
        self.directory = directory
        self.uuids: list[str] = []
        self._workdir: Path | None = None
        self._numbers = itertools.count()
        self._mutex = threading.Lock()

    def __enter__(self) -> DefinedDomains:
        self._workdir = Path(tempfile.mkdtemp(prefix="defined-", dir=self.directory))
        xmls = []
        for _ in range(self.count):
            number = next(self._numbers)
            files = []
            for unit in range(DISKS_PER_DOMAIN):
                path = self._workdir / f"idle-{number}-{unit}.img"
                with path.open("wb") as f:
                    f.truncate(DISK_SIZE)
                files.append(path)
            xmls.append(defined_domain_xml(defined_domain_name(number), files))

        def define(xml: str) -> None:
            domain_uuid = self.conn.defineXML(xml).UUIDString()
            with self._mutex:
                self.uuids.append(domain_uuid)

        try:
            # libvirt connections are thread-safe, and libvirtd defines
            # concurrently: 8 at a time is several times faster than 1.
            with ThreadPoolExecutor(DEFINE_THREADS) as pool:
                list(pool.map(define, xmls))
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        from tests.integration.support import remove_domain  # noqa: PLC0415

        for domain_uuid in self.uuids:
            remove_domain(self.conn, domain_uuid)  # by UUID: only what we defined
        self.uuids.clear()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


class FdHolders(_Load):
    """Helper processes that hold ``total`` open descriptors in all.

    Each descriptor is a distinct empty regular file (not /dev/null): a real
    host's descriptors are mostly sockets and files, each its own inode, and
    a guard that remembered what it had seen by inode or path would skip
    30,000 /dev/null descriptors after the first and measure nothing. The
    files are on tmpfs (/dev/shm) where there is one: creating and holding
    10,000 files there takes 0.06 s, on this host's ext4 2 s.
    """

    def __init__(
        self,
        total: int,
        directory: Path | None = None,
        *,
        per_process: int = FDS_PER_HOLDER,
        busy: bool = False,
    ) -> None:
        self.total = total
        self.per_process = per_process
        self.busy = busy
        shm = Path("/dev/shm")  # noqa: S108  (only a parent for mkdtemp, 0700)
        self.directory = directory or (shm if shm.is_dir() else Path(tempfile.gettempdir()))
        self.processes: list[subprocess.Popen[bytes]] = []
        self._workdir: Path | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def __enter__(self) -> FdHolders:
        self._workdir = Path(tempfile.mkdtemp(prefix="ha-bench-holders-", dir=self.directory))
        try:
            shares = fd_shares(self.total, self.per_process)
            for number, share in enumerate(shares):
                folder = self._workdir / str(number)
                busy = ["busy"] if self.busy else []
                self.processes.append(
                    subprocess.Popen(
                        [sys.executable, __file__, "hold", str(folder), str(share), *busy],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                    )
                )
            for process, share in zip(self.processes, shares, strict=True):
                assert process.stdout is not None
                line = process.stdout.readline().decode().strip()
                if line != f"holding {share}":
                    raise RuntimeError(f"fd holder {process.pid} did not start: {line!r}")
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for process in self.processes:  # only the processes this object started
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()
        self.processes.clear()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


def hold(folder: Path, count: int, *, busy: bool = False) -> int:
    """The holder process: open ``count`` new files in ``folder``, say so, wait
    for EOF; ``busy``: a thread of it wakes every BUSY_WAKE_SECONDS meanwhile."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + FD_MARGIN
    if hard != resource.RLIM_INFINITY and wanted > hard:
        print(f"cannot hold {count}: the hard fd limit is {hard}", flush=True)
        return 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    folder.mkdir(parents=True)
    held = [
        os.open(folder / f"f{i}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        for i in range(count)
    ]
    if busy:
        threading.Thread(target=_wake_often, daemon=True).start()
    print(f"holding {len(held)}", flush=True)
    sys.stdin.buffer.read()  # until the parent closes the pipe or terminates us
    return 0


def _wake_often() -> None:
    while True:
        time.sleep(BUSY_WAKE_SECONDS)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[1] != "hold" or argv[4:] not in ([], ["busy"]):
        print(__doc__, file=sys.stderr)
        return 2
    return hold(Path(argv[2]), int(argv[3]), busy=argv[4:] == ["busy"])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
