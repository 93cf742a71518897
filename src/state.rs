//! RocksDB state: one DB per process, one column family per state table (operators ask for
//! tables by name; the store knows nothing of what is in them), and a `meta` column family for
//! epochs, source positions, the watermark, the key groups and pending output.
//!
//! Everything an epoch changes is written in ONE `WriteBatch` (all shards, all column
//! families), synced, by the committer: after a crash the store holds exactly the state as of
//! the last flushed epoch, consistent across shards.
//!
//! Tables are not split by shard: every shard writes its keys into the operator's one table,
//! and on restore reads back the entries whose key group it owns ([`KeyGroups`]). The number
//! of key groups is fixed when the store is created, so a restart with another shard count
//! redistributes whole groups and reads the same state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};

#[cfg(test)]
use crate::types::{decode_time_key, encode_time_key};
use crate::types::{EventTime, KeyGroups};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "cannot open the state store at {path}: {source}. If another tidemark process uses this state_dir, stop it or point [pipeline] state_dir elsewhere"
    )]
    Open { path: PathBuf, source: rocksdb::Error },
    #[error("the state in {path} is split into {key_groups} key groups, so at most {key_groups} shards can share it, but this run has {configured}; set [pipeline] shards to at most {key_groups}, or start from an empty state_dir")]
    TooManyShards { path: PathBuf, key_groups: u32, configured: usize },
    #[error("cannot create the state_dir {path}: {source}; check the path and its permissions")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("state store I/O failed: {0} (external: check disk space and permissions of the state_dir; a restart resumes from the last flushed epoch)")]
    Io(#[from] rocksdb::Error),
    #[error("state store holds an unreadable record under key {key:?}: {what} (internal error or a state_dir from an incompatible version)")]
    Corrupt { key: String, what: String },
    #[error("the changelog did not take epoch {epoch}: {message}")]
    Mirror { epoch: u64, message: String },
}

pub type StateResult<T> = Result<T, StateError>;

const META: &str = "meta";
const K_EPOCH: &[u8] = b"epoch";
const K_WATERMARK: &[u8] = b"watermark";
/// The shard count of the last run (for the log; the state does not depend on it).
const K_SHARDS: &[u8] = b"shards";
const K_KEY_GROUPS: &[u8] = b"key_groups";
const P_POSITION: &[u8] = b"pos\0";
const P_PENDING: &[u8] = b"pending\0";
const P_FILES: &[u8] = b"files\0";
/// Per query (by name): its watermark W_q.
const P_QUERY_WATERMARK: &[u8] = b"qwm\0";
/// Per query (by name): what its state was built for (see `crate::fingerprint`).
const P_QUERY_RECORD: &[u8] = b"qrec\0";
/// Per source (by name): what it reads.
const P_SOURCE_RECORD: &[u8] = b"srec\0";
/// Per sink (by name): the last epoch it confirmed holding.
const P_SINK_EPOCH: &[u8] = b"sinkep\0";

/// Where a source partition stands as of a flushed epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionPosition {
    pub topic: String,
    pub partition: i32,
    /// The next offset to read; [`NO_OFFSET`] for a source partition read through a
    /// repartition topic (only its clock is kept here).
    pub next_offset: i64,
    pub max_event_time: Option<EventTime>,
}

/// The `next_offset` of a position that keeps only a clock.
pub const NO_OFFSET: i64 = -1;

/// What recovery finds in the store.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Last flushed epoch (0 = fresh store).
    pub epoch: u64,
    pub watermark: Option<EventTime>,
    /// Query name → its watermark.
    pub query_watermarks: HashMap<String, EventTime>,
    pub positions: HashMap<(String, i32), PartitionPosition>,
    /// File-source name → its encoded position (see `source::files::FilePosition`).
    pub file_positions: HashMap<String, Vec<u8>>,
    /// Query name → the `allowed_lateness` (µs) of the run that wrote the state (filled at
    /// start from the query records, see `crate::fingerprint`).
    pub query_lateness_us: HashMap<String, i64>,
}

impl Recovered {
    /// The watermark `query` resumes at: its own, or the pipeline's for a store written
    /// before watermarks were kept per query.
    pub fn query_watermark(&self, query: &str) -> Option<EventTime> {
        self.query_watermarks.get(query).copied().or(self.watermark)
    }
}

/// What one epoch changes in one state table, in the table owner's own key encoding. Applied
/// in this order: range deletes, deletes, puts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TableWrites {
    /// `[from, to)` key ranges to delete.
    pub delete_ranges: Vec<(Vec<u8>, Vec<u8>)>,
    pub deletes: Vec<Vec<u8>>,
    pub puts: Vec<(Vec<u8>, Vec<u8>)>,
}

impl TableWrites {
    pub fn is_empty(&self) -> bool {
        self.delete_ranges.is_empty() && self.deletes.is_empty() && self.puts.is_empty()
    }

    /// Applies the writes, in the store's order, to an in-memory model of the table (the
    /// operators' tests check their writes against their memory with it).
    #[cfg(test)]
    pub fn apply_to(self, table: &mut std::collections::BTreeMap<Vec<u8>, Vec<u8>>) {
        for (from, to) in self.delete_ranges {
            let doomed: Vec<Vec<u8>> = table.range(from..to).map(|(k, _)| k.clone()).collect();
            for k in doomed {
                table.remove(&k);
            }
        }
        for k in self.deletes {
            table.remove(&k);
        }
        table.extend(self.puts);
    }
}

/// Everything one epoch flushes, across all shards.
#[derive(Debug, Default)]
pub struct EpochWrite<'a> {
    pub epoch: u64,
    pub watermark: EventTime,
    /// (query name, its watermark).
    pub query_watermarks: Vec<(&'a str, EventTime)>,
    /// (table index, writes), from any shard.
    pub changes: Vec<(usize, &'a TableWrites)>,
    pub positions: Vec<&'a PartitionPosition>,
    /// (file-source name, encoded position).
    pub file_positions: Vec<(&'a str, Vec<u8>)>,
    /// (sink name, encoded rows) output of this epoch, kept until the sink has committed it.
    pub pending: Vec<(&'a str, Vec<u8>)>,
}

/// One write of the store as its [`Mirror`] receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorOp {
    /// The column family (`meta`, or `t/<table>`).
    pub cf: String,
    pub key: Vec<u8>,
    /// `None`: the key is deleted.
    pub value: Option<Vec<u8>>,
}

/// Makes the store's writes durable somewhere else before they reach RocksDB (the changelog
/// of a scaled-out task), so the local store is a cache that is never ahead of it. An
/// epoch's writes are committed all or nothing; writes made between epochs (pending output
/// confirmed, records) travel with the next epoch.
pub trait Mirror: Send + Sync {
    fn commit(&self, epoch: u64, ops: &[MirrorOp]) -> Result<(), String>;
}

pub struct StateStore {
    db: DB,
    path: PathBuf,
    /// Column family name of each table, by table index.
    tables: Vec<String>,
    key_groups: KeyGroups,
    mirror: Option<Box<dyn Mirror>>,
    /// Writes made outside an epoch, for the mirror's next commit.
    deferred: std::sync::Mutex<Vec<MirrorOp>>,
    /// A local cache of state kept durably elsewhere (a task's changelog): writes skip the
    /// write-ahead log and its fsyncs. Such a store is never reopened after a crash.
    cache_only: bool,
}

/// A write batch and, when the store is mirrored, the same writes as [`MirrorOp`]s.
struct Writes<'a> {
    db: &'a DB,
    batch: WriteBatch,
    ops: Option<Vec<MirrorOp>>,
}

impl Writes<'_> {
    fn cf<'d>(db: &'d DB, name: &str) -> &'d rocksdb::ColumnFamily {
        db.cf_handle(name).expect("the store's column families are created at open")
    }

    fn put(&mut self, cf: &str, key: &[u8], value: &[u8]) {
        self.batch.put_cf(Self::cf(self.db, cf), key, value);
        if let Some(ops) = &mut self.ops {
            ops.push(MirrorOp {
                cf: cf.to_string(),
                key: key.to_vec(),
                value: Some(value.to_vec()),
            });
        }
    }

    fn delete(&mut self, cf: &str, key: &[u8]) {
        self.batch.delete_cf(Self::cf(self.db, cf), key);
        if let Some(ops) = &mut self.ops {
            ops.push(MirrorOp {
                cf: cf.to_string(),
                key: key.to_vec(),
                value: None,
            });
        }
    }

    /// A mirror keeps no ranges: it gets a delete per key the range holds.
    fn delete_range(&mut self, cf: &str, from: &[u8], to: &[u8]) -> StateResult<()> {
        self.batch.delete_range_cf(Self::cf(self.db, cf), from, to);
        if let Some(ops) = &mut self.ops {
            let handle = Self::cf(self.db, cf);
            for item in self.db.iterator_cf(handle, IteratorMode::From(from, rocksdb::Direction::Forward)) {
                let (k, _) = item?;
                if &*k >= to {
                    break;
                }
                ops.push(MirrorOp {
                    cf: cf.to_string(),
                    key: k.to_vec(),
                    value: None,
                });
            }
        }
        Ok(())
    }
}

/// The column family of a state table.
fn table_cf(table: &str) -> String {
    format!("t/{table}")
}

/// Column families of stores written before key groups: one per (shard, query) of window
/// state, named `s<shard>/<query>`; `Some(query)` for such a name.
fn shard_layout_query(cf: &str) -> Option<&str> {
    let (shard, query) = cf.split_once('/')?;
    (shard.len() > 1 && shard.starts_with('s') && shard[1..].bytes().all(|b| b.is_ascii_digit())).then_some(query)
}

fn position_key(topic: &str, partition: i32) -> Vec<u8> {
    [P_POSITION, topic.as_bytes(), b"\0", &partition.to_be_bytes()].concat()
}

fn pending_key(epoch: u64, sink: &str) -> Vec<u8> {
    [P_PENDING, &epoch.to_be_bytes(), sink.as_bytes()].concat()
}

/// Memory all memtables may use together (see `StateStore::open`).
const MEMTABLE_BUDGET_BYTES: usize = 64 << 20;
/// Write-ahead logs kept on disk before the column families pinning the oldest are flushed.
const MAX_WAL_BYTES: u64 = 2 * MEMTABLE_BUDGET_BYTES as u64;
/// Memtable size at which one column family flushes.
const MEMTABLE_BYTES: usize = 16 << 20;

/// Options of every column family: LZ4-compressed files, small memtables (window state is
/// written once per epoch and read back only at recovery, so large memtables buy nothing).
fn column_family_options() -> Options {
    let mut o = Options::default();
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    o.set_write_buffer_size(MEMTABLE_BYTES);
    o
}

impl StateStore {
    /// Opens (or creates) the store for `shards` shards and the state tables named `tables`
    /// (table index = position). A store from a version that split window state by shard is
    /// moved into one table per query first.
    pub fn open(dir: &Path, shards: usize, tables: &[String]) -> StateResult<Self> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::CreateDir { path: dir.into(), source })?;
        let mut opts = column_family_options();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // All memtables together stay under this: RocksDB flushes the largest when it is
        // reached. Without it each column family may hold 2 × 64 MB.
        opts.set_db_write_buffer_size(MEMTABLE_BUDGET_BYTES);
        // A column family with few writes (the meta one) would otherwise flush rarely and pin
        // every write-ahead log written since: past this size RocksDB flushes the column
        // families holding the oldest log, so the logs on disk stay bounded.
        opts.set_max_total_wal_size(MAX_WAL_BYTES);
        let table_cfs: Vec<String> = tables.iter().map(|t| table_cf(t)).collect();
        let mut names: Vec<String> = DB::list_cf(&opts, dir).unwrap_or_default();
        for n in std::iter::once(META.to_string()).chain(table_cfs.iter().cloned()) {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        let descriptors = names.iter().map(|n| ColumnFamilyDescriptor::new(n, column_family_options()));
        let db = DB::open_cf_descriptors(&opts, dir, descriptors).map_err(|source| StateError::Open { path: dir.into(), source })?;
        let mut store = StateStore {
            db,
            path: dir.into(),
            tables: table_cfs,
            key_groups: KeyGroups::DEFAULT,
            mirror: None,
            deferred: std::sync::Mutex::new(Vec::new()),
            cache_only: false,
        };
        match store.meta_get(K_KEY_GROUPS)? {
            Some(v) => {
                let count = u64::from_le_bytes(store.fixed8(K_KEY_GROUPS, &v)?);
                store.key_groups = u32::try_from(count).ok().and_then(KeyGroups::new).ok_or_else(|| StateError::Corrupt {
                    key: "key_groups".into(),
                    what: format!("{count} key groups is out of range"),
                })?;
            }
            None => {
                if store.meta_get(K_SHARDS)?.is_some() {
                    store.move_shard_layout(&names)?;
                }
                store.db.put_cf(store.meta(), K_KEY_GROUPS, (store.key_groups.count() as u64).to_le_bytes())?;
            }
        }
        if shards > store.key_groups.count() as usize {
            return Err(StateError::TooManyShards {
                path: dir.into(),
                key_groups: store.key_groups.count(),
                configured: shards,
            });
        }
        if let Some(v) = store.meta_get(K_SHARDS)? {
            let previous = u64::from_le_bytes(store.fixed8(K_SHARDS, &v)?) as usize;
            if previous != shards {
                tracing::info!(
                    previous,
                    shards,
                    key_groups = store.key_groups.count(),
                    "the shard count changed: key groups are redistributed over the new shards"
                );
            }
        }
        store.db.put_cf(store.meta(), K_SHARDS, (shards as u64).to_le_bytes())?;
        Ok(store)
    }

    /// Moves window state kept per (shard, query) (`s<shard>/<query>`, before key groups) into
    /// the query's table, then drops the old column families. The copy is synced before any
    /// drop, and the key groups are recorded only after, so a crash in between repeats it.
    fn move_shard_layout(&mut self, names: &[String]) -> StateResult<()> {
        let old: Vec<(String, String)> = names
            .iter()
            .filter_map(|n| shard_layout_query(n).map(|q| (n.clone(), table_cf(&format!("{q}/windows")))))
            .collect();
        for (from, to) in &old {
            if self.db.cf_handle(to).is_none() {
                self.db.create_cf(to, &column_family_options())?;
            }
            let (src, dst) = (self.db.cf_handle(from).expect("listed"), self.db.cf_handle(to).expect("created"));
            let mut batch = WriteBatch::default();
            for item in self.db.iterator_cf(src, IteratorMode::Start) {
                let (k, v) = item?;
                batch.put_cf(dst, k, v);
            }
            self.db.write_opt(batch, &self.write_options(true))?;
            tracing::info!(from = %from, to = %to, "moved window state into its query's table (state is now split by key group, not by shard)");
        }
        for (from, _) in &old {
            self.db.drop_cf(from)?;
        }
        Ok(())
    }

    /// The key groups keyed state is split into (fixed when the store was created).
    pub fn key_groups(&self) -> KeyGroups {
        self.key_groups
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn meta(&self) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(META).expect("meta column family is created at open")
    }

    fn meta_get(&self, key: &[u8]) -> StateResult<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.meta(), key)?)
    }

    fn fixed8(&self, key: &[u8], v: &[u8]) -> StateResult<[u8; 8]> {
        v.try_into().map_err(|_| StateError::Corrupt {
            key: String::from_utf8_lossy(key).into(),
            what: format!("expected 8 bytes, found {}", v.len()),
        })
    }

    pub fn recover(&self) -> StateResult<Recovered> {
        let mut r = Recovered::default();
        if let Some(v) = self.meta_get(K_EPOCH)? {
            r.epoch = u64::from_le_bytes(self.fixed8(K_EPOCH, &v)?);
        }
        if let Some(v) = self.meta_get(K_WATERMARK)? {
            r.watermark = Some(i64::from_le_bytes(self.fixed8(K_WATERMARK, &v)?));
        }
        for item in self.db.prefix_iterator_cf(self.meta(), P_POSITION) {
            let (k, v) = item?;
            if !k.starts_with(P_POSITION) {
                break;
            }
            let corrupt = |what: &str| StateError::Corrupt {
                key: String::from_utf8_lossy(&k).into(),
                what: what.into(),
            };
            let rest = &k[P_POSITION.len()..];
            if rest.len() < 5 || v.len() != 17 {
                return Err(corrupt("bad position record length"));
            }
            let topic = String::from_utf8(rest[..rest.len() - 5].to_vec()).map_err(|_| corrupt("topic is not UTF-8"))?;
            let partition = i32::from_be_bytes(rest[rest.len() - 4..].try_into().unwrap());
            let next_offset = i64::from_le_bytes(v[..8].try_into().unwrap());
            let max_event_time = (v[8] == 1).then(|| i64::from_le_bytes(v[9..17].try_into().unwrap()));
            r.positions.insert(
                (topic.clone(), partition),
                PartitionPosition {
                    topic,
                    partition,
                    next_offset,
                    max_event_time,
                },
            );
        }
        for item in self.db.prefix_iterator_cf(self.meta(), P_FILES) {
            let (k, v) = item?;
            if !k.starts_with(P_FILES) {
                break;
            }
            r.file_positions.insert(String::from_utf8_lossy(&k[P_FILES.len()..]).into_owned(), v.to_vec());
        }
        for item in self.db.prefix_iterator_cf(self.meta(), P_QUERY_WATERMARK) {
            let (k, v) = item?;
            if !k.starts_with(P_QUERY_WATERMARK) {
                break;
            }
            let watermark = i64::from_le_bytes(self.fixed8(&k, &v)?);
            r.query_watermarks
                .insert(String::from_utf8_lossy(&k[P_QUERY_WATERMARK.len()..]).into_owned(), watermark);
        }
        Ok(r)
    }

    /// (name, value) of every meta entry under `prefix`.
    fn meta_prefixed(&self, prefix: &[u8]) -> StateResult<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(self.meta(), prefix) {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((String::from_utf8_lossy(&k[prefix.len()..]).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    /// The stored query records: (query name, record bytes).
    pub fn query_records(&self) -> StateResult<Vec<(String, Vec<u8>)>> {
        self.meta_prefixed(P_QUERY_RECORD)
    }

    /// The stored source records: (source name, what it reads).
    pub fn source_records(&self) -> StateResult<Vec<(String, String)>> {
        Ok(self
            .meta_prefixed(P_SOURCE_RECORD)?
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect())
    }

    /// Stores the query and source records in one synced write (sources not listed keep
    /// theirs: a removed source's record still spots a later rename onto its topic).
    pub fn put_records(&self, queries: &[(String, Vec<u8>)], sources: &[(String, String)]) -> StateResult<()> {
        let mut w = self.writes();
        for (name, record) in queries {
            w.put(META, &[P_QUERY_RECORD, name.as_bytes()].concat(), record);
        }
        for (name, reads) in sources {
            w.put(META, &[P_SOURCE_RECORD, name.as_bytes()].concat(), reads.as_bytes());
        }
        self.write_between_epochs(w, true)
    }

    /// Mirrors every later write to `mirror` (the store holds what it holds, e.g. restored
    /// from it). The key groups are recorded with the next epoch.
    pub fn set_mirror(&mut self, mirror: Box<dyn Mirror>) {
        self.deferred.get_mut().unwrap().push(MirrorOp {
            cf: META.to_string(),
            key: K_KEY_GROUPS.to_vec(),
            value: Some((self.key_groups.count() as u64).to_le_bytes().to_vec()),
        });
        self.mirror = Some(mirror);
    }

    /// Writes what a mirror holds into this (empty) store, synced at the end; returns how many
    /// writes were applied. Writes to column families this configuration does not have
    /// (state of a query since removed) are left out.
    pub fn restore(&self, ops: impl IntoIterator<Item = MirrorOp>) -> StateResult<usize> {
        let mut batch = WriteBatch::default();
        let mut applied = 0;
        for op in ops {
            let Some(cf) = self.db.cf_handle(&op.cf) else { continue };
            match &op.value {
                Some(v) => batch.put_cf(cf, &op.key, v),
                None => batch.delete_cf(cf, &op.key),
            }
            applied += 1;
            if batch.len() >= 10_000 {
                self.db.write_opt(std::mem::take(&mut batch), &self.write_options(false))?;
            }
        }
        self.db.write_opt(batch, &self.write_options(true))?;
        Ok(applied)
    }

    /// Makes this store a cache of state kept durably elsewhere (see `cache_only`).
    pub fn cache_only(mut self) -> Self {
        self.cache_only = true;
        self
    }

    /// Writes what the store holds in memory to its files, so it can be opened again (a
    /// cache-only store has no write-ahead log to replay).
    pub fn persist(&self) -> StateResult<()> {
        for name in DB::list_cf(&Options::default(), &self.path)? {
            if let Some(cf) = self.db.cf_handle(&name) {
                self.db.flush_cf(cf)?;
            }
        }
        Ok(())
    }

    /// Durable writes are synced to the write-ahead log when `sync`; a cache-only store's
    /// skip it.
    fn write_options(&self, sync: bool) -> WriteOptions {
        let mut o = WriteOptions::default();
        if self.cache_only {
            o.disable_wal(true);
        } else {
            o.set_sync(sync);
        }
        o
    }

    fn writes(&self) -> Writes<'_> {
        Writes {
            db: &self.db,
            batch: WriteBatch::default(),
            ops: self.mirror.as_ref().map(|_| Vec::new()),
        }
    }

    /// Writes outside an epoch reach the mirror with the next one.
    fn write_between_epochs(&self, w: Writes<'_>, sync: bool) -> StateResult<()> {
        if let Some(ops) = w.ops {
            self.deferred.lock().unwrap().extend(ops);
        }
        self.db.write_opt(w.batch, &self.write_options(sync))?;
        Ok(())
    }

    /// Calls `restore` with every entry of table `table`, in key order; an entry `restore`
    /// rejects is reported as corrupt state, with the table and key.
    pub fn scan(&self, table: usize, mut restore: impl FnMut(&[u8], &[u8]) -> Result<(), String>) -> StateResult<usize> {
        let name = &self.tables[table];
        let cf = self.db.cf_handle(name).expect("table column families are created at open");
        let mut n = 0;
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item?;
            restore(&k, &v).map_err(|what| StateError::Corrupt {
                key: format!("{name}:{k:?}"),
                what,
            })?;
            n += 1;
        }
        Ok(n)
    }

    /// Output of flushed epochs not yet confirmed by their sinks: (epoch, sink, rows).
    pub fn pending(&self) -> StateResult<Vec<(u64, String, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(self.meta(), P_PENDING) {
            let (k, v) = item?;
            if !k.starts_with(P_PENDING) {
                break;
            }
            let rest = &k[P_PENDING.len()..];
            if rest.len() < 8 {
                return Err(StateError::Corrupt {
                    key: String::from_utf8_lossy(&k).into(),
                    what: "short pending key".into(),
                });
            }
            let epoch = u64::from_be_bytes(rest[..8].try_into().unwrap());
            out.push((epoch, String::from_utf8_lossy(&rest[8..]).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    /// Flushes one epoch atomically and durably (WAL fsync).
    pub fn write_epoch(&self, w: &EpochWrite) -> StateResult<()> {
        let mut out = self.writes();
        for (table, writes) in &w.changes {
            let cf = &self.tables[*table];
            for (from, to) in &writes.delete_ranges {
                out.delete_range(cf, from, to)?;
            }
            for key in &writes.deletes {
                out.delete(cf, key);
            }
            for (key, value) in &writes.puts {
                out.put(cf, key, value);
            }
        }
        for p in &w.positions {
            let mut v = Vec::with_capacity(17);
            v.extend_from_slice(&p.next_offset.to_le_bytes());
            v.push(p.max_event_time.is_some() as u8);
            v.extend_from_slice(&p.max_event_time.unwrap_or(0).to_le_bytes());
            out.put(META, &position_key(&p.topic, p.partition), &v);
        }
        for (source, position) in &w.file_positions {
            out.put(META, &[P_FILES, source.as_bytes()].concat(), position);
        }
        for (sink, rows) in &w.pending {
            out.put(META, &pending_key(w.epoch, sink), rows);
        }
        out.put(META, K_WATERMARK, &w.watermark.to_le_bytes());
        for (query, watermark) in &w.query_watermarks {
            out.put(META, &[P_QUERY_WATERMARK, query.as_bytes()].concat(), &watermark.to_le_bytes());
        }
        out.put(META, K_EPOCH, &w.epoch.to_le_bytes());
        if let (Some(mirror), Some(ops)) = (&self.mirror, &mut out.ops) {
            // Writes made since the last epoch go first, so later ones win.
            let mut all = std::mem::take(&mut *self.deferred.lock().unwrap());
            all.append(ops);
            mirror.commit(w.epoch, &all).map_err(|message| StateError::Mirror { epoch: w.epoch, message })?;
        }
        self.db.write_opt(out.batch, &self.write_options(true))?;
        Ok(())
    }

    /// Drops pending output once its sink holds it; `written`: the sink committed it (or
    /// already held it), so the sink must hold at least this epoch from now on.
    pub fn clear_pending(&self, epoch: u64, sink: &str, written: bool) -> StateResult<()> {
        let mut w = self.writes();
        w.delete(META, &pending_key(epoch, sink));
        if written {
            w.put(META, &[P_SINK_EPOCH, sink.as_bytes()].concat(), &epoch.to_le_bytes());
        }
        self.write_between_epochs(w, false)
    }

    /// The last epoch `sink` confirmed holding, if any.
    pub fn sink_epoch(&self, sink: &str) -> StateResult<Option<u64>> {
        let key = [P_SINK_EPOCH, sink.as_bytes()].concat();
        match self.meta_get(&key)? {
            Some(v) => Ok(Some(u64::from_le_bytes(self.fixed8(&key, &v)?))),
            None => Ok(None),
        }
    }

    /// Approximate bytes of live SST files (for metrics and progress lines).
    pub fn size_on_disk_bytes(&self) -> u64 {
        self.db.property_int_value("rocksdb.live-sst-files-size").ok().flatten().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_key_encoding_preserves_order() {
        let xs = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        for w in xs.windows(2) {
            assert!(encode_time_key(w[0]) < encode_time_key(w[1]));
            assert_eq!(decode_time_key(encode_time_key(w[0])), w[0]);
        }
    }

    fn entries(store: &StateStore, table: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        store
            .scan(table, |k, v| {
                out.push((k.to_vec(), v.to_vec()));
                Ok(())
            })
            .unwrap();
        out
    }

    /// Keeps what it is given; refuses epochs from `fail_from` on.
    #[derive(Default)]
    struct Recording {
        ops: std::sync::Arc<std::sync::Mutex<Vec<MirrorOp>>>,
        fail_from: Option<u64>,
    }

    impl Mirror for Recording {
        fn commit(&self, epoch: u64, ops: &[MirrorOp]) -> Result<(), String> {
            if self.fail_from.is_some_and(|f| epoch >= f) {
                return Err("fenced".into());
            }
            self.ops.lock().unwrap().extend_from_slice(ops);
            Ok(())
        }
    }

    fn everything(store: &StateStore) -> Vec<(String, Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        for cf in std::iter::once(META.to_string()).chain(store.tables.iter().cloned()) {
            for item in store.db.iterator_cf(store.db.cf_handle(&cf).unwrap(), IteratorMode::Start) {
                let (k, v) = item.unwrap();
                out.push((cf.clone(), k.to_vec(), v.to_vec()));
            }
        }
        out
    }

    /// What a mirrored store sent, replayed into an empty store, is the same state: puts,
    /// deletes, ranges (as one delete per key), pending output confirmed between epochs.
    /// An epoch the mirror refuses never reaches the local store.
    #[test]
    fn a_mirror_holds_exactly_the_store_and_is_never_behind_it() {
        let tables = vec!["q/windows".to_string()];
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut a = StateStore::open(a_dir.path(), 1, &tables).unwrap();
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        a.set_mirror(Box::new(Recording {
            ops: sent.clone(),
            fail_from: Some(4),
        }));
        let key = |t: EventTime, k: &[u8]| [&encode_time_key(t)[..], k].concat();
        fn epoch<'w>(n: u64, writes: &'w TableWrites, pending: Vec<(&'static str, Vec<u8>)>) -> EpochWrite<'w> {
            EpochWrite {
                epoch: n,
                watermark: n as i64,
                query_watermarks: vec![("q", n as i64)],
                changes: vec![(0, writes)],
                positions: Vec::new(),
                file_positions: Vec::new(),
                pending,
            }
        }
        let first = TableWrites {
            puts: (0..50).map(|i| (key(i, b"k"), vec![i as u8])).collect(),
            ..Default::default()
        };
        a.write_epoch(&epoch(1, &first, vec![("sink", b"rows-1".to_vec())])).unwrap();
        a.clear_pending(1, "sink", true).unwrap();
        a.put_records(&[("q".into(), b"record".to_vec())], &[]).unwrap();
        let second = TableWrites {
            delete_ranges: vec![(key(0, b""), key(20, b""))],
            deletes: vec![key(30, b"k")],
            puts: vec![(key(10, b"k"), b"back".to_vec()), (key(60, b"k"), b"new".to_vec())],
        };
        a.write_epoch(&epoch(2, &second, vec![("sink", b"rows-2".to_vec())])).unwrap();
        a.write_epoch(&epoch(3, &TableWrites::default(), Vec::new())).unwrap();

        let b = StateStore::open(b_dir.path(), 1, &tables).unwrap();
        b.restore(sent.lock().unwrap().clone()).unwrap();
        assert_eq!(everything(&b), everything(&a));
        let windows: Vec<Vec<u8>> = entries(&b, 0).into_iter().map(|(k, _)| k).collect();
        assert_eq!(windows.len(), 50 - 20 - 1 + 1 + 1, "ranges and deletes arrive as deletes");
        assert_eq!(b.pending().unwrap().len(), 1, "epoch 1's pending rows were confirmed; epoch 2's are not");
        assert_eq!(b.sink_epoch("sink").unwrap(), Some(1));
        assert_eq!(b.recover().unwrap().epoch, 3);

        let before = everything(&a);
        let refused = TableWrites {
            puts: vec![(key(99, b"k"), b"x".to_vec())],
            ..Default::default()
        };
        let err = a.write_epoch(&epoch(4, &refused, Vec::new())).unwrap_err();
        assert!(err.to_string().contains("did not take epoch 4: fenced"), "{err}");
        assert_eq!(everything(&a), before, "the local store stays at what the mirror holds");
    }

    #[test]
    fn epoch_write_round_trips_and_any_shard_count_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let tables = vec!["q/windows".to_string(), "other".to_string()];
        let store = StateStore::open(dir.path(), 2, &tables).unwrap();
        assert_eq!(store.key_groups(), KeyGroups::DEFAULT);
        let r = store.recover().unwrap();
        assert_eq!(r.epoch, 0);
        let key = |t: EventTime, k: &[u8]| [&encode_time_key(t)[..], k].concat();
        let writes = TableWrites {
            puts: vec![
                (key(10, b"k1"), b"a".to_vec()),
                (key(20, b"k2"), b"b".to_vec()),
                (key(30, b"k3"), b"c".to_vec()),
            ],
            ..Default::default()
        };
        let pos = PartitionPosition {
            topic: "t".into(),
            partition: 3,
            next_offset: 42,
            max_event_time: Some(99),
        };
        store
            .write_epoch(&EpochWrite {
                epoch: 1,
                watermark: 5,
                query_watermarks: vec![("q", 4), ("join", 5)],
                changes: vec![(0, &writes)],
                positions: vec![&pos],
                file_positions: vec![("drops", b"{}".to_vec())],
                pending: vec![("sink", b"rows".to_vec())],
            })
            .unwrap();
        let close = TableWrites {
            delete_ranges: vec![(encode_time_key(EventTime::MIN).to_vec(), encode_time_key(11).to_vec())],
            deletes: vec![key(30, b"k3")],
            puts: vec![(b"x".to_vec(), b"y".to_vec())],
        };
        store
            .write_epoch(&EpochWrite {
                epoch: 2,
                watermark: 15,
                query_watermarks: vec![("q", 14)],
                changes: vec![(0, &close)],
                positions: vec![],
                file_positions: vec![],
                pending: vec![],
            })
            .unwrap();
        drop(store);

        // Another shard count reads the same state: it is not split by shard.
        let store = StateStore::open(dir.path(), 3, &tables).unwrap();
        let r = store.recover().unwrap();
        assert_eq!((r.epoch, r.watermark), (2, Some(15)));
        assert_eq!((r.query_watermark("q"), r.query_watermark("join")), (Some(14), Some(5)));
        assert_eq!(
            r.query_watermark("new"),
            Some(15),
            "a query without its own watermark resumes at the pipeline's"
        );
        assert_eq!(r.positions[&("t".to_string(), 3)], pos);
        assert_eq!(r.file_positions["drops"], b"{}".to_vec());
        assert_eq!(store.pending().unwrap(), vec![(1, "sink".to_string(), b"rows".to_vec())]);
        assert_eq!(store.sink_epoch("sink").unwrap(), None);
        store.clear_pending(1, "sink", true).unwrap();
        assert!(store.pending().unwrap().is_empty());
        assert_eq!(store.sink_epoch("sink").unwrap(), Some(1), "the sink's confirmed epoch is kept");
        // Window 10 was range-deleted and 30 point-deleted by epoch 2; 20 and the put survive.
        assert_eq!(entries(&store, 0), vec![(b"x".to_vec(), b"y".to_vec()), (key(20, b"k2"), b"b".to_vec())]);
        assert!(entries(&store, 1).is_empty());
        let err = store.scan(0, |_, _| Err("no".into())).unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
        drop(store);

        match StateStore::open(dir.path(), 257, &tables) {
            Err(e @ StateError::TooManyShards { .. }) => assert!(e.to_string().contains("at most 256"), "{e}"),
            other => panic!("expected TooManyShards, got {:?}", other.err()),
        }
    }

    #[test]
    fn state_split_by_shard_moves_into_one_table_per_query() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The layout before key groups: `s<shard>/<query>` column families and a shard count.
            let mut opts = Options::default();
            opts.create_if_missing(true);
            opts.create_missing_column_families(true);
            let db = DB::open_cf(&opts, dir.path(), [META, "s0/clicks", "s1/clicks", "s1/other"]).unwrap();
            db.put_cf(db.cf_handle(META).unwrap(), K_SHARDS, 2u64.to_le_bytes()).unwrap();
            db.put_cf(db.cf_handle("s0/clicks").unwrap(), b"a", b"1").unwrap();
            db.put_cf(db.cf_handle("s1/clicks").unwrap(), b"b", b"2").unwrap();
            db.put_cf(db.cf_handle("s1/other").unwrap(), b"c", b"3").unwrap();
        }
        let tables = vec!["clicks/windows".to_string(), "other/windows".to_string()];
        let store = StateStore::open(dir.path(), 1, &tables).unwrap();
        assert_eq!(entries(&store, 0), vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())]);
        assert_eq!(entries(&store, 1), vec![(b"c".to_vec(), b"3".to_vec())]);
        drop(store);
        let cfs = DB::list_cf(&Options::default(), dir.path()).unwrap();
        assert!(!cfs.iter().any(|c| shard_layout_query(c).is_some()), "old column families dropped: {cfs:?}");
        // Reopening does not move anything again.
        let store = StateStore::open(dir.path(), 2, &tables).unwrap();
        assert_eq!(entries(&store, 0).len(), 2);
    }
}
