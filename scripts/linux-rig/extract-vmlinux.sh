#!/usr/bin/env bash
# extract-vmlinux.sh BZIMAGE OUT: the ELF vmlinux inside a bzImage.
#
# The boot protocol's setup header says where the compressed kernel is (payload_offset at 0x248
# and payload_length at 0x24c, counted from the end of the setup sectors), so this reads exactly
# those bytes and decompresses them with the tool the payload's magic names (Debian's kernels
# use LZ4). The result is the ELF followed by the relocation table the decompressor appends;
# an ELF loader reads only what the program headers cover, so the tail is harmless.
set -euo pipefail
in=$1 out=$2
u8() { od -An -tu1 -j "$1" -N 1 "$in" | tr -d ' '; }
u32() { od -An -tu4 -j "$1" -N 4 "$in" | tr -d ' '; }
[ "$(od -An -c -j 0x202 -N 4 "$in" | tr -d ' ')" = HdrS ] || { echo "$in: not a bzImage (no HdrS)" >&2; exit 1; }
setup_sects=$(u8 $((0x1f1)))
[ "$setup_sects" -eq 0 ] && setup_sects=4
offset=$(( (setup_sects + 1) * 512 + $(u32 $((0x248))) ))
length=$(u32 $((0x24c)))
magic=$(od -An -tx1 -j "$offset" -N 4 "$in" | tr -d ' ')
case $magic in
  02214c18) decomp=(lz4 -dc) ;;
  1f8b*) decomp=(gzip -dc) ;;
  fd377a58) decomp=(xz -dc) ;;
  28b52ffd) decomp=(zstd -dcq) ;;
  425a68*) decomp=(bzip2 -dc) ;;
  5d0000*) decomp=(xz --format=lzma -dc) ;;
  *) echo "$in: unknown payload compression (magic $magic at $offset)" >&2; exit 1 ;;
esac
# The payload ends with the decompressed size (4 bytes, little-endian), which some tools take
# for trailing garbage and exit non-zero over; the size word is the check instead.
want=$(u32 $((offset + length - 4)))
tail -c +$((offset + 1)) "$in" | head -c "$length" | "${decomp[@]}" >"$out" 2>/dev/null || true
got=$(stat -c %s "$out")
[ "$got" = "$want" ] || { echo "$in: payload decompressed to $got bytes, its size word says $want" >&2; exit 1; }
[ "$(od -An -c -N 4 "$out" | tr -d ' ')" = 177ELF ] || { echo "$in: payload did not decompress to an ELF" >&2; exit 1; }
