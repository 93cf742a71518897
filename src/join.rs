//! The stream-stream interval join of one query on one shard.
//!
//! Left row `L` (event time `tl`) and right row `R` (`tr`) with equal join keys match when
//! `tl + lower <= tr <= tl + upper`. Both sides are kept, per join key, until no future
//! non-late row of the other side can match them:
//!
//! - a row is late (dead-lettered by the shard, never given to the operator) when its event
//!   time is below the watermark of the previous epoch ([`JoinOperator::is_late`]);
//! - at the end of an epoch with watermark `W`, a left row expires when `tl + upper < W` and a
//!   right row when `tr - lower < W`. An expiring row of an outer side that never matched is
//!   emitted once, null-padded. Never earlier, never twice;
//! - a pair is emitted once, by whichever of its two rows arrived second;
//! - a join key holding a NULL never matches (SQL equality); such a row of an outer side is
//!   emitted null-padded when it expires, of an inner side it is dropped.
//!
//! Output rows carry every output column in `values` (the `select` expressions evaluated over
//! the combined row: the left side's carried values, then the right side's).
//!
//! State tables: `left` and `right`, each keyed `encode_time_key(t) ++ join key`, the value
//! the rows of that side with that time and key (with their matched flags); expired rows are
//! one range delete per table.

use crate::expr::Expr;
use crate::state::TableWrites;
use crate::types::EventTime;
use crate::window::{InSlot, OutputRow};

/// Which unmatched rows a join keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinKind {
    Inner,
    Left,
    Right,
    Full,
}

/// Input port of the left side; the right side is port 1.
pub const LEFT: usize = 0;
pub const RIGHT: usize = 1;

/// What a join operator needs from the plan.
#[derive(Debug, Clone)]
pub struct JoinSpec {
    pub kind: JoinKind,
    /// µs; right rows match when `tl + lower <= tr <= tl + upper` (lower <= upper).
    pub lower: i64,
    pub upper: i64,
    /// Values each side carries, in order (the combined row is left's then right's).
    pub left_width: usize,
    pub right_width: usize,
    /// Output columns, compiled against the combined row.
    pub select: Vec<Expr>,
}

/// One join query on one shard.
pub struct JoinOperator {
    spec: JoinSpec,
}

impl JoinOperator {
    /// The state tables a join owns, in table order.
    pub const TABLES: &'static [&'static str] = &["left", "right"];

    pub fn new(spec: JoinSpec) -> JoinOperator {
        JoinOperator { spec }
    }

    pub fn spec(&self) -> &JoinSpec {
        &self.spec
    }

    /// Restores one entry of table `table` (0 = left, 1 = right) when `owns(join key)`;
    /// returns whether it was kept. Errors name what is wrong with the entry.
    pub fn restore(&mut self, table: usize, key: &[u8], value: &[u8], owns: impl Fn(&[u8]) -> bool) -> Result<bool, String> {
        let _ = (table, key, value, owns);
        todo!()
    }

    /// After restoring at `watermark`.
    pub fn resume_at(&mut self, watermark: Option<EventTime>) {
        let _ = watermark;
        todo!()
    }

    /// Whether a row at `t` is late at `watermark` (the previous epoch's).
    #[inline]
    pub fn is_late(&self, t: EventTime, watermark: EventTime) -> bool {
        t < watermark
    }

    /// One row on `port` ([`LEFT`] or [`RIGHT`]) with its join key. `inputs[0]` is
    /// `InSlot::Bytes` over `blob`: the side's carried values, each encoded with
    /// `types::encode_key_value` (readable with `types::decode_key`), `left_width` or
    /// `right_width` of them. Matches found are kept and handed out by `finish_epoch`.
    pub fn process(&mut self, port: usize, t: EventTime, key: &[u8], inputs: &[InSlot], blob: &[u8]) {
        let _ = (port, t, key, inputs, blob);
        todo!()
    }

    /// The epoch ended at `watermark`: appends this epoch's matches, then the null-padded rows
    /// of outer sides that expire now, and drops expired rows.
    pub fn finish_epoch(&mut self, prev_watermark: EventTime, watermark: EventTime, out: &mut Vec<OutputRow>) {
        let _ = (prev_watermark, watermark, out);
        todo!()
    }

    /// What this epoch changed in `left` and `right`, in table order.
    pub fn take_writes(&mut self) -> Vec<TableWrites> {
        todo!()
    }

    /// Rows held (both sides).
    pub fn open_rows(&self) -> usize {
        todo!()
    }

    /// Join keys held (both sides).
    pub fn open_keys(&self) -> usize {
        todo!()
    }
}
