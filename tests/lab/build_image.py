"""Build (once) the storage lab's Debian 12 root image, kernel and initrd.

The image is cached under ``.lab-cache/img-<key>/`` at the top of the repo
(``HOSTAGENT_LAB_CACHE`` overrides the directory). The key hashes everything the
image is made from: the package list and mirror below, this file,
``build-rootfs.sh``, and the project's ``constraints.txt`` and ``setup.py``
(whose ``install_requires`` go into the image's virtualenv). The project's own
code is not in the image: the VM reads it from the 9p share at every boot, so
editing the code never rebuilds the image.

Run on its own: ``python tests/lab/build_image.py`` (``--force`` rebuilds,
``--print-key`` only prints the key). Needs root, ``debootstrap`` (installed
with apt-get when missing), ``mke2fs`` and the Debian mirror.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BUILD_SCRIPT = HERE / "build-rootfs.sh"
MIRROR = os.environ.get("HOSTAGENT_LAB_MIRROR", "http://deb.debian.org/debian")

PACKAGES = (
    # the kernel and the initrd the VM boots (virtio-blk root, 9p share)
    "linux-image-amd64",
    # the storage stack: a LIO target and the open-iscsi initiator
    "targetcli-fb",
    "python3-rtslib-fb",
    "dbus",
    "open-iscsi",
    "sg3-utils",
    # os-brick finds a LUN's H:C:T:L with lsscsi to rescan it on extend
    "lsscsi",
    "multipath-tools",
    # Ceph: a one-mon, one-OSD cluster inside the VM (tests/ceph/cluster.py),
    # and the rbd CLI with its udev rule (/dev/rbd/<pool>/<image>) for krbd
    "ceph-mon",
    "ceph-osd",
    "ceph-common",
    # libvirt with its own TCG guests inside the VM
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
    "qemu-system-x86",
    "qemu-utils",
    # hostagentd's virtualenv
    "python3",
    "python3-venv",
    "ca-certificates",
    # what the init and the test scripts use
    "iproute2",
    "util-linux",
    "kmod",
    "udev",
    "procps",
    "curl",
)

# Room left in the root file system for what runs do (sparse backstores,
# inner guests' logs); the throwaway overlay only stores what is written.
FREE_SPACE = 3 << 30


def cache_dir() -> Path:
    return Path(os.environ.get("HOSTAGENT_LAB_CACHE", REPO / ".lab-cache"))


def install_requires() -> list[str]:
    """``install_requires`` of setup.py, read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            requirements = ast.literal_eval(node.value)
            if isinstance(requirements, list):
                return [str(requirement) for requirement in requirements]
    raise RuntimeError("setup.py has no literal install_requires list")


def image_key() -> str:
    digest = hashlib.sha256()
    for part in (
        json.dumps([MIRROR, *PACKAGES]).encode(),
        Path(__file__).read_bytes(),
        BUILD_SCRIPT.read_bytes(),
        (REPO / "constraints.txt").read_bytes(),
        (REPO / "setup.py").read_bytes(),
    ):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class LabImage:
    """A built image: a raw ext4 root file system, the kernel and the initrd."""

    key: str
    directory: Path
    built: bool  # True when this call built it, False on a cache hit
    seconds: float  # time spent building (or finding) it

    @property
    def root(self) -> Path:
        return self.directory / "root.img"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def manifest(self) -> dict[str, object]:
        loaded: dict[str, object] = json.loads((self.directory / "manifest.json").read_text())
        return loaded


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _complete(directory: Path) -> bool:
    return all(
        (directory / name).is_file()
        for name in ("root.img", "vmlinuz", "initrd.img", "manifest.json")
    )


def ensure_image(*, force: bool = False, log: Callable[[str], None] = print) -> LabImage:
    """The cached image for the current inputs, built first if there is none.

    Concurrent callers serialise on a lock file; a failed build leaves nothing
    behind but its log (``.lab-cache/build-<key>.log``).
    """
    start = time.monotonic()
    key = image_key()
    cache = cache_dir()
    directory = cache / f"img-{key}"
    with _locked(cache / "build.lock"):
        if _complete(directory) and not force:
            return LabImage(key, directory, built=False, seconds=time.monotonic() - start)
        log(f"lab: building image {key} under {cache} (a few minutes)")
        _build(key, directory)
        _prune(cache, keep=directory)
    seconds = time.monotonic() - start
    log(f"lab: image {key} built in {seconds:.0f} s")
    return LabImage(key, directory, built=True, seconds=seconds)


def _ensure_debootstrap() -> None:
    if shutil.which("debootstrap"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "debootstrap"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def _clean_env() -> dict[str, str]:
    """No PIP_* or other settings of this host leak into the image's pip and apt."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _build(key: str, directory: Path) -> None:
    if os.geteuid() != 0:
        raise RuntimeError("building the lab image needs root (debootstrap, chroot)")
    _ensure_debootstrap()
    cache = directory.parent
    log_path = cache / f"build-{key}.log"
    work = Path(tempfile.mkdtemp(prefix=f"build-{key}-", dir=cache))
    try:
        root = work / "root"
        requirements = work / "requirements.txt"
        requirements.write_text("".join(f"{req}\n" for req in install_requires()))
        with log_path.open("w") as log_file:
            # A private mount namespace: the build's mounts (proc, sys, dev,
            # caches) vanish with it, even if the script is killed.
            command = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "bash",
                str(BUILD_SCRIPT),
                str(root),
                MIRROR,
                str(cache / "downloads"),
                str(requirements),
                str(REPO / "constraints.txt"),
                *PACKAGES,
            ]
            result = subprocess.run(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=_clean_env(), check=False
            )
        if result.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
            raise RuntimeError(f"lab image build failed (full log: {log_path}):\n{tail}")
        staging = work / "image"
        staging.mkdir()
        _extract_boot_files(root, staging)
        _make_ext4(root, staging / "root.img")
        manifest = {
            "key": key,
            "kernel_version": _kernel_version(root),
            "packages": list(PACKAGES),
            "mirror": MIRROR,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "root_bytes": (staging / "root.img").stat().st_size,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kernel_version(root: Path) -> str:
    versions = sorted(path.name for path in (root / "lib/modules").iterdir())
    if len(versions) != 1:
        raise RuntimeError(f"expected one kernel in the image, found {versions}")
    return versions[0]


def _extract_boot_files(root: Path, staging: Path) -> None:
    version = _kernel_version(root)
    shutil.copyfile(root / "boot" / f"vmlinuz-{version}", staging / "vmlinuz")
    shutil.copyfile(root / "boot" / f"initrd.img-{version}", staging / "initrd.img")


def _make_ext4(root: Path, image: Path) -> None:
    """A sparse raw ext4 image populated by ``mke2fs -d``: no loop device, no mount."""
    used = int(
        subprocess.run(
            ["du", "-sxb", str(root)], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )
    size = (used * 5 // 4 + FREE_SPACE + (1 << 20) - 1) >> 20 << 20
    with image.open("wb") as handle:
        handle.truncate(size)
    subprocess.run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            "labroot",
            "-m",
            "0",
            "-d",
            str(root),
            str(image),
        ],
        check=True,
    )


def _prune(cache: Path, keep: Path) -> None:
    """Images of older inputs are 1-2 GB each: keep only the current one."""
    for path in cache.glob("img-*"):
        if path != keep and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    for path in cache.glob("build-*"):
        if path.is_dir():  # a killed build's tree
            shutil.rmtree(path, ignore_errors=True)
        elif path.name != f"build-{keep.name.removeprefix('img-')}.log":
            path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument("--print-key", action="store_true", help="print the cache key and exit")
    args = parser.parse_args(argv)
    if args.print_key:
        print(image_key())
        return 0
    image = ensure_image(force=args.force)
    state = "built" if image.built else "cached"
    print(f"{state}: {image.directory} ({image.seconds:.0f} s)")
    for path in (image.root, image.kernel, image.initrd):
        size = path.stat()
        print(f"  {path}: {size.st_size >> 20} MiB, {size.st_blocks >> 11} MiB on disk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
