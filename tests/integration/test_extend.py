"""Online extend on real parts: a loop device shared by three running guests.

The host step is counted at the connector boundary: the real LocalConnector,
subclassed only to record each extend it is asked for. What the guests see is
read from QEMU itself (QMP ``query-block``), not from libvirt's records.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from hostagent.api.models import AttachRequest
from hostagent.attachments.extend import VolumeExtender
from hostagent.attachments.service import AttachmentService
from hostagent.client import ApiError
from hostagent.connectors import HostDevice, Target
from hostagent.connectors.local import LocalConnector
from hostagent.errors import DeviceNotExtended, InvalidRequest
from hostagent.guests.domains import Guests as HostGuests
from tests.integration.support import (
    Daemon,
    Guest,
    Guests,
    LoopDevices,
    local_request,
    run,
    service_with,
    unique,
)
from tests.integration.test_cli import ctl
from tests.integration.test_operator import scrape

MIB = 1024 * 1024


class RecordingLocalConnector(LocalConnector):
    """The real ``local`` connector, recording every extend asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.extends: list[str] = []

    def extend(self, target: Target, device: HostDevice, new_size: int | None) -> int:
        self.extends.append(target.connection_key)
        return super().extend(target, device, new_size)


def qemu_size(guest: Guest, alias: str) -> int:
    """The disk's size as QEMU has it (``query-block``'s virtual-size)."""
    for entry in guest.qmp("query-block"):
        inserted = entry.get("inserted")
        if inserted and alias in (entry.get("qdev") or entry.get("device") or ""):
            return int(inserted["image"]["virtual-size"])
    raise AssertionError(f"{guest.name}: QEMU has no block device {alias}")


def grow(loops: LoopDevices, device: str, size: int) -> None:
    """The storage grew: a bigger backing file, the loop device told (losetup -c)."""
    os.truncate(loops.backing[device], size)
    run("losetup", "-c", device)


def extender_for(service: AttachmentService) -> VolumeExtender:
    return VolumeExtender(
        store=service.store,
        guests=service.guests,
        registry=service.registry,
        locks=service.locks,
        connections=service.connections,
    )


def attach_shared(
    service: AttachmentService, device: str, trio: list[Guest], volume: str
) -> list[str]:
    ids = []
    for guest in trio:
        attachment_id = unique("att")
        body = local_request(device, guest, volume_id=volume, multiattach=True, bus="virtio")
        service.attach(attachment_id, AttachRequest.model_validate(body))
        ids.append(attachment_id)
    return ids


def test_one_extend_resizes_every_guest_and_refreshes_the_host_once(
    tmp_path: Path, host_guests: HostGuests, guests: Guests, loops: LoopDevices
) -> None:
    connector = RecordingLocalConnector()
    service = service_with(connector, tmp_path, host_guests)
    extender = extender_for(service)
    device = loops.make(16)
    trio = [guests.make() for _ in range(3)]
    ids = attach_shared(service, device, trio, unique("vol"))
    for attachment_id, guest in zip(ids, trio, strict=True):
        assert qemu_size(guest, f"ua-{attachment_id}") == 16 * MIB

    grow(loops, device, 32 * MIB)
    result = extender.extend(ids[1], None)

    assert connector.extends == [f"local:{device}"], "one host refresh for the connection"
    assert result.connection_key == f"local:{device}"
    assert result.device_size == 32 * MIB
    assert sorted(g.attachment_id for g in result.guests) == sorted(ids)
    assert all(g.resized and g.size == 32 * MIB for g in result.guests)
    for attachment_id, guest in zip(ids, trio, strict=True):
        assert qemu_size(guest, f"ua-{attachment_id}") == 32 * MIB

    again = extender.extend(ids[0], 32 * MIB)
    assert [g.resized for g in again.guests] == [False, False, False]
    assert {g.size for g in again.guests} == {32 * MIB}

    with pytest.raises(DeviceNotExtended):
        extender.extend(ids[2], 48 * MIB)
    with pytest.raises(InvalidRequest, match="shrink"):
        extender.extend(ids[2], 24 * MIB)
    for attachment_id, guest in zip(ids, trio, strict=True):
        assert qemu_size(guest, f"ua-{attachment_id}") == 32 * MIB, "no guest changed"
    service.store.close()


def test_extend_through_the_api_and_hostagentctl(
    daemon: Daemon, guests: Guests, loops: LoopDevices
) -> None:
    device = loops.make(16)
    pair = [guests.make(), guests.make(persistent=True)]
    volume = unique("vol")
    ids = [unique("att") for _ in pair]
    client = daemon.client
    for attachment_id, guest in zip(ids, pair, strict=True):
        client.attach(
            attachment_id, local_request(device, guest, volume_id=volume, multiattach=True)
        )

    grow(loops, device, 20 * MIB)
    status, body = client.request(
        "POST", f"/v1/attachments/{ids[0]}/extend", {"new_size": 20 * MIB}
    )
    assert status == 200
    assert body["device_size"] == 20 * MIB
    assert sorted(body["guests"], key=lambda g: str(g["attachment_id"])) == sorted(
        (
            {"attachment_id": a, "domain_name": g.name, "size": 20 * MIB, "resized": True}
            for a, g in zip(ids, pair, strict=True)
        ),
        key=lambda g: str(g["attachment_id"]),
    )
    for attachment_id, guest in zip(ids, pair, strict=True):
        assert qemu_size(guest, f"ua-{attachment_id}") == 20 * MIB
        info: Any = guest.dom.blockInfo("sda", 0)
        assert info[0] == 20 * MIB

    grow(loops, device, 24 * MIB)
    cli = ctl("extend", ids[1], "--new-size", "24M", socket=daemon.socket_path)
    assert cli.returncode == 0, cli.stderr
    assert "resized" in cli.stdout
    for attachment_id, guest in zip(ids, pair, strict=True):
        assert qemu_size(guest, f"ua-{attachment_id}") == 24 * MIB

    for new_size, code in ((16 * MIB, "invalid_request"), (64 * MIB, "device_not_extended")):
        with pytest.raises(ApiError) as refused:
            client.extend(ids[0], new_size)
        assert refused.value.code == code
    with pytest.raises(ApiError) as missing:
        client.extend("no-such-attachment")
    assert missing.value.code == "attachment_not_found"

    samples = scrape(daemon)
    extends = 'hostagent_operations_total{{operation="extend",result="{}"}}'
    assert samples[extends.format("resized")] == 2
    assert samples[extends.format("invalid_request")] == 1
    assert samples[extends.format("device_not_extended")] == 1
    assert samples[extends.format("attachment_not_found")] == 1
