# Sourced by every scenario (inside the emulated host, busybox sh). A scenario drives squib,
# checks what the stock guest printed (l2-init.sh's lines), and ends with pass or fail.
#
# Environment (set by l1-init.sh): RIG_WORK, a fresh directory for this scenario; RIG_NAME.
# Every process started with `start` is killed when the scenario ends.
W=$RIG_WORK
SQUIB=/rig/squib
KERNEL=/rig/vmlinux
INITRD=/rig/l2-initrd.cpio
# Firecracker's documented boot arguments, and quiet: the guest's console is a serial port that
# costs an exit per byte; l2-init.sh reports the kernel's warnings itself.
CMDLINE="console=ttyS0 reboot=k panic=1 pci=off quiet"
# run.sh's RIG_L2_VERBOSE=1: the guest kernel's whole log on its console.
grep -qw rig.l2verbose /proc/cmdline && CMDLINE="console=ttyS0 reboot=k panic=1 pci=off"
# run.sh's RIG_L2_ARGS: more guest kernel arguments (commas stand for spaces on the way here).
extra=$(sed -n 's/.*rig\.l2args=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ')
[ -z "$extra" ] || CMDLINE="$CMDLINE $extra"
MEM_MIB=256
# Deadlines: generous (the emulated host runs a stock kernel's boot in tens of seconds).
BOOT_DEADLINE=$(sed -n 's/.*rig\.bootdeadline=\([0-9]*\).*/\1/p' /proc/cmdline)
BOOT_DEADLINE=${BOOT_DEADLINE:-300}
TICK_DEADLINE=60

pass() { echo "PASS $*"; exit 0; }
# diag: what the emulated host's KVM and squib's threads are doing (for a guest gone quiet:
# a vCPU thread asleep in KVM_RUN with halt exits counting up is a guest waiting for an
# interrupt; one running with exits counting is a guest spinning).
diag() {
  local pid t k
  for k in exits halt_exits halt_wakeup irq_exits irq_injections io_exits nmi_injections; do
    [ -r /sys/kernel/debug/kvm/$k ] && printf '%s=%s ' "$k" "$(cat /sys/kernel/debug/kvm/$k)"
  done
  echo
  # Where the guest's vCPUs are: the RIPs of its exits over a moment (KVM's kvm_exit
  # tracepoint in the emulated host; the guest runs without KASLR, so a RIP names the same
  # code every boot).
  local tr=/sys/kernel/debug/tracing
  if [ -w $tr/events/kvm/kvm_exit/enable ]; then
    : >$tr/trace
    echo 1 >$tr/events/kvm/kvm_exit/enable
    echo 1 >$tr/events/kvm/kvm_pio/enable
    sleep 0.5
    echo 0 >$tr/events/kvm/kvm_exit/enable
    echo 0 >$tr/events/kvm/kvm_pio/enable
    # Port I/O, by port and direction: a guest polling a port shows here.
    sed -n 's/.*kvm_pio: \(pio_[a-z]*\) at \(0x[0-9a-f]*\).*val \(0x[0-9a-f]*\).*/\1 \2 \3/p' $tr/trace | sort | uniq -c | sort -rn | head -n 4 |
      while read -r n dir port val; do echo "  $n $dir at port $port (last value $val)"; done
    sed -n 's/.*reason \([A-Za-z_0-9]*\).*rip 0x\([0-9a-f]*\).*/\1 \2/p' $tr/trace | sort | uniq -c | sort -rn | head -n 6 |
      while read -r n why rip; do
        echo "  $n exits ($why) at $rip"
      done
  fi
  for pid in $(cat "$W/pids" 2>/dev/null); do
    [ -d /proc/$pid ] || continue
    for t in /proc/$pid/task/*; do
      awk '{ sub(/^[^(]*\(/, ""); sub(/\)/, ""); print "  thread", $1, "state", $2, "utime", $13, "stime", $14 }' "$t/stat"
    done
  done
}
# fail DETAIL: the verdict, after the last lines of every guest console of the scenario.
fail() {
  local f
  echo "--- KVM and squib now, and 3 s later:" >&2
  diag >&2
  sleep 3
  diag >&2
  for f in "$W"/*.com1; do
    [ -e "$f" ] || continue
    if grep -qE 'BUG:|Oops|cut here|Kernel panic' "$f"; then
      echo "--- the first kernel complaint in ${f##*/}:" >&2
      grep -m 1 -B 3 -A 40 -E 'BUG:|Oops|cut here|Kernel panic' "$f" >&2
    fi
    echo "--- last lines of ${f##*/}:" >&2
    tail -n 25 "$f" >&2
  done
  echo "FAIL $*"
  exit 1
}
# note LINE: shown in the rig's output under the scenario's name.
note() { echo "$*" >&2; }
now() { cut -d' ' -f1 /proc/uptime; }
# since T: seconds (one decimal) since the uptime T.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# start NAME ARGS...: run `squib ARGS... --serial-file $W/NAME.com1` in the background; its
# output goes to $W/NAME.out, its pid to $W/NAME.pid.
start() {
  local name=$1
  shift
  "$SQUIB" "$@" --serial-file "$W/$name.com1" >"$W/$name.out" 2>&1 &
  echo $! >"$W/$name.pid"
  echo $! >>"$W/pids"
  : >>"$W/$name.com1"
}
pid_of() { cat "$W/$1.pid"; }
alive() { kill -0 "$(pid_of "$1")" 2>/dev/null; }
# died NAME: fail, quoting the end of squib's output.
died() { fail "squib '$1' exited: $(tail -n 3 "$W/$1.out" | tr '\n' ' ')"; }
kill9() { kill -9 "$(pid_of "$1")" 2>/dev/null; wait "$(pid_of "$1")" 2>/dev/null; true; }

# wait_for NAME REGEX SECONDS WHAT: until NAME's console has a line matching REGEX (grep -E);
# fails naming WHAT if SECONDS pass or squib exits first.
wait_for() {
  local name=$1 re=$2 secs=$3 what=$4 t0
  t0=$(now)
  while ! grep -qE "$re" "$W/$name.com1"; do
    alive "$name" || died "$name"
    awk -v a="$t0" -v b="$(now)" -v s="$secs" 'BEGIN { exit !(b - a > s) }' &&
      fail "$what: not seen within ${secs}s (last console line: $(tail -n 1 "$W/$name.com1"))"
    sleep 0.2
  done
}

# wait_sock NAME: until squib's API socket exists.
wait_sock() {
  local n=0
  while [ ! -S "$W/$1.sock" ]; do
    alive "$1" || died "$1"
    n=$((n + 1))
    [ $n -lt 300 ] || fail "squib '$1': no API socket after 60s"
    sleep 0.2
  done
}

# api NAME METHOD PATH BODY: one Firecracker API call on NAME's socket; prints its time in ms;
# fails on a status other than 2xx, quoting the reply.
api() {
  local out code
  out=$(curl -s -o "$W/reply" -w '%{http_code} %{time_total}' --max-time 600 \
    --unix-socket "$W/$1.sock" -X "$2" "http://localhost$3" \
    -H 'Content-Type: application/json' -d "$4") || fail "curl $2 $3 on '$1' failed (exit $?)"
  code=${out%% *}
  case $code in 2*) ;; *) fail "$2 $3 on '$1': HTTP $code $(cat "$W/reply")" ;; esac
  awk -v s="${out#* }" 'BEGIN { printf "%.0f", s * 1000 }'
}

# boot_api NAME VCPUS: start squib with --api-sock and boot the stock guest through the API,
# tracking dirty pages; returns once the guest's init has printed a tick.
boot_api() {
  local name=$1 vcpus=$2 t0
  start "$name" run --backend kvm --api-sock "$W/$name.sock"
  wait_sock "$name"
  api "$name" PUT /machine-config \
    "{\"vcpu_count\": $vcpus, \"mem_size_mib\": $MEM_MIB, \"track_dirty_pages\": true}" >/dev/null
  api "$name" PUT /boot-source "{\"kernel_image_path\": \"$KERNEL\", \"initrd_path\": \"$INITRD\", \
\"boot_args\": \"$CMDLINE\"}" >/dev/null
  t0=$(now)
  api "$name" PUT /actions '{"action_type": "InstanceStart"}' >/dev/null
  wait_for "$name" '^RIG-L2 init ' "$BOOT_DEADLINE" "the guest's init after InstanceStart"
  note "figure boot_to_init_s=$(since "$t0") ($name, $vcpus vCPU, through the API)"
  wait_for "$name" '^RIG-L2 tick=1 ' "$TICK_DEADLINE" "the guest's first tick"
}

# ticks NAME [SKIP]: the tick lines of NAME's console after its first SKIP lines, as
# "N UP STATE DMESG" each.
ticks() {
  tail -n +$((${2:-0} + 1)) "$W/$1.com1" |
    sed -n 's/^RIG-L2 tick=\([0-9]*\) up=\([0-9.]*\) state=\([^ ]*\) dmesg=\([0-9]*\).*/\1 \2 \3 \4/p'
}
last_tick() { ticks "$1" | tail -n 1; }

# mark NAME: where NAME's guest stands now (it must be paused): "TICK UP PARTIAL LINES NAME",
# where PARTIAL is 1 when the console ends inside a line (that line's tick was being printed)
# and LINES is how many whole lines the console holds.
mark() {
  local t partial=0
  t=$(last_tick "$1")
  [ -n "$t" ] || fail "'$1' printed no tick before the snapshot"
  [ -z "$(tail -c 1 "$W/$1.com1")" ] || partial=1
  echo "${t%% *} $(echo "$t" | cut -d' ' -f2) $partial $(wc -l <"$W/$1.com1") $1"
}

# clean NAME: the guest reported no clock or lockup complaint, no uptime going backwards, and
# every state check held.
# Kernel complaints that are the emulated host's, not squib's: Firecracker's guest says the
# same in this rig (scripts/linux-rig/README.md, "What the emulated host gets wrong"). Each is
# shown as a note and does not fail a scenario.
HOST_KNOWN='Marking TSC unstable due to TSCs unsynchronized'
clean() {
  local bad
  grep -E '^RIG-L2 DMESG ' "$W/$1.com1" | grep -E "$HOST_KNOWN" | sed 's/^/emulated host (Firecracker too): /' >&2
  bad=$(grep -E '^RIG-L2 (DMESG|BACKWARDS) ' "$W/$1.com1" | grep -vE "$HOST_KNOWN" | head -n 3 | tr '\n' ' ')
  [ -z "$bad" ] || fail "'$1': the guest's kernel log complains: $bad"
  bad=$(ticks "$1" | awk '$3 != "ok" { print "tick " $1 ": " $3 }' | head -n 3 | tr '\n' ' ')
  [ -z "$bad" ] || fail "'$1': the guest's state checks failed: $bad"
  true
}

# continues NAME MARK COUNT: the guest in NAME, resumed or restored from a snapshot taken at
# MARK (from `mark`), prints COUNT ticks that go on from it: the first is the mark's tick + 1,
# each the next, uptimes never below the mark's nor going backwards, state checks ok, no kernel
# complaint. NAME may be the process the mark was taken in (then only what it printed after
# the mark counts) or a new one (then a line the snapshot cut in two is the old console's, and
# the first whole tick is one later).
continues() {
  local name=$1 count=$3 tick up partial lines from skip=0 first want bad
  set -- $2
  tick=$1 up=$2 partial=$3 lines=$4 from=$5
  want=$((tick + 1 + partial))
  if [ "$from" = "$name" ]; then
    skip=$lines
    want=$((tick + 1))
  fi
  wait_for "$name" "^RIG-L2 tick=$((want + count - 1)) " $((TICK_DEADLINE + count * 5)) \
    "tick $((want + count - 1)) of the guest in '$name' (snapshot at tick $tick)"
  first=$(ticks "$name" "$skip" | head -n 1 | cut -d' ' -f1)
  [ "$first" = "$want" ] || fail "'$name': the first tick after the snapshot is $first, expected $want (snapshot at tick $tick)"
  bad=$(ticks "$name" "$skip" | awk -v n="$want" -v u="$up" '
    $1 != n { print "tick " $1 " after " n - 1; exit }
    $2 + 0 < u + 0 { print "uptime " $2 " after " u; exit }
    { n++; u = $2 }')
  [ -z "$bad" ] || fail "'$name': the ticks after the snapshot do not go on: $bad"
  clean "$name"
}

# boot_cli VCPUS: boot the stock guest with `squib run --kernel` (process 'a'); pass when its
# init sees VCPUS CPUs and ticks three times with a clean log. Sets $boot (seconds to init).
boot_cli() {
  local vcpus=$1 t0 line cpus
  t0=$(now)
  start a run --backend kvm --mem "${MEM_MIB}M" --vcpus "$vcpus" --kernel "$KERNEL" --initrd "$INITRD" \
    --cmdline "$CMDLINE"
  wait_for a '^RIG-L2 init ' "$BOOT_DEADLINE" "the guest's init"
  boot=$(since "$t0")
  note "figure boot_to_init_s=$boot ($vcpus vCPU, command line)"
  grep -E '^RIG-L2 (BOOTWARN|SYM)' "$W/a.com1" | head -n 40 >&2
  line=$(grep '^RIG-L2 init ' "$W/a.com1")
  cpus=$(echo "$line" | sed -n 's/.*cpus=\([0-9]*\).*/\1/p')
  [ "$cpus" = "$vcpus" ] || fail "the guest sees $cpus CPUs with --vcpus $vcpus ($line)"
  wait_for a '^RIG-L2 tick=3 ' "$TICK_DEADLINE" "the guest's third tick"
  clean a
  pass "init in ${boot}s, $(echo "$line" | cut -d' ' -f3-)"
}
