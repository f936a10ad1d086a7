"""A disconnect that fails (an iSCSI flush, say) fails the detach and loses nothing.

The service runs in-process on real libvirt, guests, loop devices and sqlite;
only os-brick's disconnect is replaced, by a recording fake that fails the
first time, because a failing flush cannot be made on this machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.connectors import ConnectorError, ConnectorRegistry, HostDevice, Target
from hostagent.connectors.local import LocalConnector
from hostagent.errors import DisconnectFailed
from hostagent.guests import Guests as HostGuests
from hostagent.locks import HostLocks
from hostagent.models import AttachRequest
from hostagent.service import AttachmentService, ServiceSettings
from hostagent.store import AttachmentState, ConnectionState, Store
from tests.integration.support import Guests, LoopDevices, local_request, unique


class FailingFirstDisconnect(LocalConnector):
    """The local connector, whose first disconnect fails as a failed flush would."""

    def __init__(self) -> None:
        super().__init__()
        self.disconnects: list[str] = []

    def disconnect(self, target: Target, device: HostDevice) -> None:
        self.disconnects.append(target.connection_key)
        if len(self.disconnects) == 1:
            raise ConnectorError("flush of /dev/sdz failed: I/O error")
        super().disconnect(target, device)


@pytest.fixture
def host_guests() -> Iterator[HostGuests]:
    guests = HostGuests("qemu:///system", connections=1)
    guests.start()
    yield guests
    guests.stop()


def test_a_failed_disconnect_keeps_the_detach_open_and_a_retry_finishes_it(
    tmp_path: Path, host_guests: HostGuests, guests: Guests, loops: LoopDevices
) -> None:
    connector = FailingFirstDisconnect()
    store = Store(tmp_path / "state.sqlite3")
    service = AttachmentService(
        store=store,
        guests=host_guests,
        registry=ConnectorRegistry({"local": connector}),
        locks=HostLocks(tmp_path / "locks"),
        settings=ServiceSettings(detach_timeout=5, detach_retry_interval=1),
    )
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
