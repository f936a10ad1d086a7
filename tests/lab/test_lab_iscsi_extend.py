"""Online extend over iSCSI for real: the LUN grows, one rescan, both guests resized.

Inside the lab VM: an LIO target whose LUN 0 is a block (iblock) backstore
over a loop device. iblock answers READ CAPACITY with the device's size at
that moment, so ``truncate`` of the backing file and ``losetup -c`` grow the
LUN; a fileio backstore keeps the size it was configured with. Two TCG
guests share the LUN through hostagentd (one session), the LUN grows, and
one ``hostagentctl extend`` makes the host's SCSI disk and both guests' QEMU
see the new size; a repeat through the other attachment resizes nothing.

The rescan is counted where os-brick does it: it writes ``1`` to
``/sys/bus/scsi/drivers/sd/H:C:T:L/rescan`` with ``tee``, so hostagentd runs
with a ``tee`` on its PATH that logs each call and then runs the real one.
os-brick finds H:C:T:L with ``lsscsi``; when the image has none the scenario
puts a stand-in on that PATH that prints lsscsi's first and last columns
(the only ones os-brick reads) from sysfs, and records which one ran.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import pytest

from tests.lab.lio import BACKING_DIR, LioLun, lio_setup
from tests.lab.vm import LabVM

pytestmark = pytest.mark.lab

MIB = 1024 * 1024
IQN = "iqn.2026-11.test.hostagent:grow"
BEFORE, AFTER = 64 * MIB, 128 * MIB
# The loop device is found at run time; LIO gets it through this link.
LOOP_LINK = "/dev/lab-grow"


@dataclass(frozen=True)
class BlockLun(LioLun):
    """LUN 0 on a block backstore over ``device`` (lio.py writes fileio ones)."""

    device: str = LOOP_LINK

    def storage_object(self) -> dict[str, Any]:
        return {"plugin": "block", "name": self.name, "dev": self.device}

    def target(self) -> dict[str, Any]:
        target = super().target()
        for tpg in target["tpgs"]:
            for lun in tpg["luns"]:
                lun["storage_object"] = f"/backstores/block/{self.name}"
        return target


LIO = lio_setup(BlockLun(IQN, "grow", size_mb=BEFORE // MIB))

SCENARIO = r"""
set -euo pipefail
. "$LAB_SRC/tests/lab/scenario.sh"
PORTAL=127.0.0.1:3260
IQN=__IQN__
IMG=__IMG__
INITIATOR=$(initiator_name)
LINK=/dev/disk/by-path/ip-$PORTAL-iscsi-$IQN-lun-0
sessions() { iscsiadm -m session 2>/dev/null | grep -c "$IQN" || true; }
rescans() { grep -c '/rescan$' "$LAB_OUT/tee-calls.txt" || true; }
guest_size() { # guest_size N: the disk's capacity in demo-N, as libvirt reads it from QEMU
  virsh domblkinfo "demo-$1" "$LINK" >/tmp/blkinfo
  sed -n 's/^Capacity: *//p' /tmp/blkinfo
}
query_block() { virsh qemu-monitor-command "demo-$1" '{"execute":"query-block"}' >"$LAB_OUT/$2"; }

log "hostagentd's PATH: a counting tee, and lsscsi if the image has none"
mkdir -p /tmp/lab-bin
: >"$LAB_OUT/tee-calls.txt"
cat >/tmp/lab-bin/tee <<EOF
#!/bin/sh
echo "\$*" >>"$LAB_OUT/tee-calls.txt"
exec $(command -v tee) "\$@"
EOF
if command -v lsscsi >/dev/null; then
  record lsscsi real
else
  record lsscsi stand-in
  cat >/tmp/lab-bin/lsscsi <<'EOF'
#!/bin/sh
# lsscsi's first and last columns, from sysfs: all os-brick reads of it
for dev in /sys/bus/scsi/devices/*:*:*:*/block/*; do
  [ -e "$dev" ] || continue
  hctl=${dev%/block/*}
  echo "[${hctl##*/}] disk - - - /dev/${dev##*/}"
done
EOF
fi
chmod +x /tmp/lab-bin/*
export PATH=/tmp/lab-bin:$PATH

log "LIO: $IQN, a block backstore over a loop device, for $INITIATOR"
mkdir -p "$(dirname "$IMG")"
truncate -s __BEFORE__ "$IMG"
LOOP=$(losetup --find --show "$IMG")
ln -sfn "$LOOP" __LOOP_LINK__
__LIO__
log "two TCG guests, firmware only, and hostagentd"
start_tcg_guests_meanwhile 2
start_hostagentd "$LAB_OUT/hostagentd.log"
wait_tcg_guests
cat >/tmp/grow.json <<EOF
{"driver_volume_type": "iscsi",
 "data": {"target_portal": "$PORTAL", "target_iqn": "$IQN", "target_lun": 0}}
EOF

log "attach the LUN to both guests"
for n in 1 2; do
  hostagentctl attach a$n --volume-id vol-grow --domain demo-$n \
    --connection-info /tmp/grow.json --multiattach --json >"$LAB_OUT/a$n.json"
done
[ "$(sessions)" = 1 ] || fail "expected one iSCSI session for two guests"
dev=$(readlink -f "$LINK")
record hctl "$(basename "$(readlink -f "/sys/block/$(basename "$dev")/device")")"
record host_size_before "$(blockdev --getsize64 "$LINK")"
for n in 1 2; do record guest${n}_size_before "$(guest_size $n)"; done
record rescans_before "$(rescans)"

log "the storage grows: the backing file, then losetup -c"
truncate -s __AFTER__ "$IMG"
losetup -c "$LOOP"
record loop_size "$(blockdev --getsize64 "$LOOP")"
record host_size_grown "$(blockdev --getsize64 "$LINK")"

log "extend, once"
hostagentctl extend a1 --json >"$LAB_OUT/e1.json"
record rescans_after_extend "$(rescans)"
record host_size_after "$(blockdev --getsize64 "$LINK")"
for n in 1 2; do
  record guest${n}_size_after "$(guest_size $n)"
  query_block $n query-block-$n.json
done
record sessions_after_extend "$(sessions)"

log "a repeat, through the other attachment"
hostagentctl extend a2 --json >"$LAB_OUT/e2.json"
record rescans_after_repeat "$(rescans)"

log "both detach: the grown LUN's session goes with the last"
for n in 1 2; do hostagentctl detach a$n --json >"$LAB_OUT/d$n.json"; done
record sessions_after_detach "$(sessions)"
stop_hostagentd
log "done"
"""


def qemu_size(query_block: dict[str, Any], alias: str) -> int:
    """The disk's size as QEMU has it (``query-block``'s virtual-size)."""
    for entry in query_block["return"]:
        inserted = entry.get("inserted")
        if inserted and alias in (entry.get("qdev") or entry.get("device") or ""):
            return int(inserted["image"]["virtual-size"])
    raise AssertionError(f"QEMU has no block device {alias}: {query_block}")


def test_extend_rescans_the_lun_once_and_resizes_both_guests(lab_vm: LabVM) -> None:
    started = time.monotonic()
    script = (
        SCENARIO.replace("__LIO__", LIO)
        .replace("__IQN__", IQN)
        .replace("__IMG__", f"{BACKING_DIR}/grow.img")
        .replace("__LOOP_LINK__", LOOP_LINK)
        .replace("__BEFORE__", str(BEFORE))
        .replace("__AFTER__", str(AFTER))
    )
    result = lab_vm.run(script, name="iscsi-extend", timeout=1200)
    out = result.out_dir

    def seen(name: str) -> str:
        return (out / name).read_text().strip()

    def as_json(name: str) -> Any:
        return json.loads((out / name).read_text())

    print(
        f"\nlab iSCSI extend scenario: {result.timing()}, "
        f"total {time.monotonic() - started:.1f} s"
        + (f"; lsscsi: {seen('lsscsi')}" if (out / "lsscsi").exists() else "")
    )
    result.check()
    a1, a2 = as_json("a1.json"), as_json("a2.json")
    key = f"iscsi:127.0.0.1:3260/{IQN}/0"
    assert a1["connection_key"] == a2["connection_key"] == key
    assert (a1["host_refcount"], a2["host_refcount"]) == (1, 2)

    # Before: everyone at 64 MiB. The LUN grew, and the host does not know yet.
    before = [seen(n) for n in ("host_size_before", "guest1_size_before", "guest2_size_before")]
    assert before == [str(BEFORE)] * 3
    assert seen("loop_size") == str(AFTER)
    assert seen("host_size_grown") == str(BEFORE), "the host saw the growth before any rescan"

    # One call: one rescan of the LUN's one SCSI disk, both guests resized.
    e1 = as_json("e1.json")
    assert (e1["connection_key"], e1["device_size"]) == (key, AFTER)
    assert sorted(
        (g["attachment_id"], g["domain_name"], g["size"], g["resized"]) for g in e1["guests"]
    ) == [
        ("a1", "demo-1", AFTER, True),
        ("a2", "demo-2", AFTER, True),
    ]
    rescans_before, rescans_after = int(seen("rescans_before")), int(seen("rescans_after_extend"))
    assert rescans_after - rescans_before == 1, seen("tee-calls.txt")
    rescan_writes = [
        line for line in seen("tee-calls.txt").splitlines() if line.endswith("/rescan")
    ]
    assert rescan_writes[rescans_before] == f"-a /sys/bus/scsi/drivers/sd/{seen('hctl')}/rescan"
    assert seen("sessions_after_extend") == "1"
    assert seen("host_size_after") == str(AFTER)
    for n in (1, 2):
        assert seen(f"guest{n}_size_after") == str(AFTER)
        assert qemu_size(as_json(f"query-block-{n}.json"), f"ua-a{n}") == AFTER

    # A repeat (it rescans again, by design: nothing is recorded) resizes nothing.
    e2 = as_json("e2.json")
    assert e2["device_size"] == AFTER
    assert sorted((g["domain_name"], g["size"], g["resized"]) for g in e2["guests"]) == [
        ("demo-1", AFTER, False),
        ("demo-2", AFTER, False),
    ]
    assert int(seen("rescans_after_repeat")) - rescans_after == 1
    d1, d2 = as_json("d1.json"), as_json("d2.json")
    assert (d1["terminate_connection"], d2["terminate_connection"]) == (False, True)
    assert seen("sessions_after_detach") == "0"
