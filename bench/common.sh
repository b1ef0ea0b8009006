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

# start_registries WORK DVCR_PORT DISTRIBUTION_PORT: `dvcr serve` (prefixed
# by $DVCR_ENV) and docker-registry side by side on filesystem storage under
# WORK; sets dvcr_pid and distribution_pid, appends both to pids, and waits
# until both answer.
start_registries() {
    local work=$1 dvcr_port=$2 distribution_port=$3 port
    ${DVCR_ENV:-} target/release/dvcr serve --listen "127.0.0.1:$dvcr_port" --storage-dir "$work/dvcr" 2>"$work/dvcr.log" &
    dvcr_pid=$!
    pids+=("$dvcr_pid")
    cat >"$work/distribution.yml" <<YAML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $work/distribution
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$distribution_port
YAML
    docker-registry serve "$work/distribution.yml" >"$work/distribution.log" 2>&1 &
    distribution_pid=$!
    pids+=("$distribution_pid")
    for port in "$dvcr_port" "$distribution_port"; do
        for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
    done
}
