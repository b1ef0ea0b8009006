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
# Environment: BENCH_DIR (default /var/tmp/dvcr-convert-bench), ROUNDS
# (default 4, kept even: the order of the two tools alternates between
# rounds, and on this kind of virtual disk whichever runs first in a round
# is faster, so an odd count favours one tool).
set -euo pipefail
cd "$(dirname "$0")/.."

virtual_mib=${1:-4096}
rounds=${ROUNDS:-4}
if ((rounds % 2)); then rounds=$((rounds + 1)); echo "ROUNDS made even: $rounds"; fi
work=${BENCH_DIR:-/var/tmp/dvcr-convert-bench}
source bench/common.sh
need_tools qemu-img openssl python3 cmp
cargo build --release --locked --quiet
fresh_work "$work"

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
# The disk's state (writeback of the previous run, a virtual disk's burst
# budget, freed extents) favours whichever tool runs first, so the order
# alternates per round, each output is hashed and deleted before the next
# run (both start on the same free space), each run starts after a sync and
# a pause, every time is shown, and the ratio is the median of the rounds'
# paired ratios.
settle() { sync; sleep 3; }
run_qemu() {
    local unsynced synced
    unsynced=$(seconds qemu-img convert -O raw "$1" "$work/qemu.raw")
    synced=$(python3 -c "print(f'{$unsynced + $(seconds sync "$work/qemu.raw"):.2f}')")
    echo "$unsynced $synced"
}
# Hashes and measures an output, then deletes it.
retire() {
    local output=$1
    echo "$(sha256sum "$output" | cut -d' ' -f1) $(du -k "$output" | cut -f1)"
    rm -f "$output"
}
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {n=NR; if (n%2) print a[(n+1)/2]; else printf "%.2f\n", (a[n/2]+a[n/2+1])/2}'; }
for variant in plain zlib; do
    source=$work/$variant.qcow2
    dvcr_times=() qemu_synced_times=() qemu_times=() ratios=()
    for round in $(seq "$rounds"); do
        for tool in $( ((round % 2)) && echo "qemu dvcr" || echo "dvcr qemu"); do
            settle
            if [ "$tool" = qemu ]; then
                read -r unsynced synced < <(run_qemu "$source")
                qemu_times+=("$unsynced"); qemu_synced_times+=("$synced")
                read -r qemu_hash qemu_kib < <(retire "$work/qemu.raw")
            else
                dvcr_time=$(seconds target/release/dvcr convert "$source" "$work/dvcr.raw" -O raw)
                dvcr_times+=("$dvcr_time")
                read -r dvcr_hash dvcr_kib < <(retire "$work/dvcr.raw")
            fi
        done
        if [ "$qemu_hash" != "$dvcr_hash" ]; then
            echo "$variant round $round: the outputs differ" >&2
            exit 1
        fi
        ratios+=("$(python3 -c "print(f'{$dvcr_time/${qemu_synced_times[-1]}:.2f}')")")
        allocated="qemu-img $qemu_kib KiB, dvcr $dvcr_kib KiB"
    done
    echo "$variant: dvcr (synced) ${dvcr_times[*]} s; qemu-img + sync ${qemu_synced_times[*]} s (unsynced ${qemu_times[*]} s);" \
        "round ratios ${ratios[*]}; median ratio $(median "${ratios[@]}")x" \
        "(medians $(median "${dvcr_times[@]}") / $(median "${qemu_synced_times[@]}") s);" \
        "allocated: $allocated; outputs identical"
done
