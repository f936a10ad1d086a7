"""Online extend: the host sees the grown volume once, then every running guest.

Under the connection's lock the connector refreshes the host's view of the
volume (os-brick's ``extend_volume``) once per host connection; then each
running guest with an attachment of that connection gets its disk resized,
by alias, to exactly the size the host sees (QEMU refuses to grow a disk past
its device, so the host goes first). Nothing is recorded: a repeat after a
crash refreshes again (harmless) and resizes the guests not yet at size.

Concurrent calls for attachments of one connection wait for the lock; one
that finds a refresh finished after it arrived uses that refresh's size
instead of refreshing again: a caller grows the storage before it calls, so
calls in flight together are for the same growth (a ``new_size`` the size
does not reach still refreshes again).
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass

from hostagent import connectors, failpoints
from hostagent.api.models import ExtendedGuest, ExtendResult
from hostagent.attachments.host_connections import HostConnections
from hostagent.connectors import ConnectorError, InvalidTarget
from hostagent.errors import (
    AttachmentNotFound,
    DeviceNotExtended,
    DomainNotFound,
    ExtendFailed,
    HostagentError,
    InvalidRequest,
    LibvirtError,
)
from hostagent.guests.domains import Guests
from hostagent.host.device_users import target_of
from hostagent.locks import HostLocks
from hostagent.state.store import AttachmentRecord, AttachmentState, ConnectionState, Store

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Refresh:
    """One host refresh of a connection: when it finished (in the order calls
    arrive) and the size it found."""

    finished: int
    size: int


@dataclass(frozen=True)
class _GuestDisk:
    record: AttachmentRecord
    size: int


class VolumeExtender:
    """``POST /v1/attachments/{id}/extend``: refresh the host once, resize every guest."""

    def __init__(
        self,
        *,
        store: Store,
        guests: Guests,
        registry: connectors.ConnectorRegistry,
        locks: HostLocks,
        connections: HostConnections,
    ) -> None:
        self.store = store
        self.guests = guests
        self.registry = registry
        self.locks = locks
        self.connections = connections
        self._ticket = itertools.count(1)
        self._mutex = threading.Lock()
        self._refreshed: dict[str, _Refresh] = {}

    def extend(self, attachment_id: str, new_size: int | None) -> ExtendResult:
        record = self.store.get_attachment(attachment_id)
        if record is None:
            raise AttachmentNotFound(f"no attachment {attachment_id}")
        key = record.connection_key
        with self._mutex:
            arrived = next(self._ticket)
        with self.connections.exclusive(key):
            disks = self._running_disks(key)
            now = max((disk.size for disk in disks), default=0)
            if new_size is not None and new_size < now:
                raise InvalidRequest(
                    f"new_size {new_size} is smaller than the disk's size {now}: "
                    "a volume cannot shrink"
                )
            device_size = self._refresh(key, new_size, arrived)
            if new_size is not None and device_size < new_size:
                raise DeviceNotExtended(
                    f"the host sees {key} at {device_size} bytes, less than new_size "
                    f"{new_size}: extend the volume on the storage first; nothing was changed"
                )
            failpoints.hit("extend.after_host_refresh")
            size = new_size if new_size is not None else device_size
            guests = self._resize_guests(disks, size)
        LOG.info(
            "attachment %s: %s extended to %d bytes; resized in %s",
            attachment_id,
            key,
            size,
            ", ".join(g.domain_name for g in guests if g.resized) or "no guest (all at size)",
        )
        return ExtendResult(connection_key=key, device_size=device_size, guests=guests)

    def _refresh(self, key: str, new_size: int | None, arrived: int) -> int:
        """The size the host sees, refreshed by the connector unless a refresh
        that finished while this call waited found enough already."""
        with self._mutex:
            done = self._refreshed.get(key)
        fresh = done is not None and done.finished > arrived
        if done is not None and fresh and (new_size is None or done.size >= new_size):
            return done.size
        connection = self.store.get_connection(key)
        if connection is None or connection.state is not ConnectionState.CONNECTED:
            raise ExtendFailed(f"{key} is not connected; nothing was changed")
        target, device = target_of(connection)
        try:
            size = self.registry.get(connection.driver_volume_type).extend(
                target, device, new_size
            )
        except InvalidTarget as exc:
            raise InvalidRequest(str(exc)) from None
        except ConnectorError as exc:
            raise ExtendFailed(
                f"refreshing {key} on the host failed: {exc}; no guest was resized"
            ) from None
        with self._mutex:
            self._refreshed[key] = _Refresh(next(self._ticket), size)
        return size

    def _running_disks(self, key: str) -> list[_GuestDisk]:
        """Each attached disk of the connection in a running guest, with its size there."""
        disks = []
        for record in self.store.list_attachments(connection_key=key):
            if record.state is not AttachmentState.ATTACHED:
                continue
            domain = self.guests.find(record.domain_uuid)
            if domain is None or not domain.active:
                continue  # a guest that starts later opens the device at its new size
            try:
                size = self.guests.disk_size(domain.uuid, record.alias)
            except DomainNotFound:
                continue
            except LibvirtError as exc:
                if self._running(record):
                    raise
                LOG.debug("%s stopped while read: %s", record.domain_name, exc.message)
                continue
            if size is not None:
                disks.append(_GuestDisk(record, size))
        return disks

    def _running(self, record: AttachmentRecord) -> bool:
        domain = self.guests.find(record.domain_uuid)
        return domain is not None and domain.active

    def _resize_guests(self, disks: list[_GuestDisk], size: int) -> list[ExtendedGuest]:
        done: list[ExtendedGuest] = []
        for disk in disks:
            record = disk.record
            resized = disk.size < size
            if resized:
                try:
                    with self.locks.domain(record.domain_uuid):
                        self.guests.block_resize(record.domain_uuid, record.alias, size)
                except HostagentError as exc:
                    if isinstance(exc, DomainNotFound) or not self._running(record):
                        continue  # stopped meanwhile: it opens the device at its new size
                    before = [g.domain_name for g in done if g.resized]
                    raise ExtendFailed(
                        f"resizing {record.alias} in {record.domain_name} to {size} bytes "
                        f"failed: {exc.message}; resized before it: "
                        f"{', '.join(before) or 'none'}; repeat the call to finish"
                    ) from None
            done.append(
                ExtendedGuest(
                    attachment_id=record.attachment_id,
                    domain_name=record.domain_name,
                    size=max(size, disk.size),
                    resized=resized,
                )
            )
        return done
