#!/usr/bin/env bash
# Runs the demo: tidemark on config/demo.toml with the embedded Kafka-protocol broker and the
# built-in click generator, writing Delta tables under ./data/. Ctrl-C stops it gracefully.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
build_all
exec "$CARGO_TARGET_DIR/release/tidemark" run "${1:-config/demo.toml}"
