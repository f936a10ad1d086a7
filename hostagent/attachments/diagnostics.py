"""The doctor's findings, for ``GET /v1/doctor``.

Read-only: the doctor compares the agent's records, every domain's live XML
and persistent config, and the host's devices, and says what disagrees and
which command looks into or fixes it. Fixing is reconcile's job.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from hostagent.api.models import DoctorReport, Finding
from hostagent.guests.disk_presence import presence_in_scan
from hostagent.guests.domain_scan import DomainDisk, DomainScan
from hostagent.guests.domains import DomainInfo, Guests
from hostagent.host.device_users import (
    DeviceNumbers,
    DeviceReference,
    OurDisks,
    accounted_for,
    matcher_for,
    references_in,
)
from hostagent.host.host_use import host_uses, identify
from hostagent.libvirt_xml.policy import USER_ALIAS_PREFIX
from hostagent.state.store import (
    AttachmentRecord,
    AttachmentState,
    ConnectionRecord,
    ConnectionState,
    Store,
)


def _released_here(store: Store, domain: DomainInfo, alias: str) -> bool:
    """Whether the agent released the attachment of ``alias`` on this very domain
    (its tombstone names the domain's UUID): the domain was gone, then defined
    again with the disk."""
    tombstone = store.get_tombstone(alias[len(USER_ALIAS_PREFIX) :])
    return tombstone is not None and tombstone.domain_uuid == domain.uuid


def unrecorded_disk_detail(store: Store, domain: DomainInfo, alias: str, where: str) -> str:
    """What a ``ua-`` disk that no attachment record has means, for the doctor
    and the warning when a domain is defined with one."""
    if _released_here(store, domain, alias):
        return (
            f"{domain.name} holds {alias} ({where}) but the agent released that "
            "attachment when the domain was gone (undefined, then defined again with "
            "the disk); it will not detach it or disconnect its device, and the "
            "device may be disconnected already"
        )
    return (
        f"{domain.name} holds {alias} ({where}) but the agent has no record of it; it "
        "will not detach or disconnect it"
    )


def _unrecorded_finding(store: Store, dd: DomainDisk, alias: str) -> Finding:
    detach = f"virsh detach-device-alias {dd.domain.name} {alias} --{dd.where}"
    if _released_here(store, dd.domain, alias):
        # --rebuild-state adopts no id that has a tombstone
        suggestion = f"{detach}, then attach the volume again with a fresh attachment id"
    else:
        suggestion = f"hostagentd --rebuild-state (service stopped), or {detach}"
    return Finding(
        kind="unrecorded_disk",
        subject=dd.domain.name,
        detail=unrecorded_disk_detail(store, dd.domain, alias, dd.where),
        suggestion=suggestion,
    )


def _attachment_findings(
    record: AttachmentRecord, domain: DomainInfo | None, disks: list[DomainDisk]
) -> Iterator[Finding]:
    subject = record.attachment_id
    if record.state is AttachmentState.INCOMING:
        # awaited by a live migration: no disagreement until its domain runs here
        # with the disk (then confirm, or the next reconcile, records it)
        if domain is not None and presence_in_scan(disks, domain.uuid, record.alias)[0]:
            yield Finding(
                kind="arrived_unconfirmed",
                subject=subject,
                detail=f"{domain.name} runs here with {record.alias}; the attachment is "
                "still incoming",
                suggestion=f"hostagentctl confirm {subject}",
            )
        return
    if record.state is not AttachmentState.ATTACHED:
        verb = (
            "hostagentctl reconcile"
            if record.state is AttachmentState.ATTACHING
            else (f"hostagentctl detach {subject}")
        )
        yield Finding(
            kind="unfinished",
            subject=subject,
            detail=f"the attachment is {record.state.value}",
            suggestion=verb,
        )
    if domain is None:
        yield Finding(
            kind="domain_gone",
            subject=subject,
            detail=f"domain {record.domain_name} ({record.domain_uuid}) no longer exists",
            suggestion="hostagentctl reconcile",
        )
        return
    in_live, in_config = presence_in_scan(disks, domain.uuid, record.alias)
    missing = sorted(
        where
        for where, expected, held in (
            ("live", domain.active, in_live),
            ("config", domain.persistent, in_config),
        )
        if expected and not held
    )
    if record.state is AttachmentState.ATTACHED and missing:
        yield Finding(
            kind="missing_disk",
            subject=subject,
            detail=f"{domain.name} has no {record.alias} in its {' and '.join(missing)} XML",
            suggestion=f"hostagentctl detach {subject} (to release it), or attach the disk "
            f"again with virsh attach-device (hostagentctl show {subject} prints its XML)",
        )


def _connection_findings(
    connection: ConnectionRecord,
    users: int,
    boot_id: str,
    references: list[DeviceReference],
    ours: OurDisks,
) -> Iterator[Finding]:
    key = connection.connection_key
    if connection.state is not ConnectionState.CONNECTED:
        yield Finding(
            kind="connection_state",
            subject=key,
            detail=f"the connection is {connection.state.value}",
            suggestion="hostagentctl reconcile",
        )
    if boot_id and connection.boot_id and connection.boot_id != boot_id:
        yield Finding(
            kind="stale_boot",
            subject=key,
            detail="connected in an earlier boot of this host",
            suggestion="hostagentctl reconcile",
        )
    if connection.device_path and not os.path.exists(connection.device_path):
        yield Finding(
            kind="device_missing",
            subject=key,
            detail=f"{connection.device_path} does not exist on the host",
            suggestion="hostagentctl reconcile (connects it again)",
        )
    if users == 0:
        yield Finding(
            kind="unused_connection",
            subject=key,
            detail="no attachment uses it",
            suggestion="hostagentctl reconcile (disconnects it unless a domain or "
            "process still uses the device)",
        )
    for ref in references:
        if not accounted_for(ref, ours, key):
            yield Finding(
                kind="foreign_disk",
                subject=key,
                detail=f"{ref.domain_name} ({ref.where}) uses {ref.source} {ref.use} "
                "without an attachment of the agent; the device stays "
                "connected while it does",
                suggestion=f"virsh domblklist {ref.domain_name} --details",
            )


def _host_use_findings(
    connection: ConnectionRecord, records: list[AttachmentRecord]
) -> Iterator[Finding]:
    """Attachments whose device the host itself uses now (mounted after the attach,
    say): a guest writing to it corrupts the host's filesystem or swap."""
    path = connection.device_path
    device = identify(path) if path else None
    if path is None or device is None:
        return
    reasons = host_uses(device, path, exclusive=False)  # a probe could fail an unmap
    if not reasons:
        return
    for record in records:
        if record.connection_key == connection.connection_key:
            yield Finding(
                kind="host_uses_device",
                subject=record.attachment_id,
                detail=f"the host itself uses {path} ({device.path}), which "
                f"{record.domain_name} has as {record.target_dev}: {'; '.join(reasons)}",
                suggestion=f"findmnt --source {device.path}; swapon --show; then "
                f"hostagentctl detach {record.attachment_id}",
            )


def diagnose(
    store: Store, guests: Guests, *, boot_id: str, scan: DomainScan | None = None
) -> DoctorReport:
    """Every disagreement between the records, libvirt's domains and the host;
    ``scan`` is the daemon's (its persistent configs cached), else one for now."""
    snapshot = (scan or DomainScan(guests)).snapshot()
    domains = snapshot.by_uuid
    disks = snapshot.disks
    records = store.list_attachments()
    connections = store.list_connections()
    findings: list[Finding] = []
    for record in records:
        findings += _attachment_findings(record, domains.get(record.domain_uuid), disks)
    ours = {(r.domain_uuid, r.alias): r.connection_key for r in records}
    for dd in disks:
        alias = dd.disk.alias or ""
        unrecorded = alias.startswith(USER_ALIAS_PREFIX) and (dd.domain.uuid, alias) not in ours
        if unrecorded and dd.disk.layer is None:  # a layer is told with its disk
            findings.append(_unrecorded_finding(store, dd, alias))
    numbers: DeviceNumbers = {}
    for connection in connections:
        findings += _host_use_findings(connection, records)
        findings += _connection_findings(
            connection,
            store.refcount(connection.connection_key),
            boot_id,
            references_in(disks, matcher, numbers) if (matcher := matcher_for(connection)) else [],
            ours,
        )
    return DoctorReport(
        ok=not findings,
        findings=findings,
        attachments=len(records),
        connections=len(connections),
        domains=len(domains),
    )
