"""libvirt XML for the disks hostagent attaches: pure data, rules and placement.

``disk`` maps XML to frozen dataclasses (via ``xmlmodel``), ``policy`` decides
what a requested disk looks like, ``placement`` picks free names and addresses,
``secret`` declares the secrets that hold a network disk's key.
Nothing here talks to libvirt.
"""

from hostagent.libvirt_xml.disk import (
    ControllerSpec,
    DiskSpec,
    DomainDevices,
    DriveAddress,
    SourceHost,
    parse_domain,
)
from hostagent.libvirt_xml.placement import (
    first_free_drive_address,
    first_free_target_dev,
    target_dev_name,
)
from hostagent.libvirt_xml.policy import (
    BlockSource,
    DiskPolicyError,
    DiskRequest,
    NetworkSource,
    build_disk,
    user_alias,
)
from hostagent.libvirt_xml.secret import SecretSpec

__all__ = [
    "BlockSource",
    "ControllerSpec",
    "DiskPolicyError",
    "DiskRequest",
    "DiskSpec",
    "DomainDevices",
    "DriveAddress",
    "NetworkSource",
    "SecretSpec",
    "SourceHost",
    "build_disk",
    "first_free_drive_address",
    "first_free_target_dev",
    "parse_domain",
    "target_dev_name",
    "user_alias",
]
