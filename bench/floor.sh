#!/usr/bin/env bash
# The floor experiment: the same benchmark against a hostagentd with its
# safety work switched off (bench/floor.patch: no domain scan and no /proc
# search before a disconnect, no re-read confirming a removal, no fsync) and
# its own INFO logs off. It shows how close to the targets the rest of the
# daemon (HTTP, validation, bookkeeping, lookups, placement) can get. Never
# run such a daemon for real: the patch exists to measure, in a scratch
# worktree that is removed afterwards.
#
#   bench/floor.sh --iterations 100
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python="$repo/.venv/bin/python"
scratch=$(mktemp -d /tmp/hostagent-floor-XXXXXX)
cleanup() { git -C "$repo" worktree remove --force "$scratch" 2>/dev/null || rm -rf "$scratch"; }
trap cleanup EXIT

git -C "$repo" worktree add --quiet --detach "$scratch" HEAD
git -C "$scratch" apply "$repo/bench/floor.patch"
# The daemon runs as `python -m hostagent.daemon` from the current directory:
# from the scratch tree, that is the patched package.
cd "$scratch"
loaded=$(PYTHONPATH="$scratch" "$python" -c 'import hostagent; print(hostagent.__file__)')
case "$loaded" in
  "$scratch"/*) ;;
  *) echo "floor.sh: the patched tree is not the one imported ($loaded)" >&2; exit 1 ;;
esac
echo "floor.sh: measuring the patched daemon in $scratch (UNSAFE, for measurement only)" >&2
PYTHONPATH="$scratch" "$python" "$scratch/bench/attach_detach.py" \
  --daemon-option DEFAULT.default_log_levels=hostagent=WARN "$@"
