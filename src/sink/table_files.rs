//! Data files of a Delta table as [`super::delta::DeltaTableSink`] handles them: reading one
//! back with its partition columns, writing rows as files of about a target size, and the
//! key → file index that lets an upsert rewrite only the files holding the changed keys.
//!
//! In a windowed view a row can change only while its window is open. Each file remembers the
//! last window end among its rows (from the rows when we write it, from the `add` action's
//! statistics or partition value when it is read from the log), and the index leaves out the
//! files whose rows are all final: it holds the keys that can still change, not the table.
//!
//! Paths are kept as delta-rs holds them in memory (`Add::path`, `LogicalFileView::path`):
//! already decoded from the log's URL encoding, i.e. object store paths relative to the table
//! root. delta-rs encodes them again when it writes the log.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use deltalake::arrow::array::{Array, ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray, UInt32Array};
use deltalake::arrow::compute::{cast_with_options, concat_batches, take_record_batch, CastOptions};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use deltalake::arrow::row::{RowConverter, SortField};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::scalars::ScalarExt;
use deltalake::kernel::{Add, DataType as DeltaDataType, LogicalFileView, Remove};
use deltalake::parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use deltalake::parquet::arrow::ProjectionMask;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError, ObjectStore};

use super::delta_error::{DeltaSinkError, SinkResult};

/// The values of a row's key columns, in a byte form that compares like the values
/// (Arrow's row format), so keys of any column types can be hashed.
pub(crate) type Key = Arc<[u8]>;

/// One data file of the table, with what its `add` action says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DataFile {
    /// Relative to the table root, decoded.
    pub path: String,
    pub size_bytes: i64,
    /// Partition column → value as the `add` action serializes it (`None` for null).
    pub partition_values: HashMap<String, Option<String>>,
    /// Views: the last window end among the file's rows (µs), when known. Once the view's
    /// closed horizon reaches it, every row of the file is final.
    pub last_window_end: Option<i64>,
}

impl DataFile {
    /// The active file `view` describes. Files with deletion vectors are refused: this sink
    /// never writes them, and reading one as plain Parquet would resurrect deleted rows.
    pub fn from_view(table_path: &Path, view: &LogicalFileView) -> SinkResult<Self> {
        if view.deletion_vector_descriptor().is_some() {
            return Err(DeltaSinkError::UnsupportedTable {
                path: table_path.to_path_buf(),
                reason: format!("data file {} has a deletion vector", view.path()),
            });
        }
        // Serialized the way delta-rs fills `Add::partition_values`, so files read from the log
        // and files this sink just wrote describe their partitions alike.
        let partition_values = view
            .partition_values()
            .map(|values| {
                values
                    .fields()
                    .iter()
                    .zip(values.values())
                    .map(|(field, value)| (field.name().to_string(), (!value.is_null()).then(|| value.serialize())))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            path: view.path().into_owned(),
            size_bytes: view.size(),
            partition_values,
            last_window_end: None,
        })
    }

    /// A file this sink wrote, as its [`NewFile`] describes it.
    pub fn from_new(file: &NewFile) -> Self {
        Self {
            path: file.add.path.clone(),
            size_bytes: file.add.size,
            partition_values: file.add.partition_values.clone(),
            last_window_end: file.last_window_end,
        }
    }

    /// True when every row of the file ends at or before `closed_through` (so none can change).
    pub fn is_final(&self, closed_through: Option<i64>) -> bool {
        matches!((self.last_window_end, closed_through), (Some(end), Some(through)) if end <= through)
    }

    /// The `remove` action that retires this file, stamped `deletion_timestamp_ms` (vacuum's
    /// retention counts from it).
    pub fn remove_action(&self, data_change: bool, deletion_timestamp_ms: i64) -> Remove {
        Remove {
            path: self.path.clone(),
            data_change,
            deletion_timestamp: Some(deletion_timestamp_ms),
            extended_file_metadata: Some(true),
            partition_values: Some(self.partition_values.clone()),
            size: Some(self.size_bytes),
            tags: None,
            deletion_vector: None,
            base_row_id: None,
            default_row_commit_version: None,
        }
    }

    /// The file's partition values in `partition_columns` order: files with equal ones share a
    /// partition directory.
    pub fn partition(&self, partition_columns: &[String]) -> Vec<Option<String>> {
        partition_columns.iter().map(|c| self.partition_values.get(c).cloned().flatten()).collect()
    }
}

/// The largest value of the timestamp column `column` in the file `view` describes: its
/// partition value, or the maximum its statistics record (delta-rs rounds a maximum that may
/// have been truncated to milliseconds up). `None` when the log says neither.
pub(crate) fn max_time_of(view: &LogicalFileView, column: &str) -> Option<i64> {
    if let Some(values) = view.partition_values() {
        if let Some((_, value)) = values.fields().iter().zip(values.values()).find(|(f, _)| f.name() == column) {
            return if value.is_null() { None } else { parse_stats_time(&value.serialize()) };
        }
    }
    let max = view.max_values()?.to_json();
    max.get(column)?.as_str().and_then(parse_stats_time)
}

/// A timestamp as delta-rs serializes scalars (`2026-11-23 00:00:00.000000`, UTC) in µs.
fn parse_stats_time(text: &str) -> Option<i64> {
    chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc().timestamp_micros())
}

/// A data file written but maybe not yet committed, and the keys of its rows when a key index
/// is kept (so the index can take the file in without reading it back).
#[derive(Debug, Clone)]
pub(crate) struct NewFile {
    pub add: Add,
    pub keys: Option<FileKeys>,
    /// Views: the last window end among its rows.
    pub last_window_end: Option<i64>,
}

/// The keys of a file's rows and, in a view, each row's window end (same order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FileKeys {
    pub keys: Vec<Key>,
    pub window_ends: Option<Vec<i64>>,
}

impl FileKeys {
    /// The keys of `batch`'s rows, with their window ends when `window_end_column` is given.
    pub fn of(table_path: &Path, batch: &RecordBatch, encoder: &KeyEncoder, window_end_column: Option<&str>) -> SinkResult<Self> {
        let keys = encoder.encode(table_path, batch)?;
        let window_ends = match window_end_column {
            None => None,
            Some(column) => Some(time_values(table_path, batch, column)?),
        };
        Ok(Self { keys, window_ends })
    }
}

/// Every value of the timestamp column `column` of `batch` (a null as the earliest time).
pub(crate) fn time_values(table_path: &Path, batch: &RecordBatch, column: &str) -> SinkResult<Vec<i64>> {
    let times = batch
        .column_by_name(column)
        .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
        .ok_or_else(|| DeltaSinkError::BatchSchema {
            path: table_path.to_path_buf(),
            reason: format!("window column `{column}` is missing from a batch, or not a timestamp"),
        })?;
    Ok(times.iter().map(|t| t.unwrap_or(i64::MIN)).collect())
}

/// Where the table's files live, what they hold, and a count of the data files read (tests
/// use it to check that an upsert reads only the files it touches).
pub(crate) struct FileReader<'a> {
    pub table_path: &'a Path,
    pub store: Arc<dyn ObjectStore>,
    pub schema: &'a SchemaRef,
    pub partition_columns: &'a [String],
    pub files_read: &'a AtomicU64,
}

impl FileReader<'_> {
    /// Reads `file` as batches of the table schema, or only of `columns` (in that order).
    /// Partition columns are not in the Parquet file: they come from the `add` action's
    /// partition values, cast from their serialized form to the column's type.
    pub async fn read(&self, file: &DataFile, columns: Option<&[String]>) -> SinkResult<Vec<RecordBatch>> {
        self.batches(file, columns).await?.collect()
    }

    /// Like [`Self::read`], one batch at a time: what is held is the file's encoded bytes and
    /// the batch being decoded, not the decoded file.
    pub async fn batches(&self, file: &DataFile, columns: Option<&[String]>) -> SinkResult<FileBatches<'_>> {
        let out_schema: SchemaRef = match columns {
            None => self.schema.clone(),
            Some(names) => Arc::new(Schema::new(
                names
                    .iter()
                    .map(|n| {
                        self.schema.field_with_name(n).cloned().map_err(|_| DeltaSinkError::BatchSchema {
                            path: self.table_path.to_path_buf(),
                            reason: format!("column `{n}` is not in the table"),
                        })
                    })
                    .collect::<SinkResult<Vec<Field>>>()?,
            )),
        };
        let is_partition = |name: &str| self.partition_columns.iter().any(|p| p == name);

        let object_path = deltalake::Path::parse(&file.path).unwrap_or_else(|_| deltalake::Path::from(file.path.as_str()));
        let store_err = |source| read_error(self.table_path, DeltaTableError::ObjectStore { source });
        let bytes = self.store.get(&object_path).await.map_err(store_err)?.bytes().await.map_err(store_err)?;
        self.files_read.fetch_add(1, Ordering::Relaxed);

        let parquet_err = |source| read_error(self.table_path, DeltaTableError::Parquet { source });
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(parquet_err)?;
        let file_schema = builder.schema().clone();
        let mut roots = Vec::new();
        for field in out_schema.fields().iter().filter(|f| !is_partition(f.name())) {
            let index = file_schema.index_of(field.name()).map_err(|_| DeltaSinkError::UnsupportedTable {
                path: self.table_path.to_path_buf(),
                reason: format!("data file {} has no column `{}`", file.path, field.name()),
            })?;
            roots.push(index);
        }
        if roots.is_empty() {
            // Only partition columns wanted: read one column anyway, for the row count.
            roots.push(0);
        }
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
        let reader = builder.with_projection(mask).build().map_err(parquet_err)?;
        Ok(FileBatches {
            reader,
            file: file.clone(),
            out_schema,
            table_path: self.table_path,
            partition_columns: self.partition_columns,
        })
    }

    /// The keys of every row of `file` (and their window ends, in a view), reading only those
    /// columns.
    pub async fn read_keys(&self, file: &DataFile, encoder: &KeyEncoder, window_end_column: Option<&str>) -> SinkResult<FileKeys> {
        let mut columns = encoder.columns().to_vec();
        if let Some(end) = window_end_column.filter(|c| !columns.iter().any(|k| k == c)) {
            columns.push(end.to_owned());
        }
        let mut out = FileKeys {
            keys: Vec::new(),
            window_ends: window_end_column.map(|_| Vec::new()),
        };
        for batch in self.read(file, Some(&columns)).await? {
            let part = FileKeys::of(self.table_path, &batch, encoder, window_end_column)?;
            out.keys.extend(part.keys);
            if let (Some(all), Some(ends)) = (&mut out.window_ends, part.window_ends) {
                all.extend(ends);
            }
        }
        Ok(out)
    }
}

fn read_error(table_path: &Path, source: DeltaTableError) -> DeltaSinkError {
    DeltaSinkError::Delta {
        path: table_path.to_path_buf(),
        operation: "read",
        source: Box::new(source),
    }
}

/// The batches of one data file, decoded as they are asked for ([`FileReader::batches`]).
pub(crate) struct FileBatches<'a> {
    reader: ParquetRecordBatchReader,
    file: DataFile,
    out_schema: SchemaRef,
    table_path: &'a Path,
    partition_columns: &'a [String],
}

impl FileBatches<'_> {
    /// The Parquet batch `batch` in the output schema: partition columns filled in from the
    /// file's partition values, the others conformed to the table's types.
    fn complete(&self, batch: &RecordBatch) -> SinkResult<RecordBatch> {
        let file = &self.file;
        let mut fields = Vec::with_capacity(self.out_schema.fields().len());
        let mut arrays = Vec::with_capacity(self.out_schema.fields().len());
        for field in self.out_schema.fields() {
            let array = if self.partition_columns.iter().any(|p| p == field.name()) {
                let value = file.partition_values.get(field.name()).cloned().flatten();
                partition_column(field, value.as_deref(), batch.num_rows()).map_err(|err| DeltaSinkError::UnsupportedTable {
                    path: self.table_path.to_path_buf(),
                    reason: format!("partition value {value:?} of column `{}` in data file {}: {err}", field.name(), file.path),
                })?
            } else {
                batch.column_by_name(field.name()).cloned().expect("projected when opened")
            };
            fields.push(Field::new(field.name(), array.data_type().clone(), true));
            arrays.push(array);
        }
        let read =
            RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).map_err(|source| read_error(self.table_path, DeltaTableError::Arrow { source }))?;
        conform_batch(self.table_path, &self.out_schema, &read)
    }
}

impl Iterator for FileBatches<'_> {
    type Item = SinkResult<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        let batch = self.reader.next()?;
        Some(
            batch
                .map_err(|source| read_error(self.table_path, DeltaTableError::Arrow { source }))
                .and_then(|batch| self.complete(&batch)),
        )
    }
}

/// A column of `rows` copies of a partition value, parsed into the column's type.
fn partition_column(field: &Field, value: Option<&str>, rows: usize) -> Result<ArrayRef, deltalake::arrow::error::ArrowError> {
    let strings: ArrayRef = Arc::new(StringArray::from(vec![value; rows]));
    let options = CastOptions {
        safe: false,
        ..Default::default()
    };
    cast_with_options(&strings, field.data_type(), &options)
}

/// Turns the values of the key columns into [`Key`]s.
#[derive(Debug)]
pub(crate) struct KeyEncoder {
    columns: Vec<String>,
    schema: SchemaRef,
    /// Per key column: a string partition column, where Delta stores `""` as null.
    empty_is_null: Vec<bool>,
    converter: RowConverter,
}

impl KeyEncoder {
    /// An encoder for `key_columns` of a table with `schema` partitioned by
    /// `partition_columns`; `Err` names what is wrong with the key columns.
    pub fn new(schema: &SchemaRef, partition_columns: &[String], key_columns: &[String]) -> Result<Self, String> {
        if key_columns.is_empty() {
            return Err("no key columns were given".into());
        }
        let mut fields = Vec::with_capacity(key_columns.len());
        for (i, name) in key_columns.iter().enumerate() {
            if key_columns[..i].contains(name) {
                return Err(format!("key column `{name}` is listed twice"));
            }
            let field = schema.field_with_name(name).map_err(|_| format!("`{name}` is not a column of the table"))?;
            fields.push(field.clone());
        }
        let converter = RowConverter::new(fields.iter().map(|f| SortField::new(f.data_type().clone())).collect())
            .map_err(|err| format!("the key columns cannot be compared: {err}"))?;
        let empty_is_null = fields
            .iter()
            .map(|f| f.data_type() == &DataType::Utf8 && partition_columns.contains(f.name()))
            .collect();
        Ok(Self {
            columns: key_columns.to_vec(),
            schema: Arc::new(Schema::new(fields)),
            empty_is_null,
            converter,
        })
    }

    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// The key of every row of `batch`, which must have the key columns (matched by name; a
    /// type that maps to the same Delta type is cast). Other columns are ignored.
    pub fn encode(&self, table_path: &Path, batch: &RecordBatch) -> SinkResult<Vec<Key>> {
        let mismatch = |reason: String| DeltaSinkError::BatchSchema {
            path: table_path.to_path_buf(),
            reason,
        };
        let mut fields = Vec::with_capacity(self.columns.len());
        let mut arrays = Vec::with_capacity(self.columns.len());
        for name in &self.columns {
            let array = batch
                .column_by_name(name)
                .ok_or_else(|| mismatch(format!("key column `{name}` is missing from a batch")))?;
            fields.push(Field::new(name, array.data_type().clone(), true));
            arrays.push(array.clone());
        }
        let keys = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).map_err(|err| mismatch(err.to_string()))?;
        let keys = conform_batch(table_path, &self.schema, &keys)?;
        // Delta has no empty string partition value: `""` is written as null and reads back
        // as null, so the key of a row must not depend on whether it was read or just written.
        let columns: Vec<ArrayRef> = keys
            .columns()
            .iter()
            .zip(&self.empty_is_null)
            .map(|(column, &empty_is_null)| match column.as_any().downcast_ref::<StringArray>() {
                Some(strings) if empty_is_null && strings.iter().any(|v| v == Some("")) => {
                    Arc::new(strings.iter().map(|v| v.filter(|s| !s.is_empty())).collect::<StringArray>()) as ArrayRef
                }
                _ => column.clone(),
            })
            .collect();
        let rows = self.converter.convert_columns(&columns).map_err(|err| mismatch(err.to_string()))?;
        Ok((0..rows.num_rows()).map(|i| Key::from(rows.row(i).as_ref())).collect())
    }
}

/// Which active data file holds each key, for one set of key columns, as of one table version.
/// Built by reading the key columns of the active files (once, on the first upsert after
/// opening), then kept current from the files each commit adds and removes.
///
/// Views: rows whose window ended at or before the index's `closed_through` are final — no
/// upsert or delete names their keys again — so their keys leave the index, and files holding
/// only such rows are not indexed at all: the index holds the keys that can still change, not
/// every key of the table.
#[derive(Debug)]
pub(crate) struct KeyIndex {
    pub encoder: Arc<KeyEncoder>,
    /// The table version whose active files the index describes; `None` until built.
    pub version: Option<i64>,
    /// Rows whose window ends at or before this are left out; `None`: every row is indexed.
    closed_through: Option<i64>,
    files: HashMap<Arc<str>, IndexedFile>,
    /// Usually one file per key; more when rows were appended without an upsert.
    key_files: HashMap<Key, Vec<Arc<str>>>,
}

#[derive(Debug)]
struct IndexedFile {
    file: DataFile,
    /// The keys of the file's rows still indexed, and (views) their window ends.
    keys: FileKeys,
    /// The earliest of `keys.window_ends`.
    first_end: Option<i64>,
}

impl KeyIndex {
    pub fn new(encoder: Arc<KeyEncoder>, closed_through: Option<i64>) -> Self {
        Self {
            encoder,
            version: None,
            closed_through,
            files: HashMap::new(),
            key_files: HashMap::new(),
        }
    }

    pub fn closed_through(&self) -> Option<i64> {
        self.closed_through
    }

    /// True when `file` is indexed, or holds only rows the index leaves out.
    pub fn knows(&self, file: &DataFile) -> bool {
        self.files.contains_key(file.path.as_str()) || file.is_final(self.closed_through)
    }

    #[cfg(test)]
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// Keys held (in a view: of rows that can still change).
    pub fn key_count(&self) -> usize {
        self.key_files.len()
    }

    pub fn insert_file(&mut self, file: DataFile, mut keys: FileKeys) {
        // Files are immutable; announcing one twice replaces the first entry.
        self.remove_file(&file.path);
        if file.is_final(self.closed_through) {
            return;
        }
        if let (Some(through), Some(ends)) = (self.closed_through, &keys.window_ends) {
            if ends.iter().any(|e| *e <= through) {
                let (kept_keys, kept_ends) = keys.keys.iter().zip(ends).filter(|(_, e)| **e > through).map(|(k, e)| (k.clone(), *e)).unzip();
                keys = FileKeys {
                    keys: kept_keys,
                    window_ends: Some(kept_ends),
                };
            }
        }
        let path: Arc<str> = Arc::from(file.path.as_str());
        for key in &keys.keys {
            let files = self.key_files.entry(key.clone()).or_default();
            if !files.contains(&path) {
                files.push(path.clone());
            }
        }
        let first_end = keys.window_ends.as_ref().and_then(|ends| ends.iter().copied().min());
        self.files.insert(path, IndexedFile { file, keys, first_end });
    }

    pub fn remove_file(&mut self, path: &str) {
        let Some(indexed) = self.files.remove(path) else { return };
        for key in &indexed.keys.keys {
            self.unlink(key, path);
        }
    }

    fn unlink(&mut self, key: &Key, path: &str) {
        if let Some(files) = self.key_files.get_mut(key) {
            files.retain(|p| p.as_ref() != path);
            if files.is_empty() {
                self.key_files.remove(key);
            }
        }
    }

    /// Drops the files `keep` rejects.
    pub fn retain_files(&mut self, mut keep: impl FnMut(&DataFile) -> bool) {
        let gone: Vec<Arc<str>> = self.files.iter().filter(|(_, f)| !keep(&f.file)).map(|(p, _)| p.clone()).collect();
        for path in gone {
            self.remove_file(&path);
        }
    }

    /// Rows whose window ends at or before `through` are final: their keys leave the index,
    /// and so do files holding nothing else. Costs the files holding such rows, not the index.
    /// Never moves back (see [`Self::reopen_from`]).
    pub fn close_through(&mut self, through: i64) {
        if self.closed_through.is_some_and(|c| c >= through) {
            return;
        }
        self.closed_through = Some(through);
        let closing: Vec<Arc<str>> = self
            .files
            .iter()
            .filter(|(_, f)| f.file.is_final(Some(through)) || f.first_end.is_some_and(|e| e <= through))
            .map(|(p, _)| p.clone())
            .collect();
        for path in closing {
            let mut indexed = self.files.remove(&path).expect("listed above");
            if indexed.file.is_final(Some(through)) {
                for key in &indexed.keys.keys {
                    self.unlink(key, &path);
                }
                continue;
            }
            let ends = indexed.keys.window_ends.take().expect("first_end comes from the ends");
            let mut kept = FileKeys {
                keys: Vec::new(),
                window_ends: Some(Vec::new()),
            };
            for (key, end) in indexed.keys.keys.into_iter().zip(ends) {
                if end <= through {
                    self.unlink(&key, &path);
                } else {
                    kept.keys.push(key);
                    kept.window_ends.as_mut().expect("set above").push(end);
                }
            }
            indexed.first_end = kept.window_ends.as_ref().and_then(|e| e.iter().copied().min());
            indexed.keys = kept;
            self.files.insert(path, indexed);
        }
    }

    /// Indexes rows again down to those ending after `through` (`None`: every row): the index
    /// is emptied and rebuilt from the files at the next sync, which this forces.
    pub fn reopen_from(&mut self, through: Option<i64>) {
        self.closed_through = through;
        self.version = None;
        self.files.clear();
        self.key_files.clear();
    }

    /// The files holding any of `keys`, each once, in path order.
    pub fn files_holding<'a>(&self, keys: impl IntoIterator<Item = &'a Key>) -> Vec<DataFile> {
        let mut paths: Vec<&Arc<str>> = keys.into_iter().filter_map(|k| self.key_files.get(k)).flatten().collect();
        paths.sort();
        paths.dedup();
        paths.into_iter().map(|p| self.files[p].file.clone()).collect()
    }
}

/// Writes `batches` (already in the table schema) as Parquet data files of about
/// `target_size_bytes` each, one or more per partition. Nothing is committed.
pub(crate) async fn write_data_files(
    table: &DeltaTable,
    table_path: &Path,
    partition_columns: &[String],
    batches: &[RecordBatch],
    target_size_bytes: u64,
    encoder: Option<&KeyEncoder>,
    window_end_column: Option<&str>,
) -> SinkResult<Vec<NewFile>> {
    let batches: Vec<&RecordBatch> = batches.iter().filter(|b| b.num_rows() > 0).collect();
    let Some(first) = batches.first() else { return Ok(Vec::new()) };
    let arrow_err = |source| write_error(table_path, DeltaTableError::Arrow { source });
    let all = concat_batches(&first.schema(), batches.iter().copied()).map_err(arrow_err)?;
    let mut cutter = FileCutter::new(table, table_path, target_size_bytes, encoder, window_end_column)?;
    for group in split_by_partition(&all, partition_columns).map_err(arrow_err)? {
        cutter.write(&group).await?;
        cutter.end_file().await?;
    }
    Ok(cutter.into_written())
}

fn write_error(table_path: &Path, source: DeltaTableError) -> DeltaSinkError {
    DeltaSinkError::Delta {
        path: table_path.to_path_buf(),
        operation: "write",
        source: Box::new(source),
    }
}

/// Writes a stream of rows of one partition as Parquet data files of about a target size:
/// rows go to the writer as they come, and a file is cut as soon as the writer's buffer
/// reaches the target, so what is held in memory is the file being written, never the rows
/// given before it (compaction feeds it one read batch at a time). Nothing is committed.
///
/// `RecordBatchWriter` writes one file per partition per flush and has no size limit, so rows
/// are fed to it in slices and it is flushed once its buffer reaches the target. The buffer
/// size is the writer's estimate of the encoded file, so files land near, not exactly at, the
/// target. Rows of several partitions still work (the writer splits them), but then the files
/// of one flush carry no keys (the index reads them back) and share one window bound.
pub(crate) struct FileCutter<'a> {
    table_path: &'a Path,
    writer: RecordBatchWriter,
    target: f64,
    encoder: Option<&'a KeyEncoder>,
    window_end_column: Option<&'a str>,
    /// Encoded bytes per row: Arrow's in-memory size until the first file is cut (it
    /// overestimates, so the first slices are smaller), then the real bytes per row of the
    /// last file.
    bytes_per_row: Option<f64>,
    /// File size / buffer size at the last cut: the buffer counts the open row group at its
    /// estimated, uncompressed size, so files come out smaller than the buffer was.
    size_per_buffered_byte: f64,
    /// Rows in the writer's buffer, their keys (when an encoder is given) and last window end.
    file_rows: usize,
    file_keys: FileKeys,
    file_last_window_end: Option<i64>,
    written: Vec<NewFile>,
}

impl<'a> FileCutter<'a> {
    pub fn new(
        table: &DeltaTable,
        table_path: &'a Path,
        target_size_bytes: u64,
        encoder: Option<&'a KeyEncoder>,
        window_end_column: Option<&'a str>,
    ) -> SinkResult<Self> {
        let writer = RecordBatchWriter::for_table(table).map_err(|source| write_error(table_path, source))?;
        Ok(Self {
            table_path,
            writer,
            target: target_size_bytes.max(1) as f64,
            encoder,
            window_end_column,
            bytes_per_row: None,
            size_per_buffered_byte: 1.0,
            file_rows: 0,
            file_keys: FileKeys {
                keys: Vec::new(),
                window_ends: window_end_column.map(|_| Vec::new()),
            },
            file_last_window_end: None,
            written: Vec::new(),
        })
    }

    /// Adds `batch`'s rows (in the table schema), cutting files as the target is reached.
    pub async fn write(&mut self, batch: &RecordBatch) -> SinkResult<()> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(());
        }
        let mut bytes_per_row = *self
            .bytes_per_row
            .get_or_insert_with(|| (batch.get_array_memory_size() as f64 / rows as f64).max(1.0));
        let mut offset = 0;
        while offset < rows {
            // Slices of about 1/16 of the target keep the cut close to it.
            let slice_rows = ((self.target / bytes_per_row / 16.0) as usize).clamp(16, 1 << 16).min(rows - offset);
            let slice = batch.slice(offset, slice_rows);
            self.add_to_file(&slice)?;
            self.writer.write(slice).await.map_err(|source| write_error(self.table_path, source))?;
            offset += slice_rows;
            // Cut when one more slice would overshoot the target by more than stopping now
            // falls short of it.
            let buffered = self.writer.buffer_len() as f64;
            if buffered * self.size_per_buffered_byte + slice_rows as f64 * bytes_per_row / 2.0 >= self.target {
                let file_rows = self.file_rows;
                if let Some(size) = self.cut().await? {
                    bytes_per_row = (size as f64 / file_rows as f64).max(1.0);
                    self.bytes_per_row = Some(bytes_per_row);
                    if buffered > 0.0 {
                        self.size_per_buffered_byte = (size as f64 / buffered).clamp(0.05, 1.0);
                    }
                }
            }
        }
        Ok(())
    }

    /// Cuts the open file, if it has rows; the next rows start a new one, and their size per
    /// row is estimated afresh (the next rows may be another partition's).
    pub async fn end_file(&mut self) -> SinkResult<()> {
        if self.file_rows > 0 {
            self.cut().await?;
        }
        self.bytes_per_row = None;
        Ok(())
    }

    /// The files written so far (to delete them when the caller gives up).
    pub fn written(&self) -> &[NewFile] {
        &self.written
    }

    /// Every file written; rows since the last [`Self::end_file`] are dropped.
    pub fn into_written(self) -> Vec<NewFile> {
        self.written
    }

    /// Flushes the open file(s). Returns the file's size when the writer made one file of it.
    async fn cut(&mut self) -> SinkResult<Option<i64>> {
        let adds = self.writer.flush().await.map_err(|source| write_error(self.table_path, source))?;
        let keys = std::mem::replace(
            &mut self.file_keys,
            FileKeys {
                keys: Vec::new(),
                window_ends: self.window_end_column.map(|_| Vec::new()),
            },
        );
        // One partition per flush gives one file; should the writer ever split it, the files'
        // keys are unknown and the index re-reads them, and each file gets the window bound of
        // all of them.
        let keys = (self.encoder.is_some() && adds.len() == 1).then_some(keys);
        let last_window_end = self.file_last_window_end.take();
        self.file_rows = 0;
        let size = match adds.as_slice() {
            [add] => Some(add.size),
            _ => None,
        };
        self.written.extend(adds.into_iter().map(|add| NewFile {
            add,
            keys: keys.clone(),
            last_window_end,
        }));
        Ok(size)
    }

    /// Notes the keys and window end of rows going into the open file.
    fn add_to_file(&mut self, rows: &RecordBatch) -> SinkResult<()> {
        self.file_rows += rows.num_rows();
        if let Some(encoder) = self.encoder {
            let part = FileKeys::of(self.table_path, rows, encoder, self.window_end_column)?;
            self.file_keys.keys.extend(part.keys);
            if let (Some(all), Some(ends)) = (&mut self.file_keys.window_ends, part.window_ends) {
                all.extend(ends);
            }
        }
        if let Some(column) = self.window_end_column {
            self.file_last_window_end = self.file_last_window_end.into_iter().chain(max_time(rows, column)).max();
        }
        Ok(())
    }
}
/// The largest non-null value of the timestamp column `column` of `batch`.
pub(crate) fn max_time(batch: &RecordBatch, column: &str) -> Option<i64> {
    let times = batch.column_by_name(column)?.as_any().downcast_ref::<TimestampMicrosecondArray>()?;
    deltalake::arrow::compute::max(times)
}

/// Splits `batch` into one batch per distinct combination of partition values (in order of
/// first appearance).
fn split_by_partition(batch: &RecordBatch, partition_columns: &[String]) -> Result<Vec<RecordBatch>, deltalake::arrow::error::ArrowError> {
    if partition_columns.is_empty() {
        return Ok(vec![batch.clone()]);
    }
    let columns: Vec<ArrayRef> = partition_columns
        .iter()
        .map(|c| {
            batch
                .column_by_name(c)
                .cloned()
                .ok_or_else(|| deltalake::arrow::error::ArrowError::SchemaError(format!("partition column `{c}` is missing")))
        })
        .collect::<Result<_, _>>()?;
    let converter = RowConverter::new(columns.iter().map(|c| SortField::new(c.data_type().clone())).collect())?;
    let rows = converter.convert_columns(&columns)?;
    let mut group_of: HashMap<&[u8], usize> = HashMap::new();
    let mut groups: Vec<Vec<u32>> = Vec::new();
    for i in 0..rows.num_rows() {
        let next = groups.len();
        let group = *group_of.entry(rows.row(i).data()).or_insert(next);
        if group == next {
            groups.push(Vec::new());
        }
        groups[group].push(i as u32);
    }
    if groups.len() == 1 {
        return Ok(vec![batch.clone()]);
    }
    groups.into_iter().map(|rows| take_record_batch(batch, &UInt32Array::from(rows))).collect()
}

/// The rows of `batch` whose key is not in `drop`, as a boolean mask for `filter_record_batch`.
pub(crate) fn keep_mask(keys: &[Key], drop: &HashSet<Key>) -> deltalake::arrow::array::BooleanArray {
    keys.iter().map(|k| Some(!drop.contains(k))).collect()
}

/// Indices of the last row of each key, in row order ("last write wins" within one batch).
pub(crate) fn last_row_per_key(keys: &[Key]) -> Vec<u32> {
    let mut seen = HashSet::with_capacity(keys.len());
    let mut keep: Vec<u32> = (0..keys.len()).rev().filter(|&i| seen.insert(&keys[i])).map(|i| i as u32).collect();
    keep.reverse();
    keep
}

/// Rebuilds `batch` with exactly `schema`'s fields (matched by name, in the schema's order),
/// casting columns whose Arrow type differs but maps to the same Delta type.
pub(crate) fn conform_batch(path: &Path, schema: &SchemaRef, batch: &RecordBatch) -> SinkResult<RecordBatch> {
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
    use deltalake::arrow::array::Int64Array;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("day", DataType::Utf8, false),
            Field::new("id", DataType::Int64, false),
            Field::new("n", DataType::Int64, true),
        ]))
    }

    fn batch(rows: &[(&str, i64, i64)]) -> RecordBatch {
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
            ],
        )
        .unwrap()
    }

    #[test]
    fn keys_compare_by_value_across_arrow_types() {
        let encoder = KeyEncoder::new(&schema(), &[], &["day".into(), "id".into()]).unwrap();
        let keys = encoder.encode(Path::new("/t"), &batch(&[("a", 1, 0), ("a", 2, 0), ("a", 1, 9)])).unwrap();
        assert_eq!(keys[0], keys[2]);
        assert_ne!(keys[0], keys[1]);
        // A key-only batch with LargeUtf8 encodes to the same keys.
        let key_only = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, true),
                Field::new("day", DataType::LargeUtf8, true),
            ])),
            vec![
                Arc::new(Int64Array::from(vec![1])),
                Arc::new(deltalake::arrow::array::LargeStringArray::from(vec!["a"])),
            ],
        )
        .unwrap();
        assert_eq!(encoder.encode(Path::new("/t"), &key_only).unwrap(), vec![keys[0].clone()]);

        let wrong = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, true)])),
            vec![Arc::new(Int64Array::from(vec![1]))],
        )
        .unwrap();
        let err = encoder.encode(Path::new("/t"), &wrong).unwrap_err();
        assert!(err.to_string().contains("key column `day` is missing"), "{err}");

        assert!(KeyEncoder::new(&schema(), &[], &[]).unwrap_err().contains("no key columns"));
        assert!(KeyEncoder::new(&schema(), &[], &["nope".into()])
            .unwrap_err()
            .contains("`nope` is not a column"));
        assert!(KeyEncoder::new(&schema(), &[], &["id".into(), "id".into()]).unwrap_err().contains("twice"));
    }

    #[test]
    fn last_row_of_each_key_wins() {
        let encoder = KeyEncoder::new(&schema(), &[], &["id".into()]).unwrap();
        let keys = encoder
            .encode(Path::new("/t"), &batch(&[("a", 1, 0), ("a", 2, 0), ("a", 1, 9), ("a", 3, 0)]))
            .unwrap();
        assert_eq!(last_row_per_key(&keys), vec![1, 2, 3]);
        let drop: HashSet<Key> = [keys[1].clone()].into();
        let mask = keep_mask(&keys, &drop);
        assert_eq!(mask.iter().collect::<Vec<_>>(), vec![Some(true), Some(false), Some(true), Some(true)]);
    }

    #[test]
    fn rows_are_split_by_partition_in_first_seen_order() {
        let rows = [("b", 1, 0), ("a", 2, 0), ("b", 3, 0), ("c", 4, 0), ("a", 5, 0)];
        let groups = split_by_partition(&batch(&rows), &["day".into()]).unwrap();
        let ids: Vec<Vec<i64>> = groups
            .iter()
            .map(|g| g.column(1).as_any().downcast_ref::<Int64Array>().unwrap().values().to_vec())
            .collect();
        assert_eq!(ids, vec![vec![1, 3], vec![2, 5], vec![4]]);
        assert_eq!(split_by_partition(&batch(&rows), &[]).unwrap().len(), 1);
    }

    #[test]
    fn the_index_follows_files_in_and_out() {
        let encoder = Arc::new(KeyEncoder::new(&schema(), &[], &["id".into()]).unwrap());
        let keys = encoder.encode(Path::new("/t"), &batch(&[("a", 1, 0), ("a", 2, 0), ("a", 3, 0)])).unwrap();
        let file = |path: &str| DataFile {
            path: path.into(),
            size_bytes: 1,
            partition_values: HashMap::new(),
            last_window_end: None,
        };
        let mut index = KeyIndex::new(encoder, None);
        let of = |keys: Vec<Key>| FileKeys { keys, window_ends: None };
        index.insert_file(file("f1"), of(vec![keys[0].clone(), keys[1].clone()]));
        index.insert_file(file("f2"), of(vec![keys[1].clone(), keys[2].clone()]));
        let paths = |files: Vec<DataFile>| files.into_iter().map(|f| f.path).collect::<Vec<_>>();
        assert_eq!(paths(index.files_holding([&keys[1]])), vec!["f1", "f2"]);
        assert_eq!(paths(index.files_holding([&keys[0], &keys[2]])), vec!["f1", "f2"]);
        index.remove_file("f1");
        assert_eq!(paths(index.files_holding([&keys[0], &keys[1]])), vec!["f2"]);
        index.retain_files(|f| f.path != "f2");
        assert!(index.files_holding(&keys).is_empty());
        assert_eq!(index.file_count(), 0);
        assert!(index.key_files.is_empty());
    }

    #[test]
    fn closing_windows_drops_their_keys_and_files_holding_only_them() {
        let encoder = Arc::new(KeyEncoder::new(&schema(), &[], &["id".into()]).unwrap());
        let keys = encoder
            .encode(Path::new("/t"), &batch(&[("a", 1, 0), ("a", 2, 0), ("a", 3, 0), ("a", 4, 0)]))
            .unwrap();
        let file = |path: &str, last_window_end: i64| DataFile {
            path: path.into(),
            size_bytes: 1,
            partition_values: HashMap::new(),
            last_window_end: Some(last_window_end),
        };
        let with_ends = |keys: &[Key], ends: &[i64]| FileKeys {
            keys: keys.to_vec(),
            window_ends: Some(ends.to_vec()),
        };
        let mut index = KeyIndex::new(encoder, Some(10));
        // Rows ending at or before 10 are final already: f0 is not indexed, f1 only in part.
        index.insert_file(file("f0", 10), with_ends(&keys[..1], &[10]));
        index.insert_file(file("f1", 30), with_ends(&keys[1..3], &[10, 30]));
        index.insert_file(file("f2", 40), with_ends(&keys[3..], &[40]));
        assert_eq!((index.file_count(), index.key_count()), (2, 2));
        assert!(index.knows(&file("f0", 10)) && !index.knows(&file("f9", 11)));
        let paths = |files: Vec<DataFile>| files.into_iter().map(|f| f.path).collect::<Vec<_>>();
        assert_eq!(paths(index.files_holding(&keys)), vec!["f1", "f2"]);
        index.close_through(30);
        assert_eq!((index.file_count(), index.key_count()), (1, 1));
        assert_eq!(paths(index.files_holding(&keys)), vec!["f2"]);
        index.close_through(20); // never back
        assert_eq!(index.closed_through(), Some(30));
        // Reopening empties the index for a rebuild from the files.
        index.reopen_from(Some(5));
        assert_eq!((index.file_count(), index.key_count(), index.version), (0, 0, None));
    }
}
