#!/usr/bin/env bash
# Installs what the build needs on a fresh Debian machine with the Rust toolchain, when missing.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run repeatedly.
set -euo pipefail

need=()
# RocksDB's bindings need libclang; librdkafka builds from source with make, perl and zlib.
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
command -v make >/dev/null || need+=(make)
command -v g++ >/dev/null || need+=(g++)
command -v perl >/dev/null || need+=(perl)
dpkg -s zlib1g-dev >/dev/null 2>&1 || need+=(zlib1g-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
if [ "${#need[@]}" -gt 0 ]; then
    echo "setup: installing ${need[*]}" >&2
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# promtool checks the Prometheus alert rules (tests/ops.rs); Debian ships it in the prometheus
# package. Called by scripts/test.sh only: the demo does not need it.
install_promtool() {
    command -v promtool >/dev/null && return 0
    echo "setup: installing prometheus (for promtool)" >&2
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    command -v promtool >/dev/null || { echo "setup: the prometheus package did not provide promtool" >&2; return 1; }
}

# One target dir outside the clone, shared by the demo, the tests and the benches.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tidemark/target}"
mkdir -p "$CARGO_TARGET_DIR"

for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
done

# Clippy runs as the workspace wrapper of the one build, with warnings denied: the workspace's
# crates are linted while they compile, and every dependency compiles once (a separate
# `cargo clippy` would compile each one a second time, checked only). The demo, the tests and
# the benches all build through build_all, with the same profile, targets, features and
# environment, so whichever runs first compiles everything and the others reuse it.
RUSTC_WORKSPACE_WRAPPER="$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver)"
export RUSTC_WORKSPACE_WRAPPER
export CLIPPY_ARGS="-Dwarnings"

build_all() {
    echo "== cargo test --release --workspace --all-targets --no-run (clippy -D warnings as the wrapper)" >&2
    cargo test --release --workspace --all-targets --no-run "$@"
}
