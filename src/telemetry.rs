//! Counters, gauges and latency histograms. Each shard owns one [`ShardStats`] and is its only
//! writer: it counts in plain integers while it works ([`Tally`]) and publishes them with
//! relaxed stores every [`PUBLISH_EVERY`] and at each epoch's end, so recording costs
//! no lock and no shared atomic per event. Latency is recorded per shard and per epoch into
//! local `hdrhistogram`s ([`EpochLatency`]) that travel with the epoch's report; the committer
//! turns them into latencies once it knows when the epoch committed and merges them into the
//! shard's cumulative histograms, which the scrape merges across shards. Readers (the metrics
//! endpoint, the progress log, tests) sum the shards when they look.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::types::DeadLetterReason;
use crate::types::EventTime;
use crate::watermark::UNKNOWN;

/// How often a shard publishes its tallies, lag, watermarks, busy time and queue lengths.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(5);
/// Latencies are tracked from 1 µs to 30 days at 3 significant digits (0.1 % resolution).
const LATENCY_MAX_MICROS: u64 = 30 * 24 * 3_600_000_000;
const LATENCY_DIGITS: u8 = 3;

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_MICROS, LATENCY_DIGITS).expect("valid histogram bounds")
}

/// One source partition read by a shard (a file source counts as partition -1).
#[derive(Debug)]
pub struct PartitionStats {
    /// Index into `Config::sources`.
    pub source: usize,
    pub partition: i32,
    pub received: AtomicU64,
    pub decoded: AtomicU64,
    pub bytes: AtomicU64,
    /// By [`DeadLetterReason::ALL`] index.
    pub dead_letters: [AtomicU64; DeadLetterReason::ALL.len()],
    /// Messages the broker holds beyond our position; -1 while unknown (and for files).
    pub lag: AtomicI64,
    /// The partition's watermark; [`UNKNOWN`] before its first event.
    pub watermark: AtomicI64,
}

impl PartitionStats {
    pub fn new(source: usize, partition: i32) -> Self {
        PartitionStats {
            source,
            partition,
            received: AtomicU64::new(0),
            decoded: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            dead_letters: Default::default(),
            lag: AtomicI64::new(-1),
            watermark: AtomicI64::new(UNKNOWN),
        }
    }
}

/// Counts a shard keeps for one partition between publications: plain integers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally {
    pub received: u64,
    pub decoded: u64,
    pub bytes: u64,
    pub dead_letters: [u64; DeadLetterReason::ALL.len()],
}

impl Tally {
    /// Adds the tally to the partition's counters and resets it.
    pub fn publish(&mut self, to: &PartitionStats) {
        ShardStats::add(&to.received, self.received);
        ShardStats::add(&to.decoded, self.decoded);
        ShardStats::add(&to.bytes, self.bytes);
        for (i, n) in self.dead_letters.iter().enumerate() {
            ShardStats::add(&to.dead_letters[i], *n);
        }
        *self = Tally::default();
    }
}

/// A shard's counters. Totals (events, bytes, dead letters, keys) are not kept twice: they
/// are sums over `partitions` and the per-query gauges, taken when read.
#[derive(Debug, Default)]
pub struct ShardStats {
    pub dead_letters_dropped: AtomicU64,
    pub gaps_skipped: AtomicU64,
    pub offsets_skipped: AtomicU64,
    /// Times this shard stopped reading its sources because a peer's channel was full.
    pub backpressure_pauses: AtomicU64,
    /// The last epoch in which this shard read its share of `max_epoch_bytes` and paused its
    /// sources until the barrier (0: none yet).
    pub read_epoch_share: AtomicU64,
    /// The partitions this shard reads: set when it opens them, replaced (keeping the old
    /// entries) when it starts reading partitions added to a topic. Locked only then and when
    /// read: the shard publishes through its own handles.
    partitions: Mutex<Vec<Arc<PartitionStats>>>,
    /// The file sources this shard reads, set when it opens them.
    files: Mutex<Vec<Arc<FileSourceStats>>>,
    /// Per query: events that arrived after their window closed (dead-lettered as `late`).
    pub late_by_query: Box<[AtomicU64]>,
    /// Per query: change events not applied because their key already had a change at their
    /// source position or later (duplicates, out-of-order replays; apply queries only).
    pub changes_skipped_by_query: Box<[AtomicU64]>,
    /// Per query, as of the shard's last epoch.
    pub open_windows_by_query: Box<[AtomicU64]>,
    pub state_keys_by_query: Box<[AtomicU64]>,
    /// Microseconds the shard spent working (not waiting for input).
    pub busy_micros: AtomicU64,
    /// Share of the last second the shard spent working, in millionths.
    pub busy_ratio_ppm: AtomicU64,
    /// Per destination shard: exchange batches queued (in the channel and held back locally).
    pub exchange_queued: Box<[AtomicU64]>,
}

impl ShardStats {
    pub fn new(shards: usize, queries: usize) -> Self {
        let zeros = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect();
        ShardStats {
            late_by_query: zeros(queries),
            changes_skipped_by_query: zeros(queries),
            open_windows_by_query: zeros(queries),
            state_keys_by_query: zeros(queries),
            exchange_queued: zeros(shards),
            ..ShardStats::default()
        }
    }

    /// Single-writer add: a relaxed load and store, no read-modify-write.
    pub fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.store(counter.load(Relaxed) + n, Relaxed);
        }
    }

    /// The partitions this shard reads (handles to their counters).
    pub fn partitions(&self) -> Vec<Arc<PartitionStats>> {
        self.partitions.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the list of partitions this shard reads.
    pub fn set_partitions(&self, partitions: Vec<Arc<PartitionStats>>) {
        *self.partitions.lock().unwrap_or_else(|e| e.into_inner()) = partitions;
    }

    /// The file sources this shard reads.
    pub fn files(&self) -> Vec<Arc<FileSourceStats>> {
        self.files.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_files(&self, files: Vec<Arc<FileSourceStats>>) {
        *self.files.lock().unwrap_or_else(|e| e.into_inner()) = files;
    }
}

/// Where a file source stands, published by the shard reading it after each poll.
#[derive(Debug)]
pub struct FileSourceStats {
    /// Index into `Config::sources`.
    pub source: usize,
    /// Files read to the end (as recorded in the source's position).
    pub files_done: AtomicU64,
    /// Files listed and waiting to be read (the one being read not counted).
    pub files_queued: AtomicU64,
    /// Failed reads of the directory or of a file (each retried after a backoff).
    pub read_errors: AtomicU64,
    /// The file being read and the byte offset of its next unread line (in the decompressed
    /// stream for gzip); `None` between files. Locked when it changes and when scraped.
    pub current: Mutex<Option<(String, u64)>>,
}

impl FileSourceStats {
    pub fn new(source: usize) -> Self {
        FileSourceStats {
            source,
            files_done: AtomicU64::new(0),
            files_queued: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
            current: Mutex::new(None),
        }
    }

    /// Publishes the reader's standing (called by the reading shard after each poll).
    pub fn publish(&self, done: u64, queued: u64, current: Option<(&str, u64)>) {
        self.files_done.store(done, Relaxed);
        self.files_queued.store(queued, Relaxed);
        let mut slot = self.current.lock().unwrap_or_else(|e| e.into_inner());
        match (slot.as_mut(), current) {
            (Some((file, offset)), Some((now_file, now_offset))) if file == now_file => *offset = now_offset,
            (_, now) => *slot = now.map(|(f, o)| (f.to_string(), o)),
        }
    }
}

pub fn reason_index(r: DeadLetterReason) -> usize {
    DeadLetterReason::ALL.iter().position(|x| *x == r).unwrap()
}

/// What the committer counts per sink.
#[derive(Debug, Default)]
pub struct SinkStats {
    pub rows_written: AtomicU64,
    /// Delta commits made (replays skipped as already committed are not counted).
    pub commits: AtomicU64,
    /// Epoch write attempts after the first (transient failures retried).
    pub retries: AtomicU64,
    /// Failed attempts whose cause was a commit conflict with another writer.
    pub conflicts: AtomicU64,
    /// Keys in the sink's upsert index (a gauge): in a view, those of windows still open.
    pub indexed_keys: AtomicU64,
}

/// Cumulative latencies of the epochs one shard contributed to, in microseconds.
#[derive(Debug, Clone)]
pub struct LatencyHistograms {
    /// From the poll round that received an event to the commit of its epoch.
    pub ingest_to_commit: Histogram<u64>,
    /// From an event's event time to the commit of its epoch.
    pub event_time_to_commit: Histogram<u64>,
}

impl Default for LatencyHistograms {
    fn default() -> Self {
        LatencyHistograms {
            ingest_to_commit: latency_histogram(),
            event_time_to_commit: latency_histogram(),
        }
    }
}

impl LatencyHistograms {
    pub fn merge(&mut self, other: &LatencyHistograms) {
        // Same bounds on both sides: adding cannot fail.
        let _ = self.ingest_to_commit.add(&other.ingest_to_commit);
        let _ = self.event_time_to_commit.add(&other.event_time_to_commit);
    }
}

/// One shard's latency samples for one epoch, relative to references fixed when the epoch
/// began; [`EpochLatency::settle`] turns them into latencies once the epoch has committed.
///
/// Ingest is recorded as the time since the epoch began (exact: the commit comes later).
/// Event time is recorded as the distance to a *horizon* past the epoch's expected end
/// (start + 2 × commit interval + 1 s), so live events give small, precisely kept values;
/// an event stamped after the horizon counts as stamped at it.
#[derive(Debug)]
pub struct EpochLatency {
    started: Instant,
    horizon_wall_micros: i64,
    ingest: Histogram<u64>,
    event_time: Histogram<u64>,
}

impl EpochLatency {
    pub fn new(started: Instant, started_wall_micros: i64, commit_interval: Duration) -> Self {
        let horizon = 2 * commit_interval.as_micros() as i64 + 1_000_000;
        EpochLatency {
            started,
            horizon_wall_micros: started_wall_micros + horizon,
            ingest: latency_histogram(),
            event_time: latency_histogram(),
        }
    }

    /// `n` events received in a poll round at `at`.
    pub fn record_ingest(&mut self, at: Instant, n: u64) {
        if n > 0 {
            let v = at.saturating_duration_since(self.started).as_micros() as u64;
            let _ = self.ingest.record_n(v.clamp(1, LATENCY_MAX_MICROS), n);
        }
    }

    /// One decoded event's event time (µs since the epoch).
    pub fn record_event_time(&mut self, t: EventTime) {
        let v = self.horizon_wall_micros.saturating_sub(t).max(1) as u64;
        let _ = self.event_time.record(v.min(LATENCY_MAX_MICROS));
    }

    pub fn is_empty(&self) -> bool {
        self.ingest.is_empty() && self.event_time.is_empty()
    }

    /// Adds this epoch's latencies to `into`, the epoch having committed at `committed`
    /// (`committed_wall_micros` on the wall clock).
    pub fn settle(&self, committed: Instant, committed_wall_micros: i64, into: &mut LatencyHistograms) {
        let since_start = committed.saturating_duration_since(self.started).as_micros() as i64;
        for v in self.ingest.iter_recorded() {
            let recorded = self.ingest.median_equivalent(v.value_iterated_to()) as i64;
            let latency = (since_start - recorded).clamp(1, LATENCY_MAX_MICROS as i64) as u64;
            let _ = into.ingest_to_commit.record_n(latency, v.count_at_value());
        }
        let past_horizon = committed_wall_micros - self.horizon_wall_micros;
        for v in self.event_time.iter_recorded() {
            let recorded = self.event_time.median_equivalent(v.value_iterated_to()) as i64;
            let latency = (past_horizon + recorded).clamp(1, LATENCY_MAX_MICROS as i64) as u64;
            let _ = into.event_time_to_commit.record_n(latency, v.count_at_value());
        }
    }
}

#[derive(Debug)]
pub struct PipelineStats {
    pub shards: Vec<ShardStats>,
    pub sinks: Vec<SinkStats>,
    pub committed_epoch: AtomicU64,
    pub watermark: AtomicI64,
    /// Per query: its watermark W_q of the last committed epoch.
    pub query_watermarks: Vec<AtomicI64>,
    /// Epochs committed by this process (not counting recovery).
    pub epochs_committed: AtomicU64,
    /// Microseconds per committed epoch. Written by the committer thread once per epoch and
    /// read by the scrape thread, so the lock is never contended on a hot path.
    pub commit_duration: Mutex<Histogram<u64>>,
    /// Per shard; written by the committer once per epoch, merged by the scrape.
    pub latency: Vec<Mutex<LatencyHistograms>>,
    /// Epoch reports waiting for the committer.
    pub commit_queue: AtomicU64,
    /// Set once recovery is done and the shards are consuming.
    pub ready: AtomicBool,
}

/// Totals across shards at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatsSnapshot {
    pub events_in: u64,
    pub bytes_in: u64,
    pub dead_letters: u64,
    pub dead_letters_by_reason: Vec<(DeadLetterReason, u64)>,
    pub gaps_skipped: u64,
    pub backpressure_pauses: u64,
    pub open_keys: u64,
    pub committed_epoch: u64,
    pub watermark: Option<i64>,
    pub rows_written: u64,
    pub delta_commits: u64,
    /// Per sink (plan order): keys in its upsert index.
    pub sink_indexed_keys: Vec<u64>,
}

impl PipelineStats {
    pub fn new(shards: usize, queries: usize, sinks: usize) -> Self {
        PipelineStats {
            shards: (0..shards).map(|_| ShardStats::new(shards, queries)).collect(),
            sinks: (0..sinks).map(|_| SinkStats::default()).collect(),
            committed_epoch: AtomicU64::new(0),
            watermark: AtomicI64::new(UNKNOWN),
            query_watermarks: (0..queries).map(|_| AtomicI64::new(UNKNOWN)).collect(),
            epochs_committed: AtomicU64::new(0),
            // 1µs to 1h at 3 significant digits.
            commit_duration: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")),
            latency: (0..shards).map(|_| Mutex::new(LatencyHistograms::default())).collect(),
            commit_queue: AtomicU64::new(0),
            ready: AtomicBool::new(false),
        }
    }

    /// Called by the committer once per committed epoch.
    pub fn record_epoch_commit(&self, took: Duration) {
        let micros = (took.as_micros() as u64).clamp(1, 3_600_000_000);
        if let Ok(mut h) = self.commit_duration.lock() {
            let _ = h.record(micros);
        }
        self.epochs_committed.fetch_add(1, Relaxed);
    }

    /// Called by the committer once an epoch has committed: turns each shard's samples into
    /// latencies and adds them to that shard's histograms.
    pub fn record_epoch_latency(&self, shard: usize, epoch: &EpochLatency, committed: Instant, committed_wall_micros: i64) {
        if epoch.is_empty() {
            return;
        }
        if let Some(Ok(mut h)) = self.latency.get(shard).map(|m| m.lock()) {
            epoch.settle(committed, committed_wall_micros, &mut h);
        }
    }

    /// All shards' latency histograms merged.
    pub fn latency(&self) -> LatencyHistograms {
        let mut all = LatencyHistograms::default();
        for h in &self.latency {
            all.merge(&h.lock().unwrap_or_else(|e| e.into_inner()));
        }
        all
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let sum = |f: &dyn Fn(&ShardStats) -> &AtomicU64| self.shards.iter().map(|s| f(s).load(Relaxed)).sum::<u64>();
        let partition_sum =
            |f: &dyn Fn(&PartitionStats) -> &AtomicU64| self.shards.iter().flat_map(|s| s.partitions()).map(|p| f(&p).load(Relaxed)).sum::<u64>();
        let by_reason: Vec<(DeadLetterReason, u64)> = DeadLetterReason::ALL
            .iter()
            .enumerate()
            .map(|(i, r)| (*r, partition_sum(&|p| &p.dead_letters[i])))
            .collect();
        let wm = self.watermark.load(Relaxed);
        StatsSnapshot {
            events_in: partition_sum(&|p| &p.received),
            bytes_in: partition_sum(&|p| &p.bytes),
            dead_letters: by_reason.iter().map(|(_, n)| n).sum(),
            dead_letters_by_reason: by_reason,
            gaps_skipped: sum(&|s| &s.gaps_skipped),
            backpressure_pauses: sum(&|s| &s.backpressure_pauses),
            open_keys: self.shards.iter().flat_map(|s| s.state_keys_by_query.iter()).map(|k| k.load(Relaxed)).sum(),
            committed_epoch: self.committed_epoch.load(Relaxed),
            watermark: (wm != UNKNOWN).then_some(wm),
            rows_written: self.sinks.iter().map(|s| s.rows_written.load(Relaxed)).sum(),
            delta_commits: self.sinks.iter().map(|s| s.commits.load(Relaxed)).sum(),
            sink_indexed_keys: self.sinks.iter().map(|s| s.indexed_keys.load(Relaxed)).collect(),
        }
    }
}

/// Linux reports CPU time in clock ticks of 1/100 s (USER_HZ on every mainstream architecture).
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// Memory and CPU of a process, from `/proc/<pid>/status` and `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ProcStats {
    pub rss_bytes: u64,
    /// VmHWM: the highest RSS so far.
    pub peak_rss_bytes: u64,
    /// User + system.
    pub cpu_seconds: f64,
}

impl ProcStats {
    /// `None` once the process is gone (or without `/proc`).
    pub fn read(pid: u32) -> Option<ProcStats> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        Self::parse(&status, &stat)
    }

    pub fn parse(status: &str, stat: &str) -> Option<ProcStats> {
        let kb = |field: &str| -> Option<u64> { status.lines().find_map(|l| l.strip_prefix(field))?.split_whitespace().next()?.parse().ok() };
        // After the command name (in parentheses, may hold spaces) come fields 3 (state)
        // onwards; utime and stime are fields 14 and 15.
        let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(ProcStats {
            rss_bytes: kb("VmRSS:")? * 1024,
            peak_rss_bytes: kb("VmHWM:")? * 1024,
            cpu_seconds: ticks as f64 / CLOCK_TICKS_PER_SECOND,
        })
    }
}

/// The default log filter when neither `RUST_LOG` nor `[log] level` sets one.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Directives added to every filter: the libraries' chatter stays out of `info`.
const LIBRARY_DIRECTIVES: &str = "deltalake=warn,deltalake_core=error,rdkafka=warn";

type FilterHandle = tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;
static FILTER: OnceLock<FilterHandle> = OnceLock::new();

fn filter_for(level: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    tracing_subscriber::EnvFilter::try_new(format!("{level},{LIBRARY_DIRECTIVES}")).map_err(|e| e.to_string())
}

/// Whether `level` is a valid log filter (`info`, `debug`, `warn,tidemark=debug`, ...).
pub fn check_log_level(level: &str) -> Result<(), String> {
    filter_for(level).map(|_| ())
}

/// Initializes `tracing`: level from `RUST_LOG`, else [`DEFAULT_LOG_LEVEL`] until a
/// pipeline's `[log] level` replaces it ([`apply_config_log_level`]); human-readable on
/// stderr, or JSON lines with `json`.
pub fn init_logging(json: bool) {
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| filter_for(DEFAULT_LOG_LEVEL).expect("the default filter parses"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    // Colours only on a terminal: a log redirected to a file or a collector stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = if json {
        registry.with(fmt.json()).try_init()
    } else {
        registry.with(fmt).try_init()
    };
    if installed.is_ok() {
        let _ = FILTER.set(handle);
    }
}

/// Applies a pipeline's `[log] level` unless `RUST_LOG` is set (the environment wins, so an
/// operator can turn up logging without editing the pipeline). Returns whether it applied.
pub fn apply_config_log_level(level: &str) -> bool {
    if std::env::var_os("RUST_LOG").is_some() {
        return false;
    }
    match (FILTER.get(), filter_for(level)) {
        (Some(handle), Ok(filter)) => handle.reload(filter).is_ok(),
        _ => false,
    }
}

/// Rate-limits a warning about bad input: the first one is logged, then at most one per
/// `every`, saying how many were not logged in between.
#[derive(Debug)]
pub struct WarnLimiter {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnLimiter {
    pub fn new(every: Duration) -> Self {
        WarnLimiter {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when a warning should be logged now, `n` being how many were suppressed
    /// since the last one; `None` when this one is to be suppressed (and counted).
    pub fn check(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|t| now.duration_since(t) < self.every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency_quantile(h: &Histogram<u64>, q: f64) -> u64 {
        h.value_at_quantile(q)
    }

    #[test]
    fn ingest_latency_is_commit_time_minus_receive_time() {
        let start = Instant::now();
        let mut e = EpochLatency::new(start, 1_000_000_000, Duration::from_secs(1));
        e.record_ingest(start + Duration::from_millis(100), 10);
        e.record_ingest(start + Duration::from_millis(900), 30);
        let mut into = LatencyHistograms::default();
        e.settle(start + Duration::from_millis(1_200), 1_001_200_000, &mut into);
        let h = &into.ingest_to_commit;
        assert_eq!(h.len(), 40);
        // 10 at 1100 ms, 30 at 300 ms (0.1 % resolution).
        assert!((latency_quantile(h, 0.5) as i64 - 300_000).abs() <= 300, "{}", latency_quantile(h, 0.5));
        assert!((h.max() as i64 - 1_100_000).abs() <= 1_100);
    }

    #[test]
    fn event_time_latency_is_commit_wall_time_minus_event_time() {
        let start = Instant::now();
        let start_wall = 1_700_000_000_000_000i64;
        let mut e = EpochLatency::new(start, start_wall, Duration::from_secs(1));
        // Event times: 2 s before the epoch began, at its start, 500 ms into it, and one
        // stamped an hour in the future (counted as stamped at the horizon, 3 s after start).
        for t in [start_wall - 2_000_000, start_wall, start_wall + 500_000, start_wall + 3_600_000_000] {
            e.record_event_time(t);
        }
        let committed_wall = start_wall + 1_250_000;
        let mut into = LatencyHistograms::default();
        e.settle(start + Duration::from_millis(1_250), committed_wall, &mut into);
        let mut got: Vec<u64> = into.event_time_to_commit.iter_recorded().map(|v| v.value_iterated_to()).collect();
        got.sort();
        let want = [1, 750_000, 1_250_000, 3_250_000];
        assert_eq!(got.len(), 4, "{got:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((*g as i64 - w as i64).abs() <= (w as i64 / 500).max(1), "got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn shards_merge_and_empty_epochs_cost_nothing() {
        let stats = PipelineStats::new(2, 1, 1);
        let start = Instant::now();
        let mut a = EpochLatency::new(start, 0, Duration::from_secs(1));
        a.record_ingest(start, 5);
        let b = EpochLatency::new(start, 0, Duration::from_secs(1));
        assert!(b.is_empty());
        stats.record_epoch_latency(0, &a, start + Duration::from_secs(1), 0);
        stats.record_epoch_latency(1, &b, start + Duration::from_secs(1), 0);
        stats.record_epoch_latency(1, &a, start + Duration::from_secs(2), 0);
        let all = stats.latency();
        assert_eq!(all.ingest_to_commit.len(), 10);
        assert!(all.ingest_to_commit.max() >= 1_999_000);
        assert!(all.ingest_to_commit.min() <= 1_001_000);
    }

    #[test]
    fn tallies_publish_to_the_partition_then_reset_and_the_snapshot_sums_partitions() {
        let stats = PipelineStats::new(2, 1, 1);
        stats.shards[0].set_partitions(vec![Arc::new(PartitionStats::new(0, 3))]);
        stats.shards[1].set_partitions(vec![Arc::new(PartitionStats::new(0, 4)), Arc::new(PartitionStats::new(1, -1))]);
        let part = stats.shards[0].partitions()[0].clone();
        let mut t = Tally {
            received: 4,
            decoded: 3,
            bytes: 100,
            dead_letters: [1, 0, 0, 0, 0, 0],
        };
        t.publish(&part);
        t.received += 2;
        t.publish(&part);
        assert_eq!(part.received.load(Relaxed), 6);
        assert_eq!(part.decoded.load(Relaxed), 3);
        assert_eq!(part.dead_letters[0].load(Relaxed), 1);
        assert_eq!(t.received, 0);

        t.received = 5;
        t.dead_letters[3] = 2;
        t.publish(&stats.shards[1].partitions()[1]);
        stats.shards[0].state_keys_by_query[0].store(7, Relaxed);
        stats.shards[1].state_keys_by_query[0].store(8, Relaxed);
        let s = stats.snapshot();
        assert_eq!((s.events_in, s.bytes_in, s.dead_letters, s.open_keys), (11, 100, 3, 15));
        assert_eq!(s.dead_letters_by_reason[3], (DeadLetterReason::Late, 2));
    }

    #[test]
    fn warnings_are_limited_and_count_what_they_hid() {
        let mut w = WarnLimiter::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(w.check(t0), Some(0));
        assert_eq!(w.check(t0 + Duration::from_secs(1)), None);
        assert_eq!(w.check(t0 + Duration::from_secs(2)), None);
        assert_eq!(w.check(t0 + Duration::from_secs(6)), Some(2));
        assert_eq!(w.check(t0 + Duration::from_secs(7)), None);
    }

    #[test]
    fn proc_files_parse() {
        let status = "Name:\ttidemark\nVmPeak:\t  9000 kB\nVmHWM:\t    4096 kB\nVmRSS:\t    2048 kB\n";
        let stat = "1234 (tide mark) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 100 1000 500";
        let p = ProcStats::parse(status, stat).unwrap();
        assert_eq!((p.rss_bytes, p.peak_rss_bytes, p.cpu_seconds), (2048 * 1024, 4096 * 1024, 3.0));
        let me = ProcStats::read(std::process::id()).unwrap();
        assert!(me.rss_bytes > 0 && me.peak_rss_bytes >= me.rss_bytes);
    }

    #[test]
    fn log_levels_are_checked() {
        assert!(check_log_level("debug").is_ok());
        assert!(check_log_level("warn,tidemark=debug").is_ok());
        assert!(check_log_level("info,tidemark=loudest").is_err());
    }
}
