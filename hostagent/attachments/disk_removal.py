"""Take an attachment's disk off its domain, and be sure it is off.

Detach, an attach's rollback and the release of a domain defined again all
end here. The steps, and why each one stays:

1. The domain is looked up once; gone means its disk went with it.
2. The first request is optimistic: live if it runs, config if persistent.
   A refusal sends us to the XML to see where the disk really is, and we ask
   again for the right places.
3. The ``DEVICE_REMOVED`` waiter is registered before each request, so the
   event cannot come before we listen.
4. The live XML is read again to confirm, even after the event: see
   ``DiskRemoval.remove``. The request is repeated every retry interval until
   the timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from hostagent import failpoints
from hostagent.errors import DetachTimeout, DomainNotFound, LibvirtError
from hostagent.guests.disk_presence import DiskPresence
from hostagent.guests.domains import Guests
from hostagent.locks import HostLocks
from hostagent.state.store import AttachmentRecord, AttachmentState

LOG = logging.getLogger(__name__)


class DiskRemoval:
    """Removes a disk by its alias and waits until libvirt confirms it is gone."""

    def __init__(
        self,
        *,
        guests: Guests,
        locks: HostLocks,
        presence: DiskPresence,
        retry_interval: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._guests = guests
        self._locks = locks
        self._presence = presence
        self._retry_interval = retry_interval
        self._monotonic = monotonic

    def remove(self, record: AttachmentRecord, *, timeout: float) -> bool:
        """Detach ``record``'s disk from its domain; True if the domain was not
        found (its disk went with it, unless it is defined again).

        Raises ``DetachTimeout`` when the guest keeps the disk past ``timeout``,
        and libvirt's refusal of a request that named the right places.
        """
        deadline = self._monotonic() + timeout
        domain = self._guests.find(record.domain_uuid)
        if domain is None:
            return True
        presence = (domain.active, domain.persistent)
        # A live unplug libvirt took may still be pending: one this call asks
        # for, or (a retried DELETE) the one an earlier call asked for. QEMU
        # refuses to repeat a pending unplug; that refusal is no answer.
        unplugging = record.state is AttachmentState.DETACHING
        while presence != (False, False):
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                raise DetachTimeout(
                    f"guest {record.domain_name} did not release {record.alias} within "
                    f"{timeout:g}s; the attachment stays detaching and the host connection "
                    "stays; retry the DELETE"
                )
            live, config = presence
            with self._guests.removals.expect(record.domain_uuid, record.alias) as pending:
                try:
                    with self._locks.domain(record.domain_uuid):
                        self._guests.detach_alias(
                            record.domain_uuid, record.alias, live=live, config=config
                        )
                    failpoints.hit("detach.after_request")
                except DomainNotFound:
                    return True
                except LibvirtError as exc:
                    actual = self._presence.find(record.domain_uuid, record.alias)
                    if actual is None or actual != presence:
                        presence = actual or (False, False)
                        continue  # we asked for the wrong places: ask again right
                    if not (live and unplugging):
                        raise  # a refusal of a right request is libvirt's answer
                    # A repeated unplug may be refused while the first is pending.
                    LOG.debug(
                        "attachment %s: repeated detach refused: %s",
                        record.attachment_id,
                        exc.message,
                    )
                if live:
                    unplugging = True
                    pending.event.wait(min(self._retry_interval, remaining))
            # The config part is done once libvirt accepted it; confirm the live
            # part. Read even after a config-only request: a guest started since
            # the lookup may have booted with the disk (an inactive domain's
            # XML is its config, where the disk is gone by now). Read even after
            # DEVICE_REMOVED: the read waits for the domain, which libvirt holds
            # until it has saved the removal in its status file; answering at
            # the event, a libvirtd killed in that moment reloads the disk
            # (tests/faults/test_libvirtd_restart.py caught it 2 times in 18).
            presence = (self._in_live_xml(record), False)
        return False

    def _in_live_xml(self, record: AttachmentRecord) -> bool:
        return self._presence.in_live_xml(record.domain_uuid, record.alias)
