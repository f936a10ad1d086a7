"""The v1 API's request and response bodies (API.md), as pydantic models.

Declared once and used three ways: the daemon validates requests with them,
the OpenAPI document is generated from them, and ``client`` parses replies
into them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
TARGET_DEV_PATTERN = r"^(sd|vd)[a-z]{1,3}$"
SERIAL_PATTERN = r"^[A-Za-z0-9_.+-]{1,64}$"


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad field, for a 400 message or a CLI error."""
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


class ConnectionInfo(BaseModel):
    """Cinder's connection_info; keys other than these two are accepted and ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    driver_volume_type: str = Field(
        min_length=1, max_length=32, description="local | iscsi | rbd (more may follow)"
    )
    data: dict[str, Any] = Field(description="protocol-specific target description")
    shared_targets: bool | None = Field(
        default=None,
        description="Cinder's tri-state shared_targets (with service_uuid): connect and "
        "disconnect then hold os-brick's guard for the backend",
    )
    service_uuid: str | None = Field(default=None, max_length=64)


ALIAS_PATTERN = r"^ua-[A-Za-z0-9_-]{1,64}$"


class IncomingMigration(BaseModel):
    """The disk is expected to arrive here with a live migration (API.md v1.1)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    alias: str = Field(pattern=ALIAS_PATTERN, description="the alias the source agent reports")


class AttachRequest(BaseModel):
    """Body of ``PUT /v1/attachments/{attachment_id}``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    volume_id: str = Field(pattern=ID_PATTERN)
    domain: str = Field(min_length=1, max_length=256, description="libvirt domain name or UUID")
    connection_info: ConnectionInfo
    multiattach: bool = False
    mode: Literal["rw", "ro"] = "rw"
    bus: Literal["scsi", "virtio"] = "scsi"
    target_dev: str | None = Field(default=None, pattern=TARGET_DEV_PATTERN)
    serial: str | None = Field(default=None, pattern=SERIAL_PATTERN)
    incoming_migration: IncomingMigration | None = Field(
        default=None,
        description="connect and count for a domain (by UUID) arriving by live migration; "
        "nothing is added to libvirt",
    )


class Attachment(BaseModel):
    """An attachment as the API reports it."""

    attachment_id: str
    volume_id: str
    domain_uuid: str
    domain_name: str
    state: Literal["attaching", "attached", "detaching", "incoming"]
    alias: str = Field(
        description="the disk's libvirt/QEMU device alias: ua-<attachment_id>, or the "
        "source host's alias for a disk that arrived by live migration"
    )
    target_dev: str | None
    bus: Literal["scsi", "virtio"]
    mode: Literal["rw", "ro"]
    multiattach: bool
    shareable: bool
    connection_key: str
    device_path: str | None = Field(description="host block device; null for network disks")
    host_refcount: int = Field(description="attachments now using this host connection")
    disk_xml: str | None
    iotune: dict[str, int] = Field(
        default_factory=dict, description="the I/O limits applied to this disk (empty: none)"
    )


class ExtendRequest(BaseModel):
    """Body of ``POST /v1/attachments/{attachment_id}/extend``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    new_size: int | None = Field(
        default=None,
        gt=0,
        description="bytes; optional where the host device shows the size, required for "
        "network disks",
    )


class ExtendedGuest(BaseModel):
    """One running guest of the host connection after an extend."""

    attachment_id: str
    domain_name: str
    size: int = Field(description="the disk's size in the guest now, in bytes")
    resized: bool = Field(description="this call resized it (false: it was at size already)")


class ExtendResult(BaseModel):
    """Body of a completed extend: every running guest using the host connection."""

    connection_key: str
    device_size: int = Field(description="the size the host sees now, in bytes")
    guests: list[ExtendedGuest]


class AttachmentList(BaseModel):
    attachments: list[Attachment]


class DetachResult(BaseModel):
    """Body of a completed ``DELETE``; replayed unchanged on a retry."""

    attachment_id: str
    state: Literal["detached"] = "detached"
    connection_key: str
    host_refcount: int = Field(description="attachments still using the connection")
    host_disconnected: bool = Field(description="this detach released the host connection")
    terminate_connection: bool = Field(
        description="the caller may now terminate the export for this host"
    )


class Connection(BaseModel):
    connection_key: str
    driver_volume_type: str
    device_path: str | None
    state: Literal["connecting", "connected", "disconnecting"]
    host_refcount: int
    attachments: list[str]
    connected_at: str | None = Field(description="ISO 8601 UTC time of the connect")
    boot_id: str = Field(description="host boot id when the connection was made")


class ConnectionList(BaseModel):
    connections: list[Connection]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    libvirt: Literal["connected", "disconnected"]
    version: str


class ReconcileAction(BaseModel):
    """One thing reconcile did or found."""

    action: str = Field(description="what was done, e.g. released, rolled_back, reported")
    subject: str = Field(description="the attachment id or connection key concerned")
    detail: str


class ReconcileReport(BaseModel):
    actions: list[ReconcileAction]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class LibvirtView(BaseModel):
    """An attachment's disk as libvirt has it now, and the virsh commands that show it."""

    attachment_id: str
    domain_uuid: str
    domain_name: str
    domain_exists: bool
    active: bool
    persistent: bool
    live_disk_xml: str | None = Field(description="the <disk> of the live XML, or null")
    config_disk_xml: str | None = Field(description="the <disk> of the persistent config")
    virsh_commands: list[str]


class Finding(BaseModel):
    """One disagreement between the records, libvirt and the host."""

    kind: str = Field(description="e.g. missing_disk, unrecorded_disk, foreign_disk")
    subject: str = Field(description="the attachment id, connection key or domain concerned")
    detail: str
    suggestion: str = Field(description="a command that inspects or fixes it")


class DoctorReport(BaseModel):
    ok: bool
    findings: list[Finding]
    attachments: int
    connections: int
    domains: int


class ConnectorProperties(BaseModel):
    """os-brick's connector properties (Cinder's ``connector``); os-brick may add keys."""

    model_config = ConfigDict(extra="allow")

    ip: str = Field(description="initiator address: route lookup toward ?target, else my_ip")
    host: str
    multipath: bool
    platform: str | None = None
    os_type: str | None = None
    initiator: str | None = Field(default=None, description="iSCSI initiator IQN, if any")
    do_local_attach: bool | None = None
