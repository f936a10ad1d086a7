"""The host's own disks are never handed to a guest (real daemon, guests, loop devices).

A local device the host mounts, swaps on or holds exclusively, the device
that holds ``/``, and a device outside ``[local] allowed_devices`` are
refused with 400 and change nothing; a second node of an attached device is
the same device for every conflict rule.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent.client import ApiError
from tests.conftest import DaemonFactory
from tests.integration.support import Daemon, Guests, LoopDevices, local_request, unique
from tests.integration.test_bad_input import snapshot


def refused(daemon: Daemon, body: dict[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as caught:
        _put(daemon, body)
    return caught.value


def _put(daemon: Daemon, body: dict[str, Any]) -> Any:
    status, reply = daemon.client.request("PUT", f"/v1/attachments/{unique('att')}", body)
    if status >= 400:
        raise ApiError(status, reply["error"]["code"], reply["error"]["message"])
    return reply


@contextlib.contextmanager
def mounted(device: str, point: Path) -> Iterator[None]:
    subprocess.run(["mkfs.ext4", "-q", device], check=True)
    point.mkdir(exist_ok=True)
    subprocess.run(["mount", device, str(point)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(point)], check=True)


@contextlib.contextmanager
def swap_on(device: str) -> Iterator[None]:
    subprocess.run(["mkswap", "-q", device], check=True)
    subprocess.run(["swapon", device], check=True)
    try:
        yield
    finally:
        subprocess.run(["swapoff", device], check=True)


@contextlib.contextmanager
def held_exclusively(device: str) -> Iterator[None]:
    code = (
        f"import os, time; os.open({device!r}, os.O_RDONLY | os.O_EXCL); "
        "print(1, flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"1"
        yield
    finally:
        holder.kill()
        holder.wait()


def root_device() -> str | None:
    """The /dev node of the block device that holds ``/``, if it has one."""
    number = os.stat("/").st_dev
    link = f"/sys/dev/block/{os.major(number)}:{os.minor(number)}"
    if not os.path.exists(link):
        return None
    node = f"/dev/{os.path.basename(os.readlink(link))}"
    return node if os.path.exists(node) else None


@contextlib.contextmanager
def second_node(device: str) -> Iterator[str]:
    """Another device node for ``device`` (same major:minor, another inode)."""
    node = Path(f"/dev/hatest-node-{os.getpid()}")
    node.unlink(missing_ok=True)
    os.mknod(node, 0o600 | 0o060000, os.stat(device).st_rdev)
    try:
        yield str(node)
    finally:
        node.unlink(missing_ok=True)


def test_devices_the_host_uses_are_refused_and_change_nothing(
    daemon: Daemon, guests: Guests, loops: LoopDevices, tmp_path: Path
) -> None:
    guest = guests.make()
    before = snapshot(daemon, guest)
    with mounted(device := loops.make(), tmp_path / "mnt"):
        error = refused(daemon, local_request(device, guest, volume_id="vol-mounted"))
        assert (error.status, error.code) == (400, "invalid_request")
        assert f"it is mounted at {tmp_path / 'mnt'}" in error.message
    with swap_on(device := loops.make()):
        error = refused(daemon, local_request(device, guest, volume_id="vol-swap"))
        assert (error.status, error.code) == (400, "invalid_request")
        assert "active swap" in error.message
    with held_exclusively(device := loops.make()):
        error = refused(daemon, local_request(device, guest, volume_id="vol-excl"))
        assert (error.status, error.code) == (400, "invalid_request")
        assert "exclusively" in error.message
    root = root_device()
    if root is None:
        print("no /dev node holds / on this machine: the root-device case is not run")
    else:
        error = refused(daemon, local_request(root, guest, volume_id="vol-root"))
        assert (error.status, error.code) == (400, "invalid_request")
        assert "it is mounted at /" in error.message
    assert snapshot(daemon, guest) == before


def test_an_allow_list_admits_only_the_devices_it_names(
    daemon_factory: DaemonFactory, guests: Guests, loops: LoopDevices
) -> None:
    allowed, other = loops.make(), loops.make()
    daemon = daemon_factory(**{"local.allowed_devices": allowed})
    guest = guests.make()
    before = snapshot(daemon, guest)
    error = refused(daemon, local_request(other, guest, volume_id="vol-other"))
    assert (error.status, error.code) == (400, "invalid_request")
    assert "allowed_devices" in error.message
    assert snapshot(daemon, guest) == before
    attached = _put(daemon, local_request(allowed, guest, volume_id="vol-allowed"))
    assert attached["state"] == "attached"
    assert daemon.client.detach(attached["attachment_id"]).terminate_connection


def test_a_second_node_of_an_attached_device_is_the_same_device(
    daemon: Daemon, guests: Guests, loops: LoopDevices
) -> None:
    first, second = guests.make(), guests.make()
    device = loops.make()
    attached = _put(daemon, local_request(device, first, volume_id="vol-a"))
    assert attached["connection_key"] == f"local:{device}"
    with second_node(device) as node:
        state = snapshot(daemon, first), len(second.disks())
        same_domain = refused(daemon, local_request(node, first, volume_id="vol-b"))
        assert (same_domain.status, same_domain.code) == (409, "volume_already_attached")
        other_domain = refused(daemon, local_request(node, second, volume_id="vol-a"))
        assert (other_domain.status, other_domain.code) == (409, "volume_not_multiattach")
        assert (snapshot(daemon, first), len(second.disks())) == state
    assert daemon.client.detach(attached["attachment_id"]).terminate_connection


def test_doctor_reports_a_device_the_host_mounted_after_the_attach(
    daemon: Daemon, guests: Guests, loops: LoopDevices, tmp_path: Path
) -> None:
    guest = guests.make()
    device = loops.make()
    subprocess.run(["mkfs.ext4", "-q", device], check=True)
    attached = _put(daemon, local_request(device, guest, volume_id="vol-m"))
    assert not [f for f in daemon.client.doctor().findings if f.kind == "host_uses_device"]
    point = tmp_path / "mnt"
    point.mkdir()
    subprocess.run(["mount", device, str(point)], check=True)
    try:
        [finding] = [f for f in daemon.client.doctor().findings if f.kind == "host_uses_device"]
        assert finding.subject == attached["attachment_id"]
        assert f"mounted at {point}" in finding.detail
    finally:
        subprocess.run(["umount", str(point)], check=True)
    assert daemon.client.detach(attached["attachment_id"]).terminate_connection


def test_a_connection_stored_under_another_node_moves_to_the_kernel_name(
    daemon_factory: DaemonFactory, guests: Guests, loops: LoopDevices
) -> None:
    """State an older version wrote (a local device keyed by the node it was
    named by) keeps working: at start it is keyed by the kernel's name."""
    guest = guests.make()
    device = loops.make()
    daemon = daemon_factory()
    attached = _put(daemon, local_request(device, guest, volume_id="vol-k"))
    assert daemon.stop() == 0
    with second_node(device) as node:
        old_key = f"local:{node}"
        db = sqlite3.connect(daemon.state_dir / "hostagent.sqlite3")
        with db:
            db.execute("PRAGMA foreign_keys = OFF")
            db.execute(
                "UPDATE connections SET connection_key = ?, connection_data = ?",
                (old_key, f'{{"device_path": "{node}"}}'),
            )
            db.execute("UPDATE attachments SET connection_key = ?", (old_key,))
        db.close()
        daemon.start()
        [connection] = daemon.client.connections().connections
        assert connection.connection_key == f"local:{device}"
        assert connection.attachments == [attached["attachment_id"]]
        again = refused(daemon, local_request(node, guest, volume_id="vol-other"))
        assert again.code == "volume_already_attached"
        result = daemon.client.detach(attached["attachment_id"])
        assert (result.connection_key, result.terminate_connection) == (f"local:{device}", True)
