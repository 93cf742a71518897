#!/usr/bin/env bash
# Starts a real Kafka-compatible broker (tansu, in-memory storage) for runs larger than the
# embedded broker's ~5 MB-per-partition retention, and keeps it running until Ctrl-C (or
# SIGTERM); the broker stops with the script.
#
#   scripts/kafka-broker.sh [--port 19092] [--topic NAME:PARTITIONS]... [--address-file F]
#
# Installs tansu 0.6.0 on first use (`cargo install`, about 10 minutes on 2 cores) into
# $TIDEMARK_TOOLS (default ~/.cache/tidemark/tools), so later runs start at once. Prints
# `broker listening on 127.0.0.1:PORT` once it accepts connections; point tidemark at it with
# `--brokers`/`--bootstrap 127.0.0.1:PORT` or [kafka] bootstrap_servers. Memory storage keeps
# every event in RAM (about 1.3 x the bytes produced) and forgets it all when stopped.
set -euo pipefail

TANSU_VERSION=0.6.0
TOOLS="${TIDEMARK_TOOLS:-$HOME/.cache/tidemark/tools}"
TANSU="$TOOLS/bin/tansu"
port=19092
topics=()
address_file=""

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --port) port="${2:?--port needs a number}"; shift 2 ;;
        --topic) topics+=("${2:?--topic needs NAME:PARTITIONS}"); shift 2 ;;
        --address-file) address_file="${2:?--address-file needs a path}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
case "$port" in
    ''|*[!0-9]*) echo "error: --port '$port' must be a number, e.g. 19092" >&2; exit 2 ;;
esac
for t in "${topics[@]}"; do
    case "$t" in
        ?*:[1-9]*) ;;
        *) echo "error: --topic '$t' must look like NAME:PARTITIONS, e.g. click-events:16" >&2; exit 2 ;;
    esac
done

if [ ! -x "$TANSU" ] || ! "$TANSU" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    echo "kafka-broker: installing tansu $TANSU_VERSION into $TOOLS (first run only; ~10 minutes on 2 cores)" >&2
    command -v cargo >/dev/null || { echo "error: cargo not found; install the Rust toolchain (rustup) first" >&2; exit 1; }
    # A target dir of its own (deleted afterwards: ~2 GB) so tidemark's stays untouched.
    build_dir="$HOME/.cache/tidemark/target-tansu"
    CARGO_TARGET_DIR="$build_dir" cargo install tansu --version "$TANSU_VERSION" \
        --features dynostore --locked --root "$TOOLS" >&2
    rm -rf "$build_dir"
fi

# /dev/tcp is bash's: succeeds once something accepts connections on the port.
accepts() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

if accepts; then
    echo "error: something already listens on 127.0.0.1:$port; stop it or pass --port N" >&2
    exit 1
fi

url="tcp://127.0.0.1:$port"
log="${TMPDIR:-/tmp}/tidemark-kafka-broker-$port.log"
"$TANSU" broker --listener-url "$url" --advertised-listener-url "$url" \
    --storage-engine memory://tansu/ >"$log" 2>&1 &
broker_pid=$!
stop() {
    trap - EXIT INT TERM
    if kill -0 "$broker_pid" 2>/dev/null; then
        kill -TERM "$broker_pid" 2>/dev/null || true
        wait "$broker_pid" 2>/dev/null || true
    fi
    [ -z "$address_file" ] || rm -f "$address_file"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for _ in $(seq 1 200); do
    accepts && break
    if ! kill -0 "$broker_pid" 2>/dev/null; then
        echo "error: tansu exited at start; its log ($log):" >&2
        tail -20 "$log" >&2
        exit 1
    fi
    sleep 0.1
done
accepts || { echo "error: tansu did not accept connections on 127.0.0.1:$port within 20 s; see $log" >&2; exit 1; }

for t in "${topics[@]}"; do
    name="${t%:*}"
    partitions="${t##*:}"
    if ! "$TANSU" topic create "$name" --partitions "$partitions" --broker "$url" >>"$log" 2>&1; then
        echo "error: could not create topic '$name' ($partitions partitions); see $log" >&2
        exit 1
    fi
    echo "kafka-broker: created topic $name with $partitions partitions" >&2
done

[ -z "$address_file" ] || echo "127.0.0.1:$port" >"$address_file"
echo "broker listening on 127.0.0.1:$port (tansu $TANSU_VERSION, memory storage; log $log; Ctrl-C to stop)"
status=0
wait "$broker_pid" || status=$?
echo "error: tansu exited on its own (status $status); its log ($log):" >&2
tail -20 "$log" >&2
exit 1
