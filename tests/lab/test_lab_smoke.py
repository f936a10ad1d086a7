"""The lab works: a LIO target and an open-iscsi login on 127.0.0.1 inside the
VM, by-path links from udev, a TCG guest under the VM's own libvirtd taking the
LUN as a hot-plugged disk, and hostagentd answering next to that libvirtd."""

from __future__ import annotations

import json
import time

import pytest

from tests.lab.lio import LioLun, lio_setup
from tests.lab.vm import LabVM

pytestmark = pytest.mark.lab

IQN = "iqn.2026-11.test.hostagent:lab1"
LIO = lio_setup(LioLun(IQN, "lun0", size_mb=64))

SMOKE = r"""
set -euo pipefail
. "$LAB_SRC/tests/lab/scenario.sh"
IQN=__IQN__
PORTAL=127.0.0.1:3260
LINK=/dev/disk/by-path/ip-$PORTAL-iscsi-$IQN-lun-0
INITIATOR=$(initiator_name)

log "LIO target $IQN for initiator $INITIATOR, one targetctl restore"
__LIO__
tpg=/sys/kernel/config/target/iscsi/$IQN/tpgt_1
[ "$(cat $tpg/enable)" = 1 ]
[ -d "$tpg/acls/$INITIATOR/lun_0" ]
[ -d "$tpg/np/127.0.0.1:3260" ]

log "discovery and login"
iscsiadm -m discovery -t st -p 127.0.0.1 | tee /tmp/discovery
grep -q "^$PORTAL,1 $IQN\$" /tmp/discovery
iscsiadm -m node -T "$IQN" -p "$PORTAL" --login
udevadm settle
wait_for 30 test -L "$LINK"
dev=$(readlink -f "$LINK")
log "$LINK -> $dev"
[ "$(blockdev --getsize64 "$dev")" = 67108864 ]
iscsiadm -m session | tee /tmp/sessions
[ "$(wc -l </tmp/sessions)" = 1 ]
grep -q "$IQN" /tmp/sessions
echo "$dev" >"$LAB_OUT/device"

log "libvirtd runs a TCG guest (no KVM in here) and the LUN hot-plugs into it"
start_tcg_guests 1
cat >/tmp/disk.xml <<EOF
<disk type='block' device='disk'>
  <driver name='qemu' type='raw' cache='none' io='native'/>
  <source dev='$LINK'/>
  <target dev='sda' bus='scsi'/>
  <shareable/>
</disk>
EOF
virsh attach-device demo-1 /tmp/disk.xml --live
virsh domblklist demo-1 >/tmp/blk
grep -qF "$LINK" /tmp/blk
virsh detach-device demo-1 /tmp/disk.xml --live
wait_for 30 sh -c "virsh domblklist demo-1 >/tmp/blk && ! grep -qF '$LINK' /tmp/blk"

log "logout"
iscsiadm -m node -T "$IQN" -p "$PORTAL" --logout
udevadm settle
wait_for 30 test ! -e "$LINK"
if iscsiadm -m session >/tmp/sessions 2>&1; then
  echo "a session is left:" >&2; cat /tmp/sessions >&2; exit 1
fi
grep -q "No active sessions" /tmp/sessions

log "hostagentd next to libvirtd"
virsh -c qemu:///system version
start_hostagentd "$LAB_OUT/hostagentd.log"
curl -sS --fail --unix-socket "$HA_SOCK" http://x/v1/health | tee "$LAB_OUT/health.json"
echo
stop_hostagentd
"""


def test_iscsi_login_logout_and_hostagentd_in_the_lab(lab_vm: LabVM) -> None:
    started = time.monotonic()
    script = SMOKE.replace("__LIO__", LIO).replace("__IQN__", IQN)
    result = lab_vm.run(script, name="smoke", timeout=900)
    total = time.monotonic() - started
    image = "built in" if result.image.built else "cache hit,"
    print(
        f"\nlab timings: image {image} {result.image.seconds:.1f} s; "
        f"{result.timing()}; "
        f"total {total:.1f} s"
    )
    result.check()
    assert (result.out_dir / "device").read_text().startswith("/dev/sd")
    health = json.loads((result.out_dir / "health.json").read_text())
    assert health["status"] == "ok", health
    assert health["libvirt"] == "connected", health
