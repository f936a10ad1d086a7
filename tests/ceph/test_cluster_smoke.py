"""The Ceph fixture works: a real QEMU opens, writes and reads an RBD image with a cephx user key.

QEMU goes through librbd exactly as a libvirt guest with
``<disk type='network'><source protocol='rbd' name='pool/image'><host .../>``
and ``<auth username=...><secret type='ceph' .../>`` does: the same block
driver (qemu-block-extra's block-rbd.so), the same options (pool, image,
user, server.N.host/port, key-secret naming a base64 ``secret`` object).
"""

from __future__ import annotations

import datetime
import itertools
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.ceph import cluster as cluster_module
from tests.ceph.cluster import PACKAGES, CephCluster, CephError, start_cluster

POOL = "volumes"
USER = "cinder"
_names = itertools.count()


def image_name() -> str:
    return f"img{next(_names)}"


def qemu_args(cluster: CephCluster, pool: str, image: str, user: str, key: str) -> list[str]:
    """``--object secret ... --image-opts driver=rbd,...``: what libvirt gives QEMU."""
    return [
        "--object",
        f"secret,id=sec0,format=base64,data={key}",
        "--image-opts",
        f"driver=rbd,pool={pool},image={image},user={user},key-secret=sec0,"
        f"server.0.host={cluster.mon_host},server.0.port={cluster.mon_port}",
    ]


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def ok(*argv: str, timeout: float = 60) -> str:
    proc = run(*argv, timeout=timeout)
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}: {proc.stdout}{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def pool(ceph_cluster: CephCluster) -> str:
    ceph_cluster.create_pool(POOL)
    return POOL


@pytest.fixture(scope="module")
def key(ceph_cluster: CephCluster, pool: str) -> str:
    return ceph_cluster.client_key(USER, pool)


def test_cluster_is_up_with_cephx(ceph_cluster: CephCluster) -> None:
    status = ceph_cluster.ceph("-s")
    assert "1 osds: 1 up" in status and "1 in" in status, status
    assert "HEALTH_OK" in ceph_cluster.ceph("health")
    for option in ("auth_cluster_required", "auth_service_required", "auth_client_required"):
        got = ceph_cluster.ceph("tell", "mon.a", "config", "get", option, "--format", "json")
        assert '"cephx"' in got, got


def test_qemu_img_opens_image_with_client_key(
    ceph_cluster: CephCluster, pool: str, key: str
) -> None:
    name = image_name()
    assert ceph_cluster.create_image(pool, name, size_mb=64) == f"{pool}/{name}"

    info = ok("qemu-img", "info", "--output=json", *qemu_args(ceph_cluster, pool, name, USER, key))
    assert '"virtual-size": 67108864' in info
    assert '"format": "rbd"' in info

    # The legacy filename syntax as well (what `rbd:` strings in old XML become).
    mon = f"{ceph_cluster.mon_host}\\:{ceph_cluster.mon_port}"
    legacy = f"rbd:{pool}/{name}:id={USER}:key={key}:mon_host={mon}"
    assert "virtual size: 64 MiB" in ok("qemu-img", "info", legacy)


def test_qemu_io_writes_and_reads_back(
    ceph_cluster: CephCluster, pool: str, key: str, tmp_path: Path
) -> None:
    name = image_name()
    ceph_cluster.create_image(pool, name)
    args = qemu_args(ceph_cluster, pool, name, USER, key)

    assert "wrote 4096/4096 bytes" in ok("qemu-io", *args, "-c", "write -P 0xab 0 4k")
    # A second QEMU process reads it back (qemu-io -P verifies the pattern, exit 1 if not).
    assert "read 4096/4096 bytes" in ok("qemu-io", *args, "-c", "read -P 0xab 0 4k")
    assert run("qemu-io", *args, "-c", "read -P 0xcd 0 4k").returncode != 0

    # And librbd through the admin's rbd CLI sees the same bytes.
    exported = tmp_path / "export.raw"
    ceph_cluster.rbd("export", "--no-progress", f"{pool}/{name}", str(exported))
    with exported.open("rb") as f:
        head = f.read(8192)
    assert head[:4096] == b"\xab" * 4096
    assert head[4096:] == b"\0" * 4096


def test_key_is_enforced(ceph_cluster: CephCluster, pool: str, key: str) -> None:
    """cephx is real: a wrong key cannot connect, a user without caps on the pool cannot read."""
    name = image_name()
    ceph_cluster.create_image(pool, name)
    other_key = ceph_cluster.client_key("elsewhere", "rbd")

    wrong_key = run("qemu-img", "info", *qemu_args(ceph_cluster, pool, name, USER, other_key))
    assert wrong_key.returncode != 0
    assert "Permission denied" in wrong_key.stderr, wrong_key.stderr

    no_caps = run("qemu-img", "info", *qemu_args(ceph_cluster, pool, name, "elsewhere", other_key))
    assert no_caps.returncode != 0
    assert "Operation not permitted" in no_caps.stderr, no_caps.stderr


def test_watchers_show_who_has_the_image_open(
    ceph_cluster: CephCluster, pool: str, key: str
) -> None:
    name = image_name()
    ceph_cluster.create_image(pool, name)
    assert ceph_cluster.image_watchers(pool, name) == []

    # qemu-io without -c keeps the image open (read-write) until "quit" on stdin.
    holder = subprocess.Popen(
        ["qemu-io", *qemu_args(ceph_cluster, pool, name, USER, key)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        watchers = ceph_cluster.image_watchers(pool, name)
        while not watchers and time.monotonic() < deadline and holder.poll() is None:
            time.sleep(0.1)
            watchers = ceph_cluster.image_watchers(pool, name)
        assert len(watchers) == 1, watchers
        assert watchers[0].startswith("127.0.0.1:")
    finally:
        out, _ = holder.communicate("quit\n", timeout=30)
    assert holder.returncode == 0, out
    assert ceph_cluster.image_watchers(pool, name) == []


def test_second_cluster_on_taken_ports_moves_to_free_ones(
    ceph_cluster: CephCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mon whose port got taken (here: by the session's cluster, behind the free-port
    check's back) fails at once, and start_cluster starts over on other ports."""
    monkeypatch.setattr(cluster_module, "DEFAULT_MON_PORT", ceph_cluster.mon_port)
    monkeypatch.setattr(cluster_module, "DEFAULT_MON_V2_PORT", ceph_cluster.mon_v2_port)
    monkeypatch.setattr(cluster_module, "_port_free", lambda port: True)
    root = Path(tempfile.mkdtemp(prefix="hceph-", dir="/tmp"))
    try:
        second = start_cluster(root)
    except CephError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        assert second.timings["attempts"] == 2
        assert second.mon_port != ceph_cluster.mon_port
        assert second.mon_v2_port != ceph_cluster.mon_v2_port
        second.create_image("rbd", "x", size_mb=8)
        k = second.client_key("u", "rbd")
        info = ok("qemu-img", "info", "--output=json", *qemu_args(second, "rbd", "x", "u", k))
        assert '"virtual-size": 8388608' in info
    finally:
        second.stop()
    assert not root.exists()


def apt_install_seconds(package: str) -> float | None:
    """How long the apt run that installed ``package`` took, from /var/log/apt/history.log."""
    try:
        text = Path("/var/log/apt/history.log").read_text(errors="replace")
    except OSError:
        return None
    found = None
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.strip().splitlines() if ": " in line)
        if f"{package}:" in fields.get("Install", "") and "End-Date" in fields:
            fmt = "%Y-%m-%d  %H:%M:%S"
            start = datetime.datetime.strptime(fields["Start-Date"], fmt)
            end = datetime.datetime.strptime(fields["End-Date"], fmt)
            found = (end - start).total_seconds()
    return found


def test_report_costs(ceph_cluster: CephCluster, capsys: pytest.CaptureFixture[str]) -> None:
    """Print what the fixture costs: install time, start time, memory, version."""
    rss = ceph_cluster.daemon_rss_kib()
    assert set(rss) == {"mon.a", "osd.0"}
    install = apt_install_seconds("ceph-osd")
    version = ceph_cluster.ceph("--version").strip()
    t = ceph_cluster.timings
    lines = [
        f"ceph: {version}",
        "apt install of " + " ".join(PACKAGES) + ": "
        + (f"{install:.0f} s" if install is not None else "not found in apt history"),
        f"cluster start: {t['total']:.1f} s (mon {t['mon']:.1f} s, osd mkfs done "
        f"{t['osd_mkfs_done']:.1f} s, osd up {t['osd_up']:.1f} s, pool rbd ready "
        f"{t['pool_ready']:.1f} s)",
        "daemon RSS: " + ", ".join(f"{n} {kib // 1024} MiB" for n, kib in rss.items())
        + f"; total {sum(rss.values()) // 1024} MiB",
        f"disk allocated under {ceph_cluster.root}: {ceph_cluster.disk_usage_mib()} MiB",
        f"mon: v1 {ceph_cluster.mon_addr}, v2 {ceph_cluster.mon_host}:{ceph_cluster.mon_v2_port}",
    ]  # fmt: skip
    with capsys.disabled():
        print("\n" + "\n".join(f"[ceph fixture] {line}" for line in lines))


def test_a_killed_osd_mkfs_leaves_no_process_behind() -> None:
    """What start_cluster does to the mkfs of an attempt that failed: kill it.
    Nothing of it may go on writing into the next attempt's OSD dir (a
    daemonizing ceph-osd left a child that did: 'couldn't mount ObjectStore')."""
    root = Path(tempfile.mkdtemp(prefix="hceph-", dir="/tmp"))
    try:
        cluster = cluster_module._lay_out(root, avoid=set())
        osd_uuid = str(uuid.uuid4())
        mkfs = cluster_module.start_osd_mkfs(cluster, osd_uuid)
        time.sleep(0.1)  # long enough for a daemonizing ceph-osd to have forked
        mkfs.kill()
        mkfs.wait()
        time.sleep(0.2)
        left = [
            proc.parent.name
            for proc in Path("/proc").glob("[0-9]*/cmdline")
            if osd_uuid.encode() in _read_or_empty(proc)
        ]
        assert left == [], f"ceph-osd --mkfs processes outlived the kill: pids {left}"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
