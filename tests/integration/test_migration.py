"""Live migration hand-off (API.md v1.1) between two real libvirt "hosts".

The source is the host's libvirtd, the destination a second libvirtd in its
own mount namespace (tests/integration/second_host.py), each with its own
hostagentd. Both share one kernel, so each "host" gets its own device node
for the same storage, as two real hosts have: two loop devices over one
backing file. Guests are firmware-only; migrations go over
tcp://127.0.0.1:PORT with the destination XML the client helper writes.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from lxml import etree

from hostagent.api.models import Attachment
from hostagent.client import ApiError, HostagentClient, destination_xml
from tests.conftest import DaemonFactory
from tests.integration.second_host import SecondHost, free_port
from tests.integration.support import (
    LIBVIRT_URI,
    Daemon,
    Guest,
    Guests,
    LoopDevices,
    local_request,
    run,
    unique,
)


@pytest.fixture(scope="session")
def second_host() -> Iterator[SecondHost]:
    host = SecondHost()
    host.start()
    yield host
    host.stop()


@pytest.fixture
def dst_conn(second_host: SecondHost) -> Iterator[Any]:
    conn = second_host.connect()
    yield conn
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


@pytest.fixture
def dst_guests(dst_conn: Any) -> Iterator[Guests]:
    made = Guests(dst_conn)
    made._count = itertools.count(1000)  # names unique across both hosts: M may move there
    yield made
    made.cleanup()


class Hosts:
    """The two agents, and volumes that have a device node on each host."""

    def __init__(
        self, src: Daemon, dst: Daemon, second_host: SecondHost, loops: LoopDevices
    ) -> None:
        self.src, self.dst = src.client, dst.client
        self.dst_daemon = dst
        self.second_host = second_host
        self.loops = loops

    def volume(self) -> tuple[str, str]:
        """(the source host's device, the destination's) over one backing file."""
        on_source = self.loops.make()
        on_destination = run("losetup", "--find", "--show", str(self.loops.backing[on_source]))
        self.loops.devices.append(on_destination)
        return on_source, on_destination


@pytest.fixture
def hosts(
    daemon_factory: DaemonFactory,
    second_host: SecondHost,
    loops: LoopDevices,
    libvirt_conn: Any,
    dst_conn: Any,
) -> Iterator[Hosts]:
    src = daemon_factory(**{"reconcile.interval": "0"})
    dst = daemon_factory(
        **{"libvirt-uri": second_host.uri, "reconcile.interval": "0"},
    )
    for daemon in (src, dst):
        healthy(daemon)
    yield Hosts(src, dst, second_host, loops)
    for conn in (libvirt_conn, dst_conn):  # migrated guests may be on either side
        for dom in conn.listAllDomains(0):
            if dom.name().startswith("hatest-") and dom.name() in _MOVED:
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
    _MOVED.clear()


_MOVED: set[str] = set()


def healthy(daemon: Daemon, timeout: float = 30.0) -> None:
    """Wait until the daemon has its libvirt connection."""
    deadline = time.monotonic() + timeout
    while daemon.client.health().status != "ok":
        assert time.monotonic() < deadline, daemon.log()[-3000:]
        time.sleep(0.1)


def host_libvirtd_uri() -> str:
    """The host's libvirtd as the second one (in its own mount namespace) reaches it."""
    pid = Path("/run/libvirtd.pid").read_text().strip()
    return f"qemu+unix:///system?socket=/proc/{pid}/root/run/libvirt/libvirt-sock"


def migrate(dom: Any, dest_uri: str, dest_xml: str, *, bandwidth_mib: int = 0) -> None:
    """A live peer-to-peer migration over an explicit tcp port, with the destination XML."""
    _MOVED.add(dom.name())
    params: dict[str, Any] = {
        libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://127.0.0.1:{free_port()}",
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: dest_xml,
    }
    if bandwidth_mib:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib
    dom.migrateToURI3(dest_uri, params, libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER)


def migratable_xml(guest: Guest) -> str:
    return str(guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))


def shared(device: str, guest: Guest | str, volume_id: str) -> dict[str, Any]:
    return local_request(device, guest, volume_id=volume_id, multiattach=True)


def on_destination(guest: Guest, conn: Any) -> Guest:
    return Guest(conn, guest.name, guest.uuid, persistent=False)


def prepare(hosts: Hosts, guest: Guest, device: str, volume_id: str, alias: str) -> Attachment:
    incoming, created = hosts.dst.attach_incoming(
        unique("in"), shared(device, guest.uuid, volume_id), alias
    )
    assert created and incoming.state == "incoming" and incoming.alias == alias
    return incoming


def confirmed(client: HostagentClient, attachment_id: str, timeout: float = 10.0) -> Attachment:
    """confirm, retried while libvirt finishes the migration's last step."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.confirm(attachment_id)
        except ApiError as exc:
            if exc.code != "migration_not_finished" or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_shared_volume_moves_without_cutting_the_guests_that_stay(
    hosts: Hosts, guests: Guests, dst_guests: Guests, dst_conn: Any
) -> None:
    volume = unique("v")
    dev_src, dev_dst = hosts.volume()
    m, a, b = guests.make(), guests.make(), dst_guests.make()
    m_src, _ = hosts.src.attach(unique("m"), shared(dev_src, m, volume))
    a_src, _ = hosts.src.attach(unique("a"), shared(dev_src, a, volume))
    hosts.dst.attach(unique("b"), shared(dev_dst, b, volume))
    before = m.disk(m_src.alias)
    assert before is not None

    incoming = prepare(hosts, m, dev_dst, volume, m_src.alias)
    assert incoming.host_refcount == 2 and incoming.device_path == dev_dst
    assert len(hosts.dst.connections().connections) == 1, "joined B's connection"
    migrate(m.dom, hosts.second_host.uri, destination_xml(migratable_xml(m), [incoming]))

    arrived = confirmed(hosts.dst, incoming.attachment_id)
    assert arrived.state == "attached" and arrived.domain_name == m.name
    disk = on_destination(m, dst_conn).disk(m_src.alias)
    assert disk is not None, "the disk keeps the source's alias"
    assert disk.find("./shareable") is not None
    assert disk.xpath("string(./driver/@cache)") == "none"
    assert disk.xpath("string(./source/@dev)") == dev_dst
    assert _address(disk) == _address(before)

    released = hosts.src.detach(m_src.attachment_id)
    assert (released.host_disconnected, released.terminate_connection) == (False, False)
    assert released.host_refcount == 1
    assert dev_src in a.open_block_devices().values(), "A's QEMU still has the device"
    assert a.disk(a_src.alias) is not None


def _address(disk: etree._Element) -> dict[str, str]:
    address = disk.find("./address")
    assert address is not None
    return {str(k): str(v) for k, v in address.items()}


def test_a_failed_migration_leaves_the_source_and_the_destination_s_other_guest(
    hosts: Hosts, guests: Guests, dst_guests: Guests
) -> None:
    volume = unique("v")
    dev_src, dev_dst = hosts.volume()
    m, b = guests.make(), dst_guests.make()
    m_src, _ = hosts.src.attach(unique("m"), shared(dev_src, m, volume))
    hosts.dst.attach(unique("b"), shared(dev_dst, b, volume))
    incoming = prepare(hosts, m, dev_dst, volume, m_src.alias)
    assert incoming.disk_xml is not None
    # the destination refuses: its QEMU cannot open the disk it is given
    refused = incoming.model_copy(
        update={"disk_xml": incoming.disk_xml.replace(dev_dst, "/dev/hatest-missing")}
    )
    with pytest.raises(libvirt.libvirtError):
        migrate(m.dom, hosts.second_host.uri, destination_xml(migratable_xml(m), [refused]))
    with pytest.raises(ApiError) as not_here:
        hosts.dst.confirm(incoming.attachment_id)
    assert not_here.value.code == "migration_not_finished"

    released = hosts.dst.detach(incoming.attachment_id)
    assert (released.host_disconnected, released.terminate_connection) == (False, False)
    assert released.host_refcount == 1, "B keeps its connection"
    assert m.dom.isActive() and m.disk(m_src.alias) is not None
    assert dev_src in m.open_block_devices().values()


def test_the_last_user_leaving_the_source_releases_its_connection_once(
    hosts: Hosts, guests: Guests, dst_conn: Any
) -> None:
    volume = unique("v")
    dev_src, dev_dst = hosts.volume()
    m = guests.make()
    m_src, _ = hosts.src.attach(unique("m"), shared(dev_src, m, volume))
    incoming = prepare(hosts, m, dev_dst, volume, m_src.alias)
    assert incoming.host_refcount == 1
    migrate(m.dom, hosts.second_host.uri, destination_xml(migratable_xml(m), [incoming]))
    # no confirm and no periodic reconcile: libvirt's lifecycle events do it
    deadline = time.monotonic() + 10
    while hosts.dst.get(incoming.attachment_id).state != "attached":
        assert time.monotonic() < deadline, "the arrival events did not attach it"
        time.sleep(0.1)
    assert f"{m.name} arrived by migration with {m_src.alias}" in hosts.dst_daemon.log()

    released = hosts.src.detach(m_src.attachment_id)
    assert (released.host_disconnected, released.terminate_connection) == (True, True)
    assert hosts.src.detach(m_src.attachment_id) == released, "a retry replays the answer"
    assert hosts.src.connections().connections == []
    assert on_destination(m, dst_conn).disk(m_src.alias) is not None


def test_there_and_back_the_alias_survives_and_a_detach_finds_the_disk(
    hosts: Hosts, guests: Guests, dst_conn: Any
) -> None:
    volume = unique("v")
    dev_src, dev_dst = hosts.volume()
    m = guests.make()
    first, _ = hosts.src.attach(unique("m"), shared(dev_src, m, volume))
    alias = first.alias
    there = prepare(hosts, m, dev_dst, volume, alias)
    migrate(m.dom, hosts.second_host.uri, destination_xml(migratable_xml(m), [there]))
    confirmed(hosts.dst, there.attachment_id)
    assert hosts.src.detach(first.attachment_id).terminate_connection

    back, _ = hosts.src.attach_incoming(unique("back"), shared(dev_src, m.uuid, volume), alias)
    assert back.state == "incoming"
    away = on_destination(m, dst_conn)
    migrate(away.dom, host_libvirtd_uri(), destination_xml(migratable_xml(away), [back]))
    home = confirmed(hosts.src, back.attachment_id)
    assert home.alias == alias and m.disk(alias) is not None
    left = hosts.dst.detach(there.attachment_id)
    assert (left.host_disconnected, left.terminate_connection) == (True, True)

    detached = hosts.src.detach(back.attachment_id)
    assert detached.terminate_connection
    assert m.disk(alias) is None, "the detach found the disk by its alias and removed it"


def test_an_incoming_for_a_domain_running_here_or_named_is_refused(
    hosts: Hosts, dst_guests: Guests
) -> None:
    _, dev_dst = hosts.volume()
    b = dst_guests.make()
    for domain, code in ((b.uuid, "domain_exists"), (b.name, "invalid_request")):
        with pytest.raises(ApiError) as refused:
            hosts.dst.attach_incoming(unique("in"), shared(dev_dst, domain, "v1"), "ua-x")
        assert refused.value.code == code
    assert hosts.dst.connections().connections == []


def test_an_abandoned_incoming_is_released_by_reconcile(
    daemon_factory: DaemonFactory, second_host: SecondHost, loops: LoopDevices
) -> None:
    dst = daemon_factory(
        **{
            "libvirt-uri": second_host.uri,
            "reconcile.interval": "0",
            "incoming-migration-timeout": "1",
        }
    )
    healthy(dst)
    device = loops.make()
    incoming, _ = dst.client.attach_incoming(
        unique("in"), shared(device, str(uuid.uuid4()), "v1"), "ua-gone"
    )
    assert [a.action for a in dst.client.reconcile().actions] == []
    time.sleep(1.2)
    actions = dst.client.reconcile().actions
    assert [(a.action, a.subject) for a in actions] == [
        ("abandoned_incoming", incoming.attachment_id)
    ]
    assert dst.client.connections().connections == []
    assert "abandoned" in dst.log()


def test_a_delete_during_the_migration_waits_and_a_cancelled_one_leaves_all_in_place(
    hosts: Hosts, guests: Guests, dst_guests: Guests
) -> None:
    volume = unique("v")
    dev_src, dev_dst = hosts.volume()
    m, b = guests.make(), dst_guests.make()
    m_src, _ = hosts.src.attach(unique("m"), shared(dev_src, m, volume))
    hosts.dst.attach(unique("b"), shared(dev_dst, b, volume))
    incoming = prepare(hosts, m, dev_dst, volume, m_src.alias)
    dest_xml = destination_xml(migratable_xml(m), [incoming])
    failure: list[BaseException] = []

    def slow_migration() -> None:
        conn = libvirt.open(LIBVIRT_URI)  # its own connection: the test polls on the other
        try:
            dom = conn.lookupByUUIDString(m.uuid)
            migrate(dom, hosts.second_host.uri, dest_xml, bandwidth_mib=1)
        except libvirt.libvirtError as exc:
            failure.append(exc)
        finally:
            conn.close()

    worker = threading.Thread(target=slow_migration)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while m.dom.jobStats(0).get("operation") != libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT:
            assert time.monotonic() < deadline, "the migration job did not start"
            time.sleep(0.01)
        with pytest.raises(ApiError) as busy:
            hosts.src.detach(m_src.attachment_id)
        assert (busy.value.status, busy.value.code) == (409, "domain_migrating")
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            m.dom.abortJob()
        worker.join(60)
    assert failure, "the cancelled migration failed"

    released = hosts.dst.detach(incoming.attachment_id)
    assert (released.host_refcount, released.terminate_connection) == (1, False)
    assert m.dom.isActive() and m.disk(m_src.alias) is not None
    assert hosts.src.get(m_src.attachment_id).state == "attached"


def test_a_detach_from_a_stopped_persistent_domain_has_no_job_to_wait_for(
    daemon: Daemon, guests: Guests, loops: LoopDevices
) -> None:
    """libvirt refuses job stats of a domain that is not running: no migration."""
    guest = guests.make(persistent=True)
    attachment, _ = daemon.client.attach(
        unique("p"), local_request(loops.make(), guest, volume_id="v")
    )
    guest.dom.destroy()
    result = daemon.client.detach(attachment.attachment_id)
    assert result.terminate_connection
    assert guest.disk(attachment.alias, inactive=True) is None
