"""Unit-test fixtures that need a real block device (tests run as root)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A real block device: a loop device over a small sparse file."""
    backing = tmp_path / "backing.img"
    with backing.open("wb") as f:
        f.truncate(1024 * 1024)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    yield device
    subprocess.run(["losetup", "-d", device], check=False)
