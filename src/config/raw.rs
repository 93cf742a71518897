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
    AggFn, Bootstrap, FieldDef, FieldType, Format, GapPolicy, OutputMode, SinkKind, StartingOffsets, TimeFormat, WatermarkConfig, WindowConfig,
};
use super::reader::{found, At, Fields};

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

const AGG_FNS: [(&str, AggFn); 5] = [
    ("count", AggFn::Count),
    ("sum", AggFn::Sum),
    ("min", AggFn::Min),
    ("max", AggFn::Max),
    ("avg", AggFn::Avg),
];

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
const DEFAULT_RATE: u64 = 1000;
const DEFAULT_SEED: u64 = 42;
const DEFAULT_USERS: u32 = 1000;
const DEFAULT_PAGES: u32 = 50;
const DEFAULT_LATE_BY: Duration = Duration::from_secs(3600);

#[derive(Debug)]
pub(crate) struct RawConfig {
    pub pipeline: RawPipeline,
    pub kafka: RawKafka,
    pub sources: Vec<RawSource>,
    pub queries: Vec<RawQuery>,
    pub sinks: Vec<RawSink>,
    pub generator: Option<RawGenerator>,
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
}

#[derive(Debug)]
pub(crate) struct RawKafka {
    pub bootstrap_servers: Bootstrap,
    pub group_id: Option<String>,
    pub options: BTreeMap<String, String>,
}

#[derive(Debug)]
pub(crate) struct RawSource {
    pub name: Option<At<String>>,
    pub topic: Option<At<String>>,
    pub partitions: u32,
    pub format: Format,
    /// `None` when missing or unreadable; fields that failed to read are left out.
    pub schema: Option<Vec<FieldDef>>,
    pub event_time_field: Option<String>,
    pub event_time_format: TimeFormat,
    pub watermark: WatermarkConfig,
    pub starting_offsets: StartingOffsets,
    pub on_error: Option<At<String>>,
    pub on_gap: GapPolicy,
}

#[derive(Debug)]
pub(crate) struct RawQuery {
    pub name: Option<At<String>>,
    pub from: Option<At<String>>,
    pub window: Option<WindowConfig>,
    pub group_by: Vec<At<String>>,
    pub aggregates: Vec<RawAggregate>,
    pub output: OutputMode,
    pub allowed_lateness: Duration,
    pub sink: Option<At<String>>,
}

#[derive(Debug)]
pub(crate) struct RawAggregate {
    /// Path and line of the aggregate's table, for errors about it as a whole.
    pub at: At<()>,
    pub name: Option<At<String>>,
    pub func: Option<At<AggFn>>,
    pub field: Option<At<String>>,
}

#[derive(Debug)]
pub(crate) struct RawSink {
    pub name: Option<At<String>>,
    pub kind: Option<SinkKind>,
    pub path: Option<PathBuf>,
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
}

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
    });
    let kafka = root.take_table_or_empty("kafka").map(read_kafka).unwrap_or(RawKafka {
        bootstrap_servers: Bootstrap::Embedded,
        group_id: None,
        options: BTreeMap::new(),
    });
    let sources = read_list(&mut root, "sources", "source", read_source);
    let queries = read_list(&mut root, "queries", "query", read_query);
    let sinks = read_list(&mut root, "sinks", "sink", read_sink);
    let generator = root.take_table("generator").map(read_generator);
    root.finish();
    RawConfig {
        pipeline,
        kafka,
        sources,
        queries,
        sinks,
        generator,
    }
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
    f.finish();
    RawPipeline {
        name,
        state_dir,
        commit_interval: commit_interval.unwrap_or(DEFAULT_COMMIT_INTERVAL),
        shards: shards.unwrap_or(0),
        progress_interval: progress_interval.unwrap_or(DEFAULT_PROGRESS_INTERVAL),
        exchange_batch: exchange_batch.unwrap_or(DEFAULT_EXCHANGE_BATCH),
        exchange_capacity: exchange_capacity.unwrap_or(DEFAULT_EXCHANGE_CAPACITY),
    }
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
    f.finish();
    RawKafka {
        bootstrap_servers,
        group_id,
        options,
    }
}

fn read_source(mut f: Fields<'_, '_>) -> RawSource {
    let name = f.require("name", Fields::take_str);
    let topic = f.require("topic", Fields::take_str);
    let partitions = f.take_int("partitions", 1, u64::from(u32::MAX)).map_or(DEFAULT_PARTITIONS, |n| n.value as u32);
    let format = value_or(f.take_choice("format", &[("json", Format::Json)]), Format::Json);
    let schema = f.require("schema", read_schema);

    let mut event_time_field = None;
    let mut event_time_format = TimeFormat::Auto;
    if let Some(mut et) = f.require("event_time", Fields::take_table) {
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
    };
    if let Some(mut w) = f.take_table("watermark") {
        watermark.delay = value_or(w.take_duration("delay"), watermark.delay);
        watermark.idle_timeout = value_or(w.take_duration("idle_timeout"), watermark.idle_timeout);
        w.finish();
    }
    let starting_offsets = value_or(
        f.take_choice(
            "starting_offsets",
            &[("earliest", StartingOffsets::Earliest), ("latest", StartingOffsets::Latest)],
        ),
        StartingOffsets::Earliest,
    );
    let on_error = f.take_str("on_error");
    let on_gap = value_or(
        f.take_choice("on_gap", &[("fail", GapPolicy::Fail), ("skip", GapPolicy::Skip)]),
        GapPolicy::Fail,
    );
    f.finish();
    RawSource {
        name,
        topic,
        partitions,
        format,
        schema,
        event_time_field,
        event_time_format,
        watermark,
        starting_offsets,
        on_error,
        on_gap,
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
    let window = f.require("window", read_window);
    let group_by = f.take_str_list("group_by").unwrap_or_default();
    let aggregates = f.require("aggregates", read_aggregates).unwrap_or_default();
    let output = match f.take_value("output") {
        None => OutputMode::Append,
        Some(v) => {
            let path = f.key_path("output");
            let line = f.line_of(v);
            match v.get_ref().as_str() {
                Some("append") => {}
                Some(mode @ ("update" | "complete")) => f.report_at(path, line, format!("output mode '{mode}' is not implemented yet; use \"append\"")),
                Some(other) => f.report_at(path, line, format!("unknown output mode \"{other}\"; use \"append\"")),
                None => f.report_at(path, line, found("the string \"append\"", v)),
            }
            OutputMode::Append
        }
    };
    let allowed_lateness = value_or(f.take_duration("allowed_lateness"), Duration::ZERO);
    let sink = f.require("sink", Fields::take_str);
    f.finish();
    RawQuery {
        name,
        from,
        window,
        group_by,
        aggregates,
        output,
        allowed_lateness,
        sink,
    }
}

/// `window = { tumbling = "5m", offset = "0s" }`
fn read_window(f: &mut Fields<'_, '_>, key: &'static str) -> Option<WindowConfig> {
    let mut w = f.take_table(key)?;
    let mut unsupported = false;
    for kind in ["sliding", "session"] {
        // Recognised only to say they are not there yet.
        if let Some(value) = w.take_unlisted(kind) {
            unsupported = true;
            w.report_at(
                w.key_path(kind),
                w.line_of(value),
                format!("{kind} windows are not implemented yet; use tumbling = \"<size>\""),
            );
        }
    }
    let size = if unsupported {
        w.take_duration("tumbling")
    } else {
        w.require("tumbling", Fields::take_duration)
    };
    let offset = w.take_duration("offset");
    let window = size.and_then(|size| check_tumbling(&w, size, offset));
    w.finish();
    if unsupported {
        None
    } else {
        window
    }
}

fn check_tumbling(w: &Fields<'_, '_>, size: At<Duration>, offset: Option<At<Duration>>) -> Option<WindowConfig> {
    if size.value.is_zero() {
        w.report_at(size.path, size.line, "the window size must be greater than 0s".to_string());
        return None;
    }
    let offset = match offset {
        Some(offset) if offset.value >= size.value => {
            w.report_at(
                offset.path,
                offset.line,
                format!(
                    "the offset ({}) must be smaller than the window size ({})",
                    format_duration(offset.value),
                    format_duration(size.value)
                ),
            );
            return None;
        }
        Some(offset) => offset.value,
        None => Duration::ZERO,
    };
    Some(WindowConfig::Tumbling { size: size.value, offset })
}

fn read_aggregates(f: &mut Fields<'_, '_>, key: &'static str) -> Option<Vec<RawAggregate>> {
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
            let func = a.require("fn", |a, key| a.take_choice(key, &AGG_FNS));
            let field = a.take_str("field");
            let at = At {
                value: (),
                path: a.path().to_string(),
                line: a.line(),
            };
            a.finish();
            RawAggregate { at, name, func, field }
        })
        .collect();
    Some(aggregates)
}

fn read_sink(mut f: Fields<'_, '_>) -> RawSink {
    let name = f.require("name", Fields::take_str);
    let kind = f.require("kind", |f, key| f.take_choice(key, &[("delta", SinkKind::Delta)])).map(|k| k.value);
    let path = f.require("path", Fields::take_str).map(|p| PathBuf::from(p.value));
    f.finish();
    RawSink { name, kind, path }
}

fn read_generator(mut f: Fields<'_, '_>) -> RawGenerator {
    let source = f.require("source", Fields::take_str);
    let rate = value_or(f.take_int("rate", 1, u64::MAX), DEFAULT_RATE);
    let seed = value_or(f.take_int("seed", 0, u64::MAX), DEFAULT_SEED);
    let users = f.take_int("users", 1, u64::from(u32::MAX)).map_or(DEFAULT_USERS, |n| n.value as u32);
    let pages = f.take_int("pages", 1, u64::from(u32::MAX)).map_or(DEFAULT_PAGES, |n| n.value as u32);
    let disorder = value_or(f.take_duration("disorder"), Duration::ZERO);
    let late_share = value_or(f.take_share("late_share"), 0.0);
    let late_by = value_or(f.take_duration("late_by"), DEFAULT_LATE_BY);
    let malformed_share = value_or(f.take_share("malformed_share"), 0.0);
    f.finish();
    RawGenerator {
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
