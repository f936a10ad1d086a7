# Helpers the lab scenarios share. Each test's script runs inside the lab VM
# (bash, root, cwd /tmp) and starts with
#
#   set -euo pipefail
#   . "$LAB_SRC/tests/lab/scenario.sh"
#
# Nothing here runs on its own: it only defines functions and defaults.
# (Never pipe into `grep -q` under pipefail: grep quits at the first match
# and the writer dies of SIGPIPE. Write to a file and grep that.)

# Where hostagentd keeps its state, socket and config; a scenario may set
# these before sourcing (krbd keeps them out of /tmp for its PrivateTmp probe).
HA_STATE=${HA_STATE:-/tmp/st}
HA_SOCK=${HA_SOCK:-/tmp/ha.sock}
HA_CONF=${HA_CONF:-/tmp/ha.conf}

log() { echo "== $(cut -d' ' -f1 /proc/uptime) $*"; }
fail() {
  echo "FAILED: $*" >&2
  exit 1
}
wait_for() { # wait_for SECONDS COMMAND...: poll until COMMAND succeeds, or fail
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || fail "gave up waiting for: $*"
    sleep 0.2
  done
}
record() { echo "$2" >"$LAB_OUT/$1"; } # record NAME VALUE: for the test's asserts

initiator_name() { sed -n 's/^InitiatorName=//p' /etc/iscsi/initiatorname.iscsi; }

lio_restore() { # lio_restore JSON: load a whole LIO configuration
  # targetctl prints what it skipped and still exits 0: any output is a failure.
  targetctl restore "$1" >/tmp/targetctl.out 2>&1
  if [ -s /tmp/targetctl.out ]; then
    cat /tmp/targetctl.out >&2
    fail "targetctl restore $1"
  fi
}

start_tcg_guests() { # start_tcg_guests N: demo-1..demo-N, firmware only, under TCG
  # qboot (QEMU's own minimal firmware) idles at once; SeaBIOS spends seconds
  # of emulated CPU probing for a boot device in every guest it starts.
  # All at once: a QEMU start under TCG is seconds of one vCPU, and there are two.
  # A demo-N an earlier scenario left running (the VM's tidy keeps only guests
  # without a disk) is used as it is.
  local n loader="" pids=() status=0
  [ -e /usr/share/qemu/qboot.rom ] &&
    loader="<loader readonly='yes' type='rom'>/usr/share/qemu/qboot.rom</loader>"
  for n in $(seq 1 "$1"); do
    [ "$(virsh domstate "demo-$n" 2>/dev/null)" = running ] && continue
    sed "s/<domain type='kvm'>/<domain type='qemu'>/; s/demo-1/demo-$n/; s#hvm</type>#hvm</type>$loader#" \
      "$LAB_SRC/docs/example-guest.xml" >/tmp/guest$n.xml
    virsh create /tmp/guest$n.xml >/dev/null &
    pids+=($!)
  done
  for n in "${pids[@]}"; do wait "$n" || status=$?; done
  [ "$status" = 0 ] || fail "virsh create of a TCG guest failed"
}

start_tcg_guests_meanwhile() { # start_tcg_guests_meanwhile N: start_tcg_guests N in the background
  # while the scenario starts hostagentd (Python imports under TCG take one
  # vCPU for half a minute); wait_tcg_guests before the guests are used.
  start_tcg_guests "$1" &
  guests_starting=$!
}

wait_tcg_guests() { # the guests of start_tcg_guests_meanwhile are running
  wait "$guests_starting" || fail "the TCG guests did not start"
  log "TCG guests running"
}

hostagentd_config() { # hostagentd_config [INI_LINE...]: debug logs, 1 s unplug retries, then the lines
  {
    printf '[DEFAULT]\ndebug = true\n[libvirt]\ndetach_retry_interval = 1\n'
    printf '%s\n' "$@"
  } >"$HA_CONF"
}

start_hostagentd() { # start_hostagentd LOG [private-tmp]: background, sets $daemon, waits for the socket
  # private-tmp: a /tmp of its own, as systemd's PrivateTmp=yes gives it.
  local args=(--config-file "$HA_CONF" --state-dir "$HA_STATE" --socket-path "$HA_SOCK")
  [ -f "$HA_CONF" ] || hostagentd_config
  mkdir -p "$(dirname "$HA_SOCK")"
  rm -f "$HA_SOCK"
  if [ "${2:-}" = private-tmp ]; then
    unshare --mount --propagation private sh -c \
      'mount -t tmpfs -o mode=1777 tmpfs /tmp && exec hostagentd "$@"' hostagentd \
      "${args[@]}" >>"$1" 2>&1 &
  else
    hostagentd "${args[@]}" >>"$1" 2>&1 &
  fi
  daemon=$!
  export HOSTAGENT_SOCKET=$HA_SOCK
  wait_for 180 test -S "$HA_SOCK"
}

stop_hostagentd() { # SIGTERM; hostagentd must exit 0
  local status=0
  kill -TERM "$daemon"
  wait "$daemon" || status=$?
  [ "$status" = 0 ] || fail "hostagentd exited $status"
  log "hostagentd exited 0"
}

dump_disk() { # dump_disk N ALIAS: demo-N's disk with that alias, to $LAB_OUT/diskN.xml
  virsh dumpxml "demo-$1" --xpath "//disk[alias/@name='$2']" >"$LAB_OUT/disk$1.xml"
}

check_shared_disk() { # check_shared_disk N SOURCE: demo-N's dumped disk uses SOURCE, shareable
  sed "s/'/\"/g" "$LAB_OUT/disk$1.xml" >/tmp/disk$1.xml
  grep -qF "<source dev=\"$2\"" /tmp/disk$1.xml || fail "demo-$1 does not use $2"
  grep -q "<shareable/>" /tmp/disk$1.xml || fail "demo-$1's disk is not shareable"
}
