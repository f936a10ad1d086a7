#!/bin/bash
# Storage lab, stage 2: PID 1 inside the VM, started by the image's /lab/init
# once the 9p share is mounted at /lab/share. vm.py copies this file into the
# share for every run, so changing it never rebuilds the image.
#
# Brings up what a compute host has (udev, dbus, iscsid, virtlogd, libvirtd,
# the LIO modules), then runs the host's jobs one after another (each a bash
# script under /lab/share/jobs, see below), and powers off when told.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb
share=/lab/share
out=$share/out # the VM's own files: setup-error, boot-seconds, libvirt-caps, dmesg.txt

say() { echo "lab: [$(cut -d' ' -f1 /proc/uptime)] $*" >/dev/console; }
power_off() {
  sync
  say "power off"
  echo o >/proc/sysrq-trigger
  sleep 60
}
trap power_off EXIT
fail_setup() {
  say "setup failed: $*"
  echo "lab setup failed: $*" >"$out/setup-error"
  exit 1
}

mkdir -p "$out"
say "stage 2 on $(uname -r)"

# -- file systems
mnt() { mountpoint -q "$2" || { mkdir -p "$2" && mount -t "$1" "${@:3}" "$1" "$2"; }; }
mnt devpts /dev/pts -o gid=5,mode=620,ptmxmode=666
mnt tmpfs /dev/shm -o mode=1777
mnt tmpfs /run -o mode=755
mnt tmpfs /tmp -o mode=1777
mnt cgroup2 /sys/fs/cgroup
mkdir -p /run/lock /run/lab /run/dbus /var/log/libvirt /etc/target
hostname lab
ip link set lo up

# -- modules (no KVM in here: inner guests run under TCG too)
modprobe -a configfs target_core_mod target_core_file target_core_iblock iscsi_target_mod \
  scsi_transport_iscsi libiscsi iscsi_tcp sd_mod sg virtio_scsi loop tun dm_mod ||
  fail_setup "modprobe"
mnt configfs /sys/kernel/config # (its mount point appears with the module)

# -- udev, so /dev/disk/by-path links appear (settled below: the coldplug
# runs while dbus, iscsid and libvirtd start, none of which waits for it)
/lib/systemd/systemd-udevd --daemon || fail_setup "systemd-udevd"
udevadm trigger --type=subsystems --action=add
udevadm trigger --type=devices --action=add

# -- dbus (targetcli), iscsid, libvirt
dbus-uuidgen --ensure
dbus-daemon --system --fork || fail_setup "dbus-daemon"
if ! grep -q '^InitiatorName=' /etc/iscsi/initiatorname.iscsi 2>/dev/null; then
  echo "InitiatorName=$(iscsi-iname -p iqn.2026-11.test.hostagent.lab)" >/etc/iscsi/initiatorname.iscsi
fi
iscsid || fail_setup "iscsid"
virtlogd -d || fail_setup "virtlogd"
# QEMU's capabilities as an earlier run of this image probed them (vm.py keeps
# them beside the image): libvirtd probes them again only if they are stale,
# instead of spending seconds of TCG at every run's first guest.
if [ -d "$share/libvirt-caps" ]; then
  mkdir -p /var/cache/libvirt/qemu/capabilities
  cp "$share"/libvirt-caps/*.xml /var/cache/libvirt/qemu/capabilities/ 2>/dev/null
fi
libvirtd -d || fail_setup "libvirtd"
for _ in $(seq 120); do
  virsh -q -c qemu:///system uri >/dev/null 2>&1 && break
  sleep 0.5
done
virsh -q -c qemu:///system uri >/dev/null || fail_setup "libvirtd does not answer"
say "libvirtd answers"
udevadm settle --timeout=60 || say "udevadm settle timed out"
say "udev settled"

# -- the project, from the share (the image's venv has a .pth for /lab/share/src)
for tool in hostagentd:hostagent.daemon hostagentctl:hostagent.cli; do
  printf '#!/bin/sh\nexec /opt/hostagent/bin/python -m %s "$@"\n' "${tool#*:}" \
    >"/usr/local/bin/${tool%%:*}"
  chmod 755 "/usr/local/bin/${tool%%:*}"
done

# -- the jobs: the host writes jobs/NN-NAME/run.sh and its timeout, then a
# `ready` file; each runs in turn, leaves out/stdout, out/stderr and
# out/status (written last), and the VM is tidied for the next one. A
# `jobs/stop` file powers the VM off.
jobs=$share/jobs
echo "$(cut -d' ' -f1 /proc/uptime)" >"$out/boot-seconds"
say "setup done; waiting for jobs"

# What a scenario may leave behind that the next one must not meet: its
# hostagentd, LIO targets, iSCSI sessions and records, a multipath map,
# loop devices, krbd mappings, a Ceph cluster, files in /tmp, and guests
# with a disk (guests without one stay: the next scenario's start_tcg_guests
# reuses them instead of spending TCG time on new QEMUs).
tidy() {
  pkill -KILL -f 'hostagent\.daemon' || true
  if pidof multipathd >/dev/null; then multipathd shutdown || true; fi
  multipath -F >/dev/null 2>&1 || true
  rm -f /etc/multipath.conf
  iscsiadm -m node --logoutall=all >/dev/null 2>&1 || true
  iscsiadm -m node -o delete >/dev/null 2>&1 || true
  rm -rf /etc/iscsi/send_targets/* /etc/iscsi/nodes/*
  for rbd in /sys/bus/rbd/devices/*; do
    [ -e "$rbd" ] && echo "${rbd##*/} force" >/sys/bus/rbd/remove 2>/dev/null
  done
  pkill -KILL -x ceph-osd || true
  pkill -KILL -x ceph-mon || true
  if ls /sys/kernel/config/target/iscsi 2>/dev/null | grep -q '^iqn\.'; then
    targetctl clear || true
  fi
  losetup -D
  local name
  for name in $(virsh list --name); do
    virsh domblklist "$name" --details | grep -q ' disk ' && virsh destroy "$name" >/dev/null
  done
  find /tmp -mindepth 1 -delete
  udevadm settle --timeout=30 || true
}

run_job() { # run_job DIR: the job's script, its output and status, then tidy
  local job=$1 name=${1##*/} budget status
  local job_out=$job/out
  mkdir -p "$job_out"
  budget=$(cat "$job/timeout")
  echo "$(cut -d' ' -f1 /proc/uptime)" >"$job_out/started-at"
  say "job $name: running run.sh (at most ${budget}s)"
  : >/run/lab/stdout
  : >/run/lab/stderr
  tail -q -n +1 -F /run/lab/stdout /run/lab/stderr >/dev/console 2>/dev/null &
  local tail_pid=$!
  (
    cd /tmp &&
      LAB_SHARE=$share LAB_OUT=$job_out LAB_SRC=$share/src \
        exec timeout --kill-after=5 "$budget" bash "$job/run.sh" </dev/null >/run/lab/stdout 2>/run/lab/stderr
  )
  status=$?
  [ "$status" = 124 ] && say "job $name: run.sh timed out after ${budget}s"
  say "job $name: run.sh exited $status"
  sleep 0.5
  kill "$tail_pid" 2>/dev/null
  cp /run/lab/stdout /run/lab/stderr "$job_out/"
  dmesg >"$job_out/dmesg.txt"
  tidy >"$job_out/tidy.log" 2>&1
  say "job $name: tidied"
  echo "$status" >"$job_out/status.tmp" && mv "$job_out/status.tmp" "$job_out/status"
}

caps_kept=""
while [ ! -e "$jobs/stop" ]; do
  ran=""
  for ready in "$jobs"/*/ready; do
    [ -e "$ready" ] || continue
    job=${ready%/ready}
    [ -e "$job/out/status" ] && continue
    run_job "$job"
    ran=1
    if [ -z "$caps_kept" ]; then
      mkdir -p "$out/libvirt-caps"
      cp /var/cache/libvirt/qemu/capabilities/*.xml "$out/libvirt-caps/" 2>/dev/null
      caps_kept=1
    fi
  done
  [ -n "$ran" ] || sleep 0.3
done
dmesg >"$out/dmesg.txt"
