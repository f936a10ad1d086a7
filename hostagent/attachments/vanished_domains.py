"""Libvirt's lifecycle events, acted on at once: a domain gone releases its
attachments, a domain defined is looked at (renamed, defined again with our
disks). Reconcile (``hostagent.attachments.reconcile``) decides; this runs it
off libvirt's event loop, one event after the other."""

from __future__ import annotations

import logging
import queue
import threading

from hostagent.api.models import ReconcileAction
from hostagent.attachments.reconcile import Reconciler
from hostagent.errors import HostagentError

LOG = logging.getLogger(__name__)


class VanishedDomains:
    """Releases the attachments of a domain as soon as libvirt reports it gone,
    and looks at a domain as soon as libvirt reports it defined.

    Fed by lifecycle events (a transient domain destroyed, a persistent one
    undefined; any define, renames included); works on its own thread, never
    on libvirt's event loop, one event after the other: the look at a domain
    defined again comes after the release its undefine started. The periodic
    reconcile is the safety net for events missed while libvirtd was
    unreachable.
    """

    def __init__(self, reconciler: Reconciler) -> None:
        self._reconciler = reconciler
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="vanished-domains", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join()

    def notify(self, domain_uuid: str, event: int, detail: int) -> None:
        self._queue.put(("gone", domain_uuid))

    def defined(self, domain_uuid: str) -> None:
        self._queue.put(("defined", domain_uuid))

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            what, domain_uuid = item
            try:
                if what == "defined":
                    self.look_at_defined(domain_uuid)
                else:
                    self.release_if_gone(domain_uuid)
            except HostagentError as exc:
                LOG.warning(
                    "domain %s: %s failed: %s; the periodic reconcile will retry",
                    domain_uuid,
                    "the look after its define"
                    if what == "defined"
                    else "release after it vanished",
                    exc.message,
                )
            except Exception:
                LOG.exception("domain %s: handling of its lifecycle event failed", domain_uuid)

    def release_if_gone(self, domain_uuid: str) -> list[ReconcileAction]:
        actions = self._reconciler.domain_gone(domain_uuid)
        for action in actions:
            LOG.info(
                "domain %s gone: %s %s: %s",
                domain_uuid,
                action.action,
                action.subject,
                action.detail,
            )
        return actions

    def look_at_defined(self, domain_uuid: str) -> list[ReconcileAction]:
        actions = self._reconciler.domain_defined(domain_uuid)
        for action in actions:
            if action.action != "unrecorded_disk":  # logged as a warning already
                LOG.info(
                    "domain %s defined: %s %s: %s",
                    domain_uuid,
                    action.action,
                    action.subject,
                    action.detail,
                )
        return actions
