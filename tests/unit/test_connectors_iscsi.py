"""connectors/iscsi.py: canonical keys, validation, what reaches os-brick.

os-brick's ISCSIConnector needs an iSCSI-capable kernel, which this machine
lacks, so these tests put a recording fake at that boundary; the real path
runs in the storage lab VM (tests/lab).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from oslo_concurrency import lockutils

from hostagent.connectors import BlockDiskSource, ConnectorError, InvalidTarget
from hostagent.connectors.base import HostDevice
from hostagent.connectors.iscsi import ISCSIConnector, ISCSIPath, canonical_portal, target_paths

IQN = "iqn.2010-10.org.openstack:volume-1"
PASSWORD = "Sup3r-Secret-CHAP"


class RecordingBrickISCSI:
    """Stands in for os_brick's ISCSIConnector and records every call."""

    def __init__(self, fail_with: Exception | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        self.fail_with = fail_with

    def connect_volume(self, properties: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("connect", properties, {}))
        if self.fail_with:
            raise self.fail_with
        return {
            "type": "block",
            "path": "/dev/disk/by-path/ip-x-iscsi-y-lun-1",
            "scsi_wwn": "360014051",
        }

    def disconnect_volume(
        self, properties: dict[str, Any], device_info: dict[str, Any], force: bool = False
    ) -> None:
        self.calls.append(("disconnect", properties, {**device_info, "force": force}))
        if self.fail_with:
            raise self.fail_with


class RecordingBrickISCSIExtend(RecordingBrickISCSI):
    """Also records os-brick's ``extend_volume`` (the rescan of every path and
    the multipath map resize), answering ``reports`` as it would."""

    def __init__(self, reports: int | None, fail_with: Exception | None = None) -> None:
        super().__init__(fail_with)
        self.reports = reports

    def extend_volume(self, properties: dict[str, Any]) -> int | None:
        self.calls.append(("extend", properties, {}))
        if self.fail_with:
            raise self.fail_with
        return self.reports


def single(**extra: Any) -> dict[str, Any]:
    return {"target_portal": "192.0.2.5:3260", "target_iqn": IQN, "target_lun": 1, **extra}


def test_portals_are_canonical() -> None:
    assert canonical_portal("192.0.2.5") == "192.0.2.5:3260"
    assert canonical_portal("Storage.Example:3261") == "storage.example:3261"
    assert canonical_portal("[2001:DB8::0:5]:3260") == "[2001:db8::5]:3260"
    assert canonical_portal("[2001:db8::5]") == "[2001:db8::5]:3260"
    for bad in ("", "a b:3260", "192.0.2.5:0", "192.0.2.5:70000", "[not-v6]:3260", 5):
        with pytest.raises(InvalidTarget):
            canonical_portal(bad)


def test_the_same_lun_gives_the_same_key_however_it_is_written() -> None:
    connector = ISCSIConnector(use_multipath=True, brick=RecordingBrickISCSI())
    plural = {
        "target_portals": ["192.0.2.6:3260", "192.0.2.5"],
        "target_iqns": [IQN, IQN],
        "target_luns": [1, 1],
    }
    reordered = {
        "target_portals": ["192.0.2.5:3260", "192.0.2.6"],
        "target_iqns": [IQN, IQN],
        "target_luns": [1, 1],
    }
    assert (
        connector.parse_target(plural).connection_key
        == connector.parse_target(reordered).connection_key
    )
    one = {"target_portals": ["192.0.2.5"], "target_iqns": [IQN], "target_luns": [1]}
    assert (
        connector.parse_target(one).connection_key
        == connector.parse_target(single()).connection_key
        == f"iscsi:192.0.2.5:3260/{IQN}/1"
    )
    assert connector.parse_target(single(target_lun=2)).connection_key.endswith("/2")

    # Without multipath, a connection_info with both forms is its single path.
    no_multipath = ISCSIConnector(brick=RecordingBrickISCSI())
    both = {**single(), **plural}
    assert no_multipath.parse_target(both).connection_key == f"iscsi:192.0.2.5:3260/{IQN}/1"
    assert connector.parse_target(both).connection_key.count("/") == 4


def test_a_target_names_the_paths_that_made_its_key_whatever_multipath_says_now() -> None:
    both = {
        **single(),
        "target_portals": ["192.0.2.6", "192.0.2.5:3260"],
        "target_iqns": [IQN, IQN],
        "target_luns": [1, 1],
    }
    five, six = ISCSIPath("192.0.2.5:3260", IQN, 1), ISCSIPath("192.0.2.6:3260", IQN, 1)
    made_single = ISCSIConnector(brick=RecordingBrickISCSI()).parse_target(both)
    made_multi = ISCSIConnector(use_multipath=True, brick=RecordingBrickISCSI()).parse_target(both)
    assert target_paths(made_single) == (five,)
    assert target_paths(made_multi) == (five, six)
    assert five.by_path_link() == f"/dev/disk/by-path/ip-192.0.2.5:3260-iscsi-{IQN}-lun-1"
    # A key its properties cannot have made (a record edited by hand) names no path.
    edited = ISCSIConnector(brick=RecordingBrickISCSI()).parse_target(single(target_lun=4))
    assert target_paths(replace(edited, connection_key=made_single.connection_key)) == ()


def test_disk_sources_the_device_online_and_the_by_path_link_of_one_path_offline() -> None:
    connector = ISCSIConnector(brick=RecordingBrickISCSI())
    target = connector.parse_target(single())
    device = connector.connect(target)
    assert connector.disk_source(target, device) == BlockDiskSource(str(device.path))
    assert connector.disk_source(target, HostDevice(None, {})) is None, "not connected yet"
    assert connector.offline_disk_source(target) == BlockDiskSource(
        f"/dev/disk/by-path/ip-192.0.2.5:3260-iscsi-{IQN}-lun-1"
    )
    recorded = connector.parse_target(single(device_path="/dev/sdq"))  # as nova records it
    assert connector.offline_disk_source(recorded) == BlockDiskSource("/dev/sdq")
    multipath = ISCSIConnector(use_multipath=True, brick=RecordingBrickISCSI()).parse_target(
        {
            "target_portals": ["192.0.2.5", "192.0.2.6"],
            "target_iqns": [IQN] * 2,
            "target_luns": [1] * 2,
        }
    )
    with pytest.raises(InvalidTarget, match="multipath devices are named when they appear"):
        connector.offline_disk_source(multipath)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "lacks target_portal, target_iqn, target_lun"),
        (single(target_iqn="volume-1"), "not an iSCSI qualified name"),
        (single(target_lun=-1), "LUN -1"),
        (single(target_lun=True), "LUN True"),
        (single(target_lun="1"), "LUN '1'"),
        (
            {"target_portals": ["192.0.2.5"], "target_iqns": [IQN], "target_luns": [1, 2]},
            "differ in length",
        ),
        ({"target_portals": [], "target_iqns": [], "target_luns": []}, "non-empty lists"),
        (single(auth_method="kerberos"), "only CHAP"),
        (single(auth_method="CHAP", auth_username="u"), "auth_password"),
        (single(format=3), "format"),
    ],
)
def test_bad_targets_are_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidTarget, match=message):
        ISCSIConnector(brick=RecordingBrickISCSI()).parse_target(data)


def test_chap_reaches_os_brick_but_no_error_message() -> None:
    chap = single(auth_method="CHAP", auth_username="user", auth_password=PASSWORD)
    brick = RecordingBrickISCSI()
    connector = ISCSIConnector(brick=brick)
    target = connector.parse_target(chap)
    assert PASSWORD not in repr(target), "Target's repr hides the properties"
    device = connector.connect(target)
    assert device == HostDevice(
        path="/dev/disk/by-path/ip-x-iscsi-y-lun-1",
        device_info={
            "type": "block",
            "path": "/dev/disk/by-path/ip-x-iscsi-y-lun-1",
            "scsi_wwn": "360014051",
        },
    )
    connector.disconnect(target, device)
    (_, connected_with, _), (_, disconnected_with, info) = brick.calls
    assert connected_with["auth_password"] == PASSWORD == disconnected_with["auth_password"]
    assert info["scsi_wwn"] == "360014051", "disconnect gets back what connect returned"
    assert info["force"] is False, "a failed flush must fail the detach, never lose data"

    failing = ISCSIConnector(
        brick=RecordingBrickISCSI(RuntimeError(f"iscsiadm -v {PASSWORD} exited 24"))
    )
    with pytest.raises(ConnectorError) as login:
        failing.connect(failing.parse_target(chap))
    with pytest.raises(ConnectorError) as logout:
        failing.disconnect(failing.parse_target(chap), device)
    for error in (login.value, logout.value):
        assert PASSWORD not in str(error) and "***" in str(error)


def test_shared_targets_take_os_bricks_lock(tmp_path: Path) -> None:
    lockutils.set_defaults(lock_path=str(tmp_path))
    connector = ISCSIConnector(brick=RecordingBrickISCSI())
    # Cinder's tri-state: None means always lock (keyed by the backend's service uuid).
    always = connector.parse_target(single(shared_targets=None, service_uuid="svc-1"))
    with connector.guard(always):
        assert (tmp_path / "os-brick-svc-1").exists()
    never = connector.parse_target(single(shared_targets=False, service_uuid="svc-2"))
    with connector.guard(never):
        pass
    plain = connector.parse_target(single())
    with connector.guard(plain):
        pass
    assert not (tmp_path / "os-brick-svc-2").exists()


def test_extend_is_os_bricks_extend_volume_on_the_connection_properties() -> None:
    brick = RecordingBrickISCSIExtend(reports=2 << 30)
    connector = ISCSIConnector(use_multipath=True, brick=brick)
    target = connector.parse_target(
        single(auth_method="CHAP", auth_username="u", auth_password=PASSWORD)
    )
    device = HostDevice(path="/dev/mapper/36001405", device_info={"multipath_id": "36001405"})
    assert connector.extend(target, device, None) == 2 << 30
    assert brick.calls == [("extend", dict(target.properties), {})]


def test_extend_reads_the_device_when_os_brick_reports_no_size(loop_device: str) -> None:
    connector = ISCSIConnector(brick=RecordingBrickISCSIExtend(reports=None))
    target = connector.parse_target(single())
    assert connector.extend(target, HostDevice(loop_device, {}), None) == 1024 * 1024


def test_a_failed_rescan_is_a_connector_error_without_the_chap_secret() -> None:
    brick = RecordingBrickISCSIExtend(None, RuntimeError(f"rescan with {PASSWORD} failed"))
    connector = ISCSIConnector(brick=brick)
    target = connector.parse_target(
        single(auth_method="CHAP", auth_username="u", auth_password=PASSWORD)
    )
    with pytest.raises(ConnectorError, match="iSCSI rescan of iscsi:") as failed:
        connector.extend(target, HostDevice("/dev/sdb", {}), None)
    assert PASSWORD not in str(failed.value)
