"""Run a bash script as root inside the storage lab VM and collect what it left.

The VM is a stock Debian 12 kernel under QEMU TCG (this machine's kernel has
no iSCSI or LIO, and its KVM cannot run a full Linux kernel) booted from the
cached image of ``build_image.py`` through a throwaway qcow2 overlay, so no
run ever changes the image. A 9p share (``mount_tag=lab``, ``/lab/share`` in
the VM) carries everything in and out::

    share/src/          a fresh copy of the project (on the VM's venv path)
    share/run.sh        the script, run with bash as root, cwd /tmp
    share/init2.sh      guest-init.sh: the VM's stage-2 init
    share/libvirt-caps/ QEMU capabilities an earlier run's libvirtd probed, if any
    share/lab.env       the run's settings
    share/out/          stdout, stderr, status, boot-seconds, dmesg.txt,
                        libvirt-caps/ and whatever the script writes to $LAB_OUT
    share/console.log   the serial console (kernel, init, script output)
    share/qemu.cmd      the QEMU command line (its overlay is gone after the run)
    share/qemu.log      QEMU's own stdout and stderr

Files the caller puts in ``share`` beforehand are visible in the VM too. The
script sees ``LAB_SHARE``, ``LAB_OUT`` and ``LAB_SRC``; ``hostagentd`` and
``hostagentctl`` are on its PATH and ``/opt/hostagent/bin/python`` imports
the project from ``$LAB_SRC``.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.lab.build_image import REPO, LabImage, ensure_image

HERE = Path(__file__).resolve().parent
GUEST_INIT = HERE / "guest-init.sh"
QEMU = "qemu-system-x86_64"
# QEMU's minimal firmware boots the -kernel at once; SeaBIOS spends seconds
# of TCG on its own probing first (the lab's inner guests use it too).
QBOOT = Path("/usr/share/qemu/qboot.rom")
# Beside the image: QEMU's capabilities as the VM's libvirtd probed them
# (guest-init.sh gives them back to libvirtd at the next run).
LIBVIRT_CAPS = "libvirt-caps"
KERNEL_ARGS = (
    "root=/dev/vda rw rootfstype=ext4 fsck.mode=skip console=ttyS0 init=/lab/init "
    "panic=1 loglevel=4 mitigations=off net.ifnames=0"
)
# Left out of the project copy: large, or of no use inside the VM.
_NOT_COPIED = (
    ".git",
    ".venv",
    ".lab-cache",
    ".hostagent",
    ".hypothesis",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "__pycache__",
    "*.egg-info",
    "build",
)


class LabError(RuntimeError):
    """The lab could not run the script, or the script failed (see ``LabResult.check``)."""


@dataclass(frozen=True)
class LabResult:
    status: int | None  # the script's exit status; None when the VM never reported one
    stdout: str
    stderr: str
    out_dir: Path  # share/out: stdout, stderr, status, dmesg.txt, the script's own files
    console_log: Path  # the VM's serial console
    timed_out: bool  # the host killed QEMU at the timeout
    boot_seconds: float | None  # VM uptime when the script started (boot + services)
    wall_seconds: float  # QEMU start to exit, as the host saw it
    image: LabImage

    @property
    def ok(self) -> bool:
        return self.status == 0

    def console_tail(self, lines: int = 60) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> str:
        what = "timed out" if self.timed_out else f"exit status {self.status}"
        setup_error = _read(self.out_dir / "setup-error").strip()
        return (
            f"lab script: {what} after {self.wall_seconds:.0f} s\n"
            + (f"--- {setup_error}\n" if setup_error else "")
            + f"--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-4000:]}\n"
            + f"--- console ({self.console_log}), last lines\n{self.console_tail()}"
        )

    def check(self) -> LabResult:
        """This result if the script exited 0, else LabError with its output and console."""
        if not self.ok:
            raise LabError(self.describe())
        return self


def _copy_project(destination: Path, share: Path) -> None:
    not_copied = shutil.ignore_patterns(*_NOT_COPIED)

    def ignore(directory: str, names: list[str]) -> set[str]:
        ignored = set(not_copied(directory, names))
        # never copy the share into itself when it lives inside the repo
        ignored.update(name for name in names if (Path(directory) / name).resolve() == share)
        return ignored

    shutil.copytree(REPO, destination, ignore=ignore, symlinks=True)
    # Bytecode made here in a second, not by the VM's Python under TCG at its
    # first import (the copy keeps the sources' mtimes, which the .pyc names).
    # The VM imports it only if its Python is the same minor version.
    compileall.compile_dir(destination, quiet=2)


def _prepare_share(share: Path, script: str, timeout: float, image: LabImage) -> None:
    share.mkdir(parents=True, exist_ok=True)
    for name in ("src", "out", LIBVIRT_CAPS):
        shutil.rmtree(share / name, ignore_errors=True)
    if (image.directory / LIBVIRT_CAPS).is_dir():
        shutil.copytree(image.directory / LIBVIRT_CAPS, share / LIBVIRT_CAPS)
    (share / "console.log").unlink(missing_ok=True)
    _copy_project(share / "src", share.resolve())
    (share / "out").mkdir()
    (share / "run.sh").write_text(script)
    shutil.copyfile(GUEST_INIT, share / "init2.sh")
    (share / "lab.env").write_text(f"LAB_TIMEOUT={int(timeout)}\n")


def _keep_libvirt_caps(out: Path, image: LabImage) -> None:
    """The first run's probed QEMU capabilities, kept beside the image for the next runs."""
    probed = sorted((out / LIBVIRT_CAPS).glob("*.xml"))
    kept = image.directory / LIBVIRT_CAPS
    if not probed or kept.exists():
        return
    staging = Path(tempfile.mkdtemp(prefix=f"{LIBVIRT_CAPS}-", dir=image.directory))
    for path in probed:
        shutil.copyfile(path, staging / path.name)
    try:
        staging.rename(kept)
    except OSError:  # another run kept its own first
        shutil.rmtree(staging, ignore_errors=True)


def qemu_command(
    image: LabImage, overlay: Path, share: Path, *, memory_mb: int, cpus: int
) -> list[str]:
    firmware = ["-bios", str(QBOOT)] if QBOOT.exists() else []
    return [
        QEMU,
        *firmware,
        "-accel", "tcg",
        # svm/vmx off: nested virt under TCG would give the VM a /dev/kvm the
        # inner guests must not use. la57 off: with 5-level paging QEMU 7.2's
        # TCG reports 48 virtual address bits, the kernel's
        # copy_from_kernel_nofault() then refuses every kernel address and
        # d_path() fills names with 'x': /proc/mounts lists "xxx" mount points
        # and libvirt fails to start any guest ("Unable to find any /dev mount").
        "-cpu", "max,svm=off,vmx=off,la57=off",
        "-m", str(memory_mb),
        "-smp", str(cpus),
        "-nographic",
        "-monitor", "none",
        "-serial", f"file:{share / 'console.log'}",
        "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", KERNEL_ARGS,
        "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
        "-virtfs", f"local,path={share},mount_tag=lab,security_model=none",
        "-device", "virtio-rng-pci",
        "-nic", "none",
    ]  # fmt: skip


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def run_in_lab(
    script: str,
    *,
    share: Path,
    timeout: float,
    memory_mb: int = 2048,
    cpus: int = 2,
    log: Callable[[str], None] = print,
) -> LabResult:
    """Boot the lab VM, run ``script`` with bash as root in it, power off.

    ``share`` is a host directory (a pytest ``tmp_path`` does) that becomes
    ``/lab/share`` in the VM; see the module docstring for its layout.
    ``timeout`` bounds the whole run after the image is ready (boot, services,
    the script, power off): the script itself is stopped about 20 s before it
    so its output still comes back, and QEMU is killed at it. Builds the image
    first when the cache has none (minutes; not counted in ``timeout``).
    """
    image = ensure_image(log=log)
    if not image.built:
        log(f"lab: image {image.key} cached")
    share = share.absolute()
    _prepare_share(share, script, timeout, image)
    work = Path(tempfile.mkdtemp(prefix="lab-run-", dir="/var/tmp"))
    overlay = work / "overlay.qcow2"
    proc: subprocess.Popen[bytes] | None = None
    timed_out = False
    start = time.monotonic()
    try:
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.root),
             str(overlay)],
            check=True,
        )  # fmt: skip
        command = qemu_command(image, overlay, share, memory_mb=memory_mb, cpus=cpus)
        (share / "qemu.cmd").write_text(shlex.join(command) + "\n")
        start = time.monotonic()
        with (share / "qemu.log").open("wb") as qemu_log:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT
            )
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        wall = time.monotonic() - start
        shutil.rmtree(work, ignore_errors=True)
    out = share / "out"
    with contextlib.suppress(OSError):
        _keep_libvirt_caps(out, image)
    status_text = _read(out / "status").strip()
    boot_text = _read(out / "boot-seconds").strip()
    result = LabResult(
        status=int(status_text) if status_text else None,
        stdout=_read(out / "stdout"),
        stderr=_read(out / "stderr"),
        out_dir=out,
        console_log=share / "console.log",
        timed_out=timed_out,
        boot_seconds=float(boot_text) if boot_text else None,
        wall_seconds=wall,
        image=image,
    )
    boot = f"{result.boot_seconds:.1f} s" if result.boot_seconds is not None else "?"
    log(
        f"lab: VM ran {wall:.1f} s (boot + services {boot}), status {result.status}"
        + (" (timed out)" if timed_out else "")
        + f"; console: {result.console_log}"
    )
    if result.status is None and not timed_out:
        with contextlib.suppress(Exception):
            log(_read(share / "qemu.log")[-2000:])
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.lab.vm SCRIPT``: run a script file in the lab, by hand."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("script", type=Path, help="a bash script to run as root in the VM")
    parser.add_argument("--share", type=Path, default=Path("/var/tmp/lab-share"))
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--memory-mb", type=int, default=2048)
    args = parser.parse_args(argv)
    result = run_in_lab(
        args.script.read_text(), share=args.share, timeout=args.timeout, memory_mb=args.memory_mb
    )
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    print(f"lab: status {result.status}; output in {result.out_dir}", file=sys.stderr)
    return 1 if result.status is None else result.status


if __name__ == "__main__":
    sys.exit(main())
