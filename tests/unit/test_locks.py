"""locks/: one lock per key; different keys never wait on each other."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hostagent.locks import _IN_PROCESS, HostLocks, lock_file_name, state_dir_guard


def test_lock_file_names_are_safe_and_distinct() -> None:
    a = lock_file_name("connection", "local:/dev/loop1")
    b = lock_file_name("connection", "local:/dev/loop1/")
    assert "/" not in a and ":" not in a
    assert a != b
    assert a.startswith("connection-")


def test_same_key_serialises_other_keys_do_not(tmp_path: Path) -> None:
    locks = HostLocks(tmp_path / "locks")
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with locks.connection("local:/dev/loop1"):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)

    other_done = threading.Event()

    def other_key() -> None:
        with locks.connection("local:/dev/loop2"), locks.domain("dom-1"):
            other_done.set()

    threading.Thread(target=other_key).start()
    assert other_done.wait(5), "a different key waited on the held one"

    same_done = threading.Event()

    def same_key() -> None:
        with locks.connection("local:/dev/loop1"):
            same_done.set()

    waiter = threading.Thread(target=same_key)
    waiter.start()
    assert not same_done.wait(0.3), "the same key did not wait"
    release.set()
    assert same_done.wait(5)
    holder.join()
    waiter.join()
    assert any(p.name.startswith("hostagent-connection-") for p in (tmp_path / "locks").iterdir())


def test_state_dir_guard_refuses_a_second_holder(tmp_path: Path) -> None:
    probe = (
        "import sys; from pathlib import Path; from hostagent.locks import state_dir_guard\n"
        "with state_dir_guard(Path(sys.argv[1])): pass"
    )
    with state_dir_guard(tmp_path):
        second = subprocess.run(
            [sys.executable, "-c", probe, str(tmp_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert second.returncode != 0
        assert "another hostagentd holds" in second.stderr
    free = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)], capture_output=True, check=False
    )
    assert free.returncode == 0


def test_with_the_state_dir_held_locks_are_in_process_and_leave_nothing(
    tmp_path: Path,
) -> None:
    with state_dir_guard(tmp_path) as held:
        locks = HostLocks(tmp_path / "locks", held=held)
        order: list[str] = []
        entered = threading.Event()

        def hold() -> None:
            with locks.domain("dom-1"):
                entered.set()
                order.append("first in")
                time.sleep(0.2)
                order.append("first out")

        holder = threading.Thread(target=hold)
        holder.start()
        assert entered.wait(5)
        with locks.connection("local:/dev/loop1"):
            order.append("other key")  # does not wait for dom-1
        with locks.domain("dom-1"):
            order.append("second in")
        holder.join()
        assert order == ["first in", "other key", "first out", "second in"]
        assert list((tmp_path / "locks").iterdir()) == [], "no lock files"
        assert _IN_PROCESS._locks == {}, "a lock lives only while used"


def test_held_locks_need_the_held_state_dir(tmp_path: Path) -> None:
    with state_dir_guard(tmp_path) as held, pytest.raises(ValueError, match="not the lock dir"):
        HostLocks(tmp_path / "elsewhere" / "locks", held=held)
