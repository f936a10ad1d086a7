"""AttachmentService: attach and detach orchestration, as DESIGN.md lays it out.

The only module that combines connectors, libvirt_xml, guests and the store.
Every step writes its intent to the store before it acts, so a crash at any
point leaves a record that reconcile can finish or undo. Locks (see
``hostagent.locks``) are held only around the steps that need them; a detach
waits for the guest without holding any lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from hostagent import connectors, failpoints
from hostagent.api.models import Attachment, AttachRequest, DetachResult
from hostagent.api.views import attachment_view
from hostagent.attachments.attach_id import repeated_attach
from hostagent.attachments.connection_release import DomainBack
from hostagent.attachments.disk_removal import DiskRemoval
from hostagent.attachments.guest_disks import GuestDisks, validate_disk_rules
from hostagent.attachments.host_connections import HostConnections
from hostagent.attachments.migration import (
    DEFAULT_INCOMING_TIMEOUT,
    Migrations,
    domain_uuid_of,
)
from hostagent.connectors import Connector, HostDevice, InvalidTarget, Target
from hostagent.errors import (
    AttachmentNotFound,
    DetachTimeout,
    HostagentError,
    InvalidRequest,
)
from hostagent.guests.disk_presence import DiskPresence
from hostagent.guests.domains import DomainInfo, Guests
from hostagent.libvirt_xml.policy import DiskPolicyError, user_alias
from hostagent.locks import HostLocks
from hostagent.observability import logctx
from hostagent.observability.metrics import Metrics
from hostagent.state.store import (
    AttachmentRecord,
    AttachmentState,
    ConnectionState,
    Store,
)

LOG = logging.getLogger(__name__)

# A DELETE whose domain is defined again with the disk removes it again at most
# this often before it gives up (504): someone keeps defining it back.
_REDEFINED_ROUNDS = 3


@dataclass(frozen=True)
class ServiceSettings:
    detach_timeout: float = 20.0
    detach_retry_interval: float = 5.0
    boot_id: str = ""
    disk_discard: str = "unmap"  # [DEFAULT] disk_discard
    incoming_migration_timeout: float = DEFAULT_INCOMING_TIMEOUT


def request_hash(domain_uuid: str, request: AttachRequest) -> str:
    """Identity of an attach request, for the idempotency check (same id, same request)."""
    canonical = request.model_dump(mode="json")
    canonical["domain"] = domain_uuid
    canonical["serial"] = request.serial or request.volume_id
    if canonical.get("incoming_migration") is None:
        canonical.pop("incoming_migration", None)  # the hash of a v1.0 request is unchanged
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class AttachmentService:
    """Attach/detach volumes to guests, one host connection per volume."""

    def __init__(
        self,
        *,
        store: Store,
        guests: Guests,
        registry: connectors.ConnectorRegistry,
        locks: HostLocks,
        settings: ServiceSettings,
        metrics: Metrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        connections: HostConnections | None = None,
        disks: GuestDisks | None = None,
    ) -> None:
        """``connections`` and ``disks``, when the daemon shares them with the
        reconciler, must be built on the same store, guests and locks."""
        self.store = store
        self.guests = guests
        self.registry = registry
        self.locks = locks
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.presence = DiskPresence(guests)
        self.removal = DiskRemoval(
            guests=guests,
            locks=locks,
            presence=self.presence,
            retry_interval=settings.detach_retry_interval,
            monotonic=monotonic,
        )
        self.disks = disks or GuestDisks(
            guests=guests, store=store, locks=locks, metrics=self.metrics
        )
        self.connections = connections or HostConnections(
            store=store,
            guests=guests,
            registry=registry,
            locks=locks,
            boot_id=settings.boot_id,
            metrics=self.metrics,
        )
        self.migrations = Migrations(
            store=store,
            guests=guests,
            locks=locks,
            connections=self.connections,
            incoming_timeout=settings.incoming_migration_timeout,
        )

    # attach

    def parse_target(self, request: AttachRequest) -> tuple[Connector, Target]:
        """Validate everything about the request that needs no libvirt (400s)."""
        info = request.connection_info
        if info.data.get("encrypted") is True:
            raise InvalidRequest("encrypted volumes are not supported by hostagent")
        if info.data.get("access_mode") == "ro" and request.mode == "rw":
            raise InvalidRequest("the volume is read-only (access_mode ro); request mode 'ro'")
        data = dict(info.data)
        for shared in ("shared_targets", "service_uuid"):
            if shared in info.model_fields_set:
                data.setdefault(shared, getattr(info, shared))
        try:
            connector = self.registry.get(info.driver_volume_type)
            target = connector.parse_target(data)
            validate_disk_rules(request, target)
        except (InvalidTarget, DiskPolicyError) as exc:
            raise InvalidRequest(str(exc)) from None
        return connector, target

    def attach(self, attachment_id: str, request: AttachRequest) -> tuple[Attachment, bool]:
        """Attach; returns the attachment and whether this call created it (201 vs 200)."""
        connector, target = self.parse_target(request)
        if request.incoming_migration is not None:
            digest = request_hash(domain_uuid_of(request.domain), request)
            return self.migrations.prepare(attachment_id, request, connector, target, digest)
        domain = self.guests.lookup(request.domain)
        digest = request_hash(domain.uuid, request)
        with self.locks.attachment(attachment_id):
            existing = repeated_attach(self.store, attachment_id, digest)
            if existing is not None:
                if existing.state is AttachmentState.ATTACHED:
                    return attachment_view(self.store, existing), False
                LOG.info("attachment %s: resuming an interrupted attach", attachment_id)
                record = existing
            else:
                record = self._new_record(attachment_id, request, domain, target, digest)
            made_connection = self.connections.join(
                record, connector, target, new=existing is None
            )
            try:
                record = self.disks.attach(record, request, target, self._device(record), domain)
            except HostagentError as exc:
                LOG.warning(
                    "attachment %s: attach to %s failed: %s; rolling back",
                    attachment_id,
                    domain.name,
                    exc.message,
                )
                self._roll_back(record, connector, target, made_connection)
                raise
            self.store.set_attachment_state(attachment_id, AttachmentState.ATTACHED)
            # the record as stored now: placement came back with it, the state is this one
            view = attachment_view(self.store, replace(record, state=AttachmentState.ATTACHED))
            LOG.info(
                "attachment %s: volume %s attached to %s as %s (%s, refcount %d)",
                attachment_id,
                record.volume_id,
                domain.name,
                record.target_dev,
                target.connection_key,
                view.host_refcount,
            )
            return view, True

    def _new_record(
        self,
        attachment_id: str,
        request: AttachRequest,
        domain: DomainInfo,
        target: Target,
        digest: str,
    ) -> AttachmentRecord:
        now = time.time()
        return AttachmentRecord(
            attachment_id=attachment_id,
            volume_id=request.volume_id,
            domain_uuid=domain.uuid,
            domain_name=domain.name,
            connection_key=target.connection_key,
            state=AttachmentState.ATTACHING,
            multiattach=request.multiattach,
            mode=request.mode,
            bus=request.bus,
            serial=request.serial or request.volume_id,
            alias=user_alias(attachment_id),
            request_hash=digest,
            created_at=now,
            updated_at=now,
            target_dev=request.target_dev,
        )

    def _device(self, record: AttachmentRecord) -> HostDevice:
        connection = self.store.get_connection(record.connection_key)
        assert connection is not None and connection.state is ConnectionState.CONNECTED
        return HostDevice(path=connection.device_path, device_info=connection.device_info or {})

    def _roll_back(
        self, record: AttachmentRecord, connector: Connector, target: Target, made: bool
    ) -> None:
        """Undo a failed attach: remove any half-made disk, then the record and connection."""
        try:
            self.removal.remove(record, timeout=self.settings.detach_timeout)
        except HostagentError as exc:
            # Unknown whether the disk is on the guest: the record stays
            # ``attaching``, so the connection stays, the caller's retry resumes
            # the attach, and reconcile finishes it (disk there) or rolls it
            # back (disk absent, no tombstone: the id may be used again).
            LOG.error(
                "attachment %s: rollback could not check or remove the disk (%s); it "
                "stays attaching for a retry or reconcile to settle",
                record.attachment_id,
                exc.message,
            )
            return
        try:
            self.connections.forget(record, may_disconnect=made)
        except HostagentError as exc:
            # The disk is off the guest and the record is gone; only the
            # connection this request made could not be released (a failed
            # flush, libvirt gone during the guard). It stays, with no users,
            # for reconcile to release; the caller gets the attach's own error.
            LOG.error(
                "attachment %s: rollback left %s connected (%s); reconcile will release it",
                record.attachment_id,
                record.connection_key,
                exc.message,
            )

    def detach(self, attachment_id: str) -> DetachResult:
        with self.locks.attachment(attachment_id):
            record = self.store.get_attachment(attachment_id)
            if record is not None:
                logctx.note(volume_id=record.volume_id)
            if record is None:
                tombstone = self.store.get_tombstone(attachment_id)
                if tombstone is None:
                    raise AttachmentNotFound(f"no attachment {attachment_id}")
                self._warn_if_back(attachment_id, tombstone.domain_uuid)
                return DetachResult.model_validate(tombstone.result)
            self.migrations.check_detach(record)
            if record.state is AttachmentState.INCOMING:
                released = self.migrations.release_incoming(record)
                if released is not None:
                    return released
                record = self.store.get_attachment(attachment_id) or record  # it arrived
            if record.state is not AttachmentState.DETACHING:
                self.store.set_attachment_state(attachment_id, AttachmentState.DETACHING)
                failpoints.hit("detach.after_intent")
            LOG.info(
                "attachment %s: detaching volume %s from %s",
                attachment_id,
                record.volume_id,
                record.domain_name,
            )
            with self.metrics.phase("removal_wait"):
                domain_gone = self.removal.remove(record, timeout=self.settings.detach_timeout)
            failpoints.hit("detach.after_removal")
            if domain_gone:
                return self._release_of_vanished(record)
            return self.connections.release(record)

    def _warn_if_back(self, attachment_id: str, domain_uuid: str) -> None:
        """A replayed DELETE whose disk is on its domain again (released while the
        domain was gone, then defined again with it): the answer stays the one
        given, and the log says why the disk is still there."""
        alias = user_alias(attachment_id)
        if any(r.alias == alias for r in self.store.list_attachments(domain_uuid=domain_uuid)):
            return  # recorded again (an attachment that arrived with that alias)
        try:
            presence = self.presence.find(domain_uuid, alias)
        except HostagentError:
            return  # a replay answers whatever libvirt's state
        if presence is None or not any(presence):
            return
        LOG.warning(
            "attachment %s was released when domain %s was gone; it was defined again "
            "holding %s, which the agent no longer records and will not remove: "
            "virsh detach-device-alias %s %s",
            attachment_id,
            domain_uuid,
            alias,
            domain_uuid,
            alias,
        )

    def _release_of_vanished(self, record: AttachmentRecord) -> DetachResult:
        """Release a record whose domain was not found, unless a domain with its
        UUID holds the disk again when the record is about to be dropped
        (undefined and defined again meanwhile): then remove it from there first,
        so a ``detached`` answer never leaves the disk on the domain."""
        for _ in range(_REDEFINED_ROUNDS):
            try:
                return self.connections.release(
                    record,
                    domain_back=lambda: any(
                        self.presence.find(record.domain_uuid, record.alias) or (False, False)
                    ),
                )
            except DomainBack:
                LOG.warning(
                    "attachment %s: domain %s was defined again holding %s; removing it",
                    record.attachment_id,
                    record.domain_uuid,
                    record.alias,
                )
                with self.metrics.phase("removal_wait"):
                    self.removal.remove(record, timeout=self.settings.detach_timeout)
        raise DetachTimeout(
            f"domain {record.domain_uuid} was defined again holding {record.alias} after "
            f"each of {_REDEFINED_ROUNDS} removals; the attachment stays detaching and the "
            "host connection stays; retry the DELETE"
        )
