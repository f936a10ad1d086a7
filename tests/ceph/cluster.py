"""A real, throwaway, single-node Ceph cluster: one mon and one bluestore OSD on 127.0.0.1.

Everything lives under one directory (``root``): the ceph.conf, the keyrings,
the mon store, the OSD's sparse block file, admin sockets, pid files and logs.
Nothing is read from or written to /etc/ceph or /var/lib/ceph. The daemons run
in the foreground as children of the test process (each in its own session),
so :meth:`CephCluster.stop` can always kill them; :func:`reap_stale` kills the
daemons of an earlier run whose test process died without stopping them.

The cluster is driven with the ``ceph``/``rbd`` command-line tools, which run
under the system python that has the rados bindings (the project's virtualenv
has none). No ceph-mgr runs: pool creation, ``rbd pool init``, images, cephx
users and watchers are all mon/OSD work. See tests/ceph/README.md.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MON_ID = "a"
OSD_ID = 0
DEFAULT_MON_PORT = 6789  # msgr v1: what libvirt's <host name=... port='6789'/> means
DEFAULT_MON_V2_PORT = 3300
OSD_BLOCK_SIZE = 10 * 1024**3  # sparse; a few hundred MiB get written
DEFAULT_POOL = "rbd"  # made and initialised by start_cluster as its readiness probe

# What start_cluster runs; the Debian packages that ship them.
PROGRAMS = {
    "ceph": "ceph-common",
    "rbd": "ceph-common",
    "rados": "ceph-common",
    "monmaptool": "ceph-base",
    "ceph-mon": "ceph-mon",
    "ceph-osd": "ceph-osd",
}
PACKAGES = ("ceph-mon", "ceph-osd", "ceph-common", "qemu-block-extra")


class CephError(RuntimeError):
    """A ceph command failed, or the cluster did not come up (with the daemons' log tails)."""


def missing_programs() -> list[str]:
    return [name for name in PROGRAMS if shutil.which(name) is None]


def qemu_has_rbd() -> bool:
    """Whether QEMU's block layer has the rbd driver (Debian: qemu-block-extra)."""
    try:
        out = subprocess.run(
            ["qemu-img", "--help"], capture_output=True, text=True, check=False
        ).stdout
    except FileNotFoundError:
        return False
    for line in out.splitlines():
        if line.startswith("Supported formats:"):
            return "rbd" in line.split()
    return False


def _cephx_key() -> str:
    """A cephx secret as ceph-authtool --gen-print-key prints it.

    CryptoKey encoding: le16 type (1 = AES), utime (le32 sec, le32 nsec),
    le16 length, 16 random bytes; base64.
    """
    now = time.time()
    raw = struct.pack("<HIIH", 1, int(now), 0, 16) + secrets.token_bytes(16)
    return base64.b64encode(raw).decode()


def _keyring_entry(name: str, key: str, caps: dict[str, str]) -> str:
    lines = [f"[{name}]", f"\tkey = {key}"]
    lines += [f'\tcaps {kind} = "{cap}"' for kind, cap in caps.items()]
    return "\n".join(lines) + "\n"


def _port_free(port: int) -> bool:
    # SO_REUSEADDR like the ceph messenger's listening sockets: a port with
    # only TIME_WAIT connections left from an earlier cluster is free for it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _pick_port(preferred: int, taken: set[int]) -> int:
    if preferred not in taken and _port_free(preferred):
        return preferred
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in taken:
            return port
    raise CephError("no free TCP port on 127.0.0.1")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CEPH_ARGS", "CEPH_CONF")}
    env.pop("PYTHONPATH", None)  # the ceph CLI is a /usr/bin/python3 script
    env.pop("PYTHONHOME", None)
    return env


def _rss_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class CephCluster:
    root: Path
    conf: Path
    mon_host: str
    mon_port: int
    fsid: str
    mon_v2_port: int = DEFAULT_MON_V2_PORT
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)
    timings: dict[str, float] = field(default_factory=dict)  # seconds since start

    # -- running the tools ---------------------------------------------------

    def _run(self, argv: list[str], timeout: float = 60) -> str:
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=_clean_env(),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise CephError(f"{' '.join(argv)}: no answer in {timeout:.0f} s") from exc
        if proc.returncode != 0:
            raise CephError(
                f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
            )
        return proc.stdout

    def ceph(self, *args: str, timeout: float = 60) -> str:
        """``ceph -c conf ARGS`` as client.admin; its stdout."""
        return self._run(
            ["ceph", "-c", str(self.conf), "--connect-timeout", str(int(timeout)), *args],
            timeout=timeout + 5,
        )

    def rbd(self, *args: str, timeout: float = 60) -> str:
        """``rbd -c conf ARGS`` as client.admin; its stdout."""
        return self._run(["rbd", "-c", str(self.conf), *args], timeout=timeout)

    def rados(self, *args: str, timeout: float = 60) -> str:
        return self._run(["rados", "-c", str(self.conf), *args], timeout=timeout)

    # -- what tests use ------------------------------------------------------

    @property
    def mon_addr(self) -> str:
        """``host:port`` of the mon's msgr v1 address, as librbd's mon_host takes it."""
        return f"{self.mon_host}:{self.mon_port}"

    def create_pool(self, name: str) -> None:
        """Create a replicated pool (size 1, 8 PGs) tagged for rbd. Idempotent.

        ``rbd pool init`` writes to the pool, so it also waits for its PGs to peer.
        """
        self.ceph("osd", "pool", "create", name, "8", "8", "replicated")
        self.rbd("pool", "init", name)

    def create_image(self, pool: str, name: str, size_mb: int = 64) -> str:
        """Create an rbd image (default features); returns ``pool/name``."""
        spec = f"{pool}/{name}"
        self.rbd("create", "--size", f"{size_mb}M", spec)
        return spec

    def remove_image(self, pool: str, name: str) -> None:
        self.rbd("rm", "--no-progress", f"{pool}/{name}")

    def client_key(self, user: str, pool: str) -> str:
        """The cephx key of ``client.<user>`` with rbd caps on ``pool``, made if needed.

        Caps: mon 'profile rbd', osd 'profile rbd pool=<pool>' (what OpenStack's
        cinder/nova users get). A user that exists already gets ``pool`` added to
        its osd caps if it lacks it.
        """
        entity = f"client.{user}"
        grant = f"profile rbd pool={pool}"
        try:
            key = self.ceph(
                "auth", "get-or-create-key", entity, "mon", "profile rbd", "osd", grant
            )
        except CephError as exc:
            if "does not match" not in str(exc):
                raise
            info = json.loads(self.ceph("auth", "get", entity, "--format", "json"))
            osd_caps = info[0]["caps"].get("osd", "")
            if grant not in [c.strip() for c in osd_caps.split(",")]:
                osd_caps = f"{osd_caps}, {grant}" if osd_caps else grant
            mon_caps = info[0]["caps"].get("mon", "profile rbd")
            self.ceph("auth", "caps", entity, "mon", mon_caps, "osd", osd_caps)
            key = self.ceph("auth", "print-key", entity)
        return key.strip()

    def image_watchers(self, pool: str, name: str) -> list[str]:
        """Addresses of the clients watching the image, i.e. that have it open read-write.

        A client that dies without closing stays listed until the OSD times its
        watch out (osd_client_watch_timeout, 30 s); ``rbd status`` then drops it.
        """
        status = json.loads(self.rbd("status", "--format", "json", f"{pool}/{name}"))
        return [str(w["address"]) for w in status.get("watchers", [])]

    def daemon_rss_kib(self) -> dict[str, int]:
        """Resident memory of each running daemon, KiB."""
        return {
            name: _rss_kib(proc.pid)
            for name, proc in self.processes.items()
            if proc.poll() is None
        }

    def disk_usage_mib(self) -> int:
        """Space allocated under ``root`` (the OSD's block file is sparse), MiB."""
        total = sum(p.stat().st_blocks * 512 for p in self.root.rglob("*") if p.is_file())
        return total // 2**20

    def log_tails(self, lines: int = 25) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            if path.name.startswith("client."):
                continue
            tail = _tail(path, lines)
            if tail:
                parts.append(f"--- {path.name} (last {lines} lines)\n{tail}")
        return "\n".join(parts)

    def stop(self, remove: bool = True) -> None:
        """Stop the daemons, newest first, then remove ``root``. Idempotent.

        The OSD goes first: on SIGTERM it tells the mon it is going down and
        waits up to osd_mon_shutdown_timeout (5 s) for an answer, so with the
        mon gone already every stop would take 5 s. A daemon still running
        5 s after SIGTERM is killed.
        """
        for name in reversed(list(self.processes)):
            proc = self.processes.pop(name)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- start-up ------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = self.root / "log" / f"{name}.stderr"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_clean_env(),
                start_new_session=True,
            )
        self.processes[name] = proc
        (self.root / "run" / f"{name}.fixture-pid").write_text(f"{proc.pid}\n")
        return proc

    def _check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise CephError(f"{name} exited {proc.returncode}")

    def _wait(self, what: str, deadline: float, probe: Iterator[bool]) -> None:
        for ok in probe:
            if ok:
                return
            self._check_alive()
            if time.monotonic() > deadline:
                raise CephError(f"timed out waiting for {what}")
            time.sleep(0.2)

    def _mon_answers(self) -> Iterator[bool]:
        while True:
            try:
                self.ceph("mon", "stat", timeout=3)
            except CephError:
                yield False
            else:
                yield True

    def _osd_up_in(self) -> Iterator[bool]:
        while True:
            stat = json.loads(self.ceph("osd", "stat", "--format", "json", timeout=10))
            yield stat.get("num_up_osds") == 1 and stat.get("num_in_osds") == 1


def _conf_text(root: Path, fsid: str, mon_port: int, mon_v2_port: int) -> str:
    return f"""\
# Written by tests/ceph/cluster.py: a throwaway single-node cluster.
[global]
fsid = {fsid}
mon_host = [v2:127.0.0.1:{mon_v2_port},v1:127.0.0.1:{mon_port}]
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
run_dir = {root}/run
pid_file = {root}/run/$name.pid
log_file = {root}/log/$name.log
crash_dir = {root}/crash
mon_cluster_log_file = {root}/log/cluster.log
log_to_stderr = false
err_to_stderr = true
# one OSD: replicas of 1, OSDs (not hosts) as the failure domain
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
# quiet the health warnings this layout raises by design
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
mon_data_avail_warn = 2
mon_data_avail_crit = 1
# no mgr runs: without this the mon reports "no active mgr" 2 minutes in
mon_mgr_mkfs_grace = 31536000
# commit map changes (OSD boot, pool create) every 0.1 s, not every 1 s
paxos_propose_interval = 0.1

[mon]
admin_socket = {root}/run/$name.asok
# a taken port fails the mon at once (not after 3 binds 5 s apart): start_cluster retries
ms_bind_retry_count = 1

[mon.{MON_ID}]
mon_data = {root}/mon/{MON_ID}
keyring = {root}/mon/{MON_ID}/keyring

[osd]
admin_socket = {root}/run/$name.asok
osd_objectstore = bluestore
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
# small footprint: no cache autotuning towards osd_memory_target (4 GiB)
bluestore_cache_autotune = false
bluestore_cache_size = 64M
osd_memory_target = 939524096
# one op shard: each shard opens the block file at start (~0.3 s each, 5 on "HDD")
osd_op_num_shards = 1
osd_op_num_threads_per_shard = 2
# start-up time: no fsck after mkfs; closing the block file waits out one
# io_getevents poll (250 ms by default) and mkfs+start open it a dozen times
bluestore_fsck_on_mkfs = false
bdev_aio_poll_ms = 50

[osd.{OSD_ID}]
osd_data = {root}/osd/{OSD_ID}
keyring = {root}/osd/{OSD_ID}/keyring
bluestore_block_path = {root}/osd/block.{OSD_ID}
bluestore_block_size = {OSD_BLOCK_SIZE}
bluestore_block_create = true
osd_journal = {root}/osd/{OSD_ID}/journal

[client]
log_file = {root}/log/$name.log

[client.admin]
keyring = {root}/ceph.client.admin.keyring
"""


def start_cluster(root: Path, timeout: float = 120) -> CephCluster:
    """Build and start a one-mon, one-OSD cluster under ``root`` (empty or absent).

    Returns once ``ceph osd stat`` shows 1 OSD up and in and the pool ``rbd``
    has been created and initialised (a write through the OSD). The mon takes
    127.0.0.1:6789 (v1) and :3300 (v2) if free, else free ports (see
    ``mon_port``/``mon_v2_port``); a port taken between the check and the
    mon's bind makes it start again on other ports. On failure the daemons
    are killed, ``root`` is removed and a :class:`CephError` carries the last
    lines of their logs.
    """
    missing = missing_programs()
    if missing:
        raise CephError(f"ceph programs not found: {', '.join(missing)}")
    root = root.resolve()
    if root.exists() and any(root.iterdir()):
        raise CephError(f"{root} is not empty")
    root.mkdir(parents=True, exist_ok=True)
    (root / "owner.pid").write_text(f"{os.getpid()}\n")  # see reap_stale

    started = time.monotonic()
    deadline = started + timeout
    avoid: set[int] = set()
    attempts = 3
    for attempt in range(1, attempts + 1):
        cluster = _lay_out(root, avoid)
        try:
            _bootstrap(cluster, deadline)
        except BaseException as exc:
            logs = cluster.log_tails()
            cluster.stop(remove=False)
            if (
                isinstance(exc, CephError)
                and attempt < attempts
                and "Address already in use" in logs
            ):
                avoid |= {cluster.mon_port, cluster.mon_v2_port}
                _empty(root, keep={"owner.pid"})
                continue
            shutil.rmtree(root, ignore_errors=True)
            if isinstance(exc, CephError | subprocess.SubprocessError | OSError):
                raise CephError(f"ceph cluster did not start: {exc}\n{logs}") from exc
            raise
        cluster.timings["total"] = time.monotonic() - started
        cluster.timings["attempts"] = attempt
        return cluster
    raise AssertionError("unreachable")


def _empty(root: Path, keep: set[str]) -> None:
    for path in root.iterdir():
        if path.name in keep:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _lay_out(root: Path, avoid: set[int]) -> CephCluster:
    """Directories, ports and ceph.conf of a new cluster under ``root``."""
    for sub in ("run", "log", "crash", f"mon/{MON_ID}", f"osd/{OSD_ID}"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    mon_port = _pick_port(DEFAULT_MON_PORT, avoid)
    mon_v2_port = _pick_port(DEFAULT_MON_V2_PORT, avoid | {mon_port})
    fsid = str(uuid.uuid4())
    conf = root / "ceph.conf"
    conf.write_text(_conf_text(root, fsid, mon_port, mon_v2_port))
    return CephCluster(
        root=root,
        conf=conf,
        mon_host="127.0.0.1",
        mon_port=mon_port,
        fsid=fsid,
        mon_v2_port=mon_v2_port,
    )


def start_osd_mkfs(cluster: CephCluster, osd_uuid: str) -> subprocess.Popen[bytes]:
    """``ceph-osd --mkfs`` for the cluster's OSD, output to log/osd-mkfs.stderr.

    ``-f``: without it ceph-osd daemonizes, even for --mkfs, and the forked
    child (its own session) outlives a kill of the process we started; on a
    retried start it then finished its mkfs in the next attempt's fresh OSD
    dir (a stray ``mkfs_done`` and no ``block``: "couldn't mount ObjectStore").
    """
    mkfs_log = cluster.root / "log" / "osd-mkfs.stderr"
    with mkfs_log.open("wb") as out:
        return subprocess.Popen(
            [
                "ceph-osd",
                "-f",
                "-c",
                str(cluster.conf),
                "-i",
                str(OSD_ID),
                "--mkfs",
                "--osd-uuid",
                osd_uuid,
                "--no-mon-config",
                "--setuser",
                "root",
                "--setgroup",
                "root",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_clean_env(),
            start_new_session=True,
        )


def _bootstrap(cluster: CephCluster, deadline: float) -> None:
    root, conf = cluster.root, str(cluster.conf)
    t0 = time.monotonic()
    as_root = ["--setuser", "root", "--setgroup", "root"]

    # Keys. The mon's initial keyring holds every entity it must know at
    # mkfs: itself and client.admin. The OSD's key is registered with `osd new`.
    mon_key, admin_key, osd_key = _cephx_key(), _cephx_key(), _cephx_key()
    admin_entry = _keyring_entry(
        "client.admin",
        admin_key,
        {"mds": "allow *", "mgr": "allow *", "mon": "allow *", "osd": "allow *"},
    )
    (root / "ceph.client.admin.keyring").write_text(admin_entry)
    mon_keyring = root / "mon.keyring"
    mon_keyring.write_text(_keyring_entry("mon.", mon_key, {"mon": "allow *"}) + admin_entry)
    osd_dir = root / "osd" / str(OSD_ID)
    (osd_dir / "keyring").write_text(_keyring_entry(f"osd.{OSD_ID}", osd_key, {}))
    osd_uuid = str(uuid.uuid4())

    # The OSD's mkfs needs no mon (--no-mon-config): run it while the mon starts.
    osd_mkfs = start_osd_mkfs(cluster, osd_uuid)
    try:
        monmap = root / "monmap"
        addrs = f"[v2:127.0.0.1:{cluster.mon_v2_port},v1:127.0.0.1:{cluster.mon_port}]"
        cluster._run(
            [
                "monmaptool",
                "--create",
                "--fsid",
                cluster.fsid,
                "--addv",
                MON_ID,
                addrs,
                "--enable-all-features",
                "--set-min-mon-release",
                "pacific",
                str(monmap),
            ]
        )
        cluster._run(
            [
                "ceph-mon",
                "-c",
                conf,
                "-i",
                MON_ID,
                "--mkfs",
                "--monmap",
                str(monmap),
                "--keyring",
                str(mon_keyring),
                *as_root,
            ]
        )
        cluster._spawn(f"mon.{MON_ID}", ["ceph-mon", "-f", "-c", conf, "-i", MON_ID, *as_root])
        cluster._wait("the mon to answer", deadline, cluster._mon_answers())
        cluster.timings["mon"] = time.monotonic() - t0

        secret = root / "osd-secret.json"
        secret.write_text(json.dumps({"cephx_secret": osd_key}))
        cluster.ceph("osd", "new", osd_uuid, str(OSD_ID), "-i", str(secret))
        secret.unlink()

        code = osd_mkfs.wait(timeout=max(1.0, deadline - time.monotonic()))
        if code != 0:
            mkfs_log = root / "log" / "osd-mkfs.stderr"
            raise CephError(f"ceph-osd --mkfs exited {code}:\n{_tail(mkfs_log)}")
    finally:
        if osd_mkfs.poll() is None:
            osd_mkfs.kill()
            osd_mkfs.wait()
    cluster.timings["osd_mkfs_done"] = time.monotonic() - t0

    cluster._spawn(f"osd.{OSD_ID}", ["ceph-osd", "-f", "-c", conf, "-i", str(OSD_ID), *as_root])
    cluster._wait("1 OSD up and in", deadline, cluster._osd_up_in())
    cluster.timings["osd_up"] = time.monotonic() - t0

    cluster.create_pool(DEFAULT_POOL)
    cluster.timings["pool_ready"] = time.monotonic() - t0


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def reap_stale(parent: Path, prefix: str) -> list[Path]:
    """Kill the daemons and remove the roots ``parent/prefix*`` of dead test runs.

    A root belongs to the process whose pid is in ``root/owner.pid`` (written
    by start_cluster); while that process lives, its root is left alone. Daemons
    are found by the pid files :class:`CephCluster` writes and killed only if
    their command line still names that root's ceph.conf.
    """
    reaped = []
    for root in parent.glob(f"{prefix}*"):
        try:
            owner = int((root / "owner.pid").read_text())
        except (OSError, ValueError):
            owner = 0
        if owner and Path(f"/proc/{owner}").exists():
            continue
        if not owner and _age(root) < 60:
            continue  # just made by a live run that has not written owner.pid yet
        for pidfile in (root / "run").glob("*.fixture-pid"):
            try:
                pid = int(pidfile.read_text())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except (OSError, ValueError):
                continue
            if str(root / "ceph.conf") in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        reaped.append(root)
    return reaped
