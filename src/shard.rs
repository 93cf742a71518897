//! One core's event loop. A shard owns its sources (Kafka partitions, file sources, or an
//! in-memory source in tests, all read through [`ShardSource`]), one [`SourceDecoder`] per
//! source, and the operators of every query for the key groups it owns. Each decoded record
//! follows the plan's routes to (operator, input port), on this shard or on the one owning
//! its key's group.
//!
//! The loop never blocks on a peer: it drains inbound channels, sends outbound batches with
//! `try_send` (a full channel pauses reading the sources — backpressure — and never drops
//! data), polls its sources without waiting, and acts on epoch barriers from the coordinator.
//!
//! Epoch protocol (aligned barriers; DESIGN.md §1, refined): on `Barrier(n)` a shard stops
//! reading sources, sends `Barrier(n, its watermark per source)` after all rows it sent in
//! epoch n, and keeps applying inbound rows until every peer's barrier arrived. Then every
//! shard knows the same shard watermarks, computes the same watermark per source and from them
//! the same watermark per query, W_q(n) (the min over the sources the query reads: a join's is
//! the min of its two inputs'), closes windows up to it, and hands its epoch report to the
//! committer.
//!
//! Lateness is decided at the source, against the record's own partition watermark as of the
//! records before it in that partition (the partition's max event time − delay): the same
//! input gives the same dead letters however fast it is read, however epochs are cut and
//! wherever a crash falls. That watermark is never below W_q(n−1), which closed windows,
//! because W_q is a min over partitions — except for a partition that was idle (left out of
//! the min) and has woken up behind it. So a record is also late when W_q(n−1) says it is;
//! only a woken idle partition can meet that case. Either way a record is counted in its
//! windows or dead-lettered with its raw payload — never both, never neither.

use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flume::{Receiver, Sender, TryRecvError, TrySendError};

use crate::config::Config;
use crate::decode::{ChangeOp, SourceDecoder};
use crate::expr::{Row, Val};
use crate::operator::{Late, Operator};
use crate::plan::{Plan, RouteAction};
use crate::sink::{DeadLetter, SinkRows};
use crate::source::{ShardSource, SourceContext, SourceError, SourcePositions, SourceSpec};
use crate::state::{Recovered, StateError, StateStore, TableWrites};
use crate::telemetry::{reason_index, EpochLatency, PartitionStats, ShardStats, Tally, WarnLimiter, PUBLISH_EVERY};
use crate::time::format_micros;
use crate::types::{DeadLetterReason, EventTime, KeyGroups};
use crate::watermark::{advance, combine_min, PartitionClock, IDLE, UNKNOWN};
use crate::window::{InSlot, InputKind, OutputRow};

/// Messages polled per round before other duties get a turn.
const POLL_ROUND: usize = 4096;
/// Exchange batches queued locally per peer (beyond the channel) before sources pause.
const MAX_LOCAL_QUEUE: usize = 2;

/// Data-plane message between shards. Rows and barriers share one FIFO per shard pair, so a
/// barrier (and the watermark it carries) never overtakes rows sent before it.
#[derive(Debug)]
pub enum ShardMsg {
    Rows(ExchangeBatch),
    /// `watermarks`: the sender's watermark per source (see [`Shard::source_watermarks`]).
    Barrier {
        epoch: u64,
        watermarks: Vec<EventTime>,
    },
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
    /// The operator (query index) and its input port the record is for.
    operator: u16,
    port: u8,
    key_end: u32,
    inputs_end: u32,
    event_time: EventTime,
}

impl ExchangeBatch {
    /// Appends one projected record bound for a peer shard. `inputs` may reference `blob` with
    /// `InSlot::Bytes`; the ranges are rebased onto the batch's own byte buffer. Public so the
    /// micro-benchmarks (`benches/micro.rs`) can measure the exchange path; the shard loop is
    /// its only other caller.
    pub fn push(&mut self, operator: usize, port: usize, key: &[u8], event_time: EventTime, inputs: &[InSlot], blob: &[u8]) {
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
            operator: operator as u16,
            port: port as u8,
            key_end: self.keys.len() as u32,
            inputs_end: self.inputs.len() as u32,
            event_time,
        });
    }

    fn apply(&self, ops: &mut [Operator]) {
        let (mut k0, mut i0) = (0usize, 0usize);
        for r in &self.recs {
            let (k1, i1) = (r.key_end as usize, r.inputs_end as usize);
            ops[r.operator as usize].process(r.port as usize, r.event_time, &self.keys[k0..k1], &self.inputs[i0..i1], &self.blob);
            (k0, i0) = (k1, i1);
        }
    }
}

/// What one shard hands the committer at the end of an epoch.
#[derive(Debug)]
pub struct EpochReport {
    pub shard: usize,
    pub epoch: u64,
    /// The pipeline watermark W(epoch): the min over every source (same on every shard).
    pub watermark: EventTime,
    /// Per query: the watermark W_q(epoch) it closed windows with (same on every shard).
    pub query_watermarks: Vec<EventTime>,
    /// (state table, writes) of this epoch, for the tables of this shard's operators.
    pub writes: Vec<(usize, TableWrites)>,
    /// Where this shard's sources stand.
    pub positions: SourcePositions,
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
    /// The compiled pipeline: routes, output shapes, sinks, state tables.
    pub plan: Arc<Plan>,
    /// How keys map to shards (fixed by the store).
    pub key_groups: KeyGroups,
    pub recovered: Arc<Recovered>,
    /// What this shard reads: its Kafka partitions, file sources, in-memory sources.
    pub sources: Vec<SourceSpec>,
    /// (peer id, receiver) for every other shard.
    pub inbound: Vec<(usize, Receiver<ShardMsg>)>,
    /// Sender per destination shard; `None` at this shard's own index.
    pub outbound: Vec<Option<Sender<ShardMsg>>>,
    pub control: Receiver<Control>,
    pub reports: Sender<EpochReport>,
    pub stats: Arc<crate::telemetry::PipelineStats>,
    pub abort: Arc<std::sync::atomic::AtomicBool>,
}

/// One input the shard reads (a Kafka partition, a file source, an in-memory partition),
/// with its watermark clock and its counters.
struct Input {
    source: usize,
    partition: i32,
    /// The topic or source name dead letters carry.
    label: Rc<str>,
    clock: PartitionClock,
    /// Read through a repartition topic: its clock follows what the repartitioner carries,
    /// and it is idle when the repartitioner last said so.
    carried: bool,
    upstream_idle: bool,
    tally: Tally,
    /// Its published counters.
    stats: Arc<PartitionStats>,
}

impl Input {
    fn new(config: &Config, info: crate::source::InputInfo, now: Instant) -> Input {
        let w = &config.sources[info.source].watermark;
        Input {
            source: info.source,
            partition: info.partition,
            label: info.label,
            clock: PartitionClock::new(w.delay, w.idle_timeout, info.restored_max_event_time, now),
            carried: info.carried,
            upstream_idle: false,
            tally: Tally::default(),
            stats: Arc::new(PartitionStats::new(info.source, info.partition)),
        }
    }
}

struct Alignment {
    epoch: u64,
    last: bool,
    seen: Vec<bool>,
    /// Per source: the min over the shards heard from of their watermark for it.
    watermarks: Vec<EventTime>,
}

struct Shard {
    ctx: ShardContext,
    sources: Vec<ShardSource>,
    /// Per source: the index in `inputs` of its first input.
    first_input: Vec<usize>,
    inputs: Vec<Input>,
    decoders: Vec<SourceDecoder>,
    ops: Vec<Operator>,
    building: Vec<ExchangeBatch>,
    queues: Vec<std::collections::VecDeque<ShardMsg>>,
    outputs: Vec<Option<SinkRows>>,
    /// The pipeline watermark (min over all sources), for the report and the metrics.
    watermark: EventTime,
    /// Per query: its watermark W_q of the last epoch, and the sources it reads.
    query_watermarks: Vec<EventTime>,
    query_sources: Vec<Vec<usize>>,
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
    /// The wall clock (µs) as of this poll round: event times too far ahead of it are refused.
    wall_clock: EventTime,
    /// Bytes read by the sources since the last barrier.
    epoch_bytes: u64,
    /// The epoch being read (one past the last barrier), for telling the coordinator this
    /// shard has read its share of it.
    open_epoch: u64,
    latency: EpochLatency,
    /// Time spent working, total; and the (instant, total) the current busy-ratio window began.
    busy: Duration,
    busy_window: (Instant, Duration),
    last_publish: Instant,
}

/// How often a warning about bad input (or dropped dead letters) may be logged per shard.
const BAD_INPUT_WARN_EVERY: Duration = Duration::from_secs(5);
/// The window the busy ratio is computed over.
const BUSY_RATIO_WINDOW: Duration = Duration::from_secs(1);

/// Runs one shard to completion (graceful stop) or error. Called on the shard's glommio executor.
pub async fn run_shard(ctx: ShardContext) -> Result<(), ShardError> {
    let mut shard = Shard::open(ctx)?;
    shard.publish_state_sizes();
    shard.run().await
}

impl Shard {
    fn open(mut ctx: ShardContext) -> Result<Shard, ShardError> {
        let cfg = ctx.config.clone();
        let now = Instant::now();
        let plan = ctx.plan.clone();
        let mut ops: Vec<Operator> = cfg
            .queries
            .iter()
            .zip(&plan.shapes)
            .zip(&plan.operators)
            .map(|((q, shape), spec)| Operator::new(q, spec, shape.clone()))
            .collect();
        let (id, shards, groups) = (ctx.id, ctx.shards, ctx.key_groups);
        for (qi, op) in ops.iter_mut().enumerate() {
            for (t, &table) in plan.layout.tables[qi].iter().enumerate() {
                ctx.store.scan(table, |k, v| {
                    op.restore(t, k, v, |group_key| groups.shard_for_key(group_key, shards) == id).map(|_| ())
                })?;
            }
            let name = &cfg.queries[qi].name;
            op.resume_at(ctx.recovered.query_watermark(name), ctx.recovered.query_lateness_us.get(name).copied());
        }
        let mut query_sources = vec![Vec::new(); cfg.queries.len()];
        for (source, routes) in plan.routes.iter().enumerate() {
            for route in routes {
                if !query_sources[route.operator].contains(&source) {
                    query_sources[route.operator].push(source);
                }
            }
        }
        let decoders: Vec<SourceDecoder> = cfg.sources.iter().map(SourceDecoder::new).collect();
        let source_cx = SourceContext {
            config: &cfg,
            bootstrap: &ctx.bootstrap,
            recovered: &ctx.recovered,
            stats: &ctx.stats,
            shard: ctx.id,
            shards: ctx.shards,
        };
        let mut sources = Vec::new();
        let mut first_input = Vec::new();
        let mut inputs = Vec::new();
        for spec in std::mem::take(&mut ctx.sources) {
            let source = ShardSource::open(spec, &source_cx)?;
            first_input.push(inputs.len());
            inputs.extend(source.inputs().into_iter().map(|info| Input::new(&cfg, info, now)));
            sources.push(source);
        }
        ctx.stats.shards[ctx.id].set_partitions(inputs.iter().map(|i| i.stats.clone()).collect());
        tracing::info!(shard = ctx.id, inputs = inputs.len(), sources = sources.len(), "shard started");
        let n = ctx.shards;
        Ok(Shard {
            sources,
            first_input,
            inputs,
            decoders,
            ops,
            building: (0..n).map(|_| ExchangeBatch::default()).collect(),
            queues: (0..n).map(|_| Default::default()).collect(),
            outputs: (0..plan.sinks.len()).map(|_| None).collect(),
            watermark: ctx.recovered.watermark.unwrap_or(UNKNOWN),
            query_watermarks: cfg.queries.iter().map(|q| ctx.recovered.query_watermark(&q.name).unwrap_or(UNKNOWN)).collect(),
            query_sources,
            aligning: None,
            blocked_since: None,
            key_buf: Vec::with_capacity(256),
            input_buf: Vec::with_capacity(16),
            blob_buf: Vec::with_capacity(256),
            dropped_warnings: WarnLimiter::new(BAD_INPUT_WARN_EVERY),
            bad_input_warnings: WarnLimiter::new(BAD_INPUT_WARN_EVERY),
            late_tally: vec![0; cfg.queries.len()],
            wall_clock: crate::time::now_micros(),
            epoch_bytes: 0,
            open_epoch: ctx.recovered.epoch + 1,
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
                let epoch_full = self.epoch_bytes >= self.ctx.config.pipeline.max_epoch_bytes / self.ctx.shards as u64;
                if epoch_full {
                    // This shard's share of the epoch is read: wait for the barrier, and say so
                    // (the others may have less left to read than their share).
                    let read_share = &self.ctx.stats.shards[self.ctx.id].read_epoch_share;
                    if read_share.load(Relaxed) != self.open_epoch {
                        read_share.store(self.open_epoch, Relaxed);
                    }
                } else if backlogged {
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
    /// Publishes what the shard counted since the last time (see [`crate::telemetry`]), the
    /// inputs' lag and watermarks, the busy ratio and the exchange queue lengths.
    fn publish(&mut self, now: Instant) {
        self.last_publish = now;
        let stats = &self.ctx.stats.shards[self.ctx.id];
        for input in &mut self.inputs {
            input.tally.publish(&input.stats);
            input.stats.watermark.store(input.clock.own_watermark(), Relaxed);
        }
        for (source, &first) in self.sources.iter().zip(&self.first_input) {
            for local in 0..source.input_count() {
                self.inputs[first + local].stats.lag.store(source.lag(local), Relaxed);
            }
        }
        for (q, n) in self.late_tally.iter_mut().enumerate() {
            ShardStats::add(&stats.late_by_query[q], std::mem::take(n));
        }
        for (q, op) in self.ops.iter_mut().enumerate() {
            ShardStats::add(&stats.changes_skipped_by_query[q], op.take_skipped_changes());
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
            self.inputs.iter_mut().for_each(|i| i.clock.excuse(blocked));
        }
    }

    /// Per source: the min over this shard's non-idle inputs of it ([`IDLE`] for none). An
    /// input is idle only when quiet for its idle timeout *and* caught up with reads working.
    fn source_watermarks(&self) -> Vec<EventTime> {
        let now = Instant::now();
        let mut wms = vec![IDLE; self.ctx.config.sources.len()];
        for (source, &first) in self.sources.iter().zip(&self.first_input) {
            for local in 0..source.input_count() {
                let input = &self.inputs[first + local];
                let wm = match (input.carried, input.upstream_idle) {
                    (false, _) => input.clock.watermark(now, source.progress(local, now)),
                    (true, true) => IDLE,
                    (true, false) => input.clock.own_watermark(),
                };
                wms[input.source] = wms[input.source].min(wm);
            }
        }
        wms
    }

    /// Takes on the inputs the sources added (partitions added to a topic): each gets a
    /// watermark clock that holds its source back until its first event (or until it is
    /// idle: quiet and caught up), and counters of its own.
    fn discover_inputs(&mut self) -> Result<(), ShardError> {
        let now = Instant::now();
        let mut changed = false;
        for si in 0..self.sources.len() {
            let added = self.sources[si].discover()?;
            if added == 0 {
                continue;
            }
            let count = self.sources[si].input_count();
            let infos = self.sources[si].inputs();
            let at = self.first_input[si] + count - added;
            let new: Vec<Input> = infos[count - added..]
                .iter()
                .map(|info| Input::new(&self.ctx.config, info.clone(), now))
                .collect();
            self.inputs.splice(at..at, new);
            for first in &mut self.first_input[si + 1..] {
                *first += added;
            }
            changed = true;
        }
        if changed {
            self.ctx.stats.shards[self.ctx.id].set_partitions(self.inputs.iter().map(|i| i.stats.clone()).collect());
        }
        Ok(())
    }

    fn start_barrier(&mut self, epoch: u64, last: bool) {
        self.epoch_bytes = 0;
        self.open_epoch = epoch + 1;
        let watermarks = self.source_watermarks();
        for dest in 0..self.ctx.shards {
            if dest != self.ctx.id {
                self.seal_batch(dest);
                self.queues[dest].push_back(ShardMsg::Barrier {
                    epoch,
                    watermarks: watermarks.clone(),
                });
            }
        }
        let mut seen = vec![false; self.ctx.shards];
        seen[self.ctx.id] = true;
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
                    Ok(ShardMsg::Barrier { epoch, watermarks }) => {
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
                        for (mine, theirs) in a.watermarks.iter_mut().zip(watermarks) {
                            *mine = (*mine).min(theirs);
                        }
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
        self.discover_inputs()?;
        let now = Instant::now();
        self.wall_clock = crate::time::now_micros();
        let mut sources = std::mem::take(&mut self.sources);
        let mut n = 0;
        let mut result = Ok(());
        for (si, source) in sources.iter_mut().enumerate() {
            let first = self.first_input[si];
            let mut received = 0u64;
            let polled = source.poll(POLL_ROUND, |rec| {
                let input = first + rec.input;
                if let Some(carried) = rec.carried {
                    let state = &mut self.inputs[input];
                    if let Some(max) = carried.max_before {
                        if state.clock.max_event_time.is_none_or(|m| max > m) {
                            state.clock.max_event_time = Some(max);
                        }
                    }
                    state.upstream_idle = carried.mark == Some(true);
                    if carried.mark.is_some() {
                        return; // a marker: no record
                    }
                }
                if rec.is_record {
                    let tally = &mut self.inputs[input].tally;
                    tally.received += 1;
                    tally.bytes += rec.bytes;
                    self.epoch_bytes += rec.bytes;
                    received += 1;
                }
                match rec.problem {
                    Some(message) => self.dead_letter_at(input, rec.file, rec.offset, rec.payload, DeadLetterReason::Decode, message),
                    None => self.process_at(input, rec.file, rec.offset, rec.payload, now),
                }
            });
            self.latency.record_ingest(now, received);
            match polled {
                Ok(k) => n += k,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.sources = sources;
        result?;
        for dest in 0..self.ctx.shards {
            if dest != self.ctx.id {
                self.seal_batch(dest);
            }
        }
        Ok(n > 0)
    }

    /// One record of input `input`; `file` names the file a file-source record came from
    /// (empty otherwise).
    fn process_at(&mut self, input: usize, file: &str, offset: i64, payload: &[u8], now: Instant) {
        let source = self.inputs[input].source;
        let decoder = &mut self.decoders[source];
        let t = match decoder.decode(payload) {
            Ok(t) => t,
            Err(e) => {
                self.dead_letter_at(input, file, offset, payload, e.reason, e.message);
                return;
            }
        };
        if let Some(max_future) = self.ctx.config.sources[source].watermark.max_future {
            let limit = self.wall_clock.saturating_add(i64::try_from(max_future.as_micros()).unwrap_or(i64::MAX));
            if t > limit {
                let message = format!(
                    "event time {} is more than {} ahead of the clock ({}): a producer's clock or timestamp is wrong; it would move the watermark past every real event (fix the producer, or raise watermark.max_future)",
                    format_micros(t),
                    crate::config::format_duration(max_future),
                    format_micros(self.wall_clock),
                );
                self.dead_letter_at(input, file, offset, payload, DeadLetterReason::EventTime, message);
                return;
            }
        }
        let input_state = &mut self.inputs[input];
        // Judged against the partition's watermark before this record (see the module doc).
        let partition_watermark = input_state.clock.own_watermark();
        input_state.clock.observe(t, now);
        input_state.tally.decoded += 1;
        self.latency.record_event_time(t);
        for r in 0..self.ctx.plan.routes[source].len() {
            let route = &self.ctx.plan.routes[source][r];
            let (q, port) = (route.operator, route.port);
            if let Some(filter) = &route.filter {
                if !filter.eval_predicate(&self.decoders[source].row(payload)) {
                    continue;
                }
            }
            let watermark = partition_watermark.max(self.query_watermarks[q]);
            if let Some(late) = self.ops[q].late(port, t, watermark) {
                let query = &self.ctx.config.queries[q];
                let missed = match late {
                    Late::Window(start, end) => format!(
                        "window [{}, {}) of query \"{}\" already closed (raise watermark.delay or allowed_lateness to accept later events)",
                        format_micros(start),
                        format_micros(end),
                        query.name
                    ),
                    Late::Behind => format!(
                        "query \"{}\" has already judged that time (raise watermark.delay to accept later events)",
                        query.name
                    ),
                };
                let msg = format!(
                    "event time {} is behind the watermark {} (allowed_lateness {}): {missed}",
                    format_micros(t),
                    format_micros(watermark),
                    crate::config::format_duration(query.allowed_lateness),
                );
                self.late_tally[q] += 1;
                self.dead_letter_at(input, file, offset, payload, DeadLetterReason::Late, msg);
                continue;
            }
            let decoder = &self.decoders[source];
            self.key_buf.clear();
            for &f in &route.key_fields {
                decoder.write_key_component(payload, f, &mut self.key_buf);
            }
            self.input_buf.clear();
            self.blob_buf.clear();
            match &route.action {
                RouteAction::Aggregate(inputs) => {
                    for input in inputs {
                        let row = decoder.row(payload);
                        if let Some(filter) = &input.filter {
                            if !filter.eval_predicate(&row) {
                                self.input_buf.push(InSlot::Skip);
                                continue;
                            }
                        }
                        let slot = match (&input.expr, input.kind, input.field) {
                            (_, InputKind::Row, _) => InSlot::Null,
                            (Some(expr), kind, _) => slot_of(expr.eval(&row), kind, &mut self.blob_buf),
                            (None, _, None) => InSlot::Null,
                            // The decoder dead-letters events missing a schema field, so it is present.
                            (None, InputKind::Presence, Some(_)) => InSlot::Int(1),
                            (None, InputKind::Number, Some(f)) => num_slot(decoder.num(f)),
                            (None, InputKind::Bytes, Some(f)) => {
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
                }
                RouteAction::Emit(select) => {
                    let label = &self.inputs[input].label;
                    let row = WithMetadata {
                        row: decoder.row(payload),
                        fields: self.ctx.config.sources[source].schema.len(),
                        topic: if file.is_empty() { label } else { file },
                        partition: i64::from(self.inputs[input].partition),
                        offset,
                    };
                    let values = select.iter().map(|e| e.eval(&row).into_value()).collect();
                    let sink = self.ctx.plan.query_sink[q];
                    rows_of(&mut self.outputs[sink]).push(OutputRow {
                        window_start: t,
                        window_end: t,
                        key: Vec::new(),
                        values,
                        retract: false,
                    });
                    continue;
                }
                RouteAction::Carry(fields) => {
                    for &f in fields {
                        decoder.write_key_component(payload, f, &mut self.blob_buf);
                    }
                    self.input_buf.push(InSlot::Bytes {
                        start: 0,
                        end: self.blob_buf.len() as u32,
                    });
                }
                RouteAction::Reading(f) => self.input_buf.push(num_slot(decoder.num(*f))),
                RouteAction::Apply(values) => {
                    let Some((op, position)) = decoder.change() else {
                        continue; // only change events reach an apply route (checked by the config)
                    };
                    if let Some(&null_key) = route.key_fields.iter().find(|&&f| decoder.is_null(f)) {
                        let name = &self.ctx.config.sources[source].schema[null_key].name;
                        let msg = format!(
                            "primary key field \"{name}\" is null or missing in the change's row (\"{}\"); a change must name the key it applies to",
                            if op == ChangeOp::Delete { "before" } else { "after" }
                        );
                        self.dead_letter_at(input, file, offset, payload, DeadLetterReason::Schema, msg);
                        continue;
                    }
                    self.blob_buf.extend_from_slice(position);
                    let position_end = self.blob_buf.len() as u32;
                    if op != ChangeOp::Delete {
                        for &f in values {
                            decoder.write_key_component(payload, f, &mut self.blob_buf);
                        }
                    }
                    self.input_buf.extend([
                        InSlot::Int(if op == ChangeOp::Delete { crate::apply::DELETE } else { crate::apply::UPSERT }),
                        InSlot::Bytes { start: 0, end: position_end },
                        InSlot::Bytes {
                            start: position_end,
                            end: self.blob_buf.len() as u32,
                        },
                    ]);
                }
            }
            let dest = self.ctx.key_groups.shard_for_key(&self.key_buf, self.ctx.shards);
            if dest == self.ctx.id {
                self.ops[q].process(port, t, &self.key_buf, &self.input_buf, &self.blob_buf);
            } else {
                let b = &mut self.building[dest];
                b.push(q, port, &self.key_buf, t, &self.input_buf, &self.blob_buf);
                if b.recs.len() >= self.ctx.config.pipeline.exchange_batch {
                    self.seal_batch(dest);
                }
            }
        }
    }

    /// A bad record. For file sources `topic` is the file name, `partition` is -1 and `offset`
    /// the byte offset of the line.
    fn dead_letter_at(&mut self, input: usize, file: &str, offset: i64, payload: &[u8], reason: DeadLetterReason, error: String) {
        let input = &mut self.inputs[input];
        let (source, partition) = (input.source, input.partition);
        let topic = if file.is_empty() { input.label.to_string() } else { file.to_string() };
        input.tally.dead_letters[reason_index(reason)] += 1;
        let stats = &self.ctx.stats.shards[self.ctx.id];
        match self.ctx.plan.source_dlq[source] {
            Some(sink) => {
                // A tombstone after a delete is what a change stream normally carries: counted,
                // kept in the dead-letter table, not warned about.
                let warn = reason != DeadLetterReason::Tombstone;
                if let Some(hidden) = warn.then(|| self.bad_input_warnings.check(Instant::now())).flatten() {
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

    /// All barriers are in: close windows, report the epoch. Returns true after the last epoch.
    async fn complete_epoch(&mut self) -> Result<bool, ShardError> {
        let a = self.aligning.take().expect("called while aligning");
        self.watermark = advance(self.watermark, combine_min(a.watermarks.iter().copied()));
        let mut closed: Vec<Vec<OutputRow>> = Vec::with_capacity(self.ops.len());
        for (q, op) in self.ops.iter_mut().enumerate() {
            let prev = self.query_watermarks[q];
            let now = advance(prev, combine_min(self.query_sources[q].iter().map(|&s| a.watermarks[s])));
            self.query_watermarks[q] = now;
            let mut rows = Vec::new();
            op.finish_epoch(prev, now, &mut rows);
            closed.push(rows);
        }
        for (qi, rows) in closed.into_iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let sink = self.ctx.plan.query_sink[qi];
            rows_of(&mut self.outputs[sink]).extend(rows);
        }
        let mut positions = SourcePositions::default();
        for (source, &first) in self.sources.iter().zip(&self.first_input) {
            source.positions(|i| self.inputs[first + i].clock.max_event_time, &mut positions);
        }
        let report = EpochReport {
            shard: self.ctx.id,
            epoch: a.epoch,
            watermark: self.watermark,
            query_watermarks: self.query_watermarks.clone(),
            writes: self
                .ops
                .iter_mut()
                .zip(&self.ctx.plan.layout.tables)
                .flat_map(|(op, tables)| tables.iter().copied().zip(op.take_writes()))
                .filter(|(_, w)| !w.is_empty())
                .collect(),
            positions,
            outputs: std::mem::replace(&mut self.outputs, (0..self.ctx.plan.sinks.len()).map(|_| None).collect()),
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

/// The rows of a query's sink in this epoch, created empty if none yet.
fn rows_of(slot: &mut Option<SinkRows>) -> &mut Vec<OutputRow> {
    let rows = slot.get_or_insert_with(|| SinkRows::Windows(Vec::new()));
    match rows {
        SinkRows::Windows(rows) => rows,
        SinkRows::DeadLetters(_) => unreachable!("a query's sink receives result rows (checked by plan_sinks)"),
    }
}

fn num_slot(n: crate::types::Num) -> InSlot {
    match n {
        crate::types::Num::Int(v) => InSlot::Int(v),
        crate::types::Num::Float(v) => InSlot::Float(v),
        crate::types::Num::Null => InSlot::Null,
    }
}

/// An aggregate's `expr` result as the input its function reads.
fn slot_of(v: Val<'_>, kind: InputKind, blob: &mut Vec<u8>) -> InSlot {
    match (kind, v) {
        (_, Val::Null) => InSlot::Null,
        (InputKind::Row | InputKind::Presence, _) => InSlot::Int(1),
        (InputKind::Number, Val::Int(i) | Val::Time(i)) => InSlot::Int(i),
        (InputKind::Number, Val::Float(f)) => InSlot::Float(f),
        (InputKind::Number, Val::Bool(b)) => InSlot::Int(i64::from(b)),
        (InputKind::Number, Val::Str(_)) => InSlot::Null,
        (InputKind::Bytes, v) => {
            let start = blob.len() as u32;
            crate::types::encode_key_value(blob, &v.into_value());
            InSlot::Bytes { start, end: blob.len() as u32 }
        }
    }
}

/// An event as a stateless query's `select` reads it: its schema fields, then where it was
/// read from (see [`crate::config::METADATA_COLUMNS`]).
struct WithMetadata<'a> {
    row: crate::decode::DecodedRow<'a>,
    fields: usize,
    topic: &'a str,
    partition: i64,
    offset: i64,
}

impl Row for WithMetadata<'_> {
    fn get(&self, column: usize) -> Val<'_> {
        match column.checked_sub(self.fields) {
            None => self.row.get(column),
            Some(0) => Val::Str(std::borrow::Cow::Borrowed(self.topic)),
            Some(1) => Val::Int(self.partition),
            Some(2) => Val::Int(self.offset),
            Some(_) => Val::Null,
        }
    }
}

#[cfg(test)]
mod tests;
