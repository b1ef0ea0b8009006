#!/usr/bin/env bash
# Runs DVCR's whole test suite on a fresh Debian machine: installs the tools
# the end-to-end tests drive (skopeo, containerd), builds with --locked, and
# runs every test. A test whose tool is missing fails; none is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v skopeo >/dev/null 2>&1 || missing+=(skopeo)
{ command -v containerd >/dev/null 2>&1 && command -v ctr >/dev/null 2>&1; } || missing+=(containerd)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install cargo-nextest --locked
fi

cargo build --locked --workspace --all-targets
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo nextest run --locked --workspace --no-fail-fast
