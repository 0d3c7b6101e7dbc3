#!/usr/bin/env bash
# Times Firecracker's documented snapshot flow over the API with curl, for `squib run --api-sock`
# and, when FIRECRACKER names a Firecracker binary you built yourself, for Firecracker in the same
# run on the same guest: the figures of docs/perf.md "Through Firecracker's API".
#
# The flow, for each VMM: boot squib's test guest (512 MiB, 2 vCPUs, dirty tracking), pause,
# full create (base.state + base.mem), then DIFFS times (default 5): resume, run 0.3 s, pause,
# diff create merged in place into base.mem (diffN.state); then, 2 s after that process is gone
# (LOAD_DELAY: its 512 MiB take the kernel a while to free on a nested host, which would land in
# the load), a new process loads the last diffN.state with base.mem and resumes; the restored
# guest must print two COUNTER lines of its own. squib then also writes
# one diff to a file of its own (a chain) and loads that chain directly.
#
# Usage: [FIRECRACKER=path/to/firecracker] [RUNS=3] [DIFFS=5] [MEM_MIB=512] [LOAD_DELAY=2]
#        scripts/api-snapshot-timing.sh [SQUIB] [KERNEL]
# Prints one line per call: "<run> <vmm> <call> <ms>".
set -euo pipefail
SQUIB=${1:-target/release/squib}
KERNEL=${2:-$(ls target/release/build/squib-machine-*/out/squib-guest.elf | head -1)}
RUNS=${RUNS:-3}
DIFFS=${DIFFS:-5}
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
say() { echo "$RUN $VMM $1 $(ms "$2")" | tee -a "$WORK/results"; }

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
  for i in $(seq 1 "$DIFFS"); do
    say resume "$(call PATCH /vm '{"state": "Resumed"}')"
    sleep 0.3
    call PATCH /vm '{"state": "Paused"}' >/dev/null
    say diff_create_in_place "$(call PUT /snapshot/create "{\"snapshot_type\": \"Diff\", \"snapshot_path\": \"$d/state/diff$i.state\", \"mem_file_path\": \"$d/mem/base.mem\"}")"
  done
  if [[ $VMM == squib ]]; then
    call PATCH /vm '{"state": "Resumed"}' >/dev/null
    sleep 0.3
    call PATCH /vm '{"state": "Paused"}' >/dev/null
    say diff_create_own_file "$(call PUT /snapshot/create "{\"snapshot_type\": \"Diff\", \"snapshot_path\": \"$d/state/own.state\", \"mem_file_path\": \"$d/mem/own.mem\"}")"
  fi
  stop
  sleep "${LOAD_DELAY:-2}"
  start "$VMM" "$RUN-$VMM-b"
  say load_resumed "$(call PUT /snapshot/load "{\"snapshot_path\": \"$d/state/diff$DIFFS.state\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"$d/mem/base.mem\"}, \"resume_vm\": true}")"
  wait_counters 2
  stop
  if [[ $VMM == squib ]]; then
    sleep "${LOAD_DELAY:-2}"
    start "$VMM" "$RUN-$VMM-c"
    say load_chain_resumed "$(call PUT /snapshot/load "{\"snapshot_path\": \"$d/state/own.state\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"$d/mem/own.mem\"}, \"resume_vm\": true}")"
    wait_counters 2
    stop
  fi
  rm -rf "$d"
}

for RUN in $(seq 1 "$RUNS"); do
  if [[ -n ${FIRECRACKER:-} ]]; then flow firecracker; fi
  flow squib
done

# Per run: the median of each call for each VMM, and squib's as a ratio of Firecracker's.
echo "run call squib_ms firecracker_ms ratio"
sort -k1,1n -k3,3 -k2,2 "$WORK/results" | awk '
  function median(list,   n, v, i, j, t) {
    n = split(list, v, " ")
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] + 0 < v[i] + 0) { t = v[i]; v[i] = v[j]; v[j] = t }
    return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
  }
  $3 != "resume" && $3 != "pause" { k = $1 " " $3; s[k, $2] = s[k, $2] " " $4; keys[k] = 1 }
  END {
    for (k in keys) {
      sq = (k SUBSEP "squib") in s ? median(s[k, "squib"]) : ""
      fc = (k SUBSEP "firecracker") in s ? median(s[k, "firecracker"]) : ""
      printf "%s %s %s %s\n", k, sq == "" ? "-" : sq, fc == "" ? "-" : fc, (sq != "" && fc != "" && fc > 0) ? sprintf("%.2f", sq / fc) : "-"
    }
  }' | sort -k1,1n -k2,2
