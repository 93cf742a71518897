//! What can go wrong in the Delta sink, whose fault it is, and whether a retry can help.

use std::path::PathBuf;

use deltalake::kernel::transaction::{CommitConflictError, TransactionError};
use deltalake::{DeltaTableError, ObjectStoreError};

pub type SinkResult<T> = Result<T, DeltaSinkError>;

/// What went wrong in the Delta sink, whose fault it is, and whether retrying can help
/// (see [`DeltaSinkError::is_retryable`]).
#[derive(Debug, thiserror::Error)]
pub enum DeltaSinkError {
    /// Syncing written files to disk failed.
    #[error(transparent)]
    Durable(#[from] super::durable::DurableError),

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

    /// User configuration: the sink points at a table partitioned differently from what the
    /// sink asks for.
    #[error(
        "the Delta table at {} is partitioned by ({found}); the sink asks for partitioning by \
         ({expected}); point the sink at a new path or drop the table (the sink never \
         rewrites an existing table's layout)",
        path.display()
    )]
    PartitionMismatch {
        path: PathBuf,
        /// Partition columns asked for, comma separated, `none` if unpartitioned.
        expected: String,
        /// Partition columns of the existing table, likewise.
        found: String,
    },

    /// User configuration: the table options do not fit the query's columns.
    #[error("invalid options for the Delta table at {}: {reason}", path.display())]
    InvalidOptions { path: PathBuf, reason: String },

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

    /// Internal bug or configuration: an upsert's key columns are not usable.
    #[error(
        "cannot upsert into the Delta table at {} by key ({columns}): {reason}; key the view \
         by columns the query outputs",
        path.display()
    )]
    InvalidKeyColumns { path: PathBuf, columns: String, reason: String },

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

    /// The table uses something this sink does not write and cannot read or rewrite (deletion
    /// vectors, data files missing columns).
    #[error("cannot read the Delta table at {}: {reason}", path.display())]
    UnsupportedTable { path: PathBuf, reason: String },

    /// An epoch write retried a transient failure and ran out of attempts. Nothing was
    /// committed for this epoch; writing it again later is safe.
    #[error("gave up writing epoch {epoch} (app id `{app_id}`) after {attempts} attempts: {source}")]
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
    /// Whether the cause is a commit conflict: another writer committed the version this
    /// commit was for (or a conflicting change) first.
    pub fn is_conflict(&self) -> bool {
        let delta_conflict = |e: &DeltaTableError| {
            matches!(
                e,
                DeltaTableError::VersionAlreadyExists(_)
                    | DeltaTableError::Transaction {
                        source: TransactionError::CommitConflict(_) | TransactionError::VersionAlreadyExists(_)
                    }
            )
        };
        match self {
            DeltaSinkError::ConcurrentWriter { .. } => true,
            DeltaSinkError::Delta { source, .. } => delta_conflict(source),
            DeltaSinkError::RetriesExhausted { source, .. } => source.is_conflict(),
            _ => false,
        }
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            DeltaSinkError::Io { source, .. } => io_error_is_transient(source),
            DeltaSinkError::Delta { source, .. } => delta_error_is_transient(source),
            DeltaSinkError::RetriesExhausted { source, .. } => source.is_retryable(),
            DeltaSinkError::SchemaMismatch { .. }
            | DeltaSinkError::PartitionMismatch { .. }
            | DeltaSinkError::InvalidOptions { .. }
            | DeltaSinkError::UnsupportedSchema { .. }
            | DeltaSinkError::BatchSchema { .. }
            | DeltaSinkError::InvalidKeyColumns { .. }
            | DeltaSinkError::EpochOutOfRange { .. }
            | DeltaSinkError::TableNotFound { .. }
            | DeltaSinkError::ConcurrentWriter { .. }
            | DeltaSinkError::UnsupportedTable { .. }
            | DeltaSinkError::Durable(_) => false,
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
