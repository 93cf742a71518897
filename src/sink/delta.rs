//! Delta Lake table writer used by the committer, and a small reader for tests and
//! `tidemark inspect`.
//!
//! Exactly-once rests on one rule: every epoch is appended as **one** Delta commit that
//! carries a `txn(app_id, epoch)` action, and before writing we read the highest `txn`
//! version the table holds for our app id. An epoch at or below it has already landed (maybe
//! by a run that crashed before recording it), so it is acknowledged and not written again.
//! delta-rs's conflict checker only fences a *concurrent* writer with the same app id; it does
//! not skip duplicates, which is why the check is ours.
//!
//! Data files are written once per epoch and their `add` actions reused across commit
//! attempts, so a retried commit does not leave a second copy of the epoch's Parquet files.
//!
//! Every async fn here needs a tokio runtime on the calling thread (delta-rs uses
//! `spawn_blocking`); the committer owns one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use deltalake::arrow::array::{ArrayRef, RecordBatch};
use deltalake::arrow::compute::{cast_with_options, CastOptions};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitBuilder, CommitConflictError, CommitProperties, TransactionError};
use deltalake::kernel::{Action, Add, DataType as DeltaDataType, StructType, Transaction};
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError, ObjectStore, ObjectStoreError};
use url::Url;

/// Attempts per epoch (the first try plus retries) before `append_epoch` gives up.
const APPEND_ATTEMPTS: u32 = 4;
/// Delay before the first retry; it quadruples on each further retry (100 ms, 400 ms, 1.6 s).
const RETRY_BASE_DELAY: Duration = Duration::from_millis(100);

pub type SinkResult<T> = Result<T, DeltaSinkError>;

/// What went wrong in the Delta sink, whose fault it is, and whether retrying can help
/// (see [`DeltaSinkError::is_retryable`]).
#[derive(Debug, thiserror::Error)]
pub enum DeltaSinkError {
    /// User configuration: the sink points at a table made for a different query.
    #[error(
        "the Delta table at {} has columns ({found}); the query produces ({expected}); \
         point the sink at a new path or drop the table",
        path.display()
    )]
    SchemaMismatch {
        path: PathBuf,
        /// Columns the query produces, as `name type` pairs.
        expected: String,
        /// Columns the existing table has, as `name type` pairs.
        found: String,
    },

    /// User configuration: the query produces a column type Delta Lake cannot store.
    #[error(
        "the query's output cannot be stored in the Delta table at {}: {reason}; \
         change the column's type in the query (Delta stores int8/16/32/64, float32/64, \
         utf8, binary, boolean, decimal, date and timestamp µs UTC)",
        path.display()
    )]
    UnsupportedSchema { path: PathBuf, reason: String },

    /// Internal bug: a batch handed to the sink does not fit the table's columns.
    #[error(
        "internal error: a batch for the Delta table at {} does not match its columns: {reason}",
        path.display()
    )]
    BatchSchema { path: PathBuf, reason: String },

    /// Internal bug: Delta `txn` versions are i64.
    #[error("internal error: epoch {epoch} does not fit in a Delta txn version (i64)")]
    EpochOutOfRange { epoch: u64 },

    /// Local file system: the table directory cannot be created or resolved.
    #[error(
        "cannot prepare the Delta table directory {}: {source}; check that the path exists \
         or can be created, and is writable",
        path.display()
    )]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Reading a table that does not exist (there is no `_delta_log` at the path).
    #[error("there is no Delta table at {}; check the path", path.display())]
    TableNotFound { path: PathBuf },

    /// Operator error: another process committed with the same app id while we were
    /// committing. Two daemons share one app id (a zombie, or a copied config).
    #[error(
        "another writer committed to the Delta table at {} with app id `{app_id}` at the same \
         time; two daemons are writing with one app id: stop the other one, or give each its \
         own app id",
        path.display()
    )]
    ConcurrentWriter {
        path: PathBuf,
        app_id: String,
        #[source]
        source: Box<DeltaTableError>,
    },

    /// External system: delta-rs or the object store failed. [`Self::is_retryable`] says
    /// whether the cause looks transient.
    #[error("Delta Lake {operation} failed for the table at {}: {source}", path.display())]
    Delta {
        path: PathBuf,
        operation: &'static str,
        #[source]
        source: Box<DeltaTableError>,
    },

    /// The reader only handles what this sink writes: unpartitioned tables without deletion
    /// vectors.
    #[error("cannot read the Delta table at {}: {reason}", path.display())]
    UnsupportedTable { path: PathBuf, reason: String },

    /// `append_epoch` retried a transient failure and ran out of attempts. Nothing was
    /// committed for this epoch; appending it again later is safe.
    #[error("gave up appending epoch {epoch} (app id `{app_id}`) after {attempts} attempts: {source}")]
    RetriesExhausted {
        app_id: String,
        epoch: u64,
        attempts: u32,
        #[source]
        source: Box<DeltaSinkError>,
    },
}

impl DeltaSinkError {
    /// Whether trying the same call again may succeed (a transient storage or commit-race
    /// failure), as opposed to a problem a person has to fix.
    pub fn is_retryable(&self) -> bool {
        match self {
            DeltaSinkError::Io { source, .. } => io_error_is_transient(source),
            DeltaSinkError::Delta { source, .. } => delta_error_is_transient(source),
            DeltaSinkError::RetriesExhausted { source, .. } => source.is_retryable(),
            DeltaSinkError::SchemaMismatch { .. }
            | DeltaSinkError::UnsupportedSchema { .. }
            | DeltaSinkError::BatchSchema { .. }
            | DeltaSinkError::EpochOutOfRange { .. }
            | DeltaSinkError::TableNotFound { .. }
            | DeltaSinkError::ConcurrentWriter { .. }
            | DeltaSinkError::UnsupportedTable { .. } => false,
        }
    }
}

fn io_error_is_transient(err: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(err.kind(), ErrorKind::Interrupted | ErrorKind::TimedOut | ErrorKind::WouldBlock)
}

fn object_store_error_is_transient(err: &ObjectStoreError) -> bool {
    !matches!(
        err,
        ObjectStoreError::NotFound { .. }
            | ObjectStoreError::InvalidPath { .. }
            | ObjectStoreError::NotSupported { .. }
            | ObjectStoreError::NotImplemented
            | ObjectStoreError::PermissionDenied { .. }
            | ObjectStoreError::Unauthenticated { .. }
            | ObjectStoreError::UnknownConfigurationKey { .. }
    )
}

fn delta_error_is_transient(err: &DeltaTableError) -> bool {
    match err {
        DeltaTableError::ObjectStore { source } => object_store_error_is_transient(source),
        DeltaTableError::Io { .. } | DeltaTableError::VersionAlreadyExists(_) => true,
        DeltaTableError::Transaction { source } => match source {
            TransactionError::CommitConflict(CommitConflictError::ConcurrentTransaction) => false,
            TransactionError::CommitConflict(_)
            | TransactionError::MaxCommitAttempts(_)
            | TransactionError::VersionAlreadyExists(_)
            | TransactionError::LogStoreError { .. } => true,
            TransactionError::ObjectStore { source } => object_store_error_is_transient(source),
            _ => false,
        },
        DeltaTableError::NotATable(_)
        | DeltaTableError::InvalidTableLocation(_)
        | DeltaTableError::SchemaMismatch { .. }
        | DeltaTableError::InvalidData { .. }
        | DeltaTableError::Arrow { .. } => false,
        // Kernel and generic errors wrap many things; storage trouble shows up as an object
        // store or io error somewhere in the source chain.
        other => {
            let mut cause = std::error::Error::source(other);
            while let Some(err) = cause {
                if let Some(store_err) = err.downcast_ref::<ObjectStoreError>() {
                    return object_store_error_is_transient(store_err);
                }
                if err.downcast_ref::<std::io::Error>().is_some() {
                    return true;
                }
                cause = err.source();
            }
            false
        }
    }
}

/// Result of [`DeltaTableSink::append_epoch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// The epoch is now in the table at this version.
    Committed { version: i64 },
    /// The table already held this epoch (or a later one) for the app id; nothing was written.
    /// Also returned when an earlier attempt of this call landed before failing to report it.
    AlreadyCommitted,
    /// The epoch had no rows; no commit was made.
    Skipped,
}

/// One Delta table that epochs are appended to.
pub struct DeltaTableSink {
    table: DeltaTable,
    /// Canonical local directory of the table.
    path: PathBuf,
    /// The table's columns as Arrow types; batches are conformed to this before writing.
    schema: SchemaRef,
}

impl std::fmt::Debug for DeltaTableSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaTableSink")
            .field("path", &self.path)
            .field("version", &self.version())
            .finish()
    }
}

impl DeltaTableSink {
    /// Opens the table at `path` (a local directory; created if missing), creating the table
    /// with `schema` if there is none yet. An existing table whose columns differ from `schema`
    /// in name or type (nullability and column order are ignored) is
    /// [`DeltaSinkError::SchemaMismatch`].
    pub async fn open_or_create(path: &Path, schema: SchemaRef) -> SinkResult<Self> {
        std::fs::create_dir_all(path).map_err(|source| DeltaSinkError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (path, url) = local_table_url(path)?;
        let wanted: StructType = schema.as_ref().try_into_kernel().map_err(|err| DeltaSinkError::UnsupportedSchema {
            path: path.clone(),
            reason: err.to_string(),
        })?;

        let delta_err = |operation, source| DeltaSinkError::Delta {
            path: path.clone(),
            operation,
            source: Box::new(source),
        };
        let mut table = DeltaTable::try_from_url(url).await.map_err(|e| delta_err("open", e))?;
        if table.version().is_none() {
            // `Ignore` turns a lost creation race into opening the winner's table, whose
            // schema is checked below like any existing table's.
            table = table
                .create()
                .with_columns(wanted.fields().cloned())
                .with_save_mode(SaveMode::Ignore)
                .await
                .map_err(|e| delta_err("create table", e))?;
        }

        let state = table.snapshot().map_err(|e| delta_err("open", e))?;
        check_columns(&path, &wanted, state.schema().as_ref())?;
        let schema = state.snapshot().arrow_schema();
        Ok(Self { table, path, schema })
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
        let txn_version = i64::try_from(epoch).map_err(|_| DeltaSinkError::EpochOutOfRange { epoch })?;
        if batches.iter().all(|b| b.num_rows() == 0) {
            return Ok(AppendOutcome::Skipped);
        }
        let batches = batches
            .iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| conform_batch(&self.path, &self.schema, b))
            .collect::<SinkResult<Vec<_>>>()?;

        // Files are written on the first attempt that gets that far and reused after.
        let mut written_files: Option<Vec<Add>> = None;
        let mut attempt = 1;
        loop {
            match self.try_append(app_id, txn_version, &batches, &mut written_files).await {
                Ok(outcome) => return Ok(outcome),
                Err(err) if err.is_retryable() && attempt < APPEND_ATTEMPTS => {
                    let delay = RETRY_BASE_DELAY * 4u32.pow(attempt - 1);
                    tracing::warn!(
                        table = %self.path.display(),
                        app_id,
                        epoch,
                        attempt,
                        retry_in_ms = delay.as_millis() as u64,
                        error = %err,
                        "Delta append failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(err) if err.is_retryable() => {
                    return Err(DeltaSinkError::RetriesExhausted {
                        app_id: app_id.to_owned(),
                        epoch,
                        attempts: attempt,
                        source: Box::new(err),
                    })
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// One attempt: refresh, re-check the txn version, write files if not yet written, commit.
    async fn try_append(&mut self, app_id: &str, txn_version: i64, batches: &[RecordBatch], written_files: &mut Option<Vec<Add>>) -> SinkResult<AppendOutcome> {
        self.refresh().await?;
        let committed = table_txn_version(&self.table, &self.path, app_id).await?;
        if committed.is_some_and(|v| v >= txn_version) {
            return Ok(AppendOutcome::AlreadyCommitted);
        }

        let adds = match written_files {
            Some(adds) => adds.clone(),
            None => {
                let adds = self.write_files(batches).await?;
                *written_files = Some(adds.clone());
                adds
            }
        };

        let properties = CommitProperties::default().with_application_transaction(Transaction::new(app_id, txn_version));
        let operation = DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: None,
            predicate: None,
        };
        let snapshot = self.table.snapshot().map_err(|e| self.delta_err("commit", e))?;
        let finalized = CommitBuilder::from(properties)
            .with_actions(adds.into_iter().map(Action::Add).collect())
            .build(Some(snapshot), self.table.log_store(), operation)
            .await
            .map_err(|source| match &source {
                DeltaTableError::Transaction {
                    source: TransactionError::CommitConflict(CommitConflictError::ConcurrentTransaction),
                } => DeltaSinkError::ConcurrentWriter {
                    path: self.path.clone(),
                    app_id: app_id.to_owned(),
                    source: Box::new(source),
                },
                _ => self.delta_err("commit", source),
            })?;
        let version = finalized.version();
        self.table.state = Some(finalized.snapshot());
        Ok(AppendOutcome::Committed { version })
    }

    /// Writes the batches as Parquet data files (not yet part of the table) and returns their
    /// `add` actions.
    async fn write_files(&self, batches: &[RecordBatch]) -> SinkResult<Vec<Add>> {
        let mut writer = RecordBatchWriter::for_table(&self.table).map_err(|e| self.delta_err("write", e))?;
        for batch in batches {
            writer.write(batch.clone()).await.map_err(|e| self.delta_err("write", e))?;
        }
        writer.flush().await.map_err(|e| self.delta_err("write", e))
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

    fn delta_err(&self, operation: &'static str, source: DeltaTableError) -> DeltaSinkError {
        DeltaSinkError::Delta {
            path: self.path.clone(),
            operation,
            source: Box::new(source),
        }
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
}

/// Reads every row of the table's newest version (or `version`) by reading its active Parquet
/// files directly. Handles what this sink writes: unpartitioned tables without deletion
/// vectors. Files are decoded on the calling task; meant for tests and `tidemark inspect`, not
/// for large tables.
pub async fn read_table(path: &Path, version: Option<i64>) -> SinkResult<Vec<RecordBatch>> {
    let table = open_existing(path, version).await?;
    let path = canonical_path(path)?;
    let delta_err = |operation, source| DeltaSinkError::Delta {
        path: path.clone(),
        operation,
        source: Box::new(source),
    };
    let state = table.snapshot().map_err(|e| delta_err("read", e))?;
    if !state.metadata().partition_columns().is_empty() {
        return Err(DeltaSinkError::UnsupportedTable {
            path: path.clone(),
            reason: "the table is partitioned".into(),
        });
    }
    let schema = state.snapshot().arrow_schema();
    let store = table.object_store();

    let mut batches = Vec::new();
    for file in state.log_data() {
        if file.deletion_vector_descriptor().is_some() {
            return Err(DeltaSinkError::UnsupportedTable {
                path: path.clone(),
                reason: format!("data file {} has a deletion vector", file.path()),
            });
        }
        let file_path = deltalake::Path::parse(file.path().as_ref()).unwrap_or_else(|_| deltalake::Path::from(file.path().as_ref()));
        let store_err = |source| delta_err("read", DeltaTableError::ObjectStore { source });
        let object = store.get(&file_path).await.map_err(store_err)?;
        let bytes = object.bytes().await.map_err(store_err)?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|builder| builder.build())
            .map_err(|source| delta_err("read", DeltaTableError::Parquet { source }))?;
        for batch in reader {
            let batch = batch.map_err(|source| delta_err("read", DeltaTableError::Arrow { source }))?;
            batches.push(conform_batch(&path, &schema, &batch)?);
        }
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

/// Rebuilds `batch` with exactly `schema`'s fields (matched by name, in the schema's order),
/// casting columns whose Arrow type differs but maps to the same Delta type.
fn conform_batch(path: &Path, schema: &SchemaRef, batch: &RecordBatch) -> SinkResult<RecordBatch> {
    if batch.schema() == *schema {
        return Ok(batch.clone());
    }
    let mismatch = |reason: String| DeltaSinkError::BatchSchema {
        path: path.to_path_buf(),
        reason,
    };
    if batch.num_columns() != schema.fields().len() {
        return Err(mismatch(format!(
            "the batch has {} columns, the table {}",
            batch.num_columns(),
            schema.fields().len()
        )));
    }
    let cast_options = CastOptions {
        safe: false,
        ..Default::default()
    };
    let columns = schema
        .fields()
        .iter()
        .map(|field| {
            let column = batch
                .column_by_name(field.name())
                .ok_or_else(|| mismatch(format!("column `{}` is missing", field.name())))?;
            if column.data_type() == field.data_type() {
                return Ok(column.clone());
            }
            let as_delta = |dt: &DataType| -> Option<DeltaDataType> { dt.try_into_kernel().ok() };
            let compatible = as_delta(column.data_type()).is_some_and(|dt| Some(dt) == as_delta(field.data_type()));
            if !compatible {
                return Err(mismatch(format!(
                    "column `{}` is {} but the table stores {}",
                    field.name(),
                    column.data_type(),
                    field.data_type()
                )));
            }
            cast_with_options(column, field.data_type(), &cast_options).map_err(|err| mismatch(format!("column `{}`: {err}", field.name())))
        })
        .collect::<SinkResult<Vec<ArrayRef>>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(|err| mismatch(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::arrow::array::{Array, BinaryArray, Int32Array, Int64Array, StringArray, TimestampMicrosecondArray};

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

        let mut sink = DeltaTableSink::open_or_create(&path, counts_schema()).await.unwrap();
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
        let mut reopened = DeltaTableSink::open_or_create(&path, counts_schema()).await.unwrap();
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
        let mut first = DeltaTableSink::open_or_create(dir.path(), counts_schema()).await.unwrap();
        let mut second = DeltaTableSink::open_or_create(dir.path(), counts_schema()).await.unwrap();
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
        let mut sink = DeltaTableSink::open_or_create(dir.path(), counts_schema()).await.unwrap();
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
        DeltaTableSink::open_or_create(dir.path(), counts_schema()).await.unwrap();

        let other = Arc::new(Schema::new(vec![
            Field::new("key", DataType::Utf8, false),
            Field::new("total", DataType::Float64, false),
        ]));
        let err = DeltaTableSink::open_or_create(dir.path(), other).await.unwrap_err();
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
        let sink = DeltaTableSink::open_or_create(dir.path(), relaxed).await.unwrap();
        assert_eq!(sink.schema(), counts_schema());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn batches_are_matched_by_name_and_cast_to_the_table_types() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = DeltaTableSink::open_or_create(dir.path(), counts_schema()).await.unwrap();
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
        let mut sink = DeltaTableSink::open_or_create(dir.path(), schema.clone()).await.unwrap();
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
    }
}
