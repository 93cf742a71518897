//! Sources: which shard owns which partition, and the per-shard Kafka consumer.
//!
//! Partition ownership is a pure function of the source, the partition and the shard count
//! ([`partition_owner`]), so every restart with the same shards owns the same partitions, and
//! a partition added to a topic while running goes to the shard a restart would give it
//! without moving any other.
//! Each shard assigns (never subscribes) its partitions at the offsets stored with the last
//! flushed epoch; Kafka's group offsets are not the truth. A stored offset the broker no
//! longer has is a *gap*: reported with the lost range, and fatal unless `on_gap = "skip"`.

pub mod carried;
pub mod cdc_generator;
pub mod envelope;
pub mod generator;
pub mod kafka;
pub mod memory;
pub mod producer;

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{Bootstrap, Config, GapPolicy, StartingOffsets};
use crate::state::{PartitionPosition, Recovered, StateError};
use crate::telemetry::ShardStats;
use crate::types::EventTime;
use crate::watermark::Progress;

pub mod files;

use files::{FilePosition, FileSource, FileSourceOptions};
use kafka::KafkaSource;
use memory::MemorySource;

/// What one shard reads, as assigned by the daemon.
pub enum SourceSpec {
    /// These partitions of Kafka sources, through one consumer; with a watch, also the
    /// partitions added to the topics later that this shard owns.
    Kafka {
        partitions: Vec<SourcePartition>,
        watch: Option<Arc<kafka::PartitionWatch>>,
    },
    /// The file source with this index.
    Files(usize),
    /// Records held in memory (tests).
    Memory(MemorySource),
}

/// One input of a shard, with its own watermark clock and counters: a Kafka partition, a
/// file source, a partition of an in-memory source.
#[derive(Debug, Clone)]
pub struct InputInfo {
    /// Index of the configured source.
    pub source: usize,
    /// The partition; -1 for a file source.
    pub partition: i32,
    /// The topic (or source name) dead letters name.
    pub label: Rc<str>,
    /// The largest event time seen on it as of the last flushed epoch.
    pub restored_max_event_time: Option<EventTime>,
    /// A partition of a repartitioned source, read through the source's repartition topic:
    /// its clock follows what the repartitioner says of it ([`Carried`]), idleness included.
    pub carried: bool,
}

/// What a repartitioner wrote with a record about its source partition (see
/// `crate::scale::repartition`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Carried {
    /// The partition's largest event time before this record (or as of this marker).
    pub max_before: Option<EventTime>,
    /// `Some(idle)` for a marker: no record, only the partition's standing.
    pub mark: Option<bool>,
}

/// One record a source read.
pub struct Polled<'a> {
    /// Index into the source's [`ShardSource::inputs`].
    pub input: usize,
    /// Kafka offset, or byte offset of a file's line (-1 for a whole file).
    pub offset: i64,
    pub payload: &'a [u8],
    /// The file a file-source record came from (empty otherwise).
    pub file: &'a str,
    /// False when it is not a record read but a whole file skipped (still a dead letter).
    pub is_record: bool,
    /// Bytes received with it.
    pub bytes: u64,
    /// Set when it cannot be read: it becomes a `decode` dead letter with this message.
    pub problem: Option<String>,
    /// Read from a repartition topic: what came with it.
    pub carried: Option<Carried>,
}

impl<'a> Polled<'a> {
    /// A record read whole from a partition (not from a file), with nothing wrong with it.
    pub fn record(input: usize, offset: i64, payload: &'a [u8]) -> Polled<'a> {
        Polled {
            input,
            offset,
            payload,
            file: "",
            is_record: true,
            bytes: payload.len() as u64,
            problem: None,
            carried: None,
        }
    }
}

/// Where a shard's sources stand at the end of an epoch.
#[derive(Debug, Default)]
pub struct SourcePositions {
    pub partitions: Vec<PartitionPosition>,
    /// (file-source name, encoded position).
    pub files: Vec<(String, Vec<u8>)>,
}

/// A file source read by one shard.
pub struct FileInput {
    source: usize,
    name: Rc<str>,
    reader: FileSource,
    /// Where it stands, for the metrics; and (done, queued, offset, read errors) as last
    /// published, so an unchanged standing is not published again.
    stats: Arc<crate::telemetry::FileSourceStats>,
    published: (usize, usize, Option<u64>, u64),
}

impl FileInput {
    /// Publishes the reader's standing when it changed.
    fn publish(&mut self) {
        let r = &self.reader;
        let now = (r.files_done(), r.files_queued(), r.current().map(|c| c.1), r.read_errors());
        if now != self.published {
            self.stats.publish(now.0 as u64, now.1 as u64, r.current());
            ShardStats::add(&self.stats.read_errors, now.3 - self.published.3);
            self.published = now;
        }
    }
}

/// A source as one shard reads it. The shard polls every source the same way and keeps a
/// watermark clock and counters per input.
pub enum ShardSource {
    Kafka(KafkaSource),
    Files(Box<FileInput>),
    Memory(MemorySource),
}

/// What opening a shard's sources needs.
pub struct SourceContext<'a> {
    pub config: &'a Arc<Config>,
    pub bootstrap: &'a str,
    pub recovered: &'a Recovered,
    pub stats: &'a Arc<crate::telemetry::PipelineStats>,
    pub shard: usize,
    pub shards: usize,
}

impl ShardSource {
    /// Opens a source at the positions of the last flushed epoch.
    pub fn open(spec: SourceSpec, cx: &SourceContext<'_>) -> Result<ShardSource, SourceError> {
        match spec {
            SourceSpec::Kafka { partitions, watch } => Ok(ShardSource::Kafka(KafkaSource::open(
                cx.config.clone(),
                cx.bootstrap,
                &partitions,
                watch,
                cx.recovered,
                cx.stats.clone(),
                (cx.shard, cx.shards),
            )?)),
            SourceSpec::Files(si) => {
                let src = &cx.config.sources[si];
                let files_error = |message: String| SourceError::Files {
                    source_name: src.name.clone(),
                    message,
                };
                let fc = src
                    .files
                    .as_ref()
                    .ok_or_else(|| files_error("not a file source (internal error: only file sources are assigned as files)".into()))?;
                let position: FilePosition = match cx.recovered.file_positions.get(&src.name) {
                    Some(bytes) => serde_json::from_slice(bytes).map_err(|e| {
                        SourceError::State(StateError::Corrupt {
                            key: format!("files/{}", src.name),
                            what: format!("unreadable file-source position: {e}"),
                        })
                    })?,
                    None => FilePosition::default(),
                };
                let mut options = FileSourceOptions::new(fc.path.clone());
                options.settle = fc.settle;
                let mut reader = FileSource::open(options, position).map_err(|e| files_error(e.to_string()))?;
                // Listed now so the start can say what is left to read; a failure is retried
                // (and logged) by the first poll.
                let listed = reader.list();
                let (file, offset) = reader.current().map_or(("", 0), |(f, o)| (f, o));
                tracing::info!(
                    source = %src.name,
                    dir = %fc.path.display(),
                    files_done = reader.files_done(),
                    files_queued = reader.files_queued(),
                    current_file = file,
                    current_offset = offset,
                    listed = listed.is_ok(),
                    "file source starting: {} files read, {} to read{}",
                    reader.files_done(),
                    reader.files_queued(),
                    if file.is_empty() { String::new() } else { format!(", resuming {file} at byte {offset}") }
                );
                let stats = Arc::new(crate::telemetry::FileSourceStats::new(si));
                let mut input = FileInput {
                    source: si,
                    name: src.name.as_str().into(),
                    reader,
                    stats,
                    published: (usize::MAX, 0, None, 0),
                };
                input.publish();
                let mut all = cx.stats.shards[cx.shard].files();
                all.push(input.stats.clone());
                cx.stats.shards[cx.shard].set_files(all);
                Ok(ShardSource::Files(Box::new(input)))
            }
            SourceSpec::Memory(mut m) => {
                m.resume(cx.recovered);
                Ok(ShardSource::Memory(m))
            }
        }
    }

    pub fn inputs(&self) -> Vec<InputInfo> {
        match self {
            ShardSource::Kafka(k) => k.inputs(),
            ShardSource::Files(f) => vec![InputInfo {
                source: f.source,
                partition: -1,
                label: f.name.clone(),
                restored_max_event_time: None,
                carried: false,
            }],
            ShardSource::Memory(m) => m.inputs(),
        }
    }

    pub fn input_count(&self) -> usize {
        match self {
            ShardSource::Kafka(k) => k.input_count(),
            ShardSource::Files(_) => 1,
            ShardSource::Memory(m) => m.input_count(),
        }
    }

    /// Reads up to `max` records without waiting; returns how many it read.
    pub fn poll(&mut self, max: usize, mut on: impl FnMut(Polled<'_>)) -> Result<usize, SourceError> {
        match self {
            ShardSource::Kafka(k) => k.poll(max, on),
            ShardSource::Files(f) => {
                let result = f.reader.poll(max, |line| {
                    on(Polled {
                        input: 0,
                        offset: line.offset as i64,
                        payload: line.bytes,
                        file: line.file,
                        is_record: true,
                        bytes: line.bytes.len() as u64 + 1,
                        problem: line
                            .problem
                            .as_ref()
                            .map(|problem| format!("line {} bytes into {}: {problem}", line.offset, line.file)),
                        carried: None,
                    })
                });
                // Files skipped as corrupt, truncated or vanished are dead letters too: nothing
                // is dropped without a trace in the dead-letter table.
                for event in f.reader.take_events() {
                    on(Polled {
                        input: 0,
                        offset: -1,
                        payload: b"",
                        file: event.file(),
                        is_record: false,
                        bytes: 0,
                        problem: Some(event.to_string()),
                        carried: None,
                    });
                }
                f.publish();
                result.map_err(|e| SourceError::Files {
                    source_name: f.name.to_string(),
                    message: e.to_string(),
                })
            }
            ShardSource::Memory(m) => Ok(m.poll(max, on)),
        }
    }

    /// Looks for inputs added since the last call (partitions added to a Kafka topic): returns
    /// how many were added, at the end of [`ShardSource::inputs`].
    pub fn discover(&mut self) -> Result<usize, SourceError> {
        match self {
            ShardSource::Kafka(k) => {
                k.discover()?;
                Ok(k.take_added())
            }
            ShardSource::Files(_) | ShardSource::Memory(_) => Ok(0),
        }
    }

    /// Whether input `input` is caught up and readable: a quiet input may count as idle only
    /// then (see [`crate::watermark`]).
    pub fn progress(&self, input: usize, now: std::time::Instant) -> Progress {
        match self {
            ShardSource::Kafka(k) => k.progress(input, now),
            ShardSource::Files(f) => f.reader.progress(),
            ShardSource::Memory(m) => match m.lag(input) {
                0 => Progress::CaughtUp,
                _ => Progress::Behind,
            },
        }
    }

    /// Records behind the end of input `input`'s log; -1 when unknown or not a log.
    pub fn lag(&self, input: usize) -> i64 {
        match self {
            ShardSource::Kafka(k) => k.lag(input),
            ShardSource::Files(_) => -1,
            ShardSource::Memory(m) => m.lag(input),
        }
    }

    /// Adds where this source stands to `out` (`max_event_time(input)`: the largest event
    /// time the shard saw on that input).
    pub fn positions(&self, max_event_time: impl Fn(usize) -> Option<EventTime>, out: &mut SourcePositions) {
        match self {
            ShardSource::Kafka(k) => k.positions(max_event_time, &mut out.partitions),
            ShardSource::Files(f) => {
                let bytes = serde_json::to_vec(&f.reader.position()).expect("a file position serializes");
                out.files.push((f.name.to_string(), bytes));
            }
            ShardSource::Memory(m) => m.positions(max_event_time, &mut out.partitions),
        }
    }
}

/// File sources dealt round-robin over the shards: `result[shard]` lists source indexes. A file
/// source is read by one shard; its rows still reach every shard by key.
pub fn assign_file_sources(config: &Config, shards: usize) -> Vec<Vec<usize>> {
    let mut owned = vec![Vec::new(); shards];
    let file_sources = config.sources.iter().enumerate().filter(|(_, s)| s.files.is_some());
    for (k, (source, _)) in file_sources.enumerate() {
        owned[k % shards].push(source);
    }
    owned
}

/// A partition of a configured source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourcePartition {
    pub source: usize,
    pub partition: i32,
}

/// The shard that reads a partition: each source's partitions are dealt round-robin over the
/// shards, source `s` starting at shard `s % shards`. Partitions added to a topic extend its
/// deal without moving any partition already dealt, and within a source shard loads differ by
/// at most one.
pub fn partition_owner(source: usize, partition: i32, shards: usize) -> usize {
    (source + partition.max(0) as usize) % shards.max(1)
}

/// Every partition of every source (`partition_counts[source]` of them) by owning shard
/// ([`partition_owner`]), in (source, partition) order.
pub fn assign_partitions(partition_counts: &[i32], shards: usize) -> Vec<Vec<SourcePartition>> {
    let mut owned = vec![Vec::new(); shards];
    for (source, &n) in partition_counts.iter().enumerate() {
        for partition in 0..n {
            owned[partition_owner(source, partition, shards)].push(SourcePartition { source, partition });
        }
    }
    owned
}

/// Partition `partition` of every source that has it, by owning shard: what one task of a
/// scaled-out pipeline reads.
pub fn assign_task_partitions(partition_counts: &[i32], shards: usize, partition: i32) -> Vec<Vec<SourcePartition>> {
    let mut owned = vec![Vec::new(); shards];
    for (source, &n) in partition_counts.iter().enumerate() {
        if partition < n {
            owned[partition_owner(source, partition, shards)].push(SourcePartition { source, partition });
        }
    }
    owned
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot create a Kafka client for {bootstrap}: {source} (check [kafka] options)")]
    Client { bootstrap: String, source: rdkafka::error::KafkaError },
    #[error(
        "cannot reach Kafka at {bootstrap} ({detail}); is the broker running, and is the address right? (set [kafka] bootstrap_servers, or pass --brokers)"
    )]
    Unreachable { bootstrap: String, detail: String },
    #[error("topic \"{topic}\" was not found on {bootstrap} ({detail}); create it, or fix [[sources]].topic")]
    TopicMissing { topic: String, bootstrap: String, detail: String },
    #[error("file source \"{source_name}\": {message}")]
    Files { source_name: String, message: String },
    #[error("data loss on {topic}[{partition}]: offsets {from}..{to} were deleted by the broker before tidemark read them (retention outran the pipeline). Stopping so nothing is silently skipped; to continue past the gap set on_gap = \"skip\" on the source")]
    Gap { topic: String, partition: i32, from: i64, to: i64 },
    #[error("{topic}[{partition}] ends at offset {end}, but the state says offset {stored} was already read: the topic was deleted or recreated. Use a new state_dir to start over")]
    BeyondEnd { topic: String, partition: i32, stored: i64, end: i64 },
    #[error("Kafka request for {topic}[{partition}] failed: {source} (external: is the broker up?)")]
    Kafka {
        topic: String,
        partition: i32,
        source: rdkafka::error::KafkaError,
    },
}

/// A client of the pipeline's brokers: the `[kafka.options]` settings, then the brokers.
pub fn client_config(config: &Config, bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in &config.kafka.options {
        c.set(k, v);
    }
    c.set("bootstrap.servers", bootstrap);
    c
}

/// librdkafka settings shared by every tidemark consumer; user options come first so the
/// settings exactly-once depends on cannot be overridden.
pub fn consumer_config(config: &Config, bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    // Bound librdkafka's prefetch per consumer (its default is 64 MB); users may override.
    c.set("queued.max.messages.kbytes", "4096");
    // When that prefetch queue is full, librdkafka postpones the partition's next fetch by
    // this much (default 1 s): with a bounded queue that stalls a shard that has just caught
    // up for up to a second. Retry quickly instead; the cost is a timer check per ms while
    // the queue stays full.
    c.set("fetch.queue.backoff.ms", "1");
    if config.kafka.bootstrap_servers == Bootstrap::Embedded {
        // librdkafka's mock cluster answers a fetch that finds no data only after the whole
        // fetch.wait.max.ms (default 500 ms), without waking when data arrives: the demo and
        // the load test would idle half a second per empty partition. Real brokers wake up.
        c.set("fetch.wait.max.ms", "10");
    }
    for (k, v) in &config.kafka.options {
        c.set(k, v);
    }
    c.set("bootstrap.servers", bootstrap)
        .set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "error")
        .set("enable.partition.eof", "false");
    c
}

/// Partition counts of every source topic, from broker metadata (0 for file sources).
pub fn fetch_partition_counts(config: &Config, bootstrap: &str, timeout: Duration) -> Result<Vec<i32>, SourceError> {
    if config.sources.iter().all(|s| s.files.is_some()) {
        return Ok(vec![0; config.sources.len()]);
    }
    let consumer: BaseConsumer = consumer_config(config, bootstrap).create().map_err(|source| SourceError::Client {
        bootstrap: bootstrap.into(),
        source,
    })?;
    let mut counts = Vec::new();
    for s in &config.sources {
        if s.files.is_some() {
            counts.push(0); // a file source has no partitions
            continue;
        }
        let missing = |detail: String| SourceError::TopicMissing {
            topic: s.topic.clone(),
            bootstrap: bootstrap.into(),
            detail,
        };
        let md = consumer.fetch_metadata(Some(&s.topic), timeout).map_err(|e| match e {
            rdkafka::error::KafkaError::MetadataFetch(
                rdkafka::error::RDKafkaErrorCode::UnknownTopicOrPartition | rdkafka::error::RDKafkaErrorCode::UnknownTopic,
            ) => missing(e.to_string()),
            other => SourceError::Unreachable {
                bootstrap: bootstrap.into(),
                detail: other.to_string(),
            },
        })?;
        let topic = md
            .topics()
            .iter()
            .find(|t| t.name() == s.topic)
            .ok_or_else(|| missing("not in metadata".into()))?;
        if let Some(err) = topic.error() {
            return Err(missing(format!("{:?}", rdkafka::error::RDKafkaErrorCode::from(err))));
        }
        if topic.partitions().is_empty() {
            return Err(missing("no partitions".into()));
        }
        counts.push(topic.partitions().len() as i32);
    }
    Ok(counts)
}

/// A stored position checked against what the broker still has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartCheck {
    Ok,
    /// Offsets `from..to` are gone; reading resumes at `to` if gaps are allowed.
    Gap {
        from: i64,
        to: i64,
    },
    BeyondEnd {
        end: i64,
    },
}

/// Pure rule: where does a stored next-offset stand relative to the broker's [low, high)?
pub fn check_position(stored_next: i64, low: i64, high: i64) -> StartCheck {
    if stored_next < low {
        StartCheck::Gap { from: stored_next, to: low }
    } else if stored_next > high {
        StartCheck::BeyondEnd { end: high }
    } else {
        StartCheck::Ok
    }
}

/// Resolves where one partition starts: the stored offset if valid, otherwise per policy.
/// Returns the offset to assign and, when a gap was skipped, its range.
pub fn resolve_start<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
    stored_next: Option<i64>,
    starting: StartingOffsets,
    on_gap: GapPolicy,
) -> Result<(Offset, Option<(i64, i64)>), SourceError> {
    let watermarks = || {
        consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .map_err(|source| SourceError::Kafka {
                topic: topic.into(),
                partition,
                source,
            })
    };
    let Some(next) = stored_next else {
        return Ok(match starting {
            StartingOffsets::Earliest => (Offset::Beginning, None),
            // Resolved now, so the position is stored with the next epoch even if nothing
            // arrives: a restart must not jump to a later "latest" and skip what came between.
            StartingOffsets::Latest => (Offset::Offset(watermarks()?.1), None),
        });
    };
    let (low, high) = watermarks()?;
    match check_position(next, low, high) {
        StartCheck::Ok => Ok((Offset::Offset(next), None)),
        StartCheck::BeyondEnd { end } => Err(SourceError::BeyondEnd {
            topic: topic.into(),
            partition,
            stored: next,
            end,
        }),
        StartCheck::Gap { from, to } => match on_gap {
            GapPolicy::Fail => Err(SourceError::Gap {
                topic: topic.into(),
                partition,
                from,
                to,
            }),
            GapPolicy::Skip => Ok((Offset::Offset(to), Some((from, to)))),
        },
    }
}

pub fn assignment_list(parts: &[(String, i32, Offset)]) -> Result<TopicPartitionList, rdkafka::error::KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, offset) in parts {
        tpl.add_partition_offset(topic, *partition, *offset)?;
    }
    Ok(tpl)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn added_partitions_never_move_the_ones_already_dealt(counts in proptest::collection::vec(0i32..40, 1..5), added in proptest::collection::vec(0i32..20, 1..5), shards in 1usize..9) {
            let before = assign_partitions(&counts, shards);
            let grown: Vec<i32> = counts.iter().zip(added.iter().chain(std::iter::repeat(&0))).map(|(c, a)| c + a).collect();
            let after = assign_partitions(&grown, shards);
            for (shard, owned) in before.iter().enumerate() {
                for sp in owned {
                    prop_assert!(after[shard].contains(sp), "{sp:?} moved away from shard {shard}");
                    prop_assert_eq!(partition_owner(sp.source, sp.partition, shards), shard);
                }
            }
        }

        #[test]
        fn every_partition_has_one_owner_and_loads_are_even(counts in proptest::collection::vec(0i32..40, 0..5), shards in 1usize..9) {
            let owned = assign_partitions(&counts, shards);
            prop_assert_eq!(owned.len(), shards);
            // Naive model: the set of all partitions.
            let mut model: Vec<SourcePartition> = counts.iter().enumerate().flat_map(|(s, &n)| (0..n).map(move |p| SourcePartition { source: s, partition: p })).collect();
            let mut got: Vec<SourcePartition> = owned.iter().flatten().copied().collect();
            model.sort_by_key(|p| (p.source, p.partition));
            got.sort_by_key(|p| (p.source, p.partition));
            prop_assert_eq!(got, model);
            for source in 0..counts.len() {
                let loads: Vec<usize> = owned.iter().map(|o| o.iter().filter(|p| p.source == source).count()).collect();
                prop_assert!(loads.iter().max().unwrap() - loads.iter().min().unwrap() <= 1);
            }
            // Deterministic.
            prop_assert_eq!(assign_partitions(&counts, shards), owned);
        }
    }

    #[test]
    fn position_checks() {
        assert_eq!(check_position(5, 0, 10), StartCheck::Ok);
        assert_eq!(check_position(10, 0, 10), StartCheck::Ok);
        assert_eq!(check_position(3, 7, 10), StartCheck::Gap { from: 3, to: 7 });
        assert_eq!(check_position(12, 0, 10), StartCheck::BeyondEnd { end: 10 });
    }
}
