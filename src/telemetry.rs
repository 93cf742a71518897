//! Counters and progress. Each shard owns one [`ShardStats`] and is its only writer: it adds
//! per poll round (not per event) with relaxed stores, so recording costs no lock and no
//! contended atomic; readers (progress log, tests) sum the shards when they look.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::decode::DeadLetterReason;
use crate::watermark::UNKNOWN;

#[derive(Debug, Default)]
pub struct ShardStats {
    pub events_in: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Per source (index into `Config::sources`): events and bytes read by this shard.
    pub events_by_source: Box<[AtomicU64]>,
    pub bytes_by_source: Box<[AtomicU64]>,
    pub dead_letters: [AtomicU64; 5],
    pub dead_letters_dropped: AtomicU64,
    pub gaps_skipped: AtomicU64,
    pub offsets_skipped: AtomicU64,
    /// Times this shard stopped reading its sources because a peer's channel was full.
    pub backpressure_pauses: AtomicU64,
    pub open_windows: AtomicU64,
    pub open_keys: AtomicU64,
}

impl ShardStats {
    pub fn new(sources: usize) -> Self {
        ShardStats {
            events_by_source: (0..sources).map(|_| AtomicU64::new(0)).collect(),
            bytes_by_source: (0..sources).map(|_| AtomicU64::new(0)).collect(),
            ..ShardStats::default()
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.store(counter.load(Relaxed) + n, Relaxed);
        }
    }
}

pub fn reason_index(r: DeadLetterReason) -> usize {
    DeadLetterReason::ALL.iter().position(|x| *x == r).unwrap()
}

#[derive(Debug)]
pub struct PipelineStats {
    pub shards: Vec<ShardStats>,
    pub committed_epoch: AtomicU64,
    pub watermark: AtomicI64,
    pub rows_written: AtomicU64,
    pub delta_commits: AtomicU64,
    /// Epochs committed by this process (not counting recovery).
    pub epochs_committed: AtomicU64,
    /// Microseconds per committed epoch. Written by the committer thread once per epoch and
    /// read by the scrape thread, so the lock is never contended on a hot path.
    pub commit_duration: Mutex<Histogram<u64>>,
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
}

impl PipelineStats {
    pub fn new(shards: usize, sources: usize) -> Self {
        PipelineStats {
            shards: (0..shards).map(|_| ShardStats::new(sources)).collect(),
            committed_epoch: AtomicU64::new(0),
            watermark: AtomicI64::new(UNKNOWN),
            rows_written: AtomicU64::new(0),
            delta_commits: AtomicU64::new(0),
            epochs_committed: AtomicU64::new(0),
            // 1µs to 1h at 3 significant digits.
            commit_duration: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")),
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

    pub fn snapshot(&self) -> StatsSnapshot {
        let sum = |f: &dyn Fn(&ShardStats) -> &AtomicU64| self.shards.iter().map(|s| f(s).load(Relaxed)).sum::<u64>();
        let by_reason: Vec<(DeadLetterReason, u64)> = DeadLetterReason::ALL
            .iter()
            .enumerate()
            .map(|(i, r)| (*r, self.shards.iter().map(|s| s.dead_letters[i].load(Relaxed)).sum()))
            .collect();
        let wm = self.watermark.load(Relaxed);
        StatsSnapshot {
            events_in: sum(&|s| &s.events_in),
            bytes_in: sum(&|s| &s.bytes_in),
            dead_letters: by_reason.iter().map(|(_, n)| n).sum(),
            dead_letters_by_reason: by_reason,
            gaps_skipped: sum(&|s| &s.gaps_skipped),
            backpressure_pauses: sum(&|s| &s.backpressure_pauses),
            open_keys: sum(&|s| &s.open_keys),
            committed_epoch: self.committed_epoch.load(Relaxed),
            watermark: (wm != UNKNOWN).then_some(wm),
            rows_written: self.rows_written.load(Relaxed),
            delta_commits: self.delta_commits.load(Relaxed),
        }
    }
}

/// Initializes `tracing`: level from `RUST_LOG` (default info), human-readable or JSON.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,deltalake=warn,deltalake_core=error,rdkafka=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
