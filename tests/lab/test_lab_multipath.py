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

import pytest

from tests.lab.lio import LioLun, lio_setup
from tests.lab.vm import LabVM

pytestmark = pytest.mark.lab

IQN = "iqn.2026-11.test.hostagent:multipath"
LIO = lio_setup(LioLun(IQN, "mp", size_mb=64, portals=("127.0.0.1", "127.0.0.2")))

SCENARIO = r"""
set -euo pipefail
. "$LAB_SRC/tests/lab/scenario.sh"
IQN=__IQN__
INITIATOR=$(initiator_name)
sessions() { iscsiadm -m session 2>/dev/null | grep -c "$IQN" || true; }
maps() { dmsetup ls --target multipath 2>/dev/null | grep -vc '^No devices found' || true; }

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
__LIO__
log "two TCG guests, firmware only, and hostagentd with use_multipath"
start_tcg_guests_meanwhile 2
hostagentd_config "[iscsi]" "use_multipath = true"
start_hostagentd "$LAB_OUT/hostagentd.log"
wait_tcg_guests
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
  dump_disk $n ua-a$n
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
stop_hostagentd
log "done"
"""


def test_one_multipath_map_on_two_portals_shared_by_two_guests(lab_vm: LabVM) -> None:
    started = time.monotonic()
    script = SCENARIO.replace("__LIO__", LIO).replace("__IQN__", IQN)
    result = lab_vm.run(script, name="multipath", timeout=1200)
    print(f"\nlab multipath scenario: {result.timing()}, total {time.monotonic() - started:.1f} s")
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
