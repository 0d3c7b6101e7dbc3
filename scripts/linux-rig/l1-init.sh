#!/bin/busybox sh
# The emulated host's /init (L1, booted by QEMU): load KVM, run the scenarios, report, power off.
#
# Lines it prints on the serial console (run.sh reads them):
#   RIG-L1 ...                         progress
#   RIG-RESULT NAME PASS|FAIL DETAIL   one per scenario: squib's verdict
#   RIG-RESULT NAME HOST-FAIL DETAIL   the emulated host broke during NAME (its kernel oopsed)
#   RIG-HOST-FAIL DETAIL               the emulated host cannot run scenarios at all
#   RIG-DONE                           every scenario asked for has a result
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t debugfs debug /sys/kernel/debug
mkdir -p /tmp /dev/pts
mount -t tmpfs -o size=75% tmp /tmp
ln -sf /proc/self/fd /dev/fd
host_fail() {
  echo "RIG-HOST-FAIL $*"
  poweroff -f
}
echo "RIG-L1 up: $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPUs, $(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo) MiB"
grep -qw svm /proc/cpuinfo || host_fail "the emulated CPU has no svm"
insmod /lib/modules/irqbypass.ko || host_fail "insmod irqbypass"
insmod /lib/modules/kvm.ko || host_fail "insmod kvm"
insmod /lib/modules/kvm-amd.ko nested=1 || host_fail "insmod kvm-amd"
[ -c /dev/kvm ] || host_fail "no /dev/kvm after loading kvm_amd"
cs=/sys/devices/system/clocksource/clocksource0
echo "RIG-L1 clocksource $(cat $cs/current_clocksource) (of $(cat $cs/available_clocksource))"
dmesg | grep -iE 'tsc|clocksource' | sed 's/^/RIG-L1 dmesg: /'
echo "RIG-L1 kvm_amd nested=$(cat /sys/module/kvm_amd/parameters/nested) npt=$(cat /sys/module/kvm_amd/parameters/npt)"
scenarios=$(sed -n 's/.*rig\.scenarios=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ')
[ -n "$scenarios" ] || host_fail "no rig.scenarios= on the command line"
# What in the emulated host's own kernel log means the host broke, not squib.
host_broke='Oops|BUG:|general protection fault|Kernel panic|kernel stack overflow|watchdog: BUG|Machine check'
for name in $scenarios; do
  script=$(ls /rig/scenarios/*-"$name".sh 2>/dev/null | head -n 1)
  if [ -z "$script" ]; then
    echo "RIG-RESULT $name FAIL no such scenario"
    continue
  fi
  work=/tmp/$name
  rm -rf "$work"
  mkdir -p "$work"
  dmesg -c >/dev/null
  echo "RIG-L1 scenario $name: start"
  start=$(cut -d' ' -f1 /proc/uptime)
  # The scenario prints its verdict as its last line ("PASS detail" or "FAIL detail"); the
  # deadline inside each wait is the scenario's, this one only catches a scenario that hangs.
  RIG_WORK=$work RIG_NAME=$name timeout -s KILL 900 sh "$script" >"$work/verdict" 2>"$work/stderr"
  rc=$?
  for pid in $(cat "$work/pids" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
  took=$(awk -v a="$start" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN { printf "%.0f", b - a }')
  sed "s/^/RIG-L1 $name: /" "$work/verdict" "$work/stderr" | grep -v '^RIG-L1 [^:]*: \(PASS\|FAIL\)' | tail -n 150
  broke=$(dmesg | grep -E "$host_broke" | head -n 3 | tr '\n' ' ')
  verdict=$(grep -E '^(PASS|FAIL)( |$)' "$work/verdict" | tail -n 1)
  if [ -n "$broke" ]; then
    echo "RIG-RESULT $name HOST-FAIL ${took}s: the emulated host's kernel: $broke"
  elif [ -n "$verdict" ]; then
    echo "RIG-RESULT $name ${verdict%% *} ${took}s: $(echo "${verdict#* }" | sed 's/^\(PASS\|FAIL\)$//')"
  elif [ $rc -eq 137 ]; then
    echo "RIG-RESULT $name FAIL ${took}s: the scenario did not finish within 900 s"
  else
    echo "RIG-RESULT $name FAIL ${took}s: the scenario exited $rc without a verdict"
  fi
done
echo "RIG-DONE"
poweroff -f
