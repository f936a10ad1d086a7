"""Whether the host itself uses a block device, so it is never handed to a guest.

A guest given the host's root disk, a mounted partition or a swap device
read-write (with ``<shareable/>``, so no QEMU lock stops it) corrupts the
host. Before anything is connected or recorded, a local device is refused
when it, a partition of it, or anything stacked on either (sysfs
``holders/``: dm, LVM, md, multipath) is mounted or is active swap, or when
another opener holds it exclusively (``O_EXCL`` fails with ``EBUSY``: a
mounted filesystem, swap, an md/dm member; QEMU does not open that way, so
guests sharing the device do not trip it).

Devices stacked on it that are the same storage seen another way (a
multipath map over a path device, kpartx's partition mappings) only count
when they are mounted or swap; any other (LVM, md, dm-crypt) is the host's.
A device is known by its device number: every node, link or bind mount of
it is the same ``BlockDevice``, named by the kernel (``/dev/<kernel name>``).
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import stat
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hostagent.host.holders import device_number


@dataclass(frozen=True)
class BlockDevice:
    """A block device as the kernel knows it: its number and its kernel name."""

    major: int
    minor: int
    name: str

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"

    @property
    def number(self) -> str:
        return f"{self.major}:{self.minor}"


@dataclass(frozen=True)
class HostView:
    """Where the host's block-device facts are read (real ones by default; tests
    point ``sysfs`` at a recorded tree)."""

    sysfs: Path = Path("/sys")
    proc: Path = Path("/proc")
    dev: Path = Path("/dev")


def identify(path: str, view: HostView = HostView()) -> BlockDevice | None:
    """The block device ``path`` (after links) is, or None if it is not one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    name = _kernel_name(view, f"{major}:{minor}")
    return BlockDevice(major, minor, name) if name is not None else None


def _kernel_name(view: HostView, number: str) -> str | None:
    try:
        return os.path.basename(os.readlink(view.sysfs / "dev" / "block" / number))
    except OSError:
        return None


def _number_of(view: HostView, name: str) -> str | None:
    try:
        return (view.sysfs / "class" / "block" / name / "dev").read_text().strip()
    except OSError:
        return None


def partitions(device: BlockDevice, view: HostView = HostView()) -> list[str]:
    """Kernel names of the partitions of ``device`` (``loop0p1``, ``sda2``)."""
    base = view.sysfs / "class" / "block" / device.name
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return []
    return [e for e in entries if e.startswith(device.name) and (base / e / "partition").exists()]


def stacked_on(names: Iterable[str], view: HostView = HostView()) -> list[str]:
    """Kernel names of every device built on any of ``names`` (holders, recursively)."""
    found: list[str] = []
    todo = list(names)
    while todo:
        name = todo.pop()
        try:
            holders = sorted(os.listdir(view.sysfs / "class" / "block" / name / "holders"))
        except OSError:
            continue
        for holder in holders:
            if holder not in found:
                found.append(holder)
                todo.append(holder)
    return found


def _lines(path: Path) -> list[str]:
    """A /proc file's lines; a name that is not UTF-8 (a FUSE mount point, a
    label) stays as it is, escaped, instead of failing every check."""
    try:
        return path.read_bytes().decode("utf-8", "surrogateescape").splitlines()
    except OSError:
        return []


def _mounts(view: HostView) -> dict[str, list[str]]:
    """major:minor -> mount points, from the daemon's mountinfo."""
    mounts: dict[str, list[str]] = {}
    for line in _lines(view.proc / "self" / "mountinfo"):
        fields = line.split()
        if len(fields) > 4:
            mounts.setdefault(fields[2], []).append(_unescape(fields[4]))
    return mounts


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo and swaps escape space, tab, newline and backslash as octal."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def _swaps(view: HostView) -> set[str]:
    """major:minor of every active swap device."""
    numbers: set[str] = set()
    for line in _lines(view.proc / "swaps")[1:]:
        fields = line.split()
        if not fields:
            continue
        with_number = identify_number(_unescape(fields[0]))
        if with_number is not None:
            numbers.add(with_number)
    return numbers


def identify_number(path: str) -> str | None:
    """``major:minor`` of a block device node, None if ``path`` is not one."""
    number = device_number(path)
    return None if number is None else f"{os.major(number)}:{os.minor(number)}"


# The probe holds an exclusive claim for an instant: two of ours at once would
# see each other (two PUTs of one multiattach device), so they take turns, and
# a claim someone else holds for an instant is asked again before it counts.
_PROBE = threading.Lock()
_PROBE_TRIES = 3
_PROBE_PAUSE_SECONDS = 0.02


def _held_exclusively(path: str) -> bool:
    with _PROBE:
        for attempt in range(_PROBE_TRIES):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    return False
                if attempt + 1 < _PROBE_TRIES:
                    time.sleep(_PROBE_PAUSE_SECONDS)
                continue
            os.close(fd)
            return False
    return True


def _same_storage(view: HostView, name: str) -> bool:
    """A stacked device that is the storage itself seen another way: a
    multipath map over a path device, or kpartx's partition mapping."""
    try:
        uuid = (view.sysfs / "class" / "block" / name / "dm" / "uuid").read_text().strip()
    except OSError:
        return False
    return uuid.startswith(("mpath-", "part"))


def _kind(view: HostView, name: str) -> str:
    """What a stacked device is, for a message."""
    try:
        uuid = (view.sysfs / "class" / "block" / name / "dm" / "uuid").read_text().strip()
    except OSError:
        uuid = ""
    for prefix, kind in (("LVM-", "an LVM volume"), ("CRYPT-", "a dm-crypt volume")):
        if uuid.startswith(prefix):
            return kind
    return "an md array" if name.startswith("md") else "a device-mapper device"


def host_uses(
    device: BlockDevice, node: str, view: HostView = HostView(), *, exclusive: bool = True
) -> list[str]:
    """Why the host itself uses ``device`` (``node`` is a path to it), or [].

    ``exclusive``: also probe for an exclusive opener (``O_EXCL``), when nothing
    is stacked on the device (a stacked device holds it that way itself).
    """
    own = [device.name, *partitions(device, view)]
    stacked = stacked_on(own, view)
    family = [*own, *stacked]
    mounts, swaps = _mounts(view), _swaps(view)
    reasons: list[str] = [
        f"/dev/{name} ({_kind(view, name)}) is built on it"
        for name in stacked
        if not _same_storage(view, name)
    ]
    for name in family:
        number = device.number if name == device.name else _number_of(view, name)
        if number is None:
            continue
        what = "it" if name == device.name else f"/dev/{name} on it"
        for point in mounts.get(number, []):
            reasons.append(f"{what} is mounted at {point}")
        if number in swaps:
            reasons.append(f"{what} is active swap")
    if not reasons and not stacked and exclusive and _held_exclusively(node):
        reasons.append(
            "another user holds it exclusively (a filesystem, swap, or an md/dm/LVM member)"
        )
    return reasons


def names_of(device: BlockDevice, node: str, view: HostView = HostView()) -> list[str]:
    """Every name an operator may know ``device`` by: the path given resolved,
    its kernel name, and its ``/dev/disk/by-*`` links."""
    names = [os.path.realpath(node), device.path]
    by = view.dev / "disk"
    try:
        kinds = sorted(os.listdir(by))
    except OSError:
        kinds = []
    for kind in kinds:
        try:
            links = sorted(os.listdir(by / kind))
        except OSError:
            continue
        for link in links:
            full = str(by / kind / link)
            if identify_number(full) == device.number:
                names.append(full)
    return list(dict.fromkeys(names))


def allowed(
    device: BlockDevice, node: str, patterns: Sequence[str], view: HostView = HostView()
) -> bool:
    """Whether any name of ``device`` matches an operator's glob (no list: all allowed)."""
    if not patterns:
        return True
    return any(
        fnmatch.fnmatchcase(name, p) for name in names_of(device, node, view) for p in patterns
    )
