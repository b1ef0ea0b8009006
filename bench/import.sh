#!/usr/bin/env bash
# Import of a qcow2 served over HTTP by a local web server (Python's, from
# tests/support/http_server.py), compared in the same run with:
#   - the ceiling: the lower of `curl -o /dev/null` of the same URL and one
#     core's SHA-256 speed (`openssl speed -evp sha256`, 16 KiB blocks);
#   - the two-step way: download to a file, build the artifact (tar, config,
#     manifest as an OCI layout) and push it with skopeo;
#   - an upload of the same file with `curl -T` to a `dvcr serve` session.
# Also measured, outside the ceiling the issue defines: the registry
# volume's write speed (`dd oflag=direct conv=fsync` of as many bytes into
# the storage folder), which every stored byte goes through.
# Prints each speed, the ratios, and dvcr import's peak RSS.
#
#   bench/import.sh [DATA_MIB]      (default 2048: a qcow2 with that much random data)
#
# Environment: BENCH_DIR (default /var/tmp/dvcr-bench-import), ROUNDS (default 3; best kept).
set -euo pipefail
cd "$(dirname "$0")/.."

size_mib=${1:-2048}
rounds=${ROUNDS:-3}
work=${BENCH_DIR:-/var/tmp/dvcr-bench-import}
port=5111
source bench/common.sh
need_tools curl openssl python3 skopeo qemu-img /usr/bin/time
cargo build --release --locked --quiet

fresh_work "$work"
mkdir -p "$work/files"

echo "making a qcow2 with ${size_mib} MiB of random data in $work"
: >"$work/random.raw"
for ((left = size_mib; left > 0; left -= 1024)); do   # openssl rand takes at most 2^31-1 bytes at once
    openssl rand $(( (left < 1024 ? left : 1024) << 20 )) >>"$work/random.raw"
done
qemu-img convert -O qcow2 "$work/random.raw" "$work/files/disk.qcow2"
rm "$work/random.raw"
bytes=$(stat -c %s "$work/files/disk.qcow2")

python3 tests/support/http_server.py "$work/files" >"$work/web.port" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/web.port" ] && break; sleep 0.1; done
url="http://127.0.0.1:$(head -1 "$work/web.port")/plain/disk.qcow2"
target/release/dvcr serve --listen 127.0.0.1:$port --storage-dir "$work/registry" 2>"$work/dvcr.log" &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done

now() { date +%s.%N; }
speed() { python3 -c "print(f'{$bytes / ($2 - $1) / 1e6:.0f}')"; }
best() { printf '%s\n' "$@" | sort -n | tail -1; }

sha=$(openssl speed -evp sha256 -bytes 16384 -seconds 3 2>/dev/null | awk '/^sha256/ {print $NF}' | tr -d k)
sha_mbs=$(python3 -c "print(f'{$sha * 1000 / 1e6:.0f}')")

curl_runs=() disk_runs=() import_runs=() two_runs=() upload_runs=()
for round in $(seq "$rounds"); do
    sync
    start=$(now); curl -sf -o /dev/null "$url"; end=$(now)
    curl_runs+=("$(speed "$start" "$end")")

    sync
    start=$(now)
    dd if=/dev/zero of="$work/registry/disk-probe" bs=16M count=$(( (bytes + (16 << 20) - 1) >> 24 )) oflag=direct conv=fsync status=none
    end=$(now)
    rm "$work/registry/disk-probe"
    disk_runs+=("$(speed "$start" "$end")")

    sync
    start=$(now)
    /usr/bin/time -f %M -o "$work/rss" target/release/dvcr import "$url" "127.0.0.1:$port/vi/bench/import:r$round" >/dev/null 2>>"$work/import.log"
    end=$(now)
    import_runs+=("$(speed "$start" "$end")")
    rss_kib=$(cat "$work/rss")

    sync
    start=$(now)
    two=$work/two
    rm -rf "$two"; mkdir -p "$two/tree/disk" "$two/layout/blobs/sha256"
    curl -sf -o "$two/tree/disk/disk.qcow2" "$url"
    tar -C "$two/tree" --owner=0 --group=0 --numeric-owner -cf "$two/layer.tar" disk
    layer=$(sha256sum "$two/layer.tar" | cut -d' ' -f1)
    mv "$two/layer.tar" "$two/layout/blobs/sha256/$layer"
    printf '{"architecture":"amd64","os":"linux","config":{"Labels":{"source-image-size":"%s"}},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$bytes" "$layer" >"$two/config"
    config=$(sha256sum "$two/config" | cut -d' ' -f1)
    mv "$two/config" "$two/layout/blobs/sha256/$config"
    layer_size=$(stat -c %s "$two/layout/blobs/sha256/$layer")
    config_size=$(stat -c %s "$two/layout/blobs/sha256/$config")
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
        "$config" "$config_size" "$layer" "$layer_size" >"$two/manifest"
    manifest=$(sha256sum "$two/manifest" | cut -d' ' -f1)
    manifest_size=$(stat -c %s "$two/manifest")
    mv "$two/manifest" "$two/layout/blobs/sha256/$manifest"
    printf '{"imageLayoutVersion":"1.0.0"}' >"$two/layout/oci-layout"
    printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"latest"}}]}' \
        "$manifest" "$manifest_size" >"$two/layout/index.json"
    skopeo copy -q --dest-tls-verify=false "oci:$two/layout:latest" "docker://127.0.0.1:$port/vi/bench/two:r$round"
    end=$(now)
    two_runs+=("$(speed "$start" "$end")")
    rm -rf "$two"

    sync
    session=$(curl -sf -X POST "http://127.0.0.1:$port/dvcr/uploads?destination=vi/bench/upload:r$round" | python3 -c 'import json,sys; print(json.load(sys.stdin)["url"])')
    start=$(now)
    curl -sf -o /dev/null -T "$work/files/disk.qcow2" "http://127.0.0.1:$port$session"
    end=$(now)
    upload_runs+=("$(speed "$start" "$end")")
done

curl_best=$(best "${curl_runs[@]}")
ceiling=$(( curl_best < sha_mbs ? curl_best : sha_mbs ))
import_best=$(best "${import_runs[@]}")
two_best=$(best "${two_runs[@]}")
upload_best=$(best "${upload_runs[@]}")
disk_best=$(best "${disk_runs[@]}")
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
echo "image: $bytes bytes of qcow2; rounds: $rounds (best kept); MB/s = 10^6 bytes/s"
echo "curl -o /dev/null:        ${curl_runs[*]} MB/s"
echo "openssl sha256 (1 core):  $sha_mbs MB/s"
echo "ceiling:                  $ceiling MB/s"
echo "volume (dd oflag=direct): ${disk_runs[*]} MB/s"
echo "dvcr import:              ${import_runs[*]} MB/s  -> $(ratio "$import_best" "$ceiling")x ceiling, $(ratio "$import_best" "$two_best")x two-step, $(ratio "$import_best" "$disk_best")x volume"
echo "two-step (curl+skopeo):   ${two_runs[*]} MB/s"
echo "curl -T upload:           ${upload_runs[*]} MB/s  -> $(ratio "$upload_best" "$ceiling")x ceiling, $(ratio "$upload_best" "$two_best")x two-step, $(ratio "$upload_best" "$disk_best")x volume"
echo "dvcr import peak RSS:     $((rss_kib / 1024)) MiB"
