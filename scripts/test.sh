#!/usr/bin/env bash
# The whole test suite, with the gates CI enforces: rustfmt, clippy (-D warnings, as the
# wrapper of the one release build), all tests (tests/ops.rs needs promtool, installed here
# when missing). One Apache Kafka broker (scripts/kafka.sh: Java and Maven installed when
# missing, Kafka fetched through Maven on first use) serves the tests that run against real
# Kafka; it is stopped when this script ends, however it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
install_promtool
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
build_all
echo "== Apache Kafka for the tests (scripts/kafka.sh)" >&2
KAFKA_DIR="$(mktemp -d -t tidemark-test-kafka.XXXXXX)"
trap 'scripts/kafka.sh stop "$KAFKA_DIR" --clean >/dev/null 2>&1 || true' EXIT
TIDEMARK_TEST_KAFKA="$(scripts/kafka.sh start "$KAFKA_DIR")"
export TIDEMARK_TEST_KAFKA
echo "== cargo test --release" >&2
cargo test --release --workspace --all-targets -- --test-threads="${TEST_THREADS:-2}"
