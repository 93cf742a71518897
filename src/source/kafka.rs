//! The Kafka partitions one shard reads, through one consumer of its own. Partitions are
//! assigned (never subscribed) at the offsets stored with the last flushed epoch; an offset
//! the broker no longer has is a gap, fatal unless the source says `on_gap = "skip"`.
//!
//! # Partitions added while running
//! A [`PartitionWatch`] thread (one per process) asks the brokers for the source topics'
//! partition counts every `[kafka] metadata_refresh` (default 30 s). When a topic grows, each
//! shard takes the new partitions that [`super::partition_owner`] deals it (the rule used at
//! start, so a restart agrees) and reads them from the earliest offset. Their positions are
//! stored with each epoch like the others.
//!
//! # Caught up and healthy
//! A partition may count as idle (stop holding the watermark back) only when it is caught up
//! and its fetches work ([`Progress`]). The consumer asks librdkafka for statistics every
//! second; a partition is *failing* while its leader broker is not up or has no leader, and
//! its state is *unknown* while no statistics came in for a few seconds (the shard not
//! polling) or it is not fetching yet. It is *caught up* when the next offset to read reaches
//! the broker's high watermark (or librdkafka fetched up to the end and holds nothing
//! undelivered: transaction markers at the end of a log are never delivered).

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::rc::Rc;
use std::sync::atomic::{AtomicI32, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::Offset;
use serde::Deserialize;

use super::{assignment_list, consumer_config, partition_owner, resolve_start, InputInfo, Polled, SourceError, SourcePartition};
use crate::config::{Config, GapPolicy};
use crate::state::{PartitionPosition, Recovered, NO_OFFSET};
use crate::telemetry::ShardStats;
use crate::types::EventTime;
use crate::watermark::Progress;

/// How long a shard waits for its topics' metadata before assigning its partitions.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
/// How often librdkafka reports statistics (the partitions' fetch health).
const STATISTICS_INTERVAL: Duration = Duration::from_secs(1);
/// Statistics older than this say nothing: the partition's state is unknown.
const STATISTICS_STALE_AFTER: Duration = Duration::from_secs(5);
/// How often a shard looks at the partition counts the watch publishes.
const DISCOVERY_CHECK: Duration = Duration::from_millis(100);
/// How long the watch waits for a metadata answer.
const WATCH_TIMEOUT: Duration = Duration::from_secs(10);

struct OwnedPartition {
    source: usize,
    partition: i32,
    topic: Rc<str>,
    /// The next offset to read, once known.
    next_offset: Option<i64>,
    /// The topic as a C string, for asking librdkafka the partition's high watermark.
    topic_c: CString,
    /// Its first input in [`KafkaSource::slots`]; a partition of a repartition topic has one
    /// input per partition of the source it repartitions, any other has one.
    first_slot: usize,
    /// For a partition of a repartition topic: the source's own topic, and its partition count.
    upstream: Option<(Rc<str>, i32)>,
}

/// One input of the shard: a partition, or a source partition read through a repartition
/// topic.
struct Slot {
    part: usize,
    /// The source partition, when read through a repartition topic.
    upstream: Option<i32>,
    restored_max_event_time: Option<EventTime>,
}

/// The fetch state of one partition, from librdkafka's statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionHealth {
    /// The leader broker is known and connected.
    pub leader_up: bool,
    /// librdkafka is fetching the partition (its fetch state is `active`).
    pub fetching: bool,
    /// When librdkafka fetched up to the end of the log (its fetch position reached the last
    /// stable offset, or the high watermark) and holds no message the application has not
    /// taken: that end offset.
    pub fetched_to: Option<i64>,
}

/// Health of every partition of a consumer, as of its last statistics.
#[derive(Debug, Default)]
struct HealthReport {
    at: Option<Instant>,
    partitions: HashMap<(String, i32), PartitionHealth>,
}

/// The consumer's context: keeps the partitions' health from librdkafka's statistics (served
/// on the shard's thread while it polls).
#[derive(Default)]
pub struct HealthContext {
    report: Mutex<HealthReport>,
}

impl ClientContext for HealthContext {
    fn stats_raw(&self, statistics: &[u8]) {
        match serde_json::from_slice::<RawStatistics>(statistics) {
            Ok(raw) => {
                let partitions = raw.health();
                let mut report = self.report.lock().unwrap_or_else(|e| e.into_inner());
                report.at = Some(Instant::now());
                report.partitions = partitions;
            }
            Err(e) => tracing::debug!(error = %e, "unreadable librdkafka statistics (partition health unknown until the next)"),
        }
    }
}

impl ConsumerContext for HealthContext {}

impl HealthContext {
    /// The partition's health, unless the statistics are missing or stale.
    pub fn partition(&self, topic: &str, partition: i32, now: Instant) -> Option<PartitionHealth> {
        let report = self.report.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = report.at.is_some_and(|at| now.saturating_duration_since(at) < STATISTICS_STALE_AFTER);
        if !fresh {
            return None;
        }
        report.partitions.get(&(topic.to_string(), partition)).copied()
    }
}

/// The parts of librdkafka's statistics JSON the health needs (the rest is ignored).
#[derive(Debug, Deserialize)]
struct RawStatistics {
    #[serde(default)]
    brokers: HashMap<String, RawBroker>,
    #[serde(default)]
    topics: HashMap<String, RawTopic>,
}

#[derive(Debug, Deserialize)]
struct RawBroker {
    nodeid: i32,
    state: String,
}

#[derive(Debug, Deserialize)]
struct RawTopic {
    #[serde(default)]
    partitions: HashMap<String, RawPartition>,
}

#[derive(Debug, Deserialize)]
struct RawPartition {
    partition: i32,
    leader: i32,
    fetch_state: String,
    next_offset: i64,
    hi_offset: i64,
    ls_offset: i64,
    fetchq_cnt: i64,
}

impl RawStatistics {
    fn health(&self) -> HashMap<(String, i32), PartitionHealth> {
        let up: Vec<i32> = self.brokers.values().filter(|b| b.state == "UP" && b.nodeid >= 0).map(|b| b.nodeid).collect();
        let mut out = HashMap::new();
        for (topic, t) in &self.topics {
            for p in t.partitions.values().filter(|p| p.partition >= 0) {
                let end = if p.ls_offset >= 0 { p.ls_offset.min(p.hi_offset) } else { p.hi_offset };
                let health = PartitionHealth {
                    leader_up: p.leader >= 0 && up.contains(&p.leader),
                    fetching: p.fetch_state == "active",
                    fetched_to: (end >= 0 && p.next_offset >= end && p.fetchq_cnt == 0).then_some(end),
                };
                out.insert((topic.clone(), p.partition), health);
            }
        }
        out
    }
}

/// Pure rule: where a partition stands, from its lag and the broker's high watermark as
/// librdkafka last saw them (-1 when unknown) and its health (`None` without fresh statistics).
pub fn partition_progress(lag: i64, high: i64, health: Option<PartitionHealth>) -> Progress {
    let Some(h) = health else { return Progress::Unknown };
    if !h.leader_up {
        return Progress::Failing;
    }
    if !h.fetching {
        return Progress::Unknown;
    }
    // Fetched to an end no older than the newest high watermark: only records never delivered
    // (transaction markers, aborted records) can lie between our position and it.
    if lag == 0 || h.fetched_to.is_some_and(|end| end >= high) {
        return Progress::CaughtUp;
    }
    if lag > 0 {
        Progress::Behind
    } else {
        Progress::Unknown
    }
}

/// The source topics' partition counts, kept current by a thread that asks the brokers every
/// `[kafka] metadata_refresh`. The thread ends once no shard holds the watch any more.
#[derive(Debug)]
pub struct PartitionWatch {
    /// Per source: the count the shards were assigned from at start (0 for file sources).
    initial: Vec<i32>,
    counts: Vec<AtomicI32>,
}

impl PartitionWatch {
    /// A watch that never changes (the counts stay `counts`).
    pub fn fixed(counts: &[i32]) -> Arc<PartitionWatch> {
        Arc::new(PartitionWatch {
            initial: counts.to_vec(),
            counts: counts.iter().map(|&c| AtomicI32::new(c)).collect(),
        })
    }

    /// Starts watching the Kafka sources' topics, from the counts the partitions were assigned
    /// with at start.
    pub fn start(config: &Arc<Config>, bootstrap: &str, counts: &[i32]) -> Arc<PartitionWatch> {
        let watch = PartitionWatch::fixed(counts);
        let consumer: BaseConsumer = match consumer_config(config, bootstrap).create() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the Kafka client that looks for added partitions; partitions added while running are read after a restart");
                return watch;
            }
        };
        let config = config.clone();
        let for_thread = watch.clone();
        let spawned = std::thread::Builder::new()
            .name("partition-watch".into())
            .spawn(move || for_thread.run(&config, &consumer));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the thread that looks for added partitions; partitions added while running are read after a restart");
        }
        watch
    }

    /// The count the shards were assigned from at start.
    pub fn initial(&self, source: usize) -> i32 {
        self.initial.get(source).copied().unwrap_or(0)
    }

    /// The latest known partition count of a source.
    pub fn count(&self, source: usize) -> i32 {
        self.counts.get(source).map_or(0, |c| c.load(Relaxed))
    }

    fn run(self: Arc<Self>, config: &Config, consumer: &BaseConsumer) {
        let refresh = config.kafka.metadata_refresh;
        let mut failing = false;
        loop {
            let due = Instant::now() + refresh;
            while Instant::now() < due {
                if Arc::strong_count(&self) == 1 {
                    return; // every shard has stopped
                }
                std::thread::sleep(DISCOVERY_CHECK.min(refresh));
            }
            for (si, s) in config.sources.iter().enumerate() {
                if s.files.is_some() {
                    continue;
                }
                let found = consumer
                    .fetch_metadata(Some(&s.topic), WATCH_TIMEOUT)
                    .map_err(|e| e.to_string())
                    .and_then(|md| {
                        md.topics()
                            .iter()
                            .find(|t| t.name() == s.topic && t.error().is_none())
                            .map(|t| t.partitions().len() as i32)
                            .ok_or_else(|| "topic not in the metadata".to_string())
                    });
                match found {
                    Ok(count) => {
                        failing = false;
                        let known = self.counts[si].load(Relaxed);
                        if count > known {
                            tracing::info!(
                                source = %s.name, topic = %s.topic, from = known, to = count,
                                "topic \"{}\" grew from {known} to {count} partitions; reading the new ones from their earliest offset",
                                s.topic
                            );
                            self.counts[si].store(count, Relaxed);
                        }
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(topic = %s.topic, error = %e, "cannot look up the topic's partitions (retried every metadata_refresh; is the broker up?)");
                        }
                        failing = true;
                    }
                }
            }
        }
    }
}

pub struct KafkaSource {
    consumer: BaseConsumer<HealthContext>,
    config: Arc<Config>,
    bootstrap: String,
    parts: Vec<OwnedPartition>,
    slots: Vec<Slot>,
    /// (topic, partition → index into `parts`)
    topics: Vec<(Rc<str>, Vec<Option<usize>>)>,
    stats: Arc<crate::telemetry::PipelineStats>,
    shard: usize,
    shards: usize,
    watch: Option<Arc<PartitionWatch>>,
    /// Per source: the partition count this shard has dealt itself partitions from.
    known_counts: Vec<i32>,
    next_discovery: Instant,
    /// Inputs added since the shard last asked ([`KafkaSource::take_added`]).
    added: usize,
}

fn client_error(bootstrap: &str) -> impl Fn(KafkaError) -> SourceError + '_ {
    move |source| SourceError::Client {
        bootstrap: bootstrap.to_string(),
        source,
    }
}

/// librdkafka's last known (low, high) watermarks of a partition (the high one updated with
/// every fetch; no request made), or `None` before the first fetch.
pub(crate) fn known_watermarks<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &CStr, partition: i32) -> Option<(i64, i64)> {
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives; `topic` is NUL-terminated
    // and outlives the call; librdkafka only reads it and writes the two out-parameters, and
    // the call takes its own locks (it is documented as thread-safe and non-blocking).
    let err = unsafe { rdkafka::bindings::rd_kafka_get_watermark_offsets(consumer.client().native_ptr(), topic.as_ptr(), partition, &mut low, &mut high) };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some((low.max(0), high))
}

/// The next offset an assignment starts at, when it is a concrete one (not Beginning/End).
fn known_offset(offset: Offset) -> Option<i64> {
    match offset {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// A gap skipped because the source allows it: logged as data loss and counted.
fn record_skipped_gap(stats: &ShardStats, topic: &str, partition: i32, from: i64, to: i64) {
    tracing::error!(
        topic,
        partition,
        from,
        to,
        "data loss: offsets {from}..{to} were deleted by the broker before they were read; skipping them because on_gap = \"skip\""
    );
    ShardStats::add(&stats.gaps_skipped, 1);
    ShardStats::add(&stats.offsets_skipped, (to - from) as u64);
}

impl KafkaSource {
    /// Creates the shard's consumer and assigns `partitions` at their stored positions (or
    /// the sources' `starting_offsets`). With a `watch`, partitions added later that this
    /// shard owns are assigned as they appear ([`KafkaSource::discover`]).
    pub fn open(
        config: Arc<Config>,
        bootstrap: &str,
        partitions: &[SourcePartition],
        watch: Option<Arc<PartitionWatch>>,
        recovered: &Recovered,
        stats: Arc<crate::telemetry::PipelineStats>,
        (shard, shards): (usize, usize),
    ) -> Result<KafkaSource, SourceError> {
        let mut client = consumer_config(&config, bootstrap);
        // Statistics tell whether each partition's fetches work (see the module doc).
        client.set("statistics.interval.ms", STATISTICS_INTERVAL.as_millis().to_string());
        let consumer: BaseConsumer<HealthContext> = client.create_with_context(HealthContext::default()).map_err(client_error(bootstrap))?;
        let known_counts = match &watch {
            Some(w) => (0..config.sources.len()).map(|s| w.initial(s)).collect(),
            None => vec![0; config.sources.len()],
        };
        let mut source = KafkaSource {
            consumer,
            config,
            bootstrap: bootstrap.to_string(),
            parts: Vec::new(),
            slots: Vec::new(),
            topics: Vec::new(),
            stats,
            shard,
            shards,
            watch,
            known_counts,
            next_discovery: Instant::now(),
            added: 0,
        };
        let mut assignment = Vec::new();
        for sp in partitions {
            let src = &source.config.sources[sp.source];
            let stored = recovered.positions.get(&(src.topic.clone(), sp.partition));
            let (offset, skipped) = resolve_start(
                &source.consumer,
                &src.topic,
                sp.partition,
                stored.map(|p| p.next_offset),
                src.starting_offsets,
                src.on_gap,
            )?;
            if let Some((from, to)) = skipped {
                record_skipped_gap(&source.stats.shards[shard], &src.topic, sp.partition, from, to);
            }
            assignment.push((src.topic.clone(), sp.partition, offset));
            let restored = |topic: &str, partition: i32| recovered.positions.get(&(topic.to_string(), partition)).and_then(|p| p.max_event_time);
            source.add_part(*sp, known_offset(offset), |upstream| match upstream {
                Some((topic, u)) => restored(topic, u),
                None => stored.and_then(|p| p.max_event_time),
            })?;
        }
        // librdkafka resolves a logical start (earliest/latest) once it has the topic's
        // metadata; a consumer without it waits for a 500 ms retry before its first fetch.
        for (topic, _) in &source.topics {
            if let Err(e) = source.consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT) {
                tracing::debug!(topic = %topic, error = %e, "no topic metadata before assigning (the first fetch may start later)");
            }
        }
        let tpl = assignment_list(&assignment).map_err(client_error(bootstrap))?;
        source.consumer.assign(&tpl).map_err(client_error(bootstrap))?;
        source.added = 0;
        Ok(source)
    }

    /// Adds a partition to `parts` and its inputs to `slots` (not yet to the consumer's
    /// assignment); `restored(upstream)`: an input's largest event time as of the last flushed
    /// epoch.
    fn add_part(
        &mut self,
        sp: SourcePartition,
        next_offset: Option<i64>,
        restored: impl Fn(Option<(&str, i32)>) -> Option<EventTime>,
    ) -> Result<(), SourceError> {
        let source = &self.config.sources[sp.source];
        let topic = source.topic.clone();
        let upstream: Option<(Rc<str>, i32)> = source.repartitioned.as_ref().map(|r| (r.topic.as_str().into(), r.upstream_partitions));
        let ti = match self.topics.iter().position(|t| *t.0 == *topic) {
            Some(ti) => ti,
            None => {
                self.topics.push((topic.as_str().into(), Vec::new()));
                self.topics.len() - 1
            }
        };
        let by_partition = &mut self.topics[ti].1;
        if by_partition.len() <= sp.partition as usize {
            by_partition.resize(sp.partition as usize + 1, None);
        }
        by_partition[sp.partition as usize] = Some(self.parts.len());
        let topic_c = CString::new(topic.as_str())
            .map_err(|_| client_error(&self.bootstrap)(KafkaError::ClientCreation(format!("topic name {topic:?} contains a NUL byte"))))?;
        let first_slot = self.slots.len();
        match &upstream {
            None => self.slots.push(Slot {
                part: self.parts.len(),
                upstream: None,
                restored_max_event_time: restored(None),
            }),
            Some((from, count)) => {
                for u in 0..*count {
                    self.slots.push(Slot {
                        part: self.parts.len(),
                        upstream: Some(u),
                        restored_max_event_time: restored(Some((&**from, u))),
                    });
                }
            }
        }
        self.added += self.slots.len() - first_slot;
        self.parts.push(OwnedPartition {
            source: sp.source,
            partition: sp.partition,
            topic: self.topics[ti].0.clone(),
            next_offset,
            topic_c,
            first_slot,
            upstream,
        });
        Ok(())
    }

    /// Assigns the partitions added to the source topics since the last look that this shard
    /// owns, from their earliest offset. Cheap when nothing changed (a few atomic loads, at
    /// most every 100 ms). Returns how many inputs were added (at the end of [`Self::inputs`]).
    pub fn discover(&mut self) -> Result<usize, SourceError> {
        let Some(watch) = self.watch.clone() else { return Ok(0) };
        let now = Instant::now();
        if now < self.next_discovery {
            return Ok(0);
        }
        self.next_discovery = now + DISCOVERY_CHECK;
        let before = self.parts.len();
        let slots_before = self.slots.len();
        for si in 0..self.known_counts.len() {
            let count = watch.count(si);
            let known = self.known_counts[si];
            if count <= known {
                continue;
            }
            for partition in known..count {
                if partition_owner(si, partition, self.shards) == self.shard {
                    let sp = SourcePartition { source: si, partition };
                    tracing::info!(shard = self.shard, topic = %self.config.sources[si].topic, partition, "reading a partition added to the topic, from its earliest offset");
                    self.add_part(sp, None, |_| None)?;
                }
            }
            self.known_counts[si] = count;
        }
        if self.parts.len() > before {
            // Added to the running assignment: the partitions already read keep fetching
            // (a full re-assign would stop and restart them).
            let new: Vec<_> = self.parts[before..]
                .iter()
                .map(|p| (p.topic.to_string(), p.partition, Offset::Beginning))
                .collect();
            let tpl = assignment_list(&new).map_err(client_error(&self.bootstrap))?;
            self.consumer.incremental_assign(&tpl).map_err(client_error(&self.bootstrap))?;
        }
        Ok(self.slots.len() - slots_before)
    }

    /// Inputs added by [`Self::discover`] since the last call.
    pub fn take_added(&mut self) -> usize {
        std::mem::take(&mut self.added)
    }

    /// Assigns every owned partition again at its position (those not read yet from a logical
    /// start, from the beginning: a "latest" start is always resolved to an offset).
    fn reassign(&mut self) -> Result<(), SourceError> {
        let list: Vec<_> = self
            .parts
            .iter()
            .map(|p| (p.topic.to_string(), p.partition, p.next_offset.map_or(Offset::Beginning, Offset::Offset)))
            .collect();
        let tpl = assignment_list(&list).map_err(client_error(&self.bootstrap))?;
        self.consumer.assign(&tpl).map_err(client_error(&self.bootstrap))
    }

    pub fn inputs(&self) -> Vec<InputInfo> {
        self.slots
            .iter()
            .map(|slot| {
                let p = &self.parts[slot.part];
                InputInfo {
                    source: p.source,
                    partition: slot.upstream.unwrap_or(p.partition),
                    label: p.upstream.as_ref().map_or(&p.topic, |(from, _)| from).clone(),
                    restored_max_event_time: slot.restored_max_event_time,
                    carried: slot.upstream.is_some(),
                }
            })
            .collect()
    }

    pub fn input_count(&self) -> usize {
        self.slots.len()
    }

    fn part_index(&self, topic: &str, partition: i32) -> Option<usize> {
        let t = self.topics.iter().find(|t| &*t.0 == topic)?;
        *t.1.get(partition as usize)?
    }

    /// Polls up to `max` messages without waiting.
    pub fn poll(&mut self, max: usize, mut on: impl FnMut(Polled<'_>)) -> Result<usize, SourceError> {
        let mut polled = 0;
        while polled < max {
            let msg = match self.consumer.poll(Duration::ZERO) {
                None => break,
                Some(Ok(m)) => m,
                Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange))) => {
                    self.handle_out_of_range()?;
                    break;
                }
                Some(Err(e)) => {
                    tracing::warn!(shard = self.shard, error = %e, "Kafka consumer error (librdkafka retries; check the broker if this repeats)");
                    break;
                }
            };
            polled += 1;
            let Some(pi) = self.part_index(msg.topic(), msg.partition()) else { continue };
            let part = &mut self.parts[pi];
            part.next_offset = Some(msg.offset() + 1);
            let payload = msg.payload().unwrap_or(&[]);
            let Some((_, upstream_count)) = &part.upstream else {
                on(Polled::record(part.first_slot, msg.offset(), payload));
                continue;
            };
            let record = match super::carried::read_headers(msg.headers()) {
                Some((u, offset, carried)) if (0..*upstream_count).contains(&u) => Polled {
                    is_record: carried.mark.is_none(),
                    carried: Some(carried),
                    ..Polled::record(part.first_slot + u as usize, offset.unwrap_or(-1), payload)
                },
                _ => Polled {
                    problem: Some(format!(
                        "record at offset {} of repartition topic {}[{}] was not written by tidemark's repartitioner (its headers name no source partition)",
                        msg.offset(),
                        part.topic,
                        part.partition
                    )),
                    ..Polled::record(part.first_slot, msg.offset(), payload)
                },
            };
            on(record);
        }
        Ok(polled)
    }

    /// The broker no longer has the offset we asked for: find which partitions, report the gap.
    fn handle_out_of_range(&mut self) -> Result<(), SourceError> {
        let mut reassign = false;
        for pi in 0..self.parts.len() {
            let part = &self.parts[pi];
            let src = &self.config.sources[part.source];
            let Some(next) = part.next_offset else { continue };
            let (offset, skipped) = resolve_start(&self.consumer, &src.topic, part.partition, Some(next), src.starting_offsets, src.on_gap)?;
            if let Some((from, to)) = skipped {
                debug_assert_eq!(src.on_gap, GapPolicy::Skip);
                record_skipped_gap(&self.stats.shards[self.shard], &src.topic, part.partition, from, to);
                self.parts[pi].next_offset = known_offset(offset).or(self.parts[pi].next_offset);
                reassign = true;
            }
        }
        if reassign {
            self.reassign()?;
        }
        Ok(())
    }

    /// Messages behind the partition's end (-1 while unknown). Before the first record, the
    /// position is the start of the retained log.
    pub fn lag(&self, input: usize) -> i64 {
        let p = &self.parts[self.slots[input].part];
        known_watermarks(&self.consumer, &p.topic_c, p.partition).map_or(-1, |(low, high)| (high - p.next_offset.unwrap_or(low)).max(0))
    }

    /// Whether the partition is caught up and its fetches work (see the module doc).
    pub fn progress(&self, input: usize, now: Instant) -> Progress {
        let p = &self.parts[self.slots[input].part];
        let high = known_watermarks(&self.consumer, &p.topic_c, p.partition).map_or(-1, |(_, high)| high);
        partition_progress(self.lag(input), high, self.consumer.context().partition(&p.topic, p.partition, now))
    }

    /// Where each partition stands, for the epoch's write batch (`max_event_time(input)`: the
    /// largest event time the shard saw on it).
    pub fn positions(&self, max_event_time: impl Fn(usize) -> Option<EventTime>, out: &mut Vec<PartitionPosition>) {
        for p in &self.parts {
            let Some(next_offset) = p.next_offset else { continue };
            let Some((from, count)) = &p.upstream else {
                out.push(PartitionPosition {
                    topic: p.topic.to_string(),
                    partition: p.partition,
                    next_offset,
                    max_event_time: max_event_time(p.first_slot),
                });
                continue;
            };
            out.push(PartitionPosition {
                topic: p.topic.to_string(),
                partition: p.partition,
                next_offset,
                max_event_time: None,
            });
            // The clocks of the source partitions it carries, by their own names; no offset
            // (those are the repartitioner's).
            out.extend((0..*count).filter_map(|u| {
                max_event_time(p.first_slot + u as usize).map(|max| PartitionPosition {
                    topic: from.to_string(),
                    partition: u,
                    next_offset: NO_OFFSET,
                    max_event_time: Some(max),
                })
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEALTHY: PartitionHealth = PartitionHealth {
        leader_up: true,
        fetching: true,
        fetched_to: None,
    };

    #[test]
    fn progress_needs_fresh_statistics_a_live_leader_and_no_backlog() {
        assert_eq!(partition_progress(0, 10, Some(HEALTHY)), Progress::CaughtUp);
        assert_eq!(partition_progress(5, 10, Some(HEALTHY)), Progress::Behind);
        assert_eq!(partition_progress(-1, -1, Some(HEALTHY)), Progress::Unknown, "before the first fetch");
        // Caught up by the cached watermarks, but the leader is down: failing, never idle.
        let down = PartitionHealth { leader_up: false, ..HEALTHY };
        assert_eq!(partition_progress(0, 10, Some(down)), Progress::Failing);
        assert_eq!(partition_progress(0, 10, None), Progress::Unknown, "no fresh statistics");
        let starting = PartitionHealth { fetching: false, ..HEALTHY };
        assert_eq!(partition_progress(0, 10, Some(starting)), Progress::Unknown);
        // A transaction marker at the end is never delivered: fetched to the end counts.
        let to_end = PartitionHealth {
            fetched_to: Some(11),
            ..HEALTHY
        };
        assert_eq!(partition_progress(1, 11, Some(to_end)), Progress::CaughtUp);
        // ... unless the high watermark has moved on since the statistics.
        assert_eq!(partition_progress(3, 13, Some(to_end)), Progress::Behind);
    }

    #[test]
    fn statistics_give_each_partition_its_health() {
        let json = br#"{
            "name": "c", "brokers": {
                "127.0.0.1:9092/1": { "nodeid": 1, "state": "UP", "rtt": {} },
                "127.0.0.1:9093/2": { "nodeid": 2, "state": "CONNECT" },
                "GroupCoordinator": { "nodeid": -1, "state": "UP" }
            },
            "topics": { "clicks": { "partitions": {
                "0": { "partition": 0, "leader": 1, "fetch_state": "active", "next_offset": 10, "hi_offset": 10, "ls_offset": 10, "fetchq_cnt": 0, "extra": 1 },
                "1": { "partition": 1, "leader": 2, "fetch_state": "active", "next_offset": 3, "hi_offset": 10, "ls_offset": 10, "fetchq_cnt": 0 },
                "2": { "partition": 2, "leader": -1, "fetch_state": "offset-query", "next_offset": -1001, "hi_offset": -1, "ls_offset": -1, "fetchq_cnt": 0 },
                "-1": { "partition": -1, "leader": -1, "fetch_state": "none", "next_offset": 0, "hi_offset": -1, "ls_offset": -1, "fetchq_cnt": 0 }
            } } }
        }"#;
        let context = HealthContext::default();
        let now = Instant::now();
        assert_eq!(context.partition("clicks", 0, now), None, "no statistics yet");
        context.stats_raw(json);
        let now = Instant::now();
        let p0 = context.partition("clicks", 0, now).unwrap();
        assert_eq!(
            p0,
            PartitionHealth {
                leader_up: true,
                fetching: true,
                fetched_to: Some(10)
            }
        );
        assert!(!context.partition("clicks", 1, now).unwrap().leader_up, "its leader is not connected");
        assert_eq!(partition_progress(0, 10, context.partition("clicks", 1, now)), Progress::Failing);
        let p2 = context.partition("clicks", 2, now).unwrap();
        assert!(!p2.leader_up && !p2.fetching);
        assert_eq!(context.partition("clicks", -1, now), None);
        // Statistics go stale when no more come (the shard stopped polling).
        assert_eq!(context.partition("clicks", 0, now + STATISTICS_STALE_AFTER), None);
    }
    /// Polls `source` (serving librdkafka's statistics) until its partition's progress is
    /// `want`, counting the records read; fails after 30 s.
    fn poll_until_progress(source: &mut KafkaSource, want: Progress, read: &mut usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            *read += source.poll(100, |_| {}).unwrap();
            let now = Instant::now();
            if source.progress(0, now) == want {
                return;
            }
            assert!(now < deadline, "still {:?} after 30 s, waiting for {want:?}", source.progress(0, now));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_caught_up_partition_is_failing_while_its_broker_is_down() {
        let broker = crate::broker::EmbeddedBroker::start(&[("events".to_string(), 1)]).unwrap();
        let producer = crate::source::producer::EventProducer::connect(broker.bootstrap_servers()).unwrap();
        for i in 0..3 {
            producer
                .send("events", Some(0), b"k", format!(r#"{{"key":"k","value":{i},"ts":1}}"#).as_bytes())
                .unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
        let text = include_str!("../../tests/data/minimal.toml");
        let config = Arc::new(crate::config::parse_config(text).unwrap());
        let stats = Arc::new(crate::telemetry::PipelineStats::new(1, 1, 1));
        let partitions = [SourcePartition { source: 0, partition: 0 }];
        let watch = PartitionWatch::fixed(&[1]);
        let mut source = KafkaSource::open(
            config,
            broker.bootstrap_servers(),
            &partitions,
            Some(watch),
            &Recovered::default(),
            stats,
            (0, 1),
        )
        .unwrap();
        let mut read = 0;
        poll_until_progress(&mut source, Progress::CaughtUp, &mut read);
        assert_eq!(read, 3, "caught up only once every record is read");
        // The cached high watermark still says "caught up", but the broker is gone.
        broker.set_up(false).unwrap();
        poll_until_progress(&mut source, Progress::Failing, &mut read);
        assert_eq!(source.lag(0), 0);
        broker.set_up(true).unwrap();
        producer.send("events", Some(0), b"k", br#"{"key":"k","value":9,"ts":2}"#).unwrap();
        producer.flush(Duration::from_secs(30)).unwrap();
        poll_until_progress(&mut source, Progress::CaughtUp, &mut read);
        assert_eq!(read, 4);
    }

    #[test]
    fn partitions_added_to_a_topic_are_dealt_and_assigned_from_the_start() {
        // The topic has 4 partitions; the shards were dealt the first 2 (as if it grew since).
        let broker = crate::broker::EmbeddedBroker::start(&[("events".to_string(), 4)]).unwrap();
        let producer = crate::source::producer::EventProducer::connect(broker.bootstrap_servers()).unwrap();
        for p in 0..4 {
            producer.send("events", Some(p), b"k", br#"{"key":"k","value":1,"ts":1}"#).unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
        let text = include_str!("../../tests/data/minimal.toml");
        let config = Arc::new(crate::config::parse_config(text).unwrap());
        let stats = Arc::new(crate::telemetry::PipelineStats::new(2, 1, 1));
        // Shard 1 of 2 owns partition 1 of the 2 the topic has at start.
        let watch = PartitionWatch::fixed(&[2]);
        let partitions = [SourcePartition { source: 0, partition: 1 }];
        let mut source = KafkaSource::open(
            config,
            broker.bootstrap_servers(),
            &partitions,
            Some(watch.clone()),
            &Recovered::default(),
            stats,
            (1, 2),
        )
        .unwrap();
        let mut read: Vec<(usize, i64)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while read.is_empty() {
            assert!(Instant::now() < deadline, "partition 1 not read");
            source.poll(10, |r| read.push((r.input, r.offset))).unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(source.discover().unwrap(), 0);
        // The watch finds 4 partitions: shard 1 takes partition 3 (2 is shard 0's).
        watch.counts[0].store(4, Relaxed);
        source.next_discovery = Instant::now();
        assert_eq!(source.discover().unwrap(), 1);
        assert_eq!(source.take_added(), 1);
        let owned: Vec<i32> = source.inputs().iter().map(|i| i.partition).collect();
        assert_eq!(owned, [1, 3]);
        assert_eq!(source.inputs()[1].restored_max_event_time, None);
        source.next_discovery = Instant::now();
        assert_eq!(source.discover().unwrap(), 0, "each partition is added once");
        // The new partition is read from its start, as input 1.
        while read.len() < 2 {
            assert!(Instant::now() < deadline, "partition 3 not read: {read:?}");
            source.poll(10, |r| read.push((r.input, r.offset))).unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(read, [(0, 0), (1, 0)]);
        let mut positions = Vec::new();
        source.positions(|_| None, &mut positions);
        assert_eq!(positions.iter().map(|p| (p.partition, p.next_offset)).collect::<Vec<_>>(), [(1, 1), (3, 1)]);
    }
}
