//! Tests of the Delta sink's table options, upserts, overwrites and maintenance (compaction,
//! checkpoints, vacuum), reading the tables back from disk.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use deltalake::arrow::array::{Array, Int64Array, RecordBatch, StringArray};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::delta::*;

const APP: &str = "tidemark-test";

/// `(key, day, value)`: `day` is the partition column of partitioned layouts.
type Row = (String, String, i64);

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("day", DataType::Utf8, false),
        Field::new("value", DataType::Int64, true),
    ]))
}

fn batch(rows: &[Row]) -> RecordBatch {
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0.as_str()))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1.as_str()))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
        ],
    )
    .unwrap()
}

fn row(key: &str, day: &str, value: i64) -> Row {
    (key.to_owned(), day.to_owned(), value)
}

/// A batch with only the given string columns, as an upsert's `deletes` carries.
fn key_batch(columns: &[(&str, Vec<String>)]) -> RecordBatch {
    let fields: Vec<Field> = columns.iter().map(|(name, _)| Field::new(*name, DataType::Utf8, false)).collect();
    let arrays = columns
        .iter()
        .map(|(_, values)| Arc::new(StringArray::from_iter_values(values)) as Arc<dyn Array>)
        .collect();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).unwrap()
}

fn rows_of(batches: &[RecordBatch]) -> Vec<Row> {
    let mut out = Vec::new();
    for batch in batches {
        assert_eq!(batch.schema(), schema());
        let keys = batch.column(0).as_any().downcast_ref::<StringArray>().unwrap();
        let days = batch.column(1).as_any().downcast_ref::<StringArray>().unwrap();
        let values = batch.column(2).as_any().downcast_ref::<Int64Array>().unwrap();
        for i in 0..batch.num_rows() {
            out.push((keys.value(i).to_owned(), days.value(i).to_owned(), values.value(i)));
        }
    }
    out.sort();
    out
}

async fn table_rows(path: &Path, version: Option<i64>) -> Vec<Row> {
    rows_of(&read_table(path, version).await.unwrap())
}

fn options(partition_by: &[&str], target_file_size_bytes: u64, checkpoint_interval: u64) -> TableOptions {
    TableOptions {
        partition_by: partition_by.iter().map(|s| s.to_string()).collect(),
        target_file_size_bytes,
        checkpoint_interval,
        log_retention: None,
        window_columns: None,
    }
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// The actions of one commit, as `(kind, body)` pairs from its `_delta_log` JSON file.
fn commit_actions(path: &Path, version: i64) -> Vec<(String, serde_json::Value)> {
    let text = std::fs::read_to_string(path.join(format!("_delta_log/{version:020}.json"))).unwrap();
    text.lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            let (kind, body) = value.as_object().unwrap().iter().next().unwrap();
            (kind.clone(), body.clone())
        })
        .collect()
}

fn count(actions: &[(String, serde_json::Value)], kind: &str) -> usize {
    actions.iter().filter(|(k, _)| k == kind).count()
}

/// Parquet data files on disk (anywhere under the table, outside `_delta_log`).
fn data_files_on_disk(path: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap().path();
            if entry.is_dir() {
                if !entry.ends_with("_delta_log") {
                    walk(root, &entry, out);
                }
            } else if entry.extension().is_some_and(|e| e == "parquet") {
                out.insert(entry.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(path, path, &mut out);
    out
}

fn active_file_count(path: &Path) -> usize {
    // Every add/remove in the log, replayed: simple enough for the few versions of a test.
    let mut active = BTreeSet::new();
    let mut version = 0;
    while path.join(format!("_delta_log/{version:020}.json")).exists() {
        for (kind, body) in commit_actions(path, version) {
            let file = body["path"].as_str().map(str::to_owned);
            match kind.as_str() {
                "add" => active.insert(file.unwrap()),
                "remove" => active.remove(&file.unwrap()),
                _ => false,
            };
        }
        version += 1;
    }
    active.len()
}

struct Layout {
    partition_by: &'static [&'static str],
    key_columns: &'static [&'static str],
}

/// Random upserts and deletes over a small key space, checked after every epoch against a
/// map from key to row; with compaction, reopening and replays mixed in.
async fn upserts_match_the_model(layout: Layout, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let opts = options(layout.partition_by, 64 * 1024, 7);
    let key_columns = strings(layout.key_columns);
    let keyed_by_day = layout.key_columns.contains(&"day");
    let model_key = |r: &Row| (r.0.clone(), if keyed_by_day { r.1.clone() } else { String::new() });

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut sink = DeltaTableSink::open_or_create(path, schema(), &opts).await.unwrap();
    let mut model: BTreeMap<(String, String), Row> = BTreeMap::new();
    let mut last_committed = None;
    for epoch in 1..=36u64 {
        let upserts: Vec<Row> = (0..rng.random_range(0..6))
            .map(|_| {
                let key = format!("k{}", rng.random_range(0..12));
                let day = format!("2024-01-0{}", rng.random_range(1..4));
                row(&key, &day, rng.random_range(-100..100))
            })
            .collect();
        let deleted: Vec<Row> = (0..rng.random_range(0..3))
            .map(|_| row(&format!("k{}", rng.random_range(0..12)), &format!("2024-01-0{}", rng.random_range(1..4)), 0))
            .collect();
        let mut delete_columns = vec![("key", deleted.iter().map(|r| r.0.clone()).collect())];
        if keyed_by_day {
            delete_columns.push(("day", deleted.iter().map(|r| r.1.clone()).collect()));
        }
        // Split the upserts over two batches to exercise concatenation.
        let half = upserts.len() / 2;
        let outcome = sink
            .upsert_epoch(
                APP,
                epoch,
                &key_columns,
                vec![batch(&upserts[..half]), batch(&upserts[half..])],
                vec![key_batch(&delete_columns)],
            )
            .await
            .unwrap();

        let deletes_something = deleted.iter().any(|d| model.contains_key(&model_key(d)));
        if upserts.is_empty() && !deletes_something {
            assert_eq!(outcome, AppendOutcome::Skipped, "epoch {epoch}");
        } else {
            assert!(matches!(outcome, AppendOutcome::Committed { .. }), "epoch {epoch}: {outcome:?}");
            last_committed = Some(epoch);
        }
        for d in &deleted {
            model.remove(&model_key(d));
        }
        for u in &upserts {
            model.insert(model_key(u), u.clone());
        }

        let rows = table_rows(path, None).await;
        let keys: BTreeSet<_> = rows.iter().map(model_key).collect();
        assert_eq!(keys.len(), rows.len(), "epoch {epoch}: a key appears twice: {rows:?}");
        assert_eq!(rows, model.values().cloned().collect::<Vec<_>>(), "epoch {epoch}");

        if let Some(replayed) = last_committed.filter(|_| epoch % 5 == 0) {
            let version = sink.version();
            let outcome = sink
                .upsert_epoch(APP, replayed, &key_columns, vec![batch(&[row("k0", "2024-01-01", 999)])], Vec::new())
                .await
                .unwrap();
            assert_eq!(outcome, AppendOutcome::AlreadyCommitted, "epoch {epoch}");
            assert_eq!(sink.version(), version);
            assert_eq!(table_rows(path, None).await, rows);
        }
        if epoch % 6 == 0 {
            let committed = sink.committed_epoch(APP).await.unwrap();
            sink.compact(2).await.unwrap();
            assert_eq!(table_rows(path, None).await, rows, "epoch {epoch}: compaction changed the content");
            assert_eq!(sink.committed_epoch(APP).await.unwrap(), committed);
        }
        if epoch % 9 == 0 {
            drop(sink);
            sink = DeltaTableSink::open_or_create(path, schema(), &opts).await.unwrap();
        }
    }
    assert_eq!(sink.committed_epoch(APP).await.unwrap(), last_committed);
    assert!(model.len() > 3, "the sequence should leave some keys: {model:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn upserts_match_a_model_on_an_unpartitioned_table() {
    for seed in [1, 2] {
        let layout = Layout {
            partition_by: &[],
            key_columns: &["key"],
        };
        upserts_match_the_model(layout, seed).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn upserts_match_a_model_when_keys_move_between_partitions() {
    let layout = Layout {
        partition_by: &["day"],
        key_columns: &["key"],
    };
    upserts_match_the_model(layout, 3).await;
    let layout = Layout {
        partition_by: &["day"],
        key_columns: &["key"],
    };
    upserts_match_the_model(layout, 5).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upserts_match_a_model_keyed_by_the_partition_column() {
    let layout = Layout {
        partition_by: &["day"],
        key_columns: &["day", "key"],
    };
    upserts_match_the_model(layout, 4).await;
    let layout = Layout {
        partition_by: &["day"],
        key_columns: &["day", "key"],
    };
    upserts_match_the_model(layout, 6).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upsert_costs_the_files_it_touches_not_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let opts = options(&[], 128 * 1024 * 1024, 0);
    let key = strings(&["key"]);
    let mut sink = DeltaTableSink::open_or_create(path, schema(), &opts).await.unwrap();
    // 30 epochs of 5 new keys each: 30 data files.
    for epoch in 1..=30u64 {
        let rows: Vec<Row> = (0..5).map(|i| row(&format!("k{epoch}-{i}"), "d", i)).collect();
        sink.upsert_epoch(APP, epoch, &key, vec![batch(&rows)], Vec::new()).await.unwrap();
    }
    assert_eq!(active_file_count(path), 30);

    // A fresh sink builds the index once, reading the key columns of every file...
    drop(sink);
    let mut sink = DeltaTableSink::open_or_create(path, schema(), &opts).await.unwrap();
    let outcome = sink
        .upsert_epoch(APP, 31, &key, vec![batch(&[row("k7-2", "d", 100)])], Vec::new())
        .await
        .unwrap();
    let AppendOutcome::Committed { version } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(sink.data_files_read(), 30 + 1);
    // ...and the commit swaps the one file holding the key for its rewrite.
    let actions = commit_actions(path, version);
    assert_eq!(
        (count(&actions, "remove"), count(&actions, "add"), count(&actions, "txn")),
        (1, 1, 1),
        "{actions:?}"
    );
    let remove = &actions.iter().find(|(k, _)| k == "remove").unwrap().1;
    assert_eq!(remove["dataChange"], serde_json::Value::Bool(true));

    // From then on an epoch reads only the files holding its keys.
    let read_before = sink.data_files_read();
    let outcome = sink
        .upsert_epoch(
            APP,
            32,
            &key,
            vec![batch(&[row("k3-0", "d", 7)])],
            vec![key_batch(&[("key", strings(&["k9-4"]))])],
        )
        .await
        .unwrap();
    let AppendOutcome::Committed { version } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(sink.data_files_read() - read_before, 2);
    let actions = commit_actions(path, version);
    assert_eq!((count(&actions, "remove"), count(&actions, "add")), (2, 1), "{actions:?}");

    // A brand-new key reads nothing and only adds.
    let read_before = sink.data_files_read();
    let outcome = sink.upsert_epoch(APP, 33, &key, vec![batch(&[row("new", "d", 1)])], Vec::new()).await.unwrap();
    let AppendOutcome::Committed { version } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(sink.data_files_read(), read_before);
    let actions = commit_actions(path, version);
    assert_eq!((count(&actions, "remove"), count(&actions, "add")), (0, 1), "{actions:?}");

    // Deleting keys that do not exist changes nothing and commits nothing.
    let outcome = sink
        .upsert_epoch(APP, 34, &key, Vec::new(), vec![key_batch(&[("key", strings(&["nope"]))])])
        .await
        .unwrap();
    assert_eq!(outcome, AppendOutcome::Skipped);
    assert_eq!(
        sink.upsert_epoch(APP, 34, &key, vec![batch(&[])], Vec::new()).await.unwrap(),
        AppendOutcome::Skipped
    );

    let rows = table_rows(path, None).await;
    assert_eq!(rows.len(), 150 - 1 + 1);
    assert!(rows.contains(&row("k7-2", "d", 100)) && rows.contains(&row("k3-0", "d", 7)));
    assert!(!rows.iter().any(|r| r.0 == "k9-4"));
    assert_eq!(sink.committed_epoch(APP).await.unwrap(), Some(33));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_key_index_catches_up_with_commits_by_another_handle() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let opts = options(&["day"], 1 << 20, 0);
    let key = strings(&["key"]);
    let mut sink = DeltaTableSink::open_or_create(path, schema(), &opts).await.unwrap();
    for epoch in 1..=4u64 {
        let rows: Vec<Row> = (0..3).map(|i| row(&format!("k{epoch}-{i}"), "d1", i)).collect();
        sink.upsert_epoch(APP, epoch, &key, vec![batch(&rows)], Vec::new()).await.unwrap();
    }
    // Another handle (a restarted daemon, an operator) compacts and appends.
    let mut other = DeltaTableSink::open_or_create(path, schema(), &opts).await.unwrap();
    let report = other.compact(2).await.unwrap().unwrap();
    assert_eq!((report.files_removed, report.files_added), (4, 1));
    other
        .append_epoch("backfill", 1, vec![batch(&[row("b", "d2", 1), row("c", "d2", 2)])])
        .await
        .unwrap();

    // The first handle's index sees the compacted and the appended file: it reads those two
    // (to learn their keys), not the whole table, and the upsert replaces rows in both.
    let read_before = sink.data_files_read();
    sink.upsert_epoch(APP, 5, &key, vec![batch(&[row("k2-1", "d1", 50), row("b", "d1", 60)])], Vec::new())
        .await
        .unwrap();
    assert_eq!(sink.data_files_read() - read_before, 2 + 2);
    let mut expected: Vec<Row> = (1..=4)
        .flat_map(|e| (0..3).map(move |i| row(&format!("k{e}-{i}"), "d1", i)))
        .filter(|r| r.0 != "k2-1")
        .chain([row("k2-1", "d1", 50), row("b", "d1", 60), row("c", "d2", 2)])
        .collect();
    expected.sort();
    assert_eq!(table_rows(path, None).await, expected);
    assert_eq!(sink.committed_epoch(APP).await.unwrap(), Some(5));
    assert_eq!(sink.committed_epoch("backfill").await.unwrap(), Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn upserts_reject_unusable_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = DeltaTableSink::open_or_create(dir.path(), schema(), &TableOptions::default()).await.unwrap();
    let err = sink
        .upsert_epoch(APP, 1, &strings(&["nope"]), vec![batch(&[row("a", "d", 1)])], Vec::new())
        .await
        .unwrap_err();
    assert!(matches!(err, DeltaSinkError::InvalidKeyColumns { .. }), "{err:?}");
    assert!(err.to_string().contains("`nope` is not a column"), "{err}");
    let err = sink
        .upsert_epoch(APP, 1, &strings(&["key", "day"]), Vec::new(), vec![key_batch(&[("key", strings(&["a"]))])])
        .await
        .unwrap_err();
    assert!(matches!(err, DeltaSinkError::BatchSchema { .. }), "{err:?}");
    assert!(err.to_string().contains("key column `day` is missing"), "{err}");
    assert!(!err.is_retryable());
    assert_eq!(sink.committed_epoch(APP).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_overwrite_makes_the_table_exactly_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let mut sink = DeltaTableSink::open_or_create(path, schema(), &options(&["day"], 1 << 20, 0)).await.unwrap();
    // An empty result over an empty table changes nothing.
    assert_eq!(sink.overwrite_epoch(APP, 1, Vec::new()).await.unwrap(), AppendOutcome::Skipped);

    let first = [row("a", "d1", 1), row("b", "d2", 2)];
    sink.append_epoch(APP, 1, vec![batch(&first)]).await.unwrap();
    sink.append_epoch(APP, 2, vec![batch(&[row("c", "d1", 3)])]).await.unwrap();
    let files_before = active_file_count(path);
    assert_eq!(files_before, 3);

    let second = [row("x", "d3", 9), row("a", "d1", 10)];
    let outcome = sink.overwrite_epoch(APP, 3, vec![batch(&second)]).await.unwrap();
    let AppendOutcome::Committed { version } = outcome else {
        panic!("{outcome:?}")
    };
    let actions = commit_actions(path, version);
    assert_eq!(
        (count(&actions, "remove"), count(&actions, "add"), count(&actions, "txn")),
        (3, 2, 1),
        "{actions:?}"
    );
    let mut expected = second.to_vec();
    expected.sort();
    assert_eq!(table_rows(path, None).await, expected);
    // The version before is still readable.
    assert_eq!(table_rows(path, Some(version - 1)).await.len(), 3);

    // A replay is acknowledged without writing.
    assert_eq!(
        sink.overwrite_epoch(APP, 3, vec![batch(&first)]).await.unwrap(),
        AppendOutcome::AlreadyCommitted
    );
    assert_eq!(table_rows(path, None).await, expected);

    // An empty result over a non-empty table empties it, in a commit carrying the epoch.
    let outcome = sink.overwrite_epoch(APP, 4, vec![batch(&[])]).await.unwrap();
    let AppendOutcome::Committed { version } = outcome else {
        panic!("{outcome:?}")
    };
    let actions = commit_actions(path, version);
    assert_eq!(
        (count(&actions, "remove"), count(&actions, "add"), count(&actions, "txn")),
        (2, 0, 1),
        "{actions:?}"
    );
    assert!(table_rows(path, None).await.is_empty());
    assert_eq!(sink.committed_epoch(APP).await.unwrap(), Some(4));
    assert_eq!(sink.overwrite_epoch(APP, 5, Vec::new()).await.unwrap(), AppendOutcome::Skipped);
}

#[tokio::test(flavor = "multi_thread")]
async fn compaction_packs_small_files_without_changing_the_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let opts = options(&["day"], 256 * 1024, 0);
    let mut sink = DeltaTableSink::open_or_create(path, schema(), &opts).await.unwrap();
    for epoch in 1..=8u64 {
        let rows: Vec<Row> = (0..20).map(|i| row(&format!("k{epoch}-{i}"), ["d1", "d2"][i as usize % 2], i)).collect();
        sink.append_epoch(APP, epoch, vec![batch(&rows)]).await.unwrap();
    }
    let before = sink.version().unwrap();
    let rows_before = table_rows(path, None).await;
    assert_eq!(active_file_count(path), 16);

    // Too few small files per partition: nothing to do.
    assert_eq!(sink.compact(9).await.unwrap(), None);
    assert_eq!(sink.version(), Some(before));

    let report = sink.compact(DEFAULT_COMPACTION_MIN_FILES).await.unwrap().expect("16 small files");
    assert_eq!(report.version, before + 1);
    assert_eq!((report.files_removed, report.files_added), (16, 2));
    assert!(report.bytes_added < report.bytes_removed, "{report:?}");
    assert_eq!(active_file_count(path), 2);
    assert_eq!(table_rows(path, None).await, rows_before);
    assert_eq!(table_rows(path, Some(before)).await, rows_before, "time travel to before the compaction");
    assert_eq!(sink.committed_epoch(APP).await.unwrap(), Some(8));

    let actions = commit_actions(path, report.version);
    assert_eq!((count(&actions, "remove"), count(&actions, "add"), count(&actions, "txn")), (16, 2, 0));
    for (kind, body) in &actions {
        if kind == "add" || kind == "remove" {
            assert_eq!(body["dataChange"], serde_json::Value::Bool(false), "{kind}: {body}");
        }
        if kind == "commitInfo" {
            assert_eq!(body["operation"], "OPTIMIZE");
        }
    }
    // Each compacted file holds one partition.
    for (_, add) in actions.iter().filter(|(k, _)| k == "add") {
        let day = add["partitionValues"]["day"].as_str().unwrap();
        assert!(add["path"].as_str().unwrap().starts_with(&format!("day={day}/")), "{add}");
    }
    assert_eq!(sink.compact(DEFAULT_COMPACTION_MIN_FILES).await.unwrap(), None, "already compact");
    // Epochs go on after the compaction.
    assert_eq!(
        sink.append_epoch(APP, 8, vec![batch(&[row("z", "d1", 0)])]).await.unwrap(),
        AppendOutcome::AlreadyCommitted
    );
}

/// Compaction streams each bin batch by batch into the new files; files of several
/// thousand rows (several Parquet batches each) come out with exactly the rows they held.
#[tokio::test(flavor = "multi_thread")]
async fn compaction_streams_many_batches_per_file_and_keeps_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let mut sink = DeltaTableSink::open_or_create(path, schema(), &options(&["day"], 4 << 20, 0)).await.unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut expected = Vec::new();
    for epoch in 1..=6u64 {
        // Random keys do not compress; a duplicate row in each epoch must stay two rows.
        let mut rows: Vec<Row> = (0..5_000)
            .map(|i| row(&format!("key-{:016x}", rng.random::<u64>()), ["d1", "d2"][i % 2], i as i64))
            .collect();
        rows.push(rows[0].clone());
        sink.append_epoch(APP, epoch, vec![batch(&rows)]).await.unwrap();
        expected.extend(rows);
    }
    expected.sort();
    let before = sink.version().unwrap();
    assert_eq!(active_file_count(path), 12);

    let report = sink.compact(DEFAULT_COMPACTION_MIN_FILES).await.unwrap().expect("12 small files");
    assert_eq!((report.files_removed, report.files_added), (12, 2), "{report:?}");
    assert_eq!(table_rows(path, None).await, expected);
    assert_eq!(table_rows(path, Some(before)).await, expected, "time travel to before the compaction");
    for (_, add) in commit_actions(path, report.version).iter().filter(|(k, _)| k == "add") {
        let day = add["partitionValues"]["day"].as_str().unwrap();
        assert!(add["path"].as_str().unwrap().starts_with(&format!("day={day}/")), "{add}");
        let stats: serde_json::Value = serde_json::from_str(add["stats"].as_str().unwrap()).unwrap();
        // Each epoch's first row is in d1, and so is its duplicate.
        let rows = if day == "d1" { 6 * 2_501 } else { 6 * 2_500 };
        assert_eq!(stats["numRecords"], serde_json::json!(rows), "{add}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_are_written_every_interval() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let opts = options(&["day"], 1 << 20, 3);
    let mut sink = DeltaTableSink::open_or_create(path, schema(), &opts).await.unwrap();
    let checkpoint = |version: i64| path.join(format!("_delta_log/{version:020}.checkpoint.parquet"));
    let key = strings(&["key"]);
    for epoch in 1..=2u64 {
        sink.upsert_epoch(APP, epoch, &key, vec![batch(&[row(&format!("k{epoch}"), "d1", 1)])], Vec::new())
            .await
            .unwrap();
    }
    assert!(!path.join("_delta_log/_last_checkpoint").exists());
    // Version 3 rewrites k1's file: the checkpoint must hold the remove.
    sink.upsert_epoch(APP, 3, &key, vec![batch(&[row("k1", "d2", 5)])], Vec::new()).await.unwrap();
    assert_eq!(sink.version(), Some(3));
    assert!(checkpoint(3).exists());
    let last: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path.join("_delta_log/_last_checkpoint")).unwrap()).unwrap();
    assert_eq!(last["version"], 3);
    for epoch in 4..=7u64 {
        sink.append_epoch(APP, epoch, vec![batch(&[row(&format!("k{epoch}"), "d1", 1)])]).await.unwrap();
    }
    assert!(checkpoint(6).exists());
    assert!(!checkpoint(4).exists() && !checkpoint(5).exists() && !checkpoint(7).exists());

    // Readers start from the checkpoint; the table reopens at the newest version.
    drop(sink);
    let mut reopened = DeltaTableSink::open_or_create(path, schema(), &opts).await.unwrap();
    assert_eq!(reopened.version(), Some(7));
    assert_eq!(reopened.committed_epoch(APP).await.unwrap(), Some(7));
    let mut expected = vec![row("k1", "d2", 5), row("k2", "d1", 1)];
    expected.extend((4..=7).map(|e| row(&format!("k{e}"), "d1", 1)));
    expected.sort();
    assert_eq!(table_rows(path, None).await, expected);
    assert_eq!(table_rows(path, Some(6)).await.len(), 5);
}

/// With a log retention, each checkpoint deletes the log files before it that are older
/// than the retention: the log stays short; the epochs (txn actions) and rows live on in the
/// checkpoint, and a reopened table resumes exactly.
#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_clean_up_expired_log_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let opts = TableOptions {
        log_retention: Some(std::time::Duration::ZERO),
        ..options(&[], 1 << 20, 5)
    };
    let mut sink = DeltaTableSink::open_or_create(path, schema(), &opts).await.unwrap();
    for epoch in 1..=23u64 {
        sink.append_epoch(APP, epoch, vec![batch(&[row(&format!("k{epoch}"), "d1", 1)])]).await.unwrap();
        // The same sink goes on after each clean-up: a replayed epoch is still recognised.
        assert_eq!(
            sink.append_epoch(APP, epoch, vec![batch(&[row("again", "d1", 1)])]).await.unwrap(),
            AppendOutcome::AlreadyCommitted
        );
    }
    let mut logs: Vec<String> = std::fs::read_dir(path.join("_delta_log"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json") && !n.starts_with('_'))
        .collect();
    logs.sort();
    // The last checkpoint is at version 20: the commits before it are gone.
    assert_eq!(logs.first().map(String::as_str), Some("00000000000000000020.json"), "{logs:?}");
    assert!(logs.len() <= 4, "{logs:?}");
    drop(sink);
    let mut reopened = DeltaTableSink::open_or_create(path, schema(), &opts).await.unwrap();
    assert_eq!(reopened.committed_epoch(APP).await.unwrap(), Some(23));
    assert_eq!(
        reopened.append_epoch(APP, 5, vec![batch(&[row("again", "d1", 1)])]).await.unwrap(),
        AppendOutcome::AlreadyCommitted
    );
    assert_eq!(table_rows(path, None).await.len(), 23);
}

#[tokio::test(flavor = "multi_thread")]
async fn vacuum_deletes_files_removed_longer_ago_than_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let mut sink = DeltaTableSink::open_or_create(path, schema(), &options(&["day"], 256 * 1024, 0)).await.unwrap();
    for epoch in 1..=4u64 {
        let rows: Vec<Row> = (0..10).map(|i| row(&format!("k{epoch}-{i}"), ["d1", "d2"][i as usize % 2], i)).collect();
        sink.append_epoch(APP, epoch, vec![batch(&rows)]).await.unwrap();
    }
    let files_before = data_files_on_disk(path);
    assert_eq!(files_before.len(), 8);
    let rows = table_rows(path, None).await;
    let report = sink.compact(2).await.unwrap().unwrap();
    assert_eq!(data_files_on_disk(path).len(), 10);

    assert_eq!(sink.vacuum(Duration::from_secs(3600)).await.unwrap(), 0, "removed just now");
    assert_eq!(data_files_on_disk(path).len(), 10);
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(sink.vacuum(Duration::ZERO).await.unwrap(), report.files_removed);

    let left = data_files_on_disk(path);
    assert_eq!(left.len(), 2);
    assert!(left.is_disjoint(&files_before), "{left:?}");
    assert_eq!(table_rows(path, None).await, rows);
    assert_eq!(sink.committed_epoch(APP).await.unwrap(), Some(4));
    // The files of versions before the compaction are gone.
    assert!(read_table(path, Some(4)).await.is_err());
    // The sink goes on writing.
    sink.append_epoch(APP, 5, vec![batch(&[row("z", "d3", 1)])]).await.unwrap();
    assert_eq!(table_rows(path, None).await.len(), rows.len() + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn reopening_with_other_partitioning_is_a_partition_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    DeltaTableSink::open_or_create(path, schema(), &TableOptions::default()).await.unwrap();
    let err = DeltaTableSink::open_or_create(path, schema(), &options(&["day"], 1 << 20, 10))
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
    let DeltaSinkError::PartitionMismatch { expected, found, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!((expected.as_str(), found.as_str()), ("day", "none"));
    let message = err.to_string();
    assert!(message.contains("is partitioned by (none)"), "{message}");
    assert!(message.contains("partitioning by (day)"), "{message}");
    assert!(message.contains("new path or drop the table"), "{message}");

    let other = dir.path().join("by-day");
    DeltaTableSink::open_or_create(&other, schema(), &options(&["day"], 1 << 20, 10)).await.unwrap();
    let err = DeltaTableSink::open_or_create(&other, schema(), &options(&["key", "day"], 1 << 20, 10))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("is partitioned by (day); the sink asks for partitioning by (key, day)"),
        "{err}"
    );
    // Other columns are reported first: that is the bigger difference.
    let narrow = Arc::new(Schema::new(vec![
        Field::new("day", DataType::Utf8, false),
        Field::new("n", DataType::Int64, false),
    ]));
    let err = DeltaTableSink::open_or_create(&other, narrow, &TableOptions::default()).await.unwrap_err();
    assert!(matches!(err, DeltaSinkError::SchemaMismatch { .. }), "{err:?}");
    // The same partitioning opens.
    DeltaTableSink::open_or_create(&other, schema(), &options(&["day"], 1 << 20, 10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_options_are_refused_before_creating_anything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let cases = [
        (
            options(&["nope"], 1 << 20, 10),
            "partition column `nope` is not a column of the query's output (key, day, value)",
        ),
        (options(&["day", "day"], 1 << 20, 10), "listed twice"),
        (options(&["key", "day", "value"], 1 << 20, 10), "every column is a partition column"),
        (options(&[], 0, 10), "target_file_size_bytes is 0"),
    ];
    for (opts, wanted) in cases {
        let err = DeltaTableSink::open_or_create(&path, schema(), &opts).await.unwrap_err();
        assert!(matches!(err, DeltaSinkError::InvalidOptions { .. }), "{err:?}");
        assert!(err.to_string().contains(wanted), "{err}");
    }
    assert!(!path.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn partitioned_tables_read_back_at_every_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let schema = Arc::new(Schema::new(vec![
        Field::new("label", DataType::Utf8, true),
        Field::new("hour", DataType::Int64, true),
        Field::new("n", DataType::Int64, false),
    ]));
    let make = |rows: &[(Option<&str>, Option<i64>, i64)]| {
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
                Arc::new(Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
            ],
        )
        .unwrap()
    };
    let rows_of = |batches: Vec<RecordBatch>| {
        let mut out = Vec::new();
        for b in &batches {
            assert_eq!(b.schema(), schema);
            let labels = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
            let hours = b.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
            let ns = b.column(2).as_any().downcast_ref::<Int64Array>().unwrap();
            for i in 0..b.num_rows() {
                out.push((
                    labels.is_valid(i).then(|| labels.value(i).to_owned()),
                    hours.is_valid(i).then(|| hours.value(i)),
                    ns.value(i),
                ));
            }
        }
        out.sort();
        out
    };
    let owned = |rows: &[(Option<&str>, Option<i64>, i64)]| {
        let mut out: Vec<_> = rows.iter().map(|r| (r.0.map(str::to_owned), r.1, r.2)).collect();
        out.sort();
        out
    };

    let mut sink = DeltaTableSink::open_or_create(path, schema.clone(), &options(&["label", "hour"], 1 << 20, 10))
        .await
        .unwrap();
    // Values that need encoding in paths, a negative number, and nulls.
    let first = [
        (Some("2024-01-01"), Some(3), 1),
        (Some("a b/c:d%e=f"), Some(-1), 2),
        (Some("2024-01-01"), Some(3), 3),
        (None, None, 4),
        (Some(""), Some(0), 5),
    ];
    sink.append_epoch(APP, 1, vec![make(&first)]).await.unwrap();
    let second = [(Some("2024-01-02"), Some(4), 6)];
    sink.append_epoch(APP, 2, vec![make(&second)]).await.unwrap();
    assert!(path.join("label=2024-01-01/hour=3").is_dir());

    // Delta stores an empty string partition value as null.
    let stored = |rows: &[(Option<&'static str>, Option<i64>, i64)]| -> Vec<(Option<&'static str>, Option<i64>, i64)> {
        rows.iter().map(|r| (r.0.filter(|s| !s.is_empty()), r.1, r.2)).collect()
    };
    let all: Vec<_> = stored(&first).into_iter().chain(second).collect();
    assert_eq!(rows_of(read_table(path, None).await.unwrap()), owned(&all));
    assert_eq!(rows_of(read_table(path, Some(1)).await.unwrap()), owned(&stored(&first)));
    assert!(rows_of(read_table(path, Some(0)).await.unwrap()).is_empty());

    // Upserts keyed by a partition column rewrite inside the right directories.
    let key = strings(&["label", "hour"]);
    let deletes = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("label", DataType::Utf8, true),
            Field::new("hour", DataType::Int64, true),
        ])),
        vec![
            Arc::new(StringArray::from(vec![Some("a b/c:d%e=f")])),
            Arc::new(Int64Array::from(vec![Some(-1)])),
        ],
    )
    .unwrap();
    // A fresh sink builds its index from the files, where the key ("", 0) reads as (null, 0).
    drop(sink);
    let mut sink = DeltaTableSink::open_or_create(path, schema.clone(), &options(&["label", "hour"], 1 << 20, 10))
        .await
        .unwrap();
    sink.upsert_epoch(APP, 3, &key, vec![make(&[(None, None, 40), (Some(""), Some(0), 50)])], vec![deletes])
        .await
        .unwrap();
    let expected = [
        (Some("2024-01-01"), Some(3), 1),
        (Some("2024-01-01"), Some(3), 3),
        (Some("2024-01-02"), Some(4), 6),
        (None, None, 40),
        (None, Some(0), 50),
    ];
    assert_eq!(rows_of(read_table(path, None).await.unwrap()), owned(&expected));
    // The index it keeps from the rows it wrote agrees with the files.
    sink.upsert_epoch(APP, 4, &key, vec![make(&[(Some(""), Some(0), 60)])], Vec::new())
        .await
        .unwrap();
    let expected = [
        (Some("2024-01-01"), Some(3), 1),
        (Some("2024-01-01"), Some(3), 3),
        (Some("2024-01-02"), Some(4), 6),
        (None, None, 40),
        (None, Some(0), 60),
    ];
    assert_eq!(rows_of(read_table(path, None).await.unwrap()), owned(&expected));
}

#[tokio::test(flavor = "multi_thread")]
async fn data_files_are_cut_near_the_target_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let target = 64 * 1024;
    let mut sink = DeltaTableSink::open_or_create(path, schema(), &options(&[], target, 0)).await.unwrap();
    // Random values do not compress: about 30 bytes a row.
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let rows: Vec<Row> = (0..40_000).map(|i| row(&format!("key-{:016x}", rng.random::<u64>()), "d", i)).collect();
    let AppendOutcome::Committed { version } = sink.append_epoch(APP, 1, vec![batch(&rows)]).await.unwrap() else {
        panic!()
    };
    let sizes: Vec<u64> = commit_actions(path, version)
        .iter()
        .filter(|(k, _)| k == "add")
        .map(|(_, add)| add["size"].as_u64().unwrap())
        .collect();
    assert!(sizes.len() >= 10, "{sizes:?}");
    // The first file calibrates the writer's size estimate; the last holds what is left.
    let (first, rest) = sizes.split_first().unwrap();
    let (last, middle) = rest.split_last().unwrap();
    assert!((target / 2..=target * 11 / 10).contains(first), "{sizes:?}");
    assert!(*last <= target * 11 / 10, "{sizes:?}");
    for size in middle {
        assert!((target * 9 / 10..=target * 11 / 10).contains(size), "{sizes:?}");
    }
    assert_eq!(table_rows(path, None).await.len(), rows.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn timestamp_and_date_partitions_read_back_as_their_types() {
    use deltalake::arrow::array::{Date32Array, TimestampMicrosecondArray};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "window_start",
            DataType::Timestamp(deltalake::arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("window_date", DataType::Date32, false),
        Field::new("n", DataType::Int64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(TimestampMicrosecondArray::from(vec![1_700_000_000_123_456, 1_700_003_600_000_000, 0]).with_timezone("UTC")),
            Arc::new(Date32Array::from(vec![19_675, 19_675, 0])),
            Arc::new(Int64Array::from(vec![1, 2, 3])),
        ],
    )
    .unwrap();
    let opts = options(&["window_date", "window_start"], 1 << 20, 10);
    let mut sink = DeltaTableSink::open_or_create(path, schema.clone(), &opts).await.unwrap();
    sink.append_epoch(APP, 1, vec![batch.clone()]).await.unwrap();
    let read = read_table(path, None).await.unwrap();
    let read = deltalake::arrow::compute::concat_batches(&schema, &read).unwrap();
    let sort = |b: &RecordBatch| {
        let n = b.column(2).as_any().downcast_ref::<Int64Array>().unwrap();
        let order = deltalake::arrow::compute::sort_to_indices(n, None, None).unwrap();
        deltalake::arrow::compute::take_record_batch(b, &order).unwrap()
    };
    assert_eq!(sort(&read), batch);
}

// ---- Windowed views: rows of closed windows are final ----

/// `(window_start, window_end, page, n)`, times in µs.
type ViewRow = (i64, i64, String, i64);

/// Window length of the view tests.
const WINDOW: i64 = 10_000_000;

fn view_schema() -> SchemaRef {
    let time = || DataType::Timestamp(deltalake::arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("window_start", time(), false),
        Field::new("window_end", time(), false),
        Field::new("page", DataType::Utf8, true),
        Field::new("n", DataType::Int64, true),
    ]))
}

fn view_batch(rows: &[ViewRow]) -> RecordBatch {
    use deltalake::arrow::array::TimestampMicrosecondArray;
    RecordBatch::try_new(
        view_schema(),
        vec![
            Arc::new(TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.0)).with_timezone("UTC")),
            Arc::new(TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.1)).with_timezone("UTC")),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.2.as_str()))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.3))),
        ],
    )
    .unwrap()
}

/// The row of `page` in window number `window`.
fn view_row(window: i64, page: &str, n: i64) -> ViewRow {
    (window * WINDOW, (window + 1) * WINDOW, page.to_owned(), n)
}

async fn view_rows(path: &Path) -> Vec<ViewRow> {
    use deltalake::arrow::array::TimestampMicrosecondArray;
    let mut out = Vec::new();
    for batch in read_table(path, None).await.unwrap() {
        let time = |i: usize| batch.column(i).as_any().downcast_ref::<TimestampMicrosecondArray>().unwrap().clone();
        let (starts, ends) = (time(0), time(1));
        let pages = batch.column(2).as_any().downcast_ref::<StringArray>().unwrap();
        let ns = batch.column(3).as_any().downcast_ref::<Int64Array>().unwrap();
        for i in 0..batch.num_rows() {
            out.push((starts.value(i), ends.value(i), pages.value(i).to_owned(), ns.value(i)));
        }
    }
    out.sort();
    out
}

fn view_options(partition_by: &[&str]) -> TableOptions {
    TableOptions {
        window_columns: Some(WindowColumns {
            start: "window_start".into(),
            end: "window_end".into(),
        }),
        ..options(partition_by, 64 * 1024 * 1024, 0)
    }
}

fn view_key() -> Vec<String> {
    strings(&["window_start", "page"])
}

/// A timestamp of an `add` action's statistics (`2026-11-23T00:00:00.000000Z`) or partition
/// values (`2026-11-23 00:00:00.000000`) in µs.
fn log_time(text: &str) -> i64 {
    chrono::NaiveDateTime::parse_from_str(text.trim_end_matches('Z'), "%Y-%m-%dT%H:%M:%S%.f")
        .or_else(|_| chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f"))
        .unwrap()
        .and_utc()
        .timestamp_micros()
}

/// What the log says of a data file of a view.
#[derive(Debug, Clone, Copy)]
struct ViewFile {
    rows: u64,
    first_end: i64,
    last_end: i64,
}

/// Every `add` of the log so far: path → rows and window ends, from its statistics (or its
/// partition value, when partitioned by `window_end`).
fn added_files(path: &Path) -> BTreeMap<String, ViewFile> {
    let mut out = BTreeMap::new();
    let mut version = 0;
    while path.join(format!("_delta_log/{version:020}.json")).exists() {
        for (kind, body) in commit_actions(path, version) {
            if kind == "add" {
                let stats: serde_json::Value = serde_json::from_str(body["stats"].as_str().unwrap()).unwrap();
                let (first_end, last_end) = match body["partitionValues"]["window_end"].as_str() {
                    Some(end) => (log_time(end), log_time(end)),
                    None => (
                        log_time(stats["minValues"]["window_end"].as_str().unwrap()),
                        log_time(stats["maxValues"]["window_end"].as_str().unwrap()),
                    ),
                };
                let file = ViewFile {
                    rows: stats["numRecords"].as_u64().unwrap(),
                    first_end,
                    last_end,
                };
                out.insert(body["path"].as_str().unwrap().to_owned(), file);
            }
        }
        version += 1;
    }
    out
}

/// Each epoch updates the current window of 40 pages and, late but within the allowed
/// lateness, half of the previous window; then the windows ending two windows back close. The
/// index holds exactly the keys of the two open windows (it held every key of the table), an
/// epoch rewrites the rows of the open windows only (it rewrote the whole table), and no file
/// of closed windows is removed by an upsert.
#[tokio::test(flavor = "multi_thread")]
async fn a_view_forgets_closed_windows_and_never_rewrites_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let mut sink = DeltaTableSink::open_or_create(path, view_schema(), &view_options(&[])).await.unwrap();
    let pages: Vec<String> = (0..40).map(|p| format!("/p{p}")).collect();
    let mut model: BTreeMap<(i64, String), ViewRow> = BTreeMap::new();
    for window in 0..16i64 {
        let epoch = window as u64 + 1;
        let mut rows: Vec<ViewRow> = pages.iter().map(|p| view_row(window, p, window)).collect();
        if window > 0 {
            rows.extend(pages.iter().step_by(2).map(|p| view_row(window - 1, p, 100 + window)));
        }
        let closed_before = sink.windows_closed_through();
        let outcome = sink.upsert_epoch(APP, epoch, &view_key(), vec![view_batch(&rows)], Vec::new()).await.unwrap();
        let AppendOutcome::Committed { version } = outcome else {
            panic!("{outcome:?}")
        };
        for r in rows {
            model.insert((r.0, r.2.clone()), r);
        }
        assert_eq!(view_rows(path).await, model.values().cloned().collect::<Vec<_>>(), "window {window}");

        // What the commit rewrote: files of open windows only, and only the open windows' rows.
        let added = added_files(path);
        let removed: Vec<&ViewFile> = commit_actions(path, version)
            .iter()
            .filter(|(kind, _)| kind == "remove")
            .map(|(_, body)| &added[body["path"].as_str().unwrap()])
            .collect();
        for file in &removed {
            assert!(
                closed_before.is_none_or(|c| file.last_end > c),
                "window {window}: a file of closed windows was rewritten"
            );
        }
        let rows_rewritten: u64 = removed.iter().map(|f| f.rows).sum();
        assert!(rows_rewritten <= 3 * 40, "window {window}: {rows_rewritten} rows rewritten");

        // Windows up to `window - 2` are closed now.
        sink.close_windows_through((window - 1) * WINDOW);
        let open = model.values().filter(|r| r.1 > (window - 1) * WINDOW).count();
        // The first epoch came before any horizon: its index served that epoch only.
        let expected = if closed_before.is_some() { open } else { 0 };
        assert_eq!(sink.indexed_keys(), expected, "window {window}");
        assert!(open <= 80);
    }
    // An epoch changing no open window's rows leaves the closed files alone too.
    assert!(sink.data_files_read() <= 16 * 2, "{} files read", sink.data_files_read());
    sink.close_windows_through(i64::MAX / 2);
    assert_eq!(sink.indexed_keys(), 0);
}

/// After a restart the index is rebuilt from the files of open windows only (found by the
/// statistics in the log, without reading the others), and a late row for an open window and
/// a new window upsert in place.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_view_reads_only_the_files_of_open_windows() {
    for partition_by in [&[][..], &["window_end"][..]] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let opts = view_options(partition_by);
        let mut sink = DeltaTableSink::open_or_create(path, view_schema(), &opts).await.unwrap();
        let mut model: BTreeMap<(i64, String), ViewRow> = BTreeMap::new();
        for window in 0..10i64 {
            let mut rows: Vec<ViewRow> = (0..30).map(|p| view_row(window, &format!("/p{p}"), 1)).collect();
            if window > 0 {
                rows.push(view_row(window - 1, "/p0", 2));
            }
            sink.upsert_epoch(APP, window as u64 + 1, &view_key(), vec![view_batch(&rows)], Vec::new())
                .await
                .unwrap();
            for r in rows {
                model.insert((r.0, r.2.clone()), r);
            }
            sink.close_windows_through((window - 1) * WINDOW);
            if window == 5 && partition_by.is_empty() {
                // (By window_end, each closed window is one file in a partition of its own.)
                assert!(sink.compact(2).await.unwrap().is_some(), "the closed windows' files pack");
            }
        }
        assert_eq!(view_rows(path).await, model.values().cloned().collect::<Vec<_>>());
        let active = active_file_count(path);
        drop(sink);

        // The daemon restarts: windows 8 (late, within lateness) and 9 are open; 10 is new. The
        // committer tells the sink the stored watermark's horizon before the first epoch.
        let mut sink = DeltaTableSink::open_or_create(path, view_schema(), &opts).await.unwrap();
        sink.close_windows_through(8 * WINDOW);
        let rows = vec![view_row(8, "/p3", 7), view_row(9, "/p4", 7), view_row(10, "/p0", 7)];
        sink.upsert_epoch(APP, 11, &view_key(), vec![view_batch(&rows)], Vec::new()).await.unwrap();
        for r in rows {
            model.insert((r.0, r.2.clone()), r);
        }
        assert_eq!(view_rows(path).await, model.values().cloned().collect::<Vec<_>>(), "{partition_by:?}");
        // Only files holding windows 8 and 9 are read (twice: keys, then the rewrite), not
        // the other files of the table.
        assert!(active >= 4, "{partition_by:?}: {active} active files");
        assert!(
            sink.data_files_read() <= 4,
            "{partition_by:?}: read {} of {active} files",
            sink.data_files_read()
        );
        assert_eq!(sink.indexed_keys(), 30 + 30 + 1, "{partition_by:?}: windows 8, 9 and the new row");
        sink.close_windows_through(9 * WINDOW);
        assert_eq!(sink.indexed_keys(), 30 + 1, "{partition_by:?}");
        // A late update of a closed window would be a broken promise; the sink still writes it
        // correctly (it reads that window's files again) rather than duplicate the row.
        sink.upsert_epoch(APP, 12, &view_key(), vec![view_batch(&[view_row(2, "/p5", 9)])], Vec::new())
            .await
            .unwrap();
        model.insert((2 * WINDOW, "/p5".into()), view_row(2, "/p5", 9));
        assert_eq!(view_rows(path).await, model.values().cloned().collect::<Vec<_>>(), "{partition_by:?}");
    }
}

/// Random upserts and deletes of rows of open windows while the horizon advances, checked
/// after every epoch against a model; replays, compaction and reopening mixed in. After every
/// close the index holds exactly the model's rows of open windows.
async fn view_upserts_match_the_model(partition_by: &[&str], seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let opts = TableOptions {
        target_file_size_bytes: 16 * 1024,
        ..view_options(partition_by)
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut sink = DeltaTableSink::open_or_create(path, view_schema(), &opts).await.unwrap();
    let mut model: BTreeMap<(i64, String), ViewRow> = BTreeMap::new();
    // Windows ending at or before `closed` are final; a window can be written while open.
    let mut closed = 0i64;
    let mut last_committed = None;
    let mut indexed = false;
    for epoch in 1..=40u64 {
        let first_open = closed / WINDOW; // window whose end is the first above `closed`
        let upserts: Vec<ViewRow> = (0..rng.random_range(0..8))
            .map(|_| {
                view_row(
                    first_open + rng.random_range(0..3),
                    &format!("/p{}", rng.random_range(0..6)),
                    rng.random_range(0..100),
                )
            })
            .collect();
        let open_keys: Vec<(i64, String)> = model.keys().filter(|k| k.0 + WINDOW > closed).cloned().collect();
        let deletions = if open_keys.is_empty() { 0 } else { rng.random_range(0..3) };
        let deleted: Vec<(i64, String)> = (0..deletions).map(|_| open_keys[rng.random_range(0..open_keys.len())].clone()).collect();
        let deletes = {
            let rows: Vec<ViewRow> = deleted.iter().map(|(s, p)| (*s, *s, p.clone(), 0)).collect();
            view_batch(&rows)
        };
        let half = upserts.len() / 2;
        let had_horizon = sink.windows_closed_through().is_some();
        let outcome = sink
            .upsert_epoch(
                APP,
                epoch,
                &view_key(),
                vec![view_batch(&upserts[..half]), view_batch(&upserts[half..])],
                vec![deletes],
            )
            .await
            .unwrap();
        if upserts.is_empty() && deleted.is_empty() {
            assert_eq!(outcome, AppendOutcome::Skipped, "epoch {epoch}");
        } else {
            assert!(matches!(outcome, AppendOutcome::Committed { .. }), "epoch {epoch}: {outcome:?}");
            last_committed = Some(epoch);
            // Without a horizon (after reopening) the index serves one epoch only.
            indexed |= had_horizon;
        }
        for d in &deleted {
            model.remove(d);
        }
        for u in &upserts {
            model.insert((u.0, u.2.clone()), u.clone());
        }
        assert_eq!(view_rows(path).await, model.values().cloned().collect::<Vec<_>>(), "epoch {epoch}");
        if !had_horizon {
            assert_eq!(sink.indexed_keys(), 0, "epoch {epoch}");
        }

        // The watermark moves on by 0–2 windows, sometimes by part of one.
        closed += [0, WINDOW / 2, WINDOW, 2 * WINDOW][rng.random_range(0..4)];
        sink.close_windows_through(closed);
        if indexed {
            let open = model.values().filter(|r| r.1 > closed).count();
            assert_eq!(sink.indexed_keys(), open, "epoch {epoch}");
        }

        if let Some(replayed) = last_committed.filter(|_| epoch % 5 == 0) {
            let outcome = sink
                .upsert_epoch(APP, replayed, &view_key(), vec![view_batch(&[view_row(first_open, "/p0", 999)])], Vec::new())
                .await
                .unwrap();
            assert_eq!(outcome, AppendOutcome::AlreadyCommitted, "epoch {epoch}");
        }
        if epoch % 4 == 0 {
            if let Some(report) = sink.compact(2).await.unwrap() {
                // A packed file holds closed windows only, or open windows only.
                let files = added_files(path);
                for (kind, body) in commit_actions(path, report.version) {
                    if kind == "add" {
                        let file = files[body["path"].as_str().unwrap()];
                        assert!(
                            file.last_end <= closed || file.first_end > closed,
                            "epoch {epoch}: {file:?}, closed through {closed}"
                        );
                    }
                }
            }
            assert_eq!(view_rows(path).await, model.values().cloned().collect::<Vec<_>>(), "epoch {epoch}: compaction");
            if indexed {
                assert_eq!(sink.indexed_keys(), model.values().filter(|r| r.1 > closed).count(), "epoch {epoch}");
            }
        }
        if epoch % 9 == 0 {
            drop(sink);
            sink = DeltaTableSink::open_or_create(path, view_schema(), &opts).await.unwrap();
            indexed = false;
        }
    }
    assert_eq!(sink.committed_epoch(APP).await.unwrap(), last_committed);
    assert!(model.len() > 10, "the sequence should leave rows: {model:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn view_upserts_match_a_model_as_windows_close() {
    for seed in [11, 12, 13] {
        view_upserts_match_the_model(&[], seed).await;
    }
    view_upserts_match_the_model(&["window_end"], 14).await;
}

/// Compaction packs files of similar size: small files written since the last run go
/// together; a packed file is not packed again with each new small file.
#[tokio::test(flavor = "multi_thread")]
async fn compaction_packs_files_of_similar_size_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let mut sink = DeltaTableSink::open_or_create(path, schema(), &options(&[], 64 * 1024 * 1024, 0))
        .await
        .unwrap();
    let mut epoch = 0;
    let mut append = async |sink: &mut DeltaTableSink, rows: usize| {
        epoch += 1;
        let rows: Vec<Row> = (0..rows).map(|i| row(&format!("k{epoch}-{i:05}"), "d", i as i64)).collect();
        sink.append_epoch(APP, epoch, vec![batch(&rows)]).await.unwrap();
    };
    for _ in 0..4 {
        append(&mut sink, 2_000).await;
    }
    let first = sink.compact(4).await.unwrap().expect("four similar files");
    assert_eq!((first.files_removed, first.files_added), (4, 1));
    // Four more small files: they pack together, the big one stays.
    for _ in 0..4 {
        append(&mut sink, 2_000).await;
    }
    let second = sink.compact(4).await.unwrap().expect("four new similar files");
    assert_eq!(second.files_removed, 4, "{second:?}");
    assert!(second.bytes_removed < first.bytes_added * 2, "{second:?} re-read the packed file: {first:?}");
    // Each packed file is about four small ones, so four of those pack together again.
    for _ in 0..2 {
        for _ in 0..4 {
            append(&mut sink, 2_000).await;
        }
        sink.compact(4).await.unwrap().expect("four new similar files");
    }
    assert_eq!(active_file_count(path), 4);
    let third = sink.compact(4).await.unwrap().expect("four packed files of similar size");
    assert_eq!((third.files_removed, third.files_added), (4, 1));
    assert_eq!(table_rows(path, None).await.len(), 16 * 2_000);
}
