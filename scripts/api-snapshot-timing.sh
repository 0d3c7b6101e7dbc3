#!/usr/bin/env bash
# Times Firecracker's documented snapshot flow over the API with curl, for `squib run --api-sock`
# and, when FIRECRACKER names a Firecracker binary you built yourself, for Firecracker in the same
# run on the same guest: the figures of docs/perf.md "Through Firecracker's API".
#
# The flow, for each VMM: boot squib's test guest (512 MiB, 2 vCPUs, dirty tracking), pause,
# full create (base.state + base.mem), then three times: resume, run 0.3 s, pause, diff create
# merged in place into base.mem (diffN.state), then a new process loads diff3.state with base.mem
# and resumes; the restored guest must print two COUNTER lines of its own. squib then also writes
# one diff to a file of its own (a chain) and loads that chain directly.
#
# Usage: [FIRECRACKER=path/to/firecracker] [RUNS=3] [MEM_MIB=512] scripts/api-snapshot-timing.sh [SQUIB] [KERNEL]
# Prints one line per call: "<run> <vmm> <call> <ms>".
set -euo pipefail
SQUIB=${1:-target/release/squib}
KERNEL=${2:-$(ls target/release/build/squib-machine-*/out/squib-guest.elf | head -1)}
RUNS=${RUNS:-3}
MEM_MIB=${MEM_MIB:-512}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/squib-api-timing.XXXXXX")
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"' EXIT

call() { # METHOD PATH BODY -> prints seconds, fails on a non-2xx status
  local out
  out=$(curl -s -o "$WORK/reply" -w '%{http_code} %{time_total}' --unix-socket "$SOCK" \
    -X "$1" "http://localhost$2" -H 'Content-Type: application/json' -d "$3")
  [[ ${out%% *} == 2* ]] || { echo "$VMM $1 $2: $(cat "$WORK/reply")" >&2; exit 1; }
  echo "${out#* }"
}
start() { # VMM NAME: start a process serving $WORK/NAME.sock, its console in $WORK/NAME.com1
  SOCK=$WORK/$2.sock
  CONSOLE=$WORK/$2.com1
  if [[ $1 == squib ]]; then
    "$SQUIB" run --backend kvm --api-sock "$SOCK" --serial-file "$CONSOLE" >/dev/null 2>&1 &
  else
    : >"$WORK/$2.log"
    "$FIRECRACKER" --api-sock "$SOCK" --no-seccomp --log-path "$WORK/$2.log" --level Warning \
      >"$CONSOLE" 2>&1 </dev/null &
  fi
  PIDS+=($!)
  until [[ -S $SOCK ]]; do sleep 0.01; done
}
stop() { kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'; }
counters() { grep -ac '^COUNTER' "$CONSOLE" 2>/dev/null || true; }
wait_counters() { # N: until the console has N COUNTER lines
  local deadline=$((SECONDS + 60))
  until [[ $(counters) -ge $1 ]]; do
    ((SECONDS < deadline)) || { echo "$VMM: no COUNTER line $1 in $CONSOLE" >&2; exit 1; }
    sleep 0.01
  done
}
ms() { awk -v s="$1" 'BEGIN { printf "%.1f", s * 1000 }'; }
say() { echo "$RUN $VMM $1 $(ms "$2")"; }

flow() { # VMM: one pass of the flow
  VMM=$1
  local d=$WORK/$RUN-$VMM
  mkdir -p "$d/state" "$d/mem"
  start "$VMM" "$RUN-$VMM-a"
  call PUT /machine-config "{\"vcpu_count\": 2, \"mem_size_mib\": $MEM_MIB, \"track_dirty_pages\": true}" >/dev/null
  call PUT /boot-source "{\"kernel_image_path\": \"$KERNEL\"}" >/dev/null
  call PUT /actions '{"action_type": "InstanceStart"}' >/dev/null
  wait_counters 2
  say pause "$(call PATCH /vm '{"state": "Paused"}')"
  say full_create "$(call PUT /snapshot/create "{\"snapshot_type\": \"Full\", \"snapshot_path\": \"$d/state/base.state\", \"mem_file_path\": \"$d/mem/base.mem\"}")"
  for i in 1 2 3; do
    say resume "$(call PATCH /vm '{"state": "Resumed"}')"
    sleep 0.3
    call PATCH /vm '{"state": "Paused"}' >/dev/null
    say diff_create_in_place "$(call PUT /snapshot/create "{\"snapshot_type\": \"Diff\", \"snapshot_path\": \"$d/state/diff$i.state\", \"mem_file_path\": \"$d/mem/base.mem\"}")"
  done
  if [[ $VMM == squib ]]; then
    call PATCH /vm '{"state": "Resumed"}' >/dev/null
    sleep 0.3
    call PATCH /vm '{"state": "Paused"}' >/dev/null
    say diff_create_own_file "$(call PUT /snapshot/create "{\"snapshot_type\": \"Diff\", \"snapshot_path\": \"$d/state/diff4.state\", \"mem_file_path\": \"$d/mem/diff4.mem\"}")"
  fi
  stop
  sleep "${LOAD_DELAY:-2}"
  start "$VMM" "$RUN-$VMM-b"
  say load_resumed "$(call PUT /snapshot/load "{\"snapshot_path\": \"$d/state/diff3.state\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"$d/mem/base.mem\"}, \"resume_vm\": true}")"
  wait_counters 2
  stop
  if [[ $VMM == squib ]]; then
    start "$VMM" "$RUN-$VMM-c"
    say load_chain_resumed "$(call PUT /snapshot/load "{\"snapshot_path\": \"$d/state/diff4.state\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"$d/mem/diff4.mem\"}, \"resume_vm\": true}")"
    wait_counters 2
    stop
  fi
  rm -rf "$d"
}

for RUN in $(seq 1 "$RUNS"); do
  if [[ -n ${FIRECRACKER:-} ]]; then flow firecracker; fi
  flow squib
done
