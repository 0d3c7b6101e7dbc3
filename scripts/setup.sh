#!/usr/bin/env bash
# Install what building and testing squib needs on a fresh Debian/Ubuntu machine with Rust.
# Idempotent: installs only what is missing.
set -euo pipefail
need=()
# userfaultfd-sys generates its bindings with bindgen, which needs libclang.
if ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 && ! ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1; then
  need+=(libclang-dev)
fi
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
