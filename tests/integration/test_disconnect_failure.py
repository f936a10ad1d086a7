"""A disconnect that fails (an iSCSI flush, say) fails the detach and loses nothing,
and never hides the real error of an attach whose rollback it is part of.

The service runs in-process on real libvirt, guests, loop devices and sqlite;
only os-brick's disconnect is replaced, by a recording fake that fails the
first time, because a failing flush cannot be made on this machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hostagent.api.models import AttachRequest
from hostagent.connectors import ConnectorError, HostDevice, SecretKeeperFailed, Target
from hostagent.connectors.local import LocalConnector
from hostagent.errors import ConnectFailed, DisconnectFailed, LibvirtError, LibvirtUnavailable
from hostagent.guests.domains import Guests as HostGuests
from hostagent.state.store import AttachmentState, ConnectionState
from tests.integration.support import (
    Guests,
    LoopDevices,
    hand_made_disk,
    local_request,
    reconciler_for,
    service_with,
    unique,
)


class FailingFirstDisconnect(LocalConnector):
    """The local connector, whose first ``failures`` disconnects raise
    ``disconnect_error`` (by default, what a failed flush gives); it records
    every connect and disconnect."""

    def __init__(self, failures: int = 1, disconnect_error: Exception | None = None) -> None:
        super().__init__()
        self.failures = failures
        self.disconnect_error = disconnect_error or ConnectorError(
            "flush of /dev/sdz failed: I/O error"
        )
        self.connects: list[str] = []
        self.disconnects: list[str] = []

    def connect(self, target: Target) -> HostDevice:
        self.connects.append(target.connection_key)
        return super().connect(target)

    def disconnect(self, target: Target, device: HostDevice) -> None:
        self.disconnects.append(target.connection_key)
        if len(self.disconnects) <= self.failures:
            raise self.disconnect_error
        super().disconnect(target, device)


def test_a_failed_disconnect_keeps_the_detach_open_and_a_retry_finishes_it(
    tmp_path: Path, host_guests: HostGuests, guests: Guests, loops: LoopDevices
) -> None:
    connector = FailingFirstDisconnect()
    service = service_with(connector, tmp_path, host_guests)
    store = service.store
    guest = guests.make()
    device = loops.make()
    attachment_id = unique("att")
    service.attach(
        attachment_id,
        AttachRequest.model_validate(local_request(device, guest, volume_id="v")),
    )

    with pytest.raises(DisconnectFailed, match=r"flush of /dev/sdz failed.*retry the DELETE"):
        service.detach(attachment_id)
    record = store.get_attachment(attachment_id)
    assert record is not None and record.state is AttachmentState.DETACHING
    connection = store.get_connection(f"local:{device}")
    assert connection is not None and connection.state is ConnectionState.DISCONNECTING
    assert store.get_tombstone(attachment_id) is None, "nothing is reported done"
    assert guest.disk(f"ua-{attachment_id}") is None, "the guest has let go already"

    result = service.detach(attachment_id)
    assert (result.host_disconnected, result.terminate_connection) == (True, True)
    assert connector.disconnects == [f"local:{device}"] * 2
    assert store.list_connections() == [] and store.list_attachments() == []
    store.close()


def test_reconcile_does_not_log_in_again_what_a_failed_last_detach_is_releasing(
    tmp_path: Path, host_guests: HostGuests, guests: Guests, loops: LoopDevices
) -> None:
    connector = FailingFirstDisconnect(failures=2)
    service = service_with(connector, tmp_path, host_guests)
    guest, device = guests.make(), loops.make()
    key, attachment_id = f"local:{device}", unique("att")
    service.attach(
        attachment_id, AttachRequest.model_validate(local_request(device, guest, volume_id="v"))
    )
    with pytest.raises(DisconnectFailed):
        service.detach(attachment_id)

    report = reconciler_for(service).run()
    assert [(a.action, a.subject) for a in report.actions] == [("failed", attachment_id)]
    assert connector.connects == [key], "no new login for a connection being released"
    connection = service.store.get_connection(key)
    assert connection is not None and connection.state is ConnectionState.DISCONNECTING

    result = service.detach(attachment_id)
    assert (result.host_disconnected, result.terminate_connection) == (True, True)
    assert connector.connects == [key] and connector.disconnects == [key] * 3
    service.store.close()


def test_a_rollback_whose_disconnect_fails_still_reports_the_attachs_own_error(
    tmp_path: Path, host_guests: HostGuests, guests: Guests, loops: LoopDevices
) -> None:
    connector = FailingFirstDisconnect()
    service = service_with(connector, tmp_path, host_guests)
    store = service.store
    # libvirt gives a q35 guest a spare PCIe port or two; once they are taken
    # it refuses the next hot-plugged virtio-blk disk ("no free slot").
    guest = guests.make(root_ports=0)
    attached: list[str] = []
    for _ in range(8):
        device, attachment_id = loops.make(), unique("att")
        request = local_request(device, guest, volume_id=unique("v"), bus="virtio")
        try:
            service.attach(attachment_id, AttachRequest.model_validate(request))
        except LibvirtError as refused:
            assert refused.code == "libvirt_error", "the refusal, not the failed rollback"
            break
        attached.append(f"ua-{attachment_id}")
    else:
        pytest.fail("libvirt took 8 virtio disks on a guest with no spare ports")
    key = f"local:{device}"
    assert connector.disconnects == [key], "the rollback tried to release what it made"
    assert {a.attachment_id for a in store.list_attachments()} == {
        alias.removeprefix("ua-") for alias in attached
    }, "no record of the refused attach: its id may be used again"
    assert guest.disk(f"ua-{attachment_id}") is None, "nothing of it left on the guest"
    left = store.get_connection(key)
    assert left is not None and left.state is ConnectionState.DISCONNECTING

    report = reconciler_for(service).run()
    assert [(a.action, a.subject) for a in report.actions] == [("disconnected", key)]
    assert store.get_connection(key) is None
    assert len(store.list_connections()) == len(attached), "the others are untouched"
    assert connector.disconnects == [key] * 2
    store.close()


class FailingConnect(FailingFirstDisconnect):
    """A connect that fails after doing part of its work, as an iSCSI login
    that timed out on one portal would, with ``error`` as what it raises."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def connect(self, target: Target) -> HostDevice:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        ConnectorError("login timed out"),
        SecretKeeperFailed(LibvirtUnavailable("libvirt went away")),
    ],
    ids=["os-brick", "libvirt-inside-connect"],
)
def test_a_failed_connect_leaves_nothing_but_what_its_cleanup_could_not_undo(
    tmp_path: Path,
    host_guests: HostGuests,
    guests: Guests,
    loops: LoopDevices,
    error: Exception,
) -> None:
    connector = FailingConnect(error)
    service = service_with(connector, tmp_path, host_guests)
    store = service.store
    guest, device = guests.make(), loops.make()
    key = f"local:{device}"
    request = AttachRequest.model_validate(local_request(device, guest, volume_id="v"))
    expected = LibvirtUnavailable if isinstance(error, SecretKeeperFailed) else ConnectFailed
    with pytest.raises(expected):
        service.attach(unique("att"), request)
    assert store.list_attachments() == [], "no attaching row is left behind"
    # The cleanup disconnect failed: the half-made connection stays recorded,
    # with no users, rather than forgotten where reconcile cannot find it.
    left = store.get_connection(key)
    assert left is not None and left.state is ConnectionState.DISCONNECTING
    assert connector.disconnects == [key]

    with pytest.raises(expected):  # the second cleanup works: nothing is left at all
        service.attach(unique("att"), request)
    assert store.list_connections() == [] and store.list_attachments() == []
    assert connector.disconnects == [key] * 2
    store.close()


@pytest.mark.parametrize(
    "recorded", [ConnectionState.CONNECTED, ConnectionState.CONNECTING], ids=str
)
def test_a_failed_reconnect_after_a_reboot_never_releases_what_a_domain_still_names(
    tmp_path: Path,
    host_guests: HostGuests,
    guests: Guests,
    loops: LoopDevices,
    recorded: ConnectionState,
) -> None:
    """A connection kept across a reboot for an operator's disk (connected, or
    left connecting by a crash in the middle of a connect) is connected again
    by the next attach; if that connect fails, the cleanup must not disconnect
    or forget it: the operator's domain still names the device."""
    guest, device = guests.make(), loops.make()
    key = f"local:{device}"
    before = service_with(FailingFirstDisconnect(), tmp_path, host_guests, boot_id="boot-a")
    first = unique("att")
    request = AttachRequest.model_validate(
        local_request(device, guest, volume_id="v", multiattach=True)
    )
    before.attach(first, request)
    guest.attach_raw(hand_made_disk(device, target_dev="sdz", unit=9))
    assert before.detach(first).terminate_connection is False
    before.store.set_connection_state(key, recorded, keep_device=True)
    before.store.close()

    connector = FailingConnect(ConnectorError("login timed out"))
    after = service_with(connector, tmp_path, host_guests, boot_id="boot-b")
    with pytest.raises(ConnectFailed):
        after.attach(unique("att"), request)
    assert connector.disconnects == [], "nothing released under the operator's disk"
    kept = after.store.get_connection(key)
    assert kept is not None, "still recorded, for reconcile and doctor to see"
    assert (kept.state, kept.boot_id, kept.device_path) == (
        recorded,
        "boot-a",
        device,
    ), "back as it was: a connection of the earlier boot"
    assert after.store.list_attachments() == []
    after.store.close()


def test_a_disconnect_failing_in_libvirt_is_a_disconnect_failed_to_retry(
    tmp_path: Path, host_guests: HostGuests, guests: Guests, loops: LoopDevices
) -> None:
    """rbd's secret removal failing in libvirt, say."""
    connector = FailingFirstDisconnect(
        disconnect_error=SecretKeeperFailed(LibvirtError("undefine secret 3f6f: operation failed"))
    )
    service = service_with(connector, tmp_path, host_guests)
    guest, device = guests.make(), loops.make()
    attachment_id = unique("att")
    service.attach(
        attachment_id, AttachRequest.model_validate(local_request(device, guest, volume_id="v"))
    )
    with pytest.raises(DisconnectFailed, match=r"undefine secret 3f6f.*retry the DELETE"):
        service.detach(attachment_id)
    record = service.store.get_attachment(attachment_id)
    assert record is not None and record.state is AttachmentState.DETACHING
    assert service.detach(attachment_id).terminate_connection is True
    service.store.close()
