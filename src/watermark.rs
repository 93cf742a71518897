//! Watermarks: per source partition `max event time seen − delay`; a shard's watermark is the
//! min over its non-idle partitions; the pipeline's watermark is the min over all shards,
//! taken at each epoch barrier, and never goes backwards (it is persisted with the epoch).
//!
//! A partition is idle only when it has been quiet for `idle_timeout` *and* its source says it
//! is caught up ([`Progress::CaughtUp`]: nothing left to read, and reading works). A partition
//! with a backlog, one whose fetches fail (broker down), or one whose state is not known yet
//! keeps holding the watermark back however long it is quiet: skipping it would close windows
//! its unread records belong to.
//!
//! Encoding: a watermark is an [`EventTime`]. [`IDLE`] (`i64::MAX`) means "no constraint"
//! (idle partition, or a shard that owns no active partition), so a plain `min` ignores idle
//! inputs; [`UNKNOWN`] (`i64::MIN`) means "an active input has not seen an event yet", which
//! holds the minimum back until it has.

use std::time::{Duration, Instant};

use crate::types::EventTime;

pub const IDLE: EventTime = EventTime::MAX;
pub const UNKNOWN: EventTime = EventTime::MIN;

/// Min over inputs, ignoring idle ones; `IDLE` when every input is idle (or there are none).
pub fn combine_min(inputs: impl IntoIterator<Item = EventTime>) -> EventTime {
    inputs.into_iter().fold(IDLE, EventTime::min)
}

/// The next pipeline watermark: the combined input watermark, but never backwards and never
/// moved by an all-idle (or not yet started) input set.
pub fn advance(current: EventTime, combined: EventTime) -> EventTime {
    if combined == IDLE {
        current
    } else {
        current.max(combined)
    }
}

/// Where an input stands against the end of its log, as its source last knew it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Everything the log holds was read, and the last reads succeeded.
    CaughtUp,
    /// Records are waiting to be read.
    Behind,
    /// Reading fails (broker unreachable, fetch or I/O errors): what is left is unknown.
    Failing,
    /// Not known yet (before the first fetch, or no fresh report from the client).
    Unknown,
}

/// Event-time clock of one source partition.
#[derive(Debug, Clone)]
pub struct PartitionClock {
    pub max_event_time: Option<EventTime>,
    delay_us: i64,
    idle_timeout: Duration,
    last_event_at: Instant,
}

impl PartitionClock {
    pub fn new(delay: Duration, idle_timeout: Duration, restored_max: Option<EventTime>, now: Instant) -> Self {
        PartitionClock {
            max_event_time: restored_max,
            delay_us: delay.as_micros() as i64,
            idle_timeout,
            last_event_at: now,
        }
    }

    #[inline]
    pub fn observe(&mut self, event_time: EventTime, now: Instant) {
        self.last_event_at = now;
        if self.max_event_time.is_none_or(|m| event_time > m) {
            self.max_event_time = Some(event_time);
        }
    }

    /// Time the shard could not read (backpressure, barrier alignment) does not count as quiet.
    pub fn excuse(&mut self, blocked: Duration) {
        self.last_event_at += blocked;
    }

    /// Idle: quiet for `idle_timeout` and caught up. Only then may the watermark pass it by.
    pub fn is_idle(&self, now: Instant, progress: Progress) -> bool {
        progress == Progress::CaughtUp && now.saturating_duration_since(self.last_event_at) >= self.idle_timeout
    }

    /// The watermark this partition imposes: [`IDLE`] when idle, else its own.
    pub fn watermark(&self, now: Instant, progress: Progress) -> EventTime {
        if self.is_idle(now, progress) {
            return IDLE;
        }
        self.own_watermark()
    }

    /// The partition's watermark from its own events, idle or not ([`UNKNOWN`] before the
    /// first): what the metrics show per partition, and what its records are judged late by.
    pub fn own_watermark(&self) -> EventTime {
        match self.max_event_time {
            None => UNKNOWN,
            Some(m) => m.saturating_sub(self.delay_us),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Naive model: inputs are Option<wm> where None = idle.
    fn model_min(inputs: &[Option<i64>]) -> Option<i64> {
        inputs.iter().flatten().copied().min()
    }

    proptest! {
        #[test]
        fn combine_is_min_over_non_idle(inputs in proptest::collection::vec(proptest::option::of(-1_000_000i64..1_000_000), 0..8)) {
            let encoded = inputs.iter().map(|i| i.unwrap_or(IDLE));
            let got = combine_min(encoded);
            prop_assert_eq!(if got == IDLE { None } else { Some(got) }, model_min(&inputs));
        }

        #[test]
        fn pipeline_watermark_never_goes_backwards(rounds in proptest::collection::vec(proptest::collection::vec(proptest::option::of(-1000i64..1000), 1..4), 1..30)) {
            let mut wm = UNKNOWN;
            for inputs in rounds {
                let next = advance(wm, combine_min(inputs.iter().map(|i| i.unwrap_or(IDLE))));
                prop_assert!(next >= wm);
                if let Some(m) = model_min(&inputs) { prop_assert_eq!(next, wm.max(m)); } else { prop_assert_eq!(next, wm); }
                wm = next;
            }
        }

        #[test]
        fn partition_watermark_is_max_minus_delay(times in proptest::collection::vec(-1_000_000i64..1_000_000, 1..50), delay_ms in 0u64..10_000) {
            let now = Instant::now();
            let mut c = PartitionClock::new(Duration::from_millis(delay_ms), Duration::from_secs(3600), None, now);
            for t in &times { c.observe(*t, now); }
            prop_assert_eq!(c.watermark(now, Progress::CaughtUp), times.iter().max().unwrap() - delay_ms as i64 * 1000);
        }
    }

    #[test]
    fn unknown_blocks_and_idle_releases() {
        let t0 = Instant::now();
        let up = Progress::CaughtUp;
        let mut a = PartitionClock::new(Duration::ZERO, Duration::from_secs(1), None, t0);
        let mut b = PartitionClock::new(Duration::ZERO, Duration::from_secs(1), None, t0);
        a.observe(500, t0);
        assert_eq!(combine_min([a.watermark(t0, up), b.watermark(t0, up)]), UNKNOWN);
        assert_eq!(advance(100, combine_min([a.watermark(t0, up), b.watermark(t0, up)])), 100);
        // b stays quiet for the idle timeout: only a counts.
        let later = t0 + Duration::from_millis(1500);
        a.observe(900, later);
        assert_eq!(combine_min([a.watermark(later, up), b.watermark(later, up)]), 900);
        // Blocked time is excused: b is not idle if the shard could not read.
        b.excuse(Duration::from_secs(1));
        assert_eq!(b.watermark(later, up), UNKNOWN);
        // Restored max survives a restart.
        let r = PartitionClock::new(Duration::from_millis(1), Duration::from_secs(9), Some(10_000), t0);
        assert_eq!(r.watermark(t0, up), 9_000);
    }

    #[test]
    fn a_quiet_partition_is_idle_only_when_caught_up_and_reading_works() {
        let t0 = Instant::now();
        let mut c = PartitionClock::new(Duration::ZERO, Duration::from_secs(1), None, t0);
        c.observe(700, t0);
        let quiet = t0 + Duration::from_secs(60);
        // A backlog, failing fetches (broker down) and an unknown state all hold the watermark
        // at the partition's own, however long it has been quiet.
        for progress in [Progress::Behind, Progress::Failing, Progress::Unknown] {
            assert!(!c.is_idle(quiet, progress), "{progress:?}");
            assert_eq!(c.watermark(quiet, progress), 700, "{progress:?}");
        }
        assert_eq!(c.watermark(quiet, Progress::CaughtUp), IDLE);
        // Caught up but not yet quiet for idle_timeout: not idle either.
        assert_eq!(c.watermark(t0 + Duration::from_millis(500), Progress::CaughtUp), 700);
        // A new partition with a backlog and no event yet holds the source at UNKNOWN.
        let fresh = PartitionClock::new(Duration::ZERO, Duration::from_secs(1), None, t0);
        assert_eq!(
            combine_min([c.watermark(quiet, Progress::CaughtUp), fresh.watermark(quiet, Progress::Behind)]),
            UNKNOWN
        );
        assert_eq!(advance(100, combine_min([fresh.watermark(quiet, Progress::Behind)])), 100);
    }
}
