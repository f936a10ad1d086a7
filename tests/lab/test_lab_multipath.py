"""iSCSI multipath for real: two portals, one dm-multipath map, shared by two guests.

Inside the lab VM: an LIO target whose one LUN is reachable on two portals
(127.0.0.1 and 127.0.0.2), multipathd, and hostagentd with
``[iscsi] use_multipath = true``. os-brick logs in on both portals and
builds one multipath map; both guests get ``/dev/mapper/<wwid>``; the first
detach keeps both sessions and the map; the last flushes the map and logs
both sessions out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.lab.vm import run_in_lab

pytestmark = pytest.mark.lab

SCENARIO = r"""
set -euo pipefail
IQN=iqn.2026-11.test.hostagent:multipath
INITIATOR=$(sed -n 's/^InitiatorName=//p' /etc/iscsi/initiatorname.iscsi)
log() { echo "== $(cut -d' ' -f1 /proc/uptime) $*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || fail "gave up waiting for: $*"
    sleep 0.2
  done
}
sessions() { iscsiadm -m session 2>/dev/null | grep -c "$IQN" || true; }
maps() { dmsetup ls --target multipath 2>/dev/null | grep -vc '^No devices found' || true; }
record() { echo "$2" >"$LAB_OUT/$1"; }

log "multipathd"
modprobe -a dm_multipath dm_round_robin
cat >/etc/multipath.conf <<EOF
defaults {
  user_friendly_names no
  find_multipaths no
}
EOF
multipathd
wait_for 60 multipathd show status

log "LIO: $IQN on two portals, for $INITIATOR"
mkdir -p /var/lib/lab
truncate -s 64M /var/lib/lab/mp.img
cat >/tmp/lio.json <<EOF
{
  "storage_objects": [
    {"plugin": "fileio", "name": "mp", "dev": "/var/lib/lab/mp.img",
     "size": 67108864, "write_back": false}
  ],
  "targets": [
    {"fabric": "iscsi", "wwn": "$IQN",
     "tpgs": [{"tag": 1, "enable": true,
       "attributes": {"authentication": 0, "generate_node_acls": 0},
       "portals": [{"ip_address": "127.0.0.1", "port": 3260},
                   {"ip_address": "127.0.0.2", "port": 3260}],
       "luns": [{"index": 0, "storage_object": "/backstores/fileio/mp"}],
       "node_acls": [{"node_wwn": "$INITIATOR",
         "mapped_luns": [{"index": 0, "tpg_lun": 0, "write_protect": false}]}]}]}
  ]
}
EOF
targetctl restore /tmp/lio.json >/tmp/targetctl.out 2>&1
if [ -s /tmp/targetctl.out ]; then cat /tmp/targetctl.out >&2; fail "targetctl restore"; fi

log "two TCG guests, firmware only"
for n in 1 2; do
  sed "s/<domain type='kvm'>/<domain type='qemu'>/; s/demo-1/demo-$n/" \
    "$LAB_SRC/docs/example-guest.xml" >/tmp/guest$n.xml
  virsh create /tmp/guest$n.xml >/dev/null
done

log "hostagentd with use_multipath"
cat >/tmp/ha.conf <<EOF
[DEFAULT]
debug = true
[libvirt]
detach_retry_interval = 1
[iscsi]
use_multipath = true
EOF
hostagentd --config-file /tmp/ha.conf --state-dir /tmp/st --socket-path /tmp/ha.sock \
  >"$LAB_OUT/hostagentd.log" 2>&1 &
daemon=$!
wait_for 180 test -S /tmp/ha.sock
export HOSTAGENT_SOCKET=/tmp/ha.sock
cat >/tmp/mp.json <<EOF
{"driver_volume_type": "iscsi",
 "data": {"target_portals": ["127.0.0.2:3260", "127.0.0.1:3260"],
          "target_iqns": ["$IQN", "$IQN"], "target_luns": [0, 0]}}
EOF

log "attach to both guests"
for n in 1 2; do
  hostagentctl attach a$n --volume-id vol-mp --domain demo-$n \
    --connection-info /tmp/mp.json --multiattach --json >"$LAB_OUT/a$n.json"
done
record sessions_after_two_attaches "$(sessions)"
record maps_after_two_attaches "$(maps)"
multipath -ll >"$LAB_OUT/multipath-ll.txt" 2>&1 || true
for n in 1 2; do
  virsh dumpxml demo-$n --xpath "//disk[alias/@name='ua-a$n']" >"$LAB_OUT/disk$n.xml"
done

log "first detach: both sessions and the map stay"
hostagentctl detach a1 --json >"$LAB_OUT/d1.json"
record sessions_after_first_detach "$(sessions)"
record maps_after_first_detach "$(maps)"

log "last detach: map flushed, both sessions logged out"
hostagentctl detach a2 --json >"$LAB_OUT/d2.json"
udevadm settle
record sessions_after_last_detach "$(sessions)"
record maps_after_last_detach "$(maps)"

kill -TERM "$daemon"
wait "$daemon"
log "done"
"""


def test_one_multipath_map_on_two_portals_shared_by_two_guests(tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_in_lab(SCENARIO, share=tmp_path / "share", timeout=1200)
    print(
        f"\nlab multipath scenario: boot {result.boot_seconds} s, VM run "
        f"{result.wall_seconds:.1f} s, total {time.monotonic() - started:.1f} s"
    )
    result.check()
    out = result.out_dir

    def seen(name: str) -> str:
        return (out / name).read_text().strip()

    assert (seen("sessions_after_two_attaches"), seen("maps_after_two_attaches")) == ("2", "1"), (
        seen("multipath-ll.txt")
    )
    a1, a2 = (json.loads((out / f"{n}.json").read_text()) for n in ("a1", "a2"))
    # Portal order in the request does not matter: the key is canonical.
    assert (
        a1["connection_key"]
        == a2["connection_key"]
        == (
            "iscsi:127.0.0.1:3260/iqn.2026-11.test.hostagent:multipath/0,"
            "127.0.0.2:3260/iqn.2026-11.test.hostagent:multipath/0"
        )
    )
    assert (a1["host_refcount"], a2["host_refcount"]) == (1, 2)
    assert a1["device_path"] == a2["device_path"]
    assert a1["device_path"].startswith("/dev/mapper/"), a1["device_path"]
    for n in (1, 2):
        disk = (out / f"disk{n}.xml").read_text().replace("'", '"')
        assert f'<source dev="{a1["device_path"]}"' in disk, disk
        assert "<shareable/>" in disk
    assert (seen("sessions_after_first_detach"), seen("maps_after_first_detach")) == ("2", "1")
    assert (seen("sessions_after_last_detach"), seen("maps_after_last_detach")) == ("0", "0")
    d1, d2 = (json.loads((out / f"{n}.json").read_text()) for n in ("d1", "d2"))
    assert (d1["terminate_connection"], d2["terminate_connection"]) == (False, True)
