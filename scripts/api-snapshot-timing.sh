#!/usr/bin/env bash
# Times Firecracker's snapshot calls against `squib run --api-sock` with curl: the figures of
# docs/perf.md "Guest kernel snapshots (512 MiB)", through the API.
# Usage: scripts/api-snapshot-timing.sh [SQUIB] [KERNEL]   (defaults: release build, test guest)
set -euo pipefail
SQUIB=${1:-target/release/squib}
KERNEL=${2:-$(ls target/release/build/squib-machine-*/out/squib-guest.elf | head -1)}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/squib-api-timing.XXXXXX")
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
call() { # METHOD PATH BODY -> prints seconds, fails on a non-2xx status
  local out
  out=$(curl -s -o "$WORK/reply" -w '%{http_code} %{time_total}' --unix-socket "$SOCK" \
    -X "$1" "http://localhost$2" -H 'Content-Type: application/json' -d "$3")
  [[ ${out%% *} == 2* ]] || { echo "$1 $2: $(cat "$WORK/reply")" >&2; exit 1; }
  echo "${out#* }"
}
start() { SOCK=$WORK/$1.sock; "$SQUIB" run --backend kvm --api-sock "$SOCK" --serial-file "$WORK/$1.com1" >/dev/null 2>&1 &
  until [[ -S $SOCK ]]; do sleep 0.01; done; }
ms() { awk -v s="$1" 'BEGIN { printf "%.1f ms", s * 1000 }'; }
mkdir "$WORK/snaps"
start a
call PUT /machine-config '{"vcpu_count": 2, "mem_size_mib": 512, "track_dirty_pages": true}' >/dev/null
call PUT /boot-source "{\"kernel_image_path\": \"$KERNEL\"}" >/dev/null
call PUT /actions '{"action_type": "InstanceStart"}' >/dev/null
until grep -q '^COUNTER 2 ' "$WORK/a.com1" 2>/dev/null; do sleep 0.01; done
echo "pause:       $(ms "$(call PATCH /vm '{"state": "Paused"}')")"
echo "full create: $(ms "$(call PUT /snapshot/create "{\"snapshot_type\": \"Full\", \"snapshot_path\": \"$WORK/snaps/base/state\", \"mem_file_path\": \"$WORK/snaps/base/memory\"}")")"
for i in 1 2 3; do
  call PATCH /vm '{"state": "Resumed"}' >/dev/null
  sleep 0.3
  call PATCH /vm '{"state": "Paused"}' >/dev/null
  echo "diff create: $(ms "$(call PUT /snapshot/create "{\"snapshot_type\": \"Diff\", \"snapshot_path\": \"$WORK/snaps/diff$i/state\", \"mem_file_path\": \"$WORK/snaps/diff$i/memory\"}")")"
done
kill %1
for what in base diff3; do
  start "load-$what"
  echo "load $what (resume_vm): $(ms "$(call PUT /snapshot/load "{\"snapshot_path\": \"$WORK/snaps/$what/state\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"$WORK/snaps/$what/memory\"}, \"resume_vm\": true}")")"
  # The restored guest runs: two COUNTER lines of its own.
  until [[ $(grep -sc '^COUNTER' "$WORK/load-$what.com1") -ge 2 ]]; do sleep 0.01; done
  kill %%
done
