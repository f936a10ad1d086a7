"""bench/floor.patch still applies: the README's floor figures can only be
measured again (bench/floor.sh) while it does."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# safe.directory: a checkout owned by another user is still ours to read
GIT = ("git", "-c", "safe.directory=*", "-C", str(REPO))


def test_the_floor_patch_applies_to_this_tree() -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: `git apply --check` needs one")
    result = subprocess.run(
        [*GIT, "apply", "--check", "bench/floor.patch"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, (
        f"{result.stderr}\nmend bench/floor.patch so it skips the same steps again"
    )
