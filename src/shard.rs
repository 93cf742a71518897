//! One core's event loop. A shard owns its source partitions, one [`SourceDecoder`] per
//! source, and the window operators for its share of every query's key space.
//!
//! The loop never blocks on a peer: it drains inbound channels, sends outbound batches with
//! `try_send` (a full channel pauses reading the sources — backpressure — and never drops
//! data), polls Kafka without waiting, and acts on epoch barriers from the coordinator.
//!
//! Epoch protocol (aligned barriers; DESIGN.md §1, refined): on `Barrier(n)` a shard stops
//! reading sources, sends `Barrier(n, its watermark)` after all rows it sent in epoch n, and
//! keeps applying inbound rows until every peer's barrier arrived. Then every shard knows the
//! same set of shard watermarks, computes the same pipeline watermark W(n), closes windows up
//! to it, and hands its epoch report to the committer. Lateness is decided at the source
//! against W(n−1), the same value every shard used to close windows, so a record is either
//! counted in its window or dead-lettered with its raw payload — never both, never neither.

use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flume::{Receiver, Sender, TryRecvError, TrySendError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;

use crate::config::{Config, GapPolicy};
use crate::decode::{DeadLetterReason, SourceDecoder};
use crate::expr::Expr;
use crate::sink::{DeadLetter, SinkRows};
use crate::source::files::{FilePosition, FileSource, FileSourceOptions};
use crate::source::{assignment_list, consumer_config, resolve_start, SourceError, SourcePartition};
use crate::state::{PartitionPosition, Recovered, StateError, StateStore};
use crate::telemetry::{reason_index, EpochLatency, PartitionStats, ShardStats, Tally, WarnLimiter, PUBLISH_EVERY};
use crate::time::format_micros;
use crate::value::{shard_for_key, EventTime};
use crate::watermark::{advance, combine_min, PartitionClock, IDLE};
use crate::window::{input_kind, InSlot, InputKind, OperatorChanges, OutputRow, WindowOperator};

/// Messages polled per round before other duties get a turn.
const POLL_ROUND: usize = 4096;
/// Exchange batches queued locally per peer (beyond the channel) before sources pause.
const MAX_LOCAL_QUEUE: usize = 2;

/// Data-plane message between shards. Rows and barriers share one FIFO per shard pair, so a
/// barrier (and the watermark it carries) never overtakes rows sent before it.
#[derive(Debug)]
pub enum ShardMsg {
    Rows(ExchangeBatch),
    Barrier { epoch: u64, watermark: EventTime },
}

/// Control from the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Close epoch `epoch`; `last` = stop after it (graceful shutdown).
    Barrier { epoch: u64, last: bool },
}

/// Projected records bound for one shard: flat arrays, no allocation per record.
#[derive(Debug, Default)]
pub struct ExchangeBatch {
    recs: Vec<Rec>,
    keys: Vec<u8>,
    inputs: Vec<InSlot>,
    /// Byte-string inputs (distinct counts, first/last), referenced by `InSlot::Bytes`.
    blob: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
struct Rec {
    query: u16,
    key_end: u32,
    inputs_end: u32,
    event_time: EventTime,
}

impl ExchangeBatch {
    /// Appends one projected record bound for a peer shard. `inputs` may reference `blob` with
    /// `InSlot::Bytes`; the ranges are rebased onto the batch's own byte buffer. Public so the
    /// micro-benchmarks (`benches/micro.rs`) can measure the exchange path; the shard loop is
    /// its only other caller.
    pub fn push(&mut self, query: usize, key: &[u8], event_time: EventTime, inputs: &[InSlot], blob: &[u8]) {
        self.keys.extend_from_slice(key);
        let base = self.blob.len() as u32;
        self.blob.extend_from_slice(blob);
        self.inputs.extend(inputs.iter().map(|i| match *i {
            InSlot::Bytes { start, end } => InSlot::Bytes {
                start: start + base,
                end: end + base,
            },
            other => other,
        }));
        self.recs.push(Rec {
            query: query as u16,
            key_end: self.keys.len() as u32,
            inputs_end: self.inputs.len() as u32,
            event_time,
        });
    }

    fn apply(&self, ops: &mut [WindowOperator]) {
        let (mut k0, mut i0) = (0usize, 0usize);
        for r in &self.recs {
            let (k1, i1) = (r.key_end as usize, r.inputs_end as usize);
            ops[r.query as usize].update(r.event_time, &self.keys[k0..k1], &self.inputs[i0..i1], &self.blob);
            (k0, i0) = (k1, i1);
        }
    }
}

/// What one shard hands the committer at the end of an epoch.
#[derive(Debug)]
pub struct EpochReport {
    pub shard: usize,
    pub epoch: u64,
    /// The pipeline watermark W(epoch) this shard closed windows with (same on every shard).
    pub watermark: EventTime,
    /// Per query.
    pub changes: Vec<OperatorChanges>,
    pub positions: Vec<PartitionPosition>,
    /// (file-source name, encoded position) of the file sources this shard reads.
    pub file_positions: Vec<(String, Vec<u8>)>,
    /// Per sink plan index: rows of this epoch.
    pub outputs: Vec<Option<SinkRows>>,
    pub last: bool,
    /// This shard's latency samples for the epoch, settled by the committer at commit time.
    pub latency: EpochLatency,
}

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("shard {0}: a peer shard or the committer stopped unexpectedly (see the error logged before this one)")]
    PeerGone(usize),
    #[error("shard {0}: stopped because another part of the pipeline failed")]
    Aborted(usize),
}

/// Everything a shard needs; built by the daemon and moved into the shard's thread.
pub struct ShardContext {
    pub id: usize,
    pub shards: usize,
    pub config: Arc<Config>,
    pub bootstrap: String,
    pub store: Arc<StateStore>,
    pub recovered: Arc<Recovered>,
    pub partitions: Vec<SourcePartition>,
    /// Indexes of the file sources this shard reads.
    pub file_sources: Vec<usize>,
    /// Sink plan index fed by each query.
    pub query_sink: Vec<usize>,
    /// Dead-letter sink plan index of each source, if any.
    pub source_dlq: Vec<Option<usize>>,
    pub sink_count: usize,
    /// (peer id, receiver) for every other shard.
    pub inbound: Vec<(usize, Receiver<ShardMsg>)>,
    /// Sender per destination shard; `None` at this shard's own index.
    pub outbound: Vec<Option<Sender<ShardMsg>>>,
    pub control: Receiver<Control>,
    pub reports: Sender<EpochReport>,
    pub stats: Arc<crate::telemetry::PipelineStats>,
    pub abort: Arc<std::sync::atomic::AtomicBool>,
}

/// A file source read by this shard.
struct OwnedFiles {
    source: usize,
    /// `None` only while it is being polled.
    reader: Option<FileSource>,
    clock: PartitionClock,
    tally: Tally,
}

/// Where a record came from: index into `parts` or into `files`.
#[derive(Debug, Clone, Copy)]
enum Origin {
    Partition(usize),
    File(usize),
}

struct OwnedPartition {
    source: usize,
    partition: i32,
    topic: Rc<str>,
    next_offset: Option<i64>,
    clock: PartitionClock,
    tally: Tally,
    /// The topic as a C string, for asking librdkafka the partition's high watermark.
    topic_c: std::ffi::CString,
}

/// Which queries read a source, and the fields each needs.
struct Projection {
    query: usize,
    /// The query's `where`.
    filter: Option<Expr>,
    key_fields: Vec<usize>,
    inputs: Vec<AggInput>,
}

/// How one aggregate's input is read from an event.
struct AggInput {
    kind: InputKind,
    field: Option<usize>,
    filter: Option<Expr>,
}

struct Alignment {
    epoch: u64,
    last: bool,
    seen: Vec<bool>,
    watermarks: Vec<EventTime>,
}

struct Shard {
    ctx: ShardContext,
    consumer: Option<BaseConsumer>,
    parts: Vec<OwnedPartition>,
    files: Vec<OwnedFiles>,
    /// (topic, source index, partition → index into `parts`)
    topics: Vec<(Rc<str>, usize, Vec<Option<usize>>)>,
    decoders: Vec<SourceDecoder>,
    projections: Vec<Vec<Projection>>,
    ops: Vec<WindowOperator>,
    building: Vec<ExchangeBatch>,
    queues: Vec<std::collections::VecDeque<ShardMsg>>,
    outputs: Vec<Option<SinkRows>>,
    watermark: EventTime,
    aligning: Option<Alignment>,
    blocked_since: Option<Instant>,
    key_buf: Vec<u8>,
    input_buf: Vec<InSlot>,
    blob_buf: Vec<u8>,
    /// Dead letters dropped (no on_error sink) and bad input routed to dead letters: each
    /// warned about at most every few seconds.
    dropped_warnings: WarnLimiter,
    bad_input_warnings: WarnLimiter,
    /// Per query: late events since the last publication.
    late_tally: Vec<u64>,
    latency: EpochLatency,
    /// Time spent working, total; and the (instant, total) the current busy-ratio window began.
    busy: Duration,
    busy_window: (Instant, Duration),
    last_publish: Instant,
}

/// How long a shard waits for its topics' metadata before assigning its partitions.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a warning about bad input (or dropped dead letters) may be logged per shard.
const BAD_INPUT_WARN_EVERY: Duration = Duration::from_secs(5);
/// The window the busy ratio is computed over.
const BUSY_RATIO_WINDOW: Duration = Duration::from_secs(1);

/// librdkafka's last known (low, high) watermarks of a partition (the high one updated with
/// every fetch; no request made), or `None` before the first fetch.
fn known_watermarks(consumer: &BaseConsumer, topic: &std::ffi::CStr, partition: i32) -> Option<(i64, i64)> {
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives; `topic` is NUL-terminated
    // and outlives the call; librdkafka only reads it and writes the two out-parameters, and
    // the call takes its own locks (it is documented as thread-safe and non-blocking).
    let err = unsafe { rdkafka::bindings::rd_kafka_get_watermark_offsets(consumer.client().native_ptr(), topic.as_ptr(), partition, &mut low, &mut high) };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some((low.max(0), high))
}

/// The next offset an assignment starts at, when it is a concrete one (not Beginning/End).
fn known_offset(offset: rdkafka::Offset) -> Option<i64> {
    match offset {
        rdkafka::Offset::Offset(o) => Some(o),
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

/// Runs one shard to completion (graceful stop) or error. Called on the shard's glommio executor.
pub async fn run_shard(ctx: ShardContext) -> Result<(), ShardError> {
    let mut shard = Shard::open(ctx)?;
    shard.publish_state_sizes();
    shard.run().await
}

impl Shard {
    fn open(ctx: ShardContext) -> Result<Shard, ShardError> {
        let cfg = ctx.config.clone();
        let now = Instant::now();
        let mut ops: Vec<WindowOperator> = cfg.queries.iter().map(|q| WindowOperator::new(q, &cfg.sources[q.source_index])).collect();
        for (qi, op) in ops.iter_mut().enumerate() {
            ctx.store.load_windows(ctx.id, qi, op)?;
            op.resume_at(ctx.recovered.watermark);
        }
        let decoders: Vec<SourceDecoder> = cfg.sources.iter().map(SourceDecoder::new).collect();
        let projections = cfg
            .sources
            .iter()
            .enumerate()
            .map(|(si, _)| {
                cfg.queries
                    .iter()
                    .enumerate()
                    .filter(|(_, q)| q.source_index == si)
                    .map(|(qi, q)| {
                        let columns: Vec<(&str, crate::config::FieldType)> = cfg.sources[si].schema.iter().map(|f| (f.name.as_str(), f.ty)).collect();
                        // The config compiler type-checked these against the same columns.
                        let compile = |text: &String| Expr::compile(text, &columns).unwrap_or_else(|e| panic!("compiled config: {text:?}: {e}"));
                        Projection {
                            query: qi,
                            filter: q.filter.as_ref().map(compile),
                            key_fields: q.group_by.iter().map(|g| decoders[si].field_index(g).expect("compiled config")).collect(),
                            inputs: q
                                .aggregates
                                .iter()
                                .map(|a| AggInput {
                                    kind: input_kind(a),
                                    field: a.field_index,
                                    filter: a.filter.as_ref().map(compile),
                                })
                                .collect(),
                        }
                    })
                    .collect()
            })
            .collect();

        let mut topics: Vec<(Rc<str>, usize, Vec<Option<usize>>)> = Vec::new();
        let mut parts = Vec::new();
        let mut assignment = Vec::new();
        let consumer: Option<BaseConsumer> = if ctx.partitions.is_empty() {
            None
        } else {
            let consumer: BaseConsumer = consumer_config(&cfg, &ctx.bootstrap).create().map_err(|source| SourceError::Client {
                bootstrap: ctx.bootstrap.clone(),
                source,
            })?;
            for sp in &ctx.partitions {
                let src = &cfg.sources[sp.source];
                let topic: Rc<str> = match topics.iter().find(|t| t.1 == sp.source) {
                    Some(t) => t.0.clone(),
                    None => {
                        topics.push((src.topic.as_str().into(), sp.source, Vec::new()));
                        topics.last().unwrap().0.clone()
                    }
                };
                let stored = ctx.recovered.positions.get(&(src.topic.clone(), sp.partition));
                let (offset, skipped) = resolve_start(
                    &consumer,
                    &src.topic,
                    sp.partition,
                    stored.map(|p| p.next_offset),
                    src.starting_offsets,
                    src.on_gap,
                )?;
                if let Some((from, to)) = skipped {
                    record_skipped_gap(&ctx.stats.shards[ctx.id], &src.topic, sp.partition, from, to);
                }
                let t = topics.iter_mut().find(|t| t.1 == sp.source).unwrap();
                if t.2.len() <= sp.partition as usize {
                    t.2.resize(sp.partition as usize + 1, None);
                }
                t.2[sp.partition as usize] = Some(parts.len());
                parts.push(OwnedPartition {
                    source: sp.source,
                    partition: sp.partition,
                    topic: topic.clone(),
                    next_offset: known_offset(offset),
                    clock: PartitionClock::new(src.watermark.delay, src.watermark.idle_timeout, stored.and_then(|p| p.max_event_time), now),
                    tally: Tally::default(),
                    topic_c: std::ffi::CString::new(src.topic.as_str()).map_err(|_| SourceError::Client {
                        bootstrap: ctx.bootstrap.clone(),
                        source: rdkafka::error::KafkaError::ClientCreation(format!("topic name {:?} contains a NUL byte", src.topic)),
                    })?,
                });
                assignment.push((src.topic.clone(), sp.partition, offset));
            }
            // librdkafka resolves a logical start (earliest/latest) once it has the topic's
            // metadata; a consumer without it waits for a 500 ms retry before its first fetch.
            for (topic, _, _) in &topics {
                if let Err(e) = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT) {
                    tracing::debug!(topic = %topic, error = %e, "no topic metadata before assigning (the first fetch may start later)");
                }
            }
            let tpl = assignment_list(&assignment).map_err(|source| SourceError::Client {
                bootstrap: ctx.bootstrap.clone(),
                source,
            })?;
            consumer.assign(&tpl).map_err(|source| SourceError::Client {
                bootstrap: ctx.bootstrap.clone(),
                source,
            })?;
            Some(consumer)
        };
        let mut files = Vec::new();
        for &si in &ctx.file_sources {
            let src = &cfg.sources[si];
            let fc = src.files.as_ref().expect("assigned file sources have a files config");
            let stored = ctx.recovered.file_positions.get(&src.name);
            let position: FilePosition = match stored {
                Some(bytes) => serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt {
                    key: format!("files/{}", src.name),
                    what: format!("unreadable file-source position: {e}"),
                })?,
                None => FilePosition::default(),
            };
            let mut options = FileSourceOptions::new(fc.path.clone());
            options.settle = fc.settle;
            let reader = FileSource::open(options, position).map_err(|e| SourceError::Files {
                source_name: src.name.clone(),
                message: e.to_string(),
            })?;
            files.push(OwnedFiles {
                source: si,
                reader: Some(reader),
                clock: PartitionClock::new(src.watermark.delay, src.watermark.idle_timeout, None, now),
                tally: Tally::default(),
            });
        }
        let published: Vec<PartitionStats> = parts
            .iter()
            .map(|p| PartitionStats::new(p.source, p.partition))
            .chain(files.iter().map(|f| PartitionStats::new(f.source, -1)))
            .collect();
        let _ = ctx.stats.shards[ctx.id].partitions.set(published);
        tracing::info!(shard = ctx.id, partitions = parts.len(), file_sources = files.len(), "shard started");
        let n = ctx.shards;
        Ok(Shard {
            consumer,
            parts,
            files,
            topics,
            decoders,
            projections,
            ops,
            building: (0..n).map(|_| ExchangeBatch::default()).collect(),
            queues: (0..n).map(|_| Default::default()).collect(),
            outputs: (0..ctx.sink_count).map(|_| None).collect(),
            watermark: ctx.recovered.watermark.unwrap_or(crate::watermark::UNKNOWN),
            aligning: None,
            blocked_since: None,
            key_buf: Vec::with_capacity(256),
            input_buf: Vec::with_capacity(16),
            blob_buf: Vec::with_capacity(256),
            dropped_warnings: WarnLimiter::new(BAD_INPUT_WARN_EVERY),
            bad_input_warnings: WarnLimiter::new(BAD_INPUT_WARN_EVERY),
            late_tally: vec![0; cfg.queries.len()],
            latency: EpochLatency::new(now, crate::time::now_micros(), cfg.pipeline.commit_interval),
            busy: Duration::ZERO,
            busy_window: (now, Duration::ZERO),
            last_publish: now,
            ctx,
        })
    }

    async fn run(&mut self) -> Result<(), ShardError> {
        let mut idle_rounds = 0u32;
        loop {
            if self.ctx.abort.load(Relaxed) {
                return Err(ShardError::Aborted(self.ctx.id));
            }
            let began = Instant::now();
            if began.duration_since(self.last_publish) >= PUBLISH_EVERY {
                self.publish(began);
            }
            let mut progressed = self.drain_inbound()?;
            progressed |= self.flush_queues()?;
            if let Some(a) = &self.aligning {
                // Complete only once our own barrier has left too: peers wait for it.
                if a.seen.iter().all(|s| *s) && self.queues.iter().all(|q| q.is_empty()) {
                    let last = self.complete_epoch().await?;
                    self.busy += began.elapsed();
                    if last {
                        return Ok(());
                    }
                    continue;
                }
            } else {
                match self.ctx.control.try_recv() {
                    Ok(Control::Barrier { epoch, last }) => {
                        self.start_barrier(epoch, last);
                        continue;
                    }
                    Err(TryRecvError::Empty) => {}
                    Err(TryRecvError::Disconnected) => return Err(ShardError::PeerGone(self.ctx.id)),
                }
                let backlogged = self.queues.iter().any(|q| q.len() > MAX_LOCAL_QUEUE);
                if backlogged {
                    if self.blocked_since.is_none() {
                        ShardStats::add(&self.ctx.stats.shards[self.ctx.id].backpressure_pauses, 1);
                    }
                    self.blocked_since.get_or_insert_with(Instant::now);
                } else {
                    self.unblock();
                    progressed |= self.poll_sources()?;
                }
            }
            if progressed {
                self.busy += began.elapsed();
                idle_rounds = 0;
                glommio::yield_if_needed().await;
            } else {
                idle_rounds = idle_rounds.saturating_add(1);
                let nap = if idle_rounds < 16 {
                    Duration::from_micros(50)
                } else {
                    Duration::from_millis(1)
                };
                glommio::timer::sleep(nap).await;
            }
        }
    }

    /// Publishes what the shard counted since the last time (see [`crate::telemetry`]), the
    /// partitions' lag and watermarks, the busy ratio and the exchange queue lengths.
    fn publish(&mut self, now: Instant) {
        self.last_publish = now;
        let stats = &self.ctx.stats.shards[self.ctx.id];
        let published = stats.partitions();
        for (i, p) in self.parts.iter_mut().enumerate() {
            let Some(to) = published.get(i) else { continue };
            p.tally.publish(to);
            to.watermark.store(p.clock.own_watermark(), Relaxed);
            if let Some(consumer) = &self.consumer {
                // Before the first record, the position is the start of the retained log.
                let lag = known_watermarks(consumer, &p.topic_c, p.partition).map_or(-1, |(low, high)| (high - p.next_offset.unwrap_or(low)).max(0));
                to.lag.store(lag, Relaxed);
            }
        }
        for (i, f) in self.files.iter_mut().enumerate() {
            let Some(to) = published.get(self.parts.len() + i) else { continue };
            f.tally.publish(to);
            to.watermark.store(f.clock.own_watermark(), Relaxed);
        }
        for (q, n) in self.late_tally.iter_mut().enumerate() {
            ShardStats::add(&stats.late_by_query[q], std::mem::take(n));
        }
        stats.busy_micros.store(self.busy.as_micros() as u64, Relaxed);
        let (since, busy_then) = self.busy_window;
        let elapsed = now.saturating_duration_since(since);
        if elapsed >= BUSY_RATIO_WINDOW {
            let ratio = (self.busy - busy_then).as_secs_f64() / elapsed.as_secs_f64();
            stats.busy_ratio_ppm.store((ratio.min(1.0) * 1e6) as u64, Relaxed);
            self.busy_window = (now, self.busy);
        }
        for (dest, queued) in stats.exchange_queued.iter().enumerate() {
            let in_channel = self.ctx.outbound[dest].as_ref().map_or(0, |tx| tx.len());
            queued.store((in_channel + self.queues[dest].len()) as u64, Relaxed);
        }
    }

    /// Open windows and state keys per query.
    fn publish_state_sizes(&self) {
        let s = &self.ctx.stats.shards[self.ctx.id];
        for (q, op) in self.ops.iter().enumerate() {
            s.state_keys_by_query[q].store(op.open_keys() as u64, Relaxed);
            s.open_windows_by_query[q].store(op.open_windows() as u64, Relaxed);
        }
    }

    fn unblock(&mut self) {
        if let Some(since) = self.blocked_since.take() {
            let blocked = since.elapsed();
            self.parts.iter_mut().for_each(|p| p.clock.excuse(blocked));
            self.files.iter_mut().for_each(|f| f.clock.excuse(blocked));
        }
    }

    fn shard_watermark(&self) -> EventTime {
        let now = Instant::now();
        combine_min(
            self.parts
                .iter()
                .map(|p| p.clock.watermark(now))
                .chain(self.files.iter().map(|f| f.clock.watermark(now))),
        )
    }

    fn start_barrier(&mut self, epoch: u64, last: bool) {
        let wm = self.shard_watermark();
        for dest in 0..self.ctx.shards {
            if dest != self.ctx.id {
                self.seal_batch(dest);
                self.queues[dest].push_back(ShardMsg::Barrier { epoch, watermark: wm });
            }
        }
        let mut seen = vec![false; self.ctx.shards];
        seen[self.ctx.id] = true;
        let mut watermarks = vec![IDLE; self.ctx.shards];
        watermarks[self.ctx.id] = wm;
        self.aligning = Some(Alignment { epoch, last, seen, watermarks });
        self.blocked_since.get_or_insert_with(Instant::now);
    }

    /// Applies inbound rows; notes barriers. Returns whether anything arrived.
    fn drain_inbound(&mut self) -> Result<bool, ShardError> {
        let mut progressed = false;
        for idx in 0..self.ctx.inbound.len() {
            let peer = self.ctx.inbound[idx].0;
            for _ in 0..64 {
                if self.aligning.as_ref().is_some_and(|a| a.seen[peer]) {
                    break; // rows after a peer's barrier belong to the next epoch
                }
                match self.ctx.inbound[idx].1.try_recv() {
                    Ok(ShardMsg::Rows(batch)) => {
                        batch.apply(&mut self.ops);
                        progressed = true;
                    }
                    Ok(ShardMsg::Barrier { epoch, watermark }) => {
                        progressed = true;
                        if self.aligning.is_none() {
                            // A peer got the coordinator's barrier before us. The coordinator
                            // sends each barrier to all shards at once, so ours is (about to be)
                            // in the control channel: take it now.
                            let Ok(Control::Barrier { epoch: e, last }) = self.ctx.control.recv() else {
                                return Err(ShardError::PeerGone(self.ctx.id));
                            };
                            debug_assert_eq!(e, epoch, "barriers arrive in epoch order");
                            self.start_barrier(e, last);
                        }
                        let a = self.aligning.as_mut().expect("aligning");
                        debug_assert_eq!(a.epoch, epoch, "a peer is never more than one barrier ahead");
                        a.seen[peer] = true;
                        a.watermarks[peer] = watermark;
                        break;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return Err(ShardError::PeerGone(self.ctx.id)),
                }
            }
        }
        Ok(progressed)
    }

    fn seal_batch(&mut self, dest: usize) {
        if !self.building[dest].recs.is_empty() {
            let batch = std::mem::take(&mut self.building[dest]);
            self.queues[dest].push_back(ShardMsg::Rows(batch));
        }
    }

    fn flush_queues(&mut self) -> Result<bool, ShardError> {
        let mut progressed = false;
        for dest in 0..self.ctx.shards {
            let Some(tx) = &self.ctx.outbound[dest] else { continue };
            while let Some(msg) = self.queues[dest].pop_front() {
                match tx.try_send(msg) {
                    Ok(()) => progressed = true,
                    Err(TrySendError::Full(msg)) => {
                        self.queues[dest].push_front(msg);
                        break;
                    }
                    Err(TrySendError::Disconnected(_)) => return Err(ShardError::PeerGone(self.ctx.id)),
                }
            }
        }
        Ok(progressed)
    }

    fn poll_sources(&mut self) -> Result<bool, ShardError> {
        let mut n = self.poll_files()?;
        if let Some(consumer) = self.consumer.take() {
            let result = self.poll_round(&consumer);
            self.consumer = Some(consumer);
            n += result?;
        }
        for dest in 0..self.ctx.shards {
            if dest != self.ctx.id {
                self.seal_batch(dest);
            }
        }
        Ok(n > 0)
    }

    fn poll_round(&mut self, consumer: &BaseConsumer) -> Result<usize, ShardError> {
        let now = Instant::now();
        let mut events = 0u64;
        let mut polled = 0;
        while polled < POLL_ROUND {
            let msg = match consumer.poll(Duration::ZERO) {
                None => break,
                Some(Ok(m)) => m,
                Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange))) => {
                    self.handle_out_of_range(consumer)?;
                    break;
                }
                Some(Err(e)) => {
                    tracing::warn!(shard = self.ctx.id, error = %e, "Kafka consumer error (librdkafka retries; check the broker if this repeats)");
                    break;
                }
            };
            polled += 1;
            let Some(pi) = self.part_index(msg.topic(), msg.partition()) else { continue };
            let payload = msg.payload().unwrap_or(&[]);
            events += 1;
            let part = &mut self.parts[pi];
            part.tally.received += 1;
            part.tally.bytes += payload.len() as u64;
            part.next_offset = Some(msg.offset() + 1);
            self.process(Origin::Partition(pi), msg.offset(), payload, now);
        }
        self.latency.record_ingest(now, events);
        Ok(polled)
    }

    fn part_index(&self, topic: &str, partition: i32) -> Option<usize> {
        let t = self.topics.iter().find(|t| &*t.0 == topic)?;
        *t.2.get(partition as usize)?
    }

    /// Reads up to a round of lines from each file source this shard owns.
    fn poll_files(&mut self) -> Result<usize, ShardError> {
        let now = Instant::now();
        let mut total = 0;
        for fi in 0..self.files.len() {
            let mut reader = self.files[fi].reader.take().expect("reader is put back after each poll");
            let (mut events, mut bytes) = (0u64, 0u64);
            let result = reader.poll(POLL_ROUND, |line| {
                events += 1;
                bytes += line.bytes.len() as u64 + 1;
                let origin = Origin::File(fi);
                match &line.problem {
                    Some(problem) => {
                        let message = format!("line {} bytes into {}: {problem}", line.offset, line.file);
                        self.dead_letter_at(origin, line.file, line.offset as i64, line.bytes, DeadLetterReason::Decode, message);
                    }
                    None => self.process_at(origin, line.file, line.offset as i64, line.bytes, now),
                }
            });
            // Files skipped as corrupt, truncated or vanished are dead letters too: nothing is
            // dropped without a trace in the dead-letter table.
            for event in reader.take_events() {
                let file = event.file().to_string();
                self.dead_letter_at(Origin::File(fi), &file, -1, b"", DeadLetterReason::Decode, event.to_string());
            }
            self.files[fi].reader = Some(reader);
            let n = result.map_err(|e| SourceError::Files {
                source_name: self.ctx.config.sources[self.files[fi].source].name.clone(),
                message: e.to_string(),
            })?;
            let tally = &mut self.files[fi].tally;
            tally.received += events;
            tally.bytes += bytes;
            self.latency.record_ingest(now, events);
            total += n;
        }
        Ok(total)
    }

    fn file_positions(&self) -> Vec<(String, Vec<u8>)> {
        self.files
            .iter()
            .filter_map(|f| {
                let position = f.reader.as_ref()?.position();
                let bytes = serde_json::to_vec(&position).expect("a file position serializes");
                Some((self.ctx.config.sources[f.source].name.clone(), bytes))
            })
            .collect()
    }

    fn process(&mut self, origin: Origin, offset: i64, payload: &[u8], now: Instant) {
        self.process_at(origin, "", offset, payload, now)
    }

    /// `file` names the file a file-source record came from (empty for Kafka).
    fn process_at(&mut self, origin: Origin, file: &str, offset: i64, payload: &[u8], now: Instant) {
        let source = match origin {
            Origin::Partition(pi) => self.parts[pi].source,
            Origin::File(fi) => self.files[fi].source,
        };
        let decoder = &mut self.decoders[source];
        let t = match decoder.decode(payload) {
            Ok(t) => t,
            Err(e) => {
                self.dead_letter_at(origin, file, offset, payload, e.reason, e.message);
                return;
            }
        };
        match origin {
            Origin::Partition(pi) => {
                self.parts[pi].clock.observe(t, now);
                self.parts[pi].tally.decoded += 1;
            }
            Origin::File(fi) => {
                self.files[fi].clock.observe(t, now);
                self.files[fi].tally.decoded += 1;
            }
        }
        self.latency.record_event_time(t);
        for p in 0..self.projections[source].len() {
            let proj = &self.projections[source][p];
            let q = proj.query;
            if let Some(filter) = &proj.filter {
                if !filter.eval_predicate(&self.decoders[source].row(payload)) {
                    continue;
                }
            }
            if let Some((start, end)) = self.ops[q].late_window(t, self.watermark) {
                let query = &self.ctx.config.queries[q];
                let msg = format!(
                    "event time {} is behind the watermark {} (allowed_lateness {}): window [{}, {}) of query \"{}\" already closed (raise watermark.delay or allowed_lateness to accept later events)",
                    format_micros(t),
                    format_micros(self.watermark),
                    crate::config::format_duration(query.allowed_lateness),
                    format_micros(start),
                    format_micros(end),
                    query.name
                );
                self.late_tally[q] += 1;
                self.dead_letter_at(origin, file, offset, payload, DeadLetterReason::Late, msg);
                continue;
            }
            let decoder = &self.decoders[source];
            self.key_buf.clear();
            for &f in &proj.key_fields {
                decoder.write_key_component(payload, f, &mut self.key_buf);
            }
            self.input_buf.clear();
            self.blob_buf.clear();
            for input in &proj.inputs {
                if let Some(filter) = &input.filter {
                    if !filter.eval_predicate(&decoder.row(payload)) {
                        self.input_buf.push(InSlot::Skip);
                        continue;
                    }
                }
                let slot = match (input.kind, input.field) {
                    (InputKind::Row, _) | (_, None) => InSlot::Null,
                    // The decoder dead-letters events missing a schema field, so it is present.
                    (InputKind::Presence, Some(_)) => InSlot::Int(1),
                    (InputKind::Number, Some(f)) => match decoder.num(f) {
                        crate::value::Num::Int(v) => InSlot::Int(v),
                        crate::value::Num::Float(v) => InSlot::Float(v),
                        crate::value::Num::Null => InSlot::Null,
                    },
                    (InputKind::Bytes, Some(f)) => {
                        let start = self.blob_buf.len() as u32;
                        decoder.write_key_component(payload, f, &mut self.blob_buf);
                        InSlot::Bytes {
                            start,
                            end: self.blob_buf.len() as u32,
                        }
                    }
                };
                self.input_buf.push(slot);
            }
            let dest = shard_for_key(&self.key_buf, self.ctx.shards);
            if dest == self.ctx.id {
                self.ops[q].update(t, &self.key_buf, &self.input_buf, &self.blob_buf);
            } else {
                let b = &mut self.building[dest];
                b.push(q, &self.key_buf, t, &self.input_buf, &self.blob_buf);
                if b.recs.len() >= self.ctx.config.pipeline.exchange_batch {
                    self.seal_batch(dest);
                }
            }
        }
    }

    /// A bad record. For file sources `topic` is the file name, `partition` is -1 and `offset`
    /// the byte offset of the line.
    fn dead_letter_at(&mut self, origin: Origin, file: &str, offset: i64, payload: &[u8], reason: DeadLetterReason, error: String) {
        let (source, topic, partition, tally) = match origin {
            Origin::Partition(pi) => {
                let part = &mut self.parts[pi];
                (part.source, part.topic.to_string(), part.partition, &mut part.tally)
            }
            Origin::File(fi) => (self.files[fi].source, file.to_string(), -1, &mut self.files[fi].tally),
        };
        tally.dead_letters[reason_index(reason)] += 1;
        let stats = &self.ctx.stats.shards[self.ctx.id];
        match self.ctx.source_dlq[source] {
            Some(sink) => {
                if let Some(hidden) = self.bad_input_warnings.check(Instant::now()) {
                    let sink_name = &self.ctx.config.sinks[sink].name;
                    tracing::warn!(
                        topic = %topic, partition, offset, reason = reason.as_str(), %error, not_logged_since_last = hidden,
                        "bad record routed to the dead-letter sink \"{sink_name}\" (logged at most every {}s per shard; every one is counted in tidemark_events_dead_lettered_total)",
                        BAD_INPUT_WARN_EVERY.as_secs()
                    );
                }
                let dl = DeadLetter {
                    reason,
                    topic,
                    partition,
                    offset,
                    payload: payload.to_vec(),
                    error,
                    routed_at: chrono::Utc::now().timestamp_micros(),
                };
                match &mut self.outputs[sink] {
                    Some(rows) => rows.append(SinkRows::DeadLetters(vec![dl])),
                    slot => *slot = Some(SinkRows::DeadLetters(vec![dl])),
                }
            }
            None => {
                ShardStats::add(&stats.dead_letters_dropped, 1);
                if let Some(hidden) = self.dropped_warnings.check(Instant::now()) {
                    tracing::warn!(topic = %topic, partition, offset, reason = reason.as_str(), %error, not_logged_since_last = hidden, "bad record dropped (no on_error sink configured for this source; further drops are counted, logged at most every 5s)");
                }
            }
        }
    }

    /// The broker no longer has the offset we asked for: find which partitions, report the gap.
    fn handle_out_of_range(&mut self, consumer: &BaseConsumer) -> Result<(), ShardError> {
        let mut reassign = false;
        for pi in 0..self.parts.len() {
            let part = &self.parts[pi];
            let src = &self.ctx.config.sources[part.source];
            let Some(next) = part.next_offset else { continue };
            let (offset, skipped) = resolve_start(consumer, &src.topic, part.partition, Some(next), src.starting_offsets, src.on_gap)?;
            if let Some((from, to)) = skipped {
                debug_assert_eq!(src.on_gap, GapPolicy::Skip);
                record_skipped_gap(&self.ctx.stats.shards[self.ctx.id], &src.topic, part.partition, from, to);
                self.parts[pi].next_offset = known_offset(offset).or(self.parts[pi].next_offset);
                reassign = true;
            }
        }
        if reassign {
            let list: Vec<_> = self
                .parts
                .iter()
                .map(|p| {
                    (
                        p.topic.to_string(),
                        p.partition,
                        p.next_offset.map_or(rdkafka::Offset::Beginning, rdkafka::Offset::Offset),
                    )
                })
                .collect();
            let tpl = assignment_list(&list).map_err(|source| SourceError::Client {
                bootstrap: self.ctx.bootstrap.clone(),
                source,
            })?;
            consumer.assign(&tpl).map_err(|source| SourceError::Client {
                bootstrap: self.ctx.bootstrap.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// All barriers are in: close windows, report the epoch. Returns true after the last epoch.
    async fn complete_epoch(&mut self) -> Result<bool, ShardError> {
        let a = self.aligning.take().expect("called while aligning");
        let prev_watermark = self.watermark;
        self.watermark = advance(self.watermark, combine_min(a.watermarks.iter().copied()));
        let mut closed: Vec<Vec<OutputRow>> = Vec::with_capacity(self.ops.len());
        for op in &mut self.ops {
            let mut rows = Vec::new();
            op.finish_epoch(prev_watermark, self.watermark, &mut rows);
            closed.push(rows);
        }
        for (qi, rows) in closed.into_iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let sink = self.ctx.query_sink[qi];
            match &mut self.outputs[sink] {
                Some(existing) => existing.append(SinkRows::Windows(rows)),
                slot => *slot = Some(SinkRows::Windows(rows)),
            }
        }
        let report = EpochReport {
            shard: self.ctx.id,
            epoch: a.epoch,
            watermark: self.watermark,
            changes: self.ops.iter_mut().map(WindowOperator::take_changes).collect(),
            positions: self
                .parts
                .iter()
                .filter_map(|p| {
                    p.next_offset.map(|next_offset| PartitionPosition {
                        topic: p.topic.to_string(),
                        partition: p.partition,
                        next_offset,
                        max_event_time: p.clock.max_event_time,
                    })
                })
                .collect(),
            file_positions: self.file_positions(),
            outputs: std::mem::replace(&mut self.outputs, (0..self.ctx.sink_count).map(|_| None).collect()),
            last: a.last,
            latency: std::mem::replace(
                &mut self.latency,
                EpochLatency::new(Instant::now(), crate::time::now_micros(), self.ctx.config.pipeline.commit_interval),
            ),
        };
        self.publish_state_sizes();
        self.publish(Instant::now());
        self.ctx.reports.send_async(report).await.map_err(|_| ShardError::PeerGone(self.ctx.id))?;
        Ok(a.last)
    }
}
