//! Operators: the keyed, stateful steps between the sources and the sinks, behind one
//! interface the shard loop drives. Each operator
//!
//! - owns named state tables ([`Operator::tables_of`]); the store keeps them as
//!   `<query>/<table>` and knows nothing of what they hold;
//! - is restored at start from the entries of its tables whose key group its shard owns
//!   ([`Operator::restore`]), then told the watermark it resumes at;
//! - processes records on numbered input ports ([`Operator::process`]), after the shard asked
//!   it whether the record is late ([`Operator::late`]);
//! - at each epoch's watermark emits rows and hands over its table writes
//!   ([`Operator::finish_epoch`], [`Operator::take_writes`]).
//!
//! Dispatch is by enum, so a record costs one match, not a virtual call.

use crate::config::QueryConfig;
use crate::state::TableWrites;
use crate::types::EventTime;
use crate::window::{InSlot, OperatorChanges, OutputRow, OutputShape, WindowOperator};

/// One operator instance: one query on one shard.
pub enum Operator {
    /// Tumbling, sliding, global and session windows of a keyed aggregate (one input port).
    Window(WindowOperator),
}

/// The state tables a window operator owns.
const WINDOW_TABLES: &[&str] = &["windows"];

impl Operator {
    /// The operator of `query`, producing rows of `shape` (from the plan).
    pub fn for_query(query: &QueryConfig, shape: OutputShape) -> Operator {
        Operator::Window(WindowOperator::with_shape(query, shape))
    }

    /// Names of the state tables an operator for `query` owns, in table order.
    pub fn tables_of(_query: &QueryConfig) -> &'static [&'static str] {
        WINDOW_TABLES
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
        }
    }

    /// After restoring at `watermark`: what closed at or before it was emitted by an earlier run.
    pub fn resume_at(&mut self, watermark: Option<EventTime>) {
        match self {
            Operator::Window(op) => op.resume_at(watermark),
        }
    }

    /// `Some((start, end))` of the window a record at `t` on input `port` missed when it is
    /// late at `watermark`.
    #[inline]
    pub fn late(&self, port: usize, t: EventTime, watermark: EventTime) -> Option<(EventTime, EventTime)> {
        match self {
            Operator::Window(op) => {
                debug_assert_eq!(port, 0);
                op.late_window(t, watermark)
            }
        }
    }

    /// One record on input `port`: its group key, event time and aggregate inputs (byte
    /// strings as ranges of `blob`).
    #[inline]
    pub fn process(&mut self, port: usize, t: EventTime, key: &[u8], inputs: &[InSlot], blob: &[u8]) {
        match self {
            Operator::Window(op) => {
                debug_assert_eq!(port, 0);
                op.update(t, key, inputs, blob)
            }
        }
    }

    /// The epoch ended at `watermark` (the previous one at `prev_watermark`): its output rows.
    pub fn finish_epoch(&mut self, prev_watermark: EventTime, watermark: EventTime, out: &mut Vec<OutputRow>) {
        match self {
            Operator::Window(op) => op.finish_epoch(prev_watermark, watermark, out),
        }
    }

    /// What this epoch changed in each of its tables, in table order.
    pub fn take_writes(&mut self) -> Vec<TableWrites> {
        match self {
            Operator::Window(op) => vec![op.take_changes().into_table_writes()],
        }
    }

    /// Open windows (sessions count one each).
    pub fn open_windows(&self) -> usize {
        match self {
            Operator::Window(op) => op.open_windows(),
        }
    }

    /// Keyed entries held.
    pub fn open_keys(&self) -> usize {
        match self {
            Operator::Window(op) => op.open_keys(),
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
