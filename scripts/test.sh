#!/usr/bin/env bash
# The whole test suite, with the gates CI enforces: rustfmt, clippy (-D warnings), all tests
# (tests/ops.rs needs promtool, installed here when missing).
# Everything builds in the release profile so the tests, the demo and the benches share one
# compiled RocksDB.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
install_promtool
for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
done
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy --release --all-targets -- -D warnings" >&2
cargo clippy --release --all-targets -- -D warnings
echo "== cargo test --release" >&2
cargo test --release --all-targets -- --test-threads="${TEST_THREADS:-2}"
