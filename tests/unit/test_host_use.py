"""host/host_use.py: a device the host itself uses is never handed to a guest.

Real loop devices for mounts, swap and exclusive openers; the kernel here
makes no loop partitions (``losetup -P`` made none) and has no device-mapper,
so partitions and stacked devices are shown on a recorded sysfs tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.host.host_use import (
    BlockDevice,
    HostView,
    allowed,
    host_uses,
    identify,
    names_of,
    partitions,
    stacked_on,
)


def _device(path: str) -> BlockDevice:
    device = identify(path)
    assert device is not None
    return device


def test_an_unused_loop_device_is_free(loop_device: str) -> None:
    assert host_uses(_device(loop_device), loop_device) == []


def test_identify_names_the_kernel_device_whatever_node_is_used(
    loop_device: str, tmp_path: Path
) -> None:
    device = _device(loop_device)
    assert device.path == loop_device
    st = os.stat(loop_device)
    second_node = tmp_path / "node"
    os.mknod(second_node, 0o600 | 0o060000, st.st_rdev)
    assert identify(str(second_node)) == device
    assert identify("/dev/null") is None
    assert identify(str(tmp_path / "missing")) is None


@pytest.fixture
def mounted(loop_device: str, tmp_path: Path) -> Iterator[Path]:
    subprocess.run(["mkfs.ext4", "-q", loop_device], check=True)
    point = tmp_path / "mnt"
    point.mkdir()
    subprocess.run(["mount", loop_device, str(point)], check=True)
    yield point
    subprocess.run(["umount", str(point)], check=True)


def test_a_mounted_device_is_refused(loop_device: str, mounted: Path) -> None:
    assert host_uses(_device(loop_device), loop_device) == [f"it is mounted at {mounted}"]


def test_active_swap_is_refused(loop_device: str) -> None:
    subprocess.run(["mkswap", "-q", loop_device], check=True)
    subprocess.run(["swapon", loop_device], check=True)
    try:
        assert host_uses(_device(loop_device), loop_device) == ["it is active swap"]
    finally:
        subprocess.run(["swapoff", loop_device], check=True)


def test_an_exclusive_opener_is_refused_and_plain_openers_are_not(loop_device: str) -> None:
    plain = os.open(loop_device, os.O_RDWR)
    try:
        assert host_uses(_device(loop_device), loop_device) == []  # a guest's QEMU
    finally:
        os.close(plain)
    code = (
        f"import os, time; os.open({loop_device!r}, os.O_RDONLY | os.O_EXCL); "
        "print(1, flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"1"
        [reason] = host_uses(_device(loop_device), loop_device)
        assert "exclusively" in reason
    finally:
        holder.kill()
        holder.wait()


def test_the_device_holding_root_is_refused() -> None:
    root = os.stat("/").st_dev
    node = f"/sys/dev/block/{os.major(root)}:{os.minor(root)}"
    if not os.path.exists(node):
        pytest.skip(f"/ is not on a block device here ({os.major(root)}:{os.minor(root)})")
    name = os.path.basename(os.readlink(node))
    if not os.path.exists(f"/dev/{name}"):
        pytest.skip(f"/dev/{name} (the device of /) has no node here")
    reasons = host_uses(_device(f"/dev/{name}"), f"/dev/{name}")
    assert "it is mounted at /" in reasons


def _recorded_sysfs(tmp_path: Path, mountinfo: str = "", swaps: str = "") -> HostView:
    """A recorded sysfs tree: loop7 with partitions loop7p1 and loop7p2, and an
    LVM volume dm-0 on loop7p2; sdc, a path device under the multipath map dm-1,
    on which kpartx made the partition mapping dm-2; a mountinfo and swaps."""
    sysfs, proc = tmp_path / "sys", tmp_path / "proc"
    block = sysfs / "class" / "block"
    (sysfs / "dev" / "block").mkdir(parents=True)
    devices = {
        "loop7": ("7:7", None),
        "loop7p1": ("259:1", None),
        "loop7p2": ("259:2", None),
        "dm-0": ("253:0", "LVM-Zx9aVg0lv0"),
        "sdc": ("8:32", None),
        "dm-1": ("253:1", "mpath-3600140512345"),
        "dm-2": ("253:2", "part1-mpath-3600140512345"),
    }
    for name, (number, dm_uuid) in devices.items():
        (block / name / "holders").mkdir(parents=True)
        (block / name / "dev").write_text(number + "\n")
        if dm_uuid is not None:
            (block / name / "dm").mkdir()
            (block / name / "dm" / "uuid").write_text(dm_uuid + "\n")
        os.symlink(f"../../class/block/{name}", sysfs / "dev" / "block" / number)
    for part in ("loop7p1", "loop7p2"):
        os.symlink(f"../{part}", block / "loop7" / part)
        (block / part / "partition").write_text("1\n")
    for lower, upper in (("loop7p2", "dm-0"), ("sdc", "dm-1"), ("dm-1", "dm-2")):
        os.symlink(f"../../{upper}", block / lower / "holders" / upper)
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(mountinfo)
    (proc / "swaps").write_text("Filename Type Size Used Priority\n" + swaps)
    return HostView(sysfs=sysfs, proc=proc, dev=tmp_path / "dev")


RECORDED_LOOP7 = BlockDevice(7, 7, "loop7")
RECORDED_SDC = BlockDevice(8, 32, "sdc")
LVM_ON_IT = "/dev/dm-0 (an LVM volume) is built on it"


def uses(device: BlockDevice, view: HostView) -> list[str]:
    return host_uses(device, "/nonexistent", view, exclusive=False)


def test_recorded_sysfs_partitions_and_stacked_devices(tmp_path: Path) -> None:
    view = _recorded_sysfs(tmp_path)
    assert partitions(RECORDED_LOOP7, view) == ["loop7p1", "loop7p2"]
    assert stacked_on(["loop7", "loop7p1", "loop7p2"], view) == ["dm-0"]
    assert stacked_on(["sdc"], view) == ["dm-1", "dm-2"]


def test_recorded_sysfs_an_lvm_volume_on_a_partition_refuses_the_disk_not_a_sibling(
    tmp_path: Path,
) -> None:
    view = _recorded_sysfs(tmp_path)
    assert uses(RECORDED_LOOP7, view) == [LVM_ON_IT]
    assert uses(BlockDevice(259, 2, "loop7p2"), view) == [LVM_ON_IT]
    assert uses(BlockDevice(259, 1, "loop7p1"), view) == []


def test_recorded_sysfs_a_mounted_partition_refuses_the_whole_disk(tmp_path: Path) -> None:
    view = _recorded_sysfs(tmp_path, mountinfo="61 27 259:1 / /srv rw - ext4 /dev/loop7p1 rw\n")
    assert uses(RECORDED_LOOP7, view) == [LVM_ON_IT, "/dev/loop7p1 on it is mounted at /srv"]
    assert uses(BlockDevice(259, 1, "loop7p1"), view) == ["it is mounted at /srv"]


def test_recorded_sysfs_a_mounted_lvm_volume_is_named_with_its_mount_point(
    tmp_path: Path,
) -> None:
    view = _recorded_sysfs(
        tmp_path, mountinfo="62 27 253:0 / /var/lib/x\\040y rw - xfs /dev/dm-0 rw\n"
    )
    assert uses(BlockDevice(259, 2, "loop7p2"), view) == [
        LVM_ON_IT,
        "/dev/dm-0 on it is mounted at /var/lib/x y",
    ]


def test_recorded_sysfs_multipath_and_kpartx_maps_are_the_storage_itself(
    tmp_path: Path,
) -> None:
    """A multipath map over a path device and kpartx's partition mappings hold
    it exclusively, but they are the same storage: only a mount counts."""
    assert uses(RECORDED_SDC, _recorded_sysfs(tmp_path / "a")) == []
    mounted = _recorded_sysfs(
        tmp_path / "b", mountinfo="63 27 253:2 / /data rw - ext4 /dev/dm-2 rw\n"
    )
    assert uses(RECORDED_SDC, mounted) == ["/dev/dm-2 on it is mounted at /data"]
    assert uses(BlockDevice(253, 1, "dm-1"), mounted) == ["/dev/dm-2 on it is mounted at /data"]


def test_recorded_proc_a_mount_point_that_is_not_utf8_is_read(tmp_path: Path) -> None:
    view = _recorded_sysfs(tmp_path)
    (tmp_path / "proc" / "self" / "mountinfo").write_bytes(
        b"64 27 7:7 / /media/caf\xe9 rw - vfat /dev/loop7 rw\n"
    )
    [reason] = uses(RECORDED_LOOP7, view)[1:]
    assert reason.startswith("it is mounted at /media/caf")


def test_allow_list_matches_the_resolved_path_kernel_name_and_by_id_links(
    loop_device: str, tmp_path: Path
) -> None:
    device = _device(loop_device)
    view = HostView(dev=tmp_path / "dev")
    by_id = tmp_path / "dev" / "disk" / "by-id"
    by_id.mkdir(parents=True)
    os.symlink(loop_device, by_id / "nvme-vendor-serial")
    assert str(by_id / "nvme-vendor-serial") in names_of(device, loop_device, view)
    assert allowed(device, loop_device, [], view)
    assert allowed(device, loop_device, ["/dev/loop*"], view)
    assert allowed(device, loop_device, [f"{by_id}/nvme-*"], view)
    assert not allowed(device, loop_device, ["/dev/sd*", f"{by_id}/ata-*"], view)
