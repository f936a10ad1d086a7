"""connectors/: canonical keys and the refusal of anything that is not a /dev block device."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.connectors import (
    CONNECTOR_CLASSES,
    BlockDiskSource,
    ConnectorRegistry,
    ConnectorSettings,
    HostDevice,
    InvalidTarget,
    Target,
    disk_source,
)
from hostagent.connectors.iscsi import ISCSIConnector
from hostagent.connectors.local import LocalConnector
from hostagent.connectors.rbd import RBDConnector
from tests.unit.test_connectors_rbd import KEY, RecordingSecretKeeper, cinder_data


@pytest.fixture
def dev_link() -> Iterator[Path]:
    """A path under /dev for a symlink the test points somewhere."""
    link = Path(f"/dev/hatest-unit-{os.getpid()}")
    link.unlink(missing_ok=True)
    yield link
    link.unlink(missing_ok=True)


def test_registry_holds_real_classes_and_names_unknown_protocols() -> None:
    assert {
        "local": LocalConnector,
        "iscsi": ISCSIConnector,
        "rbd": RBDConnector,
    } == CONNECTOR_CLASSES
    registry = ConnectorRegistry.default()
    assert isinstance(registry.get("local"), LocalConnector)
    with pytest.raises(
        InvalidTarget,
        match=r"unknown driver_volume_type 'nfs'; this host serves iscsi, local, rbd",
    ):
        registry.get("nfs")


def test_the_default_registry_configures_every_class_it_lists() -> None:
    keeper = RecordingSecretKeeper()
    registry = ConnectorRegistry.default(
        ConnectorSettings(iscsi_use_multipath=True, rbd_attach_mode="librbd"), secrets=keeper
    )
    assert registry.names() == sorted(CONNECTOR_CLASSES)
    for name, kind in CONNECTOR_CLASSES.items():
        assert type(registry.get(name)) is kind
    iscsi, rbd = registry.get("iscsi"), registry.get("rbd")
    assert isinstance(iscsi, ISCSIConnector) and iscsi.use_multipath is True
    assert isinstance(rbd, RBDConnector) and rbd.attach_mode == "librbd"
    target = rbd.parse_target(cinder_data(key=KEY))
    rbd.connect(target)
    assert [call for call, _ in keeper.calls] == ["define"], "rbd keeps its secret there"


def test_a_protocol_no_longer_served_names_its_host_device_if_it_has_one() -> None:
    gone = Target("nfs", "nfs:server:/export", {"export": "server:/export"})
    assert disk_source(gone, HostDevice("/dev/sdc", {})) == BlockDiskSource("/dev/sdc")
    assert disk_source(gone, HostDevice(None, {})) is None


def test_local_key_is_canonical(loop_device: str, dev_link: Path) -> None:
    connector = LocalConnector()
    direct = connector.parse_target({"device_path": loop_device})
    assert direct.connection_key == f"local:{loop_device}"
    assert direct.properties == {"device_path": loop_device}
    assert direct.disk_format == "raw"

    dev_link.symlink_to(loop_device)
    via_link = connector.parse_target({"device_path": str(dev_link)})
    assert via_link.connection_key == direct.connection_key
    dotted = connector.parse_target({"device_path": "/dev/../dev/" + loop_device[5:]})
    assert dotted.connection_key == direct.connection_key


@pytest.mark.parametrize(
    ("device_path", "message"),
    [
        ("/etc/passwd", "outside /dev"),
        ("/dev/../etc/passwd", "outside /dev"),
        ("dev/loop0", "absolute"),
        ("", "non-empty"),
        (None, "non-empty"),
        (12, "non-empty"),
        ("/dev/hatest-does-not-exist", "No such file"),
        ("/dev/null", "not a block device"),
        ("/dev/loop0\x00x", "absolute"),
    ],
)
def test_local_refuses_anything_but_a_block_device_under_dev(
    device_path: object, message: str
) -> None:
    with pytest.raises(InvalidTarget, match=message):
        LocalConnector().parse_target({"device_path": device_path})


def test_local_refuses_symlink_out_of_dev(dev_link: Path, tmp_path: Path) -> None:
    target = tmp_path / "disk.img"
    target.write_bytes(b"\0" * 512)
    dev_link.symlink_to(target)
    with pytest.raises(InvalidTarget, match="outside /dev"):
        LocalConnector().parse_target({"device_path": str(dev_link)})


def test_local_connect_and_disconnect_through_os_brick(loop_device: str) -> None:
    connector = LocalConnector()
    target = connector.parse_target({"device_path": loop_device, "format": "qcow2"})
    assert target.disk_format == "qcow2"
    device = connector.connect(target)
    assert device.path == loop_device
    assert device.device_info == {"type": "local", "path": loop_device}
    assert connector.disk_source(target, device) == BlockDiskSource(loop_device)
    assert connector.offline_disk_source(target) == BlockDiskSource(loop_device)
    connector.disconnect(target, device)


def test_local_extend_reads_the_device_size_the_kernel_has_now(
    loop_device: str, tmp_path: Path
) -> None:
    connector = LocalConnector()
    target = connector.parse_target({"device_path": loop_device})
    device = connector.connect(target)
    assert connector.extend(target, device, None) == 1024 * 1024
    os.truncate(tmp_path / "backing.img", 3 * 1024 * 1024)
    assert connector.extend(target, device, None) == 1024 * 1024, "not told yet"
    subprocess.run(["losetup", "-c", loop_device], check=True)
    assert connector.extend(target, device, 4096) == 3 * 1024 * 1024
