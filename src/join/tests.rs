//! The interval join on concrete cases, then against a naive model: random rows on both sides
//! with disorder, random epochs; the rows emitted in each epoch must be exactly the model's,
//! the state tables written must mirror the operator's memory, and a run restored from those
//! tables at any epoch must continue as if uninterrupted.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::types::{encode_key_value, FieldType};

/// Both sides carry `(k, id)`; the output is `(l.id, r.id, coalesce(l.k, r.k))`.
fn spec(kind: JoinKind, lower: i64, upper: i64) -> JoinSpec {
    let columns = [
        ("l.k", FieldType::String),
        ("l.id", FieldType::Int),
        ("r.k", FieldType::String),
        ("r.id", FieldType::Int),
    ];
    JoinSpec {
        kind,
        lower,
        upper,
        left_width: 2,
        right_width: 2,
        select: ["l.id", "r.id", "coalesce(l.k, r.k)"]
            .iter()
            .map(|text| Expr::compile(text, &columns).unwrap())
            .collect(),
    }
}

fn key_value(k: Option<&str>) -> Value {
    k.map_or(Value::Null, |s| Value::Str(s.into()))
}

fn join_key(k: Option<&str>) -> Vec<u8> {
    let mut key = Vec::new();
    encode_key_value(&mut key, &key_value(k));
    key
}

/// Gives the operator the row `(k, id)` at `t` on `port`, as the shard does.
fn feed(op: &mut JoinOperator, port: usize, t: EventTime, k: Option<&str>, id: i64) {
    let mut blob = Vec::new();
    encode_key_value(&mut blob, &key_value(k));
    encode_key_value(&mut blob, &Value::Int(id));
    let inputs = [InSlot::Bytes {
        start: 0,
        end: blob.len() as u32,
    }];
    op.process(port, t, &join_key(k), &inputs, &blob);
}

/// An output row as (left id, right id, key).
type Ids = (Option<i64>, Option<i64>, Option<String>);

fn ids(row: &OutputRow) -> Ids {
    assert_eq!((row.window_start, row.window_end, row.retract), (0, 0, false));
    assert!(row.key.is_empty());
    let id = |v: &Value| match v {
        Value::Int(i) => Some(*i),
        Value::Null => None,
        other => panic!("id {other:?}"),
    };
    let key = match &row.values[2] {
        Value::Str(s) => Some(s.clone()),
        Value::Null => None,
        other => panic!("key {other:?}"),
    };
    (id(&row.values[0]), id(&row.values[1]), key)
}

/// Ends an epoch; the rows emitted, sorted.
fn finish(op: &mut JoinOperator, prev: EventTime, watermark: EventTime) -> Vec<Ids> {
    let mut out = Vec::new();
    op.finish_epoch(prev, watermark, &mut out);
    let mut rows: Vec<Ids> = out.iter().map(ids).collect();
    rows.sort();
    rows
}

fn pair(l: i64, r: i64, k: &str) -> Ids {
    (Some(l), Some(r), Some(k.into()))
}

fn left_only(l: i64, k: Option<&str>) -> Ids {
    (Some(l), None, k.map(String::from))
}

fn right_only(r: i64, k: Option<&str>) -> Ids {
    (None, Some(r), k.map(String::from))
}

#[test]
fn inner_pairs_match_within_the_interval_in_either_arrival_order() {
    let mut op = JoinOperator::new(spec(JoinKind::Inner, -5, 5));
    feed(&mut op, LEFT, 10, Some("a"), 1);
    feed(&mut op, RIGHT, 15, Some("a"), 2); // tl + upper: matches
    feed(&mut op, RIGHT, 16, Some("a"), 3); // past tl + upper
    feed(&mut op, RIGHT, 5, Some("a"), 4); // tl + lower: matches
    feed(&mut op, RIGHT, 4, Some("a"), 5); // before tl + lower
    feed(&mut op, RIGHT, 10, Some("b"), 6); // other key
    assert_eq!(finish(&mut op, EventTime::MIN, 0), vec![pair(1, 2, "a"), pair(1, 4, "a")]);
    // The right row first: the left row arriving second emits the pair.
    feed(&mut op, RIGHT, 20, Some("a"), 7);
    feed(&mut op, LEFT, 25, Some("a"), 8); // 25 - 5 <= 20
    feed(&mut op, LEFT, 26, Some("a"), 9); // 26 - 5 > 20
    assert_eq!(finish(&mut op, 0, 1), vec![pair(8, 7, "a")]);
    assert_eq!(op.open_keys(), 3, "a on both sides, b on the right");
    assert_eq!(finish(&mut op, 1, 1000), vec![], "an inner join pads nothing");
    assert_eq!((op.open_rows(), op.open_keys()), (0, 0));
}

#[test]
fn left_outer_row_is_padded_exactly_when_it_expires() {
    let mut op = JoinOperator::new(spec(JoinKind::Left, 0, 10));
    feed(&mut op, LEFT, 100, Some("a"), 1);
    feed(&mut op, RIGHT, 105, Some("b"), 2); // the inner side: dropped unmatched, never emitted
    assert_eq!(finish(&mut op, EventTime::MIN, 50), vec![]);
    // 100 + 10 < 110 does not hold yet: a right row at 110 could still match.
    assert_eq!(finish(&mut op, 50, 110), vec![]);
    assert_eq!(op.open_rows(), 1, "the right row expired: 105 - 0 < 110");
    assert_eq!(finish(&mut op, 110, 111), vec![left_only(1, Some("a"))]);
    assert_eq!(op.open_rows(), 0);
    assert_eq!(finish(&mut op, 111, 500), vec![], "never twice");
}

#[test]
fn right_and_full_outer_pad_their_unmatched_rows() {
    for kind in [JoinKind::Right, JoinKind::Full] {
        let mut op = JoinOperator::new(spec(kind, -3, 3));
        feed(&mut op, LEFT, 10, Some("a"), 1);
        feed(&mut op, RIGHT, 12, Some("a"), 2);
        feed(&mut op, RIGHT, 20, Some("a"), 3);
        feed(&mut op, LEFT, 30, Some("b"), 4);
        assert_eq!(finish(&mut op, EventTime::MIN, 0), vec![pair(1, 2, "a")]);
        // Right row 20 expires when 20 - lower = 23 < W.
        assert_eq!(finish(&mut op, 0, 23), vec![]);
        assert_eq!(finish(&mut op, 23, 24), vec![right_only(3, Some("a"))], "{kind:?}");
        // Left row 30 expires when 30 + upper = 33 < W.
        assert_eq!(finish(&mut op, 24, 33), vec![]);
        let padded = if kind == JoinKind::Full { vec![left_only(4, Some("b"))] } else { vec![] };
        assert_eq!(finish(&mut op, 33, 34), padded, "{kind:?}");
        assert_eq!(op.open_rows(), 0);
    }
}

#[test]
fn null_keys_never_match() {
    let mut op = JoinOperator::new(spec(JoinKind::Full, -5, 5));
    feed(&mut op, LEFT, 10, None, 1);
    feed(&mut op, RIGHT, 10, None, 2);
    assert_eq!(finish(&mut op, EventTime::MIN, 0), vec![]);
    assert_eq!(finish(&mut op, 0, 100), vec![right_only(2, None), left_only(1, None)]);

    // An inner side drops its NULL-key rows at once.
    let mut op = JoinOperator::new(spec(JoinKind::Left, -5, 5));
    feed(&mut op, LEFT, 10, None, 1);
    feed(&mut op, RIGHT, 10, None, 2);
    assert_eq!(op.open_rows(), 1);
    assert_eq!(finish(&mut op, EventTime::MIN, 100), vec![left_only(1, None)]);
}

#[test]
fn key_has_null_walks_every_component_type() {
    let encode = |values: &[Value]| {
        let mut key = Vec::new();
        for v in values {
            encode_key_value(&mut key, v);
        }
        key
    };
    let parts = [
        Value::Str("x\0y".into()),
        Value::Int(0),
        Value::Float(1.5),
        Value::Bool(false),
        Value::Time(-1),
        Value::Str(String::new()),
    ];
    assert!(!key_has_null(&[]));
    assert!(!key_has_null(&encode(&parts)));
    for at in 0..=parts.len() {
        let mut with_null = parts.to_vec();
        with_null.insert(at, Value::Null);
        assert!(key_has_null(&encode(&with_null)), "NULL at {at}");
    }
    let whole = encode(&parts);
    assert!(key_has_null(&whole[..whole.len() - 1]), "truncated keys never match");
    assert!(key_has_null(&[9]), "unknown tags never match");
}

#[test]
fn negative_bounds_match_right_rows_before_the_left_one() {
    let mut op = JoinOperator::new(spec(JoinKind::Full, -10, -2));
    feed(&mut op, LEFT, 100, Some("a"), 1);
    feed(&mut op, RIGHT, 95, Some("a"), 2);
    feed(&mut op, RIGHT, 99, Some("a"), 3); // after tl + upper = 98
    feed(&mut op, RIGHT, 90, Some("a"), 4);
    feed(&mut op, RIGHT, 89, Some("a"), 5); // before tl + lower = 90
    feed(&mut op, RIGHT, 200, Some("a"), 6);
    feed(&mut op, LEFT, 205, Some("a"), 7); // 195 <= 200 <= 203
    feed(&mut op, LEFT, 201, Some("a"), 8); // 191 <= 200 but 200 > 199
                                            // At W = 99 left row 100 expires already (100 - 2 < 99): nothing can match it any more.
                                            // Right rows expire when tr + 10 < W: none at 99, 89 at 100.
    assert_eq!(finish(&mut op, EventTime::MIN, 99), vec![pair(1, 2, "a"), pair(1, 4, "a"), pair(7, 6, "a")]);
    assert_eq!(finish(&mut op, 99, 100), vec![right_only(5, Some("a"))]);
    assert_eq!(finish(&mut op, 100, 1000), vec![right_only(3, Some("a")), left_only(8, Some("a"))]);
    assert_eq!(op.open_rows(), 0);
}

#[test]
fn several_rows_at_one_time_and_key_share_an_entry() {
    let mut op = JoinOperator::new(spec(JoinKind::Full, 0, 0));
    feed(&mut op, LEFT, 10, Some("a"), 1);
    feed(&mut op, LEFT, 10, Some("a"), 2);
    feed(&mut op, RIGHT, 10, Some("a"), 3);
    feed(&mut op, RIGHT, 10, Some("a"), 4);
    feed(&mut op, LEFT, 10, Some("a"), 5);
    let mut expected = vec![
        pair(1, 3, "a"),
        pair(2, 3, "a"),
        pair(1, 4, "a"),
        pair(2, 4, "a"),
        pair(5, 3, "a"),
        pair(5, 4, "a"),
    ];
    expected.sort();
    assert_eq!(finish(&mut op, EventTime::MIN, 10), expected);
    let writes = op.take_writes();
    let entry_key = [&encode_time_key(10)[..], &join_key(Some("a"))].concat();
    assert_eq!(writes[LEFT].puts.len(), 1);
    assert_eq!(writes[LEFT].puts[0].0, entry_key);
    let rows: Vec<(bool, Vec<Value>)> = rows_of(&writes[LEFT].puts[0].1).map(|(m, v)| (m, decode_key(v).unwrap())).collect();
    let row = |id| vec![Value::Str("a".into()), Value::Int(id)];
    assert_eq!(rows, vec![(true, row(1)), (true, row(2)), (true, row(5))]);
    assert_eq!(finish(&mut op, 10, 11), vec![], "all matched");
    assert_eq!(op.open_rows(), 0);
}

#[test]
fn a_pair_across_epochs_is_emitted_by_the_later_row_and_remembered() {
    for kind in [JoinKind::Inner, JoinKind::Left] {
        let mut op = JoinOperator::new(spec(kind, 0, 10));
        feed(&mut op, LEFT, 10, Some("a"), 1);
        assert_eq!(finish(&mut op, EventTime::MIN, 5), vec![]);
        let first = op.take_writes();
        assert_eq!(first[LEFT].puts.len(), 1);
        feed(&mut op, RIGHT, 15, Some("a"), 2);
        assert_eq!(finish(&mut op, 5, 12), vec![pair(1, 2, "a")]);
        let second = op.take_writes();
        assert_eq!(second[RIGHT].puts.len(), 1);
        if kind == JoinKind::Left {
            // The left row's matched flag is what keeps it from being padded after a restart.
            assert_eq!(second[LEFT].puts.len(), 1);
            assert_eq!(rows_of(&second[LEFT].puts[0].1).map(|(m, _)| m).collect::<Vec<_>>(), vec![true]);
        } else {
            assert!(second[LEFT].puts.is_empty(), "an inner side does not rewrite entries for flags");
        }
        assert_eq!(finish(&mut op, 12, 100), vec![], "{kind:?}: matched, so not padded");
        let last = op.take_writes();
        for w in &last {
            assert_eq!(w.delete_ranges.len(), 1);
            assert!(w.puts.is_empty() && w.deletes.is_empty());
        }
        assert_eq!(op.open_rows(), 0);
    }
}

#[test]
fn expired_entries_are_a_range_delete_not_puts() {
    let mut op = JoinOperator::new(spec(JoinKind::Left, 0, 5));
    feed(&mut op, LEFT, 10, Some("a"), 1);
    feed(&mut op, LEFT, 20, Some("b"), 2);
    assert_eq!(finish(&mut op, EventTime::MIN, 16), vec![left_only(1, Some("a"))]);
    let writes = op.take_writes();
    assert_eq!(
        writes[LEFT].delete_ranges,
        vec![(encode_time_key(EventTime::MIN).to_vec(), encode_time_key(11).to_vec())]
    );
    let put_keys: Vec<&Vec<u8>> = writes[LEFT].puts.iter().map(|(k, _)| k).collect();
    assert_eq!(put_keys, vec![&[&encode_time_key(20)[..], &join_key(Some("b"))].concat()]);
    assert!(writes[RIGHT].is_empty());
    assert!(op.take_writes().iter().all(TableWrites::is_empty), "nothing changed since");
}

#[test]
fn the_last_watermark_expires_rows_at_the_end_of_time() {
    // upper < 0: the left threshold W - upper is past i64::MAX.
    let mut op = JoinOperator::new(spec(JoinKind::Full, -5, -1));
    feed(&mut op, LEFT, EventTime::MAX, Some("a"), 1);
    feed(&mut op, RIGHT, EventTime::MAX - 2, Some("a"), 2);
    feed(&mut op, RIGHT, EventTime::MIN, Some("a"), 3);
    assert_eq!(
        finish(&mut op, EventTime::MIN, EventTime::MIN),
        vec![pair(1, 2, "a")],
        "nothing below MIN - 5 exists"
    );
    assert_eq!(finish(&mut op, EventTime::MIN, EventTime::MAX), vec![right_only(3, Some("a"))]);
    // A left row at up to i64::MAX, not late, could still match the right row at MAX - 2.
    assert_eq!(op.open_rows(), 1);
    let writes = op.take_writes();
    let stored = [&encode_time_key(EventTime::MAX)[..], &join_key(Some("a"))].concat();
    let (from, to) = &writes[LEFT].delete_ranges[0];
    assert!(from.as_slice() <= stored.as_slice() && stored < *to, "the range covers a row at i64::MAX");
    assert!(writes[LEFT].puts.is_empty());
    assert_eq!(writes[RIGHT].puts.len(), 1, "the right row at MAX - 2, still held");
}

#[test]
fn restore_keeps_owned_keys_and_names_bad_entries() {
    let mut op = JoinOperator::new(spec(JoinKind::Full, 0, 10));
    feed(&mut op, LEFT, 10, Some("a"), 1);
    feed(&mut op, LEFT, 10, Some("b"), 2);
    feed(&mut op, RIGHT, 12, Some("a"), 3);
    assert_eq!(finish(&mut op, EventTime::MIN, 0), vec![pair(1, 3, "a")]);
    let writes = op.take_writes();

    let mut restored = JoinOperator::new(spec(JoinKind::Full, 0, 10));
    let only_a = |k: &[u8]| k == join_key(Some("a")).as_slice();
    let mut kept = Vec::new();
    for (table, w) in writes.iter().enumerate() {
        for (k, v) in &w.puts {
            kept.push(restored.restore(table, k, v, only_a).unwrap());
        }
    }
    kept.sort();
    assert_eq!(kept, vec![false, true, true]);
    restored.resume_at(Some(0));
    assert_eq!((restored.open_rows(), restored.open_keys()), (2, 2));
    assert_eq!(finish(&mut restored, 0, 100), vec![], "matched before the restart");

    let (k, v) = &writes[LEFT].puts[0];
    let mut fresh = JoinOperator::new(spec(JoinKind::Full, 0, 10));
    let all = |_: &[u8]| true;
    assert!(fresh.restore(2, k, v, all).unwrap_err().contains("table 2"));
    assert!(fresh.restore(LEFT, &k[..7], v, all).unwrap_err().contains("shorter"));
    assert!(fresh.restore(LEFT, k, &[], all).unwrap_err().contains("no rows"));
    assert!(fresh.restore(LEFT, k, &v[..v.len() - 1], all).unwrap_err().contains("truncated"));
    let mut bad_flag = v.clone();
    bad_flag[0] = 7;
    assert!(fresh.restore(LEFT, k, &bad_flag, all).unwrap_err().contains("flag"));
    let mut narrow = Vec::new();
    push_row(&mut narrow, false, &join_key(Some("a")));
    assert!(fresh.restore(LEFT, k, &narrow, all).unwrap_err().contains("carries 1 values"));
    assert_eq!(fresh.open_rows(), 0);
    assert!(fresh.restore(LEFT, k, v, all).unwrap());
    assert!(fresh.restore(LEFT, k, v, all).unwrap_err().contains("twice"));
}

/// The state tables as the store holds them: writes applied in their order.
#[derive(Default)]
struct Tables([BTreeMap<Vec<u8>, Vec<u8>>; 2]);

impl Tables {
    fn apply(&mut self, writes: Vec<TableWrites>) {
        assert_eq!(writes.len(), JoinOperator::TABLES.len());
        for (table, w) in self.0.iter_mut().zip(writes) {
            w.apply_to(table);
        }
    }

    /// The tables must hold exactly what the operator holds in memory.
    fn assert_mirrors(&self, op: &JoinOperator) {
        for (table, side) in self.0.iter().zip(&op.sides) {
            let mut memory = BTreeMap::new();
            for (key, k) in &side.entries {
                assert_eq!(key, &k.key);
                assert!(
                    k.times.0.iter().zip(k.times.0.iter().skip(1)).all(|(a, b)| a.0 < b.0),
                    "a key's entries are sorted by time"
                );
                for (t, entry) in &k.times.0 {
                    memory.insert([&encode_time_key(*t)[..], key].concat(), entry.encoded.clone());
                }
            }
            assert_eq!(table, &memory);
            assert_eq!(side.rows, memory.values().map(|v| rows_of(v).count()).sum::<usize>());
            let indexed: BTreeMap<Vec<u8>, ()> = side.by_time.iter().map(|(t, key)| ([&encode_time_key(*t)[..], key].concat(), ())).collect();
            assert!(indexed.keys().eq(memory.keys()), "the time index holds every entry once");
        }
    }

    fn restore(&self, spec: JoinSpec, watermark: EventTime) -> JoinOperator {
        let mut op = JoinOperator::new(spec);
        for (i, table) in self.0.iter().enumerate() {
            for (k, v) in table {
                assert!(op.restore(i, k, v, |_| true).unwrap());
            }
        }
        op.resume_at(Some(watermark));
        op
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// A row at (previous watermark, or 0) + `dt`; key 3 is NULL.
    Row {
        port: usize,
        dt: i64,
        key: u8,
    },
    Epoch {
        advance: i64,
    },
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (0..2usize, -6i64..25, 0u8..4).prop_map(|(port, dt, key)| Step::Row { port, dt, key }),
        1 => (0i64..12).prop_map(|advance| Step::Epoch { advance }),
    ]
}

fn arb_kind() -> impl Strategy<Value = JoinKind> {
    prop_oneof![Just(JoinKind::Inner), Just(JoinKind::Left), Just(JoinKind::Right), Just(JoinKind::Full)]
}

const KEYS: [Option<&str>; 4] = [Some("a"), Some("b"), Some("c"), None];

struct Accepted {
    port: usize,
    t: EventTime,
    key: Option<&'static str>,
    id: i64,
    epoch: usize,
}

/// What the join must emit, by epoch: every pair in the epoch its second row arrived, every
/// unmatched row of an outer side in the first epoch (from its own on) that it expires at.
fn model(spec: &JoinSpec, rows: &[Accepted], watermarks: &[EventTime]) -> Vec<(usize, Ids)> {
    let mut out = Vec::new();
    let (left, right): (Vec<&Accepted>, Vec<&Accepted>) = rows.iter().partition(|r| r.port == LEFT);
    let mut matched = vec![false; rows.len()];
    for l in &left {
        for r in &right {
            let Some(key) = l.key else { continue };
            if l.key == r.key && l.t + spec.lower <= r.t && r.t <= l.t + spec.upper {
                out.push((l.epoch.max(r.epoch), pair(l.id, r.id, key)));
                matched[l.id as usize] = true;
                matched[r.id as usize] = true;
            }
        }
    }
    for r in rows.iter().filter(|r| spec.kind.is_outer(r.port) && !matched[r.id as usize]) {
        let expired = |w: EventTime| {
            if r.port == LEFT {
                (r.t as i128 + spec.upper as i128) < w as i128
            } else {
                (r.t as i128 - spec.lower as i128) < w as i128
            }
        };
        let epoch = (r.epoch..watermarks.len())
            .find(|&e| expired(watermarks[e]))
            .expect("the last watermark expires every row");
        let row = if r.port == LEFT { left_only(r.id, r.key) } else { right_only(r.id, r.key) };
        out.push((epoch, row));
    }
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn join_matches_a_naive_model(
        kind in arb_kind(),
        lower in -8i64..8,
        span in 0i64..12,
        steps in proptest::collection::vec(arb_step(), 0..80),
        restore_after in proptest::option::of(0usize..16),
    ) {
        let spec = spec(kind, lower, lower + span);
        let mut op = JoinOperator::new(spec.clone());
        let mut tables = Tables::default();
        let (mut accepted, mut watermarks, mut emitted) = (Vec::new(), Vec::new(), Vec::new());
        let mut prev = EventTime::MIN;
        let steps = steps.into_iter().chain([Step::Epoch { advance: EventTime::MAX }]);
        for step in steps {
            match step {
                Step::Row { port, dt, key } => {
                    let t = prev.max(0) + dt;
                    if op.is_late(t, prev) {
                        continue;
                    }
                    let id = accepted.len() as i64;
                    feed(&mut op, port, t, KEYS[key as usize], id);
                    accepted.push(Accepted { port, t, key: KEYS[key as usize], id, epoch: watermarks.len() });
                }
                Step::Epoch { advance } => {
                    let watermark = if advance == EventTime::MAX { advance } else { prev.max(0) + advance };
                    let epoch = watermarks.len();
                    emitted.extend(finish(&mut op, prev, watermark).into_iter().map(|row| (epoch, row)));
                    tables.apply(op.take_writes());
                    tables.assert_mirrors(&op);
                    watermarks.push(watermark);
                    prev = watermark;
                    if restore_after == Some(epoch) {
                        op = tables.restore(spec.clone(), watermark);
                        tables.assert_mirrors(&op);
                    }
                }
            }
        }
        emitted.sort();
        prop_assert_eq!(emitted, model(&spec, &accepted, &watermarks));
        prop_assert_eq!((op.open_rows(), op.open_keys()), (0, 0));
        prop_assert!(tables.0.iter().all(BTreeMap::is_empty));
    }
}
