//! `tidemark-tools loadtest`: the end-to-end load test. It drives the demo's click-analytics query
//! (`page_views_5min`: a 5-minute tumbling count per `page_url`, into Delta) with click events
//! and reports what it sustains, beside a baseline measured in the same run.
//!
//! One run, in order:
//!
//! 1. **Prefill** a fresh topic with N click events ([`prefill_events`]), on the embedded
//!    broker (in this process) or any broker given by address.
//! 2. **Baseline**: raw consume + JSON decode of those N events with the pipeline's consumer
//!    settings and decoder, nothing else, on as many threads as the pipeline has shards
//!    ([`consume_and_decode`]): the practical ceiling.
//! 3. **Catch-up**: `tidemark run` as a *child process* (so its RSS and CPU are its own, apart
//!    from the broker and the producer) reads the same N events; the rate runs from the first
//!    scrape of `tidemark_events_received_total` showing events to the moment it reached N.
//!    Baseline and catch-up alternate for [`ROUNDS`] rounds (a fresh child each time; the
//!    last one stays for the live phases); both are timed from their first event read, so the
//!    wait for the first fetch answer is in neither.
//! 4. **Live rate search**: a producer thread produces at a target rate for a step while the
//!    child consumes; a step is sustained when the consumer lag ends below one second's worth
//!    of events and is not growing ([`judge_step`]). Rates double until a step fails, then
//!    bisect ([`RateSearch`]). On the embedded broker a step stops early when the lag nears
//!    its retention, so nothing is lost.
//! 5. **Latency** at half the highest sustained rate: p50/p99/p999 of ingest → commit and
//!    event time → commit from the child's Prometheus histograms, the difference between the
//!    phase's first and last scrape ([`bucket_delta`], [`histogram_quantile`]).
//! 6. **Keys** (optional): N distinct `page_url` keys in one 5-minute window; the child's RSS.
//!
//! The report ([`LoadTestReport`], printed with `Display`) goes with the last `/metrics`
//! scrape (checked with `promtool check metrics` when installed) into the output directory.

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use tidemark::broker::{BrokerError, EmbeddedBroker};
use tidemark::config::{parse_config, Config};
use tidemark::decode::SourceDecoder;
use tidemark::source::consumer_config;
use tidemark::source::generator::{ClickGenerator, ClickGeneratorSettings, GeneratedEvent};
use tidemark::source::producer::{produce_events, wall_clock_ms, EventGenerator, EventProducer, ProduceSettings, ProducerError, Rate};

/// The embedded broker (librdkafka's mock cluster) keeps the newest ~5 MB per partition.
pub const EMBEDDED_RETENTION_BYTES_PER_PARTITION: u64 = 5_000_000;
/// The prefilled topic may fill this share of the embedded broker's retention.
const PREFILL_RETENTION_SHARE: f64 = 0.9;
/// Live phases keep the consumer lag under this share of the embedded broker's retention.
const LAG_CAP_RETENTION_SHARE: f64 = 1.0 / 3.0;
/// Bytes a record costs in a Kafka batch besides its key and value (approximate, generous).
const RECORD_OVERHEAD_BYTES: u64 = 20;
/// A step's lag limit is one second's worth of events, but never less than this.
pub const LAG_FLOOR_EVENTS: u64 = 2_000;
/// The child's epoch length; latency quantiles are read against it.
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);
/// The consumers' `fetch.wait.max.ms` and `fetch.queue.backoff.ms` (see the comments in the
/// generated pipeline file).
const FETCH_WAIT_MAX: Duration = Duration::from_millis(10);
const FETCH_QUEUE_BACKOFF: Duration = Duration::from_millis(1);
/// After the last event of a phase is read, its epoch commits within about one interval.
const SETTLE: Duration = Duration::from_millis(2_500);
/// Scrape period while a live phase runs, and while the catch-up runs (finer: it is short).
const SCRAPE_EVERY: Duration = Duration::from_millis(100);
const CATCH_UP_SCRAPE_EVERY: Duration = Duration::from_millis(10);
/// Baseline and catch-up run this many times, alternating; the best of each is reported.
pub const ROUNDS: usize = 3;
/// How long the child may take to become ready, and to read a backlog back down.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the child may take to commit and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// The rate search: steps at most, bisections once bracketed, lowest rate tried.
const SEARCH_MAX_STEPS: u32 = 10;
const SEARCH_BISECTIONS: u32 = 3;
const SEARCH_MIN_RATE: u64 = 500;
/// Click events of the prefill and the live phases: users (message keys) and pages (group keys).
const CLICK_USERS: u32 = 100_000;
const CLICK_PAGES: u32 = 1_000;
const CLICK_DISORDER_MS: i64 = 2_000;
/// Prefilled events are spread over event time at this many per millisecond, ending now.
const PREFILL_EVENTS_PER_MS: u64 = 10;

/// Histograms the latency phase reads (seconds, Prometheus `_bucket{le=...}` series).
pub const INGEST_TO_COMMIT: &str = "tidemark_ingest_to_commit_seconds";
pub const EVENT_TIME_TO_COMMIT: &str = "tidemark_event_time_to_commit_seconds";
const EVENTS_RECEIVED: &str = "tidemark_events_received_total";
const STATE_KEYS: &str = "tidemark_state_keys";

/// Why the load test stopped.
#[derive(Debug, thiserror::Error)]
pub enum LoadTestError {
    /// A setting is out of range (the user's to fix).
    #[error("{0}")]
    Settings(String),
    #[error(transparent)]
    Broker(Box<BrokerError>),
    #[error(transparent)]
    Producer(Box<ProducerError>),
    /// A Kafka request failed (external: the broker).
    #[error("{what} on {bootstrap} failed: {source}; check that the broker is running and reachable")]
    Kafka {
        what: String,
        bootstrap: String,
        #[source]
        source: Box<KafkaError>,
    },
    /// A local file, directory or process could not be handled.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The pipeline child failed or misbehaved; its log says why.
    #[error("the pipeline {what}; see its log {} which ends with:\n{tail}", log.display())]
    Pipeline { what: String, log: PathBuf, tail: String },
    /// The baseline consumers did not read what the topic holds.
    #[error("the baseline read {read} of {expected} events within {timeout:?}; the broker is overloaded or dropped data (retention): lower --events or use a real broker (--bootstrap)")]
    Baseline { read: u64, expected: u64, timeout: Duration },
    /// The generated pipeline file did not compile: a bug in this module.
    #[error("internal error: the generated pipeline file is invalid ({0}); this is a bug in tidemark")]
    GeneratedConfig(String),
    /// The `tidemark` daemon binary is not where the load test looks for it (the user's to build).
    #[error("the tidemark daemon binary, which runs the pipeline, is not at {}: build it with `cargo build --release -p tidemark` (scripts/loadtest.sh builds every workspace target), or name it with --daemon PATH", path.display())]
    DaemonMissing { path: PathBuf },
    #[error("interrupted")]
    Interrupted,
}

/// The daemon binary to run the pipeline with: `explicit` (`--daemon`) when given, else
/// `tidemark` in the directory of `tools_exe` (cargo puts both binaries of the workspace in
/// one target directory). Errors with how to build it when the file is not there.
pub fn find_daemon(tools_exe: &Path, explicit: Option<&Path>) -> Result<PathBuf, LoadTestError> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => tools_exe
            .parent()
            .unwrap_or(Path::new("."))
            .join(format!("tidemark{}", std::env::consts::EXE_SUFFIX)),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(LoadTestError::DaemonMissing { path })
    }
}

impl From<BrokerError> for LoadTestError {
    fn from(e: BrokerError) -> Self {
        LoadTestError::Broker(Box::new(e))
    }
}

impl From<ProducerError> for LoadTestError {
    fn from(e: ProducerError) -> Self {
        LoadTestError::Producer(Box::new(e))
    }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LoadTestError {
    let what = what.into();
    move |source| LoadTestError::Io { what, source }
}

/// What to run; see `tidemark-tools loadtest --help`.
#[derive(Debug, Clone)]
pub struct LoadTestSettings {
    /// The `tidemark` daemon binary that runs the pipeline (`tidemark run`), normally the one
    /// next to `tidemark-tools` in the target directory.
    pub exe: PathBuf,
    /// Kafka bootstrap servers; `None` starts the embedded broker in this process.
    pub bootstrap: Option<String>,
    /// Pipeline shards, and baseline threads.
    pub shards: usize,
    pub partitions: i32,
    /// Events in the prefilled topic (baseline and catch-up).
    pub events: u64,
    /// Length of each live step (rate search, latency phase).
    pub step: Duration,
    /// When set, the keys phase fills this many distinct `page_url` keys in one window.
    pub keys: Option<u64>,
    /// Where the pipeline file, its log, the last scrape and the report are written.
    pub out_dir: PathBuf,
    pub seed: u64,
    /// The command line, for the report.
    pub command: String,
}

impl LoadTestSettings {
    fn check(&self) -> Result<(), LoadTestError> {
        let mut problems = Vec::new();
        if self.shards == 0 {
            problems.push("--shards must be at least 1");
        }
        if self.partitions < 1 {
            problems.push("--partitions must be at least 1");
        }
        if self.events < 1_000 {
            problems.push("--events must be at least 1000");
        }
        if self.step < Duration::from_millis(500) {
            problems.push("--step-seconds must be at least 0.5");
        }
        if self.keys == Some(0) {
            problems.push("--keys must be at least 1");
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(LoadTestError::Settings(problems.join("; ")))
        }
    }
}

// ---------------------------------------------------------------------------------------
// The pipeline, the prefill and the baseline (also used by benches/throughput.rs)
// ---------------------------------------------------------------------------------------

/// A pipeline running the demo's `page_views_5min` query over a topic of click events.
#[derive(Debug, Clone)]
pub struct ClickPipeline<'a> {
    pub name: &'a str,
    pub bootstrap: &'a str,
    pub topic: &'a str,
    pub partitions: i32,
    pub shards: usize,
    pub state_dir: &'a Path,
    pub sink_dir: &'a Path,
    /// `[metrics] listen`, e.g. `127.0.0.1:0`.
    pub metrics_listen: &'a str,
}

/// The pipeline file: config/demo.toml's source and its `page_views_5min` query (5-minute
/// tumbling count per `page_url`, append mode), commit_interval 1s, into one Delta table;
/// consumers wait at most 10 ms for new data in a fetch and 1 ms before fetching again after
/// their queue was full (see the comments in the file).
pub fn click_pipeline_toml(p: &ClickPipeline<'_>) -> String {
    let quote = |s: &str| toml::Value::String(s.to_owned()).to_string();
    format!(
        r#"# Generated by tidemark's load test: the demo's page_views_5min query.
[pipeline]
name = {name}
state_dir = {state}
commit_interval = "{commit_ms}ms"
shards = {shards}
progress_interval = "5s"

[kafka]
bootstrap_servers = {bootstrap}
group_id = {name}

[kafka.options]
# The embedded broker (librdkafka's mock cluster), and tansu, answer a fetch that finds no new
# data only after the whole fetch.wait.max.ms (default 500 ms), without waking up when data
# arrives as Kafka does: a consumer that keeps up would sit idle for half a second at a time.
"fetch.wait.max.ms" = "{fetch_wait_ms}"
# Once a partition's fetched messages fill the local queue (queued.max.messages.kbytes, 4 MiB
# in tidemark), librdkafka postpones its next fetch by fetch.queue.backoff.ms (default 1000 ms):
# a consumer catching up on a backlog drains the queue in a tenth of that, then idles.
"fetch.queue.backoff.ms" = "{fetch_queue_backoff_ms}"

[[sources]]
name = "clicks"
topic = {topic}
partitions = {partitions}
format = "json"
starting_offsets = "earliest"
event_time = {{ field = "timestamp" }}
watermark = {{ delay = "5s", idle_timeout = "30s" }}
schema = {{ user_id = "string", page_url = "string", action = "string", timestamp = "timestamp" }}

[[queries]]
name = "page_views_5min"
from = "clicks"
window = {{ tumbling = "5m" }}
group_by = ["page_url"]
aggregates = [ {{ name = "view_count", fn = "count" }} ]
output = "append"
sink = "page_views_5min"

[[sinks]]
name = "page_views_5min"
kind = "delta"
path = {sink}

[metrics]
listen = {listen}
"#,
        name = quote(p.name),
        state = quote(&p.state_dir.to_string_lossy()),
        commit_ms = COMMIT_INTERVAL.as_millis(),
        fetch_wait_ms = FETCH_WAIT_MAX.as_millis(),
        fetch_queue_backoff_ms = FETCH_QUEUE_BACKOFF.as_millis(),
        shards = p.shards,
        bootstrap = quote(p.bootstrap),
        topic = quote(p.topic),
        partitions = p.partitions,
        sink = quote(&p.sink_dir.to_string_lossy()),
        listen = quote(p.metrics_listen),
    )
}

/// The click events of the prefill and the live phases (seeded, no malformed or late ones).
pub fn click_generator(seed: u64) -> ClickGenerator {
    ClickGenerator::new(ClickGeneratorSettings {
        seed,
        users: CLICK_USERS,
        pages: CLICK_PAGES,
        disorder_ms: CLICK_DISORDER_MS,
        late_share: 0.0,
        late_by_ms: 0,
        malformed_share: 0.0,
    })
}

/// What [`prefill_events`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Prefill {
    pub events: u64,
    /// Events per partition, index = partition.
    pub per_partition: Vec<u64>,
    /// Key + payload bytes.
    pub bytes: u64,
    pub seconds: f64,
}

impl Prefill {
    pub fn average_event_bytes(&self) -> f64 {
        self.bytes as f64 / self.events.max(1) as f64
    }
}

/// Produces `events` events of `generator` (click events in the load test) into `topic`,
/// event *n* to partition *n* mod `partitions` (an even spread), event times from
/// `first_event_ms` at ten per millisecond; waits until every one is delivered.
pub fn prefill_events(
    producer: &EventProducer,
    topic: &str,
    partitions: i32,
    events: u64,
    first_event_ms: i64,
    generator: &mut impl EventGenerator,
) -> Result<Prefill, ProducerError> {
    let started = Instant::now();
    let mut event = GeneratedEvent::default();
    let mut bytes = 0u64;
    let mut per_partition = vec![0u64; partitions.max(1) as usize];
    for seq in 0..events {
        generator.next_event_into(first_event_ms + (seq / PREFILL_EVENTS_PER_MS) as i64, &mut event);
        bytes += (event.key.len() + event.payload.len()) as u64;
        let partition = (seq % per_partition.len() as u64) as usize;
        per_partition[partition] += 1;
        producer.send(topic, Some(partition as i32), &event.key, &event.payload)?;
    }
    producer.flush(Duration::from_secs(120))?;
    Ok(Prefill {
        events,
        per_partition,
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What [`consume_and_decode`] measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Baseline {
    pub events: u64,
    pub threads: usize,
    /// From the first message any consumer read to the last one decoded (the time to the
    /// first fetch answer is left out, as it is for the pipeline's catch-up).
    pub seconds: f64,
}

impl Baseline {
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.seconds.max(1e-9)
    }
}

/// The baseline: `threads` consumers with the pipeline's librdkafka settings, each assigned
/// its round-robin share of the partitions (as the pipeline's shards are), read the topic
/// (source 0 of `config`) from the beginning, `per_partition[p]` events of partition p, and
/// decode every message with the pipeline's decoder, doing nothing else. Errors unless all
/// are read within `timeout`.
///
/// The counts come from the producer, not from the broker's end offsets: tansu 0.6 reports
/// a partition's end as the base offset of its last batch, short of the real end.
pub fn consume_and_decode(config: &Config, bootstrap: &str, threads: usize, per_partition: &[u64], timeout: Duration) -> Result<Baseline, LoadTestError> {
    let source = &config.sources[0];
    let partitions = per_partition.len() as i32;
    let expected: u64 = per_partition.iter().sum();
    let kafka_error = |what: &str| {
        let what = what.to_owned();
        move |source| LoadTestError::Kafka {
            what,
            bootstrap: bootstrap.to_owned(),
            source: Box::new(source),
        }
    };
    // One consumer per thread, assigned before the clock starts.
    let mut consumers = Vec::with_capacity(threads);
    for thread in 0..threads {
        let mut client = consumer_config(config, bootstrap);
        client.set("group.id", "tidemark-loadtest-baseline");
        let consumer: BaseConsumer = client.create().map_err(kafka_error("creating the baseline consumer"))?;
        // Without the topic's metadata at hand, librdkafka resolves `Offset::Beginning` only
        // after a 500 ms retry; the pipeline's first event is late by as much (left out of its
        // measured time, as this is).
        consumer
            .fetch_metadata(Some(&source.topic), Duration::from_secs(10))
            .map_err(kafka_error("reading the topic's metadata"))?;
        let mut assignment = TopicPartitionList::new();
        let mut want = 0u64;
        for partition in (0..partitions).filter(|p| *p as usize % threads == thread) {
            want += per_partition[partition as usize];
            assignment
                .add_partition_offset(&source.topic, partition, Offset::Beginning)
                .map_err(kafka_error("assigning partitions"))?;
        }
        consumer.assign(&assignment).map_err(kafka_error("assigning partitions"))?;
        consumers.push((consumer, want));
    }
    let start = Barrier::new(threads + 1);
    let deadline = std::sync::OnceLock::new();
    // Each worker: (events read, when it read its first, when its last).
    let (read, seconds) = std::thread::scope(|s| {
        let workers: Vec<_> = consumers
            .into_iter()
            .map(|(consumer, want)| {
                let (start, deadline) = (&start, &deadline);
                s.spawn(move || {
                    let mut decoder = SourceDecoder::new(source);
                    start.wait();
                    let deadline: Instant = *deadline.get_or_init(|| Instant::now() + timeout);
                    let (mut read, mut first, mut last) = (0u64, None, None);
                    while read < want && Instant::now() < deadline {
                        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                            std::hint::black_box(decoder.decode(message.payload().unwrap_or(&[])).ok());
                            read += 1;
                            let now = Instant::now();
                            first.get_or_insert(now);
                            last = Some(now);
                        }
                    }
                    (read, first, last)
                })
            })
            .collect();
        start.wait();
        let results: Vec<(u64, Option<Instant>, Option<Instant>)> = workers.into_iter().map(|w| w.join().unwrap_or((0, None, None))).collect();
        let read: u64 = results.iter().map(|r| r.0).sum();
        let first = results.iter().filter_map(|r| r.1).min();
        let last = results.iter().filter_map(|r| r.2).max();
        let seconds = match (first, last) {
            (Some(first), Some(last)) => (last - first).as_secs_f64(),
            _ => 0.0,
        };
        (read, seconds)
    });
    if read != expected {
        return Err(LoadTestError::Baseline { read, expected, timeout });
    }
    Ok(Baseline {
        events: read,
        threads,
        seconds,
    })
}

// ---------------------------------------------------------------------------------------
// Pure parts: Prometheus text, histogram quantiles, step verdicts, the rate search
// ---------------------------------------------------------------------------------------

/// Sample lines of a Prometheus text exposition as (metric name, labels without braces, value).
fn samples(text: &str) -> impl Iterator<Item = (&str, &str, f64)> {
    text.lines().filter_map(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let (name, labels, rest) = match line.find('{') {
            Some(open) if line[..open].find(char::is_whitespace).is_none() => {
                let close = line.rfind('}')?;
                (&line[..open], &line[open + 1..close], &line[close + 1..])
            }
            _ => {
                let end = line.find(char::is_whitespace)?;
                (&line[..end], "", &line[end..])
            }
        };
        let value = parse_value(rest.split_whitespace().next()?)?;
        Some((name, labels, value))
    })
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

/// The value of label `name` in a label set like `shard="0",le="0.5"`.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let mut rest = labels;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        // Values escape `"` as `\"`: the value ends at the first unescaped quote.
        let bytes = after.as_bytes();
        let mut end = 0;
        while end < bytes.len() && !(bytes[end] == b'"' && (end == 0 || bytes[end - 1] != b'\\')) {
            end += 1;
        }
        if key.trim_start_matches(',').trim() == name {
            return Some(&after[..end]);
        }
        rest = after.get(end + 1..)?.trim_start_matches(',');
    }
    None
}

/// The sum of every sample of metric `name` (all label values); `None` when there is none.
pub fn family_sum(text: &str, name: &str) -> Option<f64> {
    samples(text)
        .filter(|(n, _, _)| *n == name)
        .map(|(_, _, v)| v)
        .fold(None, |sum, v| Some(sum.unwrap_or(0.0) + v))
}

/// Cumulative histogram buckets: (upper bound, count), ascending, the last bound `+Inf`.
pub type Buckets = Vec<(f64, f64)>;

/// The cumulative buckets of histogram `name` as (upper bound, count), ascending and ending
/// at `+Inf`; series that differ in other labels (per shard, say) are added up per bound.
/// `None` when the histogram is not exported.
pub fn histogram_buckets(text: &str, name: &str) -> Option<Buckets> {
    let bucket = format!("{name}_bucket");
    let mut buckets: Buckets = Vec::new();
    for (_, labels, value) in samples(text).filter(|(n, _, _)| *n == bucket) {
        let Some(le) = label(labels, "le").and_then(parse_value) else {
            continue;
        };
        match buckets.iter_mut().find(|(bound, _)| *bound == le) {
            Some((_, count)) => *count += value,
            None => buckets.push((le, value)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    (!buckets.is_empty()).then_some(buckets)
}

/// What was observed between two scrapes: `end` minus `start`, bound by bound (a bound that
/// `start` lacks counts from zero). Negative differences (a restarted process) become zero.
pub fn bucket_delta(start: Option<&[(f64, f64)]>, end: &[(f64, f64)]) -> Buckets {
    end.iter()
        .map(|&(le, count)| {
            let before = start.and_then(|s| s.iter().find(|(b, _)| *b == le)).map_or(0.0, |(_, c)| *c);
            (le, (count - before).max(0.0))
        })
        .collect()
}

/// The `q` quantile (0..=1) of cumulative `buckets` (ascending, the last one `+Inf`), as
/// Prometheus' `histogram_quantile` computes it: find the bucket holding rank q × total and
/// interpolate linearly inside it (the lowest bucket starts at 0). A rank in the `+Inf`
/// bucket answers the highest finite bound. `None` when the histogram is empty.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total.is_nan() || total <= 0.0 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (i, &(le, count)) in buckets.iter().enumerate() {
        if count >= rank && count > lower.1 {
            if le.is_infinite() {
                return Some(if i == 0 { 0.0 } else { lower.0 });
            }
            let start = if i == 0 { le.min(0.0) } else { lower.0 };
            return Some(start + (le - start) * (rank - lower.1) / (count - lower.1));
        }
        lower = (le, count);
    }
    Some(lower.0)
}

/// p50, p99 and p999 of one histogram over one phase, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Quantiles {
    /// Observations in the phase.
    pub count: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

impl Quantiles {
    /// From the phase's buckets ([`bucket_delta`]); `None` when nothing was observed.
    pub fn from_buckets(buckets: &[(f64, f64)]) -> Option<Quantiles> {
        Some(Quantiles {
            count: buckets.last()?.1,
            p50: histogram_quantile(0.5, buckets)?,
            p99: histogram_quantile(0.99, buckets)?,
            p999: histogram_quantile(0.999, buckets)?,
        })
    }
}

/// Consumer lag (events produced and delivered, not yet received) during a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LagSample {
    /// Since the step began.
    pub seconds: f64,
    pub lag: u64,
}

/// Whether a live step at `target_rate` for `step` kept up: the producer produced at least
/// 95% of the target, the step was not cut short (`cap_hit`: the lag that neared the
/// embedded broker's retention), the lag at the end is below max(one second of events,
/// `floor`), and the lag is not growing: the mean over the last quarter of the step exceeds
/// the mean over the second quarter by less than a quarter of that limit (a lag that climbs
/// from zero to just under the limit would pass the end check; this catches a pipeline
/// running more than ~5% short of the rate). Returns the verdict and a few words on it.
pub fn judge_step(target_rate: u64, produced: u64, step: Duration, samples: &[LagSample], floor: u64, cap_hit: Option<u64>) -> (bool, String) {
    let limit = target_rate.max(floor);
    let final_lag = samples.last().map_or(0, |s| s.lag);
    if let Some(lag) = cap_hit {
        return (
            false,
            format!(
                "stopped after {:.1} s: lag {lag} events neared the broker's retention",
                samples.last().map_or(0.0, |s| s.seconds)
            ),
        );
    }
    let target = target_rate as f64 * step.as_secs_f64();
    if (produced as f64) < 0.95 * target {
        return (
            false,
            format!(
                "the producer reached only {:.0} events/s (it shares the CPUs with the pipeline and the broker)",
                produced as f64 / step.as_secs_f64()
            ),
        );
    }
    if final_lag > limit {
        return (false, format!("lag {final_lag} > {limit} events (1 s of input) at the end"));
    }
    let seconds = step.as_secs_f64();
    let mean_between = |from: f64, to: f64| {
        let lags: Vec<f64> = samples
            .iter()
            .filter(|s| s.seconds >= from * seconds && s.seconds <= to * seconds)
            .map(|s| s.lag as f64)
            .collect();
        (!lags.is_empty()).then(|| lags.iter().sum::<f64>() / lags.len() as f64)
    };
    if let (Some(early), Some(late)) = (mean_between(0.25, 0.5), mean_between(0.75, 1.0)) {
        if late - early > limit as f64 / 4.0 {
            return (false, format!("lag grew from {early:.0} to {late:.0} events on average"));
        }
    }
    (true, format!("lag {final_lag} events at the end"))
}

/// Finds the highest sustained rate: doubles from the start rate until a step fails (or
/// halves until one holds), then bisects between the best sustained and the lowest failed
/// rate a few times. Bounded by a number of steps.
#[derive(Debug, Clone, PartialEq)]
pub struct RateSearch {
    next: Option<u64>,
    best: Option<u64>,
    lowest_failed: Option<u64>,
    bisections_left: u32,
    steps_left: u32,
    min_rate: u64,
}

impl RateSearch {
    pub fn new(start: u64, bisections: u32, max_steps: u32, min_rate: u64) -> Self {
        RateSearch {
            next: (max_steps > 0).then(|| round_rate(start.max(min_rate))),
            best: None,
            lowest_failed: None,
            bisections_left: bisections,
            steps_left: max_steps,
            min_rate,
        }
    }

    /// The rate to try next; `None` once the search is over.
    pub fn next_rate(&self) -> Option<u64> {
        self.next
    }

    /// The highest rate sustained so far.
    pub fn best(&self) -> Option<u64> {
        self.best
    }

    pub fn record(&mut self, rate: u64, sustained: bool) {
        self.steps_left = self.steps_left.saturating_sub(1);
        if sustained {
            self.best = Some(self.best.map_or(rate, |b| b.max(rate)));
        } else {
            self.lowest_failed = Some(self.lowest_failed.map_or(rate, |f| f.min(rate)));
        }
        self.next = if self.steps_left == 0 {
            None
        } else {
            match (self.best, self.lowest_failed) {
                (Some(best), None) => Some(round_rate(best.saturating_mul(2))),
                (None, Some(failed)) => Some(round_rate(failed / 2)).filter(|r| *r >= self.min_rate && *r < failed),
                (Some(best), Some(failed)) => {
                    let middle = round_rate(best + failed.saturating_sub(best) / 2);
                    // Done when out of bisections or the bracket is within 5% (or inverted by noise).
                    if self.bisections_left == 0 || failed <= best + best / 20 || middle <= best || middle >= failed {
                        None
                    } else {
                        self.bisections_left -= 1;
                        Some(middle)
                    }
                }
                (None, None) => None,
            }
        };
    }
}

/// Rates in round numbers: to 1,000 above 10,000 events/s, else to 100.
fn round_rate(rate: u64) -> u64 {
    let unit = if rate >= 10_000 { 1_000 } else { 100 };
    ((rate + unit / 2) / unit * unit).max(unit)
}

pub use tidemark::telemetry::ProcStats;

// ---------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------

/// The machine the test ran on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub memory_bytes: u64,
    pub kernel: String,
}

impl Machine {
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map_or_else(|| "unknown CPU".to_owned(), |(_, m)| m.trim().to_owned()),
            memory_bytes: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                .map_or(0, |kb| kb * 1024),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned()),
        }
    }
}

/// The catch-up phase: a child reading the prefilled topic.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CatchUp {
    /// Events in the topic.
    pub events: u64,
    /// Events received between the first scrape that showed any and the first that showed
    /// all (the time to the first fetch answer is left out, as it is for the baseline).
    pub events_measured: u64,
    pub seconds: f64,
    /// From spawning the child until `/readyz` answered 200.
    pub startup_seconds: f64,
    /// From ready until the first scrape that showed events.
    pub first_event_seconds: f64,
    /// The child's CPU time (user + system) over `seconds`.
    pub cpu_seconds: f64,
}

impl CatchUp {
    pub fn events_per_second(&self) -> f64 {
        self.events_measured as f64 / self.seconds.max(1e-9)
    }

    /// Clock ticks are 10 ms: the CPU time is read to within 0.01 s.
    pub fn events_per_cpu_second(&self) -> f64 {
        self.events_measured as f64 / self.cpu_seconds.max(0.01)
    }
}

/// One step of the live rate search.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    pub target_rate: u64,
    pub produced: u64,
    pub seconds: f64,
    pub final_lag: u64,
    pub max_lag: u64,
    pub sustained: bool,
    /// Failed because the producer (on the same machine) fell short of the target rate: the
    /// pipeline's own limit was not reached.
    pub producer_bound: bool,
    pub verdict: String,
}

/// The latency phase at half the highest sustained rate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latency {
    pub rate: u64,
    pub step: Step,
    /// `None` when the pipeline does not export the histogram (or observed nothing).
    pub ingest_to_commit: Option<Quantiles>,
    pub event_time_to_commit: Option<Quantiles>,
}

/// The keys phase: many distinct group keys in one window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Keys {
    pub keys: u64,
    /// `tidemark_state_keys` summed over shards after the phase.
    pub state_keys: Option<f64>,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    pub seconds: f64,
}

/// Everything the load test measured; `Display` prints the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadTestReport {
    pub date_utc: String,
    pub command: String,
    pub machine: Machine,
    pub broker: String,
    pub topic: String,
    pub partitions: i32,
    pub shards: usize,
    pub events: u64,
    pub event_bytes_avg: f64,
    pub step_seconds: f64,
    /// The best of the rounds, and every round's events/s.
    pub baseline: Baseline,
    pub baseline_rounds: Vec<f64>,
    pub catch_up: CatchUp,
    pub catch_up_rounds: Vec<f64>,
    /// Live steps stop when the lag exceeds this (embedded broker only).
    pub lag_cap: Option<u64>,
    pub steps: Vec<Step>,
    pub max_sustained_rate: Option<u64>,
    pub latency: Option<Latency>,
    pub keys: Option<Keys>,
    /// The child's VmHWM just before it was stopped.
    pub peak_rss_bytes: u64,
    /// Its VmHWM before the keys phase (after the live phases).
    pub peak_rss_before_keys_bytes: u64,
    pub child_cpu_seconds: f64,
    /// How the child exited after SIGTERM (`exit status: 0` when it committed and stopped).
    pub child_exit: String,
    pub metrics_file: PathBuf,
    pub metrics_series: usize,
    /// `promtool check metrics` on the last scrape; `None` when promtool is not installed.
    pub promtool: Option<String>,
    pub out_dir: PathBuf,
}

impl LoadTestReport {
    pub fn catch_up_ratio(&self) -> f64 {
        self.catch_up.events_per_second() / self.baseline.events_per_second().max(1e-9)
    }
}

/// "met" or "missed".
fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "missed"
    }
}

impl LoadTestReport {
    /// The performance targets beside what this run measured (measured, never asserted).
    fn write_targets(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "performance targets")?;
        let per_shard = self.catch_up.events_per_second() / self.shards as f64;
        let per_cpu = self.catch_up.events_per_cpu_second();
        writeln!(
            f,
            "  >= 500k events/s per core          per shard {per_shard:.0} ({}), per CPU-second {per_cpu:.0} ({})",
            verdict(per_shard >= 500_000.0),
            verdict(per_cpu >= 500_000.0)
        )?;
        let ratio = self.catch_up_ratio();
        writeln!(f, "  >= 60% of the baseline             {:.0}% ({})", ratio * 100.0, verdict(ratio >= 0.6))?;
        let p99_limit = COMMIT_INTERVAL.as_secs_f64() + 0.25;
        match self.latency.as_ref().and_then(|l| l.ingest_to_commit) {
            Some(q) => writeln!(
                f,
                "  p99 ingest→commit <= {p99_limit:.2} s       {:.3} s ({})",
                q.p99,
                verdict(q.p99 <= p99_limit)
            )?,
            None => writeln!(f, "  p99 ingest→commit <= {p99_limit:.2} s       n/a")?,
        }
        match &self.keys {
            Some(k) if k.keys >= 1_000_000 => writeln!(
                f,
                "  peak RSS <= 300 MB with 1M keys    {:.0} MB ({})",
                k.peak_rss_bytes as f64 / 1e6,
                verdict(k.peak_rss_bytes <= 300_000_000)
            ),
            _ => writeln!(f, "  peak RSS <= 300 MB with 1M keys    n/a (run with --keys 1000000)"),
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn quantiles_line(q: &Option<Quantiles>, name: &str) -> String {
    match q {
        Some(q) => format!("p50 {:.3} s   p99 {:.3} s   p999 {:.3} s   (n = {:.0})", q.p50, q.p99, q.p999, q.count),
        None => format!("n/a (the pipeline exports no {name} observations)"),
    }
}

impl fmt::Display for LoadTestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.machine;
        writeln!(f, "tidemark load test, {}", self.date_utc)?;
        writeln!(f, "command:  {}", self.command)?;
        writeln!(
            f,
            "machine:  {} cores ({}), {} RAM, Linux {}",
            m.cores,
            m.cpu_model,
            mib(m.memory_bytes),
            m.kernel
        )?;
        writeln!(f, "broker:   {}", self.broker)?;
        writeln!(
            f,
            "workload: {} click events ({:.0} B avg) in {} partitions of topic {}; the demo's page_views_5min",
            self.events, self.event_bytes_avg, self.partitions, self.topic
        )?;
        writeln!(
            f,
            "          query (5-minute tumbling count per page_url) into Delta, commit_interval 1s, {} shards,",
            self.shards
        )?;
        writeln!(f, "          run as a child process (`tidemark run`) so its RSS and CPU are its own")?;
        if let Some(cap) = self.lag_cap {
            writeln!(
                f,
                "lag cap:  {cap} events (1/3 of the embedded broker's ~5 MB per partition): a live step stops there"
            )?;
        }
        writeln!(f)?;
        let base = self.baseline.events_per_second();
        let catch = self.catch_up.events_per_second();
        let rounds = |rates: &[f64]| rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ");
        writeln!(
            f,
            "throughput: catch-up on the prefilled topic, best of {} rounds (first to last event read)",
            self.baseline_rounds.len()
        )?;
        writeln!(
            f,
            "  baseline (raw consume + JSON decode, {} threads)   {:>10.0} events/s  ({:.0} per thread)",
            self.baseline.threads,
            base,
            base / self.baseline.threads as f64
        )?;
        writeln!(
            f,
            "  pipeline (Kafka JSON → window → Delta)             {:>10.0} events/s  ({:.0} per shard)",
            catch,
            catch / self.shards as f64
        )?;
        writeln!(f, "  pipeline / baseline                                {:>10.2}", self.catch_up_ratio())?;
        writeln!(
            f,
            "  pipeline per CPU-second of the child               {:>10.0} events/s  ({:.2} CPU-s for {} events in {:.2} s)",
            self.catch_up.events_per_cpu_second(),
            self.catch_up.cpu_seconds,
            self.catch_up.events,
            self.catch_up.seconds
        )?;
        writeln!(
            f,
            "  pipeline start-up (spawn → ready → first event)    {:>10.2} s + {:.2} s",
            self.catch_up.startup_seconds, self.catch_up.first_event_seconds
        )?;
        writeln!(f, "  rounds: baseline {} events/s", rounds(&self.baseline_rounds))?;
        writeln!(f, "          pipeline {} events/s", rounds(&self.catch_up_rounds))?;
        writeln!(f)?;
        writeln!(
            f,
            "max sustained live rate: steps of {:.0} s; the producer and the broker share the {} cores",
            self.step_seconds, m.cores
        )?;
        for s in &self.steps {
            writeln!(
                f,
                "  {:>9}/s  {:<13}  max lag {:>7}  {}",
                s.target_rate,
                if s.sustained { "sustained" } else { "NOT sustained" },
                s.max_lag,
                s.verdict
            )?;
        }
        match self.max_sustained_rate {
            Some(rate) => {
                writeln!(f, "  max sustained: {rate} events/s ({:.0} per shard)", rate as f64 / self.shards as f64)?;
                let above: Vec<&Step> = self.steps.iter().filter(|s| !s.sustained && s.target_rate > rate).collect();
                if !above.is_empty() && above.iter().all(|s| s.producer_bound) {
                    writeln!(
                        f,
                        "  (a lower bound: every faster step failed because the producer, on the same cores, fell short)"
                    )?;
                }
            }
            None => writeln!(f, "  max sustained: none of the rates tried")?,
        }
        writeln!(f)?;
        match &self.latency {
            Some(l) => {
                writeln!(
                    f,
                    "latency at half the max sustained rate: {} events/s for {:.0} s ({} events, {})",
                    l.rate,
                    l.step.seconds,
                    l.step.produced,
                    if l.step.sustained { "sustained" } else { "NOT sustained" }
                )?;
                writeln!(f, "  ingest → commit       {}", quantiles_line(&l.ingest_to_commit, INGEST_TO_COMMIT))?;
                writeln!(f, "  event time → commit   {}", quantiles_line(&l.event_time_to_commit, EVENT_TIME_TO_COMMIT))?;
            }
            None => writeln!(f, "latency: n/a (no rate was sustained)")?,
        }
        writeln!(f)?;
        writeln!(f, "memory")?;
        writeln!(f, "  peak RSS of the pipeline (VmHWM)    {}", mib(self.peak_rss_bytes))?;
        if self.keys.is_some() {
            writeln!(f, "  ... before the keys phase           {}", mib(self.peak_rss_before_keys_bytes))?;
        }
        writeln!(f, "  pipeline CPU over the whole run     {:.1} s", self.child_cpu_seconds)?;
        if let Some(k) = &self.keys {
            writeln!(
                f,
                "  {} keys in one 5-minute window:   state keys {}, RSS {}, peak {} ({:.1} s to fill)",
                k.keys,
                k.state_keys.map_or_else(|| "n/a".to_owned(), |n| format!("{n:.0}")),
                mib(k.rss_bytes),
                mib(k.peak_rss_bytes),
                k.seconds
            )?;
        }
        writeln!(f, "  pipeline exit after SIGTERM         {}", self.child_exit)?;
        writeln!(f)?;
        self.write_targets(f)?;
        writeln!(f)?;
        writeln!(
            f,
            "metrics: last scrape ({} series) in {}; promtool check metrics: {}",
            self.metrics_series,
            self.metrics_file.display(),
            self.promtool.as_deref().unwrap_or("not run (promtool not on PATH)")
        )?;
        write!(
            f,
            "files:   {} (pipeline.toml, pipeline.log, metrics.prom, lag.csv, report.txt, report.json)",
            self.out_dir.display()
        )
    }
}

// ---------------------------------------------------------------------------------------
// The child process and its metrics endpoint
// ---------------------------------------------------------------------------------------

/// One HTTP/1.1 GET; returns (status, body).
fn http_get(address: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    Ok((status, body.to_owned()))
}

/// The last lines of a log file.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `tidemark run` as a child process; killed if dropped while running.
struct PipelineChild {
    child: Child,
    metrics: SocketAddr,
    log: PathBuf,
    spawned_at: Instant,
    last_scrape: String,
}

impl PipelineChild {
    fn spawn(exe: &Path, pipeline: &Path, log: &Path, metrics: SocketAddr) -> Result<Self, LoadTestError> {
        let log_file = File::create(log).map_err(io_error(format!("cannot create {}", log.display())))?;
        let stderr = log_file.try_clone().map_err(io_error("cannot share the log file"))?;
        let child = Command::new(exe)
            .arg("run")
            .arg(pipeline)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(stderr)
            .spawn()
            .map_err(io_error(format!("cannot run {}", exe.display())))?;
        Ok(PipelineChild {
            child,
            metrics,
            log: log.to_owned(),
            spawned_at: Instant::now(),
            last_scrape: String::new(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn failure(&self, what: impl Into<String>) -> LoadTestError {
        LoadTestError::Pipeline {
            what: what.into(),
            log: self.log.clone(),
            tail: tail(&self.log, 20),
        }
    }

    fn check_alive(&mut self) -> Result<(), LoadTestError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.failure(format!("exited unexpectedly ({status})"))),
            Err(e) => Err(self.failure(format!("cannot be watched ({e})"))),
        }
    }

    /// Scrapes `/metrics`; keeps the text as the last scrape.
    fn scrape(&mut self) -> Result<&str, LoadTestError> {
        self.check_alive()?;
        match http_get(self.metrics, "/metrics") {
            Ok((200, body)) => {
                self.last_scrape = body;
                Ok(&self.last_scrape)
            }
            Ok((status, _)) => Err(self.failure(format!("answered /metrics with HTTP {status}"))),
            Err(e) => {
                self.check_alive()?;
                Err(self.failure(format!("did not answer /metrics on {} ({e})", self.metrics)))
            }
        }
    }

    fn received(&mut self) -> Result<u64, LoadTestError> {
        Ok(family_sum(self.scrape()?, EVENTS_RECEIVED).unwrap_or(0.0) as u64)
    }

    /// Waits for `/readyz` to answer 200; returns when it did.
    fn wait_ready(&mut self, interrupt: &AtomicBool) -> Result<Instant, LoadTestError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_alive()?;
            if let Ok((200, _)) = http_get(self.metrics, "/readyz") {
                return Ok(Instant::now());
            }
            if interrupt.load(Relaxed) {
                return Err(LoadTestError::Interrupted);
            }
            if Instant::now() > deadline {
                return Err(self.failure(format!("was not ready within {READY_TIMEOUT:?} (GET /readyz on {})", self.metrics)));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn proc_stats(&self) -> ProcStats {
        ProcStats::read(self.pid()).unwrap_or_default()
    }

    /// SIGTERM (the pipeline commits its epoch and exits), SIGKILL after a timeout.
    fn stop(&mut self) -> Result<ExitStatus, LoadTestError> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Ok(status);
        }
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(self.failure(format!("did not stop within {STOP_TIMEOUT:?} of SIGTERM and was killed")));
                }
            }
        }
    }
}

impl Drop for PipelineChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A directory removed when dropped (the child's state and Delta tables).
struct TempDir(PathBuf);

impl TempDir {
    fn create(prefix: &str) -> Result<TempDir, LoadTestError> {
        let path = std::env::temp_dir().join(prefix);
        std::fs::create_dir_all(&path).map_err(io_error(format!("cannot create {}", path.display())))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback port nothing listens on right now.
fn free_port() -> Result<u16, LoadTestError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_error("cannot bind a loopback port"))?;
    Ok(listener.local_addr().map_err(io_error("cannot read the bound port"))?.port())
}

/// Creates `topic` with `partitions` partitions on an external broker (CreateTopics).
fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> Result<(), LoadTestError> {
    let kafka = |what: &str, source| LoadTestError::Kafka {
        what: what.to_owned(),
        bootstrap: bootstrap.to_owned(),
        source: Box::new(source),
    };
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| kafka("creating an admin client", e))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(io_error("cannot start a runtime for the admin client"))?;
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(30)))
        .request_timeout(Some(Duration::from_secs(30)));
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let results = runtime
        .block_on(admin.create_topics([&new_topic], &options))
        .map_err(|e| kafka(&format!("creating topic {topic}"), e))?;
    for result in results {
        if let Err((name, code)) = result {
            if code != RDKafkaErrorCode::TopicAlreadyExists {
                return Err(kafka(&format!("creating topic {name}"), KafkaError::AdminOp(code)));
            }
        }
    }
    Ok(())
}

/// Runs `promtool check metrics` on `file`; `None` when promtool is not installed.
fn promtool_check(file: &Path) -> Option<String> {
    let input = File::open(file).ok()?;
    let output = match Command::new("promtool").args(["check", "metrics"]).stdin(input).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(format!("could not run promtool: {e}")),
    };
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let text = text.trim().replace('\n', "; ");
    Some(match (output.status.success(), text.is_empty()) {
        (true, true) => "OK".to_owned(),
        (true, false) => format!("OK ({text})"),
        (false, _) => format!("FAILED ({text})"),
    })
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

/// Progress lines on stderr while the test runs (the report goes to stdout).
fn say(text: impl fmt::Display) {
    eprintln!("loadtest: {text}");
}

/// (a) A fresh child reads the prefilled topic of `events` events: the rate from the first
/// scrape showing events received to the first showing all.
/// While `producing` runs, scrapes the child's received count every [`SCRAPE_EVERY`] and hands
/// it to `on_received`. A failed scrape or an interrupt sets `stop` (the producer's stop flag);
/// the scrape error is returned once the producer has finished.
fn watch_producer<T>(
    producing: &std::thread::ScopedJoinHandle<'_, T>,
    child: &mut PipelineChild,
    stop: &AtomicBool,
    interrupt: &AtomicBool,
    mut on_received: impl FnMut(u64),
) -> Result<(), LoadTestError> {
    let mut watched = Ok(());
    while !producing.is_finished() {
        std::thread::sleep(SCRAPE_EVERY);
        match child.received() {
            Ok(n) => on_received(n),
            Err(e) => {
                stop.store(true, Relaxed);
                watched = Err(e);
            }
        }
        if interrupt.load(Relaxed) {
            stop.store(true, Relaxed);
        }
    }
    watched
}

fn catch_up(child: &mut PipelineChild, events: u64, interrupt: &AtomicBool) -> Result<CatchUp, LoadTestError> {
    let ready = child.wait_ready(interrupt)?;
    let startup_seconds = (ready - child.spawned_at).as_secs_f64();
    let deadline = ready + Duration::from_secs(60).max(Duration::from_secs(events / 5_000));
    // (when, events received, child CPU seconds) at the first scrape that showed events;
    // the same at ready in case one scrape shows them all.
    let mut first: Option<(Instant, u64, f64)> = None;
    let at_ready = (ready, 0, child.proc_stats().cpu_seconds);
    let mut previous = (ready, 0u64);
    loop {
        if interrupt.load(Relaxed) {
            return Err(LoadTestError::Interrupted);
        }
        let received = child.received()?;
        let now = Instant::now();
        if received >= events {
            let (start, received_before, cpu_before) = first.unwrap_or(at_ready);
            // When the count crossed `events`, between the previous scrape and this one.
            let share = (events - previous.1) as f64 / (received - previous.1).max(1) as f64;
            let done = previous.0 + (now - previous.0).mul_f64(share.clamp(0.0, 1.0));
            return Ok(CatchUp {
                events,
                events_measured: events - received_before,
                seconds: done.saturating_duration_since(start).as_secs_f64(),
                startup_seconds,
                first_event_seconds: (first.map_or(now, |f| f.0) - ready).as_secs_f64(),
                cpu_seconds: child.proc_stats().cpu_seconds - cpu_before,
            });
        }
        if received > 0 && first.is_none() {
            first = Some((now, received, child.proc_stats().cpu_seconds));
        }
        previous = (now, received);
        if now > deadline {
            return Err(child.failure(format!("received only {received} of {events} prefilled events")));
        }
        std::thread::sleep(CATCH_UP_SCRAPE_EVERY);
    }
}

/// The state of a run between phases.
struct Run<'a> {
    settings: &'a LoadTestSettings,
    interrupt: &'a AtomicBool,
    producer: EventProducer,
    topic: String,
    child: PipelineChild,
    /// Live phases stop producing when the lag exceeds this (the embedded broker's retention).
    lag_cap: u64,
    steps_run: u32,
    /// Every lag sample of the live steps, as CSV (written to lag.csv).
    lag_csv: String,
}

impl Run<'_> {
    fn interrupted(&self) -> Result<(), LoadTestError> {
        if self.interrupt.load(Relaxed) {
            Err(LoadTestError::Interrupted)
        } else {
            Ok(())
        }
    }

    /// Waits until the child has received everything delivered (lag ≤ `floor`).
    fn drain(&mut self, floor: u64) -> Result<(), LoadTestError> {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            self.interrupted()?;
            let lag = self.producer.delivered_count().saturating_sub(self.child.received()?);
            if lag <= floor {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self
                    .child
                    .failure(format!("still lagged {lag} events behind {DRAIN_TIMEOUT:?} after the producer stopped")));
            }
            std::thread::sleep(SCRAPE_EVERY);
        }
    }

    /// One live step: produce at `rate` for the step length while scraping the lag.
    fn live_step(&mut self, rate: u64, generator: &mut ClickGenerator) -> Result<Step, LoadTestError> {
        let step = self.settings.step;
        let stop = AtomicBool::new(false);
        let load = ProduceSettings {
            rate: Rate::PerSecond(rate),
            count: None,
            duration: Some(step),
            progress_every: None,
            stop_on_failure: false,
        };
        let (producer, topic, child, lag_cap, interrupt) = (&self.producer, self.topic.as_str(), &mut self.child, self.lag_cap, self.interrupt);
        let mut samples = Vec::new();
        let mut cap_hit = None;
        let started = Instant::now();
        let report = std::thread::scope(|s| {
            let producing = s.spawn(|| produce_events(producer, topic, generator, &load, &stop, |_| {}));
            let watched = watch_producer(&producing, child, &stop, interrupt, |received| {
                let lag = producer.delivered_count().saturating_sub(received);
                samples.push(LagSample {
                    seconds: started.elapsed().as_secs_f64(),
                    lag,
                });
                if lag > lag_cap && cap_hit.is_none() {
                    cap_hit = Some(lag);
                    stop.store(true, Relaxed);
                }
            });
            let produced = producing.join().expect("the producer thread does not panic");
            watched.map(|()| produced)
        })?;
        let report = report?;
        self.interrupted()?;
        if report.failed > 0 {
            return Err(ProducerError::DeliveryFailed {
                failed: report.failed,
                first_error: report.first_error.unwrap_or_default(),
            }
            .into());
        }
        let (sustained, verdict) = judge_step(rate, report.produced, step, &samples, LAG_FLOOR_EVENTS, cap_hit);
        let producer_bound = !sustained && cap_hit.is_none() && (report.produced as f64) < 0.95 * rate as f64 * step.as_secs_f64();
        self.steps_run += 1;
        for sample in &samples {
            self.lag_csv
                .push_str(&format!("{},{rate},{:.3},{}\n", self.steps_run, sample.seconds, sample.lag));
        }
        Ok(Step {
            target_rate: rate,
            produced: report.produced,
            seconds: report.elapsed.as_secs_f64(),
            final_lag: samples.last().map_or(0, |s| s.lag),
            max_lag: samples.iter().map(|s| s.lag).max().unwrap_or(0),
            sustained,
            producer_bound,
            verdict,
        })
    }

    /// (b) Doubles, then bisects, the live rate.
    fn search(&mut self, start_rate: u64, generator: &mut ClickGenerator) -> Result<(Vec<Step>, Option<u64>), LoadTestError> {
        let mut search = RateSearch::new(start_rate, SEARCH_BISECTIONS, SEARCH_MAX_STEPS, SEARCH_MIN_RATE);
        let mut steps = Vec::new();
        while let Some(rate) = search.next_rate() {
            let step = self.live_step(rate, generator)?;
            say(format_args!(
                "{rate} events/s for {:.0} s: {} ({})",
                step.seconds,
                if step.sustained { "sustained" } else { "NOT sustained" },
                step.verdict
            ));
            // A producer that fell short sets the ceiling for the search: no rate above what it
            // reached can be tried on this machine.
            let reached = (step.produced as f64 / self.settings.step.as_secs_f64()) as u64;
            search.record(if step.producer_bound { rate.min(reached) } else { rate }, step.sustained);
            steps.push(step);
            self.drain(LAG_FLOOR_EVENTS)?;
        }
        Ok((steps, search.best()))
    }

    /// The phase's buckets of one histogram, if the child exports it.
    fn histograms(&mut self) -> Result<[Option<Buckets>; 2], LoadTestError> {
        let text = self.child.scrape()?;
        Ok([histogram_buckets(text, INGEST_TO_COMMIT), histogram_buckets(text, EVENT_TIME_TO_COMMIT)])
    }

    /// (c) Latency at `rate`: histogram differences between the phase's start and end.
    fn latency(&mut self, rate: u64, generator: &mut ClickGenerator) -> Result<Latency, LoadTestError> {
        self.drain(0)?;
        std::thread::sleep(SETTLE);
        let before = self.histograms()?;
        let step = self.live_step(rate, generator)?;
        self.drain(0)?;
        std::thread::sleep(SETTLE);
        let after = self.histograms()?;
        let phase = |i: usize| {
            let end = after[i].as_deref()?;
            Quantiles::from_buckets(&bucket_delta(before[i].as_deref(), end))
        };
        Ok(Latency {
            rate,
            step,
            ingest_to_commit: phase(0),
            event_time_to_commit: phase(1),
        })
    }

    /// (d) `keys` distinct pages at one event time, so they share one 5-minute window.
    fn keys(&mut self, keys: u64) -> Result<Keys, LoadTestError> {
        self.drain(0)?;
        let started = Instant::now();
        let pages = u32::try_from(keys).unwrap_or(u32::MAX);
        let mut generator = ClickGenerator::new(ClickGeneratorSettings {
            seed: self.settings.seed + 2,
            users: CLICK_USERS,
            pages,
            disorder_ms: 0,
            late_share: 0.0,
            late_by_ms: 0,
            malformed_share: 0.0,
        })
        .with_sequential_pages();
        let event_time_ms = wall_clock_ms();
        let received = AtomicU64::new(self.child.received()?);
        let already = self.producer.delivered_count();
        let (producer, topic, child, lag_cap, interrupt) = (&self.producer, self.topic.as_str(), &mut self.child, self.lag_cap, self.interrupt);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let producing = s.spawn(|| -> Result<(), LoadTestError> {
                let mut event = GeneratedEvent::default();
                for sent in 0..keys {
                    // Hold back while the lag (counting events still queued) nears the cap.
                    while (already + sent).saturating_sub(received.load(Relaxed)) > lag_cap {
                        if stop.load(Relaxed) {
                            return Err(LoadTestError::Interrupted);
                        }
                        producer.poll(Duration::from_millis(10));
                    }
                    generator.next_event_into(event_time_ms, &mut event);
                    producer.send(topic, None, &event.key, &event.payload)?;
                }
                producer.flush(Duration::from_secs(120))?;
                Ok(())
            });
            let watched = watch_producer(&producing, child, &stop, interrupt, |n| received.store(n, Relaxed));
            let produced = producing.join().expect("the producer thread does not panic");
            watched.and(produced)
        })?;
        self.drain(0)?;
        // State keys are counted as of each shard's last epoch: wait for one to include them all.
        let deadline = Instant::now() + Duration::from_secs(30);
        let state_keys = loop {
            let keys_now = family_sum(self.child.scrape()?, STATE_KEYS);
            if keys_now.is_some_and(|n| n >= keys as f64) || Instant::now() > deadline {
                break keys_now;
            }
            self.interrupted()?;
            std::thread::sleep(SCRAPE_EVERY);
        };
        let seconds = started.elapsed().as_secs_f64();
        let stats = self.child.proc_stats();
        Ok(Keys {
            keys,
            state_keys,
            rss_bytes: stats.rss_bytes,
            peak_rss_bytes: stats.peak_rss_bytes,
            seconds,
        })
    }
}

/// Runs the whole load test (see the [module docs](self)); `interrupt` (Ctrl-C) stops it,
/// with the child stopped and temporary files removed.
pub fn run(settings: &LoadTestSettings, interrupt: &AtomicBool) -> Result<LoadTestReport, LoadTestError> {
    // Ctrl-C reaches the child too (same process group): its exit is then no failure.
    run_phases(settings, interrupt).map_err(|e| if interrupt.load(Relaxed) { LoadTestError::Interrupted } else { e })
}

fn run_phases(settings: &LoadTestSettings, interrupt: &AtomicBool) -> Result<LoadTestReport, LoadTestError> {
    settings.check()?;
    let out = &settings.out_dir;
    std::fs::create_dir_all(out).map_err(io_error(format!("cannot create the output directory {}", out.display())))?;
    let unique = format!("{}-{}", std::process::id(), wall_clock_ms());
    let topic = format!("tidemark-loadtest-{unique}");
    let machine = Machine::detect();
    let date_utc = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC").to_string();

    // The broker and the prefilled topic.
    let (embedded, bootstrap, broker) = match &settings.bootstrap {
        None => {
            let embedded = EmbeddedBroker::start(&[(topic.clone(), settings.partitions)])?;
            let address = embedded.bootstrap_servers().to_owned();
            let description = "embedded (librdkafka mock cluster, inside the load-test process)".to_owned();
            (Some(embedded), address, description)
        }
        Some(address) => {
            // Fails within 10 s, naming the address, when nothing answers there.
            drop(EventProducer::connect(address)?);
            create_topic(address, &topic, settings.partitions)?;
            (None, address.clone(), address.clone())
        }
    };
    let mut generator = click_generator(settings.seed);
    let retention = (EMBEDDED_RETENTION_BYTES_PER_PARTITION * settings.partitions as u64) as f64;
    if embedded.is_some() {
        // Estimate the event size from a sample before producing anything.
        let mut sample = generator.clone();
        let bytes: u64 = (0..1_000)
            .map(|_| sample.next_event(wall_clock_ms()))
            .map(|e| (e.key.len() + e.payload.len()) as u64 + RECORD_OVERHEAD_BYTES)
            .sum();
        let fits = (retention * PREFILL_RETENTION_SHARE * 1_000.0 / bytes as f64) as u64;
        if settings.events > fits {
            return Err(LoadTestError::Settings(format!(
                "{} events do not fit the embedded broker's retention (~5 MB per partition, {} partitions: about {fits} events); \
                 lower --events, raise --partitions, or use a real broker (scripts/kafka-broker.sh, then --bootstrap 127.0.0.1:19092)",
                settings.events, settings.partitions
            )));
        }
    }
    let producer = EventProducer::connect(&bootstrap)?;
    say(format_args!("producing {} click events into {topic} on {broker}", settings.events));
    let first_event_ms = wall_clock_ms() - (settings.events / PREFILL_EVENTS_PER_MS) as i64;
    let prefill = prefill_events(&producer, &topic, settings.partitions, settings.events, first_event_ms, &mut generator)?;
    let event_bytes = prefill.average_event_bytes();
    let lag_cap = if embedded.is_some() {
        (retention * LAG_CAP_RETENTION_SHARE / (event_bytes + RECORD_OVERHEAD_BYTES as f64)) as u64
    } else {
        u64::MAX
    };

    // Baseline and catch-up, alternating, ROUNDS times: the baseline with the pipeline's
    // consumer settings and decoder, the catch-up by a fresh child (its own state) reading the
    // whole topic. The last child stays for the live phases.
    let work = TempDir::create(&format!("tidemark-loadtest-{unique}"))?;
    let pipeline_file = out.join("pipeline.toml");
    let log = out.join("pipeline.log");
    let (mut baselines, mut catch_ups) = (Vec::new(), Vec::new());
    let mut child = None;
    for round in 1..=ROUNDS {
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let round_dir = work.0.join(format!("round-{round}"));
        let toml = click_pipeline_toml(&ClickPipeline {
            name: "loadtest",
            bootstrap: &bootstrap,
            topic: &topic,
            partitions: settings.partitions,
            shards: settings.shards,
            state_dir: &round_dir.join("state"),
            sink_dir: &round_dir.join("page_views_5min"),
            metrics_listen: &metrics.to_string(),
        });
        let config = parse_config(&toml).map_err(|e| LoadTestError::GeneratedConfig(e.to_string()))?;
        std::fs::write(&pipeline_file, &toml).map_err(io_error(format!("cannot write {}", pipeline_file.display())))?;
        let baseline = consume_and_decode(&config, &bootstrap, settings.shards, &prefill.per_partition, Duration::from_secs(300))?;
        if interrupt.load(Relaxed) {
            return Err(LoadTestError::Interrupted);
        }
        let mut pipeline = PipelineChild::spawn(&settings.exe, &pipeline_file, &log, metrics)?;
        let catch_up = catch_up(&mut pipeline, settings.events, interrupt)?;
        say(format_args!(
            "round {round}/{ROUNDS}: baseline (raw consume + JSON decode, {} threads) {:.0} events/s, pipeline catch-up {:.0} events/s",
            settings.shards,
            baseline.events_per_second(),
            catch_up.events_per_second()
        ));
        baselines.push(baseline);
        catch_ups.push(catch_up);
        if round < ROUNDS {
            pipeline.stop()?;
        } else {
            say(format_args!(
                "the pipeline for the live phases: pid {}, metrics on http://{metrics}/metrics, log {}",
                pipeline.pid(),
                log.display()
            ));
            child = Some(pipeline);
        }
    }
    let child = child.expect("ROUNDS > 0");
    let best = |rates: Vec<f64>| rates.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
    let baseline_rounds: Vec<f64> = baselines.iter().map(Baseline::events_per_second).collect();
    let catch_up_rounds: Vec<f64> = catch_ups.iter().map(CatchUp::events_per_second).collect();
    let baseline = baselines.swap_remove(best(baseline_rounds.clone()));
    let catch_up = catch_ups.swap_remove(best(catch_up_rounds.clone()));
    let mut run = Run {
        settings,
        interrupt,
        producer,
        topic: topic.clone(),
        child,
        lag_cap,
        steps_run: 0,
        lag_csv: "step,target_rate,seconds,lag\n".to_owned(),
    };

    let mut live = click_generator(settings.seed + 1);
    let start_rate = (catch_up.events_per_second() / 4.0) as u64;
    let (steps, max_sustained_rate) = run.search(start_rate, &mut live)?;
    let latency = match max_sustained_rate {
        Some(max) => {
            let rate = (max / 2).max(SEARCH_MIN_RATE / 2);
            say(format_args!("latency at {rate} events/s for {:.0} s", settings.step.as_secs_f64()));
            Some(run.latency(rate, &mut live)?)
        }
        None => None,
    };
    let peak_rss_before_keys_bytes = run.child.proc_stats().peak_rss_bytes;
    let keys = match settings.keys {
        Some(n) => {
            say(format_args!("filling {n} distinct page_url keys in one window"));
            Some(run.keys(n)?)
        }
        None => None,
    };

    // The last scrape, then stop the child.
    let last = run.child.scrape()?.to_owned();
    let final_stats = run.child.proc_stats();
    let metrics_file = out.join("metrics.prom");
    std::fs::write(&metrics_file, &last).map_err(io_error(format!("cannot write {}", metrics_file.display())))?;
    let status = run.child.stop()?;
    let promtool = promtool_check(&metrics_file);
    let lag_file = out.join("lag.csv");
    std::fs::write(&lag_file, &run.lag_csv).map_err(io_error(format!("cannot write {}", lag_file.display())))?;
    drop(run);
    drop(embedded);
    drop(work);

    let report = LoadTestReport {
        date_utc,
        command: settings.command.clone(),
        machine,
        broker,
        topic,
        partitions: settings.partitions,
        shards: settings.shards,
        events: settings.events,
        event_bytes_avg: event_bytes,
        step_seconds: settings.step.as_secs_f64(),
        baseline,
        baseline_rounds,
        catch_up,
        catch_up_rounds,
        lag_cap: (lag_cap < u64::MAX).then_some(lag_cap),
        steps,
        max_sustained_rate,
        latency,
        keys,
        peak_rss_bytes: final_stats.peak_rss_bytes,
        peak_rss_before_keys_bytes,
        child_cpu_seconds: final_stats.cpu_seconds,
        child_exit: status.to_string(),
        metrics_file,
        metrics_series: samples(&last).count(),
        promtool,
        out_dir: out.clone(),
    };
    let text = out.join("report.txt");
    std::fs::write(&text, format!("{report}\n")).map_err(io_error(format!("cannot write {}", text.display())))?;
    let json = out.join("report.json");
    let body = serde_json::to_string_pretty(&report).map_err(|e| LoadTestError::Io {
        what: "cannot serialize the report".into(),
        source: e.into(),
    })?;
    std::fs::write(&json, body).map_err(io_error(format!("cannot write {}", json.display())))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP tidemark_events_received_total Records read.
# TYPE tidemark_events_received_total counter
tidemark_events_received_total{shard="0",source="clicks"} 1500
tidemark_events_received_total{shard="1",source="we\"ird {x}"} 2500
# TYPE tidemark_up gauge
tidemark_up 1
# TYPE tidemark_ingest_to_commit_seconds histogram
tidemark_ingest_to_commit_seconds_bucket{shard="0",le="0.5"} 10
tidemark_ingest_to_commit_seconds_bucket{shard="0",le="1"} 60
tidemark_ingest_to_commit_seconds_bucket{shard="0",le="2"} 100
tidemark_ingest_to_commit_seconds_bucket{shard="0",le="+Inf"} 100
tidemark_ingest_to_commit_seconds_bucket{shard="1",le="0.5"} 0
tidemark_ingest_to_commit_seconds_bucket{shard="1",le="1"} 40
tidemark_ingest_to_commit_seconds_bucket{shard="1",le="2"} 100
tidemark_ingest_to_commit_seconds_bucket{shard="1",le="+Inf"} 100
tidemark_ingest_to_commit_seconds_sum 210.5
tidemark_ingest_to_commit_seconds_count 200
"#;

    #[test]
    fn the_daemon_is_found_next_to_the_tools_or_where_named() {
        let dir = tempfile::tempdir().unwrap();
        let tools = dir.path().join("tidemark-tools");
        let error = find_daemon(&tools, None).unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, LoadTestError::DaemonMissing { .. }), "{text}");
        assert!(text.contains(&dir.path().join("tidemark").display().to_string()), "{text}");
        assert!(text.contains("cargo build --release -p tidemark") && text.contains("--daemon"), "{text}");
        std::fs::write(dir.path().join("tidemark"), b"").unwrap();
        assert_eq!(find_daemon(&tools, None).unwrap(), dir.path().join("tidemark"));
        let elsewhere = dir.path().join("bin-elsewhere");
        assert!(matches!(find_daemon(&tools, Some(&elsewhere)), Err(LoadTestError::DaemonMissing { path }) if path == elsewhere));
        std::fs::write(&elsewhere, b"").unwrap();
        assert_eq!(find_daemon(&tools, Some(&elsewhere)).unwrap(), elsewhere);
    }

    #[test]
    fn family_sums_add_every_series_and_tell_absent_from_zero() {
        assert_eq!(family_sum(TEXT, "tidemark_events_received_total"), Some(4000.0));
        assert_eq!(family_sum(TEXT, "tidemark_up"), Some(1.0));
        assert_eq!(family_sum(TEXT, "tidemark_ingest_to_commit_seconds_count"), Some(200.0));
        assert_eq!(family_sum(TEXT, "tidemark_events_received"), None, "a prefix is not the family");
        assert_eq!(family_sum(TEXT, "tidemark_consumer_lag_messages"), None);
    }

    #[test]
    fn labels_are_read_with_escapes() {
        assert_eq!(label(r#"shard="0",le="0.5""#, "le"), Some("0.5"));
        assert_eq!(label(r#"shard="0",le="0.5""#, "shard"), Some("0"));
        assert_eq!(label(r#"a="x\"y",le="+Inf""#, "le"), Some("+Inf"));
        assert_eq!(label(r#"a="x""#, "le"), None);
    }

    #[test]
    fn histogram_buckets_merge_series_per_bound_in_order() {
        let buckets = histogram_buckets(TEXT, INGEST_TO_COMMIT).unwrap();
        assert_eq!(buckets, vec![(0.5, 10.0), (1.0, 100.0), (2.0, 200.0), (f64::INFINITY, 200.0)]);
        assert_eq!(histogram_buckets(TEXT, EVENT_TIME_TO_COMMIT), None);
    }

    #[test]
    fn quantiles_interpolate_linearly_inside_the_bucket() {
        let buckets = [(0.5, 10.0), (1.0, 100.0), (2.0, 200.0), (f64::INFINITY, 200.0)];
        // Rank 100 of 200 is the top of the (0.5, 1] bucket.
        assert_eq!(histogram_quantile(0.5, &buckets), Some(1.0));
        // Rank 5 is half-way through the first bucket, which starts at 0.
        assert_eq!(histogram_quantile(0.025, &buckets), Some(0.25));
        // Rank 198 is 98% through (1, 2].
        assert!((histogram_quantile(0.99, &buckets).unwrap() - 1.98).abs() < 1e-9);
        assert!((histogram_quantile(0.999, &buckets).unwrap() - 1.998).abs() < 1e-9);
        assert_eq!(histogram_quantile(1.0, &buckets), Some(2.0));
        assert_eq!(histogram_quantile(0.0, &buckets), Some(0.0));
    }

    #[test]
    fn quantiles_in_the_inf_bucket_answer_the_highest_bound_and_empty_answers_none() {
        let buckets = [(0.5, 10.0), (1.0, 20.0), (f64::INFINITY, 100.0)];
        assert_eq!(histogram_quantile(0.5, &buckets), Some(1.0));
        assert_eq!(histogram_quantile(0.5, &[(1.0, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(histogram_quantile(0.5, &[]), None);
        assert_eq!(histogram_quantile(1.5, &buckets), None);
        // Empty buckets below the rank are skipped, not interpolated into.
        let gaps = [(0.1, 0.0), (0.2, 0.0), (0.4, 50.0), (0.8, 50.0), (f64::INFINITY, 50.0)];
        assert!((histogram_quantile(0.5, &gaps).unwrap() - 0.3).abs() < 1e-9);
        assert_eq!(histogram_quantile(1.0, &gaps), Some(0.4));
    }

    #[test]
    fn phase_deltas_subtract_the_start_scrape() {
        let start = [(0.5, 10.0), (1.0, 100.0), (2.0, 110.0), (f64::INFINITY, 120.0)];
        let end = [(0.5, 10.0), (1.0, 150.0), (2.0, 170.0), (f64::INFINITY, 180.0)];
        let delta = bucket_delta(Some(&start), &end);
        assert_eq!(delta, vec![(0.5, 0.0), (1.0, 50.0), (2.0, 60.0), (f64::INFINITY, 60.0)]);
        assert_eq!(bucket_delta(None, &end), end.to_vec());
        // A bound the first scrape lacked counts from zero; a counter reset does not go negative.
        let grown = bucket_delta(Some(&[(1.0, 5.0), (f64::INFINITY, 20.0)]), &[(1.0, 8.0), (2.0, 9.0), (f64::INFINITY, 9.0)]);
        assert_eq!(grown, vec![(1.0, 3.0), (2.0, 9.0), (f64::INFINITY, 0.0)]);
        let q = Quantiles::from_buckets(&delta).unwrap();
        assert_eq!(q.count, 60.0);
        // Rank 30 of 60: 30 of the 50 in (0.5, 1].
        assert!((q.p50 - 0.8).abs() < 1e-9, "{q:?}");
        assert_eq!(Quantiles::from_buckets(&bucket_delta(Some(&end), &end)), None, "nothing observed");
    }

    fn ramp(lags: &[u64], step_seconds: f64) -> Vec<LagSample> {
        lags.iter()
            .enumerate()
            .map(|(i, &lag)| LagSample {
                seconds: (i + 1) as f64 * step_seconds / lags.len() as f64,
                lag,
            })
            .collect()
    }

    #[test]
    fn steps_are_judged_on_final_lag_growth_producer_and_cap() {
        let step = Duration::from_secs(10);
        let steady = ramp(&[3_000; 100], 10.0);
        assert!(judge_step(100_000, 1_000_000, step, &steady, LAG_FLOOR_EVENTS, None).0);
        // The producer fell short of the target.
        let (ok, why) = judge_step(100_000, 800_000, step, &steady, LAG_FLOOR_EVENTS, None);
        assert!(!ok && why.contains("producer"), "{why}");
        // Ends above one second of input.
        let behind: Vec<u64> = (0..100).map(|i| i * 2_000).collect();
        let (ok, why) = judge_step(100_000, 1_000_000, step, &ramp(&behind, 10.0), LAG_FLOOR_EVENTS, None);
        assert!(!ok && why.contains("at the end"), "{why}");
        // Below the limit at the end but climbing steadily.
        let climbing: Vec<u64> = (0..100).map(|i| i * 950).collect();
        let (ok, why) = judge_step(100_000, 1_000_000, step, &ramp(&climbing, 10.0), LAG_FLOOR_EVENTS, None);
        assert!(!ok && why.contains("grew"), "{why}");
        // Cut short by the retention cap.
        let (ok, why) = judge_step(100_000, 300_000, step, &steady, LAG_FLOOR_EVENTS, Some(140_000));
        assert!(!ok && why.contains("lag 140000 events neared the broker's retention"), "{why}");
        // At low rates the floor is the limit.
        assert!(judge_step(500, 5_000, step, &ramp(&[1_500; 50], 10.0), LAG_FLOOR_EVENTS, None).0);
    }

    #[test]
    fn rate_search_doubles_then_bisects_and_stops() {
        // Capacity 700k: 100k, 200k, 400k hold, 800k fails, then 600k, 700k, 750k.
        let capacity = 700_000;
        let mut search = RateSearch::new(100_000, 3, 10, 500);
        let mut tried = Vec::new();
        while let Some(rate) = search.next_rate() {
            tried.push(rate);
            search.record(rate, rate <= capacity);
        }
        assert_eq!(tried, vec![100_000, 200_000, 400_000, 800_000, 600_000, 700_000, 750_000]);
        assert_eq!(search.best(), Some(700_000));
    }

    #[test]
    fn rate_search_halves_when_the_first_step_fails_and_respects_its_budget() {
        let mut search = RateSearch::new(40_000, 3, 10, 500);
        let mut tried = Vec::new();
        while let Some(rate) = search.next_rate() {
            tried.push(rate);
            search.record(rate, rate <= 12_000);
        }
        assert_eq!(tried[..3], [40_000, 20_000, 10_000]);
        assert_eq!(search.best(), Some(12_000));
        // Nothing holds: halves down to the minimum, then gives up.
        let mut search = RateSearch::new(4_000, 3, 10, 500);
        let mut tried = Vec::new();
        while let Some(rate) = search.next_rate() {
            tried.push(rate);
            search.record(rate, false);
        }
        assert_eq!(tried, vec![4_000, 2_000, 1_000, 500]);
        assert_eq!(search.best(), None);
        // The step budget ends a search that keeps succeeding.
        let mut search = RateSearch::new(1_000, 3, 4, 500);
        let mut steps = 0;
        while let Some(rate) = search.next_rate() {
            steps += 1;
            search.record(rate, true);
        }
        assert_eq!((steps, search.best()), (4, Some(8_000)));
    }

    #[test]
    fn the_generated_pipeline_is_valid_and_runs_the_demo_query() {
        let toml = click_pipeline_toml(&ClickPipeline {
            name: "loadtest",
            bootstrap: "127.0.0.1:9092",
            topic: "t\"opic",
            partitions: 16,
            shards: 2,
            state_dir: Path::new("/tmp/x y/state"),
            sink_dir: Path::new("/tmp/x y/out"),
            metrics_listen: "127.0.0.1:0",
        });
        let config = parse_config(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
        assert_eq!(config.sources[0].topic, "t\"opic");
        assert_eq!(config.sources[0].partitions, 16);
        assert_eq!(config.queries.len(), 1);
        assert_eq!(config.queries[0].name, "page_views_5min");
        assert_eq!(config.pipeline.commit_interval, COMMIT_INTERVAL);
        let option = |key: &str| config.kafka.options.get(key).map(String::as_str);
        assert_eq!(option("fetch.wait.max.ms"), Some("10"));
        assert_eq!(option("fetch.queue.backoff.ms"), Some("1"));
    }
}
