#!/usr/bin/env bash
# A long run of an update-mode view: memory and commit time over minutes.
#
#   scripts/view_soak.sh [--binary PATH] [--seconds N] [--out DIR]
#
# Runs `tidemark run` (the release build, or --binary) on a pipeline it writes to DIR: the
# built-in click generator on the embedded broker at RATE events/s (default 20000) over PAGES
# pages (default 20000), and one query — a WINDOW tumbling window (default 10s) per page_url,
# output = "update", upserted into Delta (compaction every 10 commits, the default). Windows
# pass every WINDOW, so the table grows by about PAGES rows each time while the open part stays
# the same. Every SAMPLE seconds (default 10) it prints and appends to DIR/samples.csv: the
# daemon's RSS, the keys in the sink's upsert index (tidemark_sink_indexed_keys; empty when the
# binary has no such metric), the committed epoch, and the mean and max time of the epochs
# committed in the interval (from the committer's "epoch committed" log lines; an epoch's time
# includes the compaction that follows it).
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
rate="${RATE:-20000}"
pages="${PAGES:-20000}"
window="${WINDOW:-10s}"
sample="${SAMPLE:-10}"
port="${PORT:-19464}"
out="${out:-$(mktemp -d /tmp/view-soak.XXXXXX)}"
[ -x "$binary" ] || { echo "no daemon binary at $binary: build it with cargo build --release, or pass --binary" >&2; exit 1; }
mkdir -p "$out"
rm -rf "$out/state" "$out/view" "$out/dead_letters"

cat > "$out/pipeline.toml" <<EOF
[pipeline]
name = "view-soak"
state_dir = "$out/state"
commit_interval = "1s"
shards = 2

[kafka]
bootstrap_servers = "embedded"

[[sources]]
name = "clicks"
topic = "click-events"
partitions = 4
event_time = { field = "timestamp" }
watermark = { delay = "5s", idle_timeout = "30s" }
on_error = "dead_letters"
schema = { user_id = "string", page_url = "string", action = "string", timestamp = "timestamp" }

[[queries]]
name = "page_stats"
from = "clicks"
window = { tumbling = "$window" }
group_by = ["page_url"]
aggregates = [
  { name = "events", fn = "count" },
  { name = "unique_users", fn = "approx_count_distinct", field = "user_id" },
]
output = "update"
sink = "view"

[[sinks]]
name = "view"
kind = "delta"
path = "$out/view"

[[sinks]]
name = "dead_letters"
kind = "delta"
path = "$out/dead_letters"

[generator]
source = "clicks"
rate = $rate
seed = 7
users = 100000
pages = $pages
disorder = "2s"
late_share = 0.0
malformed_share = 0.0

[metrics]
listen = "127.0.0.1:$port"
EOF

log="$out/daemon.log"
RUST_LOG="info,tidemark::commit=debug" "$binary" run --log-json "$out/pipeline.toml" > "$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT

metric() {
    curl -s "http://127.0.0.1:$port/metrics" 2>/dev/null | awk -v name="$1" '$1 ~ "^"name"([{]|$)" { print $2; exit }'
}

echo "binary: $binary" | tee "$out/summary.txt"
echo "rate $rate events/s, $pages pages, tumbling $window, update mode, ${seconds}s" | tee -a "$out/summary.txt"
echo "seconds,rss_mib,indexed_keys,committed_epoch,epochs,commit_mean_ms,commit_max_ms" > "$out/samples.csv"
printf '%8s %9s %13s %8s %7s %15s %14s\n' seconds rss_mib indexed_keys epoch epochs commit_mean_ms commit_max_ms
offset=0
start=$(date +%s)
while :; do
    sleep "$sample"
    kill -0 "$pid" 2>/dev/null || { echo "the daemon exited; see $log" >&2; exit 1; }
    now=$(($(date +%s) - start))
    rss=$(awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$pid/status")
    keys=$(metric tidemark_sink_indexed_keys || true)
    epoch=$(metric tidemark_committed_epoch || true)
    size=$(stat -c %s "$log")
    stats=$(tail -c +"$((offset + 1))" "$log" | head -c "$((size - offset))" \
        | { grep '"epoch committed"' || true; } | { grep -o '"elapsed_ms":[0-9]*' || true; } | cut -d: -f2 \
        | awk '{ n++; s += $1; if ($1 > m) m = $1 } END { if (n) printf "%d %.1f %d", n, s / n, m; else print "0 0 0" }')
    offset=$size
    read -r n mean max <<< "$stats"
    printf '%8s %9s %13s %8s %7s %15s %14s\n' "$now" "$rss" "${keys:--}" "${epoch:--}" "$n" "$mean" "$max"
    echo "$now,$rss,$keys,$epoch,$n,$mean,$max" >> "$out/samples.csv"
    [ "$now" -ge "$seconds" ] && break
done
kill -TERM "$pid"
wait "$pid" || true
trap - EXIT
files=$(find "$out/view" -name '*.parquet' | wc -l)
echo "parquet files under the table (active and removed): $files; log: $log; samples: $out/samples.csv" | tee -a "$out/summary.txt"
