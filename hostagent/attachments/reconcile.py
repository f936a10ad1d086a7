"""Reconcile the store against libvirt's domains and the host's devices.

Runs at start-up before the socket accepts requests, after every libvirt
reconnect, periodically, and on ``POST /v1/reconcile``. It finishes or rolls
back interrupted steps, releases attachments of domains that no longer exist,
disconnects connections nobody uses, and reports disks that domains hold on
our devices without a record of ours (their devices stay connected).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from hostagent.api.models import ReconcileAction, ReconcileReport
from hostagent.attachments.connection_release import DomainBack
from hostagent.attachments.diagnostics import unrecorded_disk_detail
from hostagent.attachments.guest_disks import GuestDisks
from hostagent.attachments.host_connections import HostConnections
from hostagent.attachments.migration import Migrations
from hostagent.attachments.reconcile_connections import ConnectionPass
from hostagent.attachments.reconcile_connections import act as _act
from hostagent.errors import DomainNotFound, HostagentError
from hostagent.guests.disk_presence import DiskPresence
from hostagent.guests.domain_scan import DomainSnapshot
from hostagent.guests.domains import DomainInfo, Guests
from hostagent.libvirt_xml.disk import parse_disk_refs
from hostagent.libvirt_xml.policy import USER_ALIAS_PREFIX
from hostagent.locks import HostLocks
from hostagent.observability import logctx
from hostagent.state.store import (
    AttachmentRecord,
    AttachmentState,
    AttachmentSummary,
    Store,
)

LOG = logging.getLogger(__name__)


class Reconciler:
    """One pass over attachments, then connections and foreign disks (those two
    are ``reconcile_connections.ConnectionPass``).

    ``connections`` and ``disks`` are the attachment service's own (built on
    the same store, guests and locks), so both take the same locks.
    """

    def __init__(
        self,
        *,
        store: Store,
        guests: Guests,
        locks: HostLocks,
        connections: HostConnections,
        disks: GuestDisks,
        boot_id: str,
        tombstone_ttl: float,
        clock: Callable[[], float] = time.time,
        migrations: Migrations | None = None,
    ) -> None:
        self._store = store
        self._migrations = migrations or Migrations(
            store=store, guests=guests, locks=locks, connections=connections
        )
        self._guests = guests
        self._locks = locks
        self._connections = connections
        self._disks = disks
        self._presence = DiskPresence(guests)
        self.connection_pass = ConnectionPass(
            store=store,
            guests=guests,
            locks=locks,
            connections=connections,
            presence=self._presence,
            boot_id=boot_id,
        )
        self._boot_id = boot_id
        self.tombstone_ttl = tombstone_ttl
        self._clock = clock
        # What the last pass that found every attachment settled looked at
        # (``run``): the store's write count, the domains' names, their aliases.
        self._all_settled: _SettledInputs | None = None

    def run(self) -> ReconcileReport:
        actions: list[ReconcileAction] = []
        for connection in self._store.list_connections():
            if connection.from_earlier_boot(self._boot_id):
                actions += self.connection_pass.after_reboot(connection)
        # One read of every domain for the pass: an attachment it shows settled
        # costs nothing more; any other is looked at again, fresh, under its lock.
        snapshot = self._connections.scan.snapshot()
        acted = bool(actions)
        writes, records = self._store.attachment_summaries()
        # Whether each record is settled depends on the rows and on the
        # snapshot's names and disk aliases only: when none of them changed
        # since a pass that found every record settled, neither did the answer.
        inputs = (writes, _names(snapshot), snapshot.aliases)
        if inputs != self._all_settled:
            unsettled = [r for r in records if not _settled(r, snapshot)]
            self._all_settled = None if unsettled else inputs
            for record in unsettled:
                found = self.attachment(record.attachment_id)
                acted = acted or bool(found)
                actions += found
        for connection in self._store.list_connections():
            actions += self.connection_pass.connection(connection.connection_key)
        if acted:  # what the pass did may have changed the disks and records it read
            snapshot = self._connections.scan.snapshot()
            _, records = self._store.attachment_summaries()
        ours = {(a.domain_uuid, a.alias): a.connection_key for a in records}
        actions += self.connection_pass.foreign_disks(snapshot.disks, ours)
        purged = self._store.purge_tombstones(self._clock() - self.tombstone_ttl)
        if purged:
            actions.append(
                ReconcileAction(
                    action="purged_tombstones",
                    subject="tombstones",
                    detail=f"{purged} tombstones older than {self.tombstone_ttl:g}s",
                )
            )
        for a in actions:
            LOG.info("reconcile: %s %s: %s", a.action, a.subject, a.detail)
        if not actions:
            LOG.debug("reconcile: records, domains and devices agree")
        return ReconcileReport(actions=actions)

    def attachment(self, attachment_id: str) -> list[ReconcileAction]:
        """Finish, roll back or release one attachment against its domain now."""
        with (
            logctx.request_context(attachment_id=attachment_id),
            self._locks.attachment(attachment_id),
        ):
            record = self._store.get_attachment(attachment_id)
            if record is None:
                return []
            logctx.note(volume_id=record.volume_id)
            if record.state is AttachmentState.INCOMING:
                try:
                    return self._migrations.settle(record, self._clock())
                except HostagentError as exc:
                    return [_act("failed", record, exc.message)]
            domain = self._guests.find(record.domain_uuid)
            try:
                if domain is None:
                    return self._release_vanished(record)
                renamed = self._refresh_name(record, domain)
                in_live, in_config = self._presence.of(domain, record.alias)
                present = in_live or in_config
                if record.state is AttachmentState.ATTACHING:
                    if present and record.disk_xml:
                        self._disks.finish_interrupted(record, domain)
                        self._store.set_attachment_state(
                            record.attachment_id, AttachmentState.ATTACHED
                        )
                        return [_act("finished_attach", record, f"disk is on {domain.name}")]
                    # The attach died before its disk reached the domain.
                    self._connections.forget(record, may_disconnect=True)
                    return [_act("rolled_back", record, "interrupted attach left no disk")]
                if record.state is AttachmentState.DETACHING:
                    if present:
                        return [
                            _act(
                                "detach_pending",
                                record,
                                f"{domain.name} still holds {record.alias}",
                            )
                        ]
                    result = self._connections.release(record)
                    return [
                        _act(
                            "finished_detach",
                            record,
                            f"terminate_connection={result.terminate_connection}",
                        )
                    ]
                if not present:
                    return [
                        *renamed,
                        _act(
                            "missing_disk",
                            record,
                            f"{domain.name} no longer has {record.alias}; "
                            "DELETE the attachment to release it",
                        ),
                    ]
            except HostagentError as exc:
                return [_act("failed", record, exc.message)]
        return renamed

    def _release_vanished(self, record: AttachmentRecord) -> list[ReconcileAction]:
        """Release a record whose domain was not found, unless a domain with its
        UUID exists again when the record is about to be dropped (undefined and
        defined again: it keeps its attachment; a rename is no vanishing)."""
        try:
            result = self._connections.release(
                record, domain_back=lambda: self._guests.find(record.domain_uuid) is not None
            )
        except DomainBack:
            return [
                _act(
                    "domain_back",
                    record,
                    f"domain {record.domain_uuid} exists again; the attachment stays",
                )
            ]
        return [
            _act(
                "released",
                record,
                f"domain {record.domain_name} no longer "
                f"exists; terminate_connection={result.terminate_connection}",
            )
        ]

    def _refresh_name(self, record: AttachmentRecord, domain: DomainInfo) -> list[ReconcileAction]:
        """Keep the recorded name of the domain current (``virsh domrename``)."""
        if domain.name == record.domain_name:
            return []
        self._store.rename_domain(domain.uuid, domain.name)
        return [
            _act("domain_renamed", record, f"domain {record.domain_name} is now {domain.name}")
        ]

    def domain_defined(self, domain_uuid: str) -> list[ReconcileAction]:
        """A domain was defined (new, changed, renamed, or defined again after an
        undefine): record its current name, and say at once if it holds a disk
        made by this agent that no record of ours has."""
        domain = self._guests.find(domain_uuid)
        if domain is None:
            return []
        actions: list[ReconcileAction] = []
        # One UPDATE by UUID to the name libvirt has now: no lock needed, the
        # last handler writes the latest name.
        for record in self._store.list_attachments(domain_uuid=domain_uuid):
            actions += self._refresh_name(record, domain)
        ours = {r.alias for r in self._store.list_attachments(domain_uuid=domain_uuid)}
        for alias, where in sorted(self._agent_disks(domain)):
            if alias in ours:
                continue
            detail = unrecorded_disk_detail(self._store, domain, alias, where)
            LOG.warning("%s", detail)
            actions.append(
                ReconcileAction(action="unrecorded_disk", subject=domain.name, detail=detail)
            )
        return actions

    def _agent_disks(self, domain: DomainInfo) -> set[tuple[str, str]]:
        """(alias, live|config) of every disk with a ``ua-`` alias the domain holds."""
        views = []
        try:
            if domain.active:
                views.append(("live", self._guests.domain_xml(domain.uuid)))
            if domain.persistent:
                views.append(("config", self._guests.domain_xml(domain.uuid, inactive=True)))
        except DomainNotFound:
            return set()
        return {
            (disk.alias, where)
            for where, xml in views
            for disk in parse_disk_refs(xml).disks
            if disk.alias and disk.alias.startswith(USER_ALIAS_PREFIX)
        }

    def domain_gone(self, domain_uuid: str) -> list[ReconcileAction]:
        """Release the attachments of a domain libvirt no longer has (none if it
        is there, a persistent domain that only stopped)."""
        records = self._store.list_attachments(domain_uuid=domain_uuid)
        if not records or self._guests.find(domain_uuid) is not None:
            return []
        actions = []
        for record in records:
            actions += self.attachment(record.attachment_id)
        return actions


_SettledInputs = tuple[int, dict[str, str], frozenset[tuple[str, str]]]


def _names(snapshot: DomainSnapshot) -> dict[str, str]:
    return {uuid: domain.name for uuid, domain in snapshot.by_uuid.items()}


def _settled(record: AttachmentSummary, snapshot: DomainSnapshot) -> bool:
    """Whether the pass's read shows the attachment as it should be: attached,
    its domain there under the recorded name, holding its disk."""
    domain = snapshot.by_uuid.get(record.domain_uuid)
    return (
        record.state is AttachmentState.ATTACHED
        and domain is not None
        and domain.name == record.domain_name
        and (record.domain_uuid, record.alias) in snapshot.aliases
    )
