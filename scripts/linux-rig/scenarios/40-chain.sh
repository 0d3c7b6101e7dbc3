# A chain of a full snapshot and three diffs, taken a few ticks apart; the last diff restores
# (its whole chain) in a new process and the guest runs on for ten seconds, clean.
. /rig/lib.sh
snap() { # snap NAME TYPE DIR
  api "$1" PUT /snapshot/create "{\"snapshot_type\": \"$2\", \"snapshot_path\": \"$3/state\", \
\"mem_file_path\": \"$3/memory\"}" >/dev/null
}
mkdir -p "$W/chain"
boot_api a 1
at=$(mark a)
for s in full d1 d2 d3; do
  type=Diff
  [ $s = full ] && type=Full
  wait_for a "^RIG-L2 tick=$(( ${at%% *} + 2 )) " "$TICK_DEADLINE" "two more ticks before snapshot $s"
  api a PATCH /vm '{"state": "Paused"}' >/dev/null
  at=$(mark a)
  snap a $type "$W/chain/$s"
  api a PATCH /vm '{"state": "Resumed"}' >/dev/null
done
kill9 a
start b run --backend kvm --api-sock "$W/b.sock"
wait_sock b
note "figure chain_load_ms=$(api b PUT /snapshot/load "{\"snapshot_path\": \"$W/chain/d3/state\", \
\"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"$W/chain/d3/memory\"}, \"resume_vm\": true}")"
continues b "$at" 10
up0=$(echo "$at" | cut -d' ' -f2)
up1=$(last_tick b | cut -d' ' -f2)
awk -v a="$up0" -v b="$up1" 'BEGIN { exit !(b - a >= 10) }' || fail "the restored guest's uptime went from $up0 to $up1: less than 10 s"
pass "full + 3 diffs, restored at tick ${at%% *}; ran $(awk -v a="$up0" -v b="$up1" 'BEGIN { print b - a }') s on, clean"
