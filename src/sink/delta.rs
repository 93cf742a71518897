//! Delta Lake table writer used by the committer, and a small reader for tests and
//! `tidemark inspect`.
//!
//! Exactly-once rests on one rule: every epoch is written as **one** Delta commit that
//! carries a `txn(app_id, epoch)` action, and before writing we read the highest `txn`
//! version the table holds for our app id. An epoch at or below it has already landed (maybe
//! by a run that crashed before recording it), so it is acknowledged and not written again.
//! delta-rs's conflict checker only fences a *concurrent* writer with the same app id; it does
//! not skip duplicates, which is why the check is ours.
//!
//! An epoch reaches the table in one of three ways, all through the same check-and-retry
//! loop ([`DeltaTableSink::append_epoch`], [`DeltaTableSink::upsert_epoch`],
//! [`DeltaTableSink::overwrite_epoch`]):
//!
//! * **append**: `add` actions for the epoch's rows;
//! * **upsert** (a materialized view kept current without a query engine): copy-on-write.
//!   An in-memory index says which data file holds each key; the files holding changed keys
//!   are rewritten without them, together with the new rows, and the commit swaps them
//!   (`remove` + `add`). Its cost follows the rows and files touched, not the table size.
//!   In a windowed view ([`TableOptions::window_columns`]) a row changes only while its window
//!   is open: the committer tells the sink how far windows are closed
//!   ([`DeltaTableSink::close_windows_through`]), the index drops the keys of files holding
//!   only closed windows, and a rewrite puts rows of closed windows in files of their own,
//!   which no upsert touches again;
//! * **overwrite** (complete output mode): `remove` every active file, `add` the new ones.
//!
//! Data files of an append or overwrite are written once per epoch and their `add` actions
//! reused across commit attempts, so a retried commit does not leave a second copy of the
//! epoch's Parquet files. An upsert's files depend on the table version they were planned
//! against; a retry on a newer version plans again and deletes the files of the old plan
//! (the txn check has just shown that plan never landed).
//!
//! Maintenance: [`DeltaTableSink::compact`] bin-packs small files of similar size (an
//! `OPTIMIZE` commit that changes no data; in a view, files of closed windows apart from the
//! others), a checkpoint is written every `checkpoint_interval` versions, and
//! [`DeltaTableSink::vacuum`] deletes files removed longer ago than a retention period.
//!
//! Every async fn here needs a tokio runtime on the calling thread (delta-rs uses
//! `spawn_blocking`); the committer owns one.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deltalake::arrow::array::{BooleanArray, RecordBatch, UInt32Array};
use deltalake::arrow::compute::{concat_batches, filter_record_batch, take_record_batch};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitBuilder, CommitConflictError, CommitProperties, TransactionError};
use deltalake::kernel::{Action, DataType as DeltaDataType, StructType, Transaction};
use deltalake::operations::vacuum::VacuumMode;
use deltalake::protocol::{DeltaOperation, MergePredicate, SaveMode};
use deltalake::{DeltaTable, DeltaTableError};
use url::Url;

pub use super::delta_error::{DeltaSinkError, SinkResult};
use super::table_files::{
    conform_batch, keep_mask, last_row_per_key, max_time_of, time_values, write_data_files, DataFile, FileCutter, FileReader, Key, KeyEncoder, KeyIndex,
    NewFile,
};

/// Attempts per epoch (the first try plus retries) before an epoch write gives up.
const APPEND_ATTEMPTS: u32 = 4;
/// Delay before the first retry; it quadruples on each further retry (100 ms, 400 ms, 1.6 s).
const RETRY_BASE_DELAY: Duration = Duration::from_millis(100);
/// [`DeltaTableSink::compact`] leaves a partition alone until it has this many small files.
pub const DEFAULT_COMPACTION_MIN_FILES: usize = 4;
/// Compaction packs files together only when the largest is at most this many times the
/// smallest, so a packed file moves up a size tier and is not packed again with every new
/// small file.
pub const COMPACTION_TIER_RATIO: i64 = 2;

/// How a table is laid out and maintained; given when the sink opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableOptions {
    /// Partition columns of a new table, in directory nesting order (typically a date string
    /// such as `window_date`). An existing table must already be partitioned exactly so.
    pub partition_by: Vec<String>,
    /// Data files are cut at about this size, and compaction packs small files up to it.
    pub target_file_size_bytes: u64,
    /// A checkpoint is written when a commit's version is a multiple of this; 0 never writes
    /// one.
    pub checkpoint_interval: u64,
    /// At each checkpoint, delete log files older than this and than the checkpoint; `None`
    /// keeps every log file.
    pub log_retention: Option<Duration>,
    /// Windowed views (upserted on the window start and group keys): the columns holding each
    /// row's window start and end. `None` for tables whose rows may change at any time.
    pub window_columns: Option<WindowColumns>,
}

/// The timestamp columns bounding each row's window in a view. A row changes only while its
/// window is open; once [`DeltaTableSink::close_windows_through`] reaches its end, it is final.
/// (Sessions: `session_start`, `session_end`; a session's end only grows while it is open.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowColumns {
    pub start: String,
    pub end: String,
}

impl Default for TableOptions {
    fn default() -> Self {
        Self {
            partition_by: Vec::new(),
            target_file_size_bytes: 128 * 1024 * 1024,
            checkpoint_interval: 10,
            log_retention: None,
            window_columns: None,
        }
    }
}

/// Result of an epoch write ([`DeltaTableSink::append_epoch`], [`DeltaTableSink::upsert_epoch`],
/// [`DeltaTableSink::overwrite_epoch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// The epoch is now in the table at this version.
    Committed { version: i64 },
    /// The table already held this epoch (or a later one) for the app id; nothing was written.
    /// Also returned when an earlier attempt of this call landed before failing to report it.
    AlreadyCommitted,
    /// The epoch changed nothing (no rows to append, no keys to upsert or delete, or an empty
    /// result over an empty table); no commit was made.
    Skipped,
}

/// What [`DeltaTableSink::compact`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionReport {
    /// Table version of the compaction commit.
    pub version: i64,
    pub files_removed: usize,
    pub files_added: usize,
    pub bytes_removed: u64,
    pub bytes_added: u64,
}

/// One epoch's change, as handed to the shared commit loop.
enum EpochChange {
    Append(Vec<RecordBatch>),
    Overwrite(Vec<RecordBatch>),
    Upsert(Upsert),
}

struct Upsert {
    encoder: Arc<KeyEncoder>,
    /// The new rows, one per key, in the table schema.
    rows: Option<RecordBatch>,
    /// Keys of the new rows and of the deleted ones: old rows with these keys go.
    changed: HashSet<Key>,
    /// Views: the earliest window start of a changed key. Any earlier row of a changed key
    /// ended after its start, so files ending at or before this cannot hold one.
    earliest_start: Option<i64>,
    /// Views: the earliest window end of a new row.
    earliest_new_end: Option<i64>,
}

/// Files written by earlier attempts of one epoch write, reused while still valid.
#[derive(Default)]
struct EpochFiles {
    /// Append and overwrite: the epoch's rows, valid for any table version.
    new_files: Option<Vec<NewFile>>,
    /// Upsert: planned against one table version.
    rewrite: Option<Rewrite>,
}

/// An upsert planned against `base_version`: remove the files holding changed keys, add their
/// other rows plus the new rows.
struct Rewrite {
    base_version: i64,
    removed: Vec<DataFile>,
    added: Vec<NewFile>,
}

/// One Delta table that epochs are written to.
pub struct DeltaTableSink {
    table: DeltaTable,
    /// Canonical local directory of the table.
    path: PathBuf,
    /// The table's columns as Arrow types; batches are conformed to this before writing.
    schema: SchemaRef,
    options: TableOptions,
    /// Key → data file, for upserts; built on the first upsert after opening.
    index: Option<KeyIndex>,
    /// Views: rows whose window ends at or before this are final (never upserted or deleted
    /// again), as the committer last said; `None` until it says.
    windows_closed_through: Option<i64>,
    /// Data files read so far (index building, rewrites, compaction).
    files_read: AtomicU64,
    /// Epoch write attempts that failed and were retried, and how many of those failed on a
    /// commit conflict (see [`DeltaTableSink::attempts`]).
    retries: u64,
    conflicts: u64,
}

/// Failed epoch write attempts of one sink since it opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteAttempts {
    /// Attempts after a transient failure (the first try not counted).
    pub retries: u64,
    /// Failed attempts whose cause was a commit conflict: another commit took the version.
    pub conflicts: u64,
}

impl std::fmt::Debug for DeltaTableSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaTableSink")
            .field("path", &self.path)
            .field("version", &self.version())
            .field("options", &self.options)
            .finish()
    }
}

impl DeltaTableSink {
    /// Opens the table at `path` (a local directory; created if missing), creating the table
    /// with `schema`, partitioned by `options.partition_by`, if there is none yet.
    ///
    /// An existing table whose columns differ from `schema` in name or type (nullability and
    /// column order are ignored) is [`DeltaSinkError::SchemaMismatch`]; one partitioned
    /// differently is [`DeltaSinkError::PartitionMismatch`]. An existing table is never
    /// rewritten.
    pub async fn open_or_create(path: &Path, schema: SchemaRef, options: &TableOptions) -> SinkResult<Self> {
        check_options(path, &schema, options)?;
        check_window_columns(path, &schema, options)?;
        std::fs::create_dir_all(path).map_err(|source| DeltaSinkError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (path, url) = local_table_url(path)?;
        let wanted: StructType = schema.as_ref().try_into_kernel().map_err(|err| DeltaSinkError::UnsupportedSchema {
            path: path.clone(),
            reason: err.to_string(),
        })?;

        let delta_err = |operation, source| delta_error(&path, operation, source);
        let mut table = DeltaTable::try_from_url(url).await.map_err(|e| delta_err("open", e))?;
        if table.version().is_none() {
            // `Ignore` turns a lost creation race into opening the winner's table, whose
            // schema is checked below like any existing table's.
            table = table
                .create()
                .with_columns(wanted.fields().cloned())
                .with_partition_columns(options.partition_by.clone())
                .with_save_mode(SaveMode::Ignore)
                .await
                .map_err(|e| delta_err("create table", e))?;
        }

        let state = table.snapshot().map_err(|e| delta_err("open", e))?;
        check_columns(&path, &wanted, state.schema().as_ref())?;
        let found = state.metadata().partition_columns();
        if found != &options.partition_by {
            let describe = |columns: &[String]| if columns.is_empty() { "none".to_owned() } else { columns.join(", ") };
            return Err(DeltaSinkError::PartitionMismatch {
                path,
                expected: describe(&options.partition_by),
                found: describe(found),
            });
        }
        let schema = state.snapshot().arrow_schema();
        Ok(Self {
            table,
            path,
            schema,
            options: options.clone(),
            index: None,
            windows_closed_through: None,
            files_read: AtomicU64::new(0),
            retries: 0,
            conflicts: 0,
        })
    }

    /// Highest epoch committed to this table by `app_id` (its Delta `txn` version), read from
    /// the newest table version; `None` if the app id never committed.
    pub async fn committed_epoch(&mut self, app_id: &str) -> SinkResult<Option<u64>> {
        self.refresh().await?;
        let version = table_txn_version(&self.table, &self.path, app_id).await?;
        // We only ever write epochs >= 0; a negative txn version is not one of ours.
        Ok(version.and_then(|v| u64::try_from(v).ok()))
    }

    /// Appends `batches` as one Delta commit tagged `txn(app_id, epoch)`.
    ///
    /// * No rows: [`AppendOutcome::Skipped`], no commit.
    /// * The table already holds `epoch` or a later one for `app_id`:
    ///   [`AppendOutcome::AlreadyCommitted`], nothing written.
    /// * Transient failures are retried with backoff; the txn version is re-read before each
    ///   attempt, so a commit that landed but reported an error is not written twice.
    ///
    /// Columns are matched to the table by name; a batch column whose Arrow type differs but
    /// maps to the same Delta type (e.g. `LargeUtf8` for `string`) is cast.
    pub async fn append_epoch(&mut self, app_id: &str, epoch: u64, batches: Vec<RecordBatch>) -> SinkResult<AppendOutcome> {
        let txn_version = txn_version(epoch)?;
        if batches.iter().all(|b| b.num_rows() == 0) {
            return Ok(AppendOutcome::Skipped);
        }
        let batches = self.conform_all(&batches)?;
        self.write_epoch(app_id, epoch, txn_version, EpochChange::Append(batches)).await
    }

    /// Makes the table exactly `batches` (complete output mode) in one commit tagged
    /// `txn(app_id, epoch)`: every active file is removed and the rows are added. An empty
    /// result over a non-empty table still commits, leaving the table empty; over an empty
    /// table it is [`AppendOutcome::Skipped`]. Replays and retries as in
    /// [`Self::append_epoch`].
    pub async fn overwrite_epoch(&mut self, app_id: &str, epoch: u64, batches: Vec<RecordBatch>) -> SinkResult<AppendOutcome> {
        let txn_version = txn_version(epoch)?;
        let batches = self.conform_all(&batches)?;
        self.write_epoch(app_id, epoch, txn_version, EpochChange::Overwrite(batches)).await
    }

    /// Applies one epoch of a keyed view in one commit tagged `txn(app_id, epoch)`: afterwards
    /// the table holds the old rows whose key (the values of `key_columns`) is in neither
    /// `upserts` nor `deletes`, plus the `upserts` (the last row of each key, if a key repeats).
    /// `deletes` batches need only the key columns.
    ///
    /// Copy-on-write: the files holding changed keys (found with an in-memory key index, built
    /// by reading the key columns of the active files on the first upsert after opening) are
    /// rewritten without those keys, together with the new rows, and the commit removes the
    /// old files (`dataChange = true`) and adds the new ones. An epoch reads and writes only
    /// the files it touches.
    ///
    /// Views ([`TableOptions::window_columns`]): the first build reads only files whose rows
    /// end after the closed horizon ([`Self::close_windows_through`]) or after the earliest
    /// window start this epoch changes, whichever is earlier (the statistics or partition
    /// values in the log say where each file's rows end); rows of closed windows read from a
    /// rewritten file are written to files of their own. Before the sink is told a horizon,
    /// the index serves one epoch and is dropped.
    ///
    /// Nothing to upsert or delete: [`AppendOutcome::Skipped`]. Replays and retries as in
    /// [`Self::append_epoch`].
    pub async fn upsert_epoch(
        &mut self,
        app_id: &str,
        epoch: u64,
        key_columns: &[String],
        upserts: Vec<RecordBatch>,
        deletes: Vec<RecordBatch>,
    ) -> SinkResult<AppendOutcome> {
        let txn_version = txn_version(epoch)?;
        let outcome = match self.prepare_upsert(key_columns, &upserts, &deletes)? {
            None => Ok(AppendOutcome::Skipped),
            Some(upsert) => self.write_epoch(app_id, epoch, txn_version, EpochChange::Upsert(upsert)).await,
        };
        if self.options.window_columns.is_some() && self.windows_closed_through.is_none() {
            // Built for this epoch's keys only: until the sink learns how far windows are
            // closed, a later epoch may change a window this index left out.
            self.index = None;
        }
        outcome
    }

    /// The new rows (last per key) and the changed keys of an upsert; `None` if it has no rows.
    fn prepare_upsert(&self, key_columns: &[String], upserts: &[RecordBatch], deletes: &[RecordBatch]) -> SinkResult<Option<Upsert>> {
        let encoder = KeyEncoder::new(&self.schema, &self.options.partition_by, key_columns).map_err(|reason| DeltaSinkError::InvalidKeyColumns {
            path: self.path.clone(),
            columns: key_columns.join(", "),
            reason,
        })?;
        let encoder = match &self.index {
            // Equal columns encode alike; reusing the index's encoder saves building one.
            Some(index) if index.encoder.columns() == key_columns => index.encoder.clone(),
            _ => Arc::new(encoder),
        };
        if upserts.iter().chain(deletes).all(|b| b.num_rows() == 0) {
            return Ok(None);
        }

        let upserts = self.conform_all(upserts)?;
        let mut changed = HashSet::new();
        let rows = match upserts.first() {
            None => None,
            Some(first) => {
                let all = concat_batches(&first.schema(), &upserts).map_err(|source| self.arrow_err("upsert", source))?;
                let keys = encoder.encode(&self.path, &all)?;
                let last = last_row_per_key(&keys);
                let rows = if last.len() == all.num_rows() {
                    all
                } else {
                    take_record_batch(&all, &UInt32Array::from(last)).map_err(|source| self.arrow_err("upsert", source))?
                };
                changed.extend(keys);
                Some(rows)
            }
        };
        let mut earliest_start = None;
        let mut earliest_new_end = None;
        if let Some(window) = &self.options.window_columns {
            let min_time = |batch: &RecordBatch, column: &str| -> SinkResult<Option<i64>> { Ok(time_values(&self.path, batch, column)?.into_iter().min()) };
            let deleted: Vec<&RecordBatch> = deletes.iter().filter(|b| b.num_rows() > 0).collect();
            for batch in rows.iter().chain(deleted) {
                earliest_start = earliest_start.into_iter().chain(min_time(batch, &window.start)?).min();
            }
            if let Some(rows) = &rows {
                earliest_new_end = min_time(rows, &window.end)?;
            }
        }
        for batch in deletes.iter().filter(|b| b.num_rows() > 0) {
            changed.extend(encoder.encode(&self.path, batch)?);
        }
        Ok(Some(Upsert {
            encoder,
            rows,
            changed,
            earliest_start,
            earliest_new_end,
        }))
    }

    /// The shared check-and-retry loop of every epoch write.
    async fn write_epoch(&mut self, app_id: &str, epoch: u64, txn_version: i64, change: EpochChange) -> SinkResult<AppendOutcome> {
        let mut files = EpochFiles::default();
        let mut attempt = 1;
        loop {
            match self.try_write_epoch(app_id, txn_version, &change, &mut files).await {
                Ok(outcome) => return Ok(outcome),
                Err(err) if err.is_retryable() && attempt < APPEND_ATTEMPTS => {
                    self.retries += 1;
                    self.conflicts += u64::from(err.is_conflict());
                    let delay = RETRY_BASE_DELAY * 4u32.pow(attempt - 1);
                    tracing::warn!(
                        table = %self.path.display(),
                        app_id,
                        epoch,
                        attempt,
                        retry_in_ms = delay.as_millis() as u64,
                        error = %err,
                        "Delta epoch write failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(err) if err.is_retryable() => {
                    self.conflicts += u64::from(err.is_conflict());
                    return Err(DeltaSinkError::RetriesExhausted {
                        app_id: app_id.to_owned(),
                        epoch,
                        attempts: attempt,
                        source: Box::new(err),
                    });
                }
                Err(err) => {
                    self.conflicts += u64::from(err.is_conflict());
                    return Err(err);
                }
            }
        }
    }

    /// Failed epoch write attempts since the sink opened.
    pub fn attempts(&self) -> WriteAttempts {
        WriteAttempts {
            retries: self.retries,
            conflicts: self.conflicts,
        }
    }

    /// One attempt: refresh, re-check the txn version, write (or reuse) the files, commit.
    async fn try_write_epoch(&mut self, app_id: &str, txn_version: i64, change: &EpochChange, files: &mut EpochFiles) -> SinkResult<AppendOutcome> {
        self.refresh().await?;
        let committed = table_txn_version(&self.table, &self.path, app_id).await?;
        if committed.is_some_and(|v| v >= txn_version) {
            return Ok(AppendOutcome::AlreadyCommitted);
        }
        let base_version = self.loaded_version()?;
        let partition_by = (!self.options.partition_by.is_empty()).then(|| self.options.partition_by.clone());

        let (removed, added, operation) = match change {
            EpochChange::Append(batches) | EpochChange::Overwrite(batches) => {
                if files.new_files.is_none() {
                    let encoder = self.index.as_ref().map(|i| i.encoder.clone());
                    files.new_files = Some(self.write_files(batches, encoder.as_deref()).await?);
                }
                let added = files.new_files.clone().unwrap_or_default();
                match change {
                    EpochChange::Overwrite(_) => {
                        let removed = self.active_files()?;
                        if removed.is_empty() && added.is_empty() {
                            return Ok(AppendOutcome::Skipped);
                        }
                        let operation = DeltaOperation::Write {
                            mode: SaveMode::Overwrite,
                            partition_by,
                            predicate: None,
                        };
                        (removed, added, operation)
                    }
                    _ => {
                        let operation = DeltaOperation::Write {
                            mode: SaveMode::Append,
                            partition_by,
                            predicate: None,
                        };
                        (Vec::new(), added, operation)
                    }
                }
            }
            EpochChange::Upsert(upsert) => {
                if let Some(stale) = files.rewrite.take_if(|r| r.base_version != base_version) {
                    // The txn check above proves no attempt with these files landed.
                    self.delete_files(stale.added.iter().map(|f| f.add.path.as_str())).await;
                }
                if files.rewrite.is_none() {
                    files.rewrite = Some(self.plan_rewrite(base_version, upsert).await?);
                }
                let rewrite = files.rewrite.as_ref().expect("planned above");
                if rewrite.removed.is_empty() && rewrite.added.is_empty() {
                    return Ok(AppendOutcome::Skipped);
                }
                let operation = DeltaOperation::Merge {
                    predicate: None,
                    merge_predicate: Some(format!("key ({})", upsert.encoder.columns().join(", "))),
                    matched_predicates: vec![merge_clause("update"), merge_clause("delete")],
                    not_matched_predicates: vec![merge_clause("insert")],
                    not_matched_by_source_predicates: Vec::new(),
                };
                (rewrite.removed.clone(), rewrite.added.clone(), operation)
            }
        };

        let now_ms = chrono::Utc::now().timestamp_millis();
        let actions = removed
            .iter()
            .map(|f| Action::Remove(f.remove_action(true, now_ms)))
            .chain(added.iter().map(|f| Action::Add(f.add.clone())))
            .collect();
        let version = self.commit(actions, operation, Some((app_id, txn_version))).await?;
        self.after_commit(base_version, version, &removed, &added).await;
        Ok(AppendOutcome::Committed { version })
    }

    /// Plans an upsert against the loaded version `base_version`: brings the key index up to
    /// it, reads the files holding changed keys, and writes their other rows together with
    /// the new rows.
    async fn plan_rewrite(&mut self, base_version: i64, upsert: &Upsert) -> SinkResult<Rewrite> {
        self.sync_index(upsert).await?;
        let touched = self.index.as_ref().expect("synced above").files_holding(&upsert.changed);
        let mut rows: Vec<RecordBatch> = Vec::new();
        for file in &touched {
            for batch in self.reader().batches(file, None).await? {
                let batch = batch?;
                let keys = upsert.encoder.encode(&self.path, &batch)?;
                let kept = filter_record_batch(&batch, &keep_mask(&keys, &upsert.changed)).map_err(|source| self.arrow_err("upsert", source))?;
                rows.push(kept);
            }
        }
        rows.extend(upsert.rows.iter().cloned());
        // Rows of closed windows go to files of their own: no upsert touches those again.
        let added = self.write_split(rows, Some(&upsert.encoder)).await?;
        Ok(Rewrite {
            base_version,
            removed: touched,
            added,
        })
    }

    /// Bin-packs small files of similar size. Files smaller than half the target size are
    /// grouped by partition, and in a view by whether their windows are all closed (so a
    /// packed file of closed windows is never rewritten by an upsert); each group is sorted by
    /// size and cut into tiers of files within [`COMPACTION_TIER_RATIO`] of the tier's
    /// smallest. A tier of at least `min_files` (at least 2) files is rewritten as files of
    /// about the target size. One `OPTIMIZE` commit removes and adds them with
    /// `dataChange = false` and no `txn`: the content, the committed epochs and older versions
    /// (time travel) are unchanged. `None` if no tier needed it.
    ///
    /// What a run costs: the files of the tiers that filled since the last runs — mostly the
    /// files written since then — never every small file of the table. A packed file holds
    /// at least `min_files` files of its tier, so it soon outgrows the tier (twice its
    /// smallest); a row is rewritten by compaction about log2(target size / first file size)
    /// times in its life, not once per run.
    ///
    /// Memory: a bin is streamed, one read batch at a time, into the new files; what is held
    /// is one input file's encoded bytes, the batch being copied and the file being written
    /// (at most about the target size, encoded), however many files the bin packs.
    ///
    /// A concurrent writer removing one of the files fails the commit (retryable); the
    /// files written for it are deleted again.
    pub async fn compact(&mut self, min_files: usize) -> SinkResult<Option<CompactionReport>> {
        self.refresh().await?;
        let base_version = self.loaded_version()?;
        let target = self.options.target_file_size_bytes;
        let min_files = min_files.max(2);

        let mut small_by_group: BTreeMap<(Vec<Option<String>>, bool), Vec<DataFile>> = BTreeMap::new();
        for file in self.active_files()? {
            if (file.size_bytes.max(0) as u64) < target / 2 {
                let closed = file.is_final(self.windows_closed_through);
                small_by_group
                    .entry((file.partition(&self.options.partition_by), closed))
                    .or_default()
                    .push(file);
            }
        }
        let bins: Vec<Vec<DataFile>> = small_by_group
            .into_values()
            .flat_map(|files| size_tiers(files, min_files))
            .flat_map(|files| pack_bins(files, target))
            .collect();
        if bins.is_empty() {
            return Ok(None);
        }

        let encoder = self.index.as_ref().map(|i| i.encoder.clone());
        let mut added = self.write_bins(&bins, encoder.as_deref()).await?;
        let removed: Vec<DataFile> = bins.into_iter().flatten().collect();
        for file in &mut added {
            file.add.data_change = false;
        }

        let now_ms = chrono::Utc::now().timestamp_millis();
        let actions = removed
            .iter()
            .map(|f| Action::Remove(f.remove_action(false, now_ms)))
            .chain(added.iter().map(|f| Action::Add(f.add.clone())))
            .collect();
        let operation = DeltaOperation::Optimize {
            predicate: None,
            target_size: i64::try_from(target).unwrap_or(i64::MAX),
        };
        let version = match self.commit(actions, operation, None).await {
            Ok(version) => version,
            Err(err) => {
                self.discard_if_uncommitted(&added).await;
                return Err(err);
            }
        };
        self.after_commit(base_version, version, &removed, &added).await;
        Ok(Some(CompactionReport {
            version,
            files_removed: removed.len(),
            files_added: added.len(),
            bytes_removed: removed.iter().map(|f| f.size_bytes.max(0) as u64).sum(),
            bytes_added: added.iter().map(|f| f.add.size.max(0) as u64).sum(),
        }))
    }

    /// Rewrites each bin of files as new files (not committed); on failure, deletes the ones
    /// already written.
    async fn write_bins(&self, bins: &[Vec<DataFile>], encoder: Option<&KeyEncoder>) -> SinkResult<Vec<NewFile>> {
        let mut written = Vec::new();
        for bin in bins {
            match self.rewrite_files(bin, encoder).await {
                Ok(files) => written.extend(files),
                Err(err) => {
                    self.delete_files(written.iter().map(|f: &NewFile| f.add.path.as_str())).await;
                    return Err(err);
                }
            }
        }
        Ok(written)
    }

    /// Writes the rows of `files` (one bin: files of one partition) as new files (not
    /// committed), streaming: each read batch goes to the writer before the next is decoded,
    /// so memory holds one input file's bytes and the files being written, not the bin.
    /// In a view, rows of closed windows and of open ones go to separate files. On failure,
    /// deletes the files already written.
    async fn rewrite_files(&self, files: &[DataFile], encoder: Option<&KeyEncoder>) -> SinkResult<Vec<NewFile>> {
        let mut closed = self.file_cutter(encoder)?;
        let mut open = self.file_cutter(encoder)?;
        if let Err(err) = self.copy_rows(files, &mut closed, &mut open).await {
            self.delete_files(closed.written().iter().chain(open.written()).map(|f| f.add.path.as_str()))
                .await;
            return Err(err);
        }
        let mut written = closed.into_written();
        written.extend(open.into_written());
        Ok(written)
    }

    /// Copies every row of `files` into `closed` (rows of closed windows, in a view) or `open`
    /// (the others), one read batch at a time, and cuts their last files.
    async fn copy_rows(&self, files: &[DataFile], closed: &mut FileCutter<'_>, open: &mut FileCutter<'_>) -> SinkResult<()> {
        for file in files {
            for batch in self.reader().batches(file, None).await? {
                let (closed_rows, open_rows) = self.split_closed(vec![batch?])?;
                for rows in &closed_rows {
                    closed.write(rows).await?;
                }
                for rows in &open_rows {
                    open.write(rows).await?;
                }
            }
        }
        closed.end_file().await?;
        open.end_file().await
    }

    /// Writes rows as data files (not committed); in a view, rows of closed windows in files of
    /// their own. On failure, deletes the files already written.
    async fn write_split(&self, rows: Vec<RecordBatch>, encoder: Option<&KeyEncoder>) -> SinkResult<Vec<NewFile>> {
        let (closed, open) = self.split_closed(rows)?;
        let mut written = self.write_files(&closed, encoder).await?;
        match self.write_files(&open, encoder).await {
            Ok(files) => written.extend(files),
            Err(err) => {
                self.delete_files(written.iter().map(|f| f.add.path.as_str())).await;
                return Err(err);
            }
        }
        Ok(written)
    }

    /// Deletes data files that the current version does not reference and that were removed
    /// from the table more than `retention` ago (delta-rs vacuum, lite mode: files never
    /// committed are left alone). Returns how many files were deleted. Versions that still
    /// need those files can no longer be read (time travel ends at the retention horizon).
    ///
    /// The table's `delta.deletedFileRetentionDuration` is not enforced: the caller chooses.
    pub async fn vacuum(&mut self, retention: Duration) -> SinkResult<usize> {
        self.refresh().await?;
        let before = self.loaded_version()?;
        let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        let (table, metrics) = self
            .table
            .clone()
            .vacuum()
            .with_retention_period(retention)
            .with_enforce_retention_duration(false)
            .with_mode(VacuumMode::Lite)
            .with_commit_properties(CommitProperties::default().with_create_checkpoint(false))
            .await
            .map_err(|e| self.delta_err("vacuum", e))?;
        self.table = table;
        let after = self.loaded_version()?;
        self.maybe_checkpoint(before, after).await;
        Ok(metrics.files_deleted.len())
    }

    /// Commits `actions` on the loaded version (delta-rs rebases onto newer versions when the
    /// conflict checker allows) and loads the result. Checkpoints are ours
    /// ([`Self::maybe_checkpoint`]), not delta-rs's.
    async fn commit(&mut self, actions: Vec<Action>, operation: DeltaOperation, txn: Option<(&str, i64)>) -> SinkResult<i64> {
        let mut properties = CommitProperties::default().with_create_checkpoint(false);
        if let Some((app_id, version)) = txn {
            properties = properties.with_application_transaction(Transaction::new(app_id, version));
        }
        // The data files first, so the log never names a file a crash could lose.
        let added = actions.iter().filter_map(|a| match a {
            Action::Add(add) => Some(add.path.as_str()),
            _ => None,
        });
        super::durable::sync_files(&self.path, added)?;
        let snapshot = self.table.snapshot().map_err(|e| self.delta_err("commit", e))?;
        let finalized = CommitBuilder::from(properties)
            .with_actions(actions)
            .build(Some(snapshot), self.table.log_store(), operation)
            .await
            .map_err(|source| match (&source, txn) {
                (
                    DeltaTableError::Transaction {
                        source: TransactionError::CommitConflict(CommitConflictError::ConcurrentTransaction),
                    },
                    Some((app_id, _)),
                ) => DeltaSinkError::ConcurrentWriter {
                    path: self.path.clone(),
                    app_id: app_id.to_owned(),
                    source: Box::new(source),
                },
                _ => self.delta_err("commit", source),
            })?;
        let version = finalized.version();
        self.table.state = Some(finalized.snapshot());
        super::durable::sync_log(&self.path, version)?;
        Ok(version)
    }

    /// Keeps the key index current with our own commit (when nobody committed between its
    /// version and ours; otherwise the next upsert catches it up from the log), and writes a
    /// checkpoint when one is due.
    async fn after_commit(&mut self, base_version: i64, version: i64, removed: &[DataFile], added: &[NewFile]) {
        if let Some(index) = &mut self.index {
            let follows = index.version == Some(base_version) && version == base_version + 1;
            if follows && added.iter().all(|f| f.keys.is_some()) {
                for file in removed {
                    index.remove_file(&file.path);
                }
                for file in added {
                    index.insert_file(DataFile::from_new(file), file.keys.clone().unwrap_or_default());
                }
                index.version = Some(version);
            }
        }
        self.maybe_checkpoint(base_version, version).await;
    }

    /// Writes a checkpoint of the loaded version `after` if the versions since `before`
    /// reached a multiple of the checkpoint interval. A failure is logged, not returned: the
    /// commit stands, and the next interval writes a checkpoint again.
    async fn maybe_checkpoint(&mut self, before: i64, after: i64) {
        let Ok(interval) = i64::try_from(self.options.checkpoint_interval) else {
            return;
        };
        if interval == 0 || after.div_euclid(interval) == before.div_euclid(interval) {
            return;
        }
        if let Err(error) = deltalake::checkpoints::create_checkpoint(&self.table, None).await {
            tracing::warn!(
                table = %self.path.display(),
                version = after,
                %error,
                "writing a Delta checkpoint failed; readers replay more log files until the next one"
            );
            return;
        }
        let Some(retention) = self.options.log_retention else { return };
        let cutoff = chrono::Utc::now().timestamp_millis() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        match deltalake::checkpoints::cleanup_expired_logs_for(after, self.table.log_store().as_ref(), cutoff, None).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::debug!(table = %self.path.display(), files = n, "deleted expired Delta log files");
                // The loaded state may still name the deleted commits (it reads them lazily):
                // load it afresh from the new checkpoint.
                if let Err(error) = self.table.update_state().await {
                    tracing::warn!(table = %self.path.display(), %error, "reloading the table after the log clean-up failed; the next commit reloads it");
                }
            }
            Err(error) => tracing::warn!(table = %self.path.display(), %error, "deleting expired Delta log files failed; retried at the next checkpoint"),
        }
    }

    /// Brings the key index for the upsert's key columns to the loaded version: built from the
    /// active files the first time, afterwards by dropping files no longer active and reading
    /// the keys of files it has not seen (commits by other writers, or ours it could not
    /// follow). In a view, files whose rows all ended at or before the index's horizon are not
    /// read: the first build starts from the earliest window start the upsert changes (or the
    /// closed horizon, if earlier).
    async fn sync_index(&mut self, upsert: &Upsert) -> SinkResult<()> {
        let version = self.loaded_version()?;
        let encoder = &upsert.encoder;
        let views = self.options.window_columns.is_some();
        let mut index = match self.index.take() {
            Some(index) if index.encoder.columns() == encoder.columns() => index,
            _ => {
                let floor = match (views, self.windows_closed_through, upsert.earliest_start) {
                    (false, _, _) | (true, _, None) => None,
                    (true, Some(closed), Some(start)) => Some(closed.min(start)),
                    (true, None, Some(start)) => Some(start),
                };
                KeyIndex::new(encoder.clone(), floor)
            }
        };
        // A new row in a window the index took as closed would miss its old row. The window
        // operator never sends one (events for closed windows are late); should it happen,
        // the index reads those files again instead of duplicating the row.
        if let (Some(floor), Some(end)) = (index.closed_through(), upsert.earliest_new_end) {
            if end <= floor {
                tracing::warn!(
                    table = %self.path.display(),
                    window_end_us = end,
                    closed_through_us = floor,
                    "an upsert changes a window the sink was told is closed; re-reading the files of that window (internal error: the rows are still written correctly)"
                );
                index.reopen_from(upsert.earliest_start.map(|s| s.min(floor)));
            }
        }
        if index.version != Some(version) {
            let active = self.active_files()?;
            let active_paths: HashSet<&str> = active.iter().map(|f| f.path.as_str()).collect();
            index.retain_files(|f| active_paths.contains(f.path.as_str()));
            let unseen: Vec<DataFile> = active.iter().filter(|f| !index.knows(f)).cloned().collect();
            for file in unseen {
                let end_column = self.options.window_columns.as_ref().map(|w| w.end.as_str());
                let keys = self.reader().read_keys(&file, &index.encoder, end_column).await?;
                index.insert_file(file, keys);
            }
            index.version = Some(version);
        }
        self.index = Some(index);
        Ok(())
    }

    /// Views: rows whose window ends at or before `through` are final — no epoch written after
    /// this call upserts or deletes them (the window operator's promise: events for a window
    /// closed at the query's watermark + allowed lateness are late). Their keys leave the
    /// index; rewrites and compaction keep them in files of their own. Never moves back;
    /// ignored for tables without [`TableOptions::window_columns`].
    pub fn close_windows_through(&mut self, through: i64) {
        if self.options.window_columns.is_none() || self.windows_closed_through.is_some_and(|c| c >= through) {
            return;
        }
        self.windows_closed_through = Some(through);
        if let Some(index) = &mut self.index {
            index.close_through(through);
        }
    }

    /// Views: how far windows are closed, as last told ([`Self::close_windows_through`]).
    pub fn windows_closed_through(&self) -> Option<i64> {
        self.windows_closed_through
    }

    /// Keys the upsert index holds: in a view, those of files with open windows; otherwise
    /// every key of the table (0 before the first upsert).
    pub fn indexed_keys(&self) -> usize {
        self.index.as_ref().map_or(0, KeyIndex::key_count)
    }

    /// Splits rows into those of windows closed at the sink's horizon and the others (all
    /// "others" when the table is no view or no horizon is known yet).
    fn split_closed(&self, batches: Vec<RecordBatch>) -> SinkResult<(Vec<RecordBatch>, Vec<RecordBatch>)> {
        let (Some(window), Some(through)) = (&self.options.window_columns, self.windows_closed_through) else {
            return Ok((Vec::new(), batches));
        };
        let (mut closed, mut open) = (Vec::new(), Vec::new());
        for batch in batches.into_iter().filter(|b| b.num_rows() > 0) {
            let ends = time_values(&self.path, &batch, &window.end)?;
            let is_closed: BooleanArray = ends.iter().map(|e| Some(*e <= through)).collect();
            let is_open = deltalake::arrow::compute::not(&is_closed).map_err(|source| self.arrow_err("upsert", source))?;
            for (mask, out) in [(&is_closed, &mut closed), (&is_open, &mut open)] {
                let part = filter_record_batch(&batch, mask).map_err(|source| self.arrow_err("upsert", source))?;
                if part.num_rows() > 0 {
                    out.push(part);
                }
            }
        }
        Ok((closed, open))
    }

    /// Deletes files written for a commit that failed, unless the commit landed after all
    /// (an error can come after the log entry was written).
    async fn discard_if_uncommitted(&mut self, files: &[NewFile]) {
        if self.refresh().await.is_err() {
            return;
        }
        let Ok(active) = self.active_files() else { return };
        let active: HashSet<&str> = active.iter().map(|f| f.path.as_str()).collect();
        let orphans: Vec<&str> = files.iter().map(|f| f.add.path.as_str()).filter(|p| !active.contains(p)).collect();
        self.delete_files(orphans.into_iter()).await;
    }

    /// Best-effort deletion of data files that are not part of the table.
    async fn delete_files<'a>(&self, paths: impl Iterator<Item = &'a str>) {
        let store = self.table.object_store();
        for path in paths {
            let object = deltalake::Path::parse(path).unwrap_or_else(|_| deltalake::Path::from(path));
            if let Err(error) = store.delete(&object).await {
                tracing::debug!(table = %self.path.display(), file = path, %error, "could not delete an uncommitted data file");
            }
        }
    }

    /// Writes rows (in the table schema) as data files near the target size.
    async fn write_files(&self, batches: &[RecordBatch], encoder: Option<&KeyEncoder>) -> SinkResult<Vec<NewFile>> {
        write_data_files(
            &self.table,
            &self.path,
            &self.options.partition_by,
            batches,
            self.options.target_file_size_bytes,
            encoder,
            self.options.window_columns.as_ref().map(|w| w.end.as_str()),
        )
        .await
    }

    /// A writer of data files near the target size, for rows of one partition.
    fn file_cutter<'a>(&'a self, encoder: Option<&'a KeyEncoder>) -> SinkResult<FileCutter<'a>> {
        FileCutter::new(
            &self.table,
            &self.path,
            self.options.target_file_size_bytes,
            encoder,
            self.options.window_columns.as_ref().map(|w| w.end.as_str()),
        )
    }

    fn reader(&self) -> FileReader<'_> {
        FileReader {
            table_path: &self.path,
            store: self.table.object_store(),
            schema: &self.schema,
            partition_columns: &self.options.partition_by,
            files_read: &self.files_read,
        }
    }

    /// The active data files of the loaded version (in a view, with where their rows end).
    fn active_files(&self) -> SinkResult<Vec<DataFile>> {
        let state = self.table.snapshot().map_err(|e| self.delta_err("read", e))?;
        let end_column = self.options.window_columns.as_ref().map(|w| w.end.as_str());
        state
            .log_data()
            .into_iter()
            .map(|view| {
                let mut file = DataFile::from_view(&self.path, &view)?;
                file.last_window_end = end_column.and_then(|c| max_time_of(&view, c));
                Ok(file)
            })
            .collect()
    }

    /// Non-empty batches, conformed to the table schema.
    fn conform_all(&self, batches: &[RecordBatch]) -> SinkResult<Vec<RecordBatch>> {
        batches
            .iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| conform_batch(&self.path, &self.schema, b))
            .collect()
    }

    /// Brings the table state up to the newest version: incrementally when possible, with a
    /// full reload as the fallback (e.g. after the log was cleaned up under us).
    async fn refresh(&mut self) -> SinkResult<()> {
        let log_store = self.table.log_store();
        if let Some(state) = self.table.state.as_mut() {
            match state.update(log_store.as_ref(), None).await {
                Ok(()) => return Ok(()),
                Err(err) => tracing::debug!(
                    table = %self.path.display(),
                    error = %err,
                    "incremental Delta refresh failed; reloading the table"
                ),
            }
        }
        self.table.update_state().await.map_err(|e| self.delta_err("refresh", e))
    }

    fn loaded_version(&self) -> SinkResult<i64> {
        self.table.version().ok_or_else(|| self.delta_err("refresh", DeltaTableError::NotInitialized))
    }

    fn delta_err(&self, operation: &'static str, source: DeltaTableError) -> DeltaSinkError {
        delta_error(&self.path, operation, source)
    }

    fn arrow_err(&self, operation: &'static str, source: deltalake::arrow::error::ArrowError) -> DeltaSinkError {
        delta_error(&self.path, operation, DeltaTableError::Arrow { source })
    }

    /// Canonical local directory of the table.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The currently loaded table version.
    pub fn version(&self) -> Option<i64> {
        self.table.version()
    }

    /// The table's columns as Arrow types (what [`read_table`] returns).
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// The options the table was opened with.
    pub fn options(&self) -> &TableOptions {
        &self.options
    }

    /// Data files this sink has read since it was opened (index building, upsert rewrites,
    /// compaction): the I/O an upsert costs beyond writing.
    pub fn data_files_read(&self) -> u64 {
        self.files_read.load(Ordering::Relaxed)
    }
}

/// Reads every row of the table's newest version (or `version`, for time travel) by reading
/// its active Parquet files directly; partition columns are rebuilt from each file's partition
/// values. Tables with deletion vectors are refused (this sink never writes them). Files are
/// decoded on the calling task; meant for tests and `tidemark inspect`, not for large tables.
pub async fn read_table(path: &Path, version: Option<i64>) -> SinkResult<Vec<RecordBatch>> {
    let table = open_existing(path, version).await?;
    let path = canonical_path(path)?;
    let state = table.snapshot().map_err(|e| delta_error(&path, "read", e))?;
    let schema = state.snapshot().arrow_schema();
    let partition_columns = state.metadata().partition_columns().clone();
    let files_read = AtomicU64::new(0);
    let reader = FileReader {
        table_path: &path,
        store: table.object_store(),
        schema: &schema,
        partition_columns: &partition_columns,
        files_read: &files_read,
    };
    let mut batches = Vec::new();
    for view in state.log_data() {
        let file = DataFile::from_view(&path, &view)?;
        batches.extend(reader.read(&file, None).await?);
    }
    Ok(batches)
}

/// The `txn` version `app_id` recorded in the table's newest version, for tests and inspection.
pub async fn read_committed_epoch(path: &Path, app_id: &str) -> SinkResult<Option<u64>> {
    let table = open_existing(path, None).await?;
    let version = table_txn_version(&table, &canonical_path(path)?, app_id).await?;
    Ok(version.and_then(|v| u64::try_from(v).ok()))
}

/// Schema of the dead-letter table: one row per record that could not be decoded or
/// processed. `payload` holds the raw record bytes and may be empty.
pub fn dead_letter_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("reason", DataType::Utf8, false),
        Field::new("topic", DataType::Utf8, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new("payload", DataType::Binary, false),
        Field::new("error", DataType::Utf8, false),
        Field::new("routed_at", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
    ]))
}

fn txn_version(epoch: u64) -> SinkResult<i64> {
    i64::try_from(epoch).map_err(|_| DeltaSinkError::EpochOutOfRange { epoch })
}

fn delta_error(path: &Path, operation: &'static str, source: DeltaTableError) -> DeltaSinkError {
    DeltaSinkError::Delta {
        path: path.to_path_buf(),
        operation,
        source: Box::new(source),
    }
}

fn merge_clause(action_type: &str) -> MergePredicate {
    MergePredicate {
        action_type: action_type.to_owned(),
        predicate: None,
    }
}

/// Cuts `files` into tiers of similar size: sorted by size, each tier holds the files up to
/// [`COMPACTION_TIER_RATIO`] times its smallest. Tiers of fewer than `min_files` files are
/// left out.
fn size_tiers(mut files: Vec<DataFile>, min_files: usize) -> Vec<Vec<DataFile>> {
    files.sort_by(|a, b| a.size_bytes.cmp(&b.size_bytes).then_with(|| a.path.cmp(&b.path)));
    let mut tiers: Vec<Vec<DataFile>> = Vec::new();
    for file in files {
        match tiers.last_mut() {
            Some(tier) if file.size_bytes <= tier[0].size_bytes.max(1).saturating_mul(COMPACTION_TIER_RATIO) => tier.push(file),
            _ => tiers.push(vec![file]),
        }
    }
    tiers.retain(|tier| tier.len() >= min_files.max(2));
    tiers
}

/// Groups `files` (all smaller than half of `target_bytes`) into bins of about `target_bytes`,
/// smallest files first; a bin of one file would only copy it and is dropped.
fn pack_bins(mut files: Vec<DataFile>, target_bytes: u64) -> Vec<Vec<DataFile>> {
    files.sort_by(|a, b| a.size_bytes.cmp(&b.size_bytes).then_with(|| a.path.cmp(&b.path)));
    let mut bins: Vec<Vec<DataFile>> = Vec::new();
    let mut current: Vec<DataFile> = Vec::new();
    let mut current_bytes = 0u64;
    for file in files {
        let size = file.size_bytes.max(0) as u64;
        if !current.is_empty() && current_bytes + size > target_bytes {
            bins.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current_bytes += size;
        current.push(file);
    }
    bins.push(current);
    bins.retain(|bin| bin.len() >= 2);
    bins
}

/// `InvalidOptions` unless the window columns, if any, are timestamp columns of `schema`.
fn check_window_columns(path: &Path, schema: &SchemaRef, options: &TableOptions) -> SinkResult<()> {
    let Some(window) = &options.window_columns else { return Ok(()) };
    for column in [&window.start, &window.end] {
        match schema.field_with_name(column).map(|f| f.data_type()) {
            Ok(DataType::Timestamp(TimeUnit::Microsecond, _)) => {}
            _ => {
                return Err(DeltaSinkError::InvalidOptions {
                    path: path.to_path_buf(),
                    reason: format!("window column `{column}` is not a timestamp column of the table (internal error: the sink plan names the window columns)"),
                })
            }
        }
    }
    Ok(())
}

/// `InvalidOptions` unless the partition columns are distinct columns of `schema` that leave
/// at least one data column, and the target size is positive.
fn check_options(path: &Path, schema: &SchemaRef, options: &TableOptions) -> SinkResult<()> {
    let invalid = |reason: String| DeltaSinkError::InvalidOptions {
        path: path.to_path_buf(),
        reason,
    };
    let columns = || schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ");
    for (i, column) in options.partition_by.iter().enumerate() {
        if schema.field_with_name(column).is_err() {
            return Err(invalid(format!(
                "partition column `{column}` is not a column of the query's output ({}); partition by one of those",
                columns()
            )));
        }
        if options.partition_by[..i].contains(column) {
            return Err(invalid(format!("partition column `{column}` is listed twice")));
        }
    }
    if !options.partition_by.is_empty() && options.partition_by.len() == schema.fields().len() {
        return Err(invalid(
            "every column is a partition column; Delta needs at least one column stored in the data files".into(),
        ));
    }
    if options.target_file_size_bytes == 0 {
        return Err(invalid("target_file_size_bytes is 0; use a size such as 128 MiB".into()));
    }
    Ok(())
}

fn canonical_path(path: &Path) -> SinkResult<PathBuf> {
    match std::fs::canonicalize(path) {
        Ok(path) => Ok(path),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Err(DeltaSinkError::TableNotFound { path: path.to_path_buf() }),
        Err(source) => Err(DeltaSinkError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The canonical path of an existing local directory and its `file://` URL.
fn local_table_url(path: &Path) -> SinkResult<(PathBuf, Url)> {
    let path = canonical_path(path)?;
    let url = Url::from_directory_path(&path).map_err(|()| DeltaSinkError::Io {
        path: path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "cannot turn the path into a file:// URL"),
    })?;
    Ok((path, url))
}

/// Loads an existing table (newest version, or `version`) for reading.
async fn open_existing(path: &Path, version: Option<i64>) -> SinkResult<DeltaTable> {
    let (path, url) = local_table_url(path)?;
    let loaded = match version {
        Some(v) => deltalake::open_table_with_version(url, v).await,
        None => deltalake::open_table(url).await,
    };
    loaded.map_err(|source| match source {
        DeltaTableError::NotATable(_) => DeltaSinkError::TableNotFound { path },
        source => DeltaSinkError::Delta {
            path,
            operation: "open",
            source: Box::new(source),
        },
    })
}

/// The `txn` version `app_id` recorded in the loaded version of `table`.
async fn table_txn_version(table: &DeltaTable, path: &Path, app_id: &str) -> SinkResult<Option<i64>> {
    let delta_err = |source| DeltaSinkError::Delta {
        path: path.to_path_buf(),
        operation: "read txn version",
        source: Box::new(source),
    };
    table
        .snapshot()
        .map_err(delta_err)?
        .transaction_version(table.log_store().as_ref(), app_id)
        .await
        .map_err(delta_err)
}

/// `SchemaMismatch` unless both column sets agree on names and Delta types.
fn check_columns(path: &Path, wanted: &StructType, found: &StructType) -> SinkResult<()> {
    let same_type = |name: &str, data_type: &DeltaDataType| found.field(name).is_some_and(|f| f.data_type() == data_type);
    let matches = wanted.fields().count() == found.fields().count() && wanted.fields().all(|f| same_type(f.name(), f.data_type()));
    if matches {
        return Ok(());
    }
    let describe = |schema: &StructType| {
        schema
            .fields()
            .map(|f| format!("{} {}", f.name(), f.data_type()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(DeltaSinkError::SchemaMismatch {
        path: path.to_path_buf(),
        expected: describe(wanted),
        found: describe(found),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::arrow::array::{Array, BinaryArray, Int32Array, Int64Array, StringArray, TimestampMicrosecondArray};
    use deltalake::ObjectStoreError;

    const APP: &str = "tidemark-test";

    fn counts_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("key", DataType::Utf8, false),
            Field::new("count", DataType::Int64, false),
            Field::new("window_start", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
        ]))
    }

    fn counts_batch(rows: &[(&str, i64, i64)]) -> RecordBatch {
        RecordBatch::try_new(
            counts_schema(),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.2)).with_timezone("UTC")),
            ],
        )
        .unwrap()
    }

    /// All rows of `batches` as sorted tuples, so file order does not matter.
    fn rows(batches: &[RecordBatch]) -> Vec<(String, i64, i64)> {
        let mut out = Vec::new();
        for batch in batches {
            assert_eq!(batch.schema(), counts_schema());
            let keys = batch.column(0).as_any().downcast_ref::<StringArray>().unwrap();
            let counts = batch.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
            let starts = batch.column(2).as_any().downcast_ref::<TimestampMicrosecondArray>().unwrap();
            for i in 0..batch.num_rows() {
                out.push((keys.value(i).to_owned(), counts.value(i), starts.value(i)));
            }
        }
        out.sort();
        out
    }

    fn owned(rows: &[(&str, i64, i64)]) -> Vec<(String, i64, i64)> {
        let mut out: Vec<_> = rows.iter().map(|r| (r.0.to_owned(), r.1, r.2)).collect();
        out.sort();
        out
    }

    const EPOCH_1: &[(&str, i64, i64)] = &[("a", 3, 1_000_000), ("b", 5, 1_000_000)];
    const EPOCH_2: &[(&str, i64, i64)] = &[("a", 1, 2_000_000)];

    #[tokio::test(flavor = "multi_thread")]
    async fn epochs_are_appended_once_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/counts");

        let mut sink = DeltaTableSink::open_or_create(&path, counts_schema(), &TableOptions::default()).await.unwrap();
        assert_eq!(sink.version(), Some(0));
        assert_eq!(sink.committed_epoch(APP).await.unwrap(), None);

        let outcome = sink.append_epoch(APP, 1, vec![counts_batch(EPOCH_1)]).await.unwrap();
        assert_eq!(outcome, AppendOutcome::Committed { version: 1 });
        assert_eq!(sink.version(), Some(1));
        assert_eq!(rows(&read_table(&path, None).await.unwrap()), owned(EPOCH_1));

        // A replayed epoch is acknowledged without writing.
        let outcome = sink.append_epoch(APP, 1, vec![counts_batch(EPOCH_1)]).await.unwrap();
        assert_eq!(outcome, AppendOutcome::AlreadyCommitted);
        assert_eq!(sink.version(), Some(1));
        assert_eq!(read_table(&path, None).await.unwrap().iter().map(|b| b.num_rows()).sum::<usize>(), 2);

        let outcome = sink.append_epoch(APP, 2, vec![counts_batch(EPOCH_2)]).await.unwrap();
        assert_eq!(outcome, AppendOutcome::Committed { version: 2 });
        assert_eq!(sink.committed_epoch(APP).await.unwrap(), Some(2));
        assert_eq!(sink.committed_epoch("other-app").await.unwrap(), None);

        let all: Vec<_> = EPOCH_1.iter().chain(EPOCH_2).copied().collect();
        assert_eq!(rows(&read_table(&path, None).await.unwrap()), owned(&all));
        // Time travel: version 1 holds only epoch 1, version 0 is the empty table.
        assert_eq!(rows(&read_table(&path, Some(1)).await.unwrap()), owned(EPOCH_1));
        assert!(rows(&read_table(&path, Some(0)).await.unwrap()).is_empty());

        drop(sink);
        assert_eq!(read_committed_epoch(&path, APP).await.unwrap(), Some(2));
        let mut reopened = DeltaTableSink::open_or_create(&path, counts_schema(), &TableOptions::default()).await.unwrap();
        assert_eq!(reopened.version(), Some(2));
        assert_eq!(reopened.committed_epoch(APP).await.unwrap(), Some(2));
        // An older epoch after restart is also recognised.
        let outcome = reopened.append_epoch(APP, 2, vec![counts_batch(EPOCH_2)]).await.unwrap();
        assert_eq!(outcome, AppendOutcome::AlreadyCommitted);
        assert_eq!(rows(&read_table(&path, None).await.unwrap()), owned(&all));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_stale_sink_sees_epochs_committed_by_another_handle() {
        // Models a restarted daemon racing the old one's last commit: the second handle's
        // state predates the commit, and the txn check must still see it.
        let dir = tempfile::tempdir().unwrap();
        let mut first = DeltaTableSink::open_or_create(dir.path(), counts_schema(), &TableOptions::default())
            .await
            .unwrap();
        let mut second = DeltaTableSink::open_or_create(dir.path(), counts_schema(), &TableOptions::default())
            .await
            .unwrap();
        assert_eq!(
            first.append_epoch(APP, 1, vec![counts_batch(EPOCH_1)]).await.unwrap(),
            AppendOutcome::Committed { version: 1 }
        );
        assert_eq!(second.version(), Some(0));
        assert_eq!(
            second.append_epoch(APP, 1, vec![counts_batch(EPOCH_1)]).await.unwrap(),
            AppendOutcome::AlreadyCommitted
        );
        // A different app id appends on top of the other handle's commit.
        assert_eq!(
            second.append_epoch("other-app", 1, vec![counts_batch(EPOCH_2)]).await.unwrap(),
            AppendOutcome::Committed { version: 2 }
        );
        assert_eq!(first.committed_epoch("other-app").await.unwrap(), Some(1));
        let all: Vec<_> = EPOCH_1.iter().chain(EPOCH_2).copied().collect();
        assert_eq!(rows(&read_table(dir.path(), None).await.unwrap()), owned(&all));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn empty_epoch_is_skipped_without_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = DeltaTableSink::open_or_create(dir.path(), counts_schema(), &TableOptions::default())
            .await
            .unwrap();
        let before = sink.version();
        assert_eq!(sink.append_epoch(APP, 1, vec![counts_batch(&[])]).await.unwrap(), AppendOutcome::Skipped);
        assert_eq!(sink.append_epoch(APP, 1, Vec::new()).await.unwrap(), AppendOutcome::Skipped);
        assert_eq!(sink.version(), before);
        assert_eq!(sink.committed_epoch(APP).await.unwrap(), None);
        assert_eq!(sink.version(), before);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn reopening_with_other_columns_is_a_schema_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        DeltaTableSink::open_or_create(dir.path(), counts_schema(), &TableOptions::default())
            .await
            .unwrap();

        let other = Arc::new(Schema::new(vec![
            Field::new("key", DataType::Utf8, false),
            Field::new("total", DataType::Float64, false),
        ]));
        let err = DeltaTableSink::open_or_create(dir.path(), other, &TableOptions::default()).await.unwrap_err();
        assert!(!err.is_retryable());
        let DeltaSinkError::SchemaMismatch { expected, found, .. } = &err else {
            panic!("expected SchemaMismatch, got {err:?}");
        };
        assert_eq!(expected, "key string, total double");
        assert_eq!(found, "key string, count long, window_start timestamp");
        let message = err.to_string();
        assert!(message.contains("total double"), "{message}");
        assert!(message.contains("count long"), "{message}");
        assert!(message.contains("new path or drop the table"), "{message}");

        // Same columns with other nullability and order: accepted.
        let relaxed = Arc::new(Schema::new(vec![
            Field::new("window_start", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
            Field::new("count", DataType::Int64, true),
            Field::new("key", DataType::Utf8, true),
        ]));
        let sink = DeltaTableSink::open_or_create(dir.path(), relaxed, &TableOptions::default()).await.unwrap();
        assert_eq!(sink.schema(), counts_schema());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn batches_are_matched_by_name_and_cast_to_the_table_types() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = DeltaTableSink::open_or_create(dir.path(), counts_schema(), &TableOptions::default())
            .await
            .unwrap();
        // Columns reordered, LargeUtf8 for utf8, nullable fields.
        let schema = Arc::new(Schema::new(vec![
            Field::new("count", DataType::Int64, true),
            Field::new("key", DataType::LargeUtf8, true),
            Field::new("window_start", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![7])),
                Arc::new(deltalake::arrow::array::LargeStringArray::from(vec!["z"])),
                Arc::new(TimestampMicrosecondArray::from(vec![5]).with_timezone("UTC")),
            ],
        )
        .unwrap();
        sink.append_epoch(APP, 1, vec![batch]).await.unwrap();
        assert_eq!(rows(&read_table(dir.path(), None).await.unwrap()), vec![("z".to_owned(), 7, 5)]);

        let wrong = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("key", DataType::Utf8, false)])),
            vec![Arc::new(StringArray::from(vec!["x"]))],
        )
        .unwrap();
        let err = sink.append_epoch(APP, 2, vec![wrong]).await.unwrap_err();
        assert!(matches!(err, DeltaSinkError::BatchSchema { .. }), "{err:?}");
        assert!(!err.is_retryable());
        assert_eq!(sink.committed_epoch(APP).await.unwrap(), Some(1));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn dead_letter_table_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let schema = dead_letter_schema();
        let mut sink = DeltaTableSink::open_or_create(dir.path(), schema.clone(), &TableOptions::default())
            .await
            .unwrap();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["decode", "decode"])),
                Arc::new(StringArray::from(vec!["clicks", "clicks"])),
                Arc::new(Int32Array::from(vec![0, 3])),
                Arc::new(Int64Array::from(vec![41, 7])),
                Arc::new(BinaryArray::from_vec(vec![b"{bad".as_slice(), b"".as_slice()])),
                Arc::new(StringArray::from(vec!["eof", "empty"])),
                Arc::new(TimestampMicrosecondArray::from(vec![10, 11]).with_timezone("UTC")),
            ],
        )
        .unwrap();
        sink.append_epoch("dlq", 9, vec![batch.clone()]).await.unwrap();
        let read = read_table(dir.path(), None).await.unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0], batch);
        assert_eq!(read[0].column(4).len(), 2);
        assert_eq!(read_committed_epoch(dir.path(), "dlq").await.unwrap(), Some(9));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn reading_a_missing_table_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_table(&dir.path().join("nope"), None).await.unwrap_err();
        assert!(matches!(err, DeltaSinkError::TableNotFound { .. }), "{err:?}");
        let err = read_committed_epoch(dir.path(), APP).await.unwrap_err();
        assert!(matches!(err, DeltaSinkError::TableNotFound { .. }), "{err:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_upsert_retried_on_a_newer_version_is_planned_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let key = vec!["key".to_owned()];
        let mut sink = DeltaTableSink::open_or_create(path, counts_schema(), &TableOptions::default()).await.unwrap();
        sink.upsert_epoch(APP, 1, &key, vec![counts_batch(EPOCH_1)], Vec::new()).await.unwrap();
        sink.upsert_epoch(APP, 2, &key, vec![counts_batch(&[("c", 1, 0)])], Vec::new()).await.unwrap();

        // A first attempt plans against version 2 (its files are written, not committed)...
        let upsert = sink.prepare_upsert(&key, &[counts_batch(&[("a", 9, 9)])], &[]).unwrap().unwrap();
        let change = EpochChange::Upsert(upsert);
        let EpochChange::Upsert(upsert) = &change else { unreachable!() };
        let mut files = EpochFiles {
            rewrite: Some(sink.plan_rewrite(2, upsert).await.unwrap()),
            ..EpochFiles::default()
        };
        let stale: Vec<PathBuf> = files.rewrite.as_ref().unwrap().added.iter().map(|f| path.join(&f.add.path)).collect();
        assert!(stale.iter().all(|p| p.exists()));

        // ...then another handle compacts the files that plan removes.
        let mut other = DeltaTableSink::open_or_create(path, counts_schema(), &TableOptions::default()).await.unwrap();
        other.compact(2).await.unwrap().expect("two small files");

        // The retry sees version 3: it plans again and deletes the first plan's files.
        let outcome = sink.try_write_epoch(APP, 3, &change, &mut files).await.unwrap();
        assert_eq!(outcome, AppendOutcome::Committed { version: 4 });
        assert_eq!(files.rewrite.as_ref().unwrap().base_version, 3);
        assert!(stale.iter().all(|p| !p.exists()), "{stale:?}");
        assert_eq!(
            rows(&read_table(path, None).await.unwrap()),
            owned(&[("a", 9, 9), ("b", 5, 1_000_000), ("c", 1, 0)])
        );
    }

    fn commit_failure(source: DeltaTableError) -> DeltaSinkError {
        DeltaSinkError::Delta {
            path: PathBuf::from("/t"),
            operation: "commit",
            source: Box::new(source),
        }
    }

    #[test]
    fn retryability_follows_the_cause() {
        let transient = commit_failure(DeltaTableError::ObjectStore {
            source: ObjectStoreError::Generic {
                store: "test",
                source: "connection reset".into(),
            },
        });
        assert!(transient.is_retryable());
        let fenced = commit_failure(DeltaTableError::Transaction {
            source: TransactionError::CommitConflict(CommitConflictError::ConcurrentTransaction),
        });
        assert!(!fenced.is_retryable());
        let missing = commit_failure(DeltaTableError::NotATable("/t".into()));
        assert!(!missing.is_retryable());
        let race = commit_failure(DeltaTableError::VersionAlreadyExists(3));
        assert!(race.is_retryable());
        let exhausted = DeltaSinkError::RetriesExhausted {
            app_id: APP.into(),
            epoch: 1,
            attempts: APPEND_ATTEMPTS,
            source: Box::new(race),
        };
        assert!(exhausted.is_retryable());
        assert!(!DeltaSinkError::EpochOutOfRange { epoch: u64::MAX }.is_retryable());

        // Conflicts (counted in tidemark_delta_commit_conflicts_total): a lost version race,
        // a conflicting commit, retried or not; not storage trouble.
        assert!(exhausted.is_conflict());
        assert!(fenced.is_conflict());
        assert!(!transient.is_conflict());
        assert!(!missing.is_conflict());
    }
}
