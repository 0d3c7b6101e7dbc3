#!/usr/bin/env bash
# The Linux rig: stock Debian Linux under squib, inside an emulated host.
#
# This machine's /dev/kvm cannot run a stock kernel's early boot, so the rig goes one level
# down: QEMU (pure TCG, `-cpu max`, which offers SVM with nested paging) boots a Debian kernel
# as the host (L1); that host loads kvm_amd and runs squib, which boots the same package's
# vmlinux (L2) with a busybox initramfs whose /init (l2-init.sh) counts, keeps checksummed
# state and watches its own kernel log. Scenarios (scenarios/NN-NAME.sh) drive squib there and
# report over the serial console, one line each; this script prints them and exits by them.
#
# Usage: scripts/linux-rig/run.sh [SCENARIO...]     (default: every scenario, in file order)
# Exit status: 0 every scenario passed; 1 a scenario failed (squib's fault); 2 the emulated
# host kept breaking (no verdict for some scenario after the retries).
#
# Environment:
#   RIG_DIR=DIR        work and cache directory (default: target/linux-rig)
#   RIG_SQUIB=FILE     use this squib binary instead of building one (cargo build --release)
#   RIG_RETRIES=N      how many times a run the emulated host broke in is retried (default 2)
#   RIG_DEADLINE=SECS  how long one emulated host may run (default 1800)
#   RIG_L2_VERBOSE=1   the stock guest's kernel prints its whole log (not quiet) to its console
#   RIG_L2_ARGS="A B"  more arguments for the stock guest's kernel (say, initcall_debug)
#   RIG_BOOT_DEADLINE=SECS  how long a guest may take to reach its init (default 300)
#   RIG_KERNEL=PKG=VER the Debian kernel package (default: the pinned one below, else the newest)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
dir=${RIG_DIR:-$repo/target/linux-rig}
retries=${RIG_RETRIES:-2}
deadline=${RIG_DEADLINE:-1800}
# Debian 12's point-release cloud kernel; when the archive no longer has it, the newest.
pinned=${RIG_KERNEL:-linux-image-6.1.0-50-cloud-amd64-unsigned=6.1.176-1}
mkdir -p "$dir/cache"
[ -z "${RIG_SQUIB:-}" ] || RIG_SQUIB=$(realpath "$RIG_SQUIB")
log() { echo "rig: $*" >&2; }
die() { echo "rig: $*" >&2; exit 2; }

for tool in qemu-system-x86_64 cpio lz4 objcopy curl; do
  command -v "$tool" >/dev/null || die "$tool is missing: run scripts/setup.sh"
done
busybox=/bin/busybox
# busybox-static's binary: the guests have no libc of their own.
ldd "$busybox" >/dev/null 2>&1 && die "$busybox is dynamically linked: install busybox-static (scripts/setup.sh)"

all=$(cd "$here/scenarios" && ls [0-9]*-*.sh | sed 's/^[0-9]*-//; s/\.sh$//')
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || read -r -a scenarios <<<"$(echo $all)"
for s in "${scenarios[@]}"; do
  grep -qx "$s" <<<"$all" || die "no scenario '$s' (have: $(echo $all))"
done

# --- The kernel package ---------------------------------------------------------------------
cd "$dir/cache"
deb=$(ls linux-image-*.deb 2>/dev/null | head -n 1 || true)
if [ -z "$deb" ]; then
  if apt-get download "$pinned" >/dev/null 2>&1; then
    log "kernel package: $pinned (pinned)"
  else
    newest=$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/.*Depends: \(linux-image-[^ ]*\).*/\1/p' | head -n 1)
    [ -n "$newest" ] || die "apt knows no linux-image-cloud-amd64 (run apt-get update)"
    log "kernel package: the pinned $pinned is not in the archive; using the newest, $newest-unsigned"
    apt-get download "$newest-unsigned" >/dev/null 2>&1 || die "apt-get download $newest-unsigned failed"
  fi
  deb=$(ls linux-image-*.deb | head -n 1)
fi
log "kernel: $deb"
if [ ! -d kernel ] || [ kernel -ot "$deb" ]; then
  rm -rf kernel
  dpkg-deb -x "$deb" kernel
fi
vmlinuz=$(ls kernel/boot/vmlinuz-* | head -n 1)
kver=${vmlinuz##*/vmlinuz-}
mods=kernel/lib/modules/$kver/kernel
[ -s vmlinux ] && [ vmlinux -nt "$vmlinuz" ] || "$here/extract-vmlinux.sh" "$vmlinuz" vmlinux

# --- squib ------------------------------------------------------------------------------------
if [ -n "${RIG_SQUIB:-}" ]; then
  squib=$RIG_SQUIB
else
  log "building squib (release)"
  (cd "$repo" && cargo build --release -q -p squib-vmm)
  squib=$repo/target/release/squib
fi

# --- The guest's initramfs (L2) ---------------------------------------------------------------
build=$dir/build
rm -rf "$build"
mkdir -p "$build/l2/bin" "$build/l1/bin" "$build/l1/rig/scenarios" "$build/l1/lib/modules" "$build/l1/usr/bin"
cp "$busybox" "$build/l2/bin/busybox"
cp "$here/l2-init.sh" "$build/l2/init"
chmod +x "$build/l2/init"
mkdir -p "$build/l2/proc" "$build/l2/sys" "$build/l2/dev"
(cd "$build/l2" && find . | cpio -o -H newc --quiet) >"$build/l1/rig/l2-initrd.cpio"

# --- The emulated host's initramfs (L1) --------------------------------------------------------
# copy_elf FILE DEST: FILE at DEST in the host's tree, with the shared libraries ldd names.
copy_elf() {
  install -D -m 755 "$1" "$build/l1$2"
  ldd "$1" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
    [ -e "$build/l1$lib" ] || install -D -m 755 "$(readlink -f "$lib")" "$build/l1$lib"
  done
}
copy_elf "$squib" /rig/squib
strip --strip-debug "$build/l1/rig/squib"
copy_elf "$(command -v curl)" /usr/bin/curl
cp "$busybox" "$build/l1/bin/busybox"
cp "$here/l1-init.sh" "$build/l1/init"
chmod +x "$build/l1/init"
cp "$here/lib.sh" "$build/l1/rig/"
cp "$here"/scenarios/*.sh "$build/l1/rig/scenarios/"
cp vmlinux "$build/l1/rig/vmlinux"
# KVM and what it depends on, from the same package (the .ko's own modinfo says).
for m in arch/x86/kvm/kvm-amd.ko arch/x86/kvm/kvm.ko virt/lib/irqbypass.ko; do
  cp "$mods/$m" "$build/l1/lib/modules/"
done
deps=$(for m in "$build"/l1/lib/modules/*.ko; do
  objcopy -O binary --only-section=.modinfo "$m" /dev/stdout | tr '\0' '\n' | sed -n 's/^depends=//p'
done | tr ',' '\n' | sort -u | grep . | tr '\n' ' ')
[ "$deps" = "irqbypass kvm " ] || die "kvm's modules now depend on '$deps': update the list in run.sh and l1-init.sh"
mkdir -p "$build/l1/proc" "$build/l1/sys" "$build/l1/dev" "$build/l1/tmp"
(cd "$build/l1" && find . | cpio -o -H newc --quiet) >"$build/l1.cpio"
log "emulated host: $kver, initramfs $(( $(stat -c %s "$build/l1.cpio") >> 20 )) MiB"

# The emulated host's TSC is this machine's (TCG reads the real TSC), but its kernel calibrates
# it against emulated timers, which under load can be off by a factor (seen: 335 MHz for 2.6
# GHz); with tsc=reliable below nothing would correct that and the host's clock would run fast.
# Where this machine's TSC is constant, /proc/cpuinfo's "cpu MHz" is its rate: tell the host.
tsc_khz=""
if grep -qw constant_tsc /proc/cpuinfo; then
  tsc_khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
fi

# --- Run ------------------------------------------------------------------------------------
declare -A result detail
rig_failures=0
todo=("${scenarios[@]}")
t_start=$(date +%s)
attempt=0
while [ ${#todo[@]} -gt 0 ]; do
  attempt=$((attempt + 1))
  serial=$dir/l1-attempt$attempt.log
  : >"$serial"
  log "attempt $attempt: ${todo[*]} (serial console: $serial)"
  # Single-threaded TCG: with multi-threaded TCG and two CPUs the emulated host has been seen
  # to crash squib's vCPU threads (an emulation defect); one thread round-robins both CPUs.
  # tsc=reliable on the emulated host: TCG gives every emulated CPU the real host's TSC, so it is
  # synchronized, but Linux's warp check under round-robin emulation says otherwise and leaves
  # the host on the HPET; a host not on the TSC cannot give its guests a stable kvmclock
  # (KVM's master clock), which a real host does.
  timeout -k 10 "$deadline" qemu-system-x86_64 -nodefaults -no-user-config -display none \
    -machine q35 -accel tcg,thread=single -cpu max -smp 2 -m 3072 \
    -kernel "$dir/cache/$vmlinuz" -initrd "$build/l1.cpio" \
    -append "console=ttyS0 quiet panic=-1 tsc=reliable${tsc_khz:+ tsc_early_khz=$tsc_khz} rig.scenarios=$(IFS=,; echo "${todo[*]}")${RIG_L2_VERBOSE:+ rig.l2verbose}\
${RIG_L2_ARGS:+ rig.l2args=$(tr ' ' , <<<"$RIG_L2_ARGS")}${RIG_BOOT_DEADLINE:+ rig.bootdeadline=$RIG_BOOT_DEADLINE}" \
    -serial "file:$serial" -no-reboot &
  qemu=$!
  # The emulated host does not outlive this script, however it ends.
  trap 'kill $qemu 2>/dev/null' EXIT
  trap 'kill $qemu 2>/dev/null; exit 130' INT TERM
  tail -n +1 -f --pid=$qemu "$serial" | tr -d '\r' | grep -a --line-buffered -E '^(RIG-|\[)|Kernel panic|BUG|Oops' || true
  status=0
  wait $qemu || status=$?
  done_line=$(grep -ac '^RIG-DONE' "$serial" || true)
  broke=""
  next=()
  for s in "${todo[@]}"; do
    line=$(tr -d '\r' <"$serial" | grep -a "^RIG-RESULT $s " | tail -n 1 || true)
    verdict=$(awk '{ print $3 }' <<<"$line")
    case $verdict in
      PASS | FAIL)
        result[$s]=$verdict
        detail[$s]=$(cut -d' ' -f4- <<<"$line")
        ;;
      HOST-FAIL)
        broke+="$s: $(cut -d' ' -f4- <<<"$line"); "
        next+=("$s")
        ;;
      *) next+=("$s") ;;
    esac
  done
  if [ ${#next[@]} -gt 0 ]; then
    if [ "$done_line" = 0 ]; then
      why=$(tr -d '\r' <"$serial" | grep -aE 'RIG-HOST-FAIL|Kernel panic|BUG|Oops' | head -n 3 | tr '\n' ' ')
      [ $status = 124 ] && why="no end after ${deadline}s; $why"
      broke+="the emulated host stopped (QEMU exit $status) before it finished: ${why:-last line: $(tail -n 1 "$serial")}"
    fi
    rig_failures=$((rig_failures + 1))
    log "RIG FAILURE $rig_failures (the emulated host, not squib): $broke"
    if [ $rig_failures -gt "$retries" ]; then
      for s in "${next[@]}"; do result[$s]=NO-VERDICT; detail[$s]="the emulated host broke $rig_failures times"; done
      next=()
    fi
  fi
  todo=("${next[@]}")
done

took=$(($(date +%s) - t_start))
echo
echo "Linux rig: $kver under squib in an emulated host ($took s, $attempt emulated host run(s), $rig_failures rig failure(s))"
status=0
pass=0
failed=0
for s in "${scenarios[@]}"; do
  printf '%-12s %-10s %s\n' "${result[$s]}" "$s" "${detail[$s]}"
  case ${result[$s]} in
    PASS) pass=$((pass + 1)) ;;
    FAIL) failed=$((failed + 1)); status=1 ;;
    *) failed=$((failed + 1)); [ $status = 1 ] || status=2 ;;
  esac
done
echo "linux-rig: $pass passed, $failed failed"
exit $status
