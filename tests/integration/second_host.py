"""A second libvirt "host" on this machine, the destination of live migrations.

A private mount namespace gives a second libvirtd (and its own virtlogd) its
own /run/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt and
a copy of /etc/libvirt whose libvirtd.conf sets another host_uuid (libvirt
refuses a migration between equal host UUIDs). Its socket lies in a
directory of the host namespace, so the tests and a hostagentd reach it with
``qemu:///system?socket=...``. Only the pids started here are kept and
killed: a namespace id is reused by other processes once freed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import libvirt

# Under /etc/libvirt: domains, networks, pools and secrets stay the host's own.
_NOT_COPIED = ("qemu", "storage", "secrets")
_PRIVATE_DIRS = {
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
    "cache": "/var/cache/libvirt",
    "etc": "/etc/libvirt",
}


def free_port() -> int:
    """A TCP port free now on 127.0.0.1, for one migration's data stream."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SecondHost:
    """libvirtd + virtlogd in their own mount namespace; start() and stop()."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ha-dst-", dir="/tmp"))
        self.host_uuid = str(uuid.uuid4())
        self.socket = self.root / "run" / "libvirt-sock"
        self.uri = f"qemu+unix:///system?socket={self.socket}"
        self.log_path = self.root / "libvirtd.log"
        self._libvirtd: subprocess.Popen[bytes] | None = None
        self._virtlogd_pid: int | None = None

    def _prepare(self) -> None:
        for name in _PRIVATE_DIRS:
            (self.root / name).mkdir(mode=0o755)
        etc = self.root / "etc"
        for entry in Path("/etc/libvirt").iterdir():
            if entry.name in _NOT_COPIED:
                continue
            if entry.is_dir():
                shutil.copytree(entry, etc / entry.name, symlinks=True)
            else:
                shutil.copy2(entry, etc / entry.name)
        (etc / "qemu").mkdir()
        if Path("/etc/libvirt/qemu.conf").exists():
            shutil.copy2("/etc/libvirt/qemu.conf", etc / "qemu.conf")
        (etc / "libvirtd.conf").write_text(f'host_uuid = "{self.host_uuid}"\n')

    def _script(self) -> str:
        mounts = "\n".join(
            f"mount --bind {self.root / name} {target}" for name, target in _PRIVATE_DIRS.items()
        )
        return f"""set -e
{mounts}
virtlogd -d -p {self.root / "virtlogd.pid"}
exec libvirtd -p {self.root / "libvirtd.pid"}
"""

    def start(self, timeout: float = 60.0) -> None:
        self._prepare()
        log = self.log_path.open("ab")
        # unshare execs bash, which execs libvirtd: the Popen pid is libvirtd's.
        self._libvirtd = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", self._script()],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._libvirtd.poll() is not None:
                raise RuntimeError(f"second libvirtd exited:\n{self.log()}")
            pid_file = self.root / "virtlogd.pid"
            if self._virtlogd_pid is None and pid_file.exists():
                with contextlib.suppress(ValueError):
                    self._virtlogd_pid = int(pid_file.read_text().strip())
            if self.socket.exists():
                with contextlib.suppress(libvirt.libvirtError):
                    libvirt.open(self.uri).close()
                    return
            time.sleep(0.2)
        raise RuntimeError(f"second libvirtd did not answer within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def connect(self) -> Any:
        return libvirt.open(self.uri)

    def stop(self) -> None:
        """Destroy its domains, stop its libvirtd and virtlogd, remove its tree."""
        if self._libvirtd is not None and self._libvirtd.poll() is None:
            with contextlib.suppress(libvirt.libvirtError):
                conn = self.connect()
                for dom in conn.listAllDomains(0):
                    with contextlib.suppress(libvirt.libvirtError):
                        if dom.isActive():
                            dom.destroy()
                    with contextlib.suppress(libvirt.libvirtError):
                        if dom.isPersistent():
                            dom.undefine()
                conn.close()
            self._libvirtd.send_signal(signal.SIGTERM)
            try:
                self._libvirtd.wait(30)
            except subprocess.TimeoutExpired:
                self._libvirtd.kill()
                self._libvirtd.wait()
        self._libvirtd = None
        if self._virtlogd_pid is not None and _is(self._virtlogd_pid, "virtlogd"):
            os.kill(self._virtlogd_pid, signal.SIGTERM)
        self._virtlogd_pid = None
        shutil.rmtree(self.root, ignore_errors=True)


def _is(pid: int, program: str) -> bool:
    """Whether ``pid`` still runs ``program`` (not a reused pid)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == program
    except OSError:
        return False
