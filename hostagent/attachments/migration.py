"""Live migration hand-off (API.md v1.1, DESIGN.md "Live migration").

The destination connects before QEMU starts there, so its attachment exists
first as ``incoming``: counted in the refcount, nothing in libvirt. It turns
``attached`` when the domain runs here with the disk's alias (a lifecycle
event, reconcile, or ``confirm``), and is released like any attachment if
the migration fails (DELETE) or never comes (reconcile, after
``incoming_migration_timeout``). The source's release after the move is an
ordinary detach whose unplug already happened; while a migration job runs it
is refused (``domain_migrating``).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import uuid

from hostagent import failpoints
from hostagent.api.models import Attachment, AttachRequest, DetachResult, ReconcileAction
from hostagent.api.views import attachment_view
from hostagent.attachments.attach_id import repeated_attach
from hostagent.attachments.host_connections import HostConnections
from hostagent.attachments.render import disk_source
from hostagent.connectors import Connector, HostDevice, Target
from hostagent.errors import (
    AttachmentNotFound,
    DomainExists,
    DomainMigrating,
    HostagentError,
    InvalidRequest,
    LibvirtUnavailable,
    MigrationNotFinished,
)
from hostagent.guests.domains import Guests
from hostagent.libvirt_xml.disk import DriveAddress, disk_fragment, parse_domain
from hostagent.libvirt_xml.placement import first_free_target_dev
from hostagent.libvirt_xml.policy import DiskRequest, build_disk
from hostagent.locks import HostLocks
from hostagent.observability import logctx
from hostagent.state.store import AttachmentRecord, AttachmentState, ConnectionState, Store

LOG = logging.getLogger(__name__)

DEFAULT_INCOMING_TIMEOUT = 3600.0


def domain_uuid_of(domain: str) -> str:
    """The canonical UUID an incoming attachment names (a name does not survive
    a migration to another host's records: 400)."""
    try:
        return str(uuid.UUID(domain))
    except ValueError:
        raise InvalidRequest(
            f"domain {domain[:80]!r}: an incoming_migration attachment names its domain by UUID"
        ) from None


class Migrations:
    """Incoming attachments on the destination, and the checks of a source's release."""

    def __init__(
        self,
        *,
        store: Store,
        guests: Guests,
        locks: HostLocks,
        connections: HostConnections,
        incoming_timeout: float = DEFAULT_INCOMING_TIMEOUT,
    ) -> None:
        self.store = store
        self.guests = guests
        self.locks = locks
        self.connections = connections
        self.incoming_timeout = incoming_timeout

    # destination, before the migration

    def prepare(
        self,
        attachment_id: str,
        request: AttachRequest,
        connector: Connector,
        target: Target,
        digest: str,
    ) -> tuple[Attachment, bool]:
        """Connect (or join the connection), record ``incoming``, answer the disk
        the domain must arrive with; nothing asked of libvirt about the domain."""
        assert request.incoming_migration is not None
        domain_uuid = domain_uuid_of(request.domain)
        with self.locks.attachment(attachment_id):
            existing = repeated_attach(self.store, attachment_id, digest)
            if existing is not None:
                if existing.state is AttachmentState.ATTACHED:
                    return attachment_view(self.store, existing), False
                LOG.info("attachment %s: resuming an interrupted incoming attach", attachment_id)
                record = existing
            else:
                domain = self.guests.find(domain_uuid)
                if domain is not None and domain.active and not self.guests.migrating(domain_uuid):
                    raise DomainExists(
                        f"domain {domain.name} ({domain_uuid}) runs on this host and is not "
                        "arriving by migration"
                    )
                record = self._incoming_record(attachment_id, request, domain_uuid, target, digest)
            self.connections.join(record, connector, target, new=existing is None)
            failpoints.hit("incoming.after_connect")
            self.store.set_incoming_disk(attachment_id, self._disk_xml(record, request, target))
            LOG.info(
                "attachment %s: volume %s ready for %s arriving by migration as %s "
                "(%s, refcount %d)",
                attachment_id,
                record.volume_id,
                domain_uuid,
                record.alias,
                target.connection_key,
                self.store.refcount(target.connection_key),
            )
            prepared = self.store.get_attachment(attachment_id)
            assert prepared is not None
            return attachment_view(self.store, prepared), existing is None

    @staticmethod
    def _incoming_record(
        attachment_id: str,
        request: AttachRequest,
        domain_uuid: str,
        target: Target,
        digest: str,
    ) -> AttachmentRecord:
        assert request.incoming_migration is not None
        now = time.time()
        return AttachmentRecord(
            attachment_id=attachment_id,
            volume_id=request.volume_id,
            domain_uuid=domain_uuid,
            domain_name=domain_uuid,  # its name is known once it is here
            connection_key=target.connection_key,
            state=AttachmentState.INCOMING,
            multiattach=request.multiattach,
            mode=request.mode,
            bus=request.bus,
            serial=request.serial or request.volume_id,
            alias=request.incoming_migration.alias,
            request_hash=digest,
            created_at=now,
            updated_at=now,
        )

    def _disk_xml(self, record: AttachmentRecord, request: AttachRequest, target: Target) -> str:
        """The disk as the arriving domain must have it here: the source's alias,
        this host's source. Target and address are the source domain's: the
        caller takes only the ``<source>`` into its destination XML."""
        connection = self.store.get_connection(record.connection_key)
        assert connection is not None and connection.state is ConnectionState.CONNECTED
        device = HostDevice(path=connection.device_path, device_info=connection.device_info or {})
        dev = request.target_dev or first_free_target_dev(record.bus, ())
        spec = build_disk(
            DiskRequest(
                attachment_id=record.attachment_id,
                serial=record.serial,
                source=disk_source(target, device),
                disk_format=target.disk_format,
                multiattach=record.multiattach,
                mode=record.mode,
                bus=record.bus,
                target_dev=dev,
                address=DriveAddress(0, 0, 0, 0) if record.bus == "scsi" else None,
            )
        )
        return dataclasses.replace(spec, alias=record.alias, address=None).to_xml()

    # destination, after the migration

    def confirm(self, attachment_id: str) -> Attachment:
        """``incoming`` to ``attached`` now if the domain runs here with the disk."""
        with self.locks.attachment(attachment_id):
            record = self.store.get_attachment(attachment_id)
            if record is None:
                raise AttachmentNotFound(f"no attachment {attachment_id}")
            if record.state is AttachmentState.INCOMING and not self._arrive(record):
                raise MigrationNotFinished(
                    f"domain {record.domain_uuid} does not run on this host with "
                    f"{record.alias} yet"
                )
            if record.state not in (AttachmentState.INCOMING, AttachmentState.ATTACHED):
                raise MigrationNotFinished(
                    f"attachment {attachment_id} is {record.state.value}, not incoming"
                )
            current = self.store.get_attachment(attachment_id)
            assert current is not None
            return attachment_view(self.store, current)

    def arrived(self, domain_uuid: str) -> list[str]:
        """A lifecycle event: every incoming attachment of the domain whose disk
        it now runs with becomes ``attached``; returns their ids."""
        done = []
        for listed in self.store.list_attachments(domain_uuid=domain_uuid):
            if listed.state is not AttachmentState.INCOMING:
                continue
            with (
                logctx.request_context(attachment_id=listed.attachment_id),
                self.locks.attachment(listed.attachment_id),
            ):
                record = self.store.get_attachment(listed.attachment_id)
                incoming = record is not None and record.state is AttachmentState.INCOMING
                if incoming and record is not None and self._arrive(record):
                    done.append(record.attachment_id)
        return done

    def _arrive(self, record: AttachmentRecord) -> bool:
        """Record the arrival if the domain runs here, past its migration, with
        the alias in its live XML. The caller holds the attachment's lock."""
        domain = self.guests.find(record.domain_uuid)
        if domain is None or not domain.active or self.guests.migrating(domain.uuid):
            return False
        xml = self.guests.domain_xml(domain.uuid)
        fragment = disk_fragment(xml, record.alias)
        if fragment is None:
            LOG.warning(
                "attachment %s: domain %s runs here without %s; the attachment stays "
                "incoming (DELETE it, or reconcile releases it after %gs)",
                record.attachment_id,
                domain.name,
                record.alias,
                self.incoming_timeout,
            )
            return False
        disk = parse_domain(xml).disk_by_alias(record.alias)
        failpoints.hit("arrival.before_record")
        self.store.record_arrival(
            record.attachment_id,
            domain_name=domain.name,
            target_dev=disk.target_dev if disk else None,
            disk_xml=fragment,
        )
        LOG.info(
            "attachment %s: %s arrived by migration with %s; attached",
            record.attachment_id,
            domain.name,
            record.alias,
        )
        return True

    # releases

    def check_detach(self, record: AttachmentRecord) -> None:
        """A detach waits for any migration of the domain (the source's release
        comes after the move; a destination's while the guest arrives). With
        libvirt away it cannot tell: the detach goes on, records its intent and
        answers 503 at its own first libvirt call, as every detach does."""
        try:
            migrating = self.guests.migrating(record.domain_uuid)
        except LibvirtUnavailable:
            return
        if migrating:
            raise DomainMigrating(
                f"domain {record.domain_name} is being migrated; retry the DELETE after "
                "the migration"
            )

    def release_incoming(self, record: AttachmentRecord) -> DetachResult | None:
        """DELETE of an ``incoming`` attachment: if its domain arrived meanwhile it
        is an ordinary attachment now (None: detach it); otherwise release it,
        nothing to unplug, with the last-user rule. Caller holds its lock."""
        if self._arrive(record):
            return None
        self.store.set_attachment_state(record.attachment_id, AttachmentState.DETACHING)
        failpoints.hit("incoming.release_after_intent")
        LOG.info(
            "attachment %s: releasing the incoming %s (the migration did not come)",
            record.attachment_id,
            record.alias,
        )
        return self.connections.release(record)

    def settle(self, record: AttachmentRecord, now: float) -> list[ReconcileAction]:
        """Reconcile an ``incoming`` attachment: arrived, still awaited, or abandoned
        after ``incoming_timeout``. Caller holds its lock."""
        if self._arrive(record):
            return [_act("arrived", record, f"{record.alias} runs on {record.domain_name}")]
        age = now - record.created_at
        if age < self.incoming_timeout or self.guests.migrating(record.domain_uuid):
            return []
        self.store.set_attachment_state(record.attachment_id, AttachmentState.DETACHING)
        result = self.connections.release(record)
        LOG.warning(
            "attachment %s: incoming migration of %s abandoned after %.0fs; released "
            "(terminate_connection=%s)",
            record.attachment_id,
            record.domain_uuid,
            age,
            result.terminate_connection,
        )
        return [
            _act(
                "abandoned_incoming",
                record,
                f"domain {record.domain_uuid} did not arrive within {self.incoming_timeout:g}s; "
                f"terminate_connection={result.terminate_connection}",
            )
        ]


def _act(action: str, record: AttachmentRecord, detail: str) -> ReconcileAction:
    return ReconcileAction(action=action, subject=record.attachment_id, detail=detail)


class Arrivals:
    """Turns incoming attachments ``attached`` when libvirt reports their domain
    arriving; on its own thread, never on libvirt's event loop. Reconcile is
    the safety net for events missed."""

    def __init__(self, migrations: Migrations) -> None:
        self._migrations = migrations
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="arrivals", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join()

    def notify(self, domain_uuid: str) -> None:
        self._queue.put(domain_uuid)

    def _loop(self) -> None:
        while (domain_uuid := self._queue.get()) is not None:
            try:
                self._migrations.arrived(domain_uuid)
            except HostagentError as exc:
                LOG.warning(
                    "domain %s: recording its arrival failed: %s; reconcile will retry",
                    domain_uuid,
                    exc.message,
                )
            except Exception:
                LOG.exception("domain %s: recording its arrival failed", domain_uuid)
