"""Whether the host itself uses a block device, so it is never handed to a guest.

A guest given the host's root disk, a mounted partition or a swap device
read-write (with ``<shareable/>``, so no QEMU lock stops it) corrupts the
host. Before anything is connected or recorded, a local device is refused
when it, a partition of it, or anything stacked on either (sysfs
``holders/``: dm, LVM, md, multipath) is mounted or is active swap, or when
another opener holds it exclusively (``O_EXCL`` fails with ``EBUSY``: a
mounted filesystem, swap, an md/dm member; QEMU does not open that way, so
guests sharing the device do not trip it).

A device is known by its device number: every node, link or bind mount of
it is the same ``BlockDevice``, named by the kernel (``/dev/<kernel name>``).
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


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


def _mounts(view: HostView) -> dict[str, list[str]]:
    """major:minor -> mount points, from the daemon's mountinfo."""
    mounts: dict[str, list[str]] = {}
    try:
        lines = (view.proc / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return mounts
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            mounts.setdefault(fields[2], []).append(_unescape(fields[4]))
    return mounts


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def _swaps(view: HostView) -> set[str]:
    """major:minor of every active swap device."""
    numbers: set[str] = set()
    try:
        lines = (view.proc / "swaps").read_text().splitlines()[1:]
    except OSError:
        return numbers
    for line in lines:
        fields = line.split()
        if not fields:
            continue
        with_number = identify_number(_unescape(fields[0]))
        if with_number is not None:
            numbers.add(with_number)
    return numbers


def identify_number(path: str) -> str | None:
    """``major:minor`` of a block device node, None if ``path`` is not one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _held_exclusively(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno == errno.EBUSY
    os.close(fd)
    return False


def host_uses(
    device: BlockDevice, node: str, view: HostView = HostView(), *, exclusive: bool = True
) -> list[str]:
    """Why the host itself uses ``device`` (``node`` is a path to it), or []."""
    own = [device.name, *partitions(device, view)]
    family = [*own, *stacked_on(own, view)]
    mounts, swaps = _mounts(view), _swaps(view)
    reasons: list[str] = []
    for name in family:
        number = device.number if name == device.name else _number_of(view, name)
        if number is None:
            continue
        what = "it" if name == device.name else f"/dev/{name} on it"
        for point in mounts.get(number, []):
            reasons.append(f"{what} is mounted at {point}")
        if number in swaps:
            reasons.append(f"{what} is active swap")
    if not reasons and exclusive and _held_exclusively(node):
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
