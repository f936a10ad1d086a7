"""Boot the storage lab VM once and run bash scripts in it as root, one after another.

The VM is a stock Debian 12 kernel under QEMU TCG (this machine's kernel has
no iSCSI or LIO, and its KVM cannot run a full Linux kernel) booted from the
cached image of ``build_image.py`` through a throwaway qcow2 overlay, so no
run ever changes the image. A 9p share (``mount_tag=lab``, ``/lab/share`` in
the VM) carries everything in and out::

    share/src/           a fresh copy of the project (on the VM's venv path)
    share/init2.sh       guest-init.sh: the VM's stage-2 init
    share/libvirt-caps/  QEMU capabilities an earlier run's libvirtd probed, if any
    share/out/           the VM's own: boot-seconds, setup-error, libvirt-caps/, dmesg.txt
    share/jobs/NN-NAME/  one job: run.sh, timeout, then `ready`; the VM leaves
                         out/stdout, out/stderr, out/dmesg.txt, out/tidy.log,
                         whatever the script writes to $LAB_OUT, and out/status last
    share/jobs/stop      the VM powers off once the job in hand is done
    share/console.log    the serial console (kernel, init, every job's output); a
                         VM booted after a failed job moves the earlier one to
                         console-N.log (and its out/ to out-N/)
    share/qemu.cmd       the QEMU command line (its overlay is gone after the run)
    share/qemu.log       QEMU's own stdout and stderr

Booting costs about 40 s of TCG, so ``LabVM`` boots once and runs every job
in the same VM; between jobs the VM tidies what a scenario may leave (see
``tidy`` in guest-init.sh). After a job that failed or timed out the VM is
powered off and the next job boots a fresh one, so a failure never leaks into
the next scenario. ``run_in_lab`` is one job in a VM of its own.

Files the caller puts in ``share`` beforehand are visible in the VM too. The
script sees ``LAB_SHARE``, ``LAB_OUT`` (its job's ``out``) and ``LAB_SRC``;
``hostagentd`` and ``hostagentctl`` are on its PATH and
``/opt/hostagent/bin/python`` imports the project from ``$LAB_SRC``.
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
    out_dir: Path  # the job's out: stdout, stderr, status, dmesg.txt, the script's own files
    console_log: Path  # the VM's serial console (every job of that VM)
    timed_out: bool  # the host gave up waiting and killed QEMU
    boot_seconds: float | None  # the VM's uptime when it was ready for jobs (boot + services)
    booted: bool  # this job waited for the VM to boot (the first job of a VM)
    wall_seconds: float  # from handing the job over (or QEMU's start) to its status
    image: LabImage
    setup_error: str = ""  # the VM's init failed before any job ran

    @property
    def ok(self) -> bool:
        return self.status == 0

    def console_tail(self, lines: int = 60) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])

    def timing(self) -> str:
        """How long the job took, and the boot when it waited for one."""
        boot = f" (booted the VM: {self.boot_seconds} s boot + services)" if self.booted else ""
        return f"job {self.wall_seconds:.1f} s{boot}"

    def describe(self) -> str:
        what = "timed out" if self.timed_out else f"exit status {self.status}"
        return (
            f"lab script: {what} after {self.wall_seconds:.0f} s\n"
            + (f"--- {self.setup_error.strip()}\n" if self.setup_error.strip() else "")
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


def _prepare_share(share: Path, image: LabImage, boots: int) -> None:
    """The share for the VM's boot number ``boots``: made afresh at the first;
    at a later one the earlier VM's console and files move aside (console-N.log,
    out-N/) and the jobs stay."""
    share.mkdir(parents=True, exist_ok=True)
    if boots == 1:
        for name in ("src", "out", "jobs", LIBVIRT_CAPS):
            shutil.rmtree(share / name, ignore_errors=True)
        (share / "console.log").unlink(missing_ok=True)
        _copy_project(share / "src", share.resolve())
        (share / "jobs").mkdir()
    else:
        earlier = boots - 1
        with contextlib.suppress(FileNotFoundError):
            (share / "console.log").rename(share / f"console-{earlier}.log")
        with contextlib.suppress(FileNotFoundError):
            (share / "out").rename(share / f"out-{earlier}")
        (share / "jobs" / "stop").unlink(missing_ok=True)
    if not (share / LIBVIRT_CAPS).exists() and (image.directory / LIBVIRT_CAPS).is_dir():
        shutil.copytree(image.directory / LIBVIRT_CAPS, share / LIBVIRT_CAPS)
    (share / "out").mkdir()
    shutil.copyfile(GUEST_INIT, share / "init2.sh")


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


# How long a VM may take from QEMU's start to its first job (about 40 s here).
BOOT_ALLOWANCE = 300.0
# The script is stopped this long before a job's timeout, so its output and
# status still come back before the host gives up.
SCRIPT_MARGIN = 20
POLL_SECONDS = 0.3


class LabVM:
    """The lab VM, booted at the first ``run`` and kept for the jobs after it.

    ``share`` is a host directory that becomes ``/lab/share`` in the VM. A job
    that fails or times out powers the VM off; the next ``run`` boots another.
    ``close`` (or leaving the ``with`` block) powers it off.
    """

    def __init__(
        self,
        share: Path,
        *,
        memory_mb: int = 2048,
        cpus: int = 2,
        log: Callable[[str], None] = print,
    ) -> None:
        self.share = share.absolute()
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.log = log
        self._proc: subprocess.Popen[bytes] | None = None
        self._work: Path | None = None
        self._image: LabImage | None = None
        self._jobs = 0
        self._boots = 0

    def __enter__(self) -> LabVM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _boot(self) -> LabImage:
        self.close()
        image = ensure_image(log=self.log)
        if not image.built:
            self.log(f"lab: image {image.key} cached")
        self._boots += 1
        _prepare_share(self.share, image, self._boots)
        self._work = Path(tempfile.mkdtemp(prefix="lab-run-", dir="/var/tmp"))
        overlay = self._work / "overlay.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.root),
             str(overlay)],
            check=True,
        )  # fmt: skip
        command = qemu_command(
            image, overlay, self.share, memory_mb=self.memory_mb, cpus=self.cpus
        )
        (self.share / "qemu.cmd").write_text(shlex.join(command) + "\n")
        with (self.share / "qemu.log").open("wb") as qemu_log:
            self._proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT
            )
        self._image = image
        self.log(f"lab: VM started (pid {self._proc.pid}); console: {self.share / 'console.log'}")
        return image

    def run(self, script: str, *, name: str = "run", timeout: float) -> LabResult:
        """Run ``script`` with bash as root in the VM (booting it first if needed).

        ``timeout`` bounds the job (plus the boot, when this job starts the VM):
        the script is stopped ``SCRIPT_MARGIN`` s before it so its output still
        comes back (exit status 124); if no status comes at all the VM is killed.
        """
        started = time.monotonic()
        booted = not self.running
        image = self._boot() if booted else self._image
        assert image is not None and self._proc is not None
        self._jobs += 1
        job = self.share / "jobs" / f"{self._jobs:02d}-{name}"
        out = job / "out"
        out.mkdir(parents=True)
        (job / "run.sh").write_text(script)
        (job / "timeout").write_text(f"{max(int(timeout) - SCRIPT_MARGIN, 10)}\n")
        (job / "ready").touch()
        deadline = time.monotonic() + timeout + (BOOT_ALLOWANCE if booted else 0.0)
        status_file = out / "status"
        timed_out = False
        while not status_file.exists():
            if self._proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                timed_out = True
                self.log(f"lab: job {job.name} gave no status in time; killing the VM")
                self._kill()
                break
            time.sleep(POLL_SECONDS)
        wall = time.monotonic() - started
        status_text = _read(status_file).strip()
        boot_text = _read(self.share / "out" / "boot-seconds").strip()
        result = LabResult(
            status=int(status_text) if status_text else None,
            stdout=_read(out / "stdout"),
            stderr=_read(out / "stderr"),
            out_dir=out,
            console_log=self.share / "console.log",
            timed_out=timed_out,
            boot_seconds=float(boot_text) if boot_text else None,
            booted=booted,
            wall_seconds=wall,
            image=image,
            setup_error=_read(self.share / "out" / "setup-error"),
        )
        boot = f"booted ({result.boot_seconds} s boot + services), " if booted else ""
        self.log(
            f"lab: job {job.name}: {boot}{wall:.1f} s, status {result.status}"
            + (" (timed out)" if timed_out else "")
        )
        if result.status is None and not timed_out:
            self.log(_read(self.share / "qemu.log")[-2000:])
        if not result.ok:
            self.log("lab: powering the VM off after a failed job; the next job boots another")
            self.close()
        return result

    def close(self) -> None:
        """Power the VM off (after the job in hand), keep what it probed, drop its overlay."""
        proc, self._proc = self._proc, None
        if proc is not None:
            (self.share / "jobs" / "stop").touch()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._image is not None:
            with contextlib.suppress(OSError):
                _keep_libvirt_caps(self.share / "out", self._image)
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.close()


def run_in_lab(
    script: str,
    *,
    share: Path,
    timeout: float,
    memory_mb: int = 2048,
    cpus: int = 2,
    log: Callable[[str], None] = print,
) -> LabResult:
    """Boot a lab VM of its own, run ``script`` with bash as root in it, power off.

    Builds the image first when the cache has none (minutes; not counted in
    ``timeout``). Tests share one VM instead: the ``lab_vm`` fixture.
    """
    with LabVM(share, memory_mb=memory_mb, cpus=cpus, log=log) as vm:
        return vm.run(script, timeout=timeout)


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
