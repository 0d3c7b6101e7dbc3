#!/bin/busybox sh
# The stock guest's /init (busybox-static): the workload whose output the scenarios read.
#
# It proves a restored guest runs on from where it stopped. Once a second it prints
#   RIG-L2 tick=N up=SECONDS state=ok|BAD:what dmesg=N
# where N counts on across every save and restore, SECONDS is /proc/uptime, and state says
# whether the state it keeps re-verified: a 4 MiB random blob and a log in tmpfs (guest memory
# as page cache) whose checksums it also holds in its own memory (shell variables), and a hash
# chain over the counter kept both in memory and in the log. dmesg=N counts kernel log lines
# that name a clock or lockup complaint; each new one is printed as "RIG-L2 DMESG <line>", the
# two lines after it as "RIG-L2 DMESG-CTX <line>".
# Uptime going backwards is printed as "RIG-L2 BACKWARDS <old> <new>".
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /state
mount -t tmpfs -o size=16m state /state
cs=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)
echo "RIG-L2 init cpus=$(grep -c ^processor /proc/cpuinfo) clocksource=$cs up=$(cut -d' ' -f1 /proc/uptime)"
# rig.syms=ADDR,... on the kernel command line (run.sh's RIG_L2_ARGS): name the kernel
# functions at these addresses (the rig's diagnostics print a stuck guest's RIPs; without
# KASLR an address names the same code in every boot of this kernel).
for a in $(sed -n 's/.*rig\.syms=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' '); do
  echo "RIG-L2 SYM $a $(awk -v r="$a" 'length($1) == length(r) && $1 <= r && $1 >= b { b = $1; s = $3 } END { print s }' /proc/kallsyms)"
done
# The kernel's own warnings from boot (level warning or worse), for the boot scenarios to show.
dmesg -r | grep -E '^<[0-4]>' | sed 's/^/RIG-L2 BOOTWARN /'
dd if=/dev/urandom of=/state/blob bs=64k count=64 2>/dev/null
blobsum=$(md5sum </state/blob)
: >/state/log
logsum=$(md5sum </state/log)
acc=start
n=0
last=0
seen=0
# What a restored guest must never say: the clocksource watchdog (TSC or another clock marked
# unstable, a skew), soft or hard lockups, RCU stalls, time going backwards.
bad='unstable|skew|clocksource watchdog|timekeeping watchdog|soft lockup|hard LOCKUP|rcu.*stall|went backwards|backwards'
while :; do
  st=ok
  [ "$(md5sum </state/blob)" = "$blobsum" ] || st=BAD:blob
  [ "$(md5sum </state/log)" = "$logsum" ] || st=BAD:log
  lastline=$(tail -n 1 /state/log)
  [ "$lastline" = "${n:+$n $acc}" ] || [ $n -eq 0 ] || st=BAD:chain
  n=$((n + 1))
  acc=$(echo "$acc $n" | md5sum | cut -d' ' -f1)
  echo "$n $acc" >>/state/log
  logsum=$(md5sum </state/log)
  up=$(cut -d' ' -f1 /proc/uptime)
  if awk -v a="$last" -v b="$up" 'BEGIN { exit !(b < a) }'; then
    echo "RIG-L2 BACKWARDS $last $up"
  fi
  last=$up
  hits=$(dmesg | grep -Ei "$bad")
  count=$(printf '%s' "$hits" | grep -c .)
  if [ "$count" -gt "$seen" ]; then
    # With the two lines after each (the watchdog's figures follow its complaint), marked as
    # context: "N:" is a matching line in grep -n's output, "N-" one around it.
    dmesg | grep -n -Ei -A2 "$bad" | grep -v '^--$' | tail -n $(((count - seen) * 3)) |
      sed 's/^[0-9]*:/RIG-L2 DMESG /; s/^[0-9]*-/RIG-L2 DMESG-CTX /'
    seen=$count
  fi
  echo "RIG-L2 tick=$n up=$up state=$st dmesg=$count"
  sleep 1
done
