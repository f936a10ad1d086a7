"""The ``ceph_cluster`` fixture: one real single-node Ceph cluster per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.ceph.cluster import (
    PACKAGES,
    CephCluster,
    CephError,
    missing_programs,
    qemu_has_rbd,
    reap_stale,
    start_cluster,
)

ROOT_PARENT = Path("/tmp")
ROOT_PREFIX = "hceph-"  # short: admin sockets live under it (108-byte limit)
KEEP_ENV = "HOSTAGENT_CEPH_KEEP"  # set to 1 to keep the cluster's directory (logs) after the run


def _require_packages() -> None:
    problems = []
    missing = missing_programs()
    if missing:
        problems.append(f"programs not found: {', '.join(missing)}")
    if not qemu_has_rbd():
        problems.append("qemu-img lists no 'rbd' format (QEMU's rbd block driver is missing)")
    if problems:
        pytest.fail(
            "the Ceph tests need the Debian packages "
            f"{' '.join(PACKAGES)}: {'; '.join(problems)}. Run scripts/setup-host.",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def ceph_cluster(request: pytest.FixtureRequest) -> CephCluster:
    """A running mon + bluestore OSD on 127.0.0.1 with cephx, and an initialised pool ``rbd``.

    Lives under /tmp/hceph-*; stopped and removed at the end of the session,
    also when tests fail. Clusters left by a killed earlier run are reaped first.
    """
    _require_packages()
    reap_stale(ROOT_PARENT, ROOT_PREFIX)
    root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX, dir=ROOT_PARENT))
    try:
        cluster = start_cluster(root)
    except CephError as exc:
        pytest.fail(str(exc), pytrace=False)
    keep = os.environ.get(KEEP_ENV) == "1"
    request.addfinalizer(lambda: cluster.stop(remove=not keep))
    return cluster
