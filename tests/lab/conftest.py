"""The storage lab: tests that boot a Debian VM under QEMU TCG (see README.md).

Every test here is marked ``lab``. They run when asked for, because a run
takes minutes (the first one also builds the cached image):
``pytest tests/lab -m lab`` (any ``-m`` expression naming ``lab``), or
``HOSTAGENT_LAB=1`` in the environment, which ``scripts/test`` (so CI) sets.
A bare ``pytest`` skips them with that hint.

The tests share one VM (``lab_vm``): it boots at the first lab test and
powers off at the end of the session, or after a job that failed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.vm import LabVM

LAB_DIR = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "lab: boots the storage lab VM under QEMU TCG (minutes); "
        "run with `pytest tests/lab -m lab` or HOSTAGENT_LAB=1",
    )


def _lab_requested(config: pytest.Config) -> bool:
    return "lab" in (config.getoption("markexpr") or "") or os.environ.get("HOSTAGENT_LAB") == "1"


def _lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the storage lab needs root (debootstrap, chroot)"
    for tool in ("qemu-system-x86_64", "qemu-img", "mke2fs", "unshare"):
        if shutil.which(tool) is None:
            return f"the storage lab needs {tool}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    requested = _lab_requested(config)
    unavailable = _lab_unavailable()
    for item in items:
        if LAB_DIR not in Path(str(item.fspath)).resolve().parents:
            continue
        item.add_marker(pytest.mark.lab)
        if not requested:
            item.add_marker(
                pytest.mark.skip(
                    reason="storage lab VM (minutes): run `pytest tests/lab -m lab` "
                    "or set HOSTAGENT_LAB=1"
                )
            )
        elif unavailable:
            item.add_marker(pytest.mark.skip(reason=unavailable))


# A mon and an OSD (about 40 and 50 MiB resident, the OSD's 64 MiB bluestore
# cache), libvirtd, two TCG guests and hostagentd: the krbd scenario's needs.
LAB_MEMORY_MB = 3072


@pytest.fixture(scope="session")
def lab_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabVM]:
    """The lab VM every lab test runs its scenario in (booted once, see vm.py)."""
    with LabVM(tmp_path_factory.mktemp("lab") / "share", memory_mb=LAB_MEMORY_MB) as vm:
        yield vm
