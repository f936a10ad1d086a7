"""attachments/qos.py: Cinder's qos_specs as a disk's <iotune>, and the rules
around it (policy.py, the attach's 400, the attachment body)."""

from __future__ import annotations

import logging

import pytest

from hostagent.attachments.qos import MAPPED_KEYS, iotune_from_qos_specs
from hostagent.errors import InvalidRequest
from hostagent.libvirt_xml.disk import IoTune
from hostagent.libvirt_xml.policy import BlockSource, DiskPolicyError, DiskRequest, build_disk
from tests.unit.conftest import Core


def test_cinder_keys_map_to_their_iotune_elements_strings_included() -> None:
    iotune = iotune_from_qos_specs(
        {"consumer": "front-end", "total_bytes_sec": "1048576", "read_iops_sec": 300}
    )
    assert iotune == IoTune(total_bytes_sec=1048576, read_iops_sec=300)
    assert iotune.limits() == {"total_bytes_sec": 1048576, "read_iops_sec": 300}


def test_every_cinder_form_is_mapped() -> None:
    for kind in ("bytes", "iops"):
        for who in ("total", "read", "write"):
            for suffix in ("", "_max", "_max_length"):
                assert f"{who}_{kind}_sec{suffix}" in MAPPED_KEYS
    assert "size_iops_sec" in MAPPED_KEYS
    assert len(MAPPED_KEYS) == 19


def test_a_back_end_qos_applies_nothing() -> None:
    assert iotune_from_qos_specs({"consumer": "back-end", "total_bytes_sec": "1"}) is None
    assert iotune_from_qos_specs(None) is None
    assert iotune_from_qos_specs({"consumer": "both"}) is None


def test_unmapped_keys_are_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="hostagent.attachments.qos"):
        iotune = iotune_from_qos_specs(
            {"total_iops_sec_per_gb": "abc", "vendor:tier": "gold", "write_iops_sec": "7"}
        )
    assert iotune == IoTune(write_iops_sec=7)
    assert "total_iops_sec_per_gb, vendor:tier" in caplog.text


@pytest.mark.parametrize("value", ["-1", -1, 1.5, "1e3", True, None, "", "x", 2**63, [1]])
def test_a_mapped_key_needs_a_non_negative_integer(value: object) -> None:
    with pytest.raises(DiskPolicyError, match=r"qos_specs\.read_bytes_sec"):
        iotune_from_qos_specs({"read_bytes_sec": value})


def test_zero_is_a_limit_value_like_any_other() -> None:
    assert iotune_from_qos_specs({"total_iops_sec": "0"}) == IoTune(total_iops_sec=0)


def test_qos_specs_must_be_an_object() -> None:
    with pytest.raises(DiskPolicyError, match="must be an object"):
        iotune_from_qos_specs(["total_bytes_sec"])


def request(**extra: object) -> DiskRequest:
    fields: dict[str, object] = {
        "attachment_id": "a1",
        "serial": "s1",
        "source": BlockSource("/dev/sdb"),
        "multiattach": False,
        "mode": "rw",
        "bus": "virtio",
        "disk_format": "raw",
        "target_dev": "vdb",
        "address": None,
    }
    return DiskRequest(**(fields | extra))  # type: ignore[arg-type]


def test_a_total_limit_and_a_read_or_write_one_together_are_refused() -> None:
    for split in ("read_bytes_sec", "write_bytes_sec_max", "read_iops_sec_max_length"):
        total = split.replace("read", "total").replace("write", "total")
        with pytest.raises(DiskPolicyError, match=f"{total} cannot be combined"):
            build_disk(request(iotune=IoTune(**{total: 1, split: 2})))


def test_no_limits_and_no_discard_write_nothing() -> None:
    disk = build_disk(request(iotune=IoTune()))
    assert disk.iotune is None and disk.driver_discard is None
    assert build_disk(request(discard=True)).driver_discard == "unmap"


def test_the_attachment_body_reports_the_limits_of_its_disk(core: Core) -> None:
    first, second = core.guests.define("g1"), core.guests.define("g2")
    qos = {"consumer": "front-end", "total_iops_sec": "500", "vendor:x": "y"}
    data = {"device_path": core.device, "qos_specs": qos}
    info = {"driver_volume_type": "local", "data": data}
    limited, _ = core.service.attach(
        "a1", core.request(first, multiattach=True, connection_info=info)
    )
    free, _ = core.service.attach("a2", core.request(second, multiattach=True))
    assert limited.iotune == {"total_iops_sec": 500}
    assert "<total_iops_sec>500</total_iops_sec>" in (limited.disk_xml or "")
    assert free.iotune == {}


def test_a_bad_limit_is_400_before_anything_is_touched(core: Core) -> None:
    guest = core.guests.define("g1")
    data = {"device_path": core.device, "qos_specs": {"total_iops_sec": "-3"}}
    info = {"driver_volume_type": "local", "data": data}
    with pytest.raises(InvalidRequest, match="total_iops_sec"):
        core.service.attach("a1", core.request(guest, connection_info=info))
    assert core.connector.connects == [] and core.guests.calls == []
    assert core.store.list_attachments() == []


def test_discard_follows_connection_info_and_disk_discard(core: Core) -> None:
    guest = core.guests.define("g1")
    info = {"driver_volume_type": "local", "data": {"device_path": core.device, "discard": True}}
    told, _ = core.service.attach("a1", core.request(guest, connection_info=info))
    assert 'discard="unmap"' in (told.disk_xml or "")
    core.service.disks.disk_discard = "ignore"
    core.service.detach("a1")
    ignored, _ = core.service.attach("a2", core.request(guest, connection_info=info))
    assert "discard=" not in (ignored.disk_xml or "")
