"""Read-only API views: an attachment and the connections as the store has
them, an attachment as libvirt has it, and the doctor's report."""

from __future__ import annotations

import datetime
from collections import Counter

from hostagent.api.models import (
    Attachment,
    Connection,
    ConnectionList,
    DoctorReport,
    LibvirtView,
)
from hostagent.attachments.diagnostics import diagnose
from hostagent.errors import AttachmentNotFound
from hostagent.guests.domain_scan import DomainScan
from hostagent.guests.domains import Guests
from hostagent.libvirt_xml.disk import DiskSpec, disk_fragment
from hostagent.state.store import AttachmentRecord, ConnectionRecord, Store


def iso_utc(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    moment = datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def stored_iotune(disk_xml: str | None) -> dict[str, int]:
    """The I/O limits of the disk as the agent made it (its stored XML)."""
    if disk_xml is None or "iotune" not in disk_xml:  # most disks: no parse needed
        return {}
    iotune = DiskSpec.from_xml(disk_xml).iotune
    return iotune.limits() if iotune is not None else {}


def attachment_view(store: Store, record: AttachmentRecord) -> Attachment:
    """The API body of an attachment (GET, and the PUT's answer)."""
    return _view(
        record,
        store.get_connection(record.connection_key),
        store.refcount(record.connection_key),
    )


def attachment_views(store: Store) -> list[Attachment]:
    """Every attachment's body, from one read of each table."""
    records = store.list_attachments()
    connections = {c.connection_key: c for c in store.list_connections()}
    users = Counter(r.connection_key for r in records)
    return [_view(r, connections.get(r.connection_key), users[r.connection_key]) for r in records]


def _view(
    record: AttachmentRecord, connection: ConnectionRecord | None, refcount: int
) -> Attachment:
    return Attachment(
        attachment_id=record.attachment_id,
        volume_id=record.volume_id,
        domain_uuid=record.domain_uuid,
        domain_name=record.domain_name,
        state=record.state.value,
        alias=record.alias,
        target_dev=record.target_dev,
        bus=record.bus,
        mode=record.mode,
        multiattach=record.multiattach,
        shareable=record.multiattach,
        connection_key=record.connection_key,
        device_path=connection.device_path if connection else None,
        host_refcount=refcount,
        disk_xml=record.disk_xml,
        iotune=stored_iotune(record.disk_xml),
    )


def connection_list(store: Store) -> ConnectionList:
    """Every host connection with the attachments that derive its refcount."""
    attachments = store.list_attachments()
    connections = []
    for record in store.list_connections():
        users = [a.attachment_id for a in attachments if a.connection_key == record.connection_key]
        connections.append(
            Connection(
                connection_key=record.connection_key,
                driver_volume_type=record.driver_volume_type,
                device_path=record.device_path,
                state=record.state.value,
                host_refcount=len(users),
                attachments=users,
                connected_at=iso_utc(record.connected_at),
                boot_id=record.boot_id,
            )
        )
    return ConnectionList(connections=connections)


def virsh_commands(domain_name: str, alias: str, persistent: bool) -> list[str]:
    """The virsh commands that show an attachment's disk next to the agent's view."""
    xpath = f"//disk[alias/@name='{alias}']"
    commands = [
        f"virsh domblklist {domain_name} --details",
        f'virsh dumpxml {domain_name} --xpath "{xpath}"',
    ]
    if persistent:
        commands.append(f'virsh dumpxml {domain_name} --inactive --xpath "{xpath}"')
    commands.append(
        f'virsh qemu-monitor-command {domain_name} --pretty \'{{"execute": "query-block"}}\''
    )
    return commands


class ReadViews:
    """The answers of the read-only routes, from the store and libvirt."""

    def __init__(
        self, *, store: Store, guests: Guests, boot_id: str, scan: DomainScan | None = None
    ) -> None:
        self._store = store
        self._guests = guests
        self._boot_id = boot_id
        self._scan = scan

    def attachment(self, attachment_id: str) -> Attachment:
        record = self._store.get_attachment(attachment_id)
        if record is None:
            raise AttachmentNotFound(f"no attachment {attachment_id}")
        return attachment_view(self._store, record)

    def attachments(self) -> list[Attachment]:
        return attachment_views(self._store)

    def connections(self) -> ConnectionList:
        return connection_list(self._store)

    def libvirt(self, attachment_id: str) -> LibvirtView:
        """The attachment's disk as the domain's live XML and config have it."""
        record = self._store.get_attachment(attachment_id)
        if record is None:
            raise AttachmentNotFound(f"no attachment {attachment_id}")
        guests = self._guests
        domain = guests.find(record.domain_uuid)
        live = config = None
        if domain is not None and domain.active:
            live = disk_fragment(guests.domain_xml(domain.uuid), record.alias)
        if domain is not None and domain.persistent:
            config = disk_fragment(guests.domain_xml(domain.uuid, inactive=True), record.alias)
        name = domain.name if domain else record.domain_name
        return LibvirtView(
            attachment_id=attachment_id,
            domain_uuid=record.domain_uuid,
            domain_name=name,
            domain_exists=domain is not None,
            active=bool(domain and domain.active),
            persistent=bool(domain and domain.persistent),
            live_disk_xml=live,
            config_disk_xml=config,
            virsh_commands=virsh_commands(name, record.alias, bool(domain and domain.persistent)),
        )

    def doctor(self) -> DoctorReport:
        return diagnose(self._store, self._guests, boot_id=self._boot_id, scan=self._scan)
