//! A shard run on its own, fed by an in-memory source: no broker, no committer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::config::parse_config;
use crate::source::memory::MemorySource;
use crate::state::EpochWrite;
use crate::telemetry::PipelineStats;
use crate::types::{decode_key, Value};

const SECOND: i64 = 1_000_000;

fn event(key: &str, ts_s: i64) -> Vec<u8> {
    format!(r#"{{"key":"{key}","value":1,"ts":{}}}"#, ts_s).into_bytes()
}

fn config(dir: &std::path::Path) -> Arc<Config> {
    config_with(dir, "")
}

/// The minimal pipeline plus `more` (TOML), event times in epoch seconds, everything under `dir`.
fn config_with(dir: &std::path::Path, more: &str) -> Arc<Config> {
    let text = [include_str!("../../tests/data/minimal.toml"), more]
        .concat()
        .replace("event_time = { field = \"ts\" }", "event_time = { field = \"ts\", format = \"epoch_seconds\" }")
        .replace("./data/minimal/", &format!("{}/", dir.display()));
    let mut config = parse_config(&text).unwrap_or_else(|e| panic!("{e}"));
    config.pipeline.state_dir = dir.join("state");
    Arc::new(config)
}

/// Runs one shard over `source` until it has read `expect_read` records more than it had
/// stored, closing epoch `epoch` once right away and epoch `epoch + 1` (the last) after
/// reading. Returns the two epoch reports.
fn run_one_shard(config: &Arc<Config>, store: &Arc<StateStore>, source: MemorySource, epoch: u64, expect_read: u64) -> Vec<EpochReport> {
    run_shard_over(config, store, vec![source], epoch, expect_read).0
}

/// [`run_one_shard`] over several sources; also returns the shard's late count per query.
fn run_shard_over(config: &Arc<Config>, store: &Arc<StateStore>, sources: Vec<MemorySource>, epoch: u64, expect_read: u64) -> (Vec<EpochReport>, Vec<u64>) {
    let plan = Arc::new(Plan::new(config).unwrap());
    let stats = Arc::new(PipelineStats::new(1, config.queries.len(), plan.sinks.len()));
    let (control_tx, control_rx) = flume::unbounded();
    let (report_tx, report_rx) = flume::unbounded();
    let ctx = ShardContext {
        id: 0,
        shards: 1,
        config: config.clone(),
        bootstrap: String::new(),
        store: store.clone(),
        plan,
        key_groups: store.key_groups(),
        recovered: Arc::new(store.recover().unwrap()),
        sources: sources.into_iter().map(SourceSpec::Memory).collect(),
        inbound: Vec::new(),
        outbound: vec![None],
        control: control_rx,
        reports: report_tx,
        stats: stats.clone(),
        abort: Arc::new(AtomicBool::new(false)),
    };
    let shard = glommio::LocalExecutorBuilder::default()
        .spawn(move || async move { run_shard(ctx).await })
        .unwrap();
    control_tx.send(Control::Barrier { epoch, last: false }).unwrap();
    let first = report_rx.recv_timeout(Duration::from_secs(20)).expect("first epoch report");
    let deadline = Instant::now() + Duration::from_secs(20);
    let read = || stats.shards[0].partitions().iter().map(|p| p.received.load(Relaxed)).sum::<u64>();
    while read() < expect_read {
        assert!(Instant::now() < deadline, "the shard read {} of {expect_read} records", read());
        std::thread::sleep(Duration::from_millis(2));
    }
    control_tx.send(Control::Barrier { epoch: epoch + 1, last: true }).unwrap();
    let second = report_rx.recv_timeout(Duration::from_secs(20)).expect("last epoch report");
    shard.join().unwrap().unwrap();
    let late = stats.shards[0].late_by_query.iter().map(|n| n.load(Relaxed)).collect();
    (vec![first, second], late)
}

/// (window start, key) → count from the rows of some reports.
fn counts(reports: &[EpochReport]) -> BTreeMap<(i64, String), i64> {
    let mut out = BTreeMap::new();
    for r in reports {
        for rows in r.outputs.iter().flatten() {
            let SinkRows::Windows(rows) = rows else { panic!("window rows expected") };
            for row in rows {
                let Value::Str(key) = decode_key(&row.key).unwrap().remove(0) else {
                    panic!("string key")
                };
                let Value::Int(n) = row.values[0] else { panic!("int count") };
                assert!(out.insert((row.window_start, key), n).is_none(), "a window emitted twice");
            }
        }
    }
    out
}

/// Flushes a report's state changes and positions as the committer would.
fn flush(store: &StateStore, config: &Config, report: &EpochReport) {
    store
        .write_epoch(&EpochWrite {
            epoch: report.epoch,
            watermark: report.watermark,
            query_watermarks: config
                .queries
                .iter()
                .map(|q| q.name.as_str())
                .zip(report.query_watermarks.iter().copied())
                .collect(),
            changes: report.writes.iter().map(|(t, w)| (*t, w)).collect(),
            positions: report.positions.partitions.iter().collect(),
            file_positions: Vec::new(),
            pending: Vec::new(),
        })
        .unwrap();
}

#[test]
fn a_shard_reads_an_in_memory_source_closes_windows_and_resumes_from_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let plan = Plan::new(&config).unwrap();
    // Two partitions, event times 0..=99 s, keys a and b; then more up to 130 s.
    let part = |p: i64, range: std::ops::Range<i64>| {
        range
            .filter(|t| t % 2 == p)
            .map(|t| event(if t % 3 == 0 { "a" } else { "b" }, t))
            .collect::<Vec<_>>()
    };
    let first: Vec<Vec<Vec<u8>>> = vec![part(0, 0..100), part(1, 0..100)];
    let all: Vec<Vec<Vec<u8>>> = vec![part(0, 0..131), part(1, 0..131)];
    let mut expected: BTreeMap<(i64, String), i64> = BTreeMap::new();
    for t in 0..131i64 {
        *expected
            .entry(((t / 10) * 10 * SECOND, if t % 3 == 0 { "a" } else { "b" }.to_string()))
            .or_default() += 1;
    }

    let store = Arc::new(StateStore::open(&config.pipeline.state_dir, 1, &plan.layout.names).unwrap());
    let reports = run_one_shard(&config, &store, MemorySource::new(0, "mem", first), 1, 100);
    let positions: Vec<(i32, i64)> = reports[1].positions.partitions.iter().map(|p| (p.partition, p.next_offset)).collect();
    assert_eq!(positions, [(0, 50), (1, 50)]);
    // Watermark: the min over the partitions of their newest event time (no delay), 98 s: the
    // windows up to [80, 90) closed; [90, 100) is open state.
    assert_eq!(reports[1].watermark, 98 * SECOND);
    let emitted = counts(&reports);
    assert_eq!(
        emitted,
        expected
            .iter()
            .filter(|((start, _), _)| *start < 90 * SECOND)
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    );
    assert!(reports[1].writes.iter().any(|(_, w)| !w.puts.is_empty()), "the open window is written to state");
    for r in &reports {
        flush(&store, &config, r);
    }
    drop(reports);

    // The same partitions, longer: the shard resumes after what it read, with the open
    // window restored, and emits only what closes now.
    let reports = run_one_shard(&config, &store, MemorySource::new(0, "mem", all), 3, 31);
    assert_eq!(reports[1].watermark, 129 * SECOND);
    let later = counts(&reports);
    assert_eq!(
        later,
        expected
            .iter()
            .filter(|((start, _), _)| (90 * SECOND..120 * SECOND).contains(start))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    );
}

#[test]
fn a_record_is_late_by_its_own_partitions_watermark_from_the_first_event() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let plan = Plan::new(&config).unwrap();
    let store = Arc::new(StateStore::open(&config.pipeline.state_dir, 1, &plan.layout.names).unwrap());
    // No epoch has closed when 5 s arrives behind 100 s (delay 0): its window [0, 10) ended
    // before its partition's watermark, so it is late, however the epochs fall. Partition 1
    // is behind partition 0 and holds the closing watermark back, but its own records are
    // judged by its own watermark: 50 s after 60 s is late, 61 s is not.
    let p0 = vec![event("a", 100), event("b", 5), event("a", 101)];
    let p1 = vec![event("a", 60), event("b", 50), event("a", 61), event("c", 75)];
    let (reports, late) = run_shard_over(&config, &store, vec![MemorySource::new(0, "mem", vec![p0, p1])], 1, 7);
    assert_eq!(late, [2]);
    assert_eq!(reports[1].watermark, 75 * SECOND);
    let emitted = counts(&reports);
    assert_eq!(emitted, BTreeMap::from([((60 * SECOND, "a".to_string()), 2)]));
}

#[test]
fn each_query_closes_windows_at_the_watermark_of_the_sources_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(
        dir.path(),
        r#"
[[sources]]
name = "slow"
topic = "slow"
event_time = { field = "ts" }
schema = { key = "string", value = "int", ts = "timestamp" }

[[queries]]
name = "slow_q"
from = "slow"
window = { tumbling = "10s" }
group_by = ["key"]
aggregates = [ { name = "n", fn = "count" } ]
sink = "slow_out"

[[sinks]]
name = "slow_out"
kind = "delta"
path = "./data/minimal/slow_out"
"#,
    );
    let plan = Plan::new(&config).unwrap();
    let store = Arc::new(StateStore::open(&config.pipeline.state_dir, 1, &plan.layout.names).unwrap());
    let events = MemorySource::new(0, "events", vec![(0..100).map(|t| event("a", t)).collect()]);
    let slow = MemorySource::new(1, "slow", vec![(0..20).map(|t| event("s", t)).collect()]);
    let (reports, _) = run_shard_over(&config, &store, vec![events, slow], 1, 120);
    // The pipeline watermark is the slow source's, but the query on "events" is not held back by it.
    assert_eq!(reports[1].watermark, 19 * SECOND);
    assert_eq!(reports[1].query_watermarks, [99 * SECOND, 19 * SECOND]);
    let mut windows: Vec<(i64, String)> = counts(&reports).into_keys().collect();
    windows.sort();
    let mut expected: Vec<(i64, String)> = (0..9).map(|w| (w * 10 * SECOND, "a".to_string())).chain([(0, "s".to_string())]).collect();
    expected.sort();
    assert_eq!(windows, expected);

    // Restarted, each query resumes at its own watermark.
    for r in &reports {
        flush(&store, &config, r);
    }
    let recovered = store.recover().unwrap();
    assert_eq!(
        (recovered.query_watermark("q"), recovered.query_watermark("slow_q")),
        (Some(99 * SECOND), Some(19 * SECOND))
    );
}

/// An event time days ahead of the clock is a dead letter, not a watermark jump that would
/// make every later real event late; with `max_future = "off"` it is accepted.
#[test]
fn an_event_far_in_the_future_is_refused_not_a_watermark_jump() {
    let future = crate::time::now_micros() / SECOND + 3 * 86_400;
    let events = vec![vec![event("a", 100), event("a", future), event("a", 101)]];
    for guarded in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = (*config_with(dir.path(), "[[sinks]]\nname = \"dlq\"\nkind = \"delta\"\npath = \"./data/minimal/dlq\"\n")).clone();
        config.sources[0].on_error = vec!["dlq".to_string()];
        if !guarded {
            config.sources[0].watermark.max_future = None;
        }
        let config = Arc::new(config);
        let plan = Plan::new(&config).unwrap();
        let store = Arc::new(StateStore::open(&config.pipeline.state_dir, 1, &plan.layout.names).unwrap());
        let (reports, _) = run_shard_over(&config, &store, vec![MemorySource::new(0, "mem", events.clone())], 1, 3);
        let wm = reports[1].watermark;
        let dead: Vec<(DeadLetterReason, i64)> = reports
            .iter()
            .flat_map(|r| r.outputs.iter().flatten())
            .flat_map(|rows| match rows {
                SinkRows::DeadLetters(d) => d.iter().map(|d| (d.reason, d.offset)).collect(),
                SinkRows::Windows(_) => Vec::new(),
            })
            .collect();
        if guarded {
            assert_eq!(
                (wm, dead),
                (101 * SECOND, vec![(DeadLetterReason::EventTime, 1)]),
                "the future event is a dead letter"
            );
        } else {
            // Accepted, it moves the watermark days ahead: the real event after it is late.
            assert_eq!((wm, dead), (future * SECOND, vec![(DeadLetterReason::Late, 2)]));
        }
    }
}
