#!/usr/bin/env bash
# qcow2 -> raw with `dvcr convert` and with `qemu-img convert -O raw`, in the
# same run, on a qcow2 image of VIRTUAL_MIB (default 4096) virtual size, half
# of it allocated with random data, plain and zlib-compressed. Prints both
# times, the ratio, and the allocated size of both outputs, and checks that
# the outputs are identical.
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
with open(path, "wb") as disk:
    disk.truncate(mib << 20)
    for index in range(0, mib, 2):
        disk.seek(index << 20)
        disk.write(os.urandom(1 << 20))
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
    sync
    dvcr_time=$(seconds target/release/dvcr convert "$source" "$work/dvcr.raw" -O raw)
    cmp "$work/qemu.raw" "$work/dvcr.raw"
    echo "$variant: qemu-img ${qemu_time}s, dvcr ${dvcr_time}s, dvcr/qemu-img $(python3 -c "print(f'{$dvcr_time/$qemu_time:.2f}x')"), allocated: qemu-img $(du -k "$work/qemu.raw" | cut -f1) KiB, dvcr $(du -k "$work/dvcr.raw" | cut -f1) KiB, identical"
    rm -f "$work/qemu.raw" "$work/dvcr.raw"
done
