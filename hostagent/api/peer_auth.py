"""Who may call: the peer of each unix-socket connection, by SO_PEERCRED.

uid 0 always passes; so does a peer whose uid is in ``allowed_uids`` or whose
primary or supplementary group is in ``allowed_gids``. Anyone else gets
``403 forbidden`` and a log line naming the pid, uid and gid.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Collection
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from hostagent.api.middlewares import Handler
from hostagent.errors import Forbidden

LOG = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a unix socket."""

    pid: int
    uid: int
    gid: int

    def groups(self) -> frozenset[int]:
        """Supplementary groups, read from /proc only when a check needs them."""
        return _supplementary_groups(self.pid)


def _supplementary_groups(pid: int) -> frozenset[int]:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except OSError:  # the peer is gone, or /proc hides it: only SO_PEERCRED counts
        pass
    return frozenset()


def peer_of(sock: socket.socket) -> Peer | None:
    """The peer's credentials, or None for anything but a unix stream socket."""
    if sock.family != socket.AF_UNIX:
        return None
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return Peer(pid, uid, gid)


@dataclass(frozen=True)
class PeerPolicy:
    """The allow-list: root, plus these uids and gids."""

    allowed_uids: frozenset[int] = frozenset()
    allowed_gids: frozenset[int] = frozenset()

    @classmethod
    def of(cls, uids: Collection[int], gids: Collection[int]) -> PeerPolicy:
        return cls(frozenset(uids), frozenset(gids))

    def allows(self, peer: Peer) -> bool:
        return (
            peer.uid == 0
            or peer.uid in self.allowed_uids
            or peer.gid in self.allowed_gids
            or bool(self.allowed_gids and peer.groups() & self.allowed_gids)
        )


def peer_auth_middleware(policy: PeerPolicy) -> Middleware:
    """aiohttp middleware refusing peers the policy does not allow."""

    @web.middleware
    async def check_peer(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        peer = peer_of(sock) if sock is not None else None
        if peer is None or not policy.allows(peer):
            who = (
                "unknown peer"
                if peer is None
                else (f"pid {peer.pid} uid {peer.uid} gid {peer.gid}")
            )
            LOG.warning(
                "refused %s %s from %s: not root and not allowed by allowed_uids/allowed_gids",
                request.method,
                request.path,
                who,
            )
            raise Forbidden(
                f"{who} may not use hostagentd (allowed: root, "
                f"uids {sorted(policy.allowed_uids)}, "
                f"gids {sorted(policy.allowed_gids)})"
            )
        return await handler(request)

    return check_peer
