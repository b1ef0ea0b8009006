#!/usr/bin/env bash
# qcow2 -> raw with `dvcr convert` and with `qemu-img convert -O raw`, in the
# same run, on a qcow2 image of VIRTUAL_MIB (default 4096) virtual size, half
# of it allocated with random data, plain and zlib-compressed. Prints both
# times, the ratio, and the allocated size of both outputs, and checks that
# the outputs are identical. dvcr fsyncs its output before it exits (a
# provisioned disk must be on the volume); qemu-img does not by default, so
# its time is given with and without a `sync` of its output file.
#
#   bench/convert.sh [VIRTUAL_MIB]
#
# Environment: BENCH_DIR (default /var/tmp/dvcr-convert-bench).
set -euo pipefail
cd "$(dirname "$0")/.."

virtual_mib=${1:-4096}
work=${BENCH_DIR:-/var/tmp/dvcr-convert-bench}
for tool in qemu-img openssl python3 cmp; do
    command -v "$tool" >/dev/null || { echo "bench needs $tool" >&2; exit 1; }
done
cargo build --release --locked --quiet
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

echo "making a ${virtual_mib} MiB raw disk, every other MiB random"
raw=$work/source.raw
python3 - "$raw" "$virtual_mib" <<'PY'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
NIBBLES = bytes(value & 0x0F for value in range(256))
with open(path, "wb") as disk:
    disk.truncate(mib << 20)
    for index in range(0, mib, 2):
        disk.seek(index << 20)
        # Random nibbles: random, yet compressible, so that the zlib variant
        # really holds compressed clusters (qemu stores incompressible
        # clusters uncompressed).
        disk.write(os.urandom(1 << 20).translate(NIBBLES))
PY
qemu-img convert -O qcow2 "$raw" "$work/plain.qcow2"
echo "compressing (zlib)"
qemu-img convert -c -O qcow2 "$raw" "$work/zlib.qcow2"
rm -f "$raw"

seconds() { python3 -c 'import sys,time,subprocess; t=time.monotonic(); subprocess.run(sys.argv[1:], check=True); print(f"{time.monotonic()-t:.2f}")' "$@"; }
for variant in plain zlib; do
    source=$work/$variant.qcow2
    sync
    qemu_time=$(seconds qemu-img convert -O raw "$source" "$work/qemu.raw")
    qemu_synced=$(python3 -c "print(f'{$qemu_time + $(seconds sync "$work/qemu.raw"):.2f}')")
    sync
    dvcr_time=$(seconds target/release/dvcr convert "$source" "$work/dvcr.raw" -O raw)
    cmp "$work/qemu.raw" "$work/dvcr.raw"
    ratio() { python3 -c "print(f'{$1/$2:.2f}x')"; }
    echo "$variant: dvcr ${dvcr_time}s (synced); qemu-img ${qemu_synced}s with sync, ${qemu_time}s without;" \
        "dvcr/qemu-img $(ratio "$dvcr_time" "$qemu_synced") (both synced), $(ratio "$dvcr_time" "$qemu_time") (qemu-img unsynced);" \
        "allocated: qemu-img $(du -k "$work/qemu.raw" | cut -f1) KiB, dvcr $(du -k "$work/dvcr.raw" | cut -f1) KiB; outputs identical"
    rm -f "$work/qemu.raw" "$work/dvcr.raw"
done
