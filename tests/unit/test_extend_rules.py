"""attachments/extend.py: the rules of online extend, one per test.

The core runs as the daemon wires it between recording fakes of libvirt and
os-brick (tests/unit/recording.py); the real flow runs in
tests/integration/test_extend.py.
"""

from __future__ import annotations

import threading

import pytest

from hostagent.attachments.extend import VolumeExtender
from hostagent.connectors import ConnectorError
from hostagent.errors import (
    AttachmentNotFound,
    DeviceNotExtended,
    ExtendFailed,
    InvalidRequest,
)
from hostagent.guests.domains import DomainInfo
from tests.unit.conftest import Core

GIB = 1 << 30


def extender(core: Core) -> VolumeExtender:
    service = core.service
    return VolumeExtender(
        store=service.store,
        guests=service.guests,
        registry=service.registry,
        locks=service.locks,
        connections=service.connections,
    )


def shared(core: Core, *guests: DomainInfo) -> list[str]:
    ids = []
    for n, guest in enumerate(guests):
        core.service.attach(f"a{n}", core.request(guest, multiattach=True))
        ids.append(f"a{n}")
    return ids


def sizes(core: Core, guests: list[DomainInfo], ids: list[str]) -> list[int | None]:
    return [core.guests.disk_size(g.uuid, f"ua-{i}") for g, i in zip(guests, ids, strict=True)]


def test_one_refresh_then_every_running_guest_is_resized_to_the_host_size(core: Core) -> None:
    trio = [core.guests.define(f"g{n}") for n in range(3)]
    ids = shared(core, *trio)
    core.connector.device_size = 2 * GIB
    result = extender(core).extend("a1", None)
    assert core.connector.extends == [core.key]
    assert result.device_size == 2 * GIB
    assert [(g.attachment_id, g.size, g.resized) for g in result.guests] == [
        (i, 2 * GIB, True) for i in ids
    ]
    assert sizes(core, trio, ids) == [2 * GIB] * 3
    assert [c for c in core.guests.calls if c[0] == "resize"] == [
        ("resize", f"ua-{i}", True, False) for i in ids
    ]


def test_a_repeat_resizes_nothing(core: Core) -> None:
    ids = shared(core, core.guests.define("g0"), core.guests.define("g1"))
    core.connector.device_size = 2 * GIB
    extender(core).extend("a0", 2 * GIB)
    core.guests.calls.clear()
    again = extender(core).extend("a1", 2 * GIB)
    assert [(g.attachment_id, g.resized) for g in again.guests] == [(i, False) for i in ids]
    assert core.guests.calls == []


def test_a_device_not_grown_yet_is_409_and_no_guest_changes(core: Core) -> None:
    trio = [core.guests.define(f"g{n}") for n in range(2)]
    ids = shared(core, *trio)
    with pytest.raises(DeviceNotExtended, match="extend the volume on the storage first"):
        extender(core).extend("a0", 3 * GIB)
    assert sizes(core, trio, ids) == [GIB, GIB]
    assert not [c for c in core.guests.calls if c[0] == "resize"]


def test_a_smaller_size_is_400_before_the_host_is_touched(core: Core) -> None:
    shared(core, core.guests.define("g0"))
    with pytest.raises(InvalidRequest, match="shrink"):
        extender(core).extend("a0", GIB - 512)
    assert core.connector.extends == []


def test_a_stopped_guest_is_left_to_open_the_device_at_its_new_size(core: Core) -> None:
    running, stopped = core.guests.define("up"), core.guests.define("down", active=False)
    shared(core, running, stopped)
    core.connector.device_size = 2 * GIB
    result = extender(core).extend("a1", None)
    assert [g.attachment_id for g in result.guests] == ["a0"]


def test_a_refused_resize_is_502_naming_the_guests_resized_before(core: Core) -> None:
    trio = [core.guests.define(f"g{n}") for n in range(3)]
    ids = shared(core, *trio)
    core.connector.device_size = 2 * GIB
    core.guests.refuse_resize = {"ua-a1"}
    with pytest.raises(ExtendFailed, match=r"ua-a1 in g1 .*resized before it: g0;"):
        extender(core).extend("a0", None)
    core.guests.refuse_resize = set()
    repeated = extender(core).extend("a0", None)
    assert [g.resized for g in repeated.guests] == [False, True, True]
    assert sizes(core, trio, ids) == [2 * GIB] * 3


def test_a_failed_host_refresh_is_502_and_no_guest_changes(core: Core) -> None:
    shared(core, core.guests.define("g0"))
    core.connector.extend_error = ConnectorError("rescan failed")
    with pytest.raises(ExtendFailed, match="rescan failed; no guest was resized"):
        extender(core).extend("a0", None)
    assert not [c for c in core.guests.calls if c[0] == "resize"]


def test_an_unknown_attachment_is_404(core: Core) -> None:
    with pytest.raises(AttachmentNotFound):
        extender(core).extend("nope", None)


def test_concurrent_extends_of_one_connection_refresh_the_host_once(core: Core) -> None:
    trio = [core.guests.define(f"g{n}") for n in range(3)]
    ids = shared(core, *trio)
    core.connector.device_size = 2 * GIB
    gate = threading.Event()
    core.connector.extend_gate = gate
    extend = extender(core)
    results: dict[str, object] = {}

    def call(attachment_id: str) -> None:
        results[attachment_id] = extend.extend(attachment_id, 2 * GIB)

    threads = [threading.Thread(target=call, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    while len(core.connector.extends) < 1:
        threading.Event().wait(0.01)
    threading.Event().wait(0.2)  # the others arrive and wait for the connection lock
    gate.set()
    for thread in threads:
        thread.join(10)
    assert sorted(results) == sorted(ids)
    assert core.connector.extends == [core.key], "the host step ran once"
    assert sizes(core, trio, ids) == [2 * GIB] * 3


def test_an_extend_after_a_refresh_refreshes_again(core: Core) -> None:
    """A refresh that began before a call arrived may predate the storage's growth."""
    shared(core, core.guests.define("g0"))
    extend = extender(core)
    core.connector.device_size = 2 * GIB
    extend.extend("a0", None)
    core.connector.device_size = 3 * GIB
    assert extend.extend("a0", None).device_size == 3 * GIB
    assert core.connector.extends == [core.key, core.key]
