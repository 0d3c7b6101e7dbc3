#!/usr/bin/env bash
# The crate graph the README promises: squib-arch <- squib-snapshot <- backends <- machine <-
# squib-vmm, no backend depending on another, and the software simulator free of KVM, the kernel
# loader and build scripts. Asked of cargo itself (`cargo tree`), run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/../.."
fail() { echo "crate-graph: FAIL: $*" >&2; exit 1; }
# deps CRATE: the names of every crate CRATE depends on for building (normal edges), itself excluded.
deps() { cargo tree -q -p "$1" -e normal --prefix none --target all | awk '{print $1}' | sort -u | grep -vx "$1"; }

sim=$(deps squib-kvm-sim)
for banned in kvm-ioctls kvm-bindings linux-loader userfaultfd vm-superio iced-x86 squib-kvm squib-machine squib-trace squib-hvf; do
  if grep -qx "$banned" <<<"$sim"; then fail "squib-kvm-sim depends on $banned"; fi
done
if cargo tree -q -p squib-kvm-sim -e build --prefix none --target all | awk '{print $1}' | grep -qx squib-kvm-sim-build; then
  fail "squib-kvm-sim has a build script"
fi
[ ! -e squib-kvm-sim/build.rs ] || fail "squib-kvm-sim/build.rs exists"

# allowed CRATE SQUIB-CRATES...: CRATE's squib dependencies are exactly within the list.
allowed() {
  local crate=$1; shift
  local d
  for d in $(deps "$crate" | grep '^squib-' || true); do
    case " $* " in *" $d "*) ;; *) fail "$crate depends on $d (allowed: $*)";; esac
  done
}
allowed squib-arch
allowed squib-snapshot squib-arch
allowed squib-kvm-sim squib-arch squib-snapshot
allowed squib-kvm squib-arch squib-snapshot
allowed squib-hvf squib-arch squib-snapshot
allowed squib-machine squib-arch squib-snapshot squib-kvm
allowed squib-trace squib-arch squib-snapshot squib-kvm-sim
echo "crate-graph: ok"
