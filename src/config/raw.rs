//! First pass: read the spanned TOML tree strictly into raw structs.
//!
//! This pass checks everything that can be checked by looking at one table:
//! types, unknown and missing keys, value ranges, defaults. References
//! between tables (query → source, query → sink, ...) are left as located
//! names for the compile step.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use toml::de::DeValue;

use super::duration::format_duration;
use super::model::{
    AggFn, AnomalyJudge, Bootstrap, CalendarUnit, DebeziumFormat, FieldDef, FieldType, FileSourceConfig, Format, GapPolicy, JoinType, LogConfig, MetricsConfig,
    OutputMode, PositionField, SinkKind, StartingOffsets, TimeFormat, WatermarkConfig, WindowConfig,
};
use super::reader::{found, number, At, Fields, Value};

pub(crate) const FIELD_TYPES: [(&str, FieldType); 5] = [
    ("string", FieldType::String),
    ("int", FieldType::Int),
    ("float", FieldType::Float),
    ("bool", FieldType::Bool),
    ("timestamp", FieldType::Timestamp),
];

const TIME_FORMATS: [(&str, TimeFormat); 5] = [
    ("auto", TimeFormat::Auto),
    ("rfc3339", TimeFormat::Rfc3339),
    ("epoch_seconds", TimeFormat::EpochSeconds),
    ("epoch_millis", TimeFormat::EpochMillis),
    ("epoch_micros", TimeFormat::EpochMicros),
];

const CALENDAR_UNITS: [(&str, CalendarUnit); 5] = [
    ("hour", CalendarUnit::Hour),
    ("day", CalendarUnit::Day),
    ("week", CalendarUnit::Week),
    ("month", CalendarUnit::Month),
    ("year", CalendarUnit::Year),
];

const OUTPUT_MODES: [(&str, OutputMode); 3] = [
    ("append", OutputMode::Append),
    ("update", OutputMode::Update),
    ("complete", OutputMode::Complete),
];

/// What a source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SourceKind {
    Kafka,
    Files,
}

/// Keys of a Kafka source that a file source must not have.
const KAFKA_ONLY_KEYS: [&str; 5] = ["topic", "partitions", "starting_offsets", "on_gap", "key"];
/// Keys of a file source that a Kafka source must not have.
const FILES_ONLY_KEYS: [&str; 2] = ["path", "settle"];

const MIN_COMMIT_INTERVAL: Duration = Duration::from_millis(10);

// Defaults for keys that may be left out.
const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// Records per batch sent between shards.
const DEFAULT_EXCHANGE_BATCH: usize = 1024;
/// Batches a channel between two shards holds before the sender pauses its sources.
const DEFAULT_EXCHANGE_CAPACITY: usize = 16;
const DEFAULT_PARTITIONS: u32 = 4;
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Delta log files older than this are deleted at checkpoints. Short: every commit lists the
/// log directory, so its cost grows with the files kept (measured in BENCHMARKS.md).
const DEFAULT_LOG_RETENTION: Duration = Duration::from_secs(3_600);
/// An epoch ends early once its sources have read this many bytes.
const DEFAULT_MAX_EPOCH_BYTES: u64 = 128 * 1024 * 1024;
const MIN_EPOCH_BYTES: u64 = 1024 * 1024;
/// Event times further ahead of the wall clock are dead letters.
const DEFAULT_MAX_FUTURE: Duration = Duration::from_secs(86_400);
const DEFAULT_RATE: u64 = 1000;
const DEFAULT_SEED: u64 = 42;
const DEFAULT_USERS: u32 = 1000;
const DEFAULT_PAGES: u32 = 50;
const DEFAULT_LATE_BY: Duration = Duration::from_secs(3600);
const DEFAULT_SETTLE: Duration = Duration::from_secs(5);
const DEFAULT_METADATA_REFRESH: Duration = Duration::from_secs(30);
const MIN_METADATA_REFRESH: Duration = Duration::from_millis(100);
const DEFAULT_TARGET_FILE_SIZE_BYTES: u64 = 128 << 20;
const DEFAULT_COMPACT_EVERY: u64 = 10;
const DEFAULT_COMPACT_MIN_FILES: usize = 4;
const DEFAULT_CHECKPOINT_INTERVAL: u64 = 10;

#[derive(Debug)]
pub(crate) struct RawConfig {
    pub pipeline: RawPipeline,
    pub kafka: RawKafka,
    pub sources: Vec<RawSource>,
    pub queries: Vec<RawQuery>,
    pub sinks: Vec<RawSink>,
    pub generator: Option<RawGenerator>,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    /// `[scale]`, when present and enabled.
    pub scale: Option<RawScale>,
}

/// `[scale]` as written (the changelog topic's default needs the pipeline name).
#[derive(Debug)]
pub(crate) struct RawScale {
    /// The `[scale]` table's path and line, for the checks made when compiling.
    pub at: At<()>,
    pub changelog_topic: Option<String>,
    pub changelog_replication: i32,
    pub session_timeout: Duration,
    pub standby: bool,
}

#[derive(Debug)]
pub(crate) struct RawPipeline {
    pub name: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub commit_interval: Duration,
    pub shards: usize,
    pub progress_interval: Duration,
    pub exchange_batch: usize,
    pub exchange_capacity: usize,
    pub max_epoch_bytes: u64,
}

#[derive(Debug)]
pub(crate) struct RawKafka {
    pub bootstrap_servers: Bootstrap,
    pub group_id: Option<String>,
    pub options: BTreeMap<String, String>,
    pub metadata_refresh: Duration,
}

#[derive(Debug)]
pub(crate) struct RawSource {
    pub name: Option<At<String>>,
    /// Kafka sources only.
    pub topic: Option<At<String>>,
    /// File sources only; `None` when `path` is missing.
    pub files: Option<FileSourceConfig>,
    pub partitions: u32,
    pub format: Format,
    /// `None` when missing or unreadable; fields that failed to read are left out.
    pub schema: Option<Vec<FieldDef>>,
    pub event_time_field: Option<String>,
    pub event_time_format: TimeFormat,
    pub watermark: WatermarkConfig,
    pub starting_offsets: StartingOffsets,
    /// Dead-letter sinks (`on_error = "dlq"` or a list); empty = none.
    pub on_error: Vec<At<String>>,
    pub on_gap: GapPolicy,
    /// `key = ["user_id"]` (Kafka sources): the fields messages are keyed by.
    pub key: Vec<At<String>>,
}

#[derive(Debug)]
pub(crate) struct RawQuery {
    pub name: Option<At<String>>,
    pub from: Option<At<String>>,
    /// `where = "..."`
    pub filter: Option<At<String>>,
    pub window: Option<RawWindow>,
    /// Whether `window` is written (it may be invalid, so `window` is `None`).
    pub window_written: bool,
    pub group_by: Vec<At<String>>,
    /// `None` when not written.
    pub aggregates: Option<Vec<RawAggregate>>,
    pub derive: Vec<RawDerived>,
    /// `select = [{ name, expr }]`; `None` when not written.
    pub select: Option<Vec<RawDerived>>,
    pub join: Option<RawJoin>,
    pub anomaly: Option<RawAnomaly>,
    /// `apply = { primary_key = [...] }`
    pub apply: Option<RawApply>,
    /// Path and line of the query's table.
    pub at: At<()>,
    /// `None` when absent (append) or invalid (reported; see `output_valid`).
    pub output: Option<At<OutputMode>>,
    pub output_valid: bool,
    pub allowed_lateness: Duration,
    /// The sinks receiving the results (`sink = "a"` or a list); `None` when missing.
    pub sink: Option<Vec<At<String>>>,
}

impl RawQuery {
    /// The output mode, `append` when not written.
    pub fn output_mode(&self) -> OutputMode {
        self.output.as_ref().map_or(OutputMode::Append, |o| o.value)
    }
}

/// `window = { ... }` with a kind.
#[derive(Debug)]
pub(crate) struct RawWindow {
    /// Path and line of the window table.
    pub path: String,
    pub line: Option<usize>,
    /// `None` when a parameter is invalid (reported).
    pub config: Option<WindowConfig>,
    /// Output columns of the window's kind, known even when a parameter is invalid.
    pub columns: &'static [&'static str],
}

#[derive(Debug)]
pub(crate) struct RawAggregate {
    /// Path and line of the aggregate's table, for errors about it as a whole.
    pub at: At<()>,
    pub name: Option<At<String>>,
    pub func: Option<At<AggFn>>,
    pub field: Option<At<String>>,
    pub expr: Option<At<String>>,
    pub filter: Option<At<String>>,
    pub percentile: Option<f64>,
}

/// `join = { source = "purchases", type = "left", on = ["user_id"], between = ["0s", "30m"] }`
#[derive(Debug)]
pub(crate) struct RawJoin {
    pub at: At<()>,
    pub source: Option<At<String>>,
    pub join_type: JoinType,
    pub on: Vec<At<String>>,
    /// `right_on`: the right side's key fields when they are named differently.
    pub right_on: Option<Vec<At<String>>>,
    /// µs, `None` when missing or invalid (reported).
    pub between: Option<(i64, i64)>,
    pub left_as: Option<At<String>>,
    pub right_as: Option<At<String>>,
    /// `where` over the right side's fields.
    pub filter: Option<At<String>>,
}

/// `anomaly = { field = "value", threshold = 3.0, min_count = 10, judge = "trailing" }`
#[derive(Debug)]
pub(crate) struct RawAnomaly {
    pub field: Option<At<String>>,
    pub threshold: f64,
    pub min_count: u64,
    pub judge: AnomalyJudge,
}

/// `apply = { primary_key = ["order_id"] }`
#[derive(Debug)]
pub(crate) struct RawApply {
    /// Empty when missing (reported).
    pub primary_key: Vec<At<String>>,
}

/// `{ name = "ctr", expr = "clicks / views" }`
#[derive(Debug)]
pub(crate) struct RawDerived {
    pub name: Option<At<String>>,
    pub expr: Option<At<String>>,
}

#[derive(Debug)]
pub(crate) struct RawSink {
    pub name: Option<At<String>>,
    pub kind: Option<SinkKind>,
    pub path: Option<PathBuf>,
    pub partition_by: Vec<At<String>>,
    pub target_file_size_bytes: u64,
    pub compact_every: u64,
    pub compact_min_files: usize,
    pub checkpoint_interval: u64,
    pub vacuum_retention: Option<Duration>,
    pub log_retention: Duration,
    /// `kind = "kafka"` only.
    pub kafka: Option<RawKafkaSink>,
}

/// A Kafka sink's own keys.
#[derive(Debug)]
pub(crate) struct RawKafkaSink {
    pub topic: Option<String>,
    pub key: Vec<At<String>>,
    pub bootstrap_servers: Option<String>,
    pub options: BTreeMap<String, String>,
}

#[derive(Debug)]
pub(crate) struct RawGenerator {
    pub source: Option<At<String>>,
    pub rate: u64,
    pub seed: u64,
    pub users: u32,
    pub pages: u32,
    pub disorder: Duration,
    pub late_share: f64,
    pub late_by: Duration,
    pub malformed_share: f64,
    /// `purchases = { source = "purchases", rate = 5 }`
    pub purchases: Option<RawPurchases>,
    /// `family = "orders"` and its settings; `None` for clicks.
    pub orders: Option<super::model::OrdersGeneratorConfig>,
}

/// Purchases by the generator's users into another source, for the demo's join.
#[derive(Debug)]
pub(crate) struct RawPurchases {
    pub source: Option<At<String>>,
    pub rate: u64,
}

/// Purchases a second by default.
const DEFAULT_PURCHASE_RATE: u64 = 5;

fn value_or<T>(taken: Option<At<T>>, default: T) -> T {
    taken.map_or(default, |at| at.value)
}

/// Reads the whole document. Problems go to the diagnostics behind `root`.
pub(crate) fn read_config(mut root: Fields<'_, '_>) -> RawConfig {
    let pipeline = root.take_table_or_empty("pipeline").map(read_pipeline).unwrap_or_else(|| RawPipeline {
        name: None,
        state_dir: None,
        commit_interval: DEFAULT_COMMIT_INTERVAL,
        shards: 0,
        progress_interval: DEFAULT_PROGRESS_INTERVAL,
        exchange_batch: DEFAULT_EXCHANGE_BATCH,
        exchange_capacity: DEFAULT_EXCHANGE_CAPACITY,
        max_epoch_bytes: DEFAULT_MAX_EPOCH_BYTES,
    });
    let kafka = root.take_table_or_empty("kafka").map(read_kafka).unwrap_or(RawKafka {
        bootstrap_servers: Bootstrap::Embedded,
        group_id: None,
        options: BTreeMap::new(),
        metadata_refresh: DEFAULT_METADATA_REFRESH,
    });
    let sources = read_list(&mut root, "sources", "source", read_source);
    let queries = read_list(&mut root, "queries", "query", read_query);
    let sinks = read_list(&mut root, "sinks", "sink", read_sink);
    let generator = root.take_table("generator").map(read_generator);
    let metrics = root.take_table("metrics").map(read_metrics).unwrap_or_default();
    let log = root.take_table("log").map(read_log).unwrap_or_default();
    let scale = root.take_table("scale").and_then(read_scale);
    root.finish();
    RawConfig {
        pipeline,
        kafka,
        sources,
        queries,
        sinks,
        generator,
        metrics,
        log,
        scale,
    }
}

/// A process silent this long loses its tasks, unless `[scale] session_timeout` says otherwise.
const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);

fn read_scale(mut f: Fields<'_, '_>) -> Option<RawScale> {
    let at = At {
        value: (),
        path: f.path().to_string(),
        line: f.line(),
    };
    let enabled = f.take_bool("enabled").is_none_or(|b| b.value);
    let changelog_topic = f.take_str("changelog_topic").map(|t| t.value);
    let changelog_replication = f.take_int("changelog_replication", 1, i16::MAX as u64).map_or(-1, |n| n.value as i32);
    let standby = f.take_bool("standby").is_some_and(|b| b.value);
    let session_timeout = match f.take_duration("session_timeout") {
        Some(d) if d.value < Duration::from_secs(1) || d.value > Duration::from_secs(3600) => {
            f.report_at(
                f.key_path("session_timeout"),
                d.line,
                "must be between 1s and 1h (Kafka brokers bound it further with group.min/max.session.timeout.ms)".to_string(),
            );
            DEFAULT_SESSION_TIMEOUT
        }
        d => value_or(d, DEFAULT_SESSION_TIMEOUT),
    };
    f.finish();
    enabled.then_some(RawScale {
        at,
        changelog_topic,
        changelog_replication,
        session_timeout,
        standby,
    })
}

/// Reads a required, non-empty array of tables such as `[[sources]]`.
fn read_list<'a, 'i, T>(root: &mut Fields<'a, 'i>, key: &'static str, noun: &str, read: impl Fn(Fields<'a, 'i>) -> T) -> Vec<T> {
    let value = root.take_value(key);
    let required = || format!("at least one {noun} is required; add a [[{key}]] table");
    let Some(value) = value else {
        root.report_at(key, None, required());
        return Vec::new();
    };
    let line = root.line_of(value);
    let Some(tables) = root.take_tables(key) else {
        return Vec::new(); // not an array of tables; already reported
    };
    if tables.is_empty() {
        root.report_at(key, line, required());
    }
    tables.into_iter().map(read).collect()
}

fn read_pipeline(mut f: Fields<'_, '_>) -> RawPipeline {
    let name = f.require("name", Fields::take_str).and_then(|name| {
        let valid = name.value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) && !matches!(name.value.as_str(), "." | "..");
        if valid {
            Some(name.value)
        } else {
            f.report_at(
                name.path,
                name.line,
                format!(
                    "invalid pipeline name \"{}\": use only letters, digits, '_', '.' and '-' (it names directories and the consumer group)",
                    name.value
                ),
            );
            None
        }
    });
    let state_dir = f.take_str("state_dir").map(|s| PathBuf::from(s.value));
    let commit_interval = f.take_duration("commit_interval").and_then(|d| {
        if d.value < MIN_COMMIT_INTERVAL {
            f.report_at(
                d.path,
                d.line,
                "must be at least 10ms; commits this frequent would cost more than the work between them".to_string(),
            );
            None
        } else {
            Some(d.value)
        }
    });
    let shards = f.take_int("shards", 0, 1024).map(|n| n.value as usize);
    let progress_interval = f.take_duration("progress_interval").and_then(|d| {
        if d.value.is_zero() {
            f.report_at(d.path, d.line, "must be greater than 0s".to_string());
            None
        } else {
            Some(d.value)
        }
    });
    let exchange_batch = f.take_int("exchange_batch", 1, 65_536).map(|n| n.value as usize);
    let exchange_capacity = f.take_int("exchange_capacity", 1, 4_096).map(|n| n.value as usize);
    let max_epoch_bytes = f.take_size("max_epoch_bytes").and_then(|size| {
        if size.value < MIN_EPOCH_BYTES {
            f.report_at(size.path, size.line, "must be at least 1MiB, e.g. \"128MiB\"".to_string());
            None
        } else {
            Some(size.value)
        }
    });
    f.finish();
    RawPipeline {
        name,
        state_dir,
        commit_interval: commit_interval.unwrap_or(DEFAULT_COMMIT_INTERVAL),
        shards: shards.unwrap_or(0),
        progress_interval: progress_interval.unwrap_or(DEFAULT_PROGRESS_INTERVAL),
        exchange_batch: exchange_batch.unwrap_or(DEFAULT_EXCHANGE_BATCH),
        exchange_capacity: exchange_capacity.unwrap_or(DEFAULT_EXCHANGE_CAPACITY),
        max_epoch_bytes: max_epoch_bytes.unwrap_or(DEFAULT_MAX_EPOCH_BYTES),
    }
}

/// `options = { "key" = value }`: librdkafka settings, written as strings, integers or booleans.
fn read_librdkafka_options(f: &mut Fields<'_, '_>) -> BTreeMap<String, String> {
    let mut options = BTreeMap::new();
    if let Some((_, entries)) = f.take_entries("options") {
        for entry in entries {
            let text = match entry.value.get_ref() {
                DeValue::String(s) => Some(s.to_string()),
                DeValue::Integer(i) => Some(i.to_string()),
                DeValue::Boolean(b) => Some(b.to_string()),
                _ => None,
            };
            match text {
                Some(text) => {
                    options.insert(entry.key, text);
                }
                None => f.report_at(
                    entry.path,
                    f.line_of(entry.value),
                    found("a string, integer or boolean (librdkafka setting)", entry.value),
                ),
            }
        }
    }
    options
}

fn read_kafka(mut f: Fields<'_, '_>) -> RawKafka {
    let bootstrap_servers = f.take_str("bootstrap_servers").map_or(Bootstrap::Embedded, |s| {
        if s.value == "embedded" {
            Bootstrap::Embedded
        } else {
            Bootstrap::Servers(s.value)
        }
    });
    let group_id = f.take_str("group_id").map(|s| s.value);
    let metadata_refresh = match f.take_duration("metadata_refresh") {
        Some(d) if d.value < MIN_METADATA_REFRESH => {
            f.report_at(
                f.key_path("metadata_refresh"),
                d.line,
                format!(
                    "must be at least {} (each refresh asks the brokers for metadata); raise it",
                    format_duration(MIN_METADATA_REFRESH)
                ),
            );
            DEFAULT_METADATA_REFRESH
        }
        d => value_or(d, DEFAULT_METADATA_REFRESH),
    };
    let options = read_librdkafka_options(&mut f);
    f.finish();
    RawKafka {
        bootstrap_servers,
        group_id,
        options,
        metadata_refresh,
    }
}

fn read_source(mut f: Fields<'_, '_>) -> RawSource {
    let name = f.require("name", Fields::take_str);
    let kind = match f.take_choice("kind", &[("kafka", SourceKind::Kafka), ("files", SourceKind::Files)]) {
        Some(kind) => Some(kind.value),
        None if f.has("kind") => None, // invalid, reported
        None => Some(SourceKind::Kafka),
    };
    // Keys of the other kind get their own message rather than "unknown key".
    let (foreign_keys, advice): (&[&'static str], &str) = match kind {
        Some(SourceKind::Kafka) => (
            &FILES_ONLY_KEYS,
            "applies only to file sources; add kind = \"files\" to read a directory, or remove it",
        ),
        Some(SourceKind::Files) => (&KAFKA_ONLY_KEYS, "applies only to Kafka sources, and this one has kind = \"files\"; remove it"),
        None => (&[], ""),
    };
    for &key in foreign_keys {
        if let Some(value) = f.take_unlisted(key) {
            f.report_at(f.key_path(key), f.line_of(value), format!("\"{key}\" {advice}"));
        }
    }
    let mut topic = None;
    let mut partitions = DEFAULT_PARTITIONS;
    let mut starting_offsets = StartingOffsets::Earliest;
    let mut on_gap = GapPolicy::Fail;
    let mut key = Vec::new();
    let mut files = None;
    if kind != Some(SourceKind::Files) {
        topic = if kind.is_some() {
            f.require("topic", Fields::take_str)
        } else {
            f.take_str("topic")
        };
        partitions = f.take_int("partitions", 1, u64::from(u32::MAX)).map_or(DEFAULT_PARTITIONS, |n| n.value as u32);
        starting_offsets = value_or(
            f.take_choice(
                "starting_offsets",
                &[("earliest", StartingOffsets::Earliest), ("latest", StartingOffsets::Latest)],
            ),
            StartingOffsets::Earliest,
        );
        on_gap = value_or(
            f.take_choice("on_gap", &[("fail", GapPolicy::Fail), ("skip", GapPolicy::Skip)]),
            GapPolicy::Fail,
        );
        key = f.take_str_or_list("key").unwrap_or_default();
    }
    if kind != Some(SourceKind::Kafka) {
        let path = if kind.is_some() {
            f.require("path", Fields::take_str)
        } else {
            f.take_str("path")
        };
        let settle = value_or(f.take_duration("settle"), DEFAULT_SETTLE);
        files = path.map(|path| FileSourceConfig {
            path: PathBuf::from(path.value),
            settle,
        });
    }
    let format_written = f.has("format");
    let format_name = f.take_choice("format", &FORMATS).map(|c| c.value);
    let format = match format_name {
        Some(FormatName::Debezium) => Format::Debezium(DebeziumFormat {
            position: read_position(&mut f),
        }),
        _ => {
            // With an invalid format the format's error is enough.
            if let Some(value) = f.take_unlisted("position").filter(|_| !format_written || format_name.is_some()) {
                f.report_at(
                    f.key_path("position"),
                    f.line_of(value),
                    "\"position\" applies only to Debezium change events; add format = \"debezium\", or remove it".to_string(),
                );
            }
            Format::Json
        }
    };
    let schema = f.require("schema", read_schema);

    let mut event_time_field = None;
    let mut event_time_format = TimeFormat::Auto;
    let debezium = matches!(format, Format::Debezium(_));
    if debezium {
        event_time_format = TimeFormat::EpochMillis;
        if let Some(value) = f.take_unlisted("event_time") {
            f.report_at(
                f.key_path("event_time"),
                f.line_of(value),
                "a Debezium source takes each change's event time from source.ts_ms (else ts_ms) of its envelope; remove event_time".to_string(),
            );
        }
    } else if let Some(mut et) = f.require("event_time", Fields::take_table) {
        let field = et.require("field", Fields::take_str);
        let format = et.take_choice("format", &TIME_FORMATS);
        if let (Some(field), Some(schema)) = (&field, &schema) {
            check_event_time(&et, field, format.as_ref(), schema);
        }
        event_time_field = field.map(|f| f.value);
        event_time_format = value_or(format, TimeFormat::Auto);
        et.finish();
    }

    let mut watermark = WatermarkConfig {
        delay: Duration::ZERO,
        idle_timeout: DEFAULT_IDLE_TIMEOUT,
        max_future: Some(DEFAULT_MAX_FUTURE),
    };
    if let Some(mut w) = f.take_table("watermark") {
        watermark.delay = value_or(w.take_duration("delay"), watermark.delay);
        watermark.idle_timeout = value_or(w.take_duration("idle_timeout"), watermark.idle_timeout);
        if w.has("max_future") && w.take_str("max_future").is_some_and(|s| s.value == "off") {
            watermark.max_future = None;
        } else {
            if let Some(d) = w.take_duration("max_future") {
                watermark.max_future = Some(d.value);
            }
        }
        w.finish();
    }
    let on_error = f.take_str_or_list("on_error").unwrap_or_default();
    f.finish();
    RawSource {
        name,
        topic,
        files,
        partitions,
        format,
        schema,
        event_time_field,
        event_time_format,
        watermark,
        starting_offsets,
        on_error,
        on_gap,
        key,
    }
}

/// Message formats a source may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FormatName {
    Json,
    Debezium,
}

const FORMATS: [(&str, FormatName); 2] = [("json", FormatName::Json), ("debezium", FormatName::Debezium)];

/// The position of a Debezium change unless `position` says otherwise (Postgres).
pub(crate) const DEFAULT_POSITION: &str = "source.lsn";

/// `position = ["source.file", "source.pos", "source.row"]` of a Debezium source: envelope
/// fields, at most one dot each, none of them in a row. Default `["source.lsn"]`.
fn read_position(f: &mut Fields<'_, '_>) -> Vec<PositionField> {
    let default = || vec![PositionField::parse(DEFAULT_POSITION).expect("a valid default")];
    let line = f.take_value("position").and_then(|v| f.line_of(v));
    let Some(paths) = f.take_str_list("position") else {
        return default();
    };
    if paths.is_empty() {
        f.report_at(
            f.key_path("position"),
            line,
            "list at least one envelope field ordering the changes of a key, e.g. position = [\"source.lsn\"] (Postgres) or [\"source.file\", \"source.pos\", \"source.row\"] (MySQL)".to_string(),
        );
        return default();
    }
    let mut fields: Vec<PositionField> = Vec::with_capacity(paths.len());
    for path in &paths {
        let parsed = PositionField::parse(&path.value);
        let problem = match &parsed {
            None => Some(
                "is not a field path: write a field of the change event's payload (\"ts_ms\") or of an object in it (\"source.lsn\"), with at most one dot",
            ),
            Some(p) if ["before", "after", "op"].contains(&p.object.as_deref().unwrap_or(&p.field)) => {
                Some("names the row or the operation; the position must come from the envelope, e.g. \"source.lsn\"")
            }
            Some(p) if fields.contains(p) => Some("is listed twice; list each field once"),
            Some(_) => None,
        };
        match (problem, parsed) {
            (Some(problem), _) => f.report_at(path.path.clone(), path.line, format!("position field \"{}\" {problem}", path.value)),
            (None, Some(p)) => fields.push(p),
            (None, None) => {}
        }
    }
    if fields.is_empty() {
        default()
    } else {
        fields
    }
}

/// `schema = { user_id = "string", ts = "timestamp" }`, in file order.
fn read_schema(f: &mut Fields<'_, '_>, key: &'static str) -> Option<Vec<FieldDef>> {
    let (table, entries) = f.take_entries(key)?;
    if entries.is_empty() {
        f.report_at(
            table.path,
            table.line,
            "the schema must list at least one field, e.g. schema = { user_id = \"string\", ts = \"timestamp\" }".to_string(),
        );
        return None;
    }
    let type_names = FIELD_TYPES.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", ");
    let mut fields = Vec::with_capacity(entries.len());
    let mut all_valid = true;
    for entry in entries {
        let line = f.line_of(entry.value);
        let ty = match entry.value.get_ref().as_str() {
            Some(name) => FIELD_TYPES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|&(_, ty)| ty)
                .ok_or_else(|| format!("unknown field type \"{name}\"; use one of {type_names}")),
            None => Err(found(&format!("a type name ({type_names})"), entry.value)),
        };
        match ty {
            Ok(ty) => fields.push(FieldDef { name: entry.key, ty }),
            Err(message) => {
                all_valid = false;
                f.report_at(entry.path, line, message);
            }
        }
    }
    // A partial schema would only add confusing "not in the schema" errors.
    all_valid.then_some(fields)
}

fn check_event_time(et: &Fields<'_, '_>, field: &At<String>, format: Option<&At<TimeFormat>>, schema: &[FieldDef]) {
    let Some(def) = schema.iter().find(|d| d.name == field.value) else {
        let names: Vec<_> = schema.iter().map(|d| d.name.as_str()).collect();
        et.report_at(
            field.path.clone(),
            field.line,
            format!("event-time field \"{}\" is not in the schema; schema fields: {}", field.value, names.join(", ")),
        );
        return;
    };
    if def.ty == FieldType::Bool {
        et.report_at(
            field.path.clone(),
            field.line,
            format!("event-time field \"{}\" is a bool; use a timestamp, int, float or string field", field.value),
        );
        return;
    }
    if let Some(format) = format {
        if format.value == TimeFormat::Rfc3339 && matches!(def.ty, FieldType::Int | FieldType::Float) {
            et.report_at(
                format.path.clone(),
                format.line,
                format!(
                    "format \"rfc3339\" needs a string or timestamp field, but \"{}\" is {}; use \"epoch_seconds\", \"epoch_millis\", \"epoch_micros\" or \"auto\"",
                    field.value,
                    def.ty.as_str()
                ),
            );
        }
    }
}

fn read_query(mut f: Fields<'_, '_>) -> RawQuery {
    let name = f.require("name", Fields::take_str);
    let from = f.require("from", Fields::take_str);
    let filter = f.take_str("where");
    let at = At {
        value: (),
        path: f.path().to_string(),
        line: f.line(),
    };
    let window_written = f.has("window");
    let window = read_window(&mut f, "window");
    let group_by = f.take_str_list("group_by").unwrap_or_default();
    let aggregates = if f.has("aggregates") {
        Some(read_aggregates(&mut f, "aggregates").unwrap_or_default())
    } else {
        f.take_value("aggregates"); // listed as allowed
        None
    };
    let derive = read_derive(&mut f, "derive");
    let select = f.has("select").then(|| read_derive(&mut f, "select"));
    f.take_value("select"); // listed as allowed
    let join = f.take_table("join").map(read_join);
    let anomaly = f.take_table("anomaly").map(read_anomaly);
    let apply = f.take_table("apply").map(read_apply);
    let output_written = f.has("output");
    let output = f.take_choice("output", &OUTPUT_MODES);
    let output_valid = !output_written || output.is_some();
    let allowed_lateness = value_or(f.take_duration("allowed_lateness"), Duration::ZERO);
    let sink = f.require("sink", Fields::take_str_or_list);
    f.finish();
    RawQuery {
        name,
        from,
        filter,
        window,
        window_written,
        group_by,
        aggregates,
        derive,
        select,
        join,
        anomaly,
        apply,
        at,
        output,
        output_valid,
        allowed_lateness,
        sink,
    }
}

/// The keys naming a window's kind; a window has exactly one.
const WINDOW_KINDS: [&str; 4] = ["tumbling", "sliding", "session", "global"];

/// `window = { tumbling = "5m", offset = "0s" }`, `{ sliding = "10m", slide = "5m" }`,
/// `{ session = "30m" }`, `{ global = true, reset = "day" }`.
fn read_window(f: &mut Fields<'_, '_>, key: &'static str) -> Option<RawWindow> {
    let mut w = f.take_table(key)?;
    let (path, line) = (w.path().to_string(), w.line());
    let present: Vec<&'static str> = WINDOW_KINDS.into_iter().filter(|k| w.has(k)).collect();
    let Some(&kind) = present.first() else {
        for kind in WINDOW_KINDS {
            w.take_value(kind); // listed as allowed
        }
        for param in ["offset", "slide", "reset"] {
            w.take_unlisted(param); // the missing kind is the problem
        }
        w.report_at(
            path,
            line,
            "missing window kind; write one of tumbling = \"5m\", sliding = \"10m\" with slide = \"5m\", session = \"30m\" or global = true".to_string(),
        );
        w.finish();
        return None;
    };
    for &other in &present[1..] {
        if let Some(value) = w.take_unlisted(other) {
            w.report_at(
                w.key_path(other),
                w.line_of(value),
                format!("a window has one kind and this one is {kind}; remove {other} (or {kind})"),
            );
        }
    }
    // Any parameters do: only the column names matter.
    let (config, like) = match kind {
        "tumbling" => (
            read_tumbling(&mut w),
            WindowConfig::Tumbling {
                size: Duration::ZERO,
                offset: Duration::ZERO,
            },
        ),
        "sliding" => (
            read_sliding(&mut w),
            WindowConfig::Sliding {
                size: Duration::ZERO,
                slide: Duration::ZERO,
                offset: Duration::ZERO,
            },
        ),
        "session" => (read_session(&mut w), WindowConfig::Session { gap: Duration::ZERO }),
        _ => {
            let reset = w.has("reset").then_some(CalendarUnit::Day);
            (read_global(&mut w), WindowConfig::Global { reset })
        }
    };
    w.finish();
    Some(RawWindow {
        path,
        line,
        config,
        columns: config.unwrap_or(like).columns(),
    })
}

/// Reports a window parameter written for a kind it does not apply to.
fn forbid_window_param(w: &mut Fields<'_, '_>, key: &'static str, applies_to: &str) {
    if let Some(value) = w.take_unlisted(key) {
        w.report_at(w.key_path(key), w.line_of(value), format!("\"{key}\" applies only to {applies_to}; remove it"));
    }
}

/// `Some(duration)` when it is greater than zero, else reports `what` must be.
fn positive(w: &Fields<'_, '_>, duration: Option<At<Duration>>, what: &str) -> Option<Duration> {
    let duration = duration?;
    if duration.value.is_zero() {
        w.report_at(duration.path, duration.line, format!("{what} must be greater than 0s"));
        return None;
    }
    Some(duration.value)
}

fn read_tumbling(w: &mut Fields<'_, '_>) -> Option<WindowConfig> {
    let size = w.take_duration("tumbling");
    let offset = w.take_duration("offset");
    forbid_window_param(w, "slide", "sliding windows");
    forbid_window_param(w, "reset", "global windows");
    let size = positive(w, size, "the window size")?;
    let offset = check_offset(w, offset, size, "window size")?;
    Some(WindowConfig::Tumbling { size, offset })
}

fn read_sliding(w: &mut Fields<'_, '_>) -> Option<WindowConfig> {
    let size = w.take_duration("sliding");
    let slide = w.require("slide", Fields::take_duration);
    let offset = w.take_duration("offset");
    forbid_window_param(w, "reset", "global windows");
    let size = positive(w, size, "the window size");
    let slide_at = slide.as_ref().map(|s| (s.path.clone(), s.line));
    let slide = positive(w, slide, "the slide");
    let (size, slide) = (size?, slide?);
    if slide > size {
        let (path, line) = slide_at.expect("slide was read");
        w.report_at(
            path,
            line,
            format!(
                "the slide ({}) must not be longer than the window size ({}); for gaps between windows use a shorter size",
                format_duration(slide),
                format_duration(size)
            ),
        );
        return None;
    }
    let offset = check_offset(w, offset, slide, "slide")?;
    Some(WindowConfig::Sliding { size, slide, offset })
}

fn read_session(w: &mut Fields<'_, '_>) -> Option<WindowConfig> {
    let gap = w.take_duration("session");
    forbid_window_param(w, "offset", "tumbling and sliding windows");
    forbid_window_param(w, "slide", "sliding windows");
    forbid_window_param(w, "reset", "global windows");
    let gap = positive(w, gap, "the session gap")?;
    Some(WindowConfig::Session { gap })
}

fn read_global(w: &mut Fields<'_, '_>) -> Option<WindowConfig> {
    let global = w.take_bool("global");
    let reset = w.take_choice("reset", &CALENDAR_UNITS);
    forbid_window_param(w, "offset", "tumbling and sliding windows");
    forbid_window_param(w, "slide", "sliding windows");
    let global = global?;
    if !global.value {
        w.report_at(
            global.path,
            global.line,
            "global = false does not make a window; remove it and use another kind, or set global = true".to_string(),
        );
        return None;
    }
    if w.has("reset") && reset.is_none() {
        return None; // invalid, reported
    }
    Some(WindowConfig::Global { reset: reset.map(|r| r.value) })
}

/// The offset (default 0s) when it is smaller than `period`, the `period_name` it repeats with.
fn check_offset(w: &Fields<'_, '_>, offset: Option<At<Duration>>, period: Duration, period_name: &str) -> Option<Duration> {
    match offset {
        Some(offset) if offset.value >= period => {
            w.report_at(
                offset.path,
                offset.line,
                format!(
                    "the offset ({}) must be smaller than the {period_name} ({})",
                    format_duration(offset.value),
                    format_duration(period)
                ),
            );
            None
        }
        Some(offset) => Some(offset.value),
        None => Some(Duration::ZERO),
    }
}

const JOIN_TYPES: [(&str, JoinType); 4] = [
    ("inner", JoinType::Inner),
    ("left", JoinType::Left),
    ("right", JoinType::Right),
    ("full", JoinType::Full),
];

/// `join = { source, type, on, right_on, between, left_as, right_as, where }`.
fn read_join(mut j: Fields<'_, '_>) -> RawJoin {
    let at = At {
        value: (),
        path: j.path().to_string(),
        line: j.line(),
    };
    let source = j.require("source", Fields::take_str);
    let join_type = value_or(j.take_choice("type", &JOIN_TYPES), JoinType::Inner);
    let on = j.require("on", Fields::take_str_list).unwrap_or_default();
    let right_on = j.take_str_list("right_on");
    let between = j.require("between", |j, key| j.take_with(key, to_interval)).map(|b| b.value);
    let left_as = j.take_str("left_as");
    let right_as = j.take_str("right_as");
    let filter = j.take_str("where");
    j.finish();
    RawJoin {
        at,
        source,
        join_type,
        on,
        right_on,
        between,
        left_as,
        right_as,
        filter,
    }
}

/// `between = ["0s", "30m"]`: two durations, each may start with `-`, the first not after the
/// second; in µs.
fn to_interval(value: &Value<'_>) -> Result<(i64, i64), String> {
    const WHAT: &str = "an array of two durations [lower, upper], e.g. [\"0s\", \"30m\"] (a right row matches when its event time is between the left row's plus lower and plus upper; lower may be negative, e.g. \"-5m\")";
    let items = value.get_ref().as_array().filter(|a| a.len() == 2).ok_or_else(|| format!("expected {WHAT}"))?;
    let mut bounds = [0i64; 2];
    for (bound, item) in bounds.iter_mut().zip(items) {
        let text = item.get_ref().as_str().ok_or_else(|| format!("expected {WHAT}"))?;
        let (negative, magnitude) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let d = super::parse_duration(magnitude).map_err(|e| format!("{e} (in {WHAT})"))?;
        let us = i64::try_from(d.as_micros()).map_err(|_| format!("\"{text}\" is too long"))?;
        *bound = if negative { -us } else { us };
    }
    if bounds[0] > bounds[1] {
        return Err(format!("the lower bound is after the upper bound; write {WHAT}"));
    }
    Ok((bounds[0], bounds[1]))
}

/// `apply = { primary_key = ["order_id"] }`.
fn read_apply(mut a: Fields<'_, '_>) -> RawApply {
    let line = a.take_value("primary_key").and_then(|v| a.line_of(v));
    let primary_key = a.require("primary_key", Fields::take_str_list);
    let written = primary_key.is_some();
    let primary_key = primary_key.unwrap_or_default();
    if written && primary_key.is_empty() {
        a.report_at(
            a.key_path("primary_key"),
            line,
            "list the fields identifying a row, e.g. primary_key = [\"order_id\"]".to_string(),
        );
    }
    for (i, key) in primary_key.iter().enumerate() {
        if primary_key[..i].iter().any(|k| k.value == key.value) {
            a.report_at(
                key.path.clone(),
                key.line,
                format!("\"{}\" appears more than once in primary_key; list each field once", key.value),
            );
        }
    }
    a.finish();
    RawApply { primary_key }
}

const ANOMALY_JUDGES: [(&str, AnomalyJudge); 2] = [("trailing", AnomalyJudge::Trailing), ("containing", AnomalyJudge::Containing)];

/// `anomaly = { field, threshold, min_count, judge }`.
fn read_anomaly(mut a: Fields<'_, '_>) -> RawAnomaly {
    let field = a.require("field", Fields::take_str);
    let threshold = a
        .take_with("threshold", |v| match number(v) {
            Some(t) if t > 0.0 && t.is_finite() => Ok(t),
            _ => Err(found("a positive number of standard deviations (e.g. 3.0)", v)),
        })
        .map_or(3.0, |t| t.value);
    let min_count = value_or(a.take_int("min_count", 2, u64::from(u32::MAX)), 2);
    let judge = value_or(a.take_choice("judge", &ANOMALY_JUDGES), AnomalyJudge::Trailing);
    a.finish();
    RawAnomaly {
        field,
        threshold,
        min_count,
        judge,
    }
}

/// `derive = [{ name = "ctr", expr = "clicks / views" }]` (or `select`), optional.
fn read_derive(f: &mut Fields<'_, '_>, key: &'static str) -> Vec<RawDerived> {
    let Some(tables) = f.take_tables(key) else {
        return Vec::new();
    };
    tables
        .into_iter()
        .map(|mut d| {
            let name = d.require("name", Fields::take_str);
            let expr = d.require("expr", Fields::take_str);
            d.finish();
            RawDerived { name, expr }
        })
        .collect()
}

fn read_aggregates(f: &mut Fields<'_, '_>, key: &'static str) -> Option<Vec<RawAggregate>> {
    let agg_fns = AggFn::ALL.map(|func| (func.as_str(), func));
    let line = f.take_value(key).and_then(|v| f.line_of(v));
    let tables = f.take_tables(key)?;
    if tables.is_empty() {
        f.report_at(
            f.key_path(key),
            line,
            "at least one aggregate is required, e.g. aggregates = [{ name = \"events\", fn = \"count\" }]".to_string(),
        );
    }
    let aggregates = tables
        .into_iter()
        .map(|mut a| {
            let name = a.require("name", Fields::take_str);
            let func = a.require("fn", |a, key| a.take_choice(key, &agg_fns));
            let field = a.take_str("field");
            let expr = a.take_str("expr");
            let filter = a.take_str("filter");
            let at = At {
                value: (),
                path: a.path().to_string(),
                line: a.line(),
            };
            let percentile = read_percentile(&mut a, func.as_ref().map(|f| f.value), &at);
            a.finish();
            RawAggregate {
                at,
                name,
                func,
                field,
                expr,
                filter,
                percentile,
            }
        })
        .collect();
    Some(aggregates)
}

/// `percentile = 0.99`: required by `approx_percentile`, refused by every other fn.
fn read_percentile(a: &mut Fields<'_, '_>, func: Option<AggFn>, at: &At<()>) -> Option<f64> {
    const WHAT: &str = "a number between 0 and 1 (e.g. 0.99 for the 99th percentile)";
    match func {
        Some(AggFn::ApproxPercentile) => {
            if !a.has("percentile") {
                a.take_value("percentile"); // listed as allowed
                a.report_at(
                    format!("{}.percentile", at.path),
                    at.line,
                    "fn \"approx_percentile\" needs the percentile to estimate; add percentile = 0.99 (a number between 0 and 1)".to_string(),
                );
            }
            a.take_fraction("percentile", WHAT).map(|p| p.value)
        }
        Some(other) => {
            if let Some(value) = a.take_unlisted("percentile") {
                a.report_at(
                    a.key_path("percentile"),
                    a.line_of(value),
                    format!("percentile applies only to fn = \"approx_percentile\", not \"{}\"; remove it", other.as_str()),
                );
            }
            None
        }
        // The fn is missing or unknown (reported): only check the value.
        None => a.take_fraction("percentile", WHAT).map(|p| p.value),
    }
}

fn read_sink(mut f: Fields<'_, '_>) -> RawSink {
    let name = f.require("name", Fields::take_str);
    let kind = f
        .require("kind", |f, key| f.take_choice(key, &[("delta", SinkKind::Delta), ("kafka", SinkKind::Kafka)]))
        .map(|k| k.value);
    if kind == Some(SinkKind::Kafka) {
        return read_kafka_sink(f, name);
    }
    let path = f.require("path", Fields::take_str).map(|p| PathBuf::from(p.value));
    let partition_by = f.take_str_list("partition_by").unwrap_or_default();
    for (i, column) in partition_by.iter().enumerate() {
        if partition_by[..i].iter().any(|c| c.value == column.value) {
            f.report_at(
                column.path.clone(),
                column.line,
                format!("\"{}\" appears more than once in partition_by; list each column once", column.value),
            );
        }
    }
    let target_file_size_bytes = f.take_size("target_file_size").and_then(|size| {
        if size.value == 0 {
            f.report_at(size.path, size.line, "must be greater than 0 bytes, e.g. \"128MiB\"".to_string());
            None
        } else {
            Some(size.value)
        }
    });
    let compact_every = value_or(f.take_int("compact_every", 0, u64::MAX), DEFAULT_COMPACT_EVERY);
    let compact_min_files = f
        .take_int("compact_min_files", 2, u64::from(u32::MAX))
        .map_or(DEFAULT_COMPACT_MIN_FILES, |n| n.value as usize);
    let checkpoint_interval = value_or(f.take_int("checkpoint_interval", 1, u64::MAX), DEFAULT_CHECKPOINT_INTERVAL);
    let vacuum_retention = f.take_duration("vacuum_retention").map(|d| d.value);
    let log_retention = value_or(f.take_duration("log_retention"), DEFAULT_LOG_RETENTION);
    f.finish();
    RawSink {
        log_retention,
        name,
        kind,
        path,
        partition_by,
        target_file_size_bytes: target_file_size_bytes.unwrap_or(DEFAULT_TARGET_FILE_SIZE_BYTES),
        compact_every,
        compact_min_files,
        checkpoint_interval,
        vacuum_retention,
        kafka: None,
    }
}

/// Keys of a Delta sink, reported when written on a Kafka sink.
const DELTA_SINK_KEYS: [&str; 8] = [
    "path",
    "log_retention",
    "partition_by",
    "target_file_size",
    "compact_every",
    "compact_min_files",
    "checkpoint_interval",
    "vacuum_retention",
];

fn read_kafka_sink(mut f: Fields<'_, '_>, name: Option<At<String>>) -> RawSink {
    let topic = f.require("topic", Fields::take_str).map(|t| t.value);
    let key = f.take_str_list("key").unwrap_or_default();
    let bootstrap_servers = f.take_str("bootstrap_servers").map(|b| b.value);
    let options = read_librdkafka_options(&mut f);
    for delta_key in DELTA_SINK_KEYS {
        if let Some(value) = f.take_unlisted(delta_key) {
            f.report_at(
                f.key_path(delta_key),
                f.line_of(value),
                format!("{delta_key} applies only to kind = \"delta\" sinks; remove it from this Kafka sink (it writes to topic = \"...\")"),
            );
        }
    }
    f.finish();
    RawSink {
        name,
        kind: Some(SinkKind::Kafka),
        path: None,
        partition_by: Vec::new(),
        target_file_size_bytes: DEFAULT_TARGET_FILE_SIZE_BYTES,
        compact_every: 0,
        compact_min_files: DEFAULT_COMPACT_MIN_FILES,
        checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
        vacuum_retention: None,
        log_retention: DEFAULT_LOG_RETENTION,
        kafka: Some(RawKafkaSink {
            topic,
            key,
            bootstrap_servers,
            options,
        }),
    }
}

/// Keys of `[generator]` that only the click family reads.
const CLICK_GENERATOR_KEYS: [&str; 6] = ["users", "pages", "disorder", "late_share", "late_by", "purchases"];
/// Keys of `[generator]` that only the orders family reads.
const ORDERS_GENERATOR_KEYS: [&str; 3] = ["orders", "duplicate_share", "replay_share"];
const DEFAULT_ORDERS: u32 = 1000;

fn read_generator(mut f: Fields<'_, '_>) -> RawGenerator {
    let family = f.take_choice("family", &[("click", false), ("orders", true)]);
    let is_orders = family.as_ref().is_some_and(|f| f.value);
    let (foreign, family_name): (&[&'static str], &str) = if is_orders {
        (&CLICK_GENERATOR_KEYS, "the click family (family = \"click\", the default)")
    } else {
        (&ORDERS_GENERATOR_KEYS, "family = \"orders\"")
    };
    if family.is_some() || !f.has("family") {
        for &key in foreign {
            if let Some(value) = f.take_unlisted(key) {
                f.report_at(f.key_path(key), f.line_of(value), format!("\"{key}\" applies only to {family_name}; remove it"));
            }
        }
    }
    let orders = is_orders.then(|| super::model::OrdersGeneratorConfig {
        orders: f.take_int("orders", 1, u64::from(u32::MAX)).map_or(DEFAULT_ORDERS, |n| n.value as u32),
        duplicate_share: value_or(f.take_share("duplicate_share"), 0.0),
        replay_share: value_or(f.take_share("replay_share"), 0.0),
    });
    let source = f.require("source", Fields::take_str);
    let rate = value_or(f.take_int("rate", 1, u64::MAX), DEFAULT_RATE);
    let seed = value_or(f.take_int("seed", 0, u64::MAX), DEFAULT_SEED);
    let users = f.take_int("users", 1, u64::from(u32::MAX)).map_or(DEFAULT_USERS, |n| n.value as u32);
    let pages = f.take_int("pages", 1, u64::from(u32::MAX)).map_or(DEFAULT_PAGES, |n| n.value as u32);
    let disorder = value_or(f.take_duration("disorder"), Duration::ZERO);
    let late_share = value_or(f.take_share("late_share"), 0.0);
    let late_by = value_or(f.take_duration("late_by"), DEFAULT_LATE_BY);
    let malformed_share = value_or(f.take_share("malformed_share"), 0.0);
    let purchases = f.take_table("purchases").map(|mut p| {
        let source = p.require("source", Fields::take_str);
        let rate = value_or(p.take_int("rate", 1, u64::MAX), DEFAULT_PURCHASE_RATE);
        p.finish();
        RawPurchases { source, rate }
    });
    f.finish();
    RawGenerator {
        orders,
        purchases,
        source,
        rate,
        seed,
        users,
        pages,
        disorder,
        late_share,
        late_by,
        malformed_share,
    }
}

fn read_log(mut f: Fields<'_, '_>) -> LogConfig {
    let level = f.take_str("level").and_then(|at| match crate::telemetry::check_log_level(&at.value) {
        Ok(()) => Some(at.value),
        Err(e) => {
            f.report_at(
                at.path,
                at.line,
                format!(
                    "invalid log level \"{}\": {e}; use error, warn, info, debug or trace, optionally with per-module directives such as \"info,tidemark=debug\"",
                    at.value
                ),
            );
            None
        }
    });
    f.finish();
    LogConfig { level }
}

fn read_metrics(mut f: Fields<'_, '_>) -> MetricsConfig {
    let defaults = MetricsConfig::default();
    let listen = match f.take_str("listen") {
        None => defaults.listen,
        Some(at) if at.value == "off" => None,
        Some(at) => match at.value.parse::<std::net::SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                f.report_at(
                    at.path,
                    at.line,
                    format!(
                        "invalid listen address \"{}\": use IP:port such as \"127.0.0.1:9464\" (port 0 picks a free port), or \"off\" to serve no metrics",
                        at.value
                    ),
                );
                defaults.listen
            }
        },
    };
    f.finish();
    MetricsConfig { listen }
}
