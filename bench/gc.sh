#!/usr/bin/env bash
# Garbage collection: the same registry content (tagged images plus many
# blobs no manifest names) in `dvcr serve` and in Debian's docker-registry
# (CNCF Distribution), then `dvcr gc` against `docker-registry
# garbage-collect` on each one's storage, timed in the same run; prints
# both times, what each removed, and the ratio. Both registries are stopped
# for the collection, as Distribution requires (dvcr's also runs online).
#
#   bench/gc.sh [GARBAGE_BLOBS] [IMAGES]        (default 2000 50)
#
# Environment: BENCH_DIR (default /var/tmp/dvcr-gc), STORAGE=s3 for both
# on buckets of a local Garage, BLOB_KIB (size of each blob, default 64).
set -euo pipefail
cd "$(dirname "$0")/.."

garbage=${1:-2000}
images=${2:-50}
blob_kib=${BLOB_KIB:-64}
work=${BENCH_DIR:-/var/tmp/dvcr-gc}
dvcr_port=5121
distribution_port=5122

source bench/common.sh
ensure_docker_registry
need_tools curl python3
cargo build --release --locked --quiet

fresh_work "$work"
start_registries "$work" $dvcr_port $distribution_port

# fill PORT: IMAGES tagged images (config, one layer, manifest) and GARBAGE
# blobs no manifest names, eight requests at a time.
fill() {
    python3 - "$1" "$images" "$garbage" "$blob_kib" <<'PY'
import concurrent.futures, hashlib, http.client, json, os, sys
port, images, garbage, kib = (int(value) for value in sys.argv[1:])

def request(method, path, body=b"", headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request(method, path, body, headers or {})
    response = connection.getresponse()
    answer = response.read()
    connection.close()
    if response.status >= 300:
        sys.exit(f"{method} {path}: {response.status} {answer[:500]!r}")
    return response

def blob(repository, content):
    # POST, then PUT with the digest: Distribution ignores a digest on POST.
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    location = request("POST", f"/v2/{repository}/blobs/uploads/").getheader("Location")
    location = location.split("127.0.0.1:%d" % port, 1)[-1]
    separator = "&" if "?" in location else "?"
    request("PUT", f"{location}{separator}digest={digest}", content,
            {"Content-Type": "application/octet-stream", "Content-Length": str(len(content))})
    return {"mediaType": "application/octet-stream", "digest": digest, "size": len(content)}

def image(index):
    repository = f"vi/bench/image{index % 10}"
    config = blob(repository, json.dumps({"architecture": "amd64", "os": "linux", "index": index}).encode())
    config["mediaType"] = "application/vnd.oci.image.config.v1+json"
    layer = blob(repository, os.urandom(kib << 10))
    layer["mediaType"] = "application/vnd.oci.image.layer.v1.tar"
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": config, "layers": [layer]}).encode()
    request("PUT", f"/v2/{repository}/manifests/v{index}", manifest,
            {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})

with concurrent.futures.ThreadPoolExecutor(8) as pool:
    list(pool.map(image, range(images)))
    list(pool.map(lambda index: blob("vi/bench/garbage", os.urandom(kib << 10)), range(garbage)))
PY
}
echo "storing $images images and $garbage unreferenced blobs of $blob_kib KiB in each registry"
fill $dvcr_port
fill $distribution_port
kill "$dvcr_pid" "$distribution_pid"
wait "$dvcr_pid" "$distribution_pid" 2>/dev/null || true

# shellcheck disable=SC2086
dvcr_command="env ${garage_env:-} target/release/dvcr gc --gc-grace 0s $dvcr_storage"
distribution_command="env -u AWS_CA_BUNDLE docker-registry garbage-collect $work/distribution.yml"

seconds_since() { python3 -c 'import sys, time; print(f"{time.time() - float(sys.argv[1]):.2f}")' "$1"; }
start=$(date +%s.%N)
$dvcr_command >"$work/dvcr-gc.json" 2>"$work/dvcr-gc.log"
dvcr_seconds=$(seconds_since "$start")
start=$(date +%s.%N)
$distribution_command >"$work/distribution-gc.log" 2>&1
distribution_seconds=$(seconds_since "$start")

dvcr_removed=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["blobs-removed"])' "$work/dvcr-gc.json")
distribution_removed=$(grep -c "blob eligible for deletion" "$work/distribution-gc.log" || true)
for name in dvcr distribution; do
    removed_var=${name}_removed
    [ "${!removed_var}" -eq "$garbage" ] || {
        echo "$name removed ${!removed_var} blobs, not the $garbage unreferenced ones; see $work" >&2
        trap - EXIT
        exit 1
    }
done

echo
echo "$images images, $garbage unreferenced blobs of $blob_kib KiB, storage ${STORAGE:-filesystem}; machine: $(nproc) cores, $(uname -r)"
echo "  dvcr gc:                         ${dvcr_seconds} s, removed $dvcr_removed blobs"
echo "  docker-registry garbage-collect: ${distribution_seconds} s, removed $distribution_removed blobs"
echo "  time ratio dvcr/distribution: $(python3 -c 'import sys; print(f"{float(sys.argv[1]) / float(sys.argv[2]):.2f}")' "$dvcr_seconds" "$distribution_seconds")"
