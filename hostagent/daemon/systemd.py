"""systemd integration without libsystemd: sd_notify, socket activation, watchdog.

All of it is a no-op when systemd did not start the daemon.
"""

from __future__ import annotations

import logging
import os
import socket

LOG = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


def notify(*assignments: str) -> bool:
    """Send ``READY=1``-style lines to ``$NOTIFY_SOCKET``; returns whether they were sent.

    Best effort: a notify socket that is gone or full is logged, never raised,
    so a failed ping cannot stop the watchdog's chain or a clean shutdown."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall("\n".join(assignments).encode())
    except OSError as exc:
        LOG.warning("sd_notify to %s failed (%s): %s", address, exc, " ".join(assignments))
        return False
    return True


def inherited_socket() -> socket.socket | None:
    """The listening unix socket systemd passed (``LISTEN_FDS``), if it passed one to us.

    The variables are removed so that children never mistake them for theirs.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count < 1:
        return None
    if count > 1:
        raise RuntimeError(f"systemd passed {count} sockets; hostagentd serves exactly one")
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise RuntimeError("the socket systemd passed is not a unix stream socket")
    os.set_inheritable(sock.fileno(), False)
    return sock


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec``), or None if off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000 / 2
