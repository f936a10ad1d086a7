"""Pick a guest device name and a SCSI drive address from what a domain already uses.

We give scsi disks explicit addresses on one virtio-scsi controller: libvirt's
default address for sdh and beyond lands on a new SCSI controller and hotplug
fails around the 15th disk, while explicit units on one controller hold 20+.
"""

from __future__ import annotations

from collections.abc import Collection
from itertools import count
from typing import Final

from hostagent.libvirt_xml.disk import DriveAddress
from hostagent.libvirt_xml.policy import BUS_TARGET_PREFIX, DiskPolicyError

__all__ = [
    "MAX_SCSI_UNIT",
    "first_free_drive_address",
    "first_free_target_dev",
    "target_dev_name",
]

# virtio-scsi addresses LUNs 0..16383 on each target.
MAX_SCSI_UNIT: Final = 16383
_LETTERS: Final = 26


def target_dev_name(prefix: str, index: int) -> str:
    """``prefix`` plus the index in libvirt's naming: 0 -> a, 25 -> z, 26 -> aa, 702 -> aaa."""
    if index < 0:
        raise ValueError(f"device index must be >= 0, not {index}")
    letters = ""
    while index >= 0:
        letters = chr(ord("a") + index % _LETTERS) + letters
        index = index // _LETTERS - 1
    return prefix + letters


def first_free_target_dev(bus: str, used: Collection[str]) -> str:
    """The first ``sd*`` (scsi) or ``vd*`` (virtio) name not in ``used``."""
    prefix = BUS_TARGET_PREFIX.get(bus)
    if prefix is None:
        raise DiskPolicyError(f"bus must be one of {', '.join(BUS_TARGET_PREFIX)}, not {bus!r}")
    taken = set(used)
    return next(
        name for name in (target_dev_name(prefix, i) for i in count()) if name not in taken
    )


def first_free_drive_address(controller: int, used: Collection[DriveAddress]) -> DriveAddress:
    """Bus 0, target 0 and the lowest unit on ``controller`` that ``used`` does not hold."""
    taken = {a.unit for a in used if (a.controller, a.bus, a.target) == (controller, 0, 0)}
    for unit in range(MAX_SCSI_UNIT + 1):
        if unit not in taken:
            return DriveAddress(controller=controller, bus=0, target=0, unit=unit)
    raise DiskPolicyError(
        f"SCSI controller {controller} has no free unit (all {MAX_SCSI_UNIT + 1} in use)"
    )
