"""Per-disk QoS (``qos_specs`` -> ``<iotune>``) and discard on real libvirt and QEMU."""

from __future__ import annotations

import os
from typing import Any

import libvirt_qemu
import pytest

from hostagent.client import ApiError
from tests.conftest import DaemonFactory
from tests.integration.support import Daemon, Guest, Guests, LoopDevices, run, unique


def request(device: str, guest: Guest, volume: str, **data: Any) -> dict[str, Any]:
    return {
        "volume_id": volume,
        "domain": guest.name,
        "multiattach": True,
        "connection_info": {
            "driver_volume_type": "local",
            "data": {"device_path": device, **data},
        },
    }


def blkdeviotune(guest: Guest, target_dev: str) -> dict[str, int]:
    """``virsh blkdeviotune``: the limits QEMU applies to the disk now."""
    out = run("virsh", "-c", "qemu:///system", "blkdeviotune", guest.name, target_dev)
    limits = {}
    for line in out.splitlines():
        name, _, value = line.partition(":")
        if value.strip().isdigit():
            limits[name.strip()] = int(value)
    return limits


def test_qos_specs_limit_one_guest_disk_only(
    daemon: Daemon, guests: Guests, loops: LoopDevices
) -> None:
    device = loops.make()
    limited, free, refused = guests.make(), guests.make(), guests.make()
    volume = unique("vol")
    client = daemon.client
    qos = {
        "consumer": "front-end",
        "total_bytes_sec": "10485760",
        "read_iops_sec": 300,
        "write_iops_sec": "200",
        "read_iops_sec_max": 600,
        "size_iops_sec": 8192,
        "total_iops_sec_per_gb": "20",  # per-GB: Cinder resolved it already
        "vendor:tier": "gold",  # a back-end's own key
    }
    first, _ = client.attach(unique("att"), request(device, limited, volume, qos_specs=qos))
    assert first.iotune == {
        "total_bytes_sec": 10485760,
        "read_iops_sec": 300,
        "write_iops_sec": 200,
        "read_iops_sec_max": 600,
        "size_iops_sec": 8192,
    }
    applied = blkdeviotune(limited, "sda")
    assert {k: applied[k] for k in first.iotune} == first.iotune
    assert applied["write_bytes_sec"] == 0

    second, _ = client.attach(unique("att"), request(device, free, volume))
    assert second.iotune == {}
    assert set(blkdeviotune(free, "sda").values()) == {0}, "limits are per guest disk"
    assert client.get(first.attachment_id).iotune == first.iotune

    back_end, _ = client.attach(
        unique("att"),
        request(loops.make(), free, unique("vol"), qos_specs={**qos, "consumer": "back-end"}),
    )
    assert back_end.iotune == {}

    for bad in ({"total_bytes_sec": "-5"}, {"read_iops_sec": 1.5}, {"write_iops_sec": True}):
        attachment_id = unique("att")
        with pytest.raises(ApiError) as refused_attach:
            client.attach(attachment_id, request(device, refused, volume, qos_specs=bad))
        assert refused_attach.value.status == 400
        assert next(iter(bad)) in refused_attach.value.message
        assert refused.disks() == [], "nothing reached libvirt"
        assert attachment_id not in {a.attachment_id for a in client.list()}
    assert client.connections().connections[0].host_refcount == 2


def discard_of(guest: Guest, alias: str) -> str | None:
    disk = guest.disk(alias)
    assert disk is not None
    driver = disk.find("./driver")
    assert driver is not None
    return driver.get("discard")


def qemu_passes_discards(guest: Guest, alias: str, loops: LoopDevices, device: str) -> bool:
    """QEMU's block node of the disk discards: 4 MiB written to the loop device
    and discarded through QEMU (HMP ``qemu-io``) leave a hole in the backing
    file, where a node opened without discard drops the request."""
    run("dd", "if=/dev/urandom", f"of={device}", "bs=1M", "count=4", "oflag=direct")
    before = os.stat(loops.backing[device]).st_blocks
    libvirt_qemu.qemuMonitorCommand(
        guest.dom,
        f'qemu-io -d {alias} "discard 0 4M"',
        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
    )
    return os.stat(loops.backing[device]).st_blocks < before


def test_discard_follows_connection_info_and_the_host_setting(
    daemon_factory: DaemonFactory, guests: Guests, loops: LoopDevices
) -> None:
    guest = guests.make()
    client = daemon_factory().client
    told, untold, ignored = unique("att"), unique("att"), unique("att")
    devices = {told: loops.make(), untold: loops.make(), ignored: loops.make()}
    client.attach(told, request(devices[told], guest, unique("vol"), discard=True))
    client.attach(untold, request(devices[untold], guest, unique("vol")))
    ignoring = daemon_factory(**{"disk-discard": "ignore"}).client
    ignoring.attach(ignored, request(devices[ignored], guest, unique("vol"), discard=True))

    assert discard_of(guest, f"ua-{told}") == "unmap"
    assert discard_of(guest, f"ua-{untold}") is None
    assert discard_of(guest, f"ua-{ignored}") is None
    assert qemu_passes_discards(guest, f"ua-{told}", loops, devices[told])
    assert not qemu_passes_discards(guest, f"ua-{untold}", loops, devices[untold])
    assert not qemu_passes_discards(guest, f"ua-{ignored}", loops, devices[ignored])
