"""Disk XML for an attach request, shared by the daemon and offline rendering.

``hostagentctl xml`` renders what the daemon would attach, without a daemon,
so an operator can ``virsh attach-device`` it by hand.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from itertools import count
from typing import Any

from pydantic import ValidationError

from hostagent.api.models import ConnectionInfo, describe_validation_error
from hostagent.connectors import ConnectorRegistry, HostDevice, InvalidTarget, Target
from hostagent.connectors.rbd import SECRET_NAMESPACE, cephx_key
from hostagent.libvirt_xml.disk import DriveAddress, SourceHost
from hostagent.libvirt_xml.placement import first_free_target_dev, target_dev_name
from hostagent.libvirt_xml.policy import (
    BlockSource,
    DiskPolicyError,
    DiskRequest,
    NetworkSource,
    build_disk,
)


class OfflineRenderError(ValueError):
    """The connection_info or options cannot make a disk; the message says why."""


def disk_source(target: Target, device: HostDevice) -> BlockSource | NetworkSource:
    """Where the guest's disk reads from: the host block device, or (rbd through
    librbd) the image on its monitors, with the secret holding the cephx key."""
    if device.path is not None:
        return BlockSource(dev=device.path)
    if target.driver_volume_type == "rbd":
        props = target.properties
        hosts = tuple(
            SourceHost(name=str(host).strip("[]"), port=str(port))
            for host, port in zip(props["hosts"], props["ports"], strict=True)
        )
        # No user, no auth. With auth_enabled false, parse_target has dropped the
        # user, keys and secret_uuid; a joined connection's secret is not used.
        secret_uuid = device.device_info.get("secret_uuid") if props.get("auth_username") else None
        return NetworkSource(
            protocol="rbd",
            name=str(props["name"]),
            hosts=hosts,
            auth_username=str(props["auth_username"]) if secret_uuid else None,
            secret_type="ceph" if secret_uuid else None,
            secret_uuid=str(secret_uuid) if secret_uuid else None,
        )
    raise InvalidTarget(f"{target.driver_volume_type} gave no host block device")


def disk_request(
    *,
    attachment_id: str,
    serial: str,
    source: BlockSource | NetworkSource,
    disk_format: str,
    multiattach: bool,
    mode: str,
    bus: str,
    target_dev: str,
    address: DriveAddress | None,
) -> DiskRequest:
    """The policy input for a block device on the host."""
    return DiskRequest(
        attachment_id=attachment_id,
        serial=serial,
        source=source,
        multiattach=multiattach,
        mode=mode,
        bus=bus,
        disk_format=disk_format,
        target_dev=target_dev,
        address=address,
    )


def default_unit(target_dev: str) -> int:
    """The unit an offline render uses for ``sdX``: its index (sda 0, sdb 1, ...)."""
    prefix = target_dev[:2]
    for index in count():
        name = target_dev_name(prefix, index)
        if name == target_dev or len(name) > len(target_dev):
            return index
    raise AssertionError("unreachable")


def offline_source(target: Target) -> BlockSource | NetworkSource:
    """The disk's source without connecting: the local path, the udev by-path
    link of a single-path iSCSI LUN, or an rbd image (with the secret the agent
    would define for a key, or the one connection_info names)."""
    path = target.properties.get("device_path")
    if isinstance(path, str):
        return BlockSource(dev=path)
    if target.driver_volume_type == "rbd":
        secret = target.properties.get("secret_uuid")
        if cephx_key(target.properties) is not None:
            secret = str(uuid.uuid5(SECRET_NAMESPACE, target.connection_key))
        return disk_source(target, HostDevice(None, {"secret_uuid": secret}))
    paths = target.connection_key.removeprefix("iscsi:").split(",")
    if target.driver_volume_type == "iscsi" and len(paths) == 1:
        portal, iqn, lun = paths[0].split("/")
        return BlockSource(dev=f"/dev/disk/by-path/ip-{portal}-iscsi-{iqn}-lun-{lun}")
    raise OfflineRenderError(
        f"offline rendering cannot know the device of this {target.driver_volume_type} "
        "target (multipath devices are named when they appear)"
    )


def render_disk_xml(
    connection_info: Mapping[str, Any],
    *,
    attachment_id: str,
    serial: str,
    multiattach: bool,
    mode: str,
    bus: str,
    target_dev: str | None,
    registry: ConnectorRegistry | None = None,
) -> str:
    """The disk XML hostagent would attach (controller 0, unit from the dev name)."""
    try:
        info = ConnectionInfo.model_validate(connection_info)
        target = (
            (registry or ConnectorRegistry.default())
            .get(info.driver_volume_type)
            .parse_target(info.data)
        )
        dev = target_dev or first_free_target_dev(bus, ())
        address = DriveAddress(0, 0, 0, default_unit(dev)) if bus == "scsi" else None
        request = disk_request(
            attachment_id=attachment_id,
            serial=serial,
            source=offline_source(target),
            disk_format=target.disk_format,
            multiattach=multiattach,
            mode=mode,
            bus=bus,
            target_dev=dev,
            address=address,
        )
        return build_disk(request).to_xml()
    except ValidationError as exc:
        raise OfflineRenderError(describe_validation_error(exc)) from None
    except (InvalidTarget, DiskPolicyError) as exc:
        raise OfflineRenderError(str(exc)) from None
