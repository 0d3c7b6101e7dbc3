#!/usr/bin/env bash
# Test of scripts/setup.sh's detection: it must ask the package manager, and must not take a
# machine that has only libclang-cpp (whose libclang-cpp.so.14 matched the old file glob) for one
# that has libclang-dev. Runs setup.sh in dry-run mode against dpkg databases made here, then
# against the machine's own after a real set-up. Run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "setup-detection: FAIL: $*" >&2; exit 1; }

# db DIR PKG=STATUS...: a dpkg database in DIR holding the given packages with the given statuses.
db() {
  local dir=$1; shift
  mkdir -p "$dir/info" "$dir/updates"
  : >"$dir/status"
  local kv
  for kv in "$@"; do
    printf 'Package: %s\nStatus: %s\nArchitecture: amd64\nVersion: 1.0\n\n' "${kv%%=*}" "${kv#*=}" >>"$dir/status"
  done
}
missing() { SQUIB_SETUP_DRY_RUN=1 SQUIB_DPKG_ADMINDIR="$1" bash scripts/setup.sh; }

# The machine the outside review met: libclang-cpp14 installed (a file tree holding only
# libclang-cpp.so.14 under /usr/lib/llvm-14/lib), no libclang-dev.
db "$tmp/cpp-only" 'libclang-cpp14=install ok installed' 'binutils=install ok installed'
mkdir -p "$tmp/cpp-only-tree/usr/lib/llvm-14/lib"
touch "$tmp/cpp-only-tree/usr/lib/llvm-14/lib/libclang-cpp.so.14"
out=$(missing "$tmp/cpp-only")
grep -qx libclang-dev <<<"$out" || fail "libclang-cpp14 only: libclang-dev not reported missing (got: ${out:-nothing})"
# The old glob would have been fooled by that tree: show it, so this test keeps its point.
if ! compgen -G "$tmp/cpp-only-tree/usr/lib/llvm-*/lib/libclang*.so*" >/dev/null; then
  fail "the tree no longer reproduces the glob's mistake"
fi

# Removed but not purged: only its configuration files remain, so it is not installed.
db "$tmp/config-files" 'libclang-dev=deinstall ok config-files' 'binutils=install ok installed'
out=$(missing "$tmp/config-files")
grep -qx libclang-dev <<<"$out" || fail "libclang-dev in config-files state taken for installed (got: ${out:-nothing})"

# Everything installed: nothing to do.
db "$tmp/all" 'libclang-dev=install ok installed' 'binutils=install ok installed' \
  'nodejs=install ok installed' 'npm=install ok installed' 'qemu-system-x86=install ok installed' \
  'busybox-static=install ok installed' 'cpio=install ok installed' 'lz4=install ok installed' \
  'curl=install ok installed'
out=$(missing "$tmp/all")
[ -z "$out" ] || fail "everything installed, yet setup would install: $out"

# An empty database: every build package is missing.
db "$tmp/empty"
out=$(missing "$tmp/empty")
for p in libclang-dev binutils qemu-system-x86 busybox-static cpio lz4 curl; do
  grep -qx "$p" <<<"$out" || fail "empty database: $p not reported missing (got: ${out:-nothing})"
done

# This machine, after the real set-up .ci/run has just run: nothing left to install.
out=$(SQUIB_SETUP_DRY_RUN=1 bash scripts/setup.sh)
[ -z "$out" ] || fail "after set-up, still missing: $out"
echo "setup-detection: ok"
