#!/usr/bin/env bash
# Scale-out on one machine: tidemark processes sharing config/scale_out.toml through a real
# Apache Kafka broker (scripts/kafka.sh).
#
#   scripts/scale-demo.sh [EVENTS]        three processes on EVENTS clicks (default 1,000,000)
#                                         and a twentieth as many purchases: one is SIGKILLed,
#                                         one stalls (SIGSTOP) past the session timeout, one
#                                         joins mid-run; prints when every event is committed
#   scripts/scale-demo.sh bench [EVENTS]  the same input caught up by one process without
#                                         [scale] (the baseline), then by 1, 2 and 3 processes
#                                         (fresh state each), with events/s and CPU seconds
#
# Everything lives in a new temp dir (TIDEMARK_SCALE_DIR to choose), kept at the end.
# TIDEMARK_COMMIT_INTERVAL and TIDEMARK_SESSION_TIMEOUT set every run's commit_interval and
# [scale] session_timeout (default: the file's 1s and 10s).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
build_all >&2

MODE=demo
if [[ "${1:-}" == "bench" ]]; then
    MODE=bench
    shift
fi
EVENTS="${1:-1000000}"
# Every run's epoch length (the shipped file says 1s). Each task commits each of its sinks
# once per epoch, with fsyncs: many tasks in one process multiply them.
COMMIT_INTERVAL="${TIDEMARK_COMMIT_INTERVAL:-1s}"
SESSION_TIMEOUT="${TIDEMARK_SESSION_TIMEOUT:-10s}"
PARTITIONS=6
BIN="$CARGO_TARGET_DIR/release/tidemark"
TOOLS="$CARGO_TARGET_DIR/release/tidemark-tools"
DIR="${TIDEMARK_SCALE_DIR:-$(mktemp -d -t tidemark-scale.XXXXXX)}"
mkdir -p "$DIR"
say() { echo "scale-demo: $*" >&2; }

ADDR="$(scripts/kafka.sh start "$DIR/kafka")"
MEMBERS=()
cleanup() {
    for pid in "${MEMBERS[@]}"; do kill -CONT "$pid" 2>/dev/null || true; kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    scripts/kafka.sh stop "$DIR/kafka" >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for topic in click-events purchase-events; do
    scripts/kafka.sh tool kafka-topics --bootstrap-server "$ADDR" --create --topic "$topic" --partitions "$PARTITIONS" >/dev/null
done
say "producing $EVENTS clicks and $((EVENTS / 20)) purchases (keyed by user) to $ADDR"
"$TOOLS" loadgen --brokers "$ADDR" --family click --count "$EVENTS" --keys 10000 --disorder 2s --malformed-share 0.001 --report-every 1h >/dev/null
"$TOOLS" loadgen --brokers "$ADDR" --family purchase --count "$((EVENTS / 20))" --keys 10000 --report-every 1h >/dev/null

# The shipped pipeline under a name of its own (its group, changelog, state and tables);
# a second argument "single" turns [scale] off (one process, the engine's own shards).
pipeline() {
    local name="$1" file="$DIR/$1.toml" scale="s|^session_timeout = .*|session_timeout = \"$SESSION_TIMEOUT\"|"
    [[ "${2:-}" == single ]] && scale="s|^session_timeout = .*|enabled = false|"
    sed -e "s|^name = \"scale-out\"|name = \"$name\"|" \
        -e "s|^commit_interval = .*|commit_interval = \"$COMMIT_INTERVAL\"|" \
        -e "s|\./data/state/scale-out|$DIR/$name/state|" \
        -e "s|\./data/scale-out|$DIR/$name|" \
        -e "$scale" \
        config/scale_out.toml >"$file"
    echo "$file"
}

# Starts a member in the background; its pid is left in $STARTED (not echoed: a command
# substitution would run this in a subshell, and MEMBERS would not learn of it).
start_member() {
    local file="$1" log="$2"
    "$BIN" run "$file" --brokers "$ADDR" 2>"$log" >/dev/null &
    STARTED="$!"
    MEMBERS+=("$STARTED")
}

cpu_seconds() { # utime + stime of a process, in seconds
    awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat" 2>/dev/null || echo 0
}

stop_members() {
    for pid in "${MEMBERS[@]}"; do kill -CONT "$pid" 2>/dev/null || true; kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${MEMBERS[@]}"; do wait "$pid" 2>/dev/null || true; done
    MEMBERS=()
}

if [[ "$MODE" == demo ]]; then
    file="$(pipeline scale-out)"
    start_member "$file" "$DIR/member-a.log"; a="$STARTED"
    start_member "$file" "$DIR/member-b.log"; b="$STARTED"
    start_member "$file" "$DIR/member-c.log"; c="$STARTED"
    say "three members running (pids $a $b $c); logs in $DIR/member-*.log"
    sleep 8
    say "SIGKILL member a; member d joins"
    kill -KILL "$a"
    start_member "$file" "$DIR/member-d.log"
    sleep 3
    say "member b stalls (SIGSTOP) for 15 s, past the 10 s session timeout"
    kill -STOP "$b"
    sleep 15
    kill -CONT "$b"
    "$TOOLS" lag --brokers "$ADDR" --group scale-out --topics click-events,purchase-events --wait --timeout 20m
    stop_members
    for m in a b c d; do
        say "member $m: $(grep -c 'tasks assigned' "$DIR/member-$m.log" || true) assignments, $(grep -c 'restored the task' "$DIR/member-$m.log" || true) task starts, $(grep -c 'was fenced' "$DIR/member-$m.log" || true) fenced"
    done
    say "tables: $DIR/scale-out/{user_activity,attribution,dead_letters}"
    exit 0
fi

total=$((EVENTS + EVENTS / 20))
echo "scale-out catch-up: $EVENTS clicks + $((EVENTS / 20)) purchases, $PARTITIONS partitions (tasks), commit_interval $COMMIT_INTERVAL, session_timeout $SESSION_TIMEOUT, $(nproc) cores, Apache Kafka on the same machine"
echo "processes  seconds  events/s  vs single  tidemark CPU s  broker CPU s"
broker_pid="$(cat "$DIR/kafka/pid")"
base=""
# Row "single": the same pipeline without [scale], one process with a shard per core (the
# baseline the scaled-out rows compare with, measured in the same run).
for n in single 1 2 3; do
    if [[ "$n" == single ]]; then file="$(pipeline "scale-bench-$n" single)"; else file="$(pipeline "scale-bench-$n")"; fi
    broker_before="$(cpu_seconds "$broker_pid")"
    started="$(date +%s.%N)"
    pids=()
    for i in $(seq "${n/single/1}"); do
        start_member "$file" "$DIR/bench-$n-$i.log"
        pids+=("$STARTED")
    done
    out="$("$TOOLS" lag --brokers "$ADDR" --group "scale-bench-$n" --topics click-events,purchase-events --wait --timeout 30m)"
    elapsed="$(echo "$(date +%s.%N) - $started" | bc -l)"
    cpu=0
    for pid in "${pids[@]}"; do cpu="$(echo "$cpu + $(cpu_seconds "$pid")" | bc -l)"; done
    broker_cpu="$(echo "$(cpu_seconds "$broker_pid") - $broker_before" | bc -l)"
    stop_members
    rate="$(echo "$total / $elapsed" | bc -l)"
    [[ -z "$base" ]] && base="$rate"
    printf "%9s  %7.1f  %8.0f  %9.2f  %14.1f  %12.1f\n" "$n" "$elapsed" "$rate" "$(echo "$rate / $base" | bc -l)" "$cpu" "$broker_cpu"
    say "$out"
done
