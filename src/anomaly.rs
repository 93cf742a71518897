//! Anomaly detection of one query on one shard: per group key, rolling statistics (count,
//! mean, sample standard deviation) of a numeric field over sliding windows of `size` every
//! `slide`, and each reading compared with them.
//!
//! Readings update one pane of `slide` (mergeable count/mean/M2, min, max); a window is the
//! merge of its `size / slide` panes. Two ways to judge a reading at `t`:
//!
//! - [`AnomalyMode::Trailing`] (what production detectors do): against the latest window that
//!   ends at or before `t`, `[e - size, e)` with `e = align_down(t, slide)`, which therefore
//!   excludes the reading itself. Judged once, at the end of the first epoch (from the one it
//!   arrives in) whose watermark is `>= e`, when those statistics are final: no reading that
//!   is not late can fall before the watermark.
//! - [`AnomalyMode::Containing`] (the literal SQL: readings joined with the windowed
//!   statistics on key and `window_start <= t < window_end`): against every window containing
//!   it, the reading included; each (reading, window) pair judged once, when the window closes
//!   (watermark `>= window_end`).
//!
//! A reading is an anomaly when the window has at least `min_count` readings, a standard
//! deviation (two readings or more), and `value > mean + threshold·σ` or
//! `value < mean − threshold·σ`. `z_score = (value − mean) / σ`, NULL when σ is 0.
//! Readings whose value is NULL (or a float that is NaN or infinite, which would poison the
//! statistics of every window it is in) are not counted and not judged. Several readings of
//! one key at one time are all counted and all judged.
//!
//! Output rows carry every column in `values`: for `Containing` first `window_start`,
//! `window_end` (`Value::Time`); then the group-key values (decoded from the key), the
//! reading's value (`Value::Float`), its time (`Value::Time`), `expected_value` (mean),
//! `expected_stddev` (σ), `z_score` (Float or Null). [`OutputRow::window_start`] and
//! `window_end` are the judged window's bounds in both modes; its `key` is empty.
//!
//! Rows are late (dead-lettered by the shard) when `t` is below the previous epoch's watermark.
//! State tables: `panes` (`encode_time_key(pane start) ++ group key` → pane statistics: count
//! as u64, then mean, M2, min, max as f64, all little endian) and `readings`
//! (`encode_time_key(t) ++ group key` → the values read at that time, f64 little endian in
//! arrival order, not yet judged or still needed); both drop what is no longer needed with one
//! range delete. Trailing mode keeps a reading until it is judged and a pane while a later
//! judgement may read it (pane start `>= align_down(watermark) - size`); containing mode keeps
//! both until the last window containing them closed.
//!
//! An epoch's work follows the readings that came due: they are held ordered by time, so the
//! readings due at a watermark are one range, whatever the number of keys.

use std::collections::{BTreeMap, HashMap};

use xxhash_rust::xxh3::Xxh3DefaultBuilder;

use crate::state::TableWrites;
use crate::types::{decode_key, decode_time_key, encode_time_key, EventTime, Value};
use crate::window::{align, InSlot, OutputRow};

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

/// Count, mean, M2 (sum of squared deviations), min and max of the readings of one pane;
/// panes merge exactly like Chan, Golub & LeVeque's parallel variance.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PaneStats {
    count: u64,
    mean: f64,
    m2: f64,
    min: f64,
    max: f64,
}

/// Encoded size of [`PaneStats`]: count, mean, M2, min, max, 8 bytes each, little endian.
const PANE_BYTES: usize = 40;

impl PaneStats {
    const EMPTY: PaneStats = PaneStats {
        count: 0,
        mean: 0.0,
        m2: 0.0,
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
    };

    /// Welford's update.
    fn add(&mut self, x: f64) {
        self.count += 1;
        let delta = x - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (x - self.mean);
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }

    fn merge(&mut self, other: &PaneStats) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        let count = self.count + other.count;
        let (na, nb, n) = (self.count as f64, other.count as f64, count as f64);
        let delta = other.mean - self.mean;
        self.mean += delta * (nb / n);
        self.m2 += other.m2 + delta * delta * (na * nb / n);
        self.count = count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Sample standard deviation; `None` below two readings.
    fn stddev(&self) -> Option<f64> {
        let denominator = self.count.checked_sub(1).filter(|&d| d > 0)?;
        // Rounding can leave M2 a hair below zero.
        Some((self.m2.max(0.0) / denominator as f64).sqrt())
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(PANE_BYTES);
        out.extend_from_slice(&self.count.to_le_bytes());
        for x in [self.mean, self.m2, self.min, self.max] {
            out.extend_from_slice(&x.to_le_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Result<PaneStats, String> {
        if bytes.len() != PANE_BYTES {
            return Err(format!("pane statistics of {} bytes, expected {PANE_BYTES}", bytes.len()));
        }
        let word = |i: usize| -> [u8; 8] { bytes[8 * i..8 * i + 8].try_into().expect("8 bytes") };
        let float = |i: usize| f64::from_le_bytes(word(i));
        let stats = PaneStats {
            count: u64::from_le_bytes(word(0)),
            mean: float(1),
            m2: float(2),
            min: float(3),
            max: float(4),
        };
        if stats.count == 0 {
            return Err("pane statistics with no readings".into());
        }
        Ok(stats)
    }
}

/// The values of a `readings` entry: each reading's f64, little endian, in arrival order.
fn encode_values(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn decode_values(bytes: &[u8]) -> Result<Vec<f64>, String> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(8) {
        return Err(format!("readings of {} bytes, expected a non-zero multiple of 8", bytes.len()));
    }
    Ok(bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

/// A state-table key: `encode_time_key(t) ++ group key`.
fn entry_key(t: EventTime, key: &[u8]) -> Vec<u8> {
    [&encode_time_key(t)[..], key].concat()
}

/// The numeric value of a reading; NULL (and anything not a number) and non-finite floats
/// are not readings.
fn reading_value(input: Option<&InSlot>) -> Option<f64> {
    let x = match input? {
        InSlot::Int(i) => *i as f64,
        InSlot::Float(f) => *f,
        _ => return None,
    };
    x.is_finite().then_some(x)
}

/// A watermark below this is "none yet" (`watermark::UNKNOWN`): nothing is final.
const NO_WATERMARK: EventTime = EventTime::MIN / 2;

type KeyMap<V> = HashMap<Box<[u8]>, V, Xxh3DefaultBuilder>;

/// (window start, group key) → the (time, value) of the readings to judge against that
/// window, in time order (arrival order within one time).
type WindowReadings<'a> = BTreeMap<(EventTime, &'a [u8]), Vec<(EventTime, f64)>>;

/// A state entry and whether it changed since it was last handed to the state store.
#[derive(Debug)]
struct Slot<T> {
    value: T,
    dirty: bool,
}

/// The values one group key read at one time, in arrival order.
#[derive(Debug)]
struct Reading {
    key: Box<[u8]>,
    values: Vec<f64>,
    dirty: bool,
}

/// Readings by (time, hash of the group key): one ordered map, no map per time. A hash is
/// almost always one key; the few that collide share the vector.
type Readings = BTreeMap<(EventTime, u64), Vec<Reading>>;

/// One anomaly query on one shard.
pub struct AnomalyOperator {
    spec: AnomalySpec,
    /// Pane start → group key → statistics of the key's readings in the pane.
    panes: BTreeMap<EventTime, KeyMap<Slot<PaneStats>>>,
    /// The readings held. Ordered by time, it is also the index of what is due: an epoch
    /// visits only the times that came due.
    readings: Readings,
    /// Per group key, how many panes hold it. A held reading's key always has a pane too (a
    /// pane outlives the readings in it), so these are all the keys held.
    key_entries: KeyMap<usize>,
    /// Containing mode: the last window start judged (windows at or before it are never judged again).
    judged_through: Option<EventTime>,
    /// Entries changed this epoch, in the order they first changed (may since have been dropped).
    dirty_panes: Vec<(EventTime, Box<[u8]>)>,
    dirty_readings: Vec<(EventTime, u64)>,
    /// Per table, when entries were dropped since the last `take_writes`: every entry below
    /// this time is gone.
    dropped_below: [Option<EventTime>; 2],
}

const PANES: usize = 0;
const READINGS: usize = 1;

impl AnomalyOperator {
    /// The state tables an anomaly operator owns, in table order.
    pub const TABLES: &'static [&'static str] = &["panes", "readings"];

    pub fn new(spec: AnomalySpec) -> AnomalyOperator {
        debug_assert!(spec.slide > 0 && spec.size >= spec.slide && spec.size % spec.slide == 0, "bad window {spec:?}");
        AnomalyOperator {
            spec,
            panes: BTreeMap::new(),
            readings: BTreeMap::new(),
            key_entries: KeyMap::default(),
            judged_through: None,
            dirty_panes: Vec::new(),
            dirty_readings: Vec::new(),
            dropped_below: [None, None],
        }
    }

    pub fn spec(&self) -> &AnomalySpec {
        &self.spec
    }

    /// Restores one entry of table `table` (0 = panes, 1 = readings) when `owns(group key)`;
    /// returns whether it was kept. Errors name what is wrong with the entry.
    pub fn restore(&mut self, table: usize, key: &[u8], value: &[u8], owns: impl Fn(&[u8]) -> bool) -> Result<bool, String> {
        let (t, group_key) = key.split_first_chunk::<8>().ok_or("state key shorter than 8 bytes")?;
        let t = decode_time_key(*t);
        if !owns(group_key) {
            return Ok(false);
        }
        match table {
            PANES => {
                let stats = PaneStats::decode(value)?;
                let slot = Slot { value: stats, dirty: false };
                if self.panes.entry(t).or_default().insert(group_key.into(), slot).is_none() {
                    hold(&mut self.key_entries, group_key);
                }
            }
            READINGS => {
                let values = decode_values(value)?;
                reading_at(&mut self.readings, t, group_key).0.values = values;
            }
            _ => return Err(format!("no state table {table} (an anomaly operator has {})", Self::TABLES.len())),
        }
        Ok(true)
    }

    /// After restoring at `watermark`: what was due at or before it was judged by an earlier run.
    pub fn resume_at(&mut self, watermark: Option<EventTime>) {
        let Some(w) = watermark.filter(|&w| w > NO_WATERMARK) else {
            return;
        };
        // The store drops these at the end of the epoch that judged them; this only matters
        // for a store that still holds some.
        match self.spec.mode {
            AnomalyMode::Trailing => {
                self.split_due_readings(self.trailing_readings_bound(w));
                self.drop_panes_below(self.trailing_panes_bound(w));
            }
            AnomalyMode::Containing => {
                let last = self.last_closed_window(w);
                self.judged_through = Some(last);
                self.split_due_readings(last.saturating_add(self.spec.slide));
                self.drop_panes_below(last.saturating_add(self.spec.slide));
            }
        }
    }

    /// Whether a reading at `t` is late at `watermark` (the previous epoch's).
    #[inline]
    pub fn is_late(&self, t: EventTime, watermark: EventTime) -> bool {
        t < watermark
    }

    /// One reading: its group key, time, and `inputs[0]` its value (`InSlot::Int`, `Float`,
    /// or `Null`).
    pub fn process(&mut self, t: EventTime, key: &[u8], inputs: &[InSlot]) {
        let Some(x) = reading_value(inputs.first()) else {
            return;
        };
        let pane = align(t, self.spec.slide, 0);
        let (panes, key_entries, dirty) = (&mut self.panes, &mut self.key_entries, &mut self.dirty_panes);
        let slot = upsert(panes.entry(pane).or_default(), key, key_entries, || PaneStats::EMPTY);
        slot.value.add(x);
        if !std::mem::replace(&mut slot.dirty, true) {
            dirty.push((pane, key.into()));
        }
        let (reading, hash) = reading_at(&mut self.readings, t, key);
        reading.values.push(x);
        if !std::mem::replace(&mut reading.dirty, true) {
            self.dirty_readings.push((t, hash));
        }
    }

    /// The epoch ended at `watermark`: appends the anomalies judged now and drops what is no
    /// longer needed.
    pub fn finish_epoch(&mut self, prev_watermark: EventTime, watermark: EventTime, out: &mut Vec<OutputRow>) {
        // Which readings are due depends only on `watermark`: a reading is kept until judged.
        let _ = prev_watermark;
        if watermark <= NO_WATERMARK {
            return;
        }
        match self.spec.mode {
            AnomalyMode::Trailing => self.judge_trailing(watermark, out),
            AnomalyMode::Containing => self.judge_containing(watermark, out),
        }
    }

    /// Trailing mode: judges (and drops) every held reading whose window `[e - size, e)` ended
    /// at or before `watermark`; then drops the panes no future judgement reads.
    fn judge_trailing(&mut self, watermark: EventTime, out: &mut Vec<OutputRow>) {
        let (size, slide) = (self.spec.size, self.spec.slide);
        let due = self.split_due_readings(self.trailing_readings_bound(watermark));
        let mut windows = WindowReadings::new();
        for (&(t, _), at) in &due {
            let start = align(t, slide, 0).saturating_sub(size);
            for r in at {
                windows.entry((start, &*r.key)).or_default().extend(r.values.iter().map(|&x| (t, x)));
            }
        }
        self.judge_windows(windows, out);
        self.drop_panes_below(self.trailing_panes_bound(watermark));
    }

    /// Containing mode: judges every window closed since the last epoch, each reading in it
    /// against the window's statistics; then drops readings and panes whose windows all closed.
    fn judge_containing(&mut self, watermark: EventTime, out: &mut Vec<OutputRow>) {
        let (size, slide) = (self.spec.size, self.spec.slide);
        let last = self.last_closed_window(watermark);
        let first = match self.judged_through {
            Some(j) if j >= last => return,
            Some(j) => j + slide,
            None => EventTime::MIN,
        };
        // Only the readings held are visited: windows without any are never looked at.
        let mut windows = WindowReadings::new();
        for (&(t, _), at) in self.readings.range(..(last.saturating_add(size), 0)) {
            // Windows containing t: aligned starts in (t - size, t].
            let newest = align(t, slide, 0);
            let mut s = newest.saturating_sub(size).saturating_add(slide).max(first);
            while s <= newest.min(last) {
                for r in at {
                    windows.entry((s, &*r.key)).or_default().extend(r.values.iter().map(|&x| (t, x)));
                }
                s += slide;
            }
        }
        self.judge_windows(windows, out);
        self.judged_through = Some(last);
        // A reading or pane at p is in no window after `last` once align(p) <= last.
        let bound = last.saturating_add(slide);
        self.split_due_readings(bound);
        self.drop_panes_below(bound);
    }

    /// Start of the last window that has closed at `watermark` (`start + size <= watermark`).
    fn last_closed_window(&self, watermark: EventTime) -> EventTime {
        align(watermark.saturating_sub(self.spec.size), self.spec.slide, 0)
    }

    /// Trailing mode: readings before this time are due at `watermark` (`align(t) <= watermark`).
    fn trailing_readings_bound(&self, watermark: EventTime) -> EventTime {
        align(watermark, self.spec.slide, 0).saturating_add(self.spec.slide)
    }

    /// Trailing mode: panes before this time are read by no judgement after `watermark`: a
    /// reading not yet judged, or still to come (`t >= watermark`), has `e >= align(watermark)`.
    fn trailing_panes_bound(&self, watermark: EventTime) -> EventTime {
        align(watermark, self.spec.slide, 0).saturating_sub(self.spec.size)
    }

    /// Judges each group of readings against its window's statistics, in window, key and time order.
    fn judge_windows(&self, windows: WindowReadings<'_>, out: &mut Vec<OutputRow>) {
        for ((start, key), readings) in windows {
            let end = start.saturating_add(self.spec.size);
            let stats = self.window_stats(start, end, key);
            for (t, x) in readings {
                out.extend(self.judge(&stats, (start, end), key, t, x));
            }
        }
    }

    /// Statistics of `key`'s readings in `[start, end)`, merged from its panes in time order.
    fn window_stats(&self, start: EventTime, end: EventTime, key: &[u8]) -> PaneStats {
        let mut stats = PaneStats::EMPTY;
        for keys in self.panes.range(start..end).map(|(_, keys)| keys) {
            if let Some(slot) = keys.get(key) {
                stats.merge(&slot.value);
            }
        }
        stats
    }

    /// The output row of reading `x` at `t` when it is an anomaly in `window` with `stats`.
    fn judge(&self, stats: &PaneStats, window: (EventTime, EventTime), key: &[u8], t: EventTime, x: f64) -> Option<OutputRow> {
        if stats.count < self.spec.min_count.max(2) {
            return None;
        }
        let sigma = stats.stddev()?;
        let margin = self.spec.threshold * sigma;
        let outside = x > stats.mean + margin || x < stats.mean - margin;
        if !outside {
            return None;
        }
        let z = if sigma == 0.0 { Value::Null } else { Value::Float((x - stats.mean) / sigma) };
        let (start, end) = window;
        let mut values = Vec::with_capacity(9);
        if self.spec.mode == AnomalyMode::Containing {
            values.extend([Value::Time(start), Value::Time(end)]);
        }
        values.extend(decode_key(key).unwrap_or_default());
        values.extend([Value::Float(x), Value::Time(t), Value::Float(stats.mean), Value::Float(sigma), z]);
        Some(OutputRow {
            window_start: start,
            window_end: end,
            key: Vec::new(),
            values,
            retract: false,
        })
    }

    /// Removes and returns the readings before `bound`.
    fn split_due_readings(&mut self, bound: EventTime) -> Readings {
        let kept = self.readings.split_off(&(bound, 0));
        let due = std::mem::replace(&mut self.readings, kept);
        if !due.is_empty() {
            self.dropped_below[READINGS] = self.dropped_below[READINGS].max(Some(bound));
        }
        due
    }

    fn drop_panes_below(&mut self, bound: EventTime) {
        let kept = self.panes.split_off(&bound);
        let dropped = std::mem::replace(&mut self.panes, kept);
        if !dropped.is_empty() {
            for key in dropped.values().flat_map(|keys| keys.keys()) {
                release(&mut self.key_entries, key);
            }
            self.dropped_below[PANES] = self.dropped_below[PANES].max(Some(bound));
        }
    }

    /// What this epoch changed in `panes` and `readings`, in table order.
    pub fn take_writes(&mut self) -> Vec<TableWrites> {
        let range = |below: Option<EventTime>| {
            below
                .map(|b| (encode_time_key(EventTime::MIN).to_vec(), encode_time_key(b).to_vec()))
                .into_iter()
                .collect()
        };
        let mut panes = TableWrites {
            delete_ranges: range(self.dropped_below[PANES].take()),
            ..Default::default()
        };
        for (start, key) in self.dirty_panes.drain(..) {
            // Absent when dropped since it changed: the range delete covers it.
            if let Some(slot) = self.panes.get_mut(&start).and_then(|keys| keys.get_mut(&key)) {
                slot.dirty = false;
                panes.puts.push((entry_key(start, &key), slot.value.encode()));
            }
        }
        let mut readings = TableWrites {
            delete_ranges: range(self.dropped_below[READINGS].take()),
            ..Default::default()
        };
        for (t, hash) in self.dirty_readings.drain(..) {
            for r in self.readings.get_mut(&(t, hash)).into_iter().flatten().filter(|r| r.dirty) {
                r.dirty = false;
                readings.puts.push((entry_key(t, &r.key), encode_values(&r.values)));
            }
        }
        vec![panes, readings]
    }

    /// Open windows (panes held).
    pub fn open_windows(&self) -> usize {
        self.panes.len()
    }

    /// Group keys held.
    pub fn open_keys(&self) -> usize {
        self.key_entries.len()
    }

    /// Every entry held, as the state tables should hold them after `take_writes` was applied.
    #[cfg(test)]
    fn table_contents(&self) -> [BTreeMap<Vec<u8>, Vec<u8>>; 2] {
        let panes = self
            .panes
            .iter()
            .flat_map(|(&p, keys)| keys.iter().map(move |(k, slot)| (entry_key(p, k), slot.value.encode())))
            .collect();
        let readings = self
            .readings
            .iter()
            .flat_map(|(&(t, _), at)| at.iter().map(move |r| (entry_key(t, &r.key), encode_values(&r.values))))
            .collect();
        [panes, readings]
    }
}

/// `key`'s readings at `t`, created empty when absent; and the key's hash.
fn reading_at<'a>(readings: &'a mut Readings, t: EventTime, key: &[u8]) -> (&'a mut Reading, u64) {
    let hash = xxhash_rust::xxh3::xxh3_64(key);
    let at = readings.entry((t, hash)).or_default();
    let i = match at.iter().position(|r| *r.key == *key) {
        Some(i) => i,
        None => {
            at.push(Reading {
                key: key.into(),
                values: Vec::new(),
                dirty: false,
            });
            at.len() - 1
        }
    };
    (&mut at[i], hash)
}

/// `key`'s slot in `keys`, created (dirty, counted in `key_entries`) when absent.
fn upsert<'a, T>(keys: &'a mut KeyMap<Slot<T>>, key: &[u8], key_entries: &mut KeyMap<usize>, new: impl FnOnce() -> T) -> &'a mut Slot<T> {
    if !keys.contains_key(key) {
        hold(key_entries, key);
        keys.insert(key.into(), Slot { value: new(), dirty: false });
    }
    keys.get_mut(key).expect("just inserted")
}

/// One more entry holds `key`.
fn hold(key_entries: &mut KeyMap<usize>, key: &[u8]) {
    match key_entries.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            key_entries.insert(key.into(), 1);
        }
    }
}

/// One entry holding `key` is gone.
fn release(key_entries: &mut KeyMap<usize>, key: &[u8]) {
    if let Some(n) = key_entries.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            key_entries.remove(key);
        }
    }
}

#[cfg(test)]
mod tests;
