"""attachments/host_connections.py: when a host connection is made, kept and
released, one rule per test, between recording fakes of libvirt and os-brick."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hostagent.api.models import AttachRequest
from hostagent.connectors import ConnectorError
from hostagent.errors import ConnectFailed, DisconnectFailed
from hostagent.state.store import AttachmentState, ConnectionState
from tests.unit.conftest import Core


def test_a_connection_of_an_earlier_boot_is_connected_again_by_the_next_attach(
    core: Core,
) -> None:
    one, two = core.guests.define("g1"), core.guests.define("g2")
    core.service.attach("a1", core.request(one, multiattach=True))
    after = core.again(boot_id="boot-b")
    after.service.attach("a2", after.request(two, multiattach=True))
    assert after.connector.connects == [after.key, after.key], "gone with the reboot"
    connection = after.store.get_connection(after.key)
    assert connection is not None and connection.boot_id == "boot-b"
    after.store.close()


def test_a_failed_disconnect_keeps_the_detach_open_until_a_retry(core: Core) -> None:
    core.service.attach("a1", core.request(core.guests.define("g1")))
    core.connector.disconnect_error = ConnectorError("logout failed")
    with pytest.raises(DisconnectFailed):
        core.service.detach("a1")
    record = core.store.get_attachment("a1")
    assert record is not None and record.state is AttachmentState.DETACHING
    connection = core.store.get_connection(core.key)
    assert connection is not None and connection.state is ConnectionState.DISCONNECTING

    core.connector.disconnect_error = None
    result = core.service.detach("a1")
    assert (result.host_disconnected, result.terminate_connection) == (True, True)
    assert core.connector.disconnects == [core.key, core.key]


def test_a_failed_connect_keeps_a_connection_a_domain_still_names(core: Core) -> None:
    one, two = core.guests.define("g1"), core.guests.define("g2")
    core.service.attach("a1", core.request(one, multiattach=True))
    after = core.again(boot_id="boot-b")
    after.store.forget_attachment("a1")  # no user left on record; g1 still holds the disk
    after.connector.connect_error = ConnectorError("target unreachable")
    with pytest.raises(ConnectFailed):
        after.service.attach("a2", after.request(two, multiattach=True))
    assert after.connector.disconnects == [], "no cleanup under a guest's disk"
    connection = after.store.get_connection(after.key)
    assert connection is not None and connection.state is ConnectionState.CONNECTED
    assert after.store.get_attachment("a2") is None
    after.store.close()


def test_forgetting_an_attachment_that_may_not_disconnect_keeps_the_connection(
    core: Core,
) -> None:
    guest = core.guests.define("g1")
    core.service.attach("a1", core.request(guest))
    record = core.store.get_attachment("a1")
    assert record is not None
    core.guests.drop_disk(guest, "ua-a1", "live")
    core.guests.drop_disk(guest, "ua-a1", "config")
    core.service.connections.forget(record, may_disconnect=False)
    assert core.store.get_attachment("a1") is None
    assert core.store.get_connection(core.key) is not None
    assert core.connector.disconnects == []


def test_a_connection_in_use_is_not_disconnected_as_unused(core: Core) -> None:
    core.service.attach("a1", core.request(core.guests.define("g1")))
    connection = core.store.get_connection(core.key)
    assert connection is not None
    assert not core.service.connections.disconnect_unused(connection)
    assert core.connector.disconnects == []


def test_the_last_release_after_a_reboot_reports_terminate_connection_without_a_disconnect(
    core: Core,
) -> None:
    guest = core.guests.define("g1", persistent=False)
    core.service.attach("a1", core.request(guest))
    after = core.again(boot_id="boot-b")
    record = after.store.get_attachment("a1")
    assert record is not None
    result = after.service.connections.release_after_reboot(record)
    assert (result.host_disconnected, result.terminate_connection) == (True, True)
    assert after.connector.disconnects == []
    assert after.store.get_connection(after.key) is None
    after.store.close()


def test_a_release_after_a_reboot_with_other_users_keeps_the_connection(core: Core) -> None:
    one, two = core.guests.define("g1"), core.guests.define("g2")
    core.service.attach("a1", core.request(one, multiattach=True))
    core.service.attach("a2", core.request(two, multiattach=True))
    after = core.again(boot_id="boot-b")
    record = after.store.get_attachment("a1")
    assert record is not None
    result = after.service.connections.release_after_reboot(record)
    assert (result.host_refcount, result.terminate_connection) == (1, False)
    assert after.store.get_connection(after.key) is not None
    after.store.close()


def test_a_connect_that_produces_a_device_the_host_uses_is_undone(
    core: Core, loop_device: str, tmp_path: Path
) -> None:
    """An iSCSI LUN or krbd map that turns out to be the host's own disk (here:
    a mounted loop device the recording connector hands out): 502
    connect_failed says why, nothing is recorded, and nothing is disconnected
    (os-brick reused a session or map the host uses: tearing it down would
    take the host's disk)."""
    subprocess.run(["mkfs.ext4", "-q", loop_device], check=True)
    point = tmp_path / "mnt"
    point.mkdir()
    subprocess.run(["mount", loop_device, str(point)], check=True)
    try:
        guest = core.guests.define("g1")
        body = core.request(guest).model_dump()
        body["connection_info"]["data"]["device_path"] = loop_device
        with pytest.raises(
            ConnectFailed, match=f"used by the host itself: it is mounted at {point}"
        ):
            core.service.attach("a1", AttachRequest.model_validate(body))
    finally:
        subprocess.run(["umount", str(point)], check=True)
    key = f"local:{loop_device}"
    assert core.connector.connects == [key] and core.connector.disconnects == []
    assert core.store.list_connections() == [] and core.store.list_attachments() == []
    assert core.guests.calls == []
