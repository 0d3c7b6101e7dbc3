#!/usr/bin/env bash
# On Apple Silicon macOS: build squib-hvf's tests and the squib binary, sign them with the
# hypervisor entitlement (Hypervisor.framework refuses unsigned processes), run the tests, then
# a short `squib run --backend hvf`. Usage: squib-hvf/macos-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -s)/$(uname -m)" != "Darwin/arm64" ]; then
  echo "macos-test.sh: needs macOS on Apple Silicon" >&2
  exit 1
fi
ent=squib-hvf/hvf.entitlements
sign() { codesign --sign - --entitlements "$ent" --force "$1" >/dev/null; }
# cargo prints "Executable <target> (target/debug/deps/<name>-<hash>)" for each test binary.
# (A while-read loop: macOS ships bash 3.2, which has no mapfile.)
bins=$(cargo test -p squib-hvf --no-run 2>&1 | grep -o 'target/debug/deps/[^ )]*')
echo "$bins" | while read -r b; do
  sign "$b"
  echo "== $b"
  "$b" </dev/null
done
cargo build -p squib-vmm
sign target/debug/squib
target/debug/squib run --backend hvf --mem 64M --vcpus 2 --policy adaptive --for 2s
target/debug/squib run --backend hvf --mem 64M --vcpus 1 --workload store-loop:stride=64,passes=20 --for 10s --json
