#!/usr/bin/env bash
# The long fault suite: the fault tests of tests/faults.rs (SIGSTOP/SIGCONT, an Apache Kafka
# broker stopped and restarted mid-run, a full table disk) with many rounds each, then the
# SIGKILL tests (Kafka, Apache Kafka with 1.5M events, file drops, shard counts changing,
# fast/slow/killed runs identical) and the join + anomaly crash test, again and again until
# the time is up. Every round ends with tables equal to an oracle; the first failure stops it.
#
#   scripts/soak.sh [MINUTES]        default 60; TIDEMARK_SOAK_ROUNDS (default 10) rounds per
#                                    fault test and pass
#
# Needs root for the disk-full test (it mounts a small tmpfs). Logs: $TMPDIR/tidemark-soak.*.log
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-60}"
source scripts/setup.sh
build_all
KAFKA_DIR="$(mktemp -d -t tidemark-soak-kafka.XXXXXX)"
trap 'scripts/kafka.sh stop "$KAFKA_DIR" --clean >/dev/null 2>&1 || true' EXIT
TIDEMARK_TEST_KAFKA="$(scripts/kafka.sh start "$KAFKA_DIR")"
export TIDEMARK_TEST_KAFKA
export TIDEMARK_SOAK_ROUNDS="${TIDEMARK_SOAK_ROUNDS:-10}"
deadline=$(( $(date +%s) + minutes * 60 ))
pass=0
while [ "$(date +%s)" -lt "$deadline" ]; do
    pass=$((pass + 1))
    log="$(mktemp -t tidemark-soak.XXXXXX.log)"
    echo "== pass $pass ($(date -u +%H:%M:%S)), log $log" >&2
    if ! cargo test --release --test faults --test cli --test join_crash -- --test-threads=1 >"$log" 2>&1; then
        grep -E "panicked|seed|FAILED" "$log" >&2 || true
        echo "soak: pass $pass failed; see $log" >&2
        exit 1
    fi
    grep -E "^test result" "$log" >&2
done
echo "soak: $pass passes, no failure, in $minutes minutes" >&2
