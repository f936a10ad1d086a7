"""hostagent.host.netinfo on real interfaces, in throwaway network namespaces (no libvirt).

Topology of the main namespace: ``lo`` up and a veth pair (va, vb) both inside it;
va carries 192.0.2.10/24 and 198.51.100.10/24, the default route goes via
198.51.100.1 (so its source is not va's primary address), and 203.0.113.0/24 is
an ``unreachable`` route.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hostagent.host.netinfo import (
    NetinfoError,
    choose_initiator_ip,
    default_source_address,
    source_address,
)


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@contextmanager
def namespace(suffix: str) -> Iterator[str]:
    """A new netns with ``lo`` up and veth va/vb (both ends inside, up); deleted on exit."""
    if shutil.which("ip") is None:
        pytest.fail("these tests need the ip command: apt-get install -y iproute2")
    if os.geteuid() != 0:
        pytest.fail("these tests create network namespaces and must run as root")
    name = f"hatest-net-{os.getpid()}{suffix}"
    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        ip("-n", name, "link", "set", "va", "up")
        ip("-n", name, "link", "set", "vb", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    with namespace("") as name:
        ip("-n", name, "addr", "add", "192.0.2.10/24", "dev", "va")
        ip("-n", name, "addr", "add", "198.51.100.10/24", "dev", "va")
        ip("-n", name, "route", "add", "default", "via", "198.51.100.1")
        ip("-n", name, "route", "add", "unreachable", "203.0.113.0/24")
        yield name


def kernel_source(netns: str, target: str) -> str:
    """What ``ip route get`` itself reports as the source toward ``target``."""
    found: str = json.loads(ip("-j", "-n", netns, "route", "get", target))[0]["prefsrc"]
    return found


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("192.0.2.77", "192.0.2.10"),
        ("198.51.100.77", "198.51.100.10"),
        ("8.8.8.8", "198.51.100.10"),  # via the default route's gateway
        ("192.0.2.10", "192.0.2.10"),  # a local address is its own source
    ],
)
def test_source_address_follows_the_route(netns: str, target: str, expected: str) -> None:
    assert source_address(target, netns=netns) == expected
    assert kernel_source(netns, target) == expected


def test_default_source_address(netns: str) -> None:
    assert default_source_address(netns=netns) == "198.51.100.10"


def test_choose_initiator_ip_precedence(netns: str) -> None:
    assert choose_initiator_ip("192.0.2.77", configured="10.9.9.9", netns=netns) == "192.0.2.10"
    assert choose_initiator_ip(None, configured="10.9.9.9", netns=netns) == "10.9.9.9"
    assert choose_initiator_ip(None, configured=None, netns=netns) == "198.51.100.10"
    assert choose_initiator_ip("", configured="", netns=netns) == "198.51.100.10"


def test_unreachable_target(netns: str) -> None:
    with pytest.raises(NetinfoError, match=r"no route to 203\.0\.113\.5: No route to host"):
        source_address("203.0.113.5", netns=netns)
    with pytest.raises(NetinfoError, match=r"no route to 203\.0\.113\.5"):
        choose_initiator_ip("203.0.113.5", configured="10.9.9.9", netns=netns)


@pytest.mark.parametrize("target", ["storage.example", "192.0.2", "192.0.2.77/24", " "])
def test_non_ip_target_is_refused(netns: str, target: str) -> None:
    with pytest.raises(NetinfoError, match="is not an IPv4 or IPv6 address"):
        source_address(target, netns=netns)
    with pytest.raises(NetinfoError, match="host names are not resolved"):
        choose_initiator_ip(target, configured="10.9.9.9", netns=netns)


def test_bad_configured_ip_is_refused(netns: str) -> None:
    with pytest.raises(NetinfoError, match=r"configured my_ip 'storage\.example' is not"):
        choose_initiator_ip(None, configured="storage.example", netns=netns)


def test_missing_netns_is_an_error_and_not_created() -> None:
    name = f"hatest-net-{os.getpid()}-missing"
    with pytest.raises(NetinfoError, match="does not exist"):
        source_address("192.0.2.77", netns=name)
    assert not Path("/run/netns", name).exists()


def _open_fds() -> set[tuple[str, str]]:
    """Each open fd with what it points at: a socket's inode is unique, so a
    handle left open shows up as a new pair even if its fd number was freed
    (by the garbage collector, say) and reused while the loop ran."""
    pairs = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            pairs.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except FileNotFoundError:  # the fd listdir itself used
            continue
    return pairs


def test_handles_are_closed(netns: str) -> None:
    choose_initiator_ip(None, configured=None, netns=netns)  # warm up lazy imports
    gc.collect()
    before = _open_fds()
    for _ in range(20):
        source_address("192.0.2.77", netns=netns)
        choose_initiator_ip(None, configured=None, netns=netns)
        with pytest.raises(NetinfoError):
            source_address("203.0.113.5", netns=netns)
    assert _open_fds() - before == set()


def test_without_default_route() -> None:
    with namespace("-bare") as name:
        ip("-n", name, "addr", "add", "192.0.2.10/24", "dev", "va")
        assert default_source_address(netns=name) is None
        assert default_source_address(family=socket.AF_INET6, netns=name) is None
        with pytest.raises(NetinfoError, match=r"no route to 8\.8\.8\.8: Network is unreachable"):
            source_address("8.8.8.8", netns=name)
        assert choose_initiator_ip(None, configured="10.9.9.9", netns=name) == "10.9.9.9"
        with pytest.raises(NetinfoError, match="no my_ip configured, and no default route"):
            choose_initiator_ip(None, configured=None, netns=name)


def test_ipv6() -> None:
    if not Path("/proc/sys/net/ipv6").exists():
        pytest.skip("IPv6 is disabled in this kernel (no /proc/sys/net/ipv6)")
    with namespace("-v6") as name:
        try:
            ip("-n", name, "-6", "addr", "add", "2001:db8:a::10/64", "dev", "va", "nodad")
            ip("-n", name, "-6", "addr", "add", "2001:db8:b::10/64", "dev", "va", "nodad")
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"the kernel refuses IPv6 addresses in a netns: {exc.stderr.strip()}")
        ip("-n", name, "-6", "route", "add", "unreachable", "2001:db8:dead::/48")
        assert default_source_address(family=socket.AF_INET6, netns=name) is None

        assert source_address("2001:db8:a::77", netns=name) == "2001:db8:a::10"
        assert source_address("2001:db8:b::77", netns=name) == "2001:db8:b::10"
        assert source_address("2001:DB8:B:0::77", netns=name) == "2001:db8:b::10"
        with pytest.raises(NetinfoError, match="no route to 2001:db8:dead::1"):
            source_address("2001:db8:dead::1", netns=name)
        with pytest.raises(NetinfoError, match="scoped IPv6 addresses are not supported"):
            source_address("fe80::1%va", netns=name)

        # A global gateway: its route's source.
        ip("-n", name, "-6", "route", "add", "default", "via", "2001:db8:b::1", "metric", "100")
        assert default_source_address(family=socket.AF_INET6, netns=name) == "2001:db8:b::10"
        # A link-local gateway (the usual router advertisement case): a global address of
        # the interface, never the link-local source the kernel picks toward fe80::1.
        ip("-n", name, "-6", "route", "del", "default", "via", "2001:db8:b::1")
        ip("-n", name, "-6", "route", "add", "default", "via", "fe80::1", "dev", "va")
        chosen = default_source_address(family=socket.AF_INET6, netns=name)
        assert chosen in {"2001:db8:a::10", "2001:db8:b::10"}
        assert source_address("2001:4860::1", netns=name) == kernel_source(name, "2001:4860::1")
        # No IPv4 default route here, so the IPv6 one answers.
        assert choose_initiator_ip(None, configured=None, netns=name) == chosen
