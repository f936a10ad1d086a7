"""The address this host uses to reach a storage target, found by route lookup.

Cinder's connector ``ip`` must be the address the target sees, so ask the
kernel (like ``ip route get``) instead of guessing from host names.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError

Opener = Callable[[str | None], AbstractContextManager[Any]]
"""Opens an rtnetlink handle (``IPRoute``-like) in a named netns, or the current one."""

_MAIN_TABLE = 254
_USABLE_ROUTES = {1, 2}  # RTN_UNICAST, RTN_LOCAL
_UNUSABLE_ADDRESS = 0x40 | 0x08  # IFA_F_TENTATIVE, IFA_F_DADFAILED


class NetinfoError(RuntimeError):
    """No address could be chosen; message says why."""


def open_rtnl(netns: str | None) -> AbstractContextManager[Any]:
    """An rtnetlink handle in ``netns`` (never created here), or in the current namespace."""
    handle: AbstractContextManager[Any]
    if netns is None:
        handle = IPRoute()
        return handle
    try:
        handle = NetNS(netns, flags=0)  # the default flags would create a missing netns
    except FileNotFoundError:
        raise NetinfoError(f"network namespace {netns!r} does not exist") from None
    return handle


def _parse(value: str, what: str) -> str:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise NetinfoError(
            f"{what} {value!r} is not an IPv4 or IPv6 address (host names are not resolved)"
        ) from None
    if getattr(address, "scope_id", None):
        raise NetinfoError(f"{what} {value!r}: scoped IPv6 addresses are not supported")
    return str(address)


def _interface_address(ipr: Any, index: int | None, family: int) -> str | None:
    """The widest-scoped usable address of interface ``index`` in ``family``."""
    if index is None:
        return None
    addresses = [
        a
        for a in ipr.addr("dump", index=index, family=family)
        if not (a.get("IFA_FLAGS") or a.get("flags") or 0) & _UNUSABLE_ADDRESS
    ]
    for a in sorted(addresses, key=lambda a: a.get("scope") or 0):  # 0 is global scope
        local = a.get("IFA_LOCAL") or a.get("IFA_ADDRESS")
        if local:
            return str(local)
    return None


def _lookup(ipr: Any, dst: str, family: int) -> str:
    try:
        routes = list(ipr.route("get", dst=dst))
    except NetlinkError as exc:
        raise NetinfoError(f"no route to {dst}: {os.strerror(exc.code)}") from None
    if not routes or routes[0].get("type") not in _USABLE_ROUTES:
        raise NetinfoError(f"no route to {dst}")
    route = routes[0]
    source = route.get("RTA_PREFSRC") or _interface_address(ipr, route.get("RTA_OIF"), family)
    if not source:
        raise NetinfoError(f"the route to {dst} has no source address and its interface none")
    return str(source)


def source_address(target: str, *, netns: str | None = None, ipr: Opener = open_rtnl) -> str:
    """The source address the kernel would use to reach ``target`` (IPv4 or IPv6 literal)."""
    dst = _parse(target, "target")
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with ipr(netns) as handle:
        return _lookup(handle, dst, family)


def default_source_address(
    *, family: int = socket.AF_INET, netns: str | None = None, ipr: Opener = open_rtnl
) -> str | None:
    """The preferred source of the default route (None when there is no default route)."""
    with ipr(netns) as handle:
        routes = [
            r
            for r in handle.route("dump", family=family, table=_MAIN_TABLE, dst_len=0)
            if r.get("type") == 1 and not r.get("dst_len")
        ]
        if not routes:
            return None
        route = min(routes, key=lambda r: r.get("RTA_PRIORITY") or 0)
        if route.get("RTA_PREFSRC"):
            return str(route.get("RTA_PREFSRC"))
        hop = (route.get("RTA_MULTIPATH") or [route])[0]
        gateway, oif = hop.get("RTA_GATEWAY"), hop.get("RTA_OIF") or hop.get("oif")
        # Toward a link-local (IPv6) gateway the kernel would pick a link-local source.
        if gateway and not ipaddress.ip_address(gateway).is_link_local:
            return _lookup(handle, str(gateway), family)
        return _interface_address(handle, oif, family)


def choose_initiator_ip(
    target: str | None,
    *,
    configured: str | None,
    netns: str | None = None,
    ipr: Opener = open_rtnl,
) -> str:
    """The ``ip`` for connector properties: route lookup toward ``target`` if given,
    else the configured ``my_ip``, else the default route's source, else NetinfoError."""
    if target:
        return source_address(target, netns=netns, ipr=ipr)
    if configured:
        return _parse(configured, "configured my_ip")
    for family in (socket.AF_INET, socket.AF_INET6):
        found = default_source_address(family=family, netns=netns, ipr=ipr)
        if found:
            return found
    raise NetinfoError("no target given, no my_ip configured, and no default route to go by")
