"""krbd for real: hostagentd in the lab VM maps one RBD image once for two guests.

Inside the VM (stock Debian kernel, so ``rbd.ko`` is there): a one-mon,
one-OSD Ceph cluster from tests/ceph/cluster.py, libvirtd with two TCG guests,
and hostagentd with ``[rbd] attach_mode = krbd`` driven through hostagentctl.
os-brick's RBDConnector runs ``rbd map`` once; both guests get the same
``/dev/rbd/<pool>/<image>`` (ceph-common's udev rule names it) with
``<shareable/>``; the last detach unmaps. The script asserts from inside the
VM and writes what it saw to the share.

The same VM run then probes two cases the scenario does not cover, recorded
rather than asserted inside: connection_info with the cephx key in
``data.key`` instead of ``data.keyring`` (the connector turns it into keyring
text for os-brick), and a last detach after hostagentd restarted with a
fresh ``/tmp`` (as systemd's ``PrivateTmp=yes`` gives it; the connector
writes os-brick's temporary ceph.conf again to unmap).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxml import etree

from tests.lab.vm import LabVM

pytestmark = pytest.mark.lab

POOL = "volumes"
IMAGE = "volume-krbd"

SCENARIO = r"""
set -euo pipefail
# hostagentd's files are not in /tmp: the PrivateTmp probe below gives it a /tmp of its own.
HA_STATE=/var/lib/hostagent-lab
HA_SOCK=/run/hostagent-lab/ha.sock
HA_CONF=/etc/hostagent-lab.conf
. "$LAB_SRC/tests/lab/scenario.sh"
POOL=__POOL__
IMAGE=__IMAGE__
LINK=/dev/rbd/$POOL/$IMAGE
# The cluster's root is on the ext4 root disk, not the VM's tmpfs /tmp: the
# OSD opens its bluestore block file with O_DIRECT, which tmpfs refuses on 6.1.
CEPH_ROOT=/var/tmp/hceph
CEPH_CONF=$CEPH_ROOT/ceph.conf
uptime_s() { cut -d' ' -f1 /proc/uptime; }
# the kernel's mappings of the image, one device a line (no pipe into grep -q: SIGPIPE)
mappings() {
  rbd -c "$CEPH_CONF" device list --format json >/tmp/maps.json
  python3 -c 'import json, sys
for m in json.load(open("/tmp/maps.json")):
    if (m["pool"], m["name"]) == (sys.argv[1], sys.argv[2]):
        print(m["device"])' "$POOL" "$IMAGE"
}
count_mappings() { mappings | wc -l; }
keep_logs() {
  mkdir -p "$LAB_OUT/ceph-log"
  cp "$CEPH_ROOT"/log/* "$LAB_OUT/ceph-log/" 2>/dev/null || true
}
trap keep_logs EXIT

log "rbd module"
modprobe rbd
test -d /sys/bus/rbd || fail "no /sys/bus/rbd after modprobe rbd"

# The cluster starts alone: its `ceph` CLI calls (Python, 3 s timeouts) never
# answer in time while guests and hostagentd start beside them under TCG.
log "a Ceph cluster (one mon, one OSD) under $CEPH_ROOT"
t0=$(uptime_s)
cd "$LAB_SRC"
python3 - "$CEPH_ROOT" "$POOL" "$IMAGE" >"$LAB_OUT/cluster.json" <<'EOF'
import json, sys, time
from pathlib import Path

from tests.ceph.cluster import start_cluster

root, pool, image = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
started = time.monotonic()
cluster = start_cluster(root, timeout=600)
up = time.monotonic() - started
cluster.create_pool(pool)
cluster.create_image(pool, image, size_mb=64)
key = cluster.client_key("cinder", pool)
(root / "cinder.key").write_text(key + "\n")
json.dump({"mon_host": cluster.mon_host, "mon_port": cluster.mon_port,
           "start_seconds": round(up, 1),
           "ready_seconds": round(time.monotonic() - started, 1),
           "timings": {k: round(v, 1) for k, v in cluster.timings.items()},
           "rss_kib": cluster.daemon_rss_kib()}, sys.stdout)
EOF
cd /tmp
t1=$(uptime_s)
KEY=$(cat "$CEPH_ROOT/cinder.key")
printf '[client.cinder]\n\tkey = %s\n' "$KEY" >"$LAB_OUT/cinder.keyring"  # for the host side
MON_PORT=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["mon_port"])' \
  "$LAB_OUT/cluster.json")
log "cluster up on 127.0.0.1:$MON_PORT, pool $POOL, image $IMAGE, client.cinder ($(
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s)"
record cluster_seconds "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')"

# Cinder's rbd connection_info with the keyring text (os-brick's krbd path
# writes it into the ceph.conf it passes to `rbd map --conf`).
cat >/tmp/rbd.json <<EOF
{"driver_volume_type": "rbd",
 "data": {"name": "$POOL/$IMAGE", "hosts": ["127.0.0.1"], "ports": ["$MON_PORT"],
          "cluster_name": "ceph", "auth_enabled": true, "auth_username": "cinder",
          "secret_type": "ceph", "keyring": "[client.cinder]\n\tkey = $KEY\n"}}
EOF

log "two TCG guests, firmware only, and hostagentd, [rbd] attach_mode = krbd"
start_tcg_guests_meanwhile 2
hostagentd_config "[rbd]" "attach_mode = krbd"
start_hostagentd "$LAB_OUT/hostagentd.log"
hostagentctl connector --target 127.0.0.1 --json >"$LAB_OUT/connector.json"
wait_tcg_guests

log "attach the image to both guests"
ta=$(uptime_s)
for n in 1 2; do
  hostagentctl attach a$n --volume-id vol-krbd --domain demo-$n \
    --connection-info /tmp/rbd.json --multiattach --json >"$LAB_OUT/a$n.json"
done
log "attached ($(awk -v a="$ta" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }') s)"
rbd -c "$CEPH_CONF" device list >"$LAB_OUT/showmapped_after_two_attaches"
record mappings_after_two_attaches "$(count_mappings)"
[ "$(count_mappings)" = 1 ] || fail "expected one mapping for two guests"
dev=$(mappings)
record rbd_device "$dev"
test -b "$dev" || fail "$dev is not a block device"
test -L "$LINK" || fail "no udev link $LINK"
[ "$(readlink -f "$LINK")" = "$dev" ] || fail "$LINK does not point to $dev"
for n in 1 2; do
  dump_disk $n ua-a$n
  check_shared_disk $n "$LINK"
done
ls /tmp/brickrbd_* >"$LAB_OUT/brick_conf_while_mapped" 2>/dev/null || true

log "the mapped device is the image: write through $LINK, read back with librbd"
head -c 4096 /dev/urandom >/tmp/pattern
dd if=/tmp/pattern of="$LINK" bs=4096 count=1 seek=100 oflag=direct status=none
rbd -c "$CEPH_CONF" export --no-progress "$POOL/$IMAGE" /tmp/export.img
cmp <(dd if=/tmp/export.img bs=4096 skip=100 count=1 status=none) /tmp/pattern ||
  fail "what was written to $LINK is not in the image"

log "first detach: the mapping stays"
hostagentctl detach a1 --json >"$LAB_OUT/d1.json"
[ "$(count_mappings)" = 1 ] || fail "the mapping went with the first detach"
test -b "$dev" || fail "$dev went with the first detach"
record mappings_after_first_detach "$(count_mappings)"

log "last detach: unmapped"
hostagentctl detach a2 --json >"$LAB_OUT/d2.json"
udevadm settle
record mappings_after_last_detach "$(count_mappings)"
[ "$(count_mappings)" = 0 ] || fail "still mapped after the last detach"
test ! -e "$LINK" || fail "$LINK still there"
test ! -e "/sys/block/$(basename "$dev")" || fail "$dev still there"
ls /tmp/brickrbd_* >"$LAB_OUT/brick_conf_after_unmap" 2>/dev/null || true

# -- probes of what the scenario above does not cover; recorded, not fatal
# (the first on the scenario's own hostagentd: a start fewer under TCG)
log "probe: krbd with the key in data.key (no keyring text)"
python3 -c 'import json, sys
info = json.load(open(sys.argv[1]))
info["data"]["key"] = sys.argv[2]
del info["data"]["keyring"]
json.dump(info, open(sys.argv[3], "w"))' /tmp/rbd.json "$KEY" /tmp/rbd-key.json
status=0
timeout 300 hostagentctl attach k1 --volume-id vol-krbd --domain demo-1 \
  --connection-info /tmp/rbd-key.json --multiattach --json >"$LAB_OUT/k1.out" 2>&1 || status=$?
record key_only_attach_status "$status"
record key_only_mappings "$(count_mappings)"
if [ "$status" = 0 ]; then hostagentctl detach k1 --json >"$LAB_OUT/k1-detach.out" 2>&1 || true; fi
stop_hostagentd

log "the cephx key in logs?"
found=$(grep -rlF "$KEY" "$LAB_OUT/hostagentd.log" /var/log/libvirt "$HA_STATE" \
        "$LAB_OUT"/*.json 2>/dev/null | grep -v "^$HA_STATE/hostagent.sqlite3" || true)
record key_found_in "${found:-nowhere}"
[ -z "$found" ] || fail "the cephx key is in: $found"

log "probe: a restart with a fresh /tmp (systemd PrivateTmp=yes) between attach and detach"
start_hostagentd "$LAB_OUT/hostagentd-probes.log" private-tmp
hostagentctl attach r1 --volume-id vol-krbd --domain demo-1 \
  --connection-info /tmp/rbd.json --multiattach --json >"$LAB_OUT/r1.json"
stop_hostagentd
start_hostagentd "$LAB_OUT/hostagentd-probes.log" private-tmp
status=0
timeout 300 hostagentctl detach r1 --json >"$LAB_OUT/r1-detach.out" 2>&1 || status=$?
record restart_detach_status "$status"
status=0
timeout 300 hostagentctl detach r1 --json >"$LAB_OUT/r1-detach-retry.out" 2>&1 || status=$?
record restart_detach_retry_status "$status"
record restart_mappings_after_detach "$(count_mappings)"
hostagentctl show r1 --json >"$LAB_OUT/r1-show.out" 2>&1 || true
stop_hostagentd
found=$(grep -rlF "$KEY" "$LAB_OUT"/*.out "$LAB_OUT/hostagentd-probes.log" 2>/dev/null || true)
record probe_key_found_in "${found:-nowhere}"
log "done"
"""


@dataclass(frozen=True)
class Run:
    out: Path
    key: str


@pytest.fixture(scope="module")
def krbd_run(lab_vm: LabVM) -> Run:
    """One VM run for the whole module: the scenario, then the probes."""
    started = time.monotonic()
    script = SCENARIO.replace("__POOL__", POOL).replace("__IMAGE__", IMAGE)
    result = lab_vm.run(script, name="krbd", timeout=1800)
    out = result.out_dir
    cluster_json = out / "cluster.json"
    cluster = json.loads(cluster_json.read_text()) if cluster_json.exists() else {}
    print(
        f"\nlab krbd scenario: {result.timing()}, "
        f"total {time.monotonic() - started:.1f} s; "
        f"ceph cluster up in {cluster.get('start_seconds')} s, pool, image and "
        f"user ready in {cluster.get('ready_seconds')} s ({cluster.get('timings')})"
    )
    result.check()
    key = next(
        line.split("=", 1)[1].strip()
        for line in (out / "cinder.keyring").read_text().splitlines()
        if line.strip().startswith("key")
    )
    return Run(out, key)


def _text(run: Run, name: str) -> str:
    return (run.out / name).read_text().strip()


def test_one_krbd_mapping_shared_by_two_guests(krbd_run: Run) -> None:
    out = krbd_run.out
    assert _text(krbd_run, "mappings_after_two_attaches") == "1"
    assert _text(krbd_run, "mappings_after_first_detach") == "1"
    assert _text(krbd_run, "mappings_after_last_detach") == "0"
    assert json.loads(_text(krbd_run, "connector.json"))["do_local_attach"] is True
    a1, a2 = (json.loads(_text(krbd_run, f"{n}.json")) for n in ("a1", "a2"))
    assert a1["connection_key"] == a2["connection_key"] == f"rbd:ceph/{POOL}/{IMAGE}"
    assert (a1["host_refcount"], a2["host_refcount"]) == (1, 2)
    assert a1["device_path"] == a2["device_path"] == f"/dev/rbd/{POOL}/{IMAGE}"
    assert _text(krbd_run, "rbd_device").startswith("/dev/rbd")
    for n in (1, 2):
        disk = etree.fromstring((out / f"disk{n}.xml").read_bytes())
        assert disk.get("type") == "block"
        assert disk.xpath("string(source/@dev)") == f"/dev/rbd/{POOL}/{IMAGE}"
        assert disk.find("shareable") is not None
    d1, d2 = (json.loads(_text(krbd_run, f"{n}.json")) for n in ("d1", "d2"))
    assert (d1["terminate_connection"], d2["terminate_connection"]) == (False, True)
    assert (d1["host_disconnected"], d2["host_disconnected"]) == (False, True)
    # os-brick's ceph.conf (mon_host and the keyring) lives while mapped, not after
    assert _text(krbd_run, "brick_conf_while_mapped").startswith("/tmp/brickrbd_")
    assert _text(krbd_run, "brick_conf_after_unmap") == ""
    assert _text(krbd_run, "key_found_in") == "nowhere"
    assert krbd_run.key not in (out / "hostagentd.log").read_text()
    assert _text(krbd_run, "probe_key_found_in") == "nowhere"


def test_krbd_attach_with_the_key_in_data_key(krbd_run: Run) -> None:
    assert _text(krbd_run, "key_only_attach_status") == "0", _text(krbd_run, "k1.out")
    assert _text(krbd_run, "key_only_mappings") == "1"


def test_krbd_last_detach_after_a_restart_with_a_fresh_tmp(krbd_run: Run) -> None:
    assert _text(krbd_run, "restart_detach_status") == "0", _text(krbd_run, "r1-detach.out")
    assert _text(krbd_run, "restart_mappings_after_detach") == "0"
