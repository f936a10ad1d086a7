"""Choosing guest device names and SCSI drive addresses."""

from __future__ import annotations

import pytest

from hostagent.libvirt_xml.disk import DriveAddress
from hostagent.libvirt_xml.placement import (
    MAX_SCSI_UNIT,
    first_free_drive_address,
    first_free_target_dev,
    target_dev_name,
)
from hostagent.libvirt_xml.policy import DiskPolicyError


@pytest.mark.parametrize(
    ("index", "name"),
    [
        (0, "sda"),
        (1, "sdb"),
        (25, "sdz"),
        (26, "sdaa"),
        (27, "sdab"),
        (51, "sdaz"),
        (52, "sdba"),
        (701, "sdzz"),
        (702, "sdaaa"),
        (18277, "sdzzz"),
    ],
)
def test_target_dev_name_follows_libvirt(index: int, name: str) -> None:
    assert target_dev_name("sd", index) == name


def test_target_dev_names_are_distinct_and_ordered_like_libvirt() -> None:
    names = [target_dev_name("vd", i) for i in range(1000)]
    assert len(set(names)) == 1000
    assert names[:3] == ["vda", "vdb", "vdc"]
    assert sorted(names, key=lambda n: (len(n), n)) == names


def test_negative_index_is_refused() -> None:
    with pytest.raises(ValueError, match="index"):
        target_dev_name("sd", -1)


def test_first_free_target_dev() -> None:
    assert first_free_target_dev("scsi", []) == "sda"
    assert first_free_target_dev("scsi", {"sda", "sdb", "sdd", "vdc"}) == "sdc"
    assert first_free_target_dev("virtio", ["vda", "sdb"]) == "vdb"


def test_first_free_target_dev_past_z() -> None:
    used = [target_dev_name("sd", i) for i in range(26)]
    assert first_free_target_dev("scsi", used) == "sdaa"


def test_first_free_target_dev_unknown_bus() -> None:
    with pytest.raises(DiskPolicyError, match="bus"):
        first_free_target_dev("ide", [])


def test_first_free_drive_address_empty_controller() -> None:
    assert first_free_drive_address(0, []) == DriveAddress(0, 0, 0, 0)
    assert first_free_drive_address(2, []) == DriveAddress(2, 0, 0, 0)


def test_first_free_drive_address_skips_used_units_on_the_same_controller() -> None:
    used = [DriveAddress(0, 0, 0, 0), DriveAddress(0, 0, 0, 1), DriveAddress(0, 0, 0, 3)]
    assert first_free_drive_address(0, used) == DriveAddress(0, 0, 0, 2)


def test_first_free_drive_address_ignores_other_controllers_and_targets() -> None:
    used = [
        DriveAddress(1, 0, 0, 0),
        DriveAddress(1, 0, 0, 1),
        DriveAddress(0, 0, 1, 0),  # another target on controller 0: a different LUN 0
        DriveAddress(0, 1, 0, 0),  # another bus on controller 0
    ]
    assert first_free_drive_address(0, used) == DriveAddress(0, 0, 0, 0)
    assert first_free_drive_address(1, used) == DriveAddress(1, 0, 0, 2)


def test_full_controller_is_an_error() -> None:
    used = [DriveAddress(0, 0, 0, unit) for unit in range(MAX_SCSI_UNIT + 1)]
    with pytest.raises(DiskPolicyError, match="no free unit"):
        first_free_drive_address(0, used)
    assert first_free_drive_address(1, used) == DriveAddress(1, 0, 0, 0)


def test_last_unit_is_usable() -> None:
    used = [DriveAddress(0, 0, 0, unit) for unit in range(MAX_SCSI_UNIT)]
    assert first_free_drive_address(0, used) == DriveAddress(0, 0, 0, MAX_SCSI_UNIT)


def test_twenty_disks_in_a_row_get_distinct_addresses_and_names() -> None:
    """The reason for explicit addresses: 20+ disks stay on one controller."""
    addresses: list[DriveAddress] = [DriveAddress(0, 0, 0, 0)]  # e.g. a boot disk
    names: list[str] = ["sda"]
    for _ in range(20):
        addresses.append(first_free_drive_address(0, addresses))
        names.append(first_free_target_dev("scsi", names))
    assert len(set(addresses)) == 21
    assert {a.controller for a in addresses} == {0}
    assert [a.unit for a in addresses] == list(range(21))
    assert names[-1] == "sdu"
    assert len(set(names)) == 21
