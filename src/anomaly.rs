//! Anomaly detection of one query on one shard: per group key, rolling statistics (count,
//! mean, sample standard deviation) of a numeric field over sliding windows of `size` every
//! `slide`, and each reading compared with them.
//!
//! Readings update one pane of `slide` (mergeable count/mean/M2, min, max); a window is the
//! merge of its `size / slide` panes. Two ways to judge a reading at `t`:
//!
//! - [`AnomalyMode::Trailing`] (what production detectors do): against the latest window that
//!   ends at or before `t`, `[e - size, e)` with `e = align_down(t, slide)`, which therefore
//!   excludes the reading itself. Judged once, at the first epoch whose watermark is `>= e`,
//!   when those statistics are final.
//! - [`AnomalyMode::Containing`] (the literal SQL: readings joined with the windowed
//!   statistics on key and `window_start <= t < window_end`): against every window containing
//!   it, the reading included; each (reading, window) pair judged once, when the window closes
//!   (watermark `>= window_end`).
//!
//! A reading is an anomaly when the window has at least `min_count` readings, a standard
//! deviation (two readings or more), and `value > mean + threshold·σ` or
//! `value < mean − threshold·σ`. `z_score = (value − mean) / σ`, NULL when σ is 0.
//! Readings whose value is NULL are not counted and not judged.
//!
//! Output rows carry every column in `values`: for `Containing` first `window_start`,
//! `window_end` (`Value::Time`); then the group-key values (decoded from the key), the
//! reading's value (`Value::Float`), its time (`Value::Time`), `expected_value` (mean),
//! `expected_stddev` (σ), `z_score` (Float or Null).
//!
//! Rows are late (dead-lettered by the shard) when `t` is below the previous epoch's watermark.
//! State tables: `panes` (`encode_time_key(pane start) ++ group key` → pane statistics) and
//! `readings` (`encode_time_key(t) ++ group key` → the values read at that time, not yet
//! judged or still needed); both drop what is no longer needed with one range delete.

use crate::state::TableWrites;
use crate::types::EventTime;
use crate::window::{InSlot, OutputRow};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnomalyMode {
    Trailing,
    Containing,
}

/// What an anomaly operator needs from the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalySpec {
    pub mode: AnomalyMode,
    /// µs; `size % slide == 0`, windows start at multiples of `slide` (from the Unix epoch).
    pub size: i64,
    pub slide: i64,
    /// Bounds are mean ± threshold·σ. Default 3.
    pub threshold: f64,
    /// Fewer readings in the window: no judgement. At least 2 (σ needs two readings).
    pub min_count: u64,
}

/// One anomaly query on one shard.
pub struct AnomalyOperator {
    spec: AnomalySpec,
}

impl AnomalyOperator {
    /// The state tables an anomaly operator owns, in table order.
    pub const TABLES: &'static [&'static str] = &["panes", "readings"];

    pub fn new(spec: AnomalySpec) -> AnomalyOperator {
        AnomalyOperator { spec }
    }

    pub fn spec(&self) -> &AnomalySpec {
        &self.spec
    }

    /// Restores one entry of table `table` (0 = panes, 1 = readings) when `owns(group key)`;
    /// returns whether it was kept. Errors name what is wrong with the entry.
    pub fn restore(&mut self, table: usize, key: &[u8], value: &[u8], owns: impl Fn(&[u8]) -> bool) -> Result<bool, String> {
        let _ = (table, key, value, owns);
        todo!()
    }

    /// After restoring at `watermark`: what was due at or before it was judged by an earlier run.
    pub fn resume_at(&mut self, watermark: Option<EventTime>) {
        let _ = watermark;
        todo!()
    }

    /// Whether a reading at `t` is late at `watermark` (the previous epoch's).
    #[inline]
    pub fn is_late(&self, t: EventTime, watermark: EventTime) -> bool {
        t < watermark
    }

    /// One reading: its group key, time, and `inputs[0]` its value (`InSlot::Int`, `Float`,
    /// or `Null`).
    pub fn process(&mut self, t: EventTime, key: &[u8], inputs: &[InSlot]) {
        let _ = (t, key, inputs);
        todo!()
    }

    /// The epoch ended at `watermark`: appends the anomalies judged now and drops what is no
    /// longer needed.
    pub fn finish_epoch(&mut self, prev_watermark: EventTime, watermark: EventTime, out: &mut Vec<OutputRow>) {
        let _ = (prev_watermark, watermark, out);
        todo!()
    }

    /// What this epoch changed in `panes` and `readings`, in table order.
    pub fn take_writes(&mut self) -> Vec<TableWrites> {
        todo!()
    }

    /// Open windows (panes held).
    pub fn open_windows(&self) -> usize {
        todo!()
    }

    /// Group keys held.
    pub fn open_keys(&self) -> usize {
        todo!()
    }
}
