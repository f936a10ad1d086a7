"""iSCSI for real: hostagentd in the lab VM shares one LIO LUN between two guests.

Inside the VM (stock Debian kernel, so iSCSI works): an LIO target on
127.0.0.1 with two targets (one plain, one with CHAP), open-iscsi, libvirtd
with two TCG guests, and hostagentd driven through hostagentctl. The script
asserts from inside the VM and writes what it saw to the share.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.lab.lio import LioLun, lio_setup
from tests.lab.vm import LabVM

pytestmark = pytest.mark.lab

CHAP_PASSWORD = "LabChapPassw0rd-77"
SHARED = "iqn.2026-11.test.hostagent:shared"
CHAP = "iqn.2026-11.test.hostagent:chap"
LIO = lio_setup(
    LioLun(SHARED, "shared", size_mb=64),
    LioLun(CHAP, "chap", size_mb=32, chap=("labuser", CHAP_PASSWORD)),
)

SCENARIO = r"""
set -euo pipefail
. "$LAB_SRC/tests/lab/scenario.sh"
PORTAL=127.0.0.1:3260
SHARED=__SHARED__
CHAP=__CHAP__
CHAP_PASSWORD=__CHAP_PASSWORD__
INITIATOR=$(initiator_name)
LINK=/dev/disk/by-path/ip-$PORTAL-iscsi-$SHARED-lun-0
sessions() { iscsiadm -m session 2>/dev/null | grep -c "$1" || true; }

log "LIO: $SHARED (plain) and $CHAP (CHAP), for $INITIATOR"
__LIO__
log "two TCG guests, firmware only, and hostagentd"
start_tcg_guests_meanwhile 2
start_hostagentd "$LAB_OUT/hostagentd.log"
wait_tcg_guests
cat >/tmp/shared.json <<EOF
{"driver_volume_type": "iscsi",
 "data": {"target_portal": "$PORTAL", "target_iqn": "$SHARED", "target_lun": 0}}
EOF
cat >/tmp/chap.json <<EOF
{"driver_volume_type": "iscsi",
 "data": {"target_portal": "$PORTAL", "target_iqn": "$CHAP", "target_lun": 0,
          "auth_method": "CHAP", "auth_username": "labuser",
          "auth_password": "$CHAP_PASSWORD"}}
EOF

log "attach the LUN to both guests"
for n in 1 2; do
  hostagentctl attach a$n --volume-id vol-shared --domain demo-$n \
    --connection-info /tmp/shared.json --multiattach --json >"$LAB_OUT/a$n.json"
done
record sessions_after_two_attaches "$(sessions "$SHARED")"
[ "$(sessions "$SHARED")" = 1 ] || fail "expected one iSCSI session for two guests"
for n in 1 2; do
  dump_disk $n ua-a$n
  check_shared_disk $n "$LINK"
done
dev=$(readlink -f "$LINK")
record scsi_device "$dev"

log "first detach: the session stays"
hostagentctl detach a1 --json >"$LAB_OUT/d1.json"
[ "$(sessions "$SHARED")" = 1 ] || fail "the session went with the first detach"
test -L "$LINK" || fail "the device went with the first detach"

log "last detach: logged out, device gone"
hostagentctl detach a2 --json >"$LAB_OUT/d2.json"
[ "$(sessions "$SHARED")" = 0 ] || fail "still logged in after the last detach"
udevadm settle
test ! -e "$LINK" || fail "$LINK still there"
test ! -e "/sys/block/$(basename "$dev")" || fail "$dev still there"
record sessions_after_last_detach "$(sessions "$SHARED")"

log "CHAP"
hostagentctl attach c1 --volume-id vol-chap --domain demo-1 \
  --connection-info /tmp/chap.json --multiattach --json >"$LAB_OUT/c1.json"
[ "$(sessions "$CHAP")" = 1 ] || fail "no CHAP session"
iscsiadm -m session -P 3 >/tmp/session.txt 2>&1 || true
hostagentctl detach c1 --json >"$LAB_OUT/c1-detach.json"
[ "$(sessions "$CHAP")" = 0 ] || fail "CHAP session left"
stop_hostagentd

log "the CHAP password in logs?"
found=$(grep -rlF "$CHAP_PASSWORD" "$LAB_OUT/hostagentd.log" /var/log/libvirt "$HA_STATE" \
        "$LAB_OUT"/*.json 2>/dev/null | grep -v "^$HA_STATE/hostagent.sqlite3" || true)
record password_found_in "${found:-nowhere}"
[ -z "$found" ] || fail "the CHAP password is in: $found"
log "done"
"""


def test_one_iscsi_session_shared_by_two_guests_and_chap(lab_vm: LabVM) -> None:
    started = time.monotonic()
    script = (
        SCENARIO.replace("__LIO__", LIO)
        .replace("__SHARED__", SHARED)
        .replace("__CHAP__", CHAP)
        .replace("__CHAP_PASSWORD__", CHAP_PASSWORD)
    )
    result = lab_vm.run(script, name="iscsi", timeout=1200)
    print(f"\nlab iSCSI scenario: {result.timing()}, total {time.monotonic() - started:.1f} s")
    result.check()
    out = result.out_dir
    assert (out / "sessions_after_two_attaches").read_text().strip() == "1"
    assert (out / "sessions_after_last_detach").read_text().strip() == "0"
    a1, a2 = (json.loads((out / f"{n}.json").read_text()) for n in ("a1", "a2"))
    assert (
        a1["connection_key"]
        == a2["connection_key"]
        == ("iscsi:127.0.0.1:3260/iqn.2026-11.test.hostagent:shared/0")
    )
    assert (a1["host_refcount"], a2["host_refcount"]) == (1, 2)
    assert a1["device_path"] == a2["device_path"]
    assert a1["device_path"].startswith("/dev/disk/by-path/ip-127.0.0.1:3260-iscsi-")
    d1, d2 = (json.loads((out / f"{n}.json").read_text()) for n in ("d1", "d2"))
    assert (d1["terminate_connection"], d2["terminate_connection"]) == (False, True)
    assert json.loads((out / "c1-detach.json").read_text())["terminate_connection"]
    assert (out / "password_found_in").read_text().strip() == "nowhere"
    assert CHAP_PASSWORD not in (out / "hostagentd.log").read_text()
