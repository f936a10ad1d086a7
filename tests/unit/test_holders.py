"""host/holders.py: a process with many descriptors is searched once while
it does not run, and searched again as soon as it has run."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.host import holders
from hostagent.host.holders import HolderSearch

# Opens 40 descriptors, then on each line of stdin opens the path it names
# (keeping it open) and answers "ok"; otherwise it sleeps in a read.
HOLDER = """
import os, sys
kept = [os.open("/dev/null", os.O_RDONLY) for _ in range(40)]
print("ready", flush=True)
for line in sys.stdin:
    kept.append(os.open(line.strip(), os.O_RDONLY))
    print("ok", flush=True)
"""


class CountedSearches:
    """Counts the descriptor walks the search makes, by pid."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.walks: list[str] = []
        walk = holders._block_devices_open

        def counted(proc_dir: str) -> tuple[frozenset[int], int] | None:
            self.walks.append(proc_dir.rsplit("/", 1)[1])
            return walk(proc_dir)

        monkeypatch.setattr(holders, "_block_devices_open", counted)


def blocked_in_read(process: subprocess.Popen[str]) -> None:
    """Wait until the holder sleeps in its read of stdin. Its answer comes a few
    instructions before that read: a search made in between would see it still
    running (so not idle), whatever the machine's load."""
    deadline = time.monotonic() + 10
    while not Path(f"/proc/{process.pid}/syscall").read_text().startswith("0 0x0 "):
        assert time.monotonic() < deadline, "the holder never blocked in read(0, ...)"
        time.sleep(0.005)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    blocked_in_read(process)
    yield process
    process.kill()
    process.wait()


def opens(process: subprocess.Popen[str], path: str) -> None:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(path + "\n")
    process.stdin.flush()
    assert process.stdout.readline().strip() == "ok"
    blocked_in_read(process)


def test_a_process_that_has_not_run_is_not_searched_again(
    sleeper: subprocess.Popen[str], loop_device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = CountedSearches(monkeypatch)
    search = HolderSearch(remember_from=32)
    pid = str(sleeper.pid)
    assert search.holding(loop_device) == []
    assert search.holding(loop_device) == []
    assert counted.walks.count(pid) == 1, "remembered: its threads did not run"
    opens(sleeper, loop_device)  # it runs, and opens the device
    [found] = search.holding(loop_device)
    assert found.pid == sleeper.pid
    assert counted.walks.count(pid) == 2
    [again] = search.holding(loop_device)  # remembered as a holder now
    assert again.pid == sleeper.pid
    assert counted.walks.count(pid) == 2


def test_a_process_with_few_descriptors_is_searched_every_time(
    sleeper: subprocess.Popen[str], loop_device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = CountedSearches(monkeypatch)
    search = HolderSearch(remember_from=1000)
    search.holding(loop_device)
    search.holding(loop_device)
    assert counted.walks.count(str(sleeper.pid)) == 2


def test_the_pids_of_a_grace_are_searched_afresh(
    sleeper: subprocess.Popen[str], loop_device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = CountedSearches(monkeypatch)
    search = HolderSearch(remember_from=32)
    search.holding(loop_device)
    search.holding(loop_device, among=[sleeper.pid])
    assert counted.walks.count(str(sleeper.pid)) == 2


def test_a_process_gone_is_forgotten(loop_device: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    search = HolderSearch(remember_from=32)
    opens(process, loop_device)
    assert [h.pid for h in search.holding(loop_device)] == [process.pid]
    process.kill()
    process.wait()
    assert search.holding(loop_device) == []
