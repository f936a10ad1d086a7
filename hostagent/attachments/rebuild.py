"""Recreate lost state from libvirt: every ``ua-`` disk in a domain is ours.

``hostagentd --rebuild-state`` runs this when the state file was lost. A
block disk gives back everything a record needs (the device, the guest, the
serial as volume id, shareable, read-only, bus, target dev); its connection
is recorded as ``local`` on the device, so the agent keeps it and never runs
a protocol logout it cannot know. A network disk (rbd) does not carry the
connection info os-brick needs, so it is reported and left alone: the agent
neither records nor disconnects it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from hostagent.connectors import Target
from hostagent.connectors.local import LocalConnector
from hostagent.guests.domain_scan import scan_domain_xml
from hostagent.guests.domains import DomainInfo, Guests
from hostagent.libvirt_xml.disk import DiskSpec, parse_domain
from hostagent.state.store import (
    AttachmentRecord,
    AttachmentState,
    ConnectionRecord,
    ConnectionState,
    Store,
)

ALIAS_PREFIX = "ua-"
REBUILT_HASH = "rebuilt-from-libvirt"


@dataclass(frozen=True)
class FoundDisk:
    """A ``ua-`` disk of a domain, preferring its persistent definition."""

    domain: DomainInfo
    disk: DiskSpec

    @property
    def attachment_id(self) -> str:
        assert self.disk.alias is not None
        return self.disk.alias[len(ALIAS_PREFIX) :]


def agent_disks(guests: Guests) -> list[FoundDisk]:
    """Every disk with a ``ua-`` alias in any domain (config first, then live)."""
    found: dict[tuple[str, str], FoundDisk] = {}
    views = scan_domain_xml(guests)
    for view in sorted(views, key=lambda v: v.where != "config"):  # stable: config first
        for disk in parse_domain(view.xml).disks:
            if disk.alias and disk.alias.startswith(ALIAS_PREFIX):
                found.setdefault((view.domain.uuid, disk.alias), FoundDisk(view.domain, disk))
    return list(found.values())


def unrecorded_disks(store: Store, guests: Guests) -> list[FoundDisk]:
    """``ua-`` disks with no attachment record: none holds that alias on that
    domain (a disk that arrived by migration keeps the source's alias, so its
    alias does not name its attachment id)."""
    recorded = {(a.domain_uuid, a.alias) for a in store.list_attachments()}
    return [f for f in agent_disks(guests) if (f.domain.uuid, f.disk.alias) not in recorded]


def _records(found: FoundDisk, boot_id: str) -> tuple[AttachmentRecord, ConnectionRecord]:
    disk = found.disk
    assert disk.source_dev is not None
    device = os.path.realpath(disk.source_dev)
    now = time.time()
    # What a block disk tells is a host device: it is recorded as the local
    # protocol's, keyed as that protocol keys it (the kernel's name).
    target = LocalConnector.canonical(
        Target(
            driver_volume_type=LocalConnector.driver_volume_type,
            connection_key=f"local:{device}",
            properties={"device_path": device},
            disk_format=disk.driver_type or "raw",
        )
    )
    key = target.connection_key
    connection = ConnectionRecord(
        connection_key=key,
        driver_volume_type=target.driver_volume_type,
        connection_data=dict(target.properties),
        disk_format=target.disk_format,
        state=ConnectionState.CONNECTED,
        boot_id=boot_id,
        created_at=now,
        device_path=device,
        device_info={"type": "local", "path": device},
        connected_at=now,
    )
    attachment = AttachmentRecord(
        attachment_id=found.attachment_id,
        volume_id=disk.serial or found.attachment_id,
        domain_uuid=found.domain.uuid,
        domain_name=found.domain.name,
        connection_key=key,
        state=AttachmentState.ATTACHED,
        multiattach=disk.shareable,
        mode="ro" if disk.readonly else "rw",
        bus=disk.target_bus or "scsi",
        serial=disk.serial or found.attachment_id,
        alias=disk.alias or "",
        request_hash=REBUILT_HASH,
        created_at=now,
        updated_at=now,
        target_dev=disk.target_dev,
        disk_xml=disk.to_xml(),
    )
    return attachment, connection


def rebuild_state(store: Store, guests: Guests, *, boot_id: str) -> list[str]:
    """Record every unrecorded ``ua-`` block disk; returns one line per disk."""
    lines = []
    rebuilt = 0
    for found in unrecorded_disks(store, guests):
        where = f"{found.disk.alias} on {found.domain.name}"
        if found.disk.disk_type != "block" or not found.disk.source_dev:
            lines.append(
                f"left alone: {where} is a {found.disk.disk_type} disk; its connection info "
                "is not in libvirt, so the agent will neither record nor disconnect it"
            )
            continue
        if (found.disk.target_bus or "scsi") not in ("scsi", "virtio"):
            lines.append(
                f"left alone: {where} is on bus {found.disk.target_bus}; the agent only "
                "makes scsi and virtio disks, so it is not one of its own"
            )
            continue
        attachment, connection = _records(found, boot_id)
        if store.adopt(attachment, connection):
            rebuilt += 1
            lines.append(f"rebuilt: {where} -> {connection.connection_key}")
        else:
            lines.append(f"left alone: {where}: its id was already detached (tombstone)")
    lines.append(f"rebuilt {rebuilt} attachments")
    return lines
