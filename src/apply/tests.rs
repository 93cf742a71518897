use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::decode::encode_position_int;
use crate::types::{encode_key_value, Value};

/// One change: key, delete?, position, value.
type Change = (i64, bool, i64, i64);

fn key_of(k: i64) -> Vec<u8> {
    let mut key = Vec::new();
    encode_key_value(&mut key, &Value::Str(format!("order-{k}")));
    key
}

/// Feeds one change to the operator the way the shard encodes it.
fn feed(op: &mut ApplyOperator, &(k, delete, position, value): &Change) {
    let mut blob = Vec::new();
    encode_position_int(&mut blob, position);
    let position_end = blob.len() as u32;
    if !delete {
        encode_key_value(&mut blob, &Value::Int(value));
        encode_key_value(&mut blob, &Value::Null);
    }
    let inputs = [
        InSlot::Int(if delete { DELETE } else { UPSERT }),
        InSlot::Bytes { start: 0, end: position_end },
        InSlot::Bytes {
            start: position_end,
            end: blob.len() as u32,
        },
    ];
    op.process(&key_of(k), &inputs, &blob);
}

/// The table as the sink keeps it: upserts replace the key's row, retractions delete it.
fn apply_rows(table: &mut BTreeMap<Vec<u8>, Vec<Value>>, rows: Vec<OutputRow>) {
    let mut seen = std::collections::HashSet::new();
    for row in rows {
        assert!(seen.insert(row.key.clone()), "one row per key per epoch");
        assert_eq!((row.window_start, row.window_end), (0, 0));
        if row.retract {
            table.remove(&row.key);
        } else {
            assert_eq!(row.values.len(), 2);
            table.insert(row.key, row.values);
        }
    }
}

/// The naive model: per key, the change with the highest position (the first to arrive among
/// equal ones); the key's row when that change is an upsert.
fn model(changes: &[Change]) -> BTreeMap<Vec<u8>, Vec<Value>> {
    let mut by_key: BTreeMap<i64, Vec<(usize, &Change)>> = BTreeMap::new();
    for (i, c) in changes.iter().enumerate() {
        by_key.entry(c.0).or_default().push((i, c));
    }
    by_key
        .into_iter()
        .filter_map(|(k, cs)| {
            let (_, &(_, delete, _, value)) = cs.into_iter().max_by_key(|(i, c)| (c.2, std::cmp::Reverse(*i))).unwrap();
            (!delete).then(|| (key_of(k), vec![Value::Int(value), Value::Null]))
        })
        .collect()
}

fn changes() -> impl Strategy<Value = Vec<Change>> {
    // Few keys and positions: duplicates, replays and deletes followed by older updates are common.
    proptest::collection::vec((0i64..6, proptest::bool::weighted(0.25), 0i64..40, -5i64..5), 0..200)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn the_table_is_the_latest_change_per_key_across_epochs_and_restores(
        changes in changes(),
        cuts in proptest::collection::vec(0usize..200, 0..8),
        restore_at in proptest::collection::vec(0usize..200, 0..3),
    ) {
        let spec = ApplySpec { value_width: 2 };
        let mut op = ApplyOperator::new(spec.clone());
        let mut table = BTreeMap::new();
        let mut state: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let mut skipped = 0;
        let end_epoch = |op: &mut ApplyOperator, table: &mut BTreeMap<Vec<u8>, Vec<Value>>, state: &mut BTreeMap<Vec<u8>, Vec<u8>>| {
            let mut out = Vec::new();
            op.finish_epoch(&mut out);
            apply_rows(table, out);
            for writes in op.take_writes() {
                writes.apply_to(state);
            }
        };
        // Index of the first change after the last committed epoch.
        let mut committed = 0;
        for (i, change) in changes.iter().enumerate() {
            if cuts.contains(&i) {
                end_epoch(&mut op, &mut table, &mut state);
                committed = i;
            }
            if restore_at.contains(&i) {
                // A crash: the epoch in progress is lost with the process; the restarted one
                // restores the state of the last committed epoch and reads its changes again.
                op = ApplyOperator::new(spec.clone());
                for (k, v) in &state {
                    prop_assert!(op.restore(0, k, v, |_| true).unwrap());
                }
                changes[committed..i].iter().for_each(|c| feed(&mut op, c));
            }
            feed(&mut op, change);
        }
        end_epoch(&mut op, &mut table, &mut state);
        skipped += op.take_skipped();
        prop_assert_eq!(&table, &model(&changes));
        // Every key ever changed is in state, deleted ones too (tombstones).
        let keys: std::collections::BTreeSet<Vec<u8>> = changes.iter().map(|c| key_of(c.0)).collect();
        prop_assert_eq!(state.keys().cloned().collect::<std::collections::BTreeSet<_>>(), keys.clone());
        prop_assert_eq!(op.open_keys(), keys.len());
        // Without crashes, a change is applied at most once per key and position: the rest
        // were skipped.
        if restore_at.is_empty() {
            let applied_at_most = changes.iter().map(|c| (c.0, c.2)).collect::<std::collections::BTreeSet<_>>().len();
            prop_assert!(changes.len() as u64 - skipped <= applied_at_most as u64);
        }
    }

    #[test]
    fn any_arrival_order_of_distinct_positions_gives_the_same_table(mut changes in changes(), seed in any::<u64>()) {
        // Distinct positions per key: then the result may not depend on the order at all.
        let mut seen = std::collections::HashSet::new();
        changes.retain(|c| seen.insert((c.0, c.2)));
        let run = |changes: &[Change]| {
            let mut op = ApplyOperator::new(ApplySpec { value_width: 2 });
            changes.iter().for_each(|c| feed(&mut op, c));
            let mut out = Vec::new();
            op.finish_epoch(&mut out);
            let mut table = BTreeMap::new();
            apply_rows(&mut table, out);
            table
        };
        let mut shuffled = changes.clone();
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        prop_assert_eq!(run(&changes), run(&shuffled));
    }
}

#[test]
fn a_deleted_key_is_not_resurrected_by_an_older_update() {
    let mut op = ApplyOperator::new(ApplySpec { value_width: 2 });
    let mut table = BTreeMap::new();
    feed(&mut op, &(1, false, 10, 100));
    feed(&mut op, &(2, false, 11, 200));
    let mut out = Vec::new();
    op.finish_epoch(&mut out);
    apply_rows(&mut table, out);
    assert_eq!(table.len(), 2);
    assert_eq!(op.take_writes()[0].puts.len(), 2);
    feed(&mut op, &(1, true, 20, 0));
    let mut out = Vec::new();
    op.finish_epoch(&mut out);
    // The tombstone: deleted, with its position.
    let mut tombstone = vec![1];
    encode_position_int(&mut tombstone, 20);
    assert_eq!(op.take_writes()[0].puts, vec![(key_of(1), tombstone)]);
    assert_eq!(out.len(), 1, "only the changed key is emitted");
    assert!(out[0].retract);
    apply_rows(&mut table, out);
    // An update from before the delete, replayed, and a duplicate of the delete.
    feed(&mut op, &(1, false, 15, 150));
    feed(&mut op, &(1, true, 20, 0));
    feed(&mut op, &(2, false, 11, 200));
    let mut out = Vec::new();
    op.finish_epoch(&mut out);
    assert!(out.is_empty(), "nothing changed: {out:?}");
    assert_eq!(op.take_skipped(), 3);
    assert_eq!(op.take_skipped(), 0);
    assert_eq!(table.keys().cloned().collect::<Vec<_>>(), vec![key_of(2)]);
    assert!(op.take_writes()[0].puts.is_empty(), "a skipped change writes nothing");
}

#[test]
fn restore_refuses_corrupt_entries_and_skips_other_shards_keys() {
    let mut op = ApplyOperator::new(ApplySpec { value_width: 1 });
    assert!(op.restore(0, b"k", &[], |_| true).unwrap_err().contains("empty"));
    assert!(op.restore(0, b"k", &[7, 1], |_| true).unwrap_err().contains("flag 7"));
    assert!(op.restore(1, b"k", &[0], |_| true).is_err());
    assert!(!op.restore(0, b"k", &[0, 1], |_| false).unwrap());
    assert_eq!(op.open_keys(), 0);
}
