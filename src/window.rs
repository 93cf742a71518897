//! Window assignment, aggregate state and the keyed window operator of one query on one shard.
//!
//! Open windows live in memory as `window start → (group key → accumulator)`, ordered by start
//! so that closing is "pop from the front". Each epoch the operator hands the accumulators it
//! changed, and the time range it closed, to the state store (see `state.rs`).

use std::collections::{BTreeMap, HashMap};

use xxhash_rust::xxh3::Xxh3DefaultBuilder;

use crate::config::{AggFn, FieldType, QueryConfig, SourceConfig, WindowConfig};
use crate::value::{EventTime, Num, Value};

/// Tumbling windows `[start, start + size)` aligned to the Unix epoch plus `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TumblingWindows {
    pub size_us: i64,
    pub offset_us: i64,
}

impl TumblingWindows {
    /// `None` for the other window kinds, which this operator does not run.
    pub fn from_config(window: &WindowConfig) -> Option<Self> {
        match window {
            WindowConfig::Tumbling { size, offset } => Some(TumblingWindows {
                size_us: size.as_micros() as i64,
                offset_us: offset.as_micros() as i64,
            }),
            WindowConfig::Sliding { .. } | WindowConfig::Session { .. } | WindowConfig::Global { .. } => None,
        }
    }

    /// Start of the one window containing `t`.
    #[inline]
    pub fn assign(&self, t: EventTime) -> EventTime {
        (t - self.offset_us).div_euclid(self.size_us) * self.size_us + self.offset_us
    }
}

/// What an aggregate reads and how it accumulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggSpec {
    pub func: AggFn,
    /// Type of the input field; `None` for `count` without a field.
    pub input: Option<FieldType>,
}

impl AggSpec {
    pub fn for_query(query: &QueryConfig, source: &SourceConfig) -> Vec<AggSpec> {
        query
            .aggregates
            .iter()
            .map(|a| AggSpec {
                func: a.func,
                input: a.field_index.map(|i| source.schema[i].ty),
            })
            .collect()
    }

    /// Output type of this aggregate.
    pub fn output_type(&self) -> FieldType {
        match (self.func, self.input) {
            (AggFn::Count | AggFn::CountDistinct | AggFn::ApproxCountDistinct, _) => FieldType::Int,
            (AggFn::Avg | AggFn::VarSamp | AggFn::VarPop | AggFn::StddevSamp | AggFn::StddevPop | AggFn::ApproxPercentile, _) => FieldType::Float,
            (AggFn::Sum, Some(FieldType::Float)) => FieldType::Float,
            (AggFn::Sum, _) => FieldType::Int,
            (AggFn::Min | AggFn::Max | AggFn::First | AggFn::Last, Some(t)) => t,
            (AggFn::Min | AggFn::Max | AggFn::First | AggFn::Last, None) => FieldType::Int,
        }
    }
}

/// Accumulator of one aggregate: `n` inputs seen, an integer and a float register whose use
/// depends on the function. Fixed 24 bytes, so state encodes without a schema.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AggState {
    pub n: i64,
    pub i: i64,
    pub f: f64,
}

pub const AGG_STATE_BYTES: usize = 24;

impl AggState {
    #[inline]
    pub fn update(&mut self, spec: AggSpec, x: Num) {
        if spec.input.is_some() && x == Num::Null {
            return;
        }
        let first = self.n == 0;
        self.n += 1;
        match (spec.func, x) {
            (AggFn::Count, _) => {}
            // Integer sums wrap on overflow (as Spark does outside ANSI mode).
            (AggFn::Sum, Num::Int(v)) => self.i = self.i.wrapping_add(v),
            (AggFn::Sum | AggFn::Avg, Num::Float(v)) => self.f += v,
            (AggFn::Avg, Num::Int(v)) => self.f += v as f64,
            (AggFn::Min, Num::Int(v)) => self.i = if first { v } else { self.i.min(v) },
            (AggFn::Max, Num::Int(v)) => self.i = if first { v } else { self.i.max(v) },
            (AggFn::Min, Num::Float(v)) => self.f = if first { v } else { self.f.min(v) },
            (AggFn::Max, Num::Float(v)) => self.f = if first { v } else { self.f.max(v) },
            (_, Num::Null) => {}
            // Not computed by this operator: daemon::start refuses queries that use them.
            (
                AggFn::VarSamp
                | AggFn::VarPop
                | AggFn::StddevSamp
                | AggFn::StddevPop
                | AggFn::CountDistinct
                | AggFn::ApproxCountDistinct
                | AggFn::ApproxPercentile
                | AggFn::First
                | AggFn::Last,
                _,
            ) => {}
        }
    }

    pub fn result(&self, spec: AggSpec) -> Value {
        if spec.func == AggFn::Count {
            return Value::Int(self.n);
        }
        if self.n == 0 {
            return Value::Null;
        }
        let float_input = matches!(spec.input, Some(FieldType::Float));
        match spec.func {
            AggFn::Count => unreachable!(),
            AggFn::Avg => Value::Float(self.f / self.n as f64),
            AggFn::Sum | AggFn::Min | AggFn::Max if float_input => Value::Float(self.f),
            AggFn::Min | AggFn::Max if spec.input == Some(FieldType::Timestamp) => Value::Time(self.i),
            AggFn::Sum | AggFn::Min | AggFn::Max => Value::Int(self.i),
            // Not computed by this operator: daemon::start refuses queries that use them.
            AggFn::VarSamp
            | AggFn::VarPop
            | AggFn::StddevSamp
            | AggFn::StddevPop
            | AggFn::CountDistinct
            | AggFn::ApproxCountDistinct
            | AggFn::ApproxPercentile
            | AggFn::First
            | AggFn::Last => Value::Null,
        }
    }

    pub fn encode(states: &[AggState], out: &mut Vec<u8>) {
        for s in states {
            out.extend_from_slice(&s.n.to_le_bytes());
            out.extend_from_slice(&s.i.to_le_bytes());
            out.extend_from_slice(&s.f.to_le_bytes());
        }
    }

    pub fn decode(bytes: &[u8]) -> Option<Vec<AggState>> {
        if !bytes.len().is_multiple_of(AGG_STATE_BYTES) {
            return None;
        }
        let word = |c: &[u8], k: usize| <[u8; 8]>::try_from(&c[k * 8..k * 8 + 8]).unwrap();
        Some(
            bytes
                .chunks_exact(AGG_STATE_BYTES)
                .map(|c| AggState {
                    n: i64::from_le_bytes(word(c, 0)),
                    i: i64::from_le_bytes(word(c, 1)),
                    f: f64::from_le_bytes(word(c, 2)),
                })
                .collect(),
        )
    }
}

#[derive(Debug, Clone)]
struct Acc {
    dirty: bool,
    aggs: Box<[AggState]>,
}

/// A window that closed: final aggregates for one group key.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClosedWindow {
    pub window_start: EventTime,
    pub window_end: EventTime,
    pub key: Vec<u8>,
    pub aggs: Vec<Value>,
}

type KeyMap = HashMap<Box<[u8]>, Acc, Xxh3DefaultBuilder>;

/// Keyed tumbling-window state of one query on one shard.
pub struct WindowOperator {
    pub windows: TumblingWindows,
    pub lateness_us: i64,
    pub specs: Vec<AggSpec>,
    open: BTreeMap<EventTime, KeyMap>,
    /// Highest window start closed so far; `close_pending` when not yet handed to the state store.
    closed_through: Option<EventTime>,
    close_pending: bool,
    open_keys: usize,
}

/// State changes of one operator in one epoch.
#[derive(Debug, Default)]
pub struct OperatorChanges {
    /// (window start, group key, encoded accumulators) of windows changed and still open.
    pub puts: Vec<(EventTime, Vec<u8>, Vec<u8>)>,
    /// Every window with start ≤ this value is closed and can be deleted.
    pub closed_through: Option<EventTime>,
}

impl WindowOperator {
    /// `None` when the query's window is not tumbling (not run by this operator).
    pub fn new(query: &QueryConfig, source: &SourceConfig) -> Option<Self> {
        Some(WindowOperator {
            windows: TumblingWindows::from_config(&query.window)?,
            lateness_us: query.allowed_lateness.as_micros() as i64,
            specs: AggSpec::for_query(query, source),
            open: BTreeMap::new(),
            closed_through: None,
            close_pending: false,
            open_keys: 0,
        })
    }

    /// True when the window holding `t` is already closed at pipeline watermark `watermark`.
    #[inline]
    pub fn is_late(&self, t: EventTime, watermark: EventTime) -> bool {
        let start = self.windows.assign(t);
        self.closes_at(start) <= watermark
    }

    #[inline]
    fn closes_at(&self, start: EventTime) -> EventTime {
        start.saturating_add(self.windows.size_us).saturating_add(self.lateness_us)
    }

    #[inline]
    pub fn update(&mut self, t: EventTime, key: &[u8], inputs: &[Num]) {
        let start = self.windows.assign(t);
        let keys = self.open.entry(start).or_default();
        let acc = match keys.get_mut(key) {
            Some(acc) => acc,
            None => {
                self.open_keys += 1;
                keys.entry(key.into()).or_insert_with(|| Acc {
                    dirty: true,
                    aggs: vec![AggState::default(); self.specs.len()].into(),
                })
            }
        };
        acc.dirty = true;
        for ((state, spec), x) in acc.aggs.iter_mut().zip(&self.specs).zip(inputs) {
            state.update(*spec, *x);
        }
    }

    /// Restores one window from the state store (recovery).
    pub fn restore(&mut self, start: EventTime, key: &[u8], aggs: Vec<AggState>) {
        if self
            .open
            .entry(start)
            .or_default()
            .insert(
                key.into(),
                Acc {
                    dirty: false,
                    aggs: aggs.into(),
                },
            )
            .is_none()
        {
            self.open_keys += 1;
        }
    }

    /// Closes every window whose end + allowed lateness ≤ `watermark`, in start order.
    pub fn close_until(&mut self, watermark: EventTime, out: &mut Vec<ClosedWindow>) {
        if watermark <= EventTime::MIN / 2 {
            return; // no watermark yet
        }
        // The last window start that is closed at this watermark (opened or not).
        let last = self
            .windows
            .assign(watermark.saturating_sub(self.windows.size_us).saturating_sub(self.lateness_us));
        while let Some(entry) = self.open.first_entry() {
            let start = *entry.key();
            if start > last {
                break;
            }
            let keys = entry.remove();
            self.open_keys -= keys.len();
            let mut rows: Vec<ClosedWindow> = keys
                .into_iter()
                .map(|(key, acc)| ClosedWindow {
                    window_start: start,
                    window_end: start + self.windows.size_us,
                    key: key.into_vec(),
                    aggs: acc.aggs.iter().zip(&self.specs).map(|(s, spec)| s.result(*spec)).collect(),
                })
                .collect();
            rows.sort_by(|a, b| a.key.cmp(&b.key));
            out.extend(rows);
        }
        if self.closed_through.is_none_or(|c| last > c) {
            self.closed_through = Some(last);
            self.close_pending = true;
        }
    }

    /// Takes the changes since the last call: dirty open windows and the closed range.
    pub fn take_changes(&mut self) -> OperatorChanges {
        let closed_through = if std::mem::take(&mut self.close_pending) { self.closed_through } else { None };
        let mut changes = OperatorChanges {
            puts: Vec::new(),
            closed_through,
        };
        for (start, keys) in &mut self.open {
            for (key, acc) in keys.iter_mut().filter(|(_, a)| a.dirty) {
                acc.dirty = false;
                let mut value = Vec::with_capacity(acc.aggs.len() * AGG_STATE_BYTES);
                AggState::encode(&acc.aggs, &mut value);
                changes.puts.push((*start, key.to_vec(), value));
            }
        }
        changes
    }

    pub fn open_windows(&self) -> usize {
        self.open.len()
    }

    pub fn open_keys(&self) -> usize {
        self.open_keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Naive model: the window containing t is the unique aligned [s, s+size) with s ≤ t < s+size.
        #[test]
        fn tumbling_assignment_matches_model(t in -10_000_000_000i64..10_000_000_000, size in 1i64..100_000_000, offset_frac in 0.0f64..1.0) {
            let offset = (size as f64 * offset_frac) as i64 % size;
            let w = TumblingWindows { size_us: size, offset_us: offset };
            let s = w.assign(t);
            prop_assert!(s <= t && t < s + size);
            prop_assert_eq!((s - offset).rem_euclid(size), 0);
        }

        /// Operator vs. a naive model over random events and watermark steps.
        #[test]
        fn operator_emits_model_rows(events in proptest::collection::vec((0i64..50_000, 0u8..4, -5i64..5), 1..200), cuts in proptest::collection::vec(0i64..60_000, 1..6)) {
            let specs = vec![AggSpec { func: AggFn::Count, input: None }, AggSpec { func: AggFn::Sum, input: Some(FieldType::Int) }, AggSpec { func: AggFn::Max, input: Some(FieldType::Int) }];
            let mut op = WindowOperator { windows: TumblingWindows { size_us: 10_000, offset_us: 0 }, lateness_us: 0, specs, open: BTreeMap::new(), closed_through: None, close_pending: false, open_keys: 0 };
            let mut cuts = cuts; cuts.sort();
            let mut wm = i64::MIN;
            let mut emitted = Vec::new();
            let mut model: BTreeMap<(i64, Vec<u8>), (i64, i64, i64)> = BTreeMap::new();
            let per_cut = events.len() / cuts.len() + 1;
            for (chunk, cut) in events.chunks(per_cut).zip(&cuts) {
                for &(t, k, x) in chunk {
                    if op.is_late(t, wm) { continue; }
                    op.update(t, &[k], &[Num::Null, Num::Int(x), Num::Int(x)]);
                    let e = model.entry(((t / 10_000) * 10_000, vec![k])).or_insert((0, 0, i64::MIN));
                    e.0 += 1; e.1 += x; e.2 = e.2.max(x);
                }
                wm = wm.max(*cut);
                op.close_until(wm, &mut emitted);
            }
            let expected: Vec<ClosedWindow> = model.into_iter().filter(|((s, _), _)| s + 10_000 <= wm).map(|((s, k), (c, sum, max))| ClosedWindow { window_start: s, window_end: s + 10_000, key: k, aggs: vec![Value::Int(c), Value::Int(sum), Value::Int(max)] }).collect();
            prop_assert_eq!(emitted, expected);
        }
    }

    #[test]
    fn aggregates_and_state_round_trip() {
        let f = |func, input| AggSpec { func, input };
        let cases = [
            (f(AggFn::Count, Some(FieldType::Float)), vec![Num::Float(1.0), Num::Null], Value::Int(1)),
            (f(AggFn::Sum, Some(FieldType::Float)), vec![Num::Float(1.5), Num::Float(2.0)], Value::Float(3.5)),
            (
                f(AggFn::Min, Some(FieldType::Float)),
                vec![Num::Float(1.5), Num::Float(-2.0)],
                Value::Float(-2.0),
            ),
            (f(AggFn::Max, Some(FieldType::Int)), vec![Num::Int(-7), Num::Int(-3)], Value::Int(-3)),
            (f(AggFn::Avg, Some(FieldType::Int)), vec![Num::Int(1), Num::Int(2)], Value::Float(1.5)),
            (f(AggFn::Avg, Some(FieldType::Int)), vec![Num::Null], Value::Null),
        ];
        for (spec, inputs, expected) in cases {
            let mut s = AggState::default();
            inputs.into_iter().for_each(|x| s.update(spec, x));
            let mut buf = Vec::new();
            AggState::encode(&[s], &mut buf);
            let back = AggState::decode(&buf).unwrap();
            assert_eq!(back[0].result(spec), expected, "{spec:?}");
        }
        assert!(AggState::decode(&[0; 5]).is_none());
    }

    #[test]
    fn changes_report_dirty_windows_once_and_closed_range() {
        let specs = vec![AggSpec {
            func: AggFn::Count,
            input: None,
        }];
        let mut op = WindowOperator {
            windows: TumblingWindows { size_us: 10, offset_us: 0 },
            lateness_us: 5,
            specs,
            open: BTreeMap::new(),
            closed_through: None,
            close_pending: false,
            open_keys: 0,
        };
        op.update(3, b"a", &[Num::Null]);
        op.update(13, b"a", &[Num::Null]);
        assert_eq!(op.take_changes().puts.len(), 2);
        assert!(op.take_changes().puts.is_empty());
        let mut out = Vec::new();
        op.close_until(14, &mut out); // window [0,10) closes at 10 + 5 = 15
        assert!(out.is_empty());
        op.close_until(15, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(op.take_changes().closed_through, Some(0));
        assert_eq!(op.open_keys(), 1);
        assert!(op.is_late(9, 15) && !op.is_late(10, 15));
    }
}
