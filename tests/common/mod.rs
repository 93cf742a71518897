//! Shared test helpers: seeded event plans, an independent oracle, Delta read-back.
//!
//! The oracle does not use tidemark's decoder, window code or time parser: it reads each
//! generated payload with serde_json and chrono and groups with a BTreeMap over the whole input.
#![allow(dead_code)]

pub mod kafka;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::datatypes::{DataType, Float64Type, Int64Type, TimestampMicrosecondType};
use deltalake::arrow::util::display::array_value_to_string;
use tidemark::source::generator::{ClickGenerator, ClickGeneratorSettings, EventKind, GeneratedEvent};
use tidemark::source::producer::EventProducer;

pub const TOPIC: &str = "clicks";
pub const PARTITIONS: i32 = 4;
/// 2026-11-23T00:00:00Z
pub const T0_MS: i64 = 1_795_392_000_000;
pub const STEP_MS: i64 = 5;
pub const WINDOW_MS: i64 = 5_000;
pub const DELAY_MS: i64 = 3_000;

/// One produced event and where it went.
#[derive(Debug, Clone)]
pub struct Sent {
    pub partition: i32,
    pub event: GeneratedEvent,
}

/// Generates `count` events with synthetic event times continuing from `first_seq`.
pub fn plan(seed: u64, first_seq: i64, count: i64, late_share: f64, malformed_share: f64) -> Vec<Sent> {
    let mut g = ClickGenerator::new(ClickGeneratorSettings {
        seed,
        users: 200,
        pages: 12,
        disorder_ms: 2_000,
        late_share,
        late_by_ms: 3_600_000,
        malformed_share,
    });
    (first_seq..first_seq + count)
        .map(|seq| Sent {
            partition: (seq % PARTITIONS as i64) as i32,
            event: g.next_event(T0_MS + seq * STEP_MS),
        })
        .collect()
}

/// An event time (ms since the epoch) as the generators write it: RFC 3339, UTC, millis.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Logs to stderr when RUST_LOG is set (see them with `cargo test -- --nocapture`).
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        tidemark::telemetry::init_logging(false);
    }
}

pub fn produce(bootstrap: &str, events: &[Sent]) {
    produce_to(bootstrap, TOPIC, events);
}

/// A producer; a broker busy with other clients (a test's processes restoring, committing)
/// may miss the first metadata requests, so connecting is tried three times.
pub fn connect_producer(bootstrap: &str) -> EventProducer {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match EventProducer::connect(bootstrap) {
            Ok(p) => return p,
            Err(e) if attempt < 3 => eprintln!("producer: {e}; connecting again"),
            Err(e) => panic!("producer: {e}"),
        }
    }
}

pub fn produce_to(bootstrap: &str, topic: &str, events: &[Sent]) {
    let p = connect_producer(bootstrap);
    for s in events {
        p.send(topic, Some(s.partition), &s.event.key, &s.event.payload).expect("send");
    }
    p.flush(Duration::from_secs(120)).expect("flush");
}

/// [`pipeline_toml`] reading the clicks from `topic` instead of [`TOPIC`].
pub fn pipeline_toml_on(topic: &str, name: &str, bootstrap: &str, dir: &Path, shards: usize) -> String {
    let default = format!("topic = \"{TOPIC}\"\n");
    let toml = pipeline_toml(name, bootstrap, dir, shards);
    assert!(toml.contains(&default), "pipeline_toml changed its source block");
    toml.replace(&default, &format!("topic = \"{topic}\"\n"))
}

pub fn pipeline_toml(name: &str, bootstrap: &str, dir: &Path, shards: usize) -> String {
    format!(
        r#"
[pipeline]
name = "{name}"
state_dir = "{state}"
commit_interval = "200ms"
shards = {shards}
progress_interval = "2s"

[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{name}"

[[sources]]
name = "clicks"
topic = "{TOPIC}"
partitions = {PARTITIONS}
event_time = {{ field = "timestamp" }}
watermark = {{ delay = "{DELAY_MS}ms", idle_timeout = "1h" }}
on_error = "dlq"
schema = {{ user_id = "string", page_url = "string", action = "string", timestamp = "timestamp" }}

[[queries]]
name = "views"
from = "clicks"
window = {{ tumbling = "{WINDOW_MS}ms" }}
group_by = ["page_url"]
aggregates = [ {{ name = "view_count", fn = "count" }} ]
sink = "views"

[[sinks]]
name = "views"
kind = "delta"
path = "{views}"

[[sinks]]
name = "dlq"
kind = "delta"
path = "{dlq}"

[metrics]
listen = "127.0.0.1:0"
"#,
        state = dir.join("state").display(),
        views = dir.join("views").display(),
        dlq = dir.join("dlq").display(),
    )
}

/// [`pipeline_toml`] with the click source reading JSON-lines files dropped into `inbox`
/// instead of a Kafka topic (the `[kafka]` section is then unused).
pub fn file_pipeline_toml(name: &str, inbox: &Path, dir: &Path, shards: usize) -> String {
    let kafka_source = format!("topic = \"{TOPIC}\"\npartitions = {PARTITIONS}\n");
    let file_source = format!("kind = \"files\"\npath = \"{}\"\nsettle = \"5s\"\n", inbox.display());
    let toml = pipeline_toml(name, "unused:9092", dir, shards);
    assert!(toml.contains(&kafka_source), "pipeline_toml changed its source block");
    toml.replace(&kafka_source, &file_source)
}

/// (window_start µs, page_url) → count
pub type Rows = BTreeMap<(i64, String), i64>;

fn event_time_us(payload: &[u8]) -> Option<(i64, String)> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let ts = chrono::DateTime::parse_from_rfc3339(v.get("timestamp")?.as_str()?).ok()?;
    Some((ts.timestamp_micros(), v.get("page_url")?.as_str()?.to_string()))
}

/// The pipeline watermark once every event is read: min over partitions of max event time − delay.
pub fn final_watermark_us(events: &[Sent]) -> i64 {
    let mut max: BTreeMap<i32, i64> = BTreeMap::new();
    for s in events {
        if let Some((t, _)) = event_time_us(&s.event.payload) {
            let m = max.entry(s.partition).or_insert(i64::MIN);
            *m = (*m).max(t);
        }
    }
    assert_eq!(max.len(), PARTITIONS as usize, "every partition got events");
    max.values().min().unwrap() - DELAY_MS * 1000
}

/// The watermark of a file source once every event is read: one clock over all the events
/// it accepted (malformed ones never move it).
pub fn file_watermark_us(events: &[Sent]) -> i64 {
    let max_t = events
        .iter()
        .filter(|s| matches!(s.event.kind, tidemark::source::generator::EventKind::Valid))
        .map(|s| {
            let v: serde_json::Value = serde_json::from_slice(&s.event.payload).unwrap();
            chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str().unwrap())
                .unwrap()
                .timestamp_micros()
        })
        .max()
        .unwrap();
    max_t - DELAY_MS * 1000
}

/// Expected table: on-time valid events, grouped per 5 s window and page, windows closed by `watermark`.
pub fn oracle(events: &[Sent], watermark_us: i64) -> Rows {
    let mut rows = Rows::new();
    let w = WINDOW_MS * 1000;
    for s in events.iter().filter(|s| matches!(s.event.kind, EventKind::Valid)) {
        let (t, page) = event_time_us(&s.event.payload).expect("valid events parse");
        let start = t.div_euclid(w) * w;
        if start + w <= watermark_us {
            *rows.entry((start, page)).or_default() += 1;
        }
    }
    rows
}

pub fn read_views(dir: &Path) -> Vec<(i64, String, i64)> {
    let batches = read(dir);
    let mut out = Vec::new();
    for b in &batches {
        let start = b.column_by_name("window_start").unwrap().as_primitive::<TimestampMicrosecondType>();
        let end = b.column_by_name("window_end").unwrap().as_primitive::<TimestampMicrosecondType>();
        let page = b.column_by_name("page_url").unwrap().as_string::<i32>();
        let n = b.column_by_name("view_count").unwrap().as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            assert_eq!(end.value(i) - start.value(i), WINDOW_MS * 1000);
            out.push((start.value(i), page.value(i).to_string(), n.value(i)));
        }
    }
    out.sort();
    out
}

/// Dead letters as (reason, payload), sorted.
pub fn read_dead_letters(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for b in &read(dir) {
        let reason = b.column_by_name("reason").unwrap().as_string::<i32>();
        let payload = b.column_by_name("payload").unwrap().as_binary::<i32>();
        let error = b.column_by_name("error").unwrap().as_string::<i32>();
        for i in 0..b.num_rows() {
            assert!(!error.is_null(i) && !error.value(i).is_empty());
            out.push((reason.value(i).to_string(), payload.value(i).to_vec()));
        }
    }
    out.sort();
    out
}

pub fn expected_dead_letters(events: &[Sent]) -> Vec<(String, Vec<u8>)> {
    use tidemark::source::generator::MalformedKind;
    let mut out: Vec<(String, Vec<u8>)> = events
        .iter()
        .filter_map(|s| {
            let reason = match &s.event.kind {
                EventKind::Valid => return None,
                EventKind::VeryLate => "late",
                EventKind::Malformed(MalformedKind::NotJson) => "decode",
                EventKind::Malformed(MalformedKind::BadTimestamp) => "event_time",
                EventKind::Malformed(MalformedKind::WrongType) => "schema",
                // Missing "timestamp" is an event-time problem; missing "page_url" a schema one.
                EventKind::Malformed(MalformedKind::MissingField) => {
                    let v: serde_json::Value = serde_json::from_slice(&s.event.payload).unwrap();
                    if v.get("timestamp").is_none() {
                        "event_time"
                    } else {
                        "schema"
                    }
                }
            };
            Some((reason.to_string(), s.event.payload.clone()))
        })
        .collect();
    out.sort();
    out
}

pub fn as_rows(read: &[(i64, String, i64)]) -> Rows {
    let rows: Rows = read.iter().map(|(s, p, n)| ((*s, p.clone()), *n)).collect();
    assert_eq!(rows.len(), read.len(), "duplicate (window, page) rows in the table");
    rows
}

fn read(dir: &Path) -> Vec<RecordBatch> {
    if !dir.join("_delta_log").exists() {
        return Vec::new();
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(tidemark::sink::delta::read_table(dir, None)).expect("read delta table")
}

/// Polls `check` until it returns true or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every row of a Delta table as column → displayed value (timestamps as µs, NULL as "NULL").
pub fn rows(table: &Path) -> Vec<BTreeMap<String, String>> {
    if !table.join("_delta_log").exists() {
        return Vec::new();
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let batches: Vec<RecordBatch> = rt.block_on(tidemark::sink::delta::read_table(table, None)).unwrap();
    let mut out = Vec::new();
    for b in &batches {
        for i in 0..b.num_rows() {
            let mut row = BTreeMap::new();
            for (f, c) in b.schema().fields().iter().zip(b.columns()) {
                let v = if c.is_null(i) {
                    "NULL".to_string()
                } else {
                    match c.data_type() {
                        DataType::Timestamp(..) => c.as_primitive::<TimestampMicrosecondType>().value(i).to_string(),
                        DataType::Float64 => c.as_primitive::<Float64Type>().value(i).to_string(),
                        _ => array_value_to_string(c, i).unwrap(),
                    }
                };
                row.insert(f.name().clone(), v);
            }
            out.push(row);
        }
    }
    out
}

/// Every row of a table as the listed columns, sorted (a multiset).
pub fn sorted_rows(table: &Path, columns: &[&str]) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = rows(table).into_iter().map(|r| columns.iter().map(|c| r[*c].clone()).collect()).collect();
    out.sort();
    out
}

/// Starts `tidemark broker` with these topics (`name:partitions`) as a child process; returns
/// it and its address.
pub fn start_broker(dir: &Path, topics: &[String]) -> (std::process::Child, String) {
    let addr_file = dir.join("broker.addr");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tidemark"))
        .arg("broker")
        .args(topics.iter().flat_map(|t| ["--topic", t.as_str()]))
        .arg("--address-file")
        .arg(&addr_file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut addr = String::new();
    wait_for("the broker address file", Duration::from_secs(20), || {
        addr = std::fs::read_to_string(&addr_file).unwrap_or_default();
        !addr.is_empty()
    });
    (child, addr)
}
