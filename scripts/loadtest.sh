#!/usr/bin/env bash
# The end-to-end load test: builds every workspace target (the daemon and tidemark-tools) and
# runs `tidemark-tools loadtest` (the demo's click query in a `tidemark run` child process;
# baseline, catch-up, max sustained rate, latency, RSS).
# Arguments go to `tidemark-tools loadtest`, e.g. --keys 1000000, --bootstrap 127.0.0.1:19092
# (a broker from scripts/kafka-broker.sh), --events N, --step-seconds S, --out DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
build_all
exec "$CARGO_TARGET_DIR/release/tidemark-tools" loadtest "$@"
