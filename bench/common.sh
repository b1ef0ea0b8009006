# Shared pieces of the benchmarks; sourced, not run.

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# fresh_work DIR: an empty work folder, removed on exit together with every
# process whose pid is in the pids array.
fresh_work() {
    work_folder=$1
    rm -rf "$work_folder"
    mkdir -p "$work_folder"
    pids=()
    trap stop_and_clean EXIT
}
stop_and_clean() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work_folder"
}

# need_tools TOOL... : stop with a message when a tool is missing.
need_tools() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "bench needs $tool (scripts/test.sh installs most)" >&2; exit 1; }
    done
}

# Debian's docker-registry (CNCF Distribution), the peer of the registry benchmarks.
ensure_docker_registry() {
    if ! command -v docker-registry >/dev/null 2>&1; then
        as_root apt-get update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-registry
    fi
}

# start_garage WORK PORT BUCKET...: a single-node Garage (the binary the
# test command caches, or `garage` on the PATH) with its S3 API on PORT and
# the buckets made; sets garage_env (the credentials as VAR=value words) and
# garage_key / garage_secret, appends the pid to pids.
start_garage() {
    local work=$1 port=$2 binary node bucket
    shift 2
    binary=${DVCR_GARAGE:-$(command -v garage || echo "${DVCR_CACHE:-$HOME/.cache/dvcr}/garage-2.5.0/bin/garage")}
    [ -x "$binary" ] || { echo "bench needs garage: run scripts/test.sh once (it builds it)" >&2; exit 1; }
    mkdir -p "$work/garage"
    cat >"$work/garage/garage.toml" <<TOML
metadata_dir = "$work/garage/meta"
data_dir = "$work/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$((port + 1))"
rpc_public_addr = "127.0.0.1:$((port + 1))"
rpc_secret = "$(openssl rand -hex 32)"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$port"
root_domain = ".s3.garage.localhost"
TOML
    garage_cli() { "$binary" -c "$work/garage/garage.toml" "$@"; }
    RUST_LOG=garage=warn "$binary" -c "$work/garage/garage.toml" server >"$work/garage.log" 2>&1 &
    pids+=("$!")
    # `node id` reads the key on disk; `status` needs the RPC server up.
    for _ in $(seq 100); do
        node=$(garage_cli node id -q 2>/dev/null) && garage_cli status >/dev/null 2>&1 && break
        sleep 0.1
    done
    garage_cli layout assign -z dc1 -c 100G "${node%@*}" >/dev/null
    garage_cli layout apply --version 1 >/dev/null
    garage_key=GK$(openssl rand -hex 12)
    garage_secret=$(openssl rand -hex 32)
    garage_cli key import --yes -n bench "$garage_key" "$garage_secret" >/dev/null
    for bucket in "$@"; do
        garage_cli bucket create "$bucket" >/dev/null
        garage_cli bucket allow --read --write --owner "$bucket" --key "$garage_key" >/dev/null
    done
    garage_env="AWS_ACCESS_KEY_ID=$garage_key AWS_SECRET_ACCESS_KEY=$garage_secret"
}

# start_registries WORK DVCR_PORT DISTRIBUTION_PORT: `dvcr serve` (prefixed
# by $DVCR_ENV) and docker-registry side by side, on filesystem storage
# under WORK, or with STORAGE=s3 each on its own bucket of one Garage
# (Distribution's s3 driver with its default 10 MiB chunks, blobs served
# through it rather than redirected to the bucket); sets dvcr_pid,
# distribution_pid and dvcr_storage (dvcr's storage flags), appends both
# pids to pids, and waits until both answer.
start_registries() {
    local work=$1 dvcr_port=$2 distribution_port=$3 port distribution_storage
    if [ "${STORAGE:-filesystem}" = s3 ]; then
        start_garage "$work" 3900 dvcr distribution
        dvcr_storage="--s3-endpoint http://127.0.0.1:3900 --s3-region garage --s3-bucket dvcr"
        distribution_storage="  s3:
    accesskey: $garage_key
    secretkey: $garage_secret
    region: garage
    regionendpoint: http://127.0.0.1:3900
    bucket: distribution
    secure: false
    v4auth: true
  redirect:
    disable: true"
    else
        dvcr_storage="--storage-dir $work/dvcr"
        distribution_storage="  filesystem:
    rootdirectory: $work/distribution"
    fi
    # shellcheck disable=SC2086
    env ${garage_env:-} ${DVCR_ENV:-} target/release/dvcr serve --listen "127.0.0.1:$dvcr_port" $dvcr_storage 2>"$work/dvcr.log" &
    dvcr_pid=$!
    pids+=("$dvcr_pid")
    cat >"$work/distribution.yml" <<YAML
version: 0.1
log:
  level: error
storage:
$distribution_storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$distribution_port
YAML
    # Its AWS SDK panics on AWS_CA_BUNDLE (set on some machines) with a
    # custom transport; the endpoint is plain HTTP here anyway.
    env -u AWS_CA_BUNDLE docker-registry serve "$work/distribution.yml" >"$work/distribution.log" 2>&1 &
    distribution_pid=$!
    pids+=("$distribution_pid")
    for port in "$dvcr_port" "$distribution_port"; do
        for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
        curl -sf "http://127.0.0.1:$port/v2/" >/dev/null || {
            echo "the registry on port $port did not start; see $work/dvcr.log and $work/distribution.log" >&2
            exit 1
        }
    done
}
