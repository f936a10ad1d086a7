"""Named crash points for fault tests, enabled only by an environment variable.

``HOSTAGENT_FAILPOINTS=attach.after_libvirt`` (comma-separated names) makes
the daemon SIGKILL itself when it reaches that point, so a test can crash it
at an exact step of attach or detach and check what a restart makes of it.
``name:N`` kills on the N-th time the point is reached (earlier passes go
through). Unset (production), ``hit()`` is a lookup in an empty dict.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

LOG = logging.getLogger(__name__)

ENV = "HOSTAGENT_FAILPOINTS"

# Every point, in the order of DESIGN.md's steps.
POINTS = (
    "attach.after_intent",  # attachment (and connection) intent recorded
    "attach.after_connect",  # os-brick connected, not yet recorded
    "attach.after_placement",  # target dev and disk XML recorded, libvirt not asked
    "attach.after_libvirt",  # libvirt attached the disk, not yet recorded
    "detach.after_intent",  # attachment recorded detaching, libvirt not asked
    "detach.after_request",  # libvirt asked to detach, removal not confirmed
    "detach.after_removal",  # removal confirmed, not yet recorded
    "detach.after_mark_disconnecting",  # connection recorded disconnecting
    "detach.after_disconnect",  # os-brick disconnected, not yet recorded
    "extend.after_host_refresh",  # the host sees the new size, no guest resized yet
    # live migration (an incoming PUT passes attach.after_intent/after_connect first)
    "incoming.after_connect",  # incoming recorded and connected, its disk XML not yet
    "arrival.before_record",  # the domain runs here with the disk, not yet recorded attached
    "incoming.release_after_intent",  # an incoming recorded detaching, not yet released
)


def _parse(spec: str) -> dict[str, int]:
    enabled = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, nth = item.partition(":")
        if name not in POINTS or (nth and not nth.isdigit()):
            raise SystemExit(f"{ENV}: bad failpoint {item!r}; known: {', '.join(POINTS)}")
        enabled[name] = int(nth or 1)
    return enabled


_ENABLED = _parse(os.environ.get(ENV, ""))
_PASSES: dict[str, int] = {}
_MUTEX = threading.Lock()


def hit(name: str) -> None:
    """SIGKILL this process on the enabled pass of ``name``; otherwise nothing."""
    if name not in _ENABLED:
        return
    with _MUTEX:
        _PASSES[name] = _PASSES.get(name, 0) + 1
        if _PASSES[name] != _ENABLED[name]:
            return
    LOG.warning("failpoint %s: killing hostagentd", name)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
