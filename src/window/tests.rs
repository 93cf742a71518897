//! Window operators against naive models: random events with disorder, random watermark
//! progress; the rows emitted (append) or the table they maintain (update, complete) must equal
//! what the model computes from the same accepted events.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::types::encode_key_str;

/// count(), sum(x), max(x), first(x) by event time.
fn specs() -> Vec<AggSpec> {
    vec![
        AggSpec {
            func: AggFunc::Count,
            input: None,
        },
        AggSpec {
            func: AggFunc::Sum,
            input: Some(FieldType::Int),
        },
        AggSpec {
            func: AggFunc::Max,
            input: Some(FieldType::Int),
        },
        AggSpec {
            func: AggFunc::First,
            input: Some(FieldType::Int),
        },
    ]
}

fn common(lateness: i64, mode: OutputMode) -> Common {
    let specs = specs();
    Common {
        shape: OutputShape {
            value_types: specs.iter().map(AggSpec::output_type).collect(),
            specs,
            key_types: vec![FieldType::String],
            derived: vec![],
            value_names: vec![],
        },
        lateness_us: lateness,
        mode,
        closed_floor: EventTime::MIN,
    }
}

fn key(k: u8) -> Vec<u8> {
    let mut out = Vec::new();
    encode_key_str(&mut out, format!("k{k}").as_bytes());
    out
}

fn inputs(x: i64, blob: &mut Vec<u8>) -> Vec<InSlot> {
    blob.clear();
    encode_key_value(blob, &Value::Int(x));
    vec![
        InSlot::Null,
        InSlot::Int(x),
        InSlot::Int(x),
        InSlot::Bytes {
            start: 0,
            end: blob.len() as u32,
        },
    ]
}

use crate::types::encode_key_value;

/// Model aggregate over accepted events of one window: (count, sum, max, first by (t, x)).
#[derive(Debug, Clone, Copy, PartialEq)]
struct ModelAgg {
    count: i64,
    sum: i64,
    max: i64,
    first: (i64, i64),
}

impl ModelAgg {
    fn new(t: i64, x: i64) -> Self {
        ModelAgg {
            count: 1,
            sum: x,
            max: x,
            first: (t, x),
        }
    }
    fn add(&mut self, t: i64, x: i64) {
        self.count += 1;
        self.sum += x;
        self.max = self.max.max(x);
        // Ties in event time are broken by the encoded value bytes; for non-negative ints
        // below 2^63 the little-endian encoding does not sort numerically, so compare the
        // bytes the same way the accumulator does.
        let enc = |v: i64| {
            let mut b = Vec::new();
            encode_key_value(&mut b, &Value::Int(v));
            b
        };
        if (t, enc(x)) < (self.first.0, enc(self.first.1)) {
            self.first = (t, x);
        }
    }
    fn values(&self) -> Vec<Value> {
        vec![Value::Int(self.count), Value::Int(self.sum), Value::Int(self.max), Value::Int(self.first.1)]
    }
}

type Event = (i64, u8, i64);

/// Rows emitted per epoch, the model's rows per (window, key) after each epoch, and the final
/// watermark.
type SlidingRun = (Vec<Vec<OutputRow>>, Vec<BTreeMap<(i64, Vec<u8>), ModelAgg>>, i64);

fn panes_operator(size: i64, slide: i64, lateness: i64, mode: OutputMode) -> BucketOperator {
    BucketOperator {
        common: common(lateness, mode),
        assigner: Assigner::Panes {
            size,
            slide,
            pane: gcd(size, slide),
            offset: 0,
        },
        open: BTreeMap::new(),
        closed_windows_through: None,
        closed_through: None,
        close_pending: false,
        open_keys: 0,
    }
}

/// Windows `[s, s + size)` containing t, aligned to `slide`.
fn windows_of(t: i64, size: i64, slide: i64) -> Vec<i64> {
    let mut out = Vec::new();
    let mut s = align(t, slide, 0);
    while s > t - size {
        out.push(s);
        s -= slide;
    }
    out
}

/// Runs `events` in chunks through a sliding-window operator; returns (emitted rows per epoch,
/// the model's rows per window after each epoch, the final watermark).
fn run_sliding(events: &[Event], cuts: &[i64], size: i64, slide: i64, lateness: i64, mode: OutputMode) -> SlidingRun {
    let mut op = WindowOperator::Buckets(panes_operator(size, slide, lateness, mode));
    let mut model: BTreeMap<(i64, Vec<u8>), ModelAgg> = BTreeMap::new();
    let mut wm = i64::MIN;
    let mut epochs = Vec::new();
    let mut models = Vec::new();
    let per_cut = events.len() / cuts.len() + 1;
    let mut blob = Vec::new();
    for (chunk, cut) in events.chunks(per_cut).zip(cuts) {
        for &(t, k, x) in chunk {
            if op.late_window(t, wm).is_some() {
                // Model: late exactly when a window holding t has closed.
                assert!(windows_of(t, size, slide).iter().any(|s| s + size + lateness <= wm));
                continue;
            }
            assert!(
                windows_of(t, size, slide).iter().all(|s| s + size + lateness > wm),
                "{t} is in a closed window but was not late"
            );
            let ins = inputs(x, &mut blob);
            op.update(t, &key(k), &ins, &blob);
            for s in windows_of(t, size, slide) {
                if s + size + lateness > wm {
                    model.entry((s, key(k))).and_modify(|m| m.add(t, x)).or_insert(ModelAgg::new(t, x));
                }
            }
        }
        let prev = wm;
        wm = wm.max(*cut);
        let mut rows = Vec::new();
        op.finish_epoch(prev, wm, &mut rows);
        op.take_changes();
        epochs.push(rows);
        models.push(model.clone());
    }
    (epochs, models, wm)
}

fn row_of(s: i64, size: i64, k: &[u8], m: &ModelAgg) -> OutputRow {
    OutputRow {
        window_start: s,
        window_end: s + size,
        key: k.to_vec(),
        values: m.values(),
        retract: false,
    }
}

fn sessions_model(events: &[(i64, i64)], gap: i64) -> Vec<(i64, i64, ModelAgg)> {
    let mut sorted = events.to_vec();
    sorted.sort();
    let mut out: Vec<(i64, i64, ModelAgg)> = Vec::new();
    for (t, x) in sorted {
        match out.last_mut() {
            Some((_, end, m)) if t < *end => {
                *end = (*end).max(t + gap);
                m.add(t, x);
            }
            _ => out.push((t, t + gap, ModelAgg::new(t, x))),
        }
    }
    out
}

fn session_operator(gap: i64, lateness: i64, mode: OutputMode) -> WindowOperator {
    WindowOperator::Sessions(SessionOperator {
        common: common(lateness, mode),
        gap_us: gap,
        sessions: KeyMap::default(),
        deletes: Vec::new(),
        retractions: Vec::new(),
        open_sessions: 0,
    })
}

/// Applies one epoch's rows to an upserted table keyed by (window start, key).
fn upsert(table: &mut BTreeMap<(i64, Vec<u8>), OutputRow>, rows: Vec<OutputRow>) {
    for r in rows {
        if r.retract {
            table.remove(&(r.window_start, r.key.clone()));
        } else {
            table.insert((r.window_start, r.key.clone()), r);
        }
    }
}

fn events_strategy() -> impl Strategy<Value = (Vec<Event>, Vec<i64>)> {
    (
        proptest::collection::vec((0i64..60_000, 0u8..3, -5i64..50), 1..150),
        proptest::collection::vec(0i64..80_000, 1..8),
    )
        .prop_map(|(events, mut cuts)| {
            cuts.sort();
            (events, cuts)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn sliding_append_emits_model_rows((events, cuts) in events_strategy(), slide_k in 1i64..5, panes in 1i64..4, lateness in prop_oneof![Just(0i64), Just(3_000i64)]) {
        let slide = 1_000 * slide_k;
        let size = slide * panes + if panes > 1 { 500 } else { 0 };
        let (epochs, models, wm) = run_sliding(&events, &cuts, size, slide, lateness, OutputMode::Append);
        let model = models.last().unwrap();
        let emitted: Vec<OutputRow> = epochs.into_iter().flatten().collect();
        let expected: Vec<OutputRow> = model.iter().filter(|((s, _), _)| s + size + lateness <= wm).map(|((s, k), m)| row_of(*s, size, k, m)).collect();
        prop_assert_eq!(emitted, expected);
    }

    #[test]
    fn sliding_update_table_equals_model_after_every_epoch((events, cuts) in events_strategy(), slide_k in 1i64..4, panes in 1i64..4) {
        let slide = 1_000 * slide_k;
        let size = slide * panes;
        let (epochs, models, _) = run_sliding(&events, &cuts, size, slide, 0, OutputMode::Update);
        let mut table = BTreeMap::new();
        for (rows, model) in epochs.into_iter().zip(&models) {
            upsert(&mut table, rows);
            let expected: BTreeMap<(i64, Vec<u8>), OutputRow> = model.iter().map(|((s, k), m)| ((*s, k.clone()), row_of(*s, size, k, m))).collect();
            prop_assert_eq!(&table, &expected);
        }
    }

    #[test]
    fn complete_mode_emits_the_whole_model_each_epoch((events, cuts) in events_strategy()) {
        // Tumbling: `complete` with sliding windows is refused by the config compiler.
        let (size, slide) = (4_000, 4_000);
        let (epochs, models, _) = run_sliding(&events, &cuts, size, slide, 0, OutputMode::Complete);
        let model = models.last().unwrap();
        // The last epoch's output is the whole result.
        let last: BTreeMap<(i64, Vec<u8>), OutputRow> = epochs.last().unwrap().iter().map(|r| ((r.window_start, r.key.clone()), r.clone())).collect();
        let expected: BTreeMap<(i64, Vec<u8>), OutputRow> = model.iter().map(|((s, k), m)| ((*s, k.clone()), row_of(*s, size, k, m))).collect();
        prop_assert_eq!(last, expected);
    }

    #[test]
    fn sessions_match_model_in_append_and_update((events, cuts) in events_strategy(), gap in 500i64..6_000, lateness in prop_oneof![Just(0i64), Just(2_000i64)]) {
        for mode in [OutputMode::Append, OutputMode::Update] {
            let mut op = session_operator(gap, lateness, mode);
            let mut accepted: BTreeMap<Vec<u8>, Vec<(i64, i64)>> = BTreeMap::new();
            let mut wm = i64::MIN;
            let mut emitted = Vec::new();
            let mut table = BTreeMap::new();
            let per_cut = events.len() / cuts.len() + 1;
            let mut blob = Vec::new();
            for (chunk, cut) in events.chunks(per_cut).zip(&cuts) {
                for &(t, k, x) in chunk {
                    if op.late_window(t, wm).is_some() {
                        prop_assert!(t + lateness <= wm);
                        continue;
                    }
                    let ins = inputs(x, &mut blob);
                    op.update(t, &key(k), &ins, &blob);
                    accepted.entry(key(k)).or_default().push((t, x));
                }
                let prev = wm;
                wm = wm.max(*cut);
                let mut rows = Vec::new();
                op.finish_epoch(prev, wm, &mut rows);
                op.take_changes();
                if mode == OutputMode::Update {
                    upsert(&mut table, rows);
                    // The table holds exactly the model's sessions of all accepted events.
                    let expected: BTreeMap<(i64, Vec<u8>), OutputRow> = accepted.iter().flat_map(|(k, evs)| {
                        sessions_model(evs, gap).into_iter().map(move |(s, e, m)| ((s, k.clone()), OutputRow { window_start: s, window_end: e, key: k.clone(), values: m.values(), retract: false }))
                    }).collect();
                    prop_assert_eq!(&table, &expected);
                } else {
                    emitted.extend(rows);
                }
            }
            if mode == OutputMode::Append {
                let mut expected: Vec<OutputRow> = accepted.iter().flat_map(|(k, evs)| {
                    sessions_model(evs, gap).into_iter().filter(|(_, e, _)| e + lateness <= wm).map(move |(s, e, m)| OutputRow { window_start: s, window_end: e, key: k.clone(), values: m.values(), retract: false })
                }).collect();
                expected.sort_by(|a, b| (a.window_start, &a.key).cmp(&(b.window_start, &b.key)));
                emitted.sort_by(|a, b| (a.window_start, &a.key).cmp(&(b.window_start, &b.key)));
                prop_assert_eq!(emitted, expected);
            }
        }
    }

    /// Calendar periods against chrono.
    #[test]
    fn calendar_periods_match_chrono(t in -4_000_000_000_000_000i64..4_000_000_000_000_000) {
        use chrono::{Datelike, TimeZone, Timelike};
        let dt = chrono::Utc.timestamp_micros(t).unwrap();
        let day = dt.date_naive();
        let micros = |d: chrono::NaiveDate| d.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp_micros();
        let month = day.with_day(1).unwrap();
        let year = day.with_ordinal(1).unwrap();
        let week = day - chrono::Duration::days(day.weekday().num_days_from_monday() as i64);
        prop_assert_eq!(calendar_start(t, CalendarUnit::Day), micros(day));
        prop_assert_eq!(calendar_start(t, CalendarUnit::Month), micros(month));
        prop_assert_eq!(calendar_start(t, CalendarUnit::Year), micros(year));
        prop_assert_eq!(calendar_start(t, CalendarUnit::Week), micros(week));
        prop_assert_eq!(calendar_start(t, CalendarUnit::Hour), micros(day) + dt.hour() as i64 * HOUR_US);
        let next_month = if month.month() == 12 { month.with_year(month.year() + 1).unwrap().with_month(1).unwrap() } else { month.with_month(month.month() + 1).unwrap() };
        prop_assert_eq!(calendar_next(micros(month), CalendarUnit::Month), micros(next_month));
        prop_assert_eq!(calendar_next(micros(year), CalendarUnit::Year), micros(year.with_year(year.year() + 1).unwrap()));
    }
}

#[test]
fn a_sliding_event_updates_one_pane() {
    // 10-minute windows every 5 minutes (the rolling-metrics example): one pane per event.
    let mut op = panes_operator(600, 300, 0, OutputMode::Append);
    let mut blob = Vec::new();
    let ins = inputs(1, &mut blob);
    op.update(310, &key(0), &ins, &blob);
    assert_eq!((op.open.len(), op.open_keys), (1, 1));
    let mut rows = Vec::new();
    op.close_until(900, &mut rows);
    // Windows [0, 600) and [300, 900) both hold the event and both closed at 900.
    assert_eq!(rows.iter().map(|r| r.window_start).collect::<Vec<_>>(), vec![0, 300]);
    assert!(op.open.is_empty());
}

#[test]
fn merged_sessions_are_retracted_and_deleted_from_state() {
    let mut op = session_operator(10, 0, OutputMode::Update);
    let mut blob = Vec::new();
    let ins = inputs(1, &mut blob);
    op.update(0, &key(0), &ins, &blob);
    op.update(30, &key(0), &ins, &blob);
    let mut rows = Vec::new();
    op.finish_epoch(i64::MIN, i64::MIN, &mut rows);
    assert_eq!(rows.len(), 2);
    let changes = op.take_changes();
    assert_eq!(changes.puts.len(), 2);
    // Gap 10: sessions [0, 10) and [30, 40).
    op.update(25, &key(0), &ins, &blob); // joins [30, 40) → [25, 40)
    op.update(9, &key(0), &ins, &blob); // joins [0, 10) → [0, 19)
    op.update(18, &key(0), &ins, &blob); // [18, 28) bridges [0, 19) and [25, 40) → [0, 40)
    let mut rows = Vec::new();
    op.finish_epoch(i64::MIN, i64::MIN, &mut rows);
    // The session stored and emitted under start 30 is retracted; start 0 is re-emitted.
    let retracted: Vec<i64> = rows.iter().filter(|r| r.retract).map(|r| r.window_start).collect();
    assert_eq!(retracted, vec![30]);
    let live: Vec<(i64, i64, Value)> = rows
        .iter()
        .filter(|r| !r.retract)
        .map(|r| (r.window_start, r.window_end, r.values[0].clone()))
        .collect();
    assert_eq!(live, vec![(0, 40, Value::Int(5))]);
    let changes = op.take_changes();
    assert_eq!(changes.deletes, vec![(30, key(0))]);
    assert_eq!(changes.puts.len(), 1);
}

#[test]
fn state_round_trips_through_restore() {
    let mut op = WindowOperator::Buckets(panes_operator(600, 300, 0, OutputMode::Append));
    let mut blob = Vec::new();
    let ins = inputs(7, &mut blob);
    op.update(10, &key(1), &ins, &blob);
    op.update(320, &key(1), &ins, &blob);
    let changes = op.take_changes();
    let mut restored = WindowOperator::Buckets(panes_operator(600, 300, 0, OutputMode::Append));
    for (start, k, v) in &changes.puts {
        restored.restore(*start, k, v).unwrap();
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    op.finish_epoch(i64::MIN, 2_000, &mut a);
    restored.finish_epoch(i64::MIN, 2_000, &mut b);
    assert_eq!(a, b);
    assert_eq!(a.len(), 3);
    assert!(restored.restore(0, &key(1), &[1, 2, 3]).is_err());
}

#[test]
fn resume_does_not_emit_windows_closed_before_the_restart() {
    // Pane [300, 600) belongs to windows [0, 600) (closed at 600) and [300, 900) (open).
    let mut op = WindowOperator::Buckets(panes_operator(600, 300, 0, OutputMode::Append));
    let mut blob = Vec::new();
    let ins = inputs(7, &mut blob);
    op.update(310, &key(1), &ins, &blob);
    let changes = op.take_changes();
    let mut restored = WindowOperator::Buckets(panes_operator(600, 300, 0, OutputMode::Append));
    for (start, k, v) in &changes.puts {
        restored.restore(*start, k, v).unwrap();
    }
    restored.resume_at(Some(600), None);
    let mut rows = Vec::new();
    restored.finish_epoch(600, 900, &mut rows);
    assert_eq!(rows.iter().map(|r| r.window_start).collect::<Vec<_>>(), vec![300]);
}

/// A restart with another `allowed_lateness`: windows the earlier run closed (under its
/// lateness) stay closed when it is raised; when it is lowered, the windows it newly covers
/// are emitted at the next epoch, not dropped.
#[test]
fn a_changed_lateness_never_reopens_or_drops_a_closed_window() {
    // Tumbling 300, stored lateness 200, watermark 1000: windows ending at or before 800
    // were closed (and emitted) by the earlier run; [600, 900) is still open.
    let restore_with = |lateness: i64| {
        let mut op = WindowOperator::Buckets(panes_operator(300, 300, lateness, OutputMode::Append));
        let mut blob = Vec::new();
        let ins = inputs(1, &mut blob);
        op.update(650, &key(1), &ins, &blob);
        let changes = op.take_changes();
        let mut restored = WindowOperator::Buckets(panes_operator(300, 300, lateness, OutputMode::Append));
        for (start, k, v) in &changes.puts {
            restored.restore(*start, k, v).unwrap();
        }
        restored.resume_at(Some(1_000), Some(200));
        restored
    };
    // Raised to 600: an event in [300, 600) (closed at 800 ≤ 1000 - 200) is still late,
    // though 600 + 600 > 1000; [600, 900) stays open as before.
    let raised = restore_with(600);
    assert_eq!(raised.late_window(400, 1_000), Some((300, 600)));
    assert_eq!(raised.late_window(650, 1_000), None);
    // Lowered to 0: [600, 900) ends before 1000 and is emitted at the next epoch.
    let mut lowered = restore_with(0);
    let mut rows = Vec::new();
    lowered.finish_epoch(1_000, 1_000, &mut rows);
    assert_eq!(rows.iter().map(|r| r.window_start).collect::<Vec<_>>(), vec![600]);
}
