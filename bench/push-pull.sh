#!/usr/bin/env bash
# Push and pull one large random blob with curl against `dvcr serve` and
# against Debian's docker-registry (CNCF Distribution) in the same run, both
# on filesystem storage in the same folder, and print each throughput and the
# ratio. Then push a 4x larger blob to dvcr and report its peak RSS.
#
#   bench/push-pull.sh [SIZE_MIB]      (default 1024)
#
# Environment: BENCH_DIR (default /var/tmp/dvcr-bench), ROUNDS (default 3),
# STORAGE=s3 to run both registries on buckets of a local Garage instead.
set -euo pipefail
cd "$(dirname "$0")/.."

size_mib=${1:-1024}
rounds=${ROUNDS:-3}
work=${BENCH_DIR:-/var/tmp/dvcr-bench}
dvcr_port=5101
distribution_port=5102

source bench/common.sh
ensure_docker_registry
need_tools curl openssl python3
cargo build --release --locked --quiet

fresh_work "$work"

blob=$work/blob
echo "making a ${size_mib} MiB random blob in $work"
openssl rand -out "$blob" $((size_mib << 20))
digest=sha256:$(openssl dgst -sha256 -r "$blob" | cut -d' ' -f1)

start_registries "$work" $dvcr_port $distribution_port

# push PORT REPO -> prints bytes/s of one monolithic PUT (POST, then PUT -T)
push() {
    local base=http://127.0.0.1:$1 location separator
    location=$(curl -sf -D - -o /dev/null -X POST "$base/v2/$2/blobs/uploads/" | tr -d '\r' | awk 'tolower($1)=="location:"{print $2}')
    case $location in http*) ;; *) location=$base$location ;; esac
    case $location in *\?*) separator='&' ;; *) separator='?' ;; esac
    curl -sf -o /dev/null -T "$blob" -H 'Content-Type: application/octet-stream' \
        -w '%{speed_upload}\n' "$location${separator}digest=$digest"
}
# pull PORT REPO -> prints bytes/s of one GET; stops the bench when the
# answer is not the whole blob.
pull() {
    local code size speed
    read -r code size speed < <(curl -s -o /dev/null -w '%{http_code} %{size_download} %{speed_download}\n' \
        "http://127.0.0.1:$1/v2/$2/blobs/$digest")
    if [ "$code" != 200 ] || [ "$size" != $((size_mib << 20)) ]; then
        echo "pull from port $1 answered $code with $size bytes" >&2
        exit 1
    fi
    echo "$speed"
}
median() { python3 -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
mbps() { python3 -c 'import sys; print(f"{float(sys.argv[1])/1e6:.0f} MB/s")' "$1"; }
ratio() { python3 -c 'import sys; print(f"{float(sys.argv[1])/float(sys.argv[2]):.2f}x")' "$1" "$2"; }

declare -A push_results pull_results
for name in dvcr distribution; do push_results[$name]=""; pull_results[$name]=""; done
for round in $(seq "$rounds"); do
    for name in dvcr distribution; do
        port=$dvcr_port; [ $name = distribution ] && port=$distribution_port
        sync
        push_results[$name]+=" $(push $port bench/r$round)"
        # Writeback the other registry left behind must not slow the next one.
        sync
        pull_results[$name]+=" $(pull $port bench/r$round)"
    done
done

echo
echo "blob: ${size_mib} MiB, $rounds rounds, median of each, storage ${STORAGE:-filesystem}; machine: $(nproc) cores, $(uname -r)"
for name in dvcr distribution; do
    echo "  $name: push $(mbps "$(median ${push_results[$name]})") [${push_results[$name]} ]"
    echo "  $name: pull $(mbps "$(median ${pull_results[$name]})") [${pull_results[$name]} ]"
done
echo "push ratio dvcr/distribution: $(ratio "$(median ${push_results[dvcr]})" "$(median ${push_results[distribution]})")"
echo "pull ratio dvcr/distribution: $(ratio "$(median ${pull_results[dvcr]})" "$(median ${pull_results[distribution]})")"

# Peak memory while a blob 4x larger is pushed.
big=$work/big
for _ in 1 2 3 4; do cat "$blob"; done >"$big"
rm -f "$blob"
blob=$big
digest=sha256:$(openssl dgst -sha256 -r "$blob" | cut -d' ' -f1)
sync
big_push=$(push $dvcr_port bench/big)
big_distribution=$(push $distribution_port bench/big)
hwm() { awk '/VmHWM/{print $2 " " $3}' "/proc/$1/status"; }
echo "push of $((size_mib * 4)) MiB: dvcr $(mbps "$big_push"), distribution $(mbps "$big_distribution")"
echo "peak RSS over the whole run: dvcr $(hwm $dvcr_pid), distribution $(hwm $distribution_pid)"
