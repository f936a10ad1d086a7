"""sd_notify over ``$NOTIFY_SOCKET``: a no-op when systemd did not start us."""

from __future__ import annotations

import os
import socket


def notify(*assignments: str) -> bool:
    """Send ``READY=1``-style lines to systemd; returns whether anything was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall("\n".join(assignments).encode())
    return True
