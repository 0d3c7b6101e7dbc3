# Firecracker's documented snapshot flow with curl on --api-sock: pause, full create, resume,
# pause, diff create, kill -9; then in new processes load the diff, and the full, and resume.
# Each restored guest's counter goes on from its snapshot, its checksums hold, its uptime never
# goes backwards and its kernel log stays free of clock and lockup complaints.
. /rig/lib.sh
snap() { # snap NAME TYPE DIR
  api "$1" PUT /snapshot/create "{\"snapshot_type\": \"$2\", \"snapshot_path\": \"$3/state\", \
\"mem_file_path\": \"$3/memory\"}"
}
load() { # load NAME DIR: a new process that loads DIR paused, then resumes it
  local ms
  start "$1" run --backend kvm --api-sock "$W/$1.sock"
  wait_sock "$1"
  ms=$(api "$1" PUT /snapshot/load "{\"snapshot_path\": \"$2/state\", \"mem_backend\": \
{\"backend_type\": \"File\", \"backend_path\": \"$2/memory\"}, \"track_dirty_pages\": true, \"resume_vm\": false}")
  note "figure load_ms=$ms ($1)"
  note "figure resume_ms=$(api "$1" PATCH /vm '{"state": "Resumed"}') ($1)"
}
mkdir -p "$W/snaps"
boot_api a 1
wait_for a '^RIG-L2 tick=2 ' "$TICK_DEADLINE" "tick 2"
note "figure pause_ms=$(api a PATCH /vm '{"state": "Paused"}')"
full=$(mark a)
note "figure full_create_ms=$(snap a Full "$W/snaps/full")"
note "figure resume_ms=$(api a PATCH /vm '{"state": "Resumed"}') (after the full)"
# The same process runs on after the full snapshot.
continues a "$full" 3
api a PATCH /vm '{"state": "Paused"}' >/dev/null
diff=$(mark a)
note "figure diff_create_ms=$(snap a Diff "$W/snaps/diff")"
kill9 a
load diff "$W/snaps/diff"
continues diff "$diff" 3
kill9 diff
load full "$W/snaps/full"
continues full "$full" 3
pass "full at tick ${full%% *}, diff at tick ${diff%% *}: both restored in new processes and went on"
