#!/usr/bin/env bash
# The end-to-end load test: builds the release binary and runs `tidemark loadtest` (the demo's
# click query as a child process; baseline, catch-up, max sustained rate, latency, RSS).
# Arguments go to `tidemark loadtest`, e.g. --keys 1000000, --bootstrap 127.0.0.1:19092
# (a broker from scripts/kafka-broker.sh), --events N, --step-seconds S, --out DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
build_all
exec "$CARGO_TARGET_DIR/release/tidemark" loadtest "$@"
