"""Disk XML for an attach request, shared by the daemon and offline rendering.

The connector of the target's protocol says what the guest's disk names (a
``connectors.DiskSource``); this maps it onto libvirt_xml's disk sources.
``hostagentctl xml`` renders what the daemon would attach, without a daemon,
so an operator can ``virsh attach-device`` it by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import count
from typing import Any

from pydantic import ValidationError

from hostagent import connectors
from hostagent.api.models import ConnectionInfo, describe_validation_error
from hostagent.attachments.qos import iotune_from_qos_specs
from hostagent.connectors import (
    BlockDiskSource,
    ConnectorRegistry,
    DiskSource,
    HostDevice,
    InvalidTarget,
    Target,
)
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


def libvirt_source(source: DiskSource) -> BlockSource | NetworkSource:
    """libvirt_xml's disk source for what a connector says a guest's disk names."""
    if isinstance(source, BlockDiskSource):
        return BlockSource(dev=source.path)
    return NetworkSource(
        protocol=source.protocol,
        name=source.name,
        hosts=tuple(SourceHost(name=host.name, port=host.port) for host in source.hosts),
        auth_username=source.auth_username,
        secret_type=source.secret_type,
        secret_uuid=source.secret_uuid,
    )


def disk_source(target: Target, device: HostDevice) -> BlockSource | NetworkSource:
    """Where the guest's disk reads from, as the target's connector says: the
    host block device, or an image QEMU opens over the network."""
    source = connectors.disk_source(target, device)
    if source is None:
        raise InvalidTarget(f"{target.driver_volume_type} gave no host block device")
    return libvirt_source(source)


def default_unit(target_dev: str) -> int:
    """The unit an offline render uses for ``sdX``: its index (sda 0, sdb 1, ...)."""
    prefix = target_dev[:2]
    for index in count():
        name = target_dev_name(prefix, index)
        if name == target_dev or len(name) > len(target_dev):
            return index
    raise AssertionError("unreachable")


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
        connector = (registry or ConnectorRegistry.default()).get(info.driver_volume_type)
        target = connector.parse_target(info.data)
        dev = target_dev or first_free_target_dev(bus, ())
        address = DriveAddress(0, 0, 0, default_unit(dev)) if bus == "scsi" else None
        request = DiskRequest(
            attachment_id=attachment_id,
            serial=serial,
            source=libvirt_source(connector.offline_disk_source(target)),
            multiattach=multiattach,
            mode=mode,
            bus=bus,
            disk_format=target.disk_format,
            target_dev=dev,
            address=address,
            iotune=iotune_from_qos_specs(info.data.get("qos_specs")),
            # as with [DEFAULT] disk_discard at its default, unmap
            discard=info.data.get("discard") is True,
        )
        return build_disk(request).to_xml()
    except ValidationError as exc:
        raise OfflineRenderError(describe_validation_error(exc)) from None
    except (InvalidTarget, DiskPolicyError) as exc:
        raise OfflineRenderError(str(exc)) from None
