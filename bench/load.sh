#!/usr/bin/env bash
# Load test: 64 clients pulling the same 1 GiB blob at once (containerd's
# thundering herd on a fresh image), then 16 concurrent pushes of distinct
# 256 MiB blobs, with manifest GETs timed throughout, against `dvcr serve`
# and Debian's docker-registry (CNCF Distribution) in the same run, on
# loopback, both on folders or (STORAGE=s3) both on buckets of a local
# Garage. Prints each registry's figures and the ratios.
#
#   bench/load.sh [HERD_MIB] [PUSH_MIB]        (default 1024 256)
#
# Environment: BENCH_DIR (default /var/tmp/dvcr-load), PULLERS (64),
# PUSHERS (16), DVCR_ENV (a prefix for the dvcr command, e.g.
# "env MALLOC_ARENA_MAX=4"), CONGESTION (see below). Needs about HERD +
# 16 x PUSH MiB x 3 of disk.
#
# Everything talks over loopback with the host's TCP congestion control,
# printed with the results. Under BBR without an fq qdisc (loopback never
# has one) the kernel paces a TCP packet sent ahead of time with a timer
# of its own; in a VM arming them took 16% of all CPU in the pull herd
# (docs/performance.md, 2026-12-08). CONGESTION=cubic (or any name
# the kernel knows) runs the whole bench, both registries and all
# clients, in a network namespace of its own with that congestion
# control; the host's setting is not touched. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${CONGESTION:-}" ] && [ -z "${LOAD_BENCH_NAMESPACE:-}" ]; then
    exec unshare --net env LOAD_BENCH_NAMESPACE=1 bash -c \
        'ip link set lo up && sysctl -qw net.ipv4.tcp_congestion_control="$CONGESTION" && exec "$0" "$@"' "$0" "$@"
fi

herd_mib=${1:-1024}
push_mib=${2:-256}
pullers=${PULLERS:-64}
pushers=${PUSHERS:-16}
work=${BENCH_DIR:-/var/tmp/dvcr-load}
dvcr_port=5111
distribution_port=5112

source bench/common.sh
ensure_docker_registry
need_tools curl openssl python3
cargo build --release --locked --quiet

fresh_work "$work"
# Short of space a registry answers pushes with errors and the figures mean
# nothing (Distribution failed all 16 pushes with 12 GB free): say so first.
need_mib=$((herd_mib + pushers * push_mib * 3))
free_mib=$(df --output=avail -m "$work" | tail -1 | tr -d ' ')
if [ "$free_mib" -lt "$need_mib" ]; then
    echo "bench/load.sh needs about $need_mib MiB free under $work, has $free_mib" >&2
    exit 1
fi
mkdir -p "$work/blobs"

make_blob() {
    openssl rand -out "$1" $(($2 << 20))
    echo "sha256:$(openssl dgst -sha256 -r "$1" | cut -d' ' -f1)" >"$1.digest"
}
echo "making a ${herd_mib} MiB blob and ${pushers} of ${push_mib} MiB in $work"
make_blob "$work/blobs/herd.blob" "$herd_mib"
for index in $(seq 0 $((pushers - 1))); do make_blob "$work/blobs/push-$index.blob" "$push_mib"; done

start_registries "$work" $dvcr_port $distribution_port

results=()
for name in dvcr distribution; do
    port=$dvcr_port pid=$dvcr_pid
    [ $name = distribution ] && port=$distribution_port pid=$distribution_pid
    sync
    echo "loading $name"
    results+=("$(python3 bench/load.py "http://127.0.0.1:$port" "$work/blobs" --pullers "$pullers" --pushers "$pushers" --pid "$pid")")
done

python3 - "${results[@]}" <<'PY'
import json, os, sys
dvcr, distribution = (json.loads(text) for text in sys.argv[1:3])
congestion = open("/proc/sys/net/ipv4/tcp_congestion_control").read().strip()
print(f"\nmachine: {os.cpu_count()} cores, {os.uname().release}; TCP congestion control {congestion}")
for name, report in (("dvcr", dvcr), ("distribution", distribution)):
    for phase in ("pull", "push"):
        r = report[phase]
        m = r["manifest_get"]
        print(f"  {name:12} {phase}: {r['clients']} clients, {r['aggregate_mb_s']} MB/s aggregate in {r['seconds']} s, "
              f"errors {r['errors']}; manifest GET p50 {m['p50_ms']} ms, p99 {m['p99_ms']} ms ({m['samples']} samples, {m['errors']} errors); "
              f"server CPU {r.get('server_cpu_s')} s, {r.get('server_cpu_s_per_gib')} s per GiB moved")
    print(f"  {name:12} peak RSS {report.get('peak_rss_mib')} MiB (pull {report['pull'].get('peak_rss_mib')}, push {report['push'].get('peak_rss_mib')})")
for phase in ("pull", "push"):
    ours, theirs = dvcr[phase]["aggregate_mb_s"], distribution[phase]["aggregate_mb_s"]
    ratio = f"{ours / theirs:.2f}x" if theirs else "none (Distribution moved nothing; see its errors above)"
    print(f"{phase} ratio dvcr/distribution: {ratio}")
PY
