"""The rules build_disk applies: each one, and each request it refuses."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hostagent.libvirt_xml.disk import DiskSpec, DriveAddress, SourceHost
from hostagent.libvirt_xml.policy import (
    BlockSource,
    DiskPolicyError,
    DiskRequest,
    NetworkSource,
    build_disk,
    user_alias,
)

KEYRING_UUID = "1b2f0f0e-5d0c-4c2a-9d2e-7f1f3b9e2a11"
SCSI = DiskRequest(
    attachment_id="att-1",
    serial="vol-1",
    source=BlockSource("/dev/dm-7"),
    multiattach=True,
    mode="rw",
    bus="scsi",
    disk_format="raw",
    target_dev="sdc",
    address=DriveAddress(0, 0, 0, 5),
)
VIRTIO = replace(SCSI, bus="virtio", target_dev="vdc", address=None)
RBD = NetworkSource(
    protocol="rbd",
    name="volumes/volume-1",
    hosts=(SourceHost("10.0.0.1", "6789"), SourceHost("10.0.0.2", "6789")),
    auth_username="cinder",
    secret_type="ceph",
    secret_uuid=KEYRING_UUID,
)


def test_shared_scsi_block_disk() -> None:
    assert build_disk(SCSI) == DiskSpec(
        disk_type="block",
        device="disk",
        driver_name="qemu",
        driver_type="raw",
        driver_cache="none",
        driver_io="native",
        source_dev="/dev/dm-7",
        target_dev="sdc",
        target_bus="scsi",
        shareable=True,
        serial="vol-1",
        alias="ua-att-1",
        address=DriveAddress(0, 0, 0, 5),
    )


def test_multiattach_decides_shareable() -> None:
    assert build_disk(SCSI).shareable is True
    assert build_disk(replace(SCSI, multiattach=False)).shareable is False


@pytest.mark.parametrize("request_", [SCSI, VIRTIO, replace(SCSI, source=RBD)])
def test_cache_is_always_none_and_driver_qemu(request_: DiskRequest) -> None:
    disk = build_disk(request_)
    assert (disk.driver_name, disk.driver_cache) == ("qemu", "none")


def test_native_io_only_for_block_sources() -> None:
    assert build_disk(SCSI).driver_io == "native"
    assert build_disk(replace(SCSI, source=RBD)).driver_io is None


def test_mode_decides_readonly() -> None:
    assert build_disk(replace(SCSI, mode="ro")).readonly is True
    assert build_disk(SCSI).readonly is False


@pytest.mark.parametrize("mode", ["RW", "rwx", "", "readonly"])
def test_unknown_mode_is_refused(mode: str) -> None:
    with pytest.raises(DiskPolicyError, match="mode"):
        build_disk(replace(SCSI, mode=mode))


@pytest.mark.parametrize("disk_format", ["qcow2", "vmdk", "raw "])
def test_shareable_disk_must_be_raw(disk_format: str) -> None:
    with pytest.raises(DiskPolicyError, match="raw") as error:
        build_disk(replace(SCSI, disk_format=disk_format))
    assert "multiattach" in str(error.value)


def test_qcow2_is_allowed_when_not_shared() -> None:
    disk = build_disk(replace(SCSI, multiattach=False, disk_format="qcow2"))
    assert (disk.driver_type, disk.shareable) == ("qcow2", False)


@pytest.mark.parametrize("disk_format", ["vmdk", "qed", "", "RAW"])
def test_other_formats_are_refused(disk_format: str) -> None:
    with pytest.raises(DiskPolicyError, match="format"):
        build_disk(replace(SCSI, multiattach=False, disk_format=disk_format))


def test_virtio_disk_has_no_drive_address() -> None:
    disk = build_disk(VIRTIO)
    assert (disk.target_bus, disk.target_dev, disk.address) == ("virtio", "vdc", None)


def test_scsi_disk_without_address_is_refused() -> None:
    with pytest.raises(DiskPolicyError, match="drive address"):
        build_disk(replace(SCSI, address=None))


def test_virtio_disk_with_address_is_refused() -> None:
    with pytest.raises(DiskPolicyError, match="drive address"):
        build_disk(replace(VIRTIO, address=DriveAddress(0, 0, 0, 1)))


@pytest.mark.parametrize("bus", ["ide", "sata", "usb", "SCSI", ""])
def test_unknown_bus_is_refused(bus: str) -> None:
    with pytest.raises(DiskPolicyError, match="bus"):
        build_disk(replace(SCSI, bus=bus))


@pytest.mark.parametrize(
    ("bus", "target_dev"),
    [
        ("scsi", "vdb"),
        ("scsi", "sd"),
        ("scsi", "sdB"),
        ("scsi", "sdb1"),
        ("scsi", "/dev/sdb"),
        ("scsi", "hda"),
        ("virtio", "sdb"),
        ("virtio", "vd"),
        ("virtio", "vdb "),
    ],
)
def test_target_dev_must_fit_the_bus(bus: str, target_dev: str) -> None:
    request = replace(
        SCSI, bus=bus, target_dev=target_dev, address=SCSI.address if bus == "scsi" else None
    )
    with pytest.raises(DiskPolicyError, match="target_dev"):
        build_disk(request)


@pytest.mark.parametrize(("bus", "target_dev"), [("scsi", "sdaab"), ("virtio", "vdzz")])
def test_long_target_dev_names_are_fine(bus: str, target_dev: str) -> None:
    address = SCSI.address if bus == "scsi" else None
    assert build_disk(replace(SCSI, bus=bus, target_dev=target_dev, address=address))


def test_serial_and_alias() -> None:
    disk = build_disk(replace(SCSI, serial="abc 1.2+3_4-5"))
    assert (disk.serial, disk.alias) == ("abc 1.2+3_4-5", "ua-att-1")


@pytest.mark.parametrize("serial", ["", "a/b", "vol<1>", "naïve"])
def test_serial_outside_libvirt_pattern_is_refused(serial: str) -> None:
    with pytest.raises(DiskPolicyError, match="serial"):
        build_disk(replace(SCSI, serial=serial))


def test_user_alias() -> None:
    assert user_alias("0f3c2b1a-1111-2222-3333-444455556666") == (
        "ua-0f3c2b1a-1111-2222-3333-444455556666"
    )
    assert user_alias("A_b-9") == "ua-A_b-9"


@pytest.mark.parametrize("attachment_id", ["", "has.dot", "sp ace", "a/b", "ü"])
def test_alias_libvirt_would_drop_is_refused(attachment_id: str) -> None:
    """libvirt silently drops a ua- alias with other characters (seen with 'ua-has.dot')."""
    with pytest.raises(DiskPolicyError, match="attachment_id"):
        user_alias(attachment_id)
    with pytest.raises(DiskPolicyError, match="attachment_id"):
        build_disk(replace(SCSI, attachment_id=attachment_id))


def test_network_source_with_auth() -> None:
    disk = build_disk(replace(SCSI, source=RBD))
    assert disk.disk_type == "network"
    assert (disk.source_protocol, disk.source_name) == ("rbd", "volumes/volume-1")
    assert disk.source_hosts == RBD.hosts
    assert (disk.auth_username, disk.auth_secret_type, disk.auth_secret_uuid) == (
        "cinder",
        "ceph",
        KEYRING_UUID,
    )
    assert disk.source_dev is None


def test_network_source_without_auth() -> None:
    source = NetworkSource("rbd", "volumes/volume-1", ())
    disk = build_disk(replace(SCSI, source=source))
    assert (disk.auth_username, disk.auth_secret_type, disk.auth_secret_uuid) == (None,) * 3
    assert "<auth" not in disk.to_xml()


@pytest.mark.parametrize(
    ("username", "secret_type", "secret_uuid"),
    [("cinder", None, None), ("cinder", "ceph", None), (None, None, KEYRING_UUID)],
)
def test_partial_auth_is_refused(
    username: str | None, secret_type: str | None, secret_uuid: str | None
) -> None:
    source = NetworkSource("rbd", "volumes/volume-1", (), username, secret_type, secret_uuid)
    with pytest.raises(DiskPolicyError, match="auth"):
        build_disk(replace(SCSI, source=source))


def test_block_source() -> None:
    disk = build_disk(SCSI)
    assert (disk.disk_type, disk.source_dev) == ("block", "/dev/dm-7")
    assert (disk.source_protocol, disk.source_name, disk.source_hosts) == (None, None, ())


def test_policy_error_is_a_value_error() -> None:
    assert issubclass(DiskPolicyError, ValueError)
