//! Counters and progress. Each shard owns one [`ShardStats`] and is its only writer: it adds
//! per poll round (not per event) with relaxed stores, so recording costs no lock and no
//! contended atomic; readers (progress log, tests) sum the shards when they look.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};

use crate::decode::DeadLetterReason;
use crate::watermark::UNKNOWN;

#[derive(Debug, Default)]
pub struct ShardStats {
    pub events_in: AtomicU64,
    pub bytes_in: AtomicU64,
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
    pub fn new(shards: usize) -> Self {
        PipelineStats {
            shards: (0..shards).map(|_| ShardStats::default()).collect(),
            committed_epoch: AtomicU64::new(0),
            watermark: AtomicI64::new(UNKNOWN),
            rows_written: AtomicU64::new(0),
            delta_commits: AtomicU64::new(0),
            ready: AtomicBool::new(false),
        }
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
