"""hostagent.host.netinfo against a recording fake of pyroute2's IPRoute: the fallback paths."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from hostagent.host.netinfo import (
    NetinfoError,
    choose_initiator_ip,
    default_source_address,
    source_address,
)

Msg = dict[str, Any]


class FakeRtnl:
    """Answers route get/dump and addr dump from tables; records calls and closes."""

    def __init__(
        self,
        get: dict[str, list[Msg] | Exception] | None = None,
        defaults: list[Msg] | None = None,
        addresses: dict[int, list[Msg]] | None = None,
    ) -> None:
        self.get = get or {}
        self.defaults = defaults or []
        self.addresses = addresses or {}
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.opened: list[str | None] = []
        self.closed = 0

    def __call__(self, netns: str | None) -> FakeRtnl:
        self.opened.append(netns)
        return self

    def __enter__(self) -> FakeRtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed += 1

    def route(self, command: str, **kwargs: Any) -> list[Msg]:
        self.calls.append(("route", command, kwargs))
        if command == "dump":
            return [
                r for r in self.defaults if r.get("family", socket.AF_INET) == kwargs["family"]
            ]
        answer = self.get[kwargs["dst"]]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def addr(self, command: str, **kwargs: Any) -> list[Msg]:
        self.calls.append(("addr", command, kwargs))
        return [
            a
            for a in self.addresses.get(kwargs["index"], [])
            if a.get("family", socket.AF_INET) == kwargs["family"]
        ]


def test_prefsrc_is_used_and_handle_closed() -> None:
    fake = FakeRtnl(get={"192.0.2.77": [{"type": 1, "RTA_PREFSRC": "192.0.2.10", "RTA_OIF": 3}]})
    assert source_address("192.0.2.77", netns="ns1", ipr=fake) == "192.0.2.10"
    assert fake.opened == ["ns1"]
    assert fake.closed == 1
    assert [c[0] for c in fake.calls] == ["route"]


def test_without_prefsrc_the_output_interface_address_is_used() -> None:
    v6 = socket.AF_INET6
    fake = FakeRtnl(
        get={
            "192.0.2.77": [{"type": 1, "RTA_OIF": 3}],
            "2001:db8::77": [{"type": 1, "RTA_OIF": 3}],
        },
        addresses={
            3: [
                {"family": socket.AF_INET, "IFA_LOCAL": "192.0.2.10", "IFA_ADDRESS": "192.0.2.1"},
                {"family": v6, "scope": 253, "IFA_ADDRESS": "fe80::1"},
                {"family": v6, "scope": 0, "IFA_FLAGS": 0x40, "IFA_ADDRESS": "2001:db8::99"},
                {"family": v6, "scope": 0, "IFA_FLAGS": 0x80, "IFA_ADDRESS": "2001:db8::10"},
            ]
        },
    )
    assert source_address("192.0.2.77", ipr=fake) == "192.0.2.10"  # IFA_LOCAL, not the peer
    # Global before link-local; a tentative address is skipped.
    assert source_address("2001:db8::77", ipr=fake) == "2001:db8::10"
    assert fake.closed == 2


def test_no_source_at_all() -> None:
    fake = FakeRtnl(get={"192.0.2.77": [{"type": 1, "RTA_OIF": 3}]})
    with pytest.raises(NetinfoError, match="has no source address"):
        source_address("192.0.2.77", ipr=fake)


@pytest.mark.parametrize(
    "answer",
    [NetlinkError(113), [], [{"type": 6, "RTA_PREFSRC": "192.0.2.10"}]],
    ids=["netlink-error", "empty", "blackhole"],
)
def test_unreachable(answer: list[Msg] | Exception) -> None:
    fake = FakeRtnl(get={"203.0.113.5": answer})
    with pytest.raises(NetinfoError, match=r"no route to 203\.0\.113\.5"):
        source_address("203.0.113.5", ipr=fake)
    assert fake.closed == 1


def test_hostname_never_opens_a_handle() -> None:
    fake = FakeRtnl()
    with pytest.raises(NetinfoError, match="host names are not resolved"):
        source_address("storage.example", ipr=fake)
    assert fake.opened == []


def test_default_route_prefsrc_then_gateway_then_interface() -> None:
    fake = FakeRtnl(
        defaults=[
            {"type": 1, "dst_len": 0, "RTA_PRIORITY": 200, "RTA_PREFSRC": "192.0.2.99"},
            {"type": 1, "dst_len": 0, "RTA_PRIORITY": 100, "RTA_PREFSRC": "192.0.2.10"},
        ]
    )
    assert default_source_address(ipr=fake) == "192.0.2.10"  # lowest metric wins

    fake = FakeRtnl(
        defaults=[{"type": 1, "dst_len": 0, "RTA_GATEWAY": "198.51.100.1", "RTA_OIF": 3}],
        get={"198.51.100.1": [{"type": 1, "RTA_PREFSRC": "198.51.100.10"}]},
    )
    assert default_source_address(ipr=fake) == "198.51.100.10"

    hops = [{"oif": 4, "RTA_GATEWAY": "198.51.100.1"}, {"oif": 5, "RTA_GATEWAY": "192.0.2.1"}]
    fake = FakeRtnl(
        defaults=[{"type": 1, "dst_len": 0, "RTA_MULTIPATH": hops}],
        get={"198.51.100.1": [{"type": 1, "RTA_PREFSRC": "198.51.100.10"}]},
    )
    assert default_source_address(ipr=fake) == "198.51.100.10"

    v6 = socket.AF_INET6
    fake = FakeRtnl(
        defaults=[{"family": v6, "type": 1, "dst_len": 0, "RTA_GATEWAY": "fe80::1", "RTA_OIF": 3}],
        addresses={
            3: [
                {"family": v6, "scope": 253, "IFA_ADDRESS": "fe80::10"},
                {"family": v6, "scope": 0, "IFA_ADDRESS": "2001:db8::10"},
            ]
        },
    )
    assert default_source_address(family=v6, ipr=fake) == "2001:db8::10"
    assert not [c for c in fake.calls if c[1] == "get"]  # never toward a link-local gateway


def test_choose_initiator_ip_falls_back_to_ipv6_default() -> None:
    v6 = socket.AF_INET6
    fake = FakeRtnl(
        defaults=[{"family": v6, "type": 1, "dst_len": 0, "RTA_PREFSRC": "2001:db8::10"}]
    )
    assert choose_initiator_ip(None, configured=None, ipr=fake) == "2001:db8::10"
    assert choose_initiator_ip(None, configured="2001:DB8::0:5", ipr=fake) == "2001:db8::5"
    unreachable = FakeRtnl(get={"192.0.2.1": NetlinkError(101)})
    with pytest.raises(NetinfoError, match="Network is unreachable"):  # no fallback to my_ip
        choose_initiator_ip("192.0.2.1", configured="10.0.0.1", ipr=unreachable)
