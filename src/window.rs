//! Window assignment and the keyed window operators of one query on one shard.
//!
//! Two operators cover every window kind:
//! - [`BucketOperator`] keeps `bucket start → (group key → accumulators)` in start order.
//!   Tumbling and sliding windows use **panes** of `gcd(size, slide)`: an event updates exactly
//!   one pane, and a window's result is the merge of the panes it spans (so a sliding window
//!   costs one update per event, not size/slide). Global windows use one bucket per calendar
//!   period (or a single bucket when they never reset).
//! - [`SessionOperator`] keeps, per key, the open sessions `[first event, last event + gap)`;
//!   an event that overlaps several sessions merges them.
//!
//! Both emit [`OutputRow`]s: in append mode once per window when it closes (watermark ≥ end +
//! allowed lateness); in update and complete modes at every epoch for the windows whose
//! aggregates changed (plus retractions of sessions merged away). Each epoch they hand the
//! state store what changed ([`OperatorChanges`]).
//!
//! Lateness is decided at the source, once per event and query, against the watermark of the
//! previous epoch, with [`WindowOperator::late_window`]; the operators never see late events.

use std::collections::{BTreeMap, HashMap, HashSet};

use xxhash_rust::xxh3::Xxh3DefaultBuilder;

use crate::agg::{decode_accs, encode_accs, Acc, AggFunc, AggSpec, In};
use crate::config::{AggFn, AggregateConfig, CalendarUnit, FieldType, OutputMode, QueryConfig, SourceConfig, WindowConfig};
use crate::expr::Expr;
use crate::state::TableWrites;
use crate::time::{civil_from_days, days_from_civil};
use crate::types::{decode_key, decode_time_key, encode_time_key, EventTime, Value};

mod keytable;
use keytable::KeyTable;

/// An aggregate input as carried between shards: like [`In`] but with byte strings as ranges
/// into the batch's byte buffer, so a record needs no allocation of its own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InSlot {
    Skip,
    Null,
    Int(i64),
    Float(f64),
    Bytes { start: u32, end: u32 },
}

impl InSlot {
    #[inline]
    pub fn resolve<'a>(&self, blob: &'a [u8]) -> In<'a> {
        match *self {
            InSlot::Skip => In::Skip,
            InSlot::Null => In::Null,
            InSlot::Int(v) => In::Int(v),
            InSlot::Float(v) => In::Float(v),
            InSlot::Bytes { start, end } => In::Bytes(&blob[start as usize..end as usize]),
        }
    }
}

/// How the aggregate input of one aggregate is taken from an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// `count` without a field: every (unfiltered) row counts.
    Row,
    /// Numeric value of the field (int, float; timestamps as µs).
    Number,
    /// Key-encoded bytes of the field (distinct counts, first/last).
    Bytes,
    /// Only whether the field is present (`count(field)`).
    Presence,
}

/// The aggregate module's spec for one configured aggregate.
pub fn agg_spec(a: &AggregateConfig, source: &SourceConfig) -> AggSpec {
    let func = match a.func {
        AggFn::Count => AggFunc::Count,
        AggFn::Sum => AggFunc::Sum,
        AggFn::Min => AggFunc::Min,
        AggFn::Max => AggFunc::Max,
        AggFn::Avg => AggFunc::Avg,
        AggFn::VarSamp => AggFunc::Variance { sample: true },
        AggFn::VarPop => AggFunc::Variance { sample: false },
        AggFn::StddevSamp => AggFunc::Stddev { sample: true },
        AggFn::StddevPop => AggFunc::Stddev { sample: false },
        AggFn::CountDistinct => AggFunc::CountDistinct,
        AggFn::ApproxCountDistinct => AggFunc::ApproxCountDistinct,
        AggFn::ApproxPercentile => AggFunc::ApproxPercentile {
            p: a.percentile.unwrap_or(0.5),
        },
        AggFn::First => AggFunc::First,
        AggFn::Last => AggFunc::Last,
    };
    let input = match &a.expr {
        Some(expr) => Some(expr.expr.output_type()),
        None => a.field_index.map(|i| source.schema[i].ty),
    };
    AggSpec { func, input }
}

/// How the input of aggregate `a` is read from an event (its field or its `expr`).
pub fn input_kind(a: &AggregateConfig) -> InputKind {
    let input = a.field_index.is_some() || a.expr.is_some();
    match (a.func, input) {
        (AggFn::Count, false) => InputKind::Row,
        (AggFn::Count, true) => InputKind::Presence,
        (AggFn::CountDistinct | AggFn::ApproxCountDistinct | AggFn::First | AggFn::Last, _) => InputKind::Bytes,
        _ => InputKind::Number,
    }
}

/// Output column types of a query's values (aggregates, then derived columns), and the
/// compiled derived expressions. Column order of the expressions' input row: window columns,
/// group keys, aggregates, derived columns.
#[derive(Debug, Clone)]
pub struct OutputShape {
    pub specs: Vec<AggSpec>,
    pub key_types: Vec<FieldType>,
    pub derived: Vec<Expr>,
    pub value_types: Vec<FieldType>,
    /// Names of the value columns (aggregates, then derived columns; or every column of a
    /// query whose rows carry all their columns as values).
    pub value_names: Vec<String>,
}

impl OutputShape {
    /// From the compiled query: its derived expressions were type-checked and compiled with the
    /// configuration, against these same columns.
    pub fn new(query: &QueryConfig, source: &SourceConfig) -> OutputShape {
        let specs: Vec<AggSpec> = query.aggregates.iter().map(|a| agg_spec(a, source)).collect();
        let key_types: Vec<FieldType> = query.key_fields.iter().map(|&i| source.schema[i].ty).collect();
        let mut value_types: Vec<FieldType> = specs.iter().map(AggSpec::output_type).collect();
        let derived: Vec<Expr> = query.derive.iter().map(|d| d.expr.expr.clone()).collect();
        value_types.extend(derived.iter().map(Expr::output_type));
        OutputShape {
            specs,
            key_types,
            derived,
            value_types,
            value_names: query
                .aggregates
                .iter()
                .map(|a| a.name.clone())
                .chain(query.derive.iter().map(|d| d.name.clone()))
                .collect(),
        }
    }

    /// Rows that carry every column as a value (stateless queries, joins, anomalies).
    pub fn columns(columns: Vec<(String, FieldType)>) -> OutputShape {
        let (value_names, value_types) = columns.into_iter().unzip();
        OutputShape {
            specs: Vec::new(),
            key_types: Vec::new(),
            derived: Vec::new(),
            value_types,
            value_names,
        }
    }
}

/// One result row of a query: window bounds, encoded group key, aggregate and derived values.
/// `retract` rows (update mode only) say "the row with this window and key is gone" — a
/// session that merged into another.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OutputRow {
    pub window_start: EventTime,
    pub window_end: EventTime,
    pub key: Vec<u8>,
    pub values: Vec<Value>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retract: bool,
}

/// State changes of one operator in one epoch.
#[derive(Debug, Default)]
pub struct OperatorChanges {
    /// (bucket or session start, group key, encoded state) of entries changed and still open.
    pub puts: Vec<(EventTime, Vec<u8>, Vec<u8>)>,
    /// (start, group key) of entries to delete (sessions merged away or closed).
    pub deletes: Vec<(EventTime, Vec<u8>)>,
    /// Every entry with start ≤ this value is closed and can be deleted.
    pub closed_through: Option<EventTime>,
}

impl OperatorChanges {
    /// The writes to the operator's state table, whose keys are `start ++ group key` (start
    /// as [`encode_time_key`]), so the entries up to a start are one key range.
    pub fn into_table_writes(self) -> TableWrites {
        let entry_key = |start: EventTime, key: &[u8]| [&encode_time_key(start)[..], key].concat();
        TableWrites {
            delete_ranges: self
                .closed_through
                .map(|through| (encode_time_key(EventTime::MIN).to_vec(), encode_time_key(through.saturating_add(1)).to_vec()))
                .into_iter()
                .collect(),
            deletes: self.deletes.iter().map(|(start, key)| entry_key(*start, key)).collect(),
            puts: self.puts.into_iter().map(|(start, key, value)| (entry_key(start, &key), value)).collect(),
        }
    }

    /// Splits a state-table key into its start and group key.
    pub fn split_entry_key(key: &[u8]) -> Option<(EventTime, &[u8])> {
        let (start, group_key) = key.split_first_chunk::<8>()?;
        Some((decode_time_key(*start), group_key))
    }
}

/// Where events go in time, for bucketed windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assigner {
    /// Tumbling (slide = size) and sliding windows, stored as panes of `pane` µs.
    Panes { size: i64, slide: i64, pane: i64, offset: i64 },
    /// One bucket per calendar period; the period is the window.
    Calendar(CalendarUnit),
    /// One bucket forever.
    Global,
}

const GLOBAL_BUCKET: EventTime = 0;

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Assigner {
    pub fn from_config(window: &WindowConfig) -> Option<Assigner> {
        let us = |d: std::time::Duration| d.as_micros() as i64;
        Some(match *window {
            WindowConfig::Tumbling { size, offset } => Assigner::Panes {
                size: us(size),
                slide: us(size),
                pane: us(size),
                offset: us(offset),
            },
            WindowConfig::Sliding { size, slide, offset } => Assigner::Panes {
                size: us(size),
                slide: us(slide),
                pane: gcd(us(size), us(slide)),
                offset: us(offset),
            },
            WindowConfig::Global { reset: Some(unit) } => Assigner::Calendar(unit),
            WindowConfig::Global { reset: None } => Assigner::Global,
            WindowConfig::Session { .. } => return None,
        })
    }

    /// Start of the bucket holding `t`.
    #[inline]
    pub fn bucket(&self, t: EventTime) -> EventTime {
        match *self {
            Assigner::Panes { pane, offset, .. } => align(t, pane, offset),
            Assigner::Calendar(unit) => calendar_start(t, unit),
            Assigner::Global => GLOBAL_BUCKET,
        }
    }

    /// The window ending first among those containing `t`: `(start, end)`.
    pub fn first_window(&self, t: EventTime) -> (EventTime, EventTime) {
        match *self {
            Assigner::Panes { size, slide, offset, .. } => {
                // Window ends lie at offset + size + k·slide: the first one after t.
                let end = align(t, slide, offset.wrapping_add(size)).saturating_add(slide);
                (end.saturating_sub(size), end)
            }
            Assigner::Calendar(unit) => {
                let s = calendar_start(t, unit);
                (s, calendar_next(s, unit))
            }
            Assigner::Global => (EventTime::MIN, EventTime::MAX),
        }
    }
}

/// Largest `offset + k·size` ≤ t.
#[inline]
pub fn align(t: EventTime, size: i64, offset: i64) -> EventTime {
    (t - offset).div_euclid(size) * size + offset
}

const DAY_US: i64 = 86_400_000_000;
const HOUR_US: i64 = 3_600_000_000;

/// Start of the UTC calendar period holding `t`.
pub fn calendar_start(t: EventTime, unit: CalendarUnit) -> EventTime {
    match unit {
        CalendarUnit::Hour => align(t, HOUR_US, 0),
        CalendarUnit::Day => align(t, DAY_US, 0),
        // 1970-01-05 was a Monday.
        CalendarUnit::Week => align(t, 7 * DAY_US, 4 * DAY_US),
        CalendarUnit::Month | CalendarUnit::Year => {
            let (y, m, _) = civil_from_days(t.div_euclid(DAY_US));
            let m = if unit == CalendarUnit::Year { 1 } else { m };
            days_from_civil(y, m, 1) * DAY_US
        }
    }
}

/// Start of the period after the one starting at `start`.
pub fn calendar_next(start: EventTime, unit: CalendarUnit) -> EventTime {
    match unit {
        CalendarUnit::Hour => start + HOUR_US,
        CalendarUnit::Day => start + DAY_US,
        CalendarUnit::Week => start + 7 * DAY_US,
        CalendarUnit::Month => {
            let (y, m, _) = civil_from_days(start.div_euclid(DAY_US));
            let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            days_from_civil(y, m, 1) * DAY_US
        }
        CalendarUnit::Year => {
            let (y, _, _) = civil_from_days(start.div_euclid(DAY_US));
            days_from_civil(y + 1, 1, 1) * DAY_US
        }
    }
}

type KeyMap<V> = HashMap<Box<[u8]>, V, Xxh3DefaultBuilder>;

/// What both operators share: the aggregates, how rows are finished, lateness.
struct Common {
    shape: OutputShape,
    lateness_us: i64,
    mode: OutputMode,
    /// Windows ending at or before this were closed by an earlier run (under the lateness it
    /// had then): they stay closed whatever `allowed_lateness` says now.
    closed_floor: EventTime,
}

impl Common {
    fn new_accs(&self) -> Box<[Acc]> {
        self.shape.specs.iter().map(AggSpec::new_acc).collect()
    }

    #[inline]
    fn update(&self, accs: &mut [Acc], t: EventTime, inputs: &[InSlot], blob: &[u8]) {
        for ((acc, spec), x) in accs.iter_mut().zip(&self.shape.specs).zip(inputs) {
            acc.update(spec, x.resolve(blob), t);
        }
    }

    fn merge_into(&self, into: &mut [Acc], from: &[Acc]) {
        for ((a, b), spec) in into.iter_mut().zip(from).zip(&self.shape.specs) {
            a.merge(spec, b);
        }
    }

    /// Aggregate results and derived columns of one row.
    fn row(&self, window: &[Value], start: EventTime, end: EventTime, key: &[u8], accs: &[Acc]) -> OutputRow {
        let mut values: Vec<Value> = accs.iter().zip(&self.shape.specs).map(|(a, s)| a.result(s)).collect();
        if !self.shape.derived.is_empty() {
            let keys = decode_key(key).unwrap_or_default();
            let mut row: Vec<Value> = window.to_vec();
            row.extend(keys);
            row.extend(values.iter().cloned());
            for expr in &self.shape.derived {
                let v = expr.eval(row.as_slice()).into_value();
                row.push(v.clone());
                values.push(v);
            }
        }
        OutputRow {
            window_start: start,
            window_end: end,
            key: key.to_vec(),
            values,
            retract: false,
        }
    }

    fn encode(&self, accs: &[Acc]) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * accs.len());
        encode_accs(accs, &mut out);
        out
    }
}

/// Keyed state of a query with tumbling, sliding or global windows on one shard.
pub struct BucketOperator {
    common: Common,
    assigner: Assigner,
    open: BTreeMap<EventTime, KeyTable>,
    /// Highest window start already closed (panes); windows at or before it are never emitted again.
    closed_windows_through: Option<EventTime>,
    /// Highest bucket start deleted; `close_pending` until handed to the state store.
    closed_through: Option<EventTime>,
    close_pending: bool,
    open_keys: usize,
}

impl BucketOperator {
    #[inline]
    fn update(&mut self, t: EventTime, key: &[u8], inputs: &[InSlot], blob: &[u8]) {
        let bucket = self.assigner.bucket(t);
        let common = &self.common;
        let keys = self.open.entry(bucket).or_insert_with(|| KeyTable::new(common.shape.specs.len()));
        let (accs, new) = keys.upsert(key, || common.new_accs());
        self.open_keys += usize::from(new);
        common.update(accs, t, inputs, blob);
    }

    fn window_values(&self, start: EventTime, end: EventTime) -> Vec<Value> {
        match self.assigner {
            Assigner::Global => vec![],
            _ => vec![Value::Time(start), Value::Time(end)],
        }
    }

    /// The row of window `[s, s + size)` for `key`, merged from its panes.
    fn pane_window_row(&self, s: EventTime, size: i64, key: &[u8]) -> Option<OutputRow> {
        let mut merged: Option<Box<[Acc]>> = None;
        for (_, keys) in self.open.range(s..s.saturating_add(size)) {
            if let Some(e) = keys.get(key) {
                match &mut merged {
                    Some(m) => self.common.merge_into(m, e.accs),
                    None => {
                        let mut m = self.common.new_accs();
                        self.common.merge_into(&mut m, e.accs);
                        merged = Some(m);
                    }
                }
            }
        }
        let accs = merged?;
        let end = s.saturating_add(size);
        Some(self.common.row(&self.window_values(s, end), s, end, key, &accs))
    }

    /// Update/complete modes: rows of windows whose aggregates changed this epoch and that were
    /// still open at `prev_watermark` (the watermark events of this epoch were judged against).
    fn emit_updates(&mut self, prev_watermark: EventTime, all: bool, out: &mut Vec<OutputRow>) {
        match self.assigner {
            Assigner::Panes { size, slide, pane, offset } if pane != size || slide != size => {
                let mut seen: HashSet<(EventTime, &[u8])> = HashSet::new();
                let mut rows = Vec::new();
                for (&b, keys) in &self.open {
                    for (key, _) in keys.iter().filter(|(_, e)| all || e.dirty) {
                        // Windows containing pane b: aligned starts s with b - size < s ≤ b.
                        let mut s = align(b, slide, offset);
                        while s > b - size {
                            let open = all || s.saturating_add(size).saturating_add(self.common.lateness_us) > prev_watermark;
                            if open && seen.insert((s, key)) {
                                rows.extend(self.pane_window_row(s, size, key));
                            }
                            s -= slide;
                        }
                    }
                }
                rows.sort_by(|a, b| (a.window_start, &a.key).cmp(&(b.window_start, &b.key)));
                out.extend(rows);
            }
            _ => {
                for (&b, keys) in &self.open {
                    let (start, end) = self.bucket_window(b);
                    let window = self.window_values(start, end);
                    let mut rows: Vec<OutputRow> = keys
                        .iter()
                        .filter(|(_, e)| all || e.dirty)
                        .map(|(key, e)| self.common.row(&window, start, end, key, e.accs))
                        .collect();
                    rows.sort_by(|a, b| a.key.cmp(&b.key));
                    out.extend(rows);
                }
            }
        }
    }

    /// The window a single bucket is (tumbling panes, calendar periods, global).
    fn bucket_window(&self, b: EventTime) -> (EventTime, EventTime) {
        match self.assigner {
            Assigner::Panes { size, .. } => (b, b.saturating_add(size)),
            Assigner::Calendar(unit) => (b, calendar_next(b, unit)),
            Assigner::Global => (GLOBAL_BUCKET, GLOBAL_BUCKET),
        }
    }

    /// Closes windows whose end + lateness ≤ `watermark`; in append mode their rows go to `out`.
    fn close_until(&mut self, watermark: EventTime, out: &mut Vec<OutputRow>) {
        if watermark <= EventTime::MIN / 2 {
            return; // no watermark yet
        }
        let emit = self.common.mode == OutputMode::Append;
        let lateness = self.common.lateness_us;
        if self.common.mode == OutputMode::Complete {
            // The whole result is rewritten every epoch: closed windows stay (late events are
            // still refused by `late_window`).
            if let Assigner::Panes { size, slide, offset, .. } = self.assigner {
                self.closed_windows_through = Some(align(watermark.saturating_sub(size).saturating_sub(lateness), slide, offset));
            }
            return;
        }
        match self.assigner {
            Assigner::Global => {}
            Assigner::Calendar(unit) => {
                let mut last_closed = None;
                while let Some(entry) = self.open.first_entry() {
                    let b = *entry.key();
                    let end = calendar_next(b, unit);
                    if end.saturating_add(lateness) > watermark {
                        break;
                    }
                    let keys = entry.remove();
                    self.open_keys -= keys.len();
                    if emit {
                        let window = self.window_values(b, end);
                        let mut rows: Vec<OutputRow> = keys.iter().map(|(k, e)| self.common.row(&window, b, end, k, e.accs)).collect();
                        rows.sort_by(|a, b| a.key.cmp(&b.key));
                        out.extend(rows);
                    }
                    last_closed = Some(b);
                }
                if let Some(b) = last_closed {
                    self.closed_through = Some(b);
                    self.close_pending = true;
                }
            }
            Assigner::Panes { size, slide, offset, .. } => {
                // Last window start closed at this watermark: s + size + lateness ≤ watermark.
                let last = align(watermark.saturating_sub(size).saturating_sub(lateness), slide, offset);
                if self.closed_windows_through.is_some_and(|c| c >= last) {
                    return;
                }
                if emit {
                    let mut s = match self.closed_windows_through {
                        Some(c) => c + slide,
                        None => EventTime::MIN,
                    };
                    // Skip to the first window holding the next pane with data.
                    while let Some((&first, _)) = self.open.range(s.max(EventTime::MIN / 2)..).next() {
                        let first_window = align(first.saturating_sub(size), slide, offset) + slide;
                        s = s.max(first_window);
                        if s > last {
                            break;
                        }
                        let mut keys: Vec<&[u8]> = self
                            .open
                            .range(s..s.saturating_add(size))
                            .flat_map(|(_, keys)| keys.keys())
                            .collect::<HashSet<_>>()
                            .into_iter()
                            .collect();
                        keys.sort();
                        let rows: Vec<OutputRow> = keys.iter().filter_map(|k| self.pane_window_row(s, size, k)).collect();
                        out.extend(rows);
                        s += slide;
                    }
                }
                self.closed_windows_through = Some(last);
                // A pane is dropped once the last window containing it (start align(b, slide)) closed.
                let mut removed = false;
                while let Some(entry) = self.open.first_entry() {
                    if align(*entry.key(), slide, offset) > last {
                        break;
                    }
                    self.open_keys -= entry.remove().len();
                    removed = true;
                }
                // Every pane with align(b, slide) ≤ last, i.e. b < last + slide, is gone.
                let through = last.saturating_add(slide - 1);
                if removed || self.closed_through.is_some_and(|c| c < through) {
                    self.closed_through = Some(through);
                    self.close_pending = true;
                }
            }
        }
    }

    fn take_changes(&mut self) -> OperatorChanges {
        let closed_through = if std::mem::take(&mut self.close_pending) { self.closed_through } else { None };
        let mut changes = OperatorChanges {
            closed_through,
            ..Default::default()
        };
        for (start, keys) in &mut self.open {
            let common = &self.common;
            keys.drain_dirty(|key, accs| changes.puts.push((*start, key.to_vec(), common.encode(accs))));
        }
        changes
    }

    fn restore(&mut self, start: EventTime, key: &[u8], accs: Vec<Acc>) {
        let width = self.common.shape.specs.len();
        if self.open.entry(start).or_insert_with(|| KeyTable::new(width)).restore(key, accs) {
            self.open_keys += 1;
        }
    }
}

#[derive(Debug)]
struct Session {
    start: EventTime,
    /// Last event time + gap.
    end: EventTime,
    accs: Box<[Acc]>,
    dirty: bool,
    /// Start under which the state store holds this session, if it does.
    stored: Option<EventTime>,
    /// Start under which this session's row was last emitted (update modes), if it was.
    emitted: Option<EventTime>,
}

/// Keyed session windows of one query on one shard.
pub struct SessionOperator {
    common: Common,
    gap_us: i64,
    /// Per key, open sessions sorted by start, never overlapping.
    sessions: KeyMap<Vec<Session>>,
    deletes: Vec<(EventTime, Vec<u8>)>,
    /// Rows to retract in update modes: (start, key) of emitted sessions merged away.
    retractions: Vec<(EventTime, Vec<u8>)>,
    open_sessions: usize,
}

impl SessionOperator {
    fn update(&mut self, t: EventTime, key: &[u8], inputs: &[InSlot], blob: &[u8]) {
        let (lo, hi) = (t, t.saturating_add(self.gap_us));
        let list = match self.sessions.get_mut(key) {
            Some(l) => l,
            None => self.sessions.entry(key.into()).or_default(),
        };
        // Sessions overlapping [t, t + gap): a contiguous run, as sessions do not overlap.
        let first = list.partition_point(|s| s.end <= lo);
        let last = list.partition_point(|s| s.start < hi);
        if first >= last {
            list.insert(
                first,
                Session {
                    start: lo,
                    end: hi,
                    accs: self.common.new_accs(),
                    dirty: true,
                    stored: None,
                    emitted: None,
                },
            );
            self.open_sessions += 1;
            self.common.update(&mut list[first].accs, t, inputs, blob);
            return;
        }
        let merged: Vec<Session> = list.drain(first + 1..last).collect();
        self.open_sessions -= merged.len();
        let s = &mut list[first];
        for m in merged {
            for ((a, b), spec) in s.accs.iter_mut().zip(m.accs.iter()).zip(&self.common.shape.specs) {
                a.merge(spec, b);
            }
            s.start = s.start.min(m.start);
            s.end = s.end.max(m.end);
            if let Some(st) = m.stored {
                self.deletes.push((st, key.to_vec()));
            }
            if let Some(em) = m.emitted {
                self.retractions.push((em, key.to_vec()));
            }
        }
        s.start = s.start.min(lo);
        s.end = s.end.max(hi);
        s.dirty = true;
        self.common.update(&mut s.accs, t, inputs, blob);
        if s.stored.is_some_and(|st| st != s.start) {
            self.deletes.push((s.stored.take().expect("checked"), key.to_vec()));
        }
        if s.emitted.is_some_and(|em| em != s.start) {
            self.retractions.push((s.emitted.take().expect("checked"), key.to_vec()));
        }
    }

    fn session_row(&self, key: &[u8], s: &Session) -> OutputRow {
        let window = [Value::Time(s.start), Value::Time(s.end), Value::Float((s.end - s.start) as f64 / 1e6)];
        self.common.row(&window, s.start, s.end, key, &s.accs)
    }

    fn emit_updates(&mut self, all: bool, out: &mut Vec<OutputRow>) {
        let mut rows = Vec::new();
        if all {
            // Complete mode rewrites everything: no retractions needed.
            self.retractions.clear();
        }
        for (start, key) in std::mem::take(&mut self.retractions) {
            rows.push(OutputRow {
                window_start: start,
                window_end: start,
                key,
                values: Vec::new(),
                retract: true,
            });
        }
        let mut updated = Vec::new();
        for (key, list) in &mut self.sessions {
            for s in list.iter_mut().filter(|s| all || s.dirty) {
                s.emitted = Some(s.start);
                updated.push((key.clone(), s.start));
            }
        }
        for (key, start) in updated {
            let list = &self.sessions[&key];
            let s = list.iter().find(|s| s.start == start).expect("just marked");
            rows.push(self.session_row(&key, s));
        }
        // A retraction of a start that is emitted again in the same epoch is redundant but harmless:
        // retractions come first, so the upsert ends with the new row.
        rows.sort_by(|a, b| (!a.retract, a.window_start, &a.key).cmp(&(!b.retract, b.window_start, &b.key)));
        out.extend(rows);
    }

    fn close_until(&mut self, watermark: EventTime, out: &mut Vec<OutputRow>) {
        if watermark <= EventTime::MIN / 2 {
            return;
        }
        if self.common.mode == OutputMode::Complete {
            return; // closed sessions stay part of the complete result
        }
        let emit = self.common.mode == OutputMode::Append;
        let lateness = self.common.lateness_us;
        let mut rows = Vec::new();
        let mut emptied = Vec::new();
        for (key, list) in &mut self.sessions {
            let closing = list.iter().take_while(|s| s.end.saturating_add(lateness) <= watermark).count();
            if closing == 0 {
                continue;
            }
            // Sessions are sorted by start and do not overlap, so ends are sorted too.
            for s in list.drain(..closing) {
                if emit {
                    let window = [Value::Time(s.start), Value::Time(s.end), Value::Float((s.end - s.start) as f64 / 1e6)];
                    rows.push(self.common.row(&window, s.start, s.end, key, &s.accs));
                }
                if let Some(st) = s.stored {
                    self.deletes.push((st, key.to_vec()));
                }
                self.open_sessions -= 1;
            }
            if list.is_empty() {
                emptied.push(key.clone());
            }
        }
        for k in emptied {
            self.sessions.remove(&k);
        }
        rows.sort_by(|a, b| (a.window_start, &a.key).cmp(&(b.window_start, &b.key)));
        out.extend(rows);
    }

    fn take_changes(&mut self) -> OperatorChanges {
        let mut changes = OperatorChanges {
            deletes: std::mem::take(&mut self.deletes),
            ..Default::default()
        };
        for (key, list) in &mut self.sessions {
            for s in list.iter_mut().filter(|s| s.dirty) {
                s.dirty = false;
                s.stored = Some(s.start);
                let mut value = s.end.to_le_bytes().to_vec();
                encode_accs(&s.accs, &mut value);
                changes.puts.push((s.start, key.to_vec(), value));
            }
        }
        changes
    }

    fn restore(&mut self, start: EventTime, key: &[u8], end: EventTime, accs: Vec<Acc>) {
        let list = self.sessions.entry(key.into()).or_default();
        let at = list.partition_point(|s| s.start < start);
        list.insert(
            at,
            Session {
                start,
                end,
                accs: accs.into(),
                dirty: false,
                stored: Some(start),
                emitted: (self.common.mode != OutputMode::Append).then_some(start),
            },
        );
        self.open_sessions += 1;
    }
}

/// The keyed window operator of one query on one shard.
pub enum WindowOperator {
    Buckets(BucketOperator),
    Sessions(SessionOperator),
}

impl WindowOperator {
    pub fn new(query: &QueryConfig, source: &SourceConfig) -> Self {
        WindowOperator::with_shape(query, OutputShape::new(query, source))
    }

    /// With the query's output shape from the plan.
    pub fn with_shape(query: &QueryConfig, shape: OutputShape) -> Self {
        let common = Common {
            shape,
            lateness_us: query.allowed_lateness.as_micros() as i64,
            mode: query.output,
            closed_floor: EventTime::MIN,
        };
        match (query.window, Assigner::from_config(&query.window)) {
            (WindowConfig::Session { gap }, _) => WindowOperator::Sessions(SessionOperator {
                common,
                gap_us: gap.as_micros() as i64,
                sessions: KeyMap::default(),
                deletes: Vec::new(),
                retractions: Vec::new(),
                open_sessions: 0,
            }),
            (_, Some(assigner)) => WindowOperator::Buckets(BucketOperator {
                common,
                assigner,
                open: BTreeMap::new(),
                closed_windows_through: None,
                closed_through: None,
                close_pending: false,
                open_keys: 0,
            }),
            (_, None) => unreachable!("only session windows have no assigner"),
        }
    }

    fn common(&self) -> &Common {
        match self {
            WindowOperator::Buckets(b) => &b.common,
            WindowOperator::Sessions(s) => &s.common,
        }
    }

    pub fn specs(&self) -> &[AggSpec] {
        &self.common().shape.specs
    }

    /// After restoring state at watermark `watermark`: windows that closed at or before it
    /// were emitted by an earlier run and must not be emitted again. `stored_lateness_us`: the
    /// `allowed_lateness` that run closed them with, when the config has changed it since.
    /// Windows it closed stay closed (more lateness applies to open windows only); windows a
    /// lower lateness now covers close, and are emitted, at the next epoch.
    pub fn resume_at(&mut self, watermark: Option<EventTime>, stored_lateness_us: Option<i64>) {
        let Some(w) = watermark.filter(|w| *w > EventTime::MIN / 2) else { return };
        let lateness = stored_lateness_us.unwrap_or(self.common().lateness_us);
        match self {
            WindowOperator::Buckets(b) => {
                b.common.closed_floor = w.saturating_sub(lateness);
                if let Assigner::Panes { size, slide, offset, .. } = b.assigner {
                    b.closed_windows_through = Some(align(w.saturating_sub(size).saturating_sub(lateness), slide, offset));
                }
            }
            WindowOperator::Sessions(s) => s.common.closed_floor = w.saturating_sub(lateness),
        }
    }

    /// `Some((start, end))` of the window an event at `t` missed when it is late at
    /// `watermark`: a window it belongs to has closed (end + allowed lateness ≤ watermark). An
    /// event is counted in all its windows or in none, so a sliding window never holds part
    /// of the events its neighbours hold. For sessions: `t + lateness ≤ watermark`, which is
    /// exactly when the event could join or bridge a closed session.
    #[inline]
    pub fn late_window(&self, t: EventTime, watermark: EventTime) -> Option<(EventTime, EventTime)> {
        match self {
            WindowOperator::Buckets(b) => {
                let (start, end) = b.assigner.first_window(t);
                (end.saturating_add(b.common.lateness_us) <= watermark || end <= b.common.closed_floor).then_some((start, end))
            }
            WindowOperator::Sessions(s) => {
                (t.saturating_add(s.common.lateness_us) <= watermark || t <= s.common.closed_floor).then_some((t, t.saturating_add(s.gap_us)))
            }
        }
    }

    #[inline]
    pub fn update(&mut self, t: EventTime, key: &[u8], inputs: &[InSlot], blob: &[u8]) {
        match self {
            WindowOperator::Buckets(b) => b.update(t, key, inputs, blob),
            WindowOperator::Sessions(s) => s.update(t, key, inputs, blob),
        }
    }

    /// End of an epoch: rows for the sink (changed rows in update/complete modes, closed
    /// windows in append mode), then windows closed at `watermark` are dropped.
    pub fn finish_epoch(&mut self, prev_watermark: EventTime, watermark: EventTime, out: &mut Vec<OutputRow>) {
        let mode = self.common().mode;
        match self {
            WindowOperator::Buckets(b) => {
                if mode != OutputMode::Append {
                    b.emit_updates(prev_watermark, mode == OutputMode::Complete, out);
                }
                b.close_until(watermark, out);
            }
            WindowOperator::Sessions(s) => {
                if mode != OutputMode::Append {
                    s.emit_updates(mode == OutputMode::Complete, out);
                }
                s.close_until(watermark, out);
            }
        }
    }

    pub fn take_changes(&mut self) -> OperatorChanges {
        match self {
            WindowOperator::Buckets(b) => b.take_changes(),
            WindowOperator::Sessions(s) => s.take_changes(),
        }
    }

    /// Restores one stored entry (recovery).
    pub fn restore(&mut self, start: EventTime, key: &[u8], value: &[u8]) -> Result<(), String> {
        match self {
            WindowOperator::Buckets(b) => {
                let accs = decode_accs(&b.common.shape.specs, value).map_err(|e| e.to_string())?;
                b.restore(start, key, accs);
            }
            WindowOperator::Sessions(s) => {
                let Some((end, rest)) = value.split_first_chunk::<8>() else {
                    return Err("session state shorter than 8 bytes".into());
                };
                let accs = decode_accs(&s.common.shape.specs, rest).map_err(|e| e.to_string())?;
                s.restore(start, key, i64::from_le_bytes(*end), accs);
            }
        }
        Ok(())
    }

    /// Open windows (buckets or panes; sessions count one each).
    pub fn open_windows(&self) -> usize {
        match self {
            WindowOperator::Buckets(b) => b.open.len(),
            WindowOperator::Sessions(s) => s.open_sessions,
        }
    }

    /// Stored (bucket, key) entries.
    pub fn open_keys(&self) -> usize {
        match self {
            WindowOperator::Buckets(b) => b.open_keys,
            WindowOperator::Sessions(s) => s.open_sessions,
        }
    }
}

#[cfg(test)]
mod tests;
