#!/usr/bin/env bash
# The whole test suite, with the gates CI enforces: rustfmt, clippy (-D warnings, as the
# wrapper of the one release build), all tests (tests/ops.rs needs promtool, installed here
# when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
install_promtool
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
build_all
echo "== cargo test --release" >&2
cargo test --release --workspace --all-targets -- --test-threads="${TEST_THREADS:-2}"
