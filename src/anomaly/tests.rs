//! The anomaly operator against hand-computed cases and against a naive model: random
//! readings with disorder, random watermark progress; the rows emitted must be the model's
//! (computed by brute force from the accepted readings), each in the epoch its statistics
//! became final; the state tables, fed only `take_writes`, must mirror the operator, and an
//! operator restored from them must go on exactly like the one that was not interrupted.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::types::encode_key_str;

fn key(k: u8) -> Vec<u8> {
    let mut out = Vec::new();
    encode_key_str(&mut out, format!("k{k}").as_bytes());
    out
}

fn spec(mode: AnomalyMode, size: i64, slide: i64, threshold: f64, min_count: u64) -> AnomalySpec {
    AnomalySpec {
        mode,
        size,
        slide,
        threshold,
        min_count,
    }
}

/// Mean and sample standard deviation, directly.
fn mean_stddev(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let m2: f64 = xs.iter().map(|x| (x - mean) * (x - mean)).sum();
    (mean, (m2 / (n - 1.0)).sqrt())
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn float(v: &Value) -> f64 {
    match v {
        Value::Float(x) => *x,
        other => panic!("expected a float, got {other:?}"),
    }
}

/// Asserts `row` is the anomaly row of reading `x` at `t` of key `k` in window `[start, end)`,
/// whose readings are `window`.
fn assert_row(row: &OutputRow, mode: AnomalyMode, (start, end): (i64, i64), k: u8, t: i64, x: f64, window: &[f64]) {
    let (mean, sigma) = mean_stddev(window);
    assert_eq!((row.window_start, row.window_end, row.retract), (start, end, false));
    assert!(row.key.is_empty());
    let values = match mode {
        AnomalyMode::Containing => {
            assert_eq!(&row.values[..2], &[Value::Time(start), Value::Time(end)]);
            &row.values[2..]
        }
        AnomalyMode::Trailing => &row.values[..],
    };
    assert_eq!(values.len(), 6, "{values:?}");
    assert_eq!(values[0], Value::Str(format!("k{k}")));
    assert_eq!(values[1], Value::Float(x));
    assert_eq!(values[2], Value::Time(t));
    assert!(close(float(&values[3]), mean), "mean {values:?} vs {mean}");
    assert!(close(float(&values[4]), sigma), "stddev {values:?} vs {sigma}");
    assert!(close(float(&values[5]), (x - mean) / sigma), "z {values:?}");
}

/// A steady series 10, 12, 10, 12, … at `base + 0..10` (one reading per µs).
fn steady(base: i64) -> Vec<(i64, f64)> {
    (0..10).map(|i| (base + i, if i % 2 == 0 { 10.0 } else { 12.0 })).collect()
}

fn finish(op: &mut AnomalyOperator, prev: i64, w: i64) -> Vec<OutputRow> {
    let mut out = Vec::new();
    op.finish_epoch(prev, w, &mut out);
    op.take_writes();
    out
}

/// A spike after a steady series, trailing windows of 10 every 5, starting at `base`.
fn trailing_spike_is_flagged_once_when_final(base: i64) {
    let mut op = AnomalyOperator::new(spec(AnomalyMode::Trailing, 10, 5, 3.0, 2));
    let k = key(0);
    let series = steady(base);
    // Epoch 1: the series but its last two readings, and the spike at base + 12, whose window
    // [base, base + 10) is not final at watermark base + 8.
    for &(t, x) in &series[..8] {
        op.process(t, &k, &[InSlot::Float(x)]);
    }
    op.process(base + 12, &k, &[InSlot::Int(100)]);
    assert!(finish(&mut op, EventTime::MIN, base + 8).is_empty());
    // Epoch 2: the rest of the window arrives (not late); the window is final at base + 10.
    for &(t, x) in &series[8..] {
        op.process(t, &k, &[InSlot::Float(x)]);
    }
    let rows = finish(&mut op, base + 8, base + 10);
    let window: Vec<f64> = series.iter().map(|&(_, x)| x).collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_row(&rows[0], AnomalyMode::Trailing, (base, base + 10), 0, base + 12, 100.0, &window);
    // Epoch 3: a reading whose window already ended before the watermark is judged at once,
    // against the same final statistics; the first spike is not judged again.
    op.process(base + 14, &k, &[InSlot::Float(-50.0)]);
    let rows = finish(&mut op, base + 10, base + 10);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_row(&rows[0], AnomalyMode::Trailing, (base, base + 10), 0, base + 14, -50.0, &window);
    // Window [base + 5, base + 15) holds the spikes: nothing after them is an anomaly.
    assert!(finish(&mut op, base + 10, base + 1_000).is_empty());
    assert_eq!((op.open_keys(), op.open_windows()), (0, 0));
}

#[test]
fn trailing_spike_in_a_steady_series_is_flagged_once() {
    trailing_spike_is_flagged_once_when_final(0);
}

#[test]
fn negative_times_align_down() {
    trailing_spike_is_flagged_once_when_final(-1_005);
    trailing_spike_is_flagged_once_when_final(-10);
    containing_emits_one_row_per_anomalous_reading_and_window(-2_000);
}

#[test]
fn min_count_is_respected() {
    for (min_count, expected) in [(10, 1), (11, 0)] {
        let mut op = AnomalyOperator::new(spec(AnomalyMode::Trailing, 10, 5, 3.0, min_count));
        for (t, x) in steady(0) {
            op.process(t, &key(0), &[InSlot::Float(x)]);
        }
        op.process(10, &key(0), &[InSlot::Float(100.0)]);
        assert_eq!(finish(&mut op, EventTime::MIN, 100).len(), expected, "min_count {min_count}");
    }
}

/// Containing windows of 10 every 5 from `base`: a spike at base + 12 is in [base + 5, base + 15)
/// and [base + 10, base + 20), each judged when it closes.
fn containing_emits_one_row_per_anomalous_reading_and_window(base: i64) {
    let mut op = AnomalyOperator::new(spec(AnomalyMode::Containing, 10, 5, 2.0, 2));
    let k = key(1);
    let mut series: Vec<(i64, f64)> = steady(base).into_iter().chain(steady(base + 10)).collect();
    series[12].1 = 100.0;
    for &(t, x) in series.iter().rev() {
        op.process(t, &k, &[InSlot::Float(x)]);
    }
    let in_window = |s: i64| -> Vec<f64> { series.iter().filter(|&&(t, _)| (s..s + 10).contains(&t)).map(|&(_, x)| x).collect() };
    assert!(finish(&mut op, EventTime::MIN, base + 14).is_empty());
    let rows = finish(&mut op, base + 14, base + 15);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_row(
        &rows[0],
        AnomalyMode::Containing,
        (base + 5, base + 15),
        1,
        base + 12,
        100.0,
        &in_window(base + 5),
    );
    assert!(finish(&mut op, base + 15, base + 19).is_empty());
    let rows = finish(&mut op, base + 19, base + 25);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_row(
        &rows[0],
        AnomalyMode::Containing,
        (base + 10, base + 20),
        1,
        base + 12,
        100.0,
        &in_window(base + 10),
    );
    assert!(finish(&mut op, base + 25, EventTime::MAX).is_empty());
    assert_eq!((op.open_keys(), op.open_windows()), (0, 0));
}

#[test]
fn containing_mode_emits_one_row_per_anomalous_reading_and_window() {
    containing_emits_one_row_per_anomalous_reading_and_window(0);
}

#[test]
fn null_and_non_finite_values_are_ignored() {
    let run = |with_nulls: bool| {
        let mut op = AnomalyOperator::new(spec(AnomalyMode::Trailing, 10, 5, 3.0, 2));
        for (t, x) in steady(0) {
            op.process(t, &key(0), &[InSlot::Float(x)]);
            if with_nulls {
                op.process(t, &key(0), &[InSlot::Null]);
                op.process(t, &key(0), &[InSlot::Float(f64::NAN)]);
                op.process(t, &key(0), &[InSlot::Float(f64::INFINITY)]);
            }
        }
        op.process(11, &key(0), &[InSlot::Float(100.0)]);
        if with_nulls {
            op.process(12, &key(0), &[InSlot::Null]);
            op.process(12, &key(2), &[InSlot::Null]);
        }
        let rows = finish(&mut op, EventTime::MIN, 10);
        assert_eq!(op.open_keys(), 1, "a key with only NULL readings holds no state");
        rows
    };
    let rows = run(true);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows, run(false));
}

#[test]
fn restore_rejects_bad_entries_and_skips_other_shards_keys() {
    let mut op = AnomalyOperator::new(spec(AnomalyMode::Trailing, 10, 5, 3.0, 2));
    let entry = entry_key(5, &key(0));
    assert!(op.restore(0, &entry[..7], &[], |_| true).is_err());
    assert!(op.restore(0, &entry, &[0; 39], |_| true).is_err());
    assert!(op.restore(1, &entry, &[0; 12], |_| true).is_err());
    assert!(op.restore(2, &entry, &[0; 8], |_| true).is_err());
    assert_eq!(op.restore(1, &entry, &[0; 8], |_| false), Ok(false));
    assert_eq!(op.restore(1, &entry, &encode_values(&[1.0, 2.0]), |_| true), Ok(true));
    // Keys are counted by their panes (a reading's pane always outlives it).
    let mut stats = PaneStats::EMPTY;
    stats.add(1.0);
    stats.add(2.0);
    assert_eq!(op.restore(0, &entry, &stats.encode(), |_| true), Ok(true));
    assert_eq!((op.open_keys(), op.open_windows()), (1, 1));
    assert_eq!(op.table_contents()[READINGS].len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Against a naive model
// ---------------------------------------------------------------------------------------------

/// A generated reading: key, time relative to the previous watermark (some are late), value.
#[derive(Debug, Clone)]
struct Reading {
    key: u8,
    dt: i64,
    value: Option<i64>,
}

#[derive(Debug, Clone)]
struct Epoch {
    readings: Vec<Reading>,
    advance: i64,
}

/// A reading the operator accepted, with the epoch it arrived in.
#[derive(Debug, Clone, Copy)]
struct Accepted {
    epoch: usize,
    key: u8,
    t: i64,
    value: Option<f64>,
}

type Tables = [BTreeMap<Vec<u8>, Vec<u8>>; 2];

fn apply(tables: &mut Tables, writes: Vec<TableWrites>) {
    assert_eq!(writes.len(), 2);
    for (table, w) in tables.iter_mut().zip(writes) {
        w.apply_to(table);
    }
}

/// One operator driven epoch by epoch, with the state tables it writes.
struct Harness {
    op: AnomalyOperator,
    tables: Tables,
    /// The previous epoch's watermark.
    watermark: EventTime,
    /// Watermark of every finished epoch, by epoch index.
    watermarks: Vec<EventTime>,
    rows: Vec<(usize, OutputRow)>,
    accepted: Vec<Accepted>,
}

impl Harness {
    fn new(spec: AnomalySpec) -> Harness {
        Harness {
            op: AnomalyOperator::new(spec),
            tables: Default::default(),
            watermark: EventTime::MIN,
            watermarks: Vec::new(),
            rows: Vec::new(),
            accepted: Vec::new(),
        }
    }

    /// Feeds an epoch's readings (dropping late ones, as the shard does) and finishes it.
    fn run_epoch(&mut self, epoch: &Epoch, base: i64) {
        let anchor = if self.watermark == EventTime::MIN { base } else { self.watermark };
        for r in &epoch.readings {
            let t = anchor + r.dt;
            if self.op.is_late(t, self.watermark) {
                continue;
            }
            let slot = match r.value {
                None => InSlot::Null,
                Some(v) if v % 2 == 0 => InSlot::Int(v),
                Some(v) => InSlot::Float(v as f64),
            };
            self.op.process(t, &key(r.key), &[slot]);
            self.accepted.push(Accepted {
                epoch: self.watermarks.len(),
                key: r.key,
                t,
                value: r.value.map(|v| v as f64),
            });
        }
        // The first epoch may end before any watermark is known.
        let w = match (self.watermark, epoch.advance) {
            (EventTime::MIN, 0) => EventTime::MIN,
            (EventTime::MIN, a) => base + a,
            (w, a) => w + a,
        };
        self.finish(w);
    }

    fn finish(&mut self, w: EventTime) {
        let mut out = Vec::new();
        self.op.finish_epoch(self.watermark, w, &mut out);
        let epoch = self.watermarks.len();
        for row in out {
            assert!(row.window_end <= w, "row emitted before its statistics were final at {w}: {row:?}");
            self.rows.push((epoch, row));
        }
        apply(&mut self.tables, self.op.take_writes());
        assert_eq!(
            self.tables,
            self.op.table_contents(),
            "the state tables do not mirror the operator after epoch {epoch}"
        );
        self.watermark = w;
        self.watermarks.push(w);
    }

    /// A fresh operator restored from the tables, as after a restart.
    fn restarted(&self) -> Harness {
        let mut op = AnomalyOperator::new(self.op.spec().clone());
        for (table, entries) in self.tables.iter().enumerate() {
            for (k, v) in entries {
                assert_eq!(op.restore(table, k, v, |_| true), Ok(true));
            }
        }
        op.resume_at(Some(self.watermark));
        assert_eq!(op.table_contents(), self.tables);
        assert!(op.take_writes().iter().all(TableWrites::is_empty), "a faithful restore changes nothing");
        Harness {
            op,
            tables: self.tables.clone(),
            watermark: self.watermark,
            watermarks: self.watermarks.clone(),
            rows: self.rows.clone(),
            accepted: self.accepted.clone(),
        }
    }
}

/// Identifies an expected row: (epoch, window start, window end, key, t, value bits).
type RowId = (usize, i64, i64, u8, i64, u64);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Decision {
    Anomaly,
    /// Within rounding of a bound: either decision is right.
    Borderline,
    Normal,
}

#[derive(Debug, Clone)]
struct Expected {
    decision: Decision,
    mean: f64,
    sigma: f64,
    count: usize,
}

/// The rows the model expects from the accepted readings, with the epoch each is due in.
fn model(spec: &AnomalySpec, accepted: &[Accepted], watermarks: &[EventTime]) -> BTreeMap<RowId, Expected> {
    let (size, slide) = (spec.size, spec.slide);
    let mut expected: BTreeMap<RowId, Expected> = BTreeMap::new();
    for r in accepted {
        let Some(x) = r.value else { continue };
        let e = r.t.div_euclid(slide) * slide;
        // Judged windows [start, start + size) of this reading.
        let starts: Vec<i64> = match spec.mode {
            AnomalyMode::Trailing => vec![e - size],
            AnomalyMode::Containing => (0..size / slide).map(|i| e - i * slide).collect(),
        };
        for start in starts {
            let end = start + size;
            let window: Vec<f64> = accepted
                .iter()
                .filter(|o| o.key == r.key && (start..end).contains(&o.t))
                .filter_map(|o| o.value)
                .collect();
            // Due in the first epoch, from the one the reading arrived in, whose watermark >= end.
            let epoch = (r.epoch..watermarks.len()).find(|&j| watermarks[j] >= end).expect("the last watermark is huge");
            let (mean, sigma) = mean_stddev(&window);
            let decision = if (window.len() as u64) < spec.min_count.max(2) {
                Decision::Normal
            } else {
                let (hi, lo) = (mean + spec.threshold * sigma, mean - spec.threshold * sigma);
                if close(x, hi) || close(x, lo) {
                    Decision::Borderline
                } else if x > hi || x < lo {
                    Decision::Anomaly
                } else {
                    Decision::Normal
                }
            };
            let e = expected.entry((epoch, start, end, r.key, r.t, x.to_bits())).or_insert(Expected {
                decision,
                mean,
                sigma,
                count: 0,
            });
            e.count += 1;
        }
    }
    expected
}

/// The emitted rows, checked against the model: every anomaly exactly once (as often as it
/// was read), nothing else.
fn check_against_model(h: &Harness) {
    let spec = h.op.spec();
    let expected = model(spec, &h.accepted, &h.watermarks);
    let mut emitted: BTreeMap<RowId, Vec<&OutputRow>> = BTreeMap::new();
    for (epoch, row) in &h.rows {
        let v = match spec.mode {
            AnomalyMode::Containing => &row.values[2..],
            AnomalyMode::Trailing => &row.values[..],
        };
        let Value::Str(k) = &v[0] else { panic!("key column {row:?}") };
        let Value::Time(t) = v[2] else { panic!("time column {row:?}") };
        let id = (*epoch, row.window_start, row.window_end, k[1..].parse().unwrap(), t, float(&v[1]).to_bits());
        emitted.entry(id).or_default().push(row);
    }
    for (id, rows) in &emitted {
        let e = expected
            .get(id)
            .unwrap_or_else(|| panic!("unexpected row {rows:?} (not due then, or no reading)"));
        assert_ne!(e.decision, Decision::Normal, "{rows:?} is not an anomaly: {e:?}");
        assert_eq!(rows.len(), e.count, "{rows:?} emitted {} times, read {} times", rows.len(), e.count);
        for row in rows {
            let (start, end) = (row.window_start, row.window_end);
            let x = f64::from_bits(id.5);
            let v = match spec.mode {
                AnomalyMode::Containing => {
                    assert_eq!(&row.values[..2], &[Value::Time(start), Value::Time(end)]);
                    &row.values[2..]
                }
                AnomalyMode::Trailing => &row.values[..],
            };
            assert_eq!(v.len(), 6);
            assert!(close(float(&v[3]), e.mean) && close(float(&v[4]), e.sigma), "{row:?} vs {e:?}");
            match &v[5] {
                Value::Null => assert_eq!(e.sigma, 0.0, "{row:?}"),
                z => assert!(close(float(z), (x - e.mean) / e.sigma), "{row:?} vs {e:?}"),
            }
        }
    }
    for (id, e) in &expected {
        if e.decision == Decision::Anomaly {
            assert!(emitted.contains_key(id), "missed anomaly {id:?}: {e:?}");
        }
    }
}

fn reading_strategy() -> impl Strategy<Value = Reading> {
    let value = prop_oneof![
        1 => Just(None),
        12 => (95i64..=105).prop_map(Some),
        1 => (150i64..400).prop_map(Some),
        1 => (-300i64..50).prop_map(Some),
    ];
    (0u8..2, -4i64..25, value).prop_map(|(key, dt, value)| Reading { key, dt, value })
}

fn epochs_strategy() -> impl Strategy<Value = Vec<Epoch>> {
    let epoch = (prop::collection::vec(reading_strategy(), 0..16), prop_oneof![1 => Just(0i64), 4 => 1i64..12])
        .prop_map(|(readings, advance)| Epoch { readings, advance });
    prop::collection::vec(epoch, 1..14)
}

fn spec_strategy(mode: AnomalyMode) -> impl Strategy<Value = AnomalySpec> {
    (1i64..6, 1i64..5, prop_oneof![Just(1.0), Just(1.5), Just(2.0), Just(3.0)], 2u64..6)
        .prop_map(move |(slide, panes, threshold, min_count)| spec(mode, slide * panes, slide, threshold, min_count))
}

fn run_all(spec: AnomalySpec, epochs: &[Epoch], base: i64) -> Harness {
    let mut h = Harness::new(spec);
    for e in epochs {
        h.run_epoch(e, base);
    }
    h.finish(EventTime::MAX);
    h
}

fn check_model_run(spec: AnomalySpec, epochs: &[Epoch], base: i64) {
    let h = run_all(spec, epochs, base);
    check_against_model(&h);
    assert_eq!((h.op.open_keys(), h.op.open_windows()), (0, 0), "state left after the last window closed");
    assert!(h.tables.iter().all(BTreeMap::is_empty));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn trailing_mode_emits_the_model_rows(spec in spec_strategy(AnomalyMode::Trailing), epochs in epochs_strategy(), base in -60i64..60) {
        check_model_run(spec, &epochs, base);
    }

    #[test]
    fn containing_mode_emits_the_model_rows(spec in spec_strategy(AnomalyMode::Containing), epochs in epochs_strategy(), base in -60i64..60) {
        check_model_run(spec, &epochs, base);
    }

    #[test]
    fn a_restored_operator_goes_on_like_an_uninterrupted_one(
        mode in prop_oneof![Just(AnomalyMode::Trailing), Just(AnomalyMode::Containing)],
        slide in 1i64..5,
        panes in 1i64..4,
        epochs in epochs_strategy(),
        cut in any::<prop::sample::Index>(),
        base in -60i64..60,
    ) {
        let spec = spec(mode, slide * panes, slide, 1.5, 2);
        let whole = run_all(spec.clone(), &epochs, base);
        let cut = cut.index(epochs.len());
        let mut h = Harness::new(spec);
        for e in &epochs[..=cut] {
            h.run_epoch(e, base);
        }
        let mut h = h.restarted();
        for e in &epochs[cut + 1..] {
            h.run_epoch(e, base);
        }
        h.finish(EventTime::MAX);
        prop_assert_eq!(&h.rows, &whole.rows);
        prop_assert_eq!((h.op.open_keys(), h.op.open_windows()), (0, 0));
    }
}

/// The model runs are only worth something when anomalies occur: most generated cases have some.
#[test]
fn generated_cases_have_anomalies() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    // A fixed seed: the same cases every run.
    let mut runner = TestRunner::deterministic();
    for mode in [AnomalyMode::Trailing, AnomalyMode::Containing] {
        let strategy = (spec_strategy(mode), epochs_strategy(), -60i64..60);
        let (mut with_rows, mut rows) = (0, 0);
        for _ in 0..200 {
            let (spec, epochs, base) = strategy.new_tree(&mut runner).expect("a case").current();
            let h = run_all(spec, &epochs, base);
            with_rows += usize::from(!h.rows.is_empty());
            rows += h.rows.len();
        }
        println!("{mode:?}: {with_rows} of 200 cases with anomalies, {rows} rows");
        assert!(with_rows >= 80, "{mode:?}: only {with_rows} of 200 cases have anomalies");
    }
}
