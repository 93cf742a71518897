#!/usr/bin/env bash
# A long run of the demo's left join: the process's memory over minutes.
#
#   scripts/join_soak.sh [--binary PATH] [--seconds N] [--out DIR]
#
# Runs `tidemark run` (the release build, or --binary) on a pipeline it writes to DIR:
# config/demo.toml reduced to its left join (clicks joined with the same user's purchases in
# the minute after, into Delta; bad records into a dead-letter table), the built-in generator
# on the embedded broker at RATE clicks/s (default 10000) and PURCHASES purchases/s (default
# 20). Every SAMPLE seconds (default 10) it prints and appends to DIR/samples.csv the daemon's
# VmRSS, RssAnon and RssFile (MiB); at the end it prints the CPU time the daemon used
# (utime + stime). Environment variables given to the script (e.g. MALLOC_ARENA_MAX) reach
# the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."

binary="${CARGO_TARGET_DIR:-$HOME/.cache/tidemark/target}/release/tidemark"
seconds=300
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --seconds) seconds="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        *) echo "usage: $0 [--binary PATH] [--seconds N] [--out DIR]" >&2; exit 2 ;;
    esac
done
rate="${RATE:-10000}"
purchases="${PURCHASES:-20}"
sample="${SAMPLE:-10}"
port="${PORT:-19465}"
out="${out:-$(mktemp -d /tmp/join-soak.XXXXXX)}"
[ -x "$binary" ] || { echo "no daemon binary at $binary: build it with cargo build --release, or pass --binary" >&2; exit 1; }
mkdir -p "$out"
rm -rf "$out/state" "$out/click_to_purchase" "$out/dead_letters"

cat > "$out/pipeline.toml" <<EOF
[pipeline]
name = "join-soak"
state_dir = "$out/state"
commit_interval = "1s"
shards = 0

[kafka]
bootstrap_servers = "embedded"
group_id = "join-soak"

[[sources]]
name = "clicks"
topic = "click-events"
partitions = 4
format = "json"
starting_offsets = "earliest"
event_time = { field = "timestamp" }
watermark = { delay = "5s", idle_timeout = "30s" }
on_error = "dead_letters"
schema = { user_id = "string", page_url = "string", action = "string", timestamp = "timestamp" }

[[sources]]
name = "purchases"
topic = "purchase-events"
partitions = 2
starting_offsets = "earliest"
event_time = { field = "timestamp" }
watermark = { delay = "5s", idle_timeout = "30s" }
on_error = "dead_letters"
schema = { order_id = "string", user_id = "string", product_id = "string", price = "float", timestamp = "timestamp" }

[[queries]]
name = "click_to_purchase"
from = "clicks"
where = "action = 'click'"
join = { source = "purchases", type = "left", on = ["user_id"], between = ["0s", "1m"], left_as = "c", right_as = "p" }
select = [
  { name = "user_id", expr = "c.user_id" },
  { name = "clicked_page", expr = "c.page_url" },
  { name = "click_time", expr = "c.timestamp" },
  { name = "product_id", expr = "p.product_id" },
  { name = "purchase_amount", expr = "p.price" },
  { name = "purchase_time", expr = "p.timestamp" },
  { name = "time_to_purchase_seconds", expr = "(p.timestamp - c.timestamp) / 1000000.0" },
]
sink = "click_to_purchase"

[[sinks]]
name = "click_to_purchase"
kind = "delta"
path = "$out/click_to_purchase"

[[sinks]]
name = "dead_letters"
kind = "delta"
path = "$out/dead_letters"

[generator]
source = "clicks"
rate = $rate
seed = 42
users = 1000
pages = 50
disorder = "2s"
late_share = 0.001
late_by = "1h"
malformed_share = 0.001
purchases = { source = "purchases", rate = $purchases }

[metrics]
listen = "127.0.0.1:$port"
EOF

log="$out/daemon.log"
"$binary" run "$out/pipeline.toml" > "$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT

echo "binary: $binary" | tee "$out/summary.txt"
echo "left join, $rate clicks/s, $purchases purchases/s, ${seconds}s" | tee -a "$out/summary.txt"
echo "seconds,rss_mib,anon_mib,file_mib" > "$out/samples.csv"
printf '%8s %9s %9s %9s\n' seconds rss_mib anon_mib file_mib
start=$(date +%s)
while :; do
    sleep "$sample"
    kill -0 "$pid" 2>/dev/null || { echo "the daemon exited; see $log" >&2; exit 1; }
    now=$(($(date +%s) - start))
    read -r rss anon file < <(awk '/^VmRSS:/ { r = $2 } /^RssAnon:/ { a = $2 } /^RssFile:/ { f = $2 }
        END { printf "%.1f %.1f %.1f\n", r / 1024, a / 1024, f / 1024 }' "/proc/$pid/status")
    printf '%8s %9s %9s %9s\n' "$now" "$rss" "$anon" "$file"
    echo "$now,$rss,$anon,$file" >> "$out/samples.csv"
    [ "$now" -ge "$seconds" ] && break
done
cpu=$(awk -v hz="$(getconf CLK_TCK)" '{ printf "%.1f", ($14 + $15) / hz }' "/proc/$pid/stat")
kill -TERM "$pid"
wait "$pid" || true
trap - EXIT
echo "daemon CPU time: ${cpu}s; log: $log; samples: $out/samples.csv" | tee -a "$out/summary.txt"
