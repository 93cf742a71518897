//! Seed-style pipelines end to end through Kafka (embedded broker) and Delta, each compared
//! with an oracle computed here from the same generated events with serde_json + chrono +
//! BTreeMaps: filters and derived columns in update mode (a materialized view, also read at
//! older table versions), sliding and session windows in append mode, complete mode, and
//! late events inside and beyond allowed_lateness.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use common::{init_logs, plan, produce, wait_for, Sent, PARTITIONS, TOPIC};
use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::datatypes::{Float64Type, Int64Type, TimestampMicrosecondType};
use tidemark::broker::EmbeddedBroker;
use tidemark::config::parse_config;
use tidemark::source::generator::EventKind;

/// A pipeline over the shared click topic with the given query and sink tables.
fn pipeline(name: &str, bootstrap: &str, dir: &Path, query: &str, sink_extra: &str) -> String {
    format!(
        r#"
[pipeline]
name = "{name}"
state_dir = "{state}"
commit_interval = "200ms"
shards = 2

[kafka]
bootstrap_servers = "{bootstrap}"

[[sources]]
name = "clicks"
topic = "{TOPIC}"
event_time = {{ field = "timestamp" }}
watermark = {{ delay = "3s", idle_timeout = "1h" }}
on_error = "dlq"
schema = {{ user_id = "string", page_url = "string", action = "string", timestamp = "timestamp" }}

[[queries]]
from = "clicks"
sink = "out"
{query}

[[sinks]]
name = "out"
kind = "delta"
path = "{out}"
{sink_extra}

[[sinks]]
name = "dlq"
kind = "delta"
path = "{dlq}"
[metrics]
listen = "127.0.0.1:0"
"#,
        state = dir.join("state").display(),
        out = dir.join("out").display(),
        dlq = dir.join("dlq").display(),
    )
}

/// (event time µs, user, page, action) of the valid events.
fn valid(events: &[Sent]) -> Vec<(i64, String, String, String)> {
    events
        .iter()
        .filter(|s| matches!(s.event.kind, EventKind::Valid))
        .map(|s| {
            let v: serde_json::Value = serde_json::from_slice(&s.event.payload).unwrap();
            let t = chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str().unwrap())
                .unwrap()
                .timestamp_micros();
            let s = |k: &str| v[k].as_str().unwrap().to_string();
            (t, s("user_id"), s("page_url"), s("action"))
        })
        .collect()
}

fn read(dir: &Path, version: Option<i64>) -> Vec<RecordBatch> {
    if !dir.join("_delta_log").exists() {
        return Vec::new();
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(tidemark::sink::delta::read_table(dir, version)).expect("read delta table")
}

fn time_col(b: &RecordBatch, name: &str, i: usize) -> i64 {
    b.column_by_name(name).unwrap().as_primitive::<TimestampMicrosecondType>().value(i)
}
fn str_col(b: &RecordBatch, name: &str, i: usize) -> String {
    b.column_by_name(name).unwrap().as_string::<i32>().value(i).to_string()
}
fn int_col(b: &RecordBatch, name: &str, i: usize) -> i64 {
    b.column_by_name(name).unwrap().as_primitive::<Int64Type>().value(i)
}
fn float_col(b: &RecordBatch, name: &str, i: usize) -> Option<f64> {
    let c = b.column_by_name(name).unwrap().as_primitive::<Float64Type>();
    (!c.is_null(i)).then(|| c.value(i))
}

/// Waits until `read()` equals `expected`; on timeout, panics with what differs.
fn wait_equal<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(what: &str, expected: &BTreeMap<K, V>, mut read: impl FnMut() -> BTreeMap<K, V>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let got = read();
        if &got == expected {
            return;
        }
        if std::time::Instant::now() > deadline {
            let wrong: Vec<_> = expected
                .iter()
                .filter(|(k, v)| got.get(*k) != Some(*v))
                .map(|(k, v)| (k, v, got.get(k)))
                .take(10)
                .collect();
            let extra: Vec<_> = got.keys().filter(|k| !expected.contains_key(*k)).take(10).collect();
            panic!(
                "timed out waiting for {what}: {} rows vs {} expected; (key, expected, got): {wrong:?}; unexpected keys: {extra:?}",
                got.len(),
                expected.len()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// (start, end, [(event time, page)]) of one model session.
type Session = (i64, i64, Vec<(i64, String)>);

fn start(toml: &str) -> tidemark::daemon::RunningPipeline {
    tidemark::daemon::start(parse_config(toml).expect("valid pipeline"), Arc::new(AtomicBool::new(false))).expect("start")
}

type PageStats = BTreeMap<(i64, String), (i64, i64, i64, Option<f64>, String)>;

/// The click-analytics view over `events`: every 5 s window of every accepted view or click
/// (update mode writes open windows too).
fn oracle(events: &[Sent]) -> PageStats {
    let mut groups: BTreeMap<(i64, String), (i64, BTreeSet<String>, i64)> = BTreeMap::new();
    for (t, user, page, action) in valid(events) {
        if action != "view" && action != "click" {
            continue;
        }
        let start = t.div_euclid(5_000_000) * 5_000_000;
        let g = groups.entry((start, page)).or_default();
        g.1.insert(user);
        if action == "view" {
            g.0 += 1;
        } else {
            g.2 += 1;
        }
    }
    groups
        .into_iter()
        .map(|(k, (views, users, clicks))| {
            let ctr = (views != 0).then(|| clicks as f64 / views as f64);
            let date = chrono::DateTime::from_timestamp_micros(k.0).unwrap().format("%Y-%m-%d").to_string();
            (k, (views, users.len() as i64, clicks, ctr, date))
        })
        .collect()
}

fn read_page_stats(dir: &Path, version: Option<i64>) -> PageStats {
    let mut out = PageStats::new();
    for b in read(dir, version) {
        for i in 0..b.num_rows() {
            let key = (time_col(&b, "window_start", i), str_col(&b, "page_url", i));
            let row = (
                int_col(&b, "views", i),
                int_col(&b, "unique_users", i),
                int_col(&b, "clicks", i),
                float_col(&b, "click_through_rate", i),
                str_col(&b, "window_date", i),
            );
            assert!(out.insert(key.clone(), row).is_none(), "two rows for {key:?}");
        }
    }
    out
}

/// Seed example 1 as a materialized view: tumbling 5 s per page, filtered counts, approximate
/// unique users, a derived click-through rate and a derived partition column, output update.
#[test]
fn click_analytics_view_is_upserted_and_every_version_has_one_row_per_key() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), PARTITIONS)]).unwrap();
    let query = r#"
name = "page_stats"
where = "action IN ('view', 'click')"
window = { tumbling = "5s" }
group_by = ["page_url"]
aggregates = [
  { name = "views", fn = "count", filter = "action = 'view'" },
  { name = "unique_users", fn = "approx_count_distinct", field = "user_id" },
  { name = "clicks", fn = "count", filter = "action = 'click'" },
]
derive = [
  { name = "click_through_rate", expr = "clicks / views" },
  { name = "window_date", expr = "DATE(window_start)" },
]
output = "update"
"#;
    let toml = pipeline(
        "view",
        broker.bootstrap_servers(),
        dir.path(),
        query,
        r#"partition_by = ["window_date"]
compact_every = 3
compact_min_files = 2"#,
    )
    // The dead-letter table is append-only with small commits: compaction has work there.
    .replace(
        &format!("path = \"{}\"", dir.path().join("dlq").display()),
        &format!("path = \"{}\"\ncompact_every = 3\ncompact_min_files = 2", dir.path().join("dlq").display()),
    );
    let running = start(&toml);
    let out = dir.path().join("out");
    // In stages, so the view is updated across many epochs while windows are open; after each
    // stage is committed the table equals the oracle over all events so far. Very-late events
    // come only after the first watermark: before it nothing is late.
    let mut events = plan(11, 0, 4_000, 0.0, 0.002);
    produce(broker.bootstrap_servers(), &events);
    wait_equal("the view after stage 1", &oracle(&events), || read_page_stats(&out, None));
    let phase2 = plan(12, 4_000, 4_000, 0.005, 0.002);
    for (i, chunk) in phase2.chunks(800).enumerate() {
        produce(broker.bootstrap_servers(), chunk);
        events.extend_from_slice(chunk);
        wait_equal(&format!("the view after stage {}", i + 2), &oracle(&events), || read_page_stats(&out, None));
    }
    let expected = oracle(&events);
    running.stop().unwrap();
    assert_eq!(read_page_stats(&out, None), expected);

    // Every committed version is readable and holds one row per key (read_page_stats asserts it).
    let last_version = |table: &Path| {
        std::fs::read_dir(table.join("_delta_log"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".json")?.parse::<i64>().ok())
            .max()
            .unwrap()
    };
    let versions = last_version(&out);
    assert!(versions >= 3, "expected several upsert commits, found {versions}");
    for v in 1..=versions {
        read_page_stats(&out, Some(v));
    }
    // Compaction of the append-only dead-letter table: one commit with dataChange = false that
    // leaves the content of its version unchanged, older versions still readable.
    let dlq = dir.path().join("dlq");
    let mut compactions = 0;
    for v in 1..=last_version(&dlq) {
        let log = std::fs::read_to_string(dlq.join(format!("_delta_log/{v:020}.json"))).unwrap();
        if log.contains("\"dataChange\":false") {
            compactions += 1;
            let rows = |version| read(&dlq, Some(version)).iter().map(|b| b.num_rows()).sum::<usize>();
            assert_eq!(rows(v), rows(v - 1), "compaction at version {v} changed the row count");
        }
    }
    assert!(compactions > 0, "no compaction commit in the dead-letter table");
    // Partitioned by the derived date.
    assert!(std::fs::read_dir(&out)
        .unwrap()
        .any(|e| e.unwrap().file_name().to_string_lossy().starts_with("window_date=")));
    // Late and malformed events are dead letters, as for append mode; a late event the query's
    // `where` excludes would not have counted anyway and is not one.
    let expected_dead: Vec<(String, Vec<u8>)> = common::expected_dead_letters(&events)
        .into_iter()
        .filter(|(reason, payload)| {
            reason != "late" || {
                let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
                matches!(v["action"].as_str(), Some("view" | "click"))
            }
        })
        .collect();
    assert_eq!(common::read_dead_letters(&dir.path().join("dlq")), expected_dead);
}

/// Seed examples 2 and 3 shapes: sliding windows (10 s every 5 s) and sessions (gap 2 s) per
/// user, append mode, 2 shards.
#[test]
fn sliding_and_session_windows_match_the_oracle() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), PARTITIONS)]).unwrap();
    let events = plan(23, 0, 6_000, 0.0, 0.0);
    produce(broker.bootstrap_servers(), &events);
    let watermark = common::final_watermark_us(&events);
    let valid = valid(&events);

    // Sliding: per page, count and distinct users.
    let sliding = r#"
name = "rolling"
window = { sliding = "10s", slide = "5s" }
group_by = ["page_url"]
aggregates = [
  { name = "events", fn = "count" },
  { name = "distinct_users", fn = "count_distinct", field = "user_id" },
]
"#;
    let sdir = dir.path().join("sliding");
    let running = start(&pipeline("sliding", broker.bootstrap_servers(), &sdir, sliding, ""));
    let mut expected: BTreeMap<(i64, String), (i64, BTreeSet<String>)> = BTreeMap::new();
    for (t, user, page, _) in &valid {
        let last = t.div_euclid(5_000_000) * 5_000_000;
        for s in [last - 5_000_000, last] {
            if s + 10_000_000 <= watermark {
                let e = expected.entry((s, page.clone())).or_default();
                e.0 += 1;
                e.1.insert(user.clone());
            }
        }
    }
    let expected: BTreeMap<(i64, String), (i64, i64)> = expected.into_iter().map(|(k, (n, u))| (k, (n, u.len() as i64))).collect();
    let read_sliding = || {
        let mut got = BTreeMap::new();
        for b in read(&sdir.join("out"), None) {
            for i in 0..b.num_rows() {
                assert_eq!(time_col(&b, "window_end", i) - time_col(&b, "window_start", i), 10_000_000);
                let k = (time_col(&b, "window_start", i), str_col(&b, "page_url", i));
                assert!(got.insert(k, (int_col(&b, "events", i), int_col(&b, "distinct_users", i))).is_none());
            }
        }
        got
    };
    wait_for("sliding windows", Duration::from_secs(60), || read_sliding().len() >= expected.len());
    running.stop().unwrap();
    assert_eq!(read_sliding(), expected);

    // Sessions per user, gap 2 s.
    let session = r#"
name = "sessions"
window = { session = "2s" }
group_by = ["user_id"]
aggregates = [
  { name = "events", fn = "count" },
  { name = "pages_visited", fn = "count_distinct", field = "page_url" },
  { name = "landing_page", fn = "first", field = "page_url" },
]
"#;
    let xdir = dir.path().join("sessions");
    let running = start(&pipeline("sessions", broker.bootstrap_servers(), &xdir, session, ""));
    let gap = 2_000_000;
    let mut per_user: BTreeMap<String, Vec<(i64, String)>> = BTreeMap::new();
    for (t, user, page, _) in &valid {
        per_user.entry(user.clone()).or_default().push((*t, page.clone()));
    }
    // (user, start) → (end, events, pages, landing page)
    let mut expected: BTreeMap<(String, i64), (i64, i64, i64, String)> = BTreeMap::new();
    for (user, mut evs) in per_user {
        evs.sort();
        let mut sessions: Vec<Session> = Vec::new();
        for (t, page) in evs {
            match sessions.last_mut() {
                Some((_, end, list)) if t < *end => {
                    *end = (*end).max(t + gap);
                    list.push((t, page));
                }
                _ => sessions.push((t, t + gap, vec![(t, page)])),
            }
        }
        for (s, e, list) in sessions.into_iter().filter(|(_, e, _)| *e <= watermark) {
            let pages: BTreeSet<&String> = list.iter().map(|(_, p)| p).collect();
            // First by event time; ties by the value (the accumulator's documented tie-break).
            let landing = list.iter().min_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1))).unwrap().1.clone();
            expected.insert((user.clone(), s), (e, list.len() as i64, pages.len() as i64, landing));
        }
    }
    assert!(expected.len() > 50);
    let read_sessions = || {
        let mut got = BTreeMap::new();
        for b in read(&xdir.join("out"), None) {
            for i in 0..b.num_rows() {
                let (s, e) = (time_col(&b, "session_start", i), time_col(&b, "session_end", i));
                assert_eq!(float_col(&b, "duration", i), Some((e - s) as f64 / 1e6));
                let k = (str_col(&b, "user_id", i), s);
                let v = (e, int_col(&b, "events", i), int_col(&b, "pages_visited", i), str_col(&b, "landing_page", i));
                assert!(got.insert(k, v).is_none());
            }
        }
        got
    };
    wait_for("sessions", Duration::from_secs(60), || read_sessions().len() >= expected.len());
    running.stop().unwrap();
    assert_eq!(read_sessions(), expected);
}

/// Complete mode: running totals per page over all input (global window), the table replaced
/// each epoch; and a resetting global window (per 10 s "period" is not a calendar unit, so
/// this uses hour: all events fall in one or two hours).
#[test]
fn complete_mode_and_running_totals() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), PARTITIONS)]).unwrap();
    let events = plan(31, 0, 4_000, 0.0, 0.0);
    produce(broker.bootstrap_servers(), &events);
    let valid = valid(&events);

    let complete = r#"
name = "totals"
window = { global = true }
group_by = ["page_url"]
aggregates = [ { name = "events", fn = "count" }, { name = "last_action", fn = "last", field = "action" } ]
output = "complete"
"#;
    let cdir = dir.path().join("complete");
    let running = start(&pipeline("complete", broker.bootstrap_servers(), &cdir, complete, ""));
    let mut expected: BTreeMap<String, (i64, (i64, String))> = BTreeMap::new();
    for (t, _, page, action) in &valid {
        let e = expected.entry(page.clone()).or_insert((0, (i64::MIN, String::new())));
        e.0 += 1;
        e.1 = e.1.clone().max((*t, action.clone()));
    }
    let expected: BTreeMap<String, (i64, String)> = expected.into_iter().map(|(k, (n, (_, a)))| (k, (n, a))).collect();
    let read_totals = |version: Option<i64>| {
        let mut got = BTreeMap::new();
        for b in read(&cdir.join("out"), version) {
            for i in 0..b.num_rows() {
                assert!(got
                    .insert(str_col(&b, "page_url", i), (int_col(&b, "events", i), str_col(&b, "last_action", i)))
                    .is_none());
            }
        }
        got
    };
    wait_for("complete totals", Duration::from_secs(60), || read_totals(None) == expected);
    running.stop().unwrap();
    assert_eq!(read_totals(None), expected);

    // Daily (here: hourly) running totals in update mode.
    let daily = r#"
name = "hourly"
window = { global = true, reset = "hour" }
group_by = ["page_url"]
aggregates = [ { name = "events", fn = "count" } ]
output = "update"
"#;
    let ddir = dir.path().join("hourly");
    let running = start(&pipeline("hourly", broker.bootstrap_servers(), &ddir, daily, ""));
    let mut expected: BTreeMap<(i64, String), i64> = BTreeMap::new();
    for (t, _, page, _) in &valid {
        *expected.entry((t.div_euclid(3_600_000_000) * 3_600_000_000, page.clone())).or_default() += 1;
    }
    let read_hourly = || {
        let mut got = BTreeMap::new();
        for b in read(&ddir.join("out"), None) {
            for i in 0..b.num_rows() {
                assert_eq!(time_col(&b, "window_end", i) - time_col(&b, "window_start", i), 3_600_000_000);
                assert!(got
                    .insert((time_col(&b, "window_start", i), str_col(&b, "page_url", i)), int_col(&b, "events", i))
                    .is_none());
            }
        }
        got
    };
    wait_for("hourly totals", Duration::from_secs(60), || read_hourly() == expected);
    running.stop().unwrap();
}

/// allowed_lateness in update mode: an event behind the watermark but within the bound updates
/// its window (the corrected row is upserted); one beyond it is a `late` dead letter naming the
/// window it missed; the sink's index forgets the window once it is closed.
#[test]
fn lateness_inside_the_bound_updates_and_beyond_it_is_a_dead_letter() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), 1)]).unwrap();
    let query = r#"
name = "late"
window = { tumbling = "10s" }
group_by = ["page_url"]
aggregates = [ { name = "events", fn = "count" } ]
output = "update"
allowed_lateness = "30s"
"#;
    let toml = pipeline("late", broker.bootstrap_servers(), dir.path(), query, "");
    let running = start(&toml);
    let t0 = 1_795_392_000_000i64; // ms
    let ev = |ms: i64| {
        format!(
            r#"{{"user_id":"u","page_url":"/p","action":"view","timestamp":"{}"}}"#,
            chrono::DateTime::from_timestamp_millis(t0 + ms).unwrap().to_rfc3339()
        )
    };
    let send = |ms: i64| {
        let p = tidemark::source::producer::EventProducer::connect(broker.bootstrap_servers()).unwrap();
        p.send(TOPIC, Some(0), b"u", ev(ms).as_bytes()).unwrap();
        p.flush(Duration::from_secs(10)).unwrap();
    };
    let count_of = |start_ms: i64| -> Option<i64> {
        read(&dir.path().join("out"), None)
            .iter()
            .flat_map(|b| (0..b.num_rows()).map(move |i| (time_col(b, "window_start", i), int_col(b, "events", i))))
            .find(|(s, _)| *s == (t0 + start_ms) * 1000)
            .map(|(_, n)| n)
    };
    send(1_000); // window [0, 10s)
    send(25_000); // watermark → 22 s: window [0,10s) ended but is open for 30 s more
    wait_for("first window", Duration::from_secs(30), || count_of(0) == Some(1));
    wait_for("the watermark to pass the window's end", Duration::from_secs(30), || {
        running.stats().watermark.is_some_and(|w| w >= (t0 + 22_000) * 1000)
    });
    send(2_000); // late by 20 s, within allowed_lateness: corrected row upserted
    wait_for("the corrected row", Duration::from_secs(30), || count_of(0) == Some(2));
    send(60_000); // watermark → 57 s ≥ 10 s + 30 s: window [0, 10s) closed for good
    wait_for("the watermark to pass the allowed lateness", Duration::from_secs(30), || {
        running.stats().watermark.is_some_and(|w| w >= (t0 + 57_000) * 1000)
    });
    // The sink's upsert index keeps the keys of open windows only: [20 s, 30 s) and
    // [60 s, 70 s) are open until the watermark passes their end + 30 s; [0, 10 s) is closed.
    let indexed_keys = || running.stats().sink_indexed_keys[0];
    wait_for("the index to drop the closed window", Duration::from_secs(30), || indexed_keys() == 2);
    send(3_000); // beyond the bound
    wait_for("the late dead letter", Duration::from_secs(30), || {
        !common::read_dead_letters(&dir.path().join("dlq")).is_empty()
    });
    running.stop().unwrap();
    assert_eq!(count_of(0), Some(2));
    let dl = read(&dir.path().join("dlq"), None);
    let b = &dl[0];
    assert_eq!(str_col(b, "reason", 0), "late");
    let error = str_col(b, "error", 0);
    assert!(
        error.contains("window [2026-11-23T00:00:00") && error.contains("allowed_lateness 30s"),
        "{error}"
    );
}
