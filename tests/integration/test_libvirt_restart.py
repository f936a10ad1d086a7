"""libvirtd goes away and comes back: 503 meanwhile, then the agent reconnects."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hostagent.client import ApiError
from tests.integration.support import Daemon, Guests, LoopDevices, local_request, unique

SETUP_HOST = Path(__file__).parents[2] / "scripts" / "setup-host"


def stop_libvirtd() -> None:
    subprocess.run(["pkill", "-x", "libvirtd"], check=False)
    deadline = time.monotonic() + 30
    while (
        subprocess.run(["pgrep", "-x", "libvirtd"], check=False, capture_output=True).returncode
        == 0
    ):
        assert time.monotonic() < deadline, "libvirtd did not stop"
        time.sleep(0.1)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.skipif(
    Path("/run/systemd/system").is_dir(),
    reason="stops and starts libvirtd by hand; not on a systemd host",
)
def test_requests_get_503_while_libvirtd_is_down_then_work_again(
    daemon: Daemon, guests: Guests, loops: LoopDevices
) -> None:
    client = daemon.client
    guest = guests.make()
    device = loops.make()
    attachment_id = unique("att")
    client.attach(attachment_id, local_request(device, guest, volume_id="v", multiattach=True))

    stop_libvirtd()
    try:
        wait_for(lambda: client.health().status == "degraded", 15, "health degraded")
        assert client.health().libvirt == "disconnected"
        started = time.monotonic()
        with pytest.raises(ApiError) as unavailable:
            client.attach(unique("att"), local_request(device, guest, volume_id="v2"))
        assert (unavailable.value.status, unavailable.value.code) == (503, "libvirt_unavailable")
        with pytest.raises(ApiError) as unavailable:
            client.detach(attachment_id)
        assert unavailable.value.code == "libvirt_unavailable"
        assert time.monotonic() - started < 5, "503 must come at once, not after a hang"
        # Nothing was lost or released while libvirt could not be asked.
        assert client.get(attachment_id).state == "detaching"
        assert client.connections().connections[0].host_refcount == 1
    finally:
        subprocess.run([str(SETUP_HOST)], check=True, capture_output=True)

    wait_for(lambda: client.health().status == "ok", 60, "health ok again")
    result = client.detach(attachment_id)
    assert result.terminate_connection
    assert guest.disk(f"ua-{attachment_id}") is None
    again = unique("att")
    client.attach(again, local_request(device, guest, volume_id="v"))
    assert client.detach(again).terminate_connection
