"""The lab works: a LIO target and an open-iscsi login on 127.0.0.1 inside the
VM, by-path links from udev, a TCG guest under the VM's own libvirtd taking the
LUN as a hot-plugged disk, and hostagentd answering next to that libvirtd."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.lab.vm import run_in_lab

pytestmark = pytest.mark.lab

IQN = "iqn.2026-11.test.hostagent:lab1"

SMOKE = r"""
set -euo pipefail
IQN=__IQN__
PORTAL=127.0.0.1:3260
LINK=/dev/disk/by-path/ip-$PORTAL-iscsi-$IQN-lun-0
INITIATOR=$(sed -n 's/^InitiatorName=//p' /etc/iscsi/initiatorname.iscsi)
log() { echo "== $(cut -d' ' -f1 /proc/uptime) $*"; }
wait_for() {  # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "gave up waiting for: $*" >&2; return 1; }
    sleep 0.2
  done
}

log "LIO target $IQN for initiator $INITIATOR, one targetctl restore"
mkdir -p /var/lib/lab
truncate -s 64M /var/lib/lab/lun0.img
cat >/tmp/lio.json <<EOF
{
  "storage_objects": [
    {"plugin": "fileio", "name": "lun0", "dev": "/var/lib/lab/lun0.img",
     "size": 67108864, "write_back": false}
  ],
  "targets": [
    {"fabric": "iscsi", "wwn": "$IQN",
     "tpgs": [
       {"tag": 1, "enable": true,
        "attributes": {"authentication": 0, "generate_node_acls": 0},
        "portals": [{"ip_address": "127.0.0.1", "port": 3260}],
        "luns": [{"index": 0, "storage_object": "/backstores/fileio/lun0"}],
        "node_acls": [
          {"node_wwn": "$INITIATOR",
           "mapped_luns": [{"index": 0, "tpg_lun": 0, "write_protect": false}]}
        ]}
     ]}
  ]
}
EOF
# targetctl prints what it skipped and still exits 0: any output is a failure.
targetctl restore /tmp/lio.json >/tmp/targetctl.out 2>&1
if [ -s /tmp/targetctl.out ]; then cat /tmp/targetctl.out >&2; exit 1; fi
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
sed "s/<domain type='kvm'>/<domain type='qemu'>/" "$LAB_SRC/docs/example-guest.xml" >/tmp/guest.xml
virsh create /tmp/guest.xml
cat >/tmp/disk.xml <<EOF
<disk type='block' device='disk'>
  <driver name='qemu' type='raw' cache='none' io='native'/>
  <source dev='$LINK'/>
  <target dev='sda' bus='scsi'/>
  <shareable/>
</disk>
EOF
virsh attach-device demo-1 /tmp/disk.xml --live
# (no `| grep -q` under pipefail: grep quits at the match and virsh dies of SIGPIPE)
virsh domblklist demo-1 >/tmp/blk
grep -qF "$LINK" /tmp/blk
virsh detach-device demo-1 /tmp/disk.xml --live
wait_for 30 sh -c "virsh domblklist demo-1 >/tmp/blk && ! grep -qF '$LINK' /tmp/blk"
virsh destroy demo-1

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
hostagentd --config-file /dev/null --state-dir /tmp/st --socket-path /tmp/ha.sock \
  >"$LAB_OUT/hostagentd.log" 2>&1 &
daemon=$!
wait_for 120 test -S /tmp/ha.sock
curl -sS --fail --unix-socket /tmp/ha.sock http://x/v1/health | tee "$LAB_OUT/health.json"
echo
kill -TERM "$daemon"
wait "$daemon"
log "hostagentd exited 0 on SIGTERM"
"""


def test_iscsi_login_logout_and_hostagentd_in_the_lab(tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_in_lab(SMOKE.replace("__IQN__", IQN), share=tmp_path / "share", timeout=900)
    total = time.monotonic() - started
    image = "built in" if result.image.built else "cache hit,"
    print(
        f"\nlab timings: image {image} {result.image.seconds:.1f} s; "
        f"boot + services {result.boot_seconds} s; VM run {result.wall_seconds:.1f} s; "
        f"total {total:.1f} s"
    )
    result.check()
    assert (result.out_dir / "device").read_text().startswith("/dev/sd")
    health = json.loads((result.out_dir / "health.json").read_text())
    assert health["status"] == "ok", health
    assert health["libvirt"] == "connected", health
