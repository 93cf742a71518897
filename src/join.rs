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
//! Expiry is exact: a left row with `tl + upper < W` cannot match a right row of a later
//! epoch, which is not late and so has `tr >= W > tl + upper` (symmetrically for the right
//! side), so a row is dropped as soon as nothing can match it any more, and nothing is left
//! once the watermark is past `tl + upper` of every left row and `tr - lower` of every right one.
//!
//! In memory each side keeps `join key → its entries sorted by event time`, so an arrival
//! probes the other side with one binary search within its key, and the ordered set of
//! `(event time, join key)` so expiry pops the oldest entries without scanning keys. A key's
//! allocation is shared by both indexes. An entry holds the rows of one (time, key) in exactly
//! the encoding of its table value, so writing it is a copy and matching flips a byte.
//!
//! State tables: `left` and `right`, each keyed `encode_time_key(t) ++ join key`, the value
//! the rows of that side with that time and key (with their matched flags), in arrival order:
//! per row one byte `matched` (0 or 1), the length of its carried values (u32, little endian),
//! then the carried values (`types::encode_key_value` each). Only an outer side reads the
//! flags, so an inner side keeps them 0 and matches never rewrite its entries. An entry is
//! written whole when a row joins it or one of its rows matches for the first time, in the
//! epoch's puts; entries that expired are not written. Expired rows are one range delete per
//! table, `[encode_time_key(i64::MIN), encode_time_key(W - upper))` on the left and up to
//! `W + lower` on the right, in the epochs where rows expired.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ops::RangeInclusive;
use std::rc::Rc;

use xxhash_rust::xxh3::Xxh3DefaultBuilder;

use crate::expr::Expr;
use crate::state::TableWrites;
use crate::types::{decode_key, decode_time_key, encode_time_key, encoded_value_len, EventTime, Value};
use crate::window::{InSlot, OutputRow};

/// Which unmatched rows a join keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinKind {
    Inner,
    Left,
    Right,
    Full,
}

impl JoinKind {
    /// Whether unmatched rows of `port` are emitted (null-padded).
    pub fn is_outer(self, port: usize) -> bool {
        match self {
            JoinKind::Inner => false,
            JoinKind::Left => port == LEFT,
            JoinKind::Right => port == RIGHT,
            JoinKind::Full => true,
        }
    }
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

impl JoinSpec {
    /// Event times of the rows of the other side that a row of `port` at `t` matches.
    fn match_range(&self, port: usize, t: EventTime) -> Option<RangeInclusive<EventTime>> {
        let (t, lower, upper) = (t as i128, self.lower as i128, self.upper as i128);
        let (from, to) = if port == LEFT { (t + lower, t + upper) } else { (t - upper, t - lower) };
        let (min, max) = (EventTime::MIN as i128, EventTime::MAX as i128);
        (from <= to && from <= max && to >= min).then(|| from.max(min) as EventTime..=to.min(max) as EventTime)
    }

    /// Rows of `port` at times below this expire at watermark `watermark` (exact, no overflow).
    fn expiry_threshold(&self, port: usize, watermark: EventTime) -> i128 {
        if port == LEFT {
            watermark as i128 - self.upper as i128
        } else {
            watermark as i128 + self.lower as i128
        }
    }

    /// The output row of a pair, or of one unmatched row (the other side `None`, all NULL).
    fn output_row(&self, left: Option<&[u8]>, right: Option<&[u8]>) -> OutputRow {
        let mut row = Vec::with_capacity(self.left_width + self.right_width);
        push_side(&mut row, left, self.left_width);
        push_side(&mut row, right, self.right_width);
        OutputRow {
            window_start: 0,
            window_end: 0,
            key: Vec::new(),
            values: self.select.iter().map(|e| e.eval(row.as_slice()).into_value()).collect(),
            retract: false,
        }
    }
}

/// Appends one side's carried values to the combined row, exactly `width` of them: NULLs for a
/// missing side (and for values that do not decode, which the shard's encoder never produces).
fn push_side(row: &mut Vec<Value>, values: Option<&[u8]>, width: usize) {
    let start = row.len();
    if let Some(Ok(decoded)) = values.map(decode_key) {
        row.extend(decoded);
    }
    row.resize(start + width, Value::Null);
}

/// Whether a join key has a NULL component, without decoding it. A malformed key (never made
/// by the shard) counts as one too: it never matches.
fn key_has_null(mut key: &[u8]) -> bool {
    while !key.is_empty() {
        match encoded_value_len(key) {
            Some((len, false)) => key = &key[len..],
            Some((_, true)) | None => return true,
        }
    }
    false
}

/// How many encoded values `bytes` holds; `None` when malformed.
fn count_values(mut bytes: &[u8]) -> Option<usize> {
    let mut n = 0;
    while !bytes.is_empty() {
        let (len, _) = encoded_value_len(bytes)?;
        bytes = &bytes[len..];
        n += 1;
    }
    Some(n)
}

/// Bytes before a row's carried values in an entry: the matched flag and the length.
const ROW_HEADER: usize = 5;

fn push_row(entry: &mut Vec<u8>, matched: bool, values: &[u8]) {
    let len = u32::try_from(values.len()).expect("a row's carried values exceed 4 GiB");
    entry.push(u8::from(matched));
    entry.extend_from_slice(&len.to_le_bytes());
    entry.extend_from_slice(values);
}

/// The row at byte `at` of a well-formed entry: (matched, carried values, offset of the next row).
fn row_at(entry: &[u8], at: usize) -> (bool, &[u8], usize) {
    let len = u32::from_le_bytes(entry[at + 1..at + ROW_HEADER].try_into().expect("4 bytes")) as usize;
    let end = at + ROW_HEADER + len;
    (entry[at] != 0, &entry[at + ROW_HEADER..end], end)
}

/// The rows of a well-formed entry: (matched, carried values).
fn rows_of(entry: &[u8]) -> impl Iterator<Item = (bool, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        (at < entry.len()).then(|| {
            let (matched, values, next) = row_at(entry, at);
            at = next;
            (matched, values)
        })
    })
}

/// Checks a stored entry; returns its number of rows.
fn check_entry(entry: &[u8], width: usize) -> Result<usize, String> {
    if entry.is_empty() {
        return Err("join state entry holds no rows".into());
    }
    let (mut at, mut rows) = (0, 0);
    while at < entry.len() {
        let Some(header) = entry.get(at..at + ROW_HEADER) else {
            return Err(format!("join state entry truncated in the header of row {rows}"));
        };
        if header[0] > 1 {
            return Err(format!("join state entry: matched flag {} of row {rows} is not 0 or 1", header[0]));
        }
        let len = u32::from_le_bytes(header[1..].try_into().expect("4 bytes")) as usize;
        let Some(values) = entry.get(at + ROW_HEADER..at + ROW_HEADER + len) else {
            return Err(format!("join state entry truncated in the values of row {rows}"));
        };
        match count_values(values) {
            Some(n) if n == width => {}
            Some(n) => return Err(format!("join state entry: row {rows} carries {n} values, the join {width}")),
            None => return Err(format!("join state entry: row {rows} has corrupt values")),
        }
        at += ROW_HEADER + len;
        rows += 1;
    }
    Ok(rows)
}

/// End (exclusive) of the table key range holding every time below `threshold`.
fn range_end(threshold: i128) -> Vec<u8> {
    match EventTime::try_from(threshold) {
        Ok(t) => encode_time_key(t).to_vec(),
        Err(_) if threshold < 0 => encode_time_key(EventTime::MIN).to_vec(),
        // Every time: past `i64::MAX` ++ any join key, as no encoded value starts with 0xFF.
        Err(_) => [&encode_time_key(EventTime::MAX)[..], &[0xFF_u8][..]].concat(),
    }
}

/// A join key, shared by the indexes that name it (one allocation per key held).
type Key = Rc<[u8]>;

type KeyMap<V> = HashMap<Key, V, Xxh3DefaultBuilder>;

/// The entries of one join key, sorted by event time. A deque, not a tree: most keys hold a
/// few entries, arrivals are mostly in time order (appended) and expiry takes the oldest.
struct KeyEntries {
    key: Key,
    times: Times,
}

impl KeyEntries {
    fn new(key: Key) -> KeyEntries {
        KeyEntries {
            key,
            times: Times(VecDeque::new()),
        }
    }
}

/// (event time, entry) pairs sorted by time.
struct Times(VecDeque<(EventTime, Entry)>);

impl Times {
    fn position(&self, t: EventTime) -> Result<usize, usize> {
        match self.0.back() {
            Some(&(last, _)) if last < t => Err(self.0.len()),
            _ => self.0.binary_search_by_key(&t, |(x, _)| *x),
        }
    }

    /// The entry at `t`, and whether it was created now (empty).
    fn entry(&mut self, t: EventTime, capacity: usize) -> (&mut Entry, bool) {
        match self.position(t) {
            Ok(i) => (&mut self.0[i].1, false),
            Err(i) => {
                let entry = Entry {
                    encoded: Vec::with_capacity(capacity),
                    changed: false,
                };
                self.0.insert(i, (t, entry));
                (&mut self.0[i].1, true)
            }
        }
    }

    fn get_mut(&mut self, t: EventTime) -> Option<&mut Entry> {
        self.position(t).ok().map(|i| &mut self.0[i].1)
    }

    fn remove(&mut self, t: EventTime) -> Option<Entry> {
        match self.0.front() {
            Some(&(first, _)) if first == t => self.0.pop_front().map(|(_, e)| e),
            _ => self.position(t).ok().and_then(|i| self.0.remove(i)).map(|(_, e)| e),
        }
    }

    /// The entries at times in `range`.
    fn range_mut(&mut self, range: RangeInclusive<EventTime>) -> impl Iterator<Item = &mut (EventTime, Entry)> {
        let lo = self.0.partition_point(|(x, _)| x < range.start());
        let hi = self.0.partition_point(|(x, _)| x <= range.end());
        self.0.range_mut(lo..hi.max(lo))
    }
}

/// The rows of one side with one (time, join key), encoded as the table value.
struct Entry {
    encoded: Vec<u8>,
    /// Changed since the last `take_writes`.
    changed: bool,
}

/// The rows held for one side.
#[derive(Default)]
struct Side {
    /// Join key → event time → entry.
    entries: KeyMap<KeyEntries>,
    /// (event time, join key) of every entry, oldest first.
    by_time: BTreeSet<(EventTime, Key)>,
    /// (time, key) of the entries that turned `changed` (some may have expired since).
    changed: Vec<(EventTime, Key)>,
    rows: usize,
    /// Rows below this table key expired since the last `take_writes`.
    delete_below: Option<Vec<u8>>,
}

impl Side {
    /// The entries of `key`, created empty if it has none.
    fn key_entries(&mut self, key: &[u8]) -> &mut KeyEntries {
        if !self.entries.contains_key(key) {
            let key: Key = key.into();
            self.entries.insert(key.clone(), KeyEntries::new(key));
        }
        self.entries.get_mut(key).expect("inserted above")
    }

    fn insert(&mut self, t: EventTime, key: &[u8], matched: bool, values: &[u8]) {
        let Side { entries, by_time, changed, .. } = self;
        let k = match entries.get_mut(key) {
            Some(k) => k,
            None => {
                let key: Key = key.into();
                entries.entry(key.clone()).or_insert(KeyEntries::new(key))
            }
        };
        let (entry, new) = k.times.entry(t, ROW_HEADER + values.len());
        if new {
            by_time.insert((t, k.key.clone()));
        }
        push_row(&mut entry.encoded, matched, values);
        if !entry.changed {
            entry.changed = true;
            changed.push((t, k.key.clone()));
        }
        self.rows += 1;
    }

    /// Drops every row at a time below `threshold`, oldest first (keys in byte order within a
    /// time), handing the carried values of those that never matched to `unmatched`.
    fn expire_below(&mut self, threshold: i128, mut unmatched: impl FnMut(&[u8])) {
        let mut expired = false;
        while self.by_time.first().is_some_and(|(t, _)| (*t as i128) < threshold) {
            let (t, key) = self.by_time.pop_first().expect("checked above");
            let Some(k) = self.entries.get_mut(&key) else {
                continue;
            };
            if let Some(entry) = k.times.remove(t) {
                for (matched, values) in rows_of(&entry.encoded) {
                    self.rows -= 1;
                    if !matched {
                        unmatched(values);
                    }
                }
            }
            if k.times.0.is_empty() {
                self.entries.remove(&key);
            }
            expired = true;
        }
        if expired {
            self.delete_below = Some(range_end(threshold));
        }
    }

    fn take_writes(&mut self) -> TableWrites {
        let mut writes = TableWrites {
            delete_ranges: self
                .delete_below
                .take()
                .map(|to| (encode_time_key(EventTime::MIN).to_vec(), to))
                .into_iter()
                .collect(),
            ..Default::default()
        };
        for (t, key) in std::mem::take(&mut self.changed) {
            // Absent when expired since it changed: the range delete covers it.
            let Some(entry) = self.entries.get_mut(&key).and_then(|k| k.times.get_mut(t)) else {
                continue;
            };
            if std::mem::take(&mut entry.changed) {
                writes.puts.push(([&encode_time_key(t)[..], &key].concat(), entry.encoded.clone()));
            }
        }
        writes
    }
}

/// One join query on one shard.
pub struct JoinOperator {
    spec: JoinSpec,
    /// Indexed by port.
    sides: [Side; 2],
    /// This epoch's matches, handed out by `finish_epoch`.
    pending: Vec<OutputRow>,
    /// The watermark of the last finished (or restored) epoch: rows below it are late.
    watermark: Option<EventTime>,
}

impl JoinOperator {
    /// The state tables a join owns, in table order.
    pub const TABLES: &'static [&'static str] = &["left", "right"];

    pub fn new(spec: JoinSpec) -> JoinOperator {
        JoinOperator {
            spec,
            sides: Default::default(),
            pending: Vec::new(),
            watermark: None,
        }
    }

    pub fn spec(&self) -> &JoinSpec {
        &self.spec
    }

    fn width(&self, port: usize) -> usize {
        if port == LEFT {
            self.spec.left_width
        } else {
            self.spec.right_width
        }
    }

    /// Restores one entry of table `table` (0 = left, 1 = right) when `owns(join key)`;
    /// returns whether it was kept. Errors name what is wrong with the entry.
    pub fn restore(&mut self, table: usize, key: &[u8], value: &[u8], owns: impl Fn(&[u8]) -> bool) -> Result<bool, String> {
        if table > RIGHT {
            return Err(format!("join state table {table} does not exist (a join has {})", Self::TABLES.len()));
        }
        let Some((time, join_key)) = key.split_first_chunk::<8>() else {
            return Err(format!("join state key of {} bytes is shorter than its 8-byte time", key.len()));
        };
        if !owns(join_key) {
            return Ok(false);
        }
        let rows = check_entry(value, self.width(table))?;
        let t = decode_time_key(*time);
        let side = &mut self.sides[table];
        let k = side.key_entries(join_key);
        let (entry, new) = k.times.entry(t, 0);
        if !new {
            return Err(format!("join state entry at time {t} restored twice"));
        }
        entry.encoded = value.to_vec();
        let key = k.key.clone();
        side.by_time.insert((t, key));
        side.rows += rows;
        Ok(true)
    }

    /// After restoring at `watermark`.
    pub fn resume_at(&mut self, watermark: Option<EventTime>) {
        self.watermark = watermark;
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
        debug_assert!(port == LEFT || port == RIGHT, "join port {port}");
        debug_assert!(!self.watermark.is_some_and(|w| self.is_late(t, w)), "late row at {t} given to the join");
        let values = match inputs.first() {
            Some(&InSlot::Bytes { start, end }) => &blob[start as usize..end as usize],
            _ => &[],
        };
        let outer = self.spec.kind.is_outer(port);
        if key_has_null(key) {
            if outer {
                self.sides[port].insert(t, key, false, values);
            }
            return;
        }
        let other = 1 - port;
        let other_outer = self.spec.kind.is_outer(other);
        let mut matched = false;
        if let Some(range) = self.spec.match_range(port, t) {
            let Side { entries, changed, .. } = &mut self.sides[other];
            if let Some(k) = entries.get_mut(key) {
                for (t_other, entry) in k.times.range_mut(range) {
                    let t_other = *t_other;
                    let mut first_match = false;
                    let mut at = 0;
                    while at < entry.encoded.len() {
                        let (was_matched, other_values, next) = row_at(&entry.encoded, at);
                        self.pending.push(if port == LEFT {
                            self.spec.output_row(Some(values), Some(other_values))
                        } else {
                            self.spec.output_row(Some(other_values), Some(values))
                        });
                        if !was_matched && other_outer {
                            entry.encoded[at] = 1;
                            first_match = true;
                        }
                        at = next;
                    }
                    matched = true;
                    if first_match && !entry.changed {
                        entry.changed = true;
                        changed.push((t_other, k.key.clone()));
                    }
                }
            }
        }
        self.sides[port].insert(t, key, matched && outer, values);
    }

    /// The epoch ended at `watermark`: appends this epoch's matches, then the null-padded rows
    /// of outer sides that expire now, and drops expired rows.
    pub fn finish_epoch(&mut self, prev_watermark: EventTime, watermark: EventTime, out: &mut Vec<OutputRow>) {
        debug_assert!(prev_watermark <= watermark, "watermark went back from {prev_watermark} to {watermark}");
        out.append(&mut self.pending);
        let spec = &self.spec;
        for port in [LEFT, RIGHT] {
            let outer = spec.kind.is_outer(port);
            self.sides[port].expire_below(spec.expiry_threshold(port, watermark), |values| {
                if outer {
                    let (left, right) = if port == LEFT { (Some(values), None) } else { (None, Some(values)) };
                    out.push(spec.output_row(left, right));
                }
            });
        }
        self.watermark = Some(watermark);
    }

    /// What this epoch changed in `left` and `right`, in table order.
    pub fn take_writes(&mut self) -> Vec<TableWrites> {
        self.sides.iter_mut().map(Side::take_writes).collect()
    }

    /// Rows held (both sides).
    pub fn open_rows(&self) -> usize {
        self.sides.iter().map(|s| s.rows).sum()
    }

    /// Join keys held (both sides): distinct keys of the left side plus those of the right.
    pub fn open_keys(&self) -> usize {
        self.sides.iter().map(|s| s.entries.len()).sum()
    }
}

#[cfg(test)]
mod tests;
