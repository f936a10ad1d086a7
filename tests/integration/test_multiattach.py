"""One volume shared by several real guests: connect once, disconnect on the last detach."""

from __future__ import annotations

import libvirt
import pytest

from hostagent.client import ApiError, HostagentClient
from tests.integration.support import Daemon, Guest, Guests, LoopDevices, local_request, unique


def test_one_volume_three_guests_one_connection(
    client: HostagentClient, device: str, guests: Guests
) -> None:
    trio = [guests.make() for _ in range(3)]
    volume = unique("vol")
    ids = [unique("att") for _ in trio]

    for n, (attachment_id, guest) in enumerate(zip(ids, trio, strict=True), start=1):
        attachment, created = client.attach(
            attachment_id, local_request(device, guest, volume_id=volume, multiattach=True)
        )
        assert created
        assert attachment.state == "attached"
        assert attachment.host_refcount == n
        assert attachment.shareable
        assert attachment.device_path == device
        assert attachment.connection_key == f"local:{device}"

    connections = client.connections().connections
    assert len(connections) == 1
    assert connections[0].host_refcount == 3
    assert sorted(connections[0].attachments) == sorted(ids)

    for attachment_id, guest in zip(ids, trio, strict=True):
        disk = guest.disk(f"ua-{attachment_id}")
        assert disk is not None, f"{guest.name} has no disk ua-{attachment_id}"
        assert disk.find("./shareable") is not None
        driver = disk.find("./driver")
        assert driver is not None
        assert driver.get("cache") == "none"
        assert driver.get("io") == "native"
        assert driver.get("type") == "raw"
        source = disk.find("./source")
        assert source is not None
        assert source.get("dev") == device
        serial = disk.find("./serial")
        assert serial is not None
        assert serial.text == volume

    first = client.detach(ids[0])
    second = client.detach(ids[1])
    assert (first.host_refcount, first.host_disconnected, first.terminate_connection) == (
        2,
        False,
        False,
    )
    assert (second.host_refcount, second.host_disconnected, second.terminate_connection) == (
        1,
        False,
        False,
    )
    assert trio[0].disk(f"ua-{ids[0]}") is None
    assert trio[1].disk(f"ua-{ids[1]}") is None
    # The third guest's QEMU still has the device open after two detaches.
    assert trio[2].open_block_devices().get(f"ua-{ids[2]}") == device

    last = client.detach(ids[2])
    assert last.host_refcount == 0
    assert last.host_disconnected is True
    assert last.terminate_connection is True
    assert client.detach(ids[2]) == last, "a repeated DELETE replays the same body"
    assert client.detach(ids[0]) == first
    assert client.connections().connections == []
    assert client.list() == []


def test_qemu_refuses_a_second_open_without_shareable(guests: Guests, loops: LoopDevices) -> None:
    """Why <shareable/> matters: QEMU's image locking refuses a second writer."""
    device = loops.make()
    guest = guests.make()

    def disk(alias: str, dev: str, unit: int, shareable: bool) -> str:
        return (
            "<disk type='block' device='disk'>"
            "<driver name='qemu' type='raw' cache='none' io='native'/>"
            f"<source dev='{device}'/><target dev='{dev}' bus='scsi'/>"
            f"<alias name='{alias}'/>{'<shareable/>' if shareable else ''}"
            f"<address type='drive' controller='0' bus='0' target='0' unit='{unit}'/>"
            "</disk>"
        )

    guest.attach_raw(disk("ua-plain1", "sda", 0, shareable=False))
    with pytest.raises(libvirt.libvirtError, match="lock"):
        guest.attach_raw(disk("ua-plain2", "sdb", 1, shareable=False))
    assert guest.aliases() == {"ua-plain1"}

    other = loops.make()
    device = other
    guest.attach_raw(disk("ua-shared1", "sdc", 2, shareable=True))
    guest.attach_raw(disk("ua-shared2", "sdd", 3, shareable=True))
    assert {"ua-shared1", "ua-shared2"} <= guest.aliases()


def test_second_attach_without_multiattach_is_refused_before_libvirt(
    client: HostagentClient, device: str, guests: Guests
) -> None:
    g1, g2 = guests.make(), guests.make()
    volume = unique("vol")
    first_id = unique("att")
    client.attach(first_id, local_request(device, g1, volume_id=volume))

    for multiattach in (False, True):
        with pytest.raises(ApiError) as refused:
            client.attach(
                unique("att"),
                local_request(device, g2, volume_id=volume, multiattach=multiattach),
            )
        assert refused.value.status == 409
        assert refused.value.code == "volume_not_multiattach"
    assert g2.disks() == [], "libvirt was touched"
    assert [a.attachment_id for a in client.list()] == [first_id]

    # Same device under another volume id is the same volume on this host.
    with pytest.raises(ApiError) as refused:
        client.attach(unique("att"), local_request(device, g2, volume_id=unique("other")))
    assert refused.value.code == "volume_not_multiattach"
    assert client.detach(first_id).terminate_connection


def test_put_is_idempotent_and_ids_are_single_use(
    client: HostagentClient, device: str, guest: Guest
) -> None:
    attachment_id = unique("att")
    body = local_request(device, guest, volume_id=unique("vol"), multiattach=True)

    first, created = client.attach(attachment_id, body)
    again, created_again = client.attach(attachment_id, body)
    assert (created, created_again) == (True, False)
    assert again == first
    assert len(guest.disks()) == 1

    # The domain by UUID is the same request.
    by_uuid, _ = client.attach(attachment_id, dict(body, domain=guest.uuid))
    assert by_uuid == first

    with pytest.raises(ApiError) as changed:
        client.attach(attachment_id, dict(body, mode="ro"))
    assert (changed.value.status, changed.value.code) == (409, "attachment_conflict")
    assert len(guest.disks()) == 1

    with pytest.raises(ApiError) as same_volume:
        client.attach(unique("att"), body)
    assert same_volume.value.code == "volume_already_attached"

    client.detach(attachment_id)
    with pytest.raises(ApiError) as reused:
        client.attach(attachment_id, body)
    assert (reused.value.status, reused.value.code) == (409, "attachment_id_reused")
    assert guest.disks() == []


def test_twenty_shared_disks_on_one_guest(
    client: HostagentClient, guest: Guest, loops: LoopDevices
) -> None:
    ids = []
    for _ in range(20):
        attachment_id = unique("att")
        attachment, _ = client.attach(
            attachment_id,
            local_request(loops.make(4), guest, volume_id=unique("vol"), multiattach=True),
        )
        assert attachment.state == "attached"
        ids.append(attachment_id)

    disks = guest.disks()
    assert len(disks) == 20
    assert all(d.find("./shareable") is not None for d in disks)
    addresses = {
        (a.get("controller"), a.get("target"), a.get("unit"))
        for d in disks
        if (a := d.find("./address")) is not None
    }
    assert len(addresses) == 20
    assert {c for c, _, _ in addresses} == {"0"}, "every disk on the one virtio-scsi controller"
    assert len({d.find("./target").get("dev") for d in disks}) == 20  # type: ignore[union-attr]
    assert len(guest.open_block_devices()) == 20

    for attachment_id in ids:
        assert client.detach(attachment_id).terminate_connection
    assert guest.disks() == []


def test_guest_without_virtio_scsi_controller_gets_one(
    daemon: Daemon, guests: Guests, loops: LoopDevices
) -> None:
    guest = guests.make(virtio_scsi=False)
    attachment_id = unique("att")
    daemon.client.attach(attachment_id, local_request(loops.make(), guest, volume_id="v"))
    controllers = guest.xml().findall("./devices/controller[@type='scsi']")
    assert [c.get("model") for c in controllers] == ["virtio-scsi"]
    assert guest.disk(f"ua-{attachment_id}") is not None
    daemon.client.detach(attachment_id)


def test_persistent_guest_gets_the_disk_live_and_in_config(
    daemon: Daemon, guests: Guests, loops: LoopDevices
) -> None:
    guest = guests.make(persistent=True)
    attachment_id = unique("att")
    device = loops.make()
    daemon.client.attach(
        attachment_id, local_request(device, guest, volume_id="v", multiattach=True)
    )
    alias = f"ua-{attachment_id}"
    assert guest.disk(alias) is not None
    config_disk = guest.disk(alias, inactive=True)
    assert config_disk is not None
    assert config_disk.find("./shareable") is not None

    result = daemon.client.detach(attachment_id)
    assert result.terminate_connection
    assert guest.disk(alias) is None
    assert guest.disk(alias, inactive=True) is None


def test_virtio_bus_disk(daemon: Daemon, guests: Guests, loops: LoopDevices) -> None:
    guest = guests.make()
    attachment_id = unique("att")
    attachment, _ = daemon.client.attach(
        attachment_id,
        local_request(loops.make(), guest, volume_id="v", bus="virtio", mode="ro"),
    )
    assert attachment.target_dev == "vda"
    disk = guest.disk(f"ua-{attachment_id}")
    assert disk is not None
    assert disk.find("./target").get("bus") == "virtio"  # type: ignore[union-attr]
    assert disk.find("./readonly") is not None
