//! Operators: the keyed, stateful steps between the sources and the sinks, behind one
//! interface the shard loop drives. Each operator
//!
//! - owns named state tables ([`Operator::tables_of`]); the store keeps them as
//!   `<query>/<table>` and knows nothing of what they hold;
//! - is restored at start from the entries of its tables whose key group its shard owns
//!   ([`Operator::restore`]), then told the watermark it resumes at;
//! - processes records on numbered input ports ([`Operator::process`]), after the shard asked
//!   it whether the record is late ([`Operator::late`]); a stateless query has an operator
//!   that holds nothing (the shard emits its rows at the source);
//! - at each epoch's watermark emits rows and hands over its table writes
//!   ([`Operator::finish_epoch`], [`Operator::take_writes`]).
//!
//! Dispatch is by enum, so a record costs one match, not a virtual call.

use crate::anomaly::{AnomalyOperator, AnomalySpec};
use crate::apply::{ApplyOperator, ApplySpec};
use crate::config::{QueryConfig, QueryKind};
use crate::join::{JoinOperator, JoinSpec};
use crate::state::TableWrites;
use crate::types::EventTime;
use crate::window::{InSlot, OperatorChanges, OutputRow, OutputShape, WindowOperator};

/// One operator instance: one query on one shard.
pub enum Operator {
    /// Tumbling, sliding, global and session windows of a keyed aggregate (one input port).
    Window(WindowOperator),
    /// A stateless query: the shard emits its rows at the source; nothing reaches it.
    Stateless,
    /// A stream-stream interval join (ports [`crate::join::LEFT`] and [`crate::join::RIGHT`]).
    Join(JoinOperator),
    /// Rolling statistics and the readings judged against them (one input port).
    Anomaly(AnomalyOperator),
    /// Change events applied per primary key (one input port).
    Apply(ApplyOperator),
}

/// The operator a query runs.
#[derive(Debug, Clone)]
pub enum OperatorSpec {
    /// Windows of a keyed aggregate (its shape is the plan's).
    Window,
    /// Nothing keyed: the shard emits each record's row itself.
    Stateless,
    Join(JoinSpec),
    Anomaly(AnomalySpec),
    Apply(ApplySpec),
}

/// Why a record is late for an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Late {
    /// It belongs to window `[start, end)`, already closed.
    Window(EventTime, EventTime),
    /// Its event time is behind the watermark.
    Behind,
}

/// The state tables a window operator owns.
const WINDOW_TABLES: &[&str] = &["windows"];

impl Operator {
    /// The operator of `query` as the plan says, producing rows of `shape`.
    pub fn new(query: &QueryConfig, spec: &OperatorSpec, shape: OutputShape) -> Operator {
        match spec {
            OperatorSpec::Window => Operator::Window(WindowOperator::with_shape(query, shape)),
            OperatorSpec::Stateless => Operator::Stateless,
            OperatorSpec::Join(spec) => Operator::Join(JoinOperator::new(spec.clone())),
            OperatorSpec::Anomaly(spec) => Operator::Anomaly(AnomalyOperator::new(spec.clone())),
            OperatorSpec::Apply(spec) => Operator::Apply(ApplyOperator::new(spec.clone())),
        }
    }

    /// Names of the state tables an operator for `query` owns, in table order.
    pub fn tables_of(query: &QueryConfig) -> &'static [&'static str] {
        match query.kind {
            QueryKind::Aggregate => WINDOW_TABLES,
            QueryKind::Stateless => &[],
            QueryKind::Join(_) => JoinOperator::TABLES,
            QueryKind::Anomaly(_) => AnomalyOperator::TABLES,
            QueryKind::Apply(_) => ApplyOperator::TABLES,
        }
    }

    /// Restores one entry of its table `table` when `owns(group key)`; returns whether it was
    /// restored. An entry that cannot be read is an error naming what is wrong with it.
    pub fn restore(&mut self, table: usize, key: &[u8], value: &[u8], owns: impl Fn(&[u8]) -> bool) -> Result<bool, String> {
        match self {
            Operator::Window(op) => {
                debug_assert_eq!(table, 0);
                let (start, group_key) = OperatorChanges::split_entry_key(key).ok_or("key shorter than 8 bytes")?;
                if !owns(group_key) {
                    return Ok(false);
                }
                op.restore(start, group_key, value)
                    .map_err(|what| format!("{what}: window state does not match the query's aggregates (did the query change? use a new state_dir)"))?;
                Ok(true)
            }
            Operator::Stateless => Ok(false),
            Operator::Join(op) => op.restore(table, key, value, owns),
            Operator::Anomaly(op) => op.restore(table, key, value, owns),
            Operator::Apply(op) => op.restore(table, key, value, owns),
        }
    }

    /// After restoring at `watermark`: what closed at or before it was emitted by an earlier run.
    /// `stored_lateness_us`: the `allowed_lateness` the store's last run used (windows only).
    pub fn resume_at(&mut self, watermark: Option<EventTime>, stored_lateness_us: Option<i64>) {
        match self {
            Operator::Window(op) => op.resume_at(watermark, stored_lateness_us),
            Operator::Stateless => {}
            Operator::Join(op) => op.resume_at(watermark),
            Operator::Anomaly(op) => op.resume_at(watermark),
            // Changes are ordered by source position, not by event time.
            Operator::Apply(_) => {}
        }
    }

    /// Whether a record at `t` on input `port` is late at `watermark`, and why.
    #[inline]
    pub fn late(&self, port: usize, t: EventTime, watermark: EventTime) -> Option<Late> {
        match self {
            Operator::Window(op) => {
                debug_assert_eq!(port, 0);
                op.late_window(t, watermark).map(|(start, end)| Late::Window(start, end))
            }
            Operator::Stateless => None,
            Operator::Join(op) => op.is_late(t, watermark).then_some(Late::Behind),
            Operator::Anomaly(op) => op.is_late(t, watermark).then_some(Late::Behind),
            // A change is never late: its position, not its time, decides whether it applies.
            Operator::Apply(_) => None,
        }
    }

    /// One record on input `port`: its key, event time and inputs (byte strings as ranges of
    /// `blob`).
    #[inline]
    pub fn process(&mut self, port: usize, t: EventTime, key: &[u8], inputs: &[InSlot], blob: &[u8]) {
        match self {
            Operator::Window(op) => {
                debug_assert_eq!(port, 0);
                op.update(t, key, inputs, blob)
            }
            Operator::Stateless => {}
            Operator::Join(op) => op.process(port, t, key, inputs, blob),
            Operator::Anomaly(op) => op.process(t, key, inputs),
            Operator::Apply(op) => op.process(key, inputs, blob),
        }
    }

    /// The epoch ended at `watermark` (the previous one at `prev_watermark`): its output rows.
    pub fn finish_epoch(&mut self, prev_watermark: EventTime, watermark: EventTime, out: &mut Vec<OutputRow>) {
        match self {
            Operator::Window(op) => op.finish_epoch(prev_watermark, watermark, out),
            Operator::Stateless => {}
            Operator::Join(op) => op.finish_epoch(prev_watermark, watermark, out),
            Operator::Anomaly(op) => op.finish_epoch(prev_watermark, watermark, out),
            Operator::Apply(op) => op.finish_epoch(out),
        }
    }

    /// What this epoch changed in each of its tables, in table order.
    pub fn take_writes(&mut self) -> Vec<TableWrites> {
        match self {
            Operator::Window(op) => vec![op.take_changes().into_table_writes()],
            Operator::Stateless => Vec::new(),
            Operator::Join(op) => op.take_writes(),
            Operator::Anomaly(op) => op.take_writes(),
            Operator::Apply(op) => op.take_writes(),
        }
    }

    /// Open windows (sessions count one each; a join counts the rows it holds).
    pub fn open_windows(&self) -> usize {
        match self {
            Operator::Window(op) => op.open_windows(),
            Operator::Stateless => 0,
            Operator::Join(op) => op.open_rows(),
            Operator::Anomaly(op) => op.open_windows(),
            Operator::Apply(_) => 0,
        }
    }

    /// Keyed entries held.
    pub fn open_keys(&self) -> usize {
        match self {
            Operator::Window(op) => op.open_keys(),
            Operator::Stateless => 0,
            Operator::Join(op) => op.open_keys(),
            Operator::Anomaly(op) => op.open_keys(),
            Operator::Apply(op) => op.open_keys(),
        }
    }

    /// Change events skipped since the last call (apply: at or before their key's position).
    pub fn take_skipped_changes(&mut self) -> u64 {
        match self {
            Operator::Apply(op) => op.take_skipped(),
            _ => 0,
        }
    }
}

/// The state tables of a pipeline's operators: their names for the store, and which table
/// indexes each operator owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateLayout {
    /// Every table, as `<query>/<table>`.
    pub names: Vec<String>,
    /// Per operator (query index): its table indexes, in its table order.
    pub tables: Vec<Vec<usize>>,
}

impl StateLayout {
    pub fn new(queries: &[QueryConfig]) -> StateLayout {
        let mut layout = StateLayout::default();
        for q in queries {
            let ids = Operator::tables_of(q)
                .iter()
                .map(|t| {
                    layout.names.push(format!("{}/{t}", q.name));
                    layout.names.len() - 1
                })
                .collect();
            layout.tables.push(ids);
        }
        layout
    }
}
