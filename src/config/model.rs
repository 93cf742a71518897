//! The checked configuration: every reference resolved, every default applied.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::types::{FieldType, TimeFormat};

use crate::expr::Expr;

/// A SQL expression of the pipeline file: the text as written, and its compiled form,
/// type-checked against the columns it reads when the configuration was compiled (so nothing
/// compiles it again). Reads as its text; two are equal when their texts are.
#[derive(Debug, Clone)]
pub struct Sql {
    pub expr: Expr,
    /// False for a placeholder of an expression that did not compile (the configuration is
    /// invalid and never runs).
    usable: bool,
}

impl Sql {
    pub(crate) fn checked(expr: Expr) -> Sql {
        Sql { expr, usable: true }
    }

    pub(crate) fn unusable(text: &str) -> Sql {
        Sql {
            expr: Expr::unusable(text),
            usable: false,
        }
    }

    pub fn is_usable(&self) -> bool {
        self.usable
    }

    pub fn text(&self) -> &str {
        self.expr.text()
    }
}

impl std::ops::Deref for Sql {
    type Target = str;

    fn deref(&self) -> &str {
        self.text()
    }
}

/// Expected values in tests: an unusable expression with this text (equal to a compiled one).
#[cfg(test)]
impl From<&str> for Sql {
    fn from(text: &str) -> Sql {
        Sql::unusable(text)
    }
}

impl PartialEq for Sql {
    fn eq(&self, other: &Sql) -> bool {
        self.text() == other.text()
    }
}

/// A complete, validated pipeline configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub pipeline: PipelineConfig,
    pub kafka: KafkaConfig,
    pub sources: Vec<SourceConfig>,
    pub queries: Vec<QueryConfig>,
    pub sinks: Vec<SinkConfig>,
    pub generator: Option<GeneratorConfig>,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    /// `[scale]`: processes share the pipeline through a Kafka consumer group; `None` when the
    /// table is absent or `enabled = false`.
    pub scale: Option<ScaleConfig>,
    /// Set (never from the file) on the configuration of one task of a scaled-out pipeline:
    /// the engine then reads only this partition of each source and keeps its state in
    /// the changelog (see `crate::scale`).
    pub task: Option<TaskId>,
    /// Problems that do not stop the pipeline but deserve attention (printed by `validate`,
    /// logged by `run`), e.g. a `complete` query whose result grows without bound.
    pub warnings: Vec<String>,
}

impl Config {
    /// The source with this name, if any.
    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|s| s.name == name)
    }

    /// The sink with this name, if any.
    pub fn sink(&self, name: &str) -> Option<&SinkConfig> {
        self.sinks.iter().find(|s| s.name == name)
    }
}

/// `[scale]`: several tidemark processes with the same pipeline file share its work. Each
/// partition number of the (co-partitioned) sources is a task; a Kafka consumer group hands
/// the tasks out, and a task's state lives in a compacted changelog topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleConfig {
    /// The compacted topic holding every task's state, one partition per task. Default
    /// `<pipeline name>-changelog`; created when missing.
    pub changelog_topic: String,
    /// Replication factor of a changelog topic tidemark creates; -1 (the default) = the
    /// brokers' default.
    pub changelog_replication: i32,
    /// A process silent this long loses its tasks to the others. Default 10s.
    pub session_timeout: Duration,
    /// Every process keeps a warm copy of each task it does not run (it reads the task's
    /// changelog as it is written), so a task moving to it reads only the newest records.
    /// Default false.
    pub standby: bool,
    /// The sources whose messages are not keyed by what their queries keep state by: each is
    /// read by the tasks' repartitioners and written again, keyed right, to a topic of its
    /// own that the tasks then read instead.
    pub repartition: Vec<Repartition>,
}

/// One source repartitioned by a `[scale]` pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repartition {
    /// Index of the source in [`Config::sources`].
    pub source: usize,
    /// `<pipeline>-repartition-<source>`: one partition per task, created when missing.
    pub topic: String,
    /// Schema indexes of the fields the rows are keyed by, in order (a join's two sides list
    /// paired fields in the same order, so matching rows meet in one task).
    pub key: Vec<usize>,
}

/// What a task reads in place of a repartitioned source: partition `task` of its
/// repartition topic, whose records come from `upstream_partitions` partitions of `topic`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repartitioned {
    /// The source's own topic (dead letters and per-partition clocks name it).
    pub topic: String,
    pub upstream_partitions: i32,
}

/// One task of a scaled-out pipeline: partition `partition` of every source, out of `of`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskId {
    pub partition: i32,
    pub of: i32,
}

/// `[pipeline]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineConfig {
    /// Made of `[A-Za-z0-9_.-]`; names state directories and the consumer group.
    pub name: String,
    /// Default `./data/state/<name>`.
    pub state_dir: PathBuf,
    /// How often an epoch is committed. Default 1s, at least 10ms.
    pub commit_interval: Duration,
    /// Number of shards; 0 (the default) means one per core.
    pub shards: usize,
    /// How often progress is logged. Default 5s.
    pub progress_interval: Duration,
    /// Records per batch sent between shards. Default 1024.
    pub exchange_batch: usize,
    /// Batches a channel between two shards holds; when full, the sender stops reading its
    /// sources until it drains (backpressure). Default 16.
    pub exchange_capacity: usize,
    /// An epoch ends early once the sources have read this many bytes in it (shards pause
    /// their sources at their share until it ends), so a catch-up or a slow sink cannot grow
    /// an epoch's memory without bound. Default 128 MiB.
    pub max_epoch_bytes: u64,
}

/// `[metrics]`: the HTTP endpoint serving `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Address to listen on; `None` when `listen = "off"`. Default `127.0.0.1:9464`; port 0
    /// picks a free port (tests), see `RunningPipeline::metrics_address`.
    pub listen: Option<std::net::SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: Some(DEFAULT_METRICS_LISTEN.parse().expect("a valid default address")),
        }
    }
}

/// `[log]`: logging settings a pipeline file may carry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogConfig {
    /// A `tracing` filter (`info`, `debug`, `warn,tidemark=debug`, ...), applied when
    /// `RUST_LOG` is not set. `None`: `RUST_LOG`, else `info`.
    pub level: Option<String>,
}

/// Where `/metrics` is served unless `[metrics] listen` says otherwise.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// `[kafka]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// Default [`Bootstrap::Embedded`].
    pub bootstrap_servers: Bootstrap,
    /// Default: the pipeline name.
    pub group_id: String,
    /// `[kafka.options]`: librdkafka settings passed through as strings.
    pub options: BTreeMap<String, String>,
    /// How often the source topics' partition counts are looked up, so partitions added while
    /// running are read. Default 30s.
    pub metadata_refresh: Duration,
}

/// Where the Kafka brokers are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// `"embedded"`: start an in-process broker.
    Embedded,
    /// A librdkafka `bootstrap.servers` list, e.g. `"localhost:9092"`.
    Servers(String),
}

/// One `[[sources]]` entry: a Kafka topic (or, with `kind = "files"`, a directory) of JSON events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceConfig {
    pub name: String,
    /// Kafka topic; empty for a file source.
    pub topic: String,
    /// `kind = "files"`: a directory of JSON-lines files instead of a Kafka topic. When set,
    /// `topic`, `partitions`, `starting_offsets` and `on_gap` are unused.
    pub files: Option<FileSourceConfig>,
    /// Default 4; used when the embedded broker creates the topic.
    pub partitions: u32,
    pub format: Format,
    /// Fields in file order.
    pub schema: Vec<FieldDef>,
    pub event_time: EventTimeConfig,
    pub watermark: WatermarkConfig,
    pub starting_offsets: StartingOffsets,
    /// Names of the sinks receiving dead letters (each gets every one); empty = count, log
    /// and drop.
    pub on_error: Vec<String>,
    pub on_gap: GapPolicy,
    /// `key = ["user_id"]`: the fields the producers key (partition) the topic's messages by.
    /// Used by `[scale]` only: a source without it, or keyed by fields a query does not keep
    /// state by, is repartitioned.
    pub key: Vec<String>,
    /// Set by `[scale]` in a task's configuration when `topic` is this source's repartition
    /// topic.
    pub repartitioned: Option<Repartitioned>,
}

impl SourceConfig {
    /// Index in [`SourceConfig::schema`] of the field with this name.
    pub fn field_index(&self, name: &str) -> Option<usize> {
        self.schema.iter().position(|f| f.name == name)
    }

    /// Index in [`SourceConfig::schema`] of the event-time field.
    pub fn event_time_index(&self) -> Option<usize> {
        self.field_index(&self.event_time.field)
    }
}

/// `kind = "files"`, `path = "./inbox"`, `settle = "5s"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSourceConfig {
    /// Directory watched for `*.json`, `*.jsonl`, `*.ndjson` files, each optionally `.gz`.
    pub path: PathBuf,
    /// A last line without a newline is read only after the file is unchanged this long.
    /// Default 5s.
    pub settle: Duration,
}

/// Encoding of a source's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per message: the row itself.
    Json,
    /// `format = "debezium"`: Debezium JSON change events (with or without the
    /// `{"schema": ..., "payload": ...}` wrapper); the row is `after` (`before` for a delete).
    Debezium(DebeziumFormat),
}

/// How a Debezium source orders the changes of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebeziumFormat {
    /// `position = ["source.lsn"]` (the default): the envelope fields whose values, compared
    /// in order (integers numerically, strings byte-wise), order the changes of a key. Each
    /// is a field of the payload (`"ts_ms"`) or of an object in it (`"source.pos"`).
    pub position: Vec<PositionField>,
}

/// One component of a Debezium source position: `source.lsn` is `{ object: Some("source"),
/// field: "lsn" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PositionField {
    pub object: Option<String>,
    pub field: String,
}

impl PositionField {
    /// `"source.lsn"` → `source` / `lsn`; `"ts_ms"` → a top-level field.
    pub fn parse(path: &str) -> Option<PositionField> {
        let mut parts = path.split('.');
        let (first, second) = (parts.next()?, parts.next());
        if parts.next().is_some() || first.is_empty() || second.is_some_and(str::is_empty) {
            return None;
        }
        Some(match second {
            Some(field) => PositionField {
                object: Some(first.to_string()),
                field: field.to_string(),
            },
            None => PositionField {
                object: None,
                field: first.to_string(),
            },
        })
    }
}

impl std::fmt::Display for PositionField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.object {
            Some(object) => write!(f, "{object}.{}", self.field),
            None => f.write_str(&self.field),
        }
    }
}

/// One schema field: `user_id = "string"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDef {
    pub name: String,
    pub ty: FieldType,
}

/// `event_time = { field = "ts", format = "auto" }`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventTimeConfig {
    pub field: String,
    pub format: TimeFormat,
}

/// `watermark = { delay = "10s", idle_timeout = "30s" }`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatermarkConfig {
    /// How far the watermark trails the largest event time seen. Default 0s.
    pub delay: Duration,
    /// A partition silent this long stops holding the watermark back. Default 30s.
    pub idle_timeout: Duration,
    /// An event time more than this ahead of the wall clock is a dead letter, not a watermark
    /// jump. Default 1 day; `None` (`max_future = "off"`) accepts any time.
    pub max_future: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartingOffsets {
    Earliest,
    Latest,
}

/// What to do when a partition's offsets jump (records lost to retention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapPolicy {
    /// Stop the pipeline with an error.
    Fail,
    /// Log, count and carry on.
    Skip,
}

/// One `[[queries]]` entry: from a source (or two, joined) into a sink.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryConfig {
    pub name: String,
    pub from: String,
    /// Index into [`Config::sources`] of `from`.
    pub source_index: usize,
    /// `where = "<SQL expression>"` over the source's fields: only events for which it is TRUE
    /// reach the query.
    pub filter: Option<Sql>,
    /// What the query computes.
    pub kind: QueryKind,
    /// `select = [{ name = "user_id", expr = "c.user_id" }]`: the output columns of a stateless
    /// query or a join, in order.
    pub select: Vec<DerivedColumn>,
    /// The window of an aggregation or of an anomaly detector's statistics (unused by
    /// stateless queries and joins).
    pub window: WindowConfig,
    /// Schema fields of the source, none of them float.
    pub group_by: Vec<String>,
    /// Schema indexes of the `group_by` fields, in order.
    pub key_fields: Vec<usize>,
    pub aggregates: Vec<AggregateConfig>,
    /// `derive = [{ name = "ctr", expr = "clicks / views" }]`: output columns computed from the
    /// row's window columns, keys, aggregates and earlier derived columns.
    pub derive: Vec<DerivedColumn>,
    pub output: OutputMode,
    /// How long after a window closes late events still update it. Default 0s.
    pub allowed_lateness: Duration,
    /// The sinks receiving the results, each all of them (`sink = "a"` or a list).
    pub sinks: Vec<String>,
    /// Indexes into [`Config::sinks`] of `sinks`.
    pub sink_indexes: Vec<usize>,
}

/// What a query computes.
#[derive(Debug, Clone, PartialEq)]
pub enum QueryKind {
    /// `window` + `aggregates`: a keyed windowed aggregation.
    Aggregate,
    /// No window: each event that passes `where` becomes one output row (`select`).
    Stateless,
    /// `join = { ... }`: a stream-stream interval join of `from` (left) with another source.
    Join(Box<JoinConfig>),
    /// `anomaly = { ... }` with a sliding `window`: readings judged against rolling statistics.
    Anomaly(AnomalyConfig),
    /// `apply = { primary_key = [...] }`: the change events of a Debezium source applied to a
    /// table keyed by primary key (update output).
    Apply(ApplyConfig),
}

/// `apply = { primary_key = ["order_id"] }`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyConfig {
    pub primary_key: Vec<String>,
    /// Schema indexes of the primary-key fields, in key order.
    pub key_fields: Vec<usize>,
    /// Schema indexes of the other fields, in schema order: the table's value columns.
    pub value_fields: Vec<usize>,
}

/// `join = { source = "purchases", type = "left", on = ["user_id"], between = ["0s", "30m"] }`
#[derive(Debug, Clone, PartialEq)]
pub struct JoinConfig {
    /// The right side's source.
    pub source: String,
    pub source_index: usize,
    pub join_type: JoinType,
    /// Schema indexes of the join key on each side, in key order.
    pub left_keys: Vec<usize>,
    pub right_keys: Vec<usize>,
    /// µs: a right row matches when `left time + lower <= right time <= left time + upper`.
    pub lower: i64,
    pub upper: i64,
    /// Aliases qualifying the columns in `select` (default: the source names).
    pub left_as: String,
    pub right_as: String,
    /// `where` over the right side's fields.
    pub right_filter: Option<Sql>,
    /// Schema indexes of the fields each side carries to the join (those `select` reads).
    pub left_fields: Vec<usize>,
    pub right_fields: Vec<usize>,
}

/// Which unmatched rows a join emits, null-padded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinType {
    Inner,
    Left,
    Right,
    Full,
}

impl JoinType {
    pub fn as_str(self) -> &'static str {
        match self {
            JoinType::Inner => "inner",
            JoinType::Left => "left",
            JoinType::Right => "right",
            JoinType::Full => "full",
        }
    }
}

/// `anomaly = { field = "value", threshold = 3.0, min_count = 10, judge = "trailing" }`
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyConfig {
    pub field: String,
    pub field_index: usize,
    /// Bounds are mean ± threshold·σ. Default 3.
    pub threshold: f64,
    /// Fewer readings in the window: no judgement. Default 2, at least 2.
    pub min_count: u64,
    pub judge: AnomalyJudge,
}

/// Which statistics a reading is judged against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnomalyJudge {
    /// The latest window ending at or before the reading (excluding it).
    Trailing,
    /// Every window containing the reading (including it): the seed's SQL, literally.
    Containing,
}

impl AnomalyJudge {
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyJudge::Trailing => "trailing",
            AnomalyJudge::Containing => "containing",
        }
    }
}

impl QueryConfig {
    /// The grouping key fields, in order.
    pub fn key_fields(&self) -> &[String] {
        &self.group_by
    }

    /// Names of the leading window columns of this query's output rows.
    pub fn window_columns(&self) -> &'static [&'static str] {
        self.window.columns()
    }
}

/// `window = { tumbling = "5m" }`, `{ sliding = "10m", slide = "5m" }`, `{ session = "30m" }`,
/// `{ global = true }` or `{ global = true, reset = "day" }`; tumbling and sliding take an
/// optional `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowConfig {
    /// Back-to-back windows of `size`, starting at epoch + `offset` + k·`size`.
    Tumbling { size: Duration, offset: Duration },
    /// Windows of `size` starting every `slide` (at epoch + `offset` + k·`slide`); an event
    /// belongs to size/slide of them. 0 < slide ≤ size, offset < slide.
    Sliding { size: Duration, slide: Duration, offset: Duration },
    /// Per key: events closer than `gap` form one session `[first event, last event + gap)`.
    Session { gap: Duration },
    /// One running aggregate per key, emitted on change; with `reset`, a new one starts each
    /// calendar period (UTC).
    Global { reset: Option<CalendarUnit> },
}

impl WindowConfig {
    /// Names of the leading window columns of output rows.
    pub fn columns(&self) -> &'static [&'static str] {
        match self {
            WindowConfig::Tumbling { .. } | WindowConfig::Sliding { .. } | WindowConfig::Global { reset: Some(_) } => &["window_start", "window_end"],
            WindowConfig::Session { .. } => &["session_start", "session_end", "duration"],
            WindowConfig::Global { reset: None } => &[],
        }
    }

    /// True when windows close (so append output can emit and state can be dropped).
    pub fn closes(&self) -> bool {
        !matches!(self, WindowConfig::Global { reset: None })
    }
}

/// Calendar period of a resetting global window (UTC; weeks start on Monday).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalendarUnit {
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl CalendarUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            CalendarUnit::Hour => "hour",
            CalendarUnit::Day => "day",
            CalendarUnit::Week => "week",
            CalendarUnit::Month => "month",
            CalendarUnit::Year => "year",
        }
    }
}

/// `{ name = "ctr", expr = "clicks / views" }`
#[derive(Debug, Clone, PartialEq)]
pub struct DerivedColumn {
    pub name: String,
    /// Over the window columns, keys, aggregates and earlier derived columns, in that order.
    pub expr: Sql,
}

/// `{ name = "total", fn = "sum", field = "amount" }`
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateConfig {
    /// Output column name.
    pub name: String,
    pub func: AggFn,
    /// Input field; required (or `expr`) except for `count`, where it counts rows with
    /// the field present and non-null.
    pub field: Option<String>,
    /// Index of `field` in the source schema.
    pub field_index: Option<usize>,
    /// `expr = "CASE WHEN action = 'click' THEN 1 ELSE 0 END"`: the input computed from the
    /// event instead of read from one field.
    pub expr: Option<Sql>,
    /// `filter = "<SQL expression>"`: only events for which it is TRUE are aggregated.
    pub filter: Option<Sql>,
    /// `percentile = 0.99` for `approx_percentile` (0..=1).
    pub percentile: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggFn {
    Count,
    Sum,
    Min,
    Max,
    Avg,
    VarSamp,
    VarPop,
    StddevSamp,
    StddevPop,
    CountDistinct,
    ApproxCountDistinct,
    ApproxPercentile,
    First,
    Last,
}

impl AggFn {
    pub const ALL: [AggFn; 14] = [
        AggFn::Count,
        AggFn::Sum,
        AggFn::Min,
        AggFn::Max,
        AggFn::Avg,
        AggFn::VarSamp,
        AggFn::VarPop,
        AggFn::StddevSamp,
        AggFn::StddevPop,
        AggFn::CountDistinct,
        AggFn::ApproxCountDistinct,
        AggFn::ApproxPercentile,
        AggFn::First,
        AggFn::Last,
    ];

    /// The name used in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            AggFn::Count => "count",
            AggFn::Sum => "sum",
            AggFn::Min => "min",
            AggFn::Max => "max",
            AggFn::Avg => "avg",
            AggFn::VarSamp => "var_samp",
            AggFn::VarPop => "var_pop",
            AggFn::StddevSamp => "stddev_samp",
            AggFn::StddevPop => "stddev_pop",
            AggFn::CountDistinct => "count_distinct",
            AggFn::ApproxCountDistinct => "approx_count_distinct",
            AggFn::ApproxPercentile => "approx_percentile",
            AggFn::First => "first",
            AggFn::Last => "last",
        }
    }
}

/// When and how query results reach the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputMode {
    /// Once per window, final, when the watermark passes its end plus allowed lateness.
    Append,
    /// Each epoch, the rows whose aggregates changed; the sink upserts them on the window and
    /// group keys (an incrementally maintained materialized view).
    Update,
    /// Each epoch, the whole result replaces the table.
    Complete,
}

impl OutputMode {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputMode::Append => "append",
            OutputMode::Update => "update",
            OutputMode::Complete => "complete",
        }
    }
}

/// One `[[sinks]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    pub name: String,
    pub kind: SinkKind,
    /// Table location, e.g. a directory for a local Delta table.
    pub path: PathBuf,
    /// Output columns the table is partitioned by (e.g. a derived `window_date`). Default none.
    pub partition_by: Vec<String>,
    /// Data files are written at about this size. Default 128 MiB (`"128MB"`).
    pub target_file_size_bytes: u64,
    /// Compact small files every this many commits (0 = never). Default 10.
    pub compact_every: u64,
    /// Compaction starts once a partition has this many small files. Default 4.
    pub compact_min_files: usize,
    /// Write a Delta log checkpoint every this many table versions. Default 10.
    pub checkpoint_interval: u64,
    /// `vacuum_retention = "7d"`: after each compaction, delete data files unreferenced for
    /// longer than this. Default: never vacuum (every old version stays readable).
    pub vacuum_retention: Option<Duration>,
    /// At each checkpoint, log files older than this (and older than the checkpoint) are
    /// deleted, so the log does not grow for ever; versions before it can no longer be
    /// read (time travel). Default 1 hour: each commit lists the log directory, so a longer
    /// retention makes every commit slower.
    pub log_retention: Duration,
    /// `kind = "kafka"`: the topic and how rows become messages (the Delta options above are
    /// unused).
    pub kafka: Option<KafkaSinkConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    Delta,
    Kafka,
}

/// A Kafka sink: rows as JSON messages, one Kafka transaction per epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSinkConfig {
    pub topic: String,
    /// Output columns whose values form the message key; empty = no key (append), or the
    /// window start and group keys (update mode).
    pub key: Vec<String>,
    /// Default: `[kafka] bootstrap_servers`.
    pub bootstrap_servers: Option<String>,
    /// librdkafka producer settings.
    pub options: std::collections::BTreeMap<String, String>,
}

/// `[generator]`: built-in event generator producing into a source's topic: clicks (the
/// default), or with `family = "orders"` Debezium change events of an orders table.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorConfig {
    /// What it generates.
    pub family: GeneratorFamily,
    pub source: String,
    /// Index into [`Config::sources`] of `source`.
    pub source_index: usize,
    /// Events per second, > 0. Default 1000.
    pub rate: u64,
    /// Default 42.
    pub seed: u64,
    /// Default 1000.
    pub users: u32,
    /// Default 50.
    pub pages: u32,
    /// Maximum event-time jitter backwards. Default 0s.
    pub disorder: Duration,
    /// Share of very late events, in 0..=1. Default 0.
    pub late_share: f64,
    /// How far in the past very late events are. Default 1h.
    pub late_by: Duration,
    /// Share of malformed records, in 0..=1. Default 0.
    pub malformed_share: f64,
    /// `purchases = { source = "purchases", rate = 5 }`: also purchases by the same users.
    pub purchases: Option<PurchasesConfig>,
}

/// The generator's event family.
#[derive(Debug, Clone, PartialEq)]
pub enum GeneratorFamily {
    /// Click events (`users`, `pages`, the disorder, late and malformed shares, `purchases`).
    Click,
    /// `family = "orders"`: Debezium change events of a model orders table.
    Orders(OrdersGeneratorConfig),
}

/// `family = "orders"`: the settings of the orders change-event family.
#[derive(Debug, Clone, PartialEq)]
pub struct OrdersGeneratorConfig {
    /// Order ids live at once, about. Default 1000.
    pub orders: u32,
    /// Share of events sent twice in a row (a duplicate delivery), in 0..=1. Default 0.
    pub duplicate_share: f64,
    /// Share of events followed by a replay of an older change of some order, in 0..=1.
    /// Default 0. (The generator's `malformed_share` applies too.)
    pub replay_share: f64,
}

/// Purchases the generator produces into another source (clean events, stamped now).
#[derive(Debug, Clone, PartialEq)]
pub struct PurchasesConfig {
    pub source: String,
    pub source_index: usize,
    /// Purchases per second, > 0. Default 5.
    pub rate: u64,
}
