"""The state dir at start (issue 14, items 5 and 6): a first start that could not
serve still leaves the next start its warning about ``ua-`` disks nobody
recorded, and a state dir others may read or write is refused."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.support import Daemon, Guests, LoopDevices, hand_made_disk

# Other tests' guests on this libvirtd may be named in the same warning.
WARNING = "disks made by hostagent ("


@pytest.fixture
def daemon(short_dir: Path) -> Iterator[Daemon]:
    made = Daemon(short_dir / "state", short_dir / "d.sock", short_dir / "daemon.log")
    yield made
    assert made.stop() == 0


def starts_and_logs(daemon: Daemon) -> str:
    """Start ``daemon``; what it logged in this start."""
    before = len(daemon.log())
    daemon.start()
    return daemon.log()[before:]


def test_a_first_start_that_could_not_serve_leaves_the_warning_to_the_next(
    daemon: Daemon, guests: Guests, loops: LoopDevices
) -> None:
    holder = guests.make()
    holder.attach_raw(
        hand_made_disk(loops.make(), target_dev="sdb", unit=1, alias="ua-left-behind")
    )
    taken = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    taken.bind(str(daemon.socket_path))
    taken.listen(1)
    try:
        # run to its end: a health check would wait on the socket nobody answers
        failed = daemon.run_once()
    finally:
        taken.close()
        daemon.socket_path.unlink()
    assert failed.returncode == 1, failed.stderr
    assert "another server is listening" in failed.stderr
    assert (daemon.state_dir / "hostagent.sqlite3").exists(), "the failed start left its state"

    second = starts_and_logs(daemon)
    assert WARNING in second and f"ua-left-behind on {holder.name}" in second, second
    assert daemon.stop() == 0
    assert WARNING not in starts_and_logs(daemon), "a start that served has looked already"


@pytest.mark.parametrize("mode", [0o777, 0o750])
def test_a_state_dir_others_may_use_is_refused(daemon: Daemon, mode: int) -> None:
    daemon.state_dir.mkdir()
    daemon.state_dir.chmod(mode)
    with pytest.raises(RuntimeError) as failed:
        daemon.start()
    assert f"state dir {daemon.state_dir} has mode {mode:04o}" in str(failed.value)
    assert "must be 0700" in str(failed.value)
    assert list(daemon.state_dir.iterdir()) == [], "nothing was written into it"

    daemon.state_dir.chmod(0o700)
    daemon.start()
