//! RocksDB state: one DB per process, one column family per (shard, query) for window state,
//! and a `meta` column family for epochs, source positions, the watermark and pending output.
//!
//! Everything an epoch changes is written in ONE `WriteBatch` (all shards, all column
//! families), synced, by the committer: after a crash the store holds exactly the state as of
//! the last flushed epoch, consistent across shards. Window keys are
//! `window start (order-preserving big endian) ++ group key`, so a closed time range is one
//! `delete_range`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use crate::value::EventTime;
use crate::window::{OperatorChanges, WindowOperator};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "cannot open the state store at {path}: {source}. If another tidemark process uses this state_dir, stop it or point [pipeline] state_dir elsewhere"
    )]
    Open { path: PathBuf, source: rocksdb::Error },
    #[error("the state in {path} was written with {stored} shards, but this run has {configured}; set [pipeline] shards = {stored} (state is partitioned by shard), or start from an empty state_dir")]
    ShardCountChanged { path: PathBuf, stored: usize, configured: usize },
    #[error("cannot create the state_dir {path}: {source}; check the path and its permissions")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("state store I/O failed: {0} (external: check disk space and permissions of the state_dir; a restart resumes from the last flushed epoch)")]
    Io(#[from] rocksdb::Error),
    #[error("state store holds an unreadable record under key {key:?}: {what} (internal error or a state_dir from an incompatible version)")]
    Corrupt { key: String, what: String },
}

pub type StateResult<T> = Result<T, StateError>;

const META: &str = "meta";
const K_EPOCH: &[u8] = b"epoch";
const K_WATERMARK: &[u8] = b"watermark";
const K_SHARDS: &[u8] = b"shards";
const P_POSITION: &[u8] = b"pos\0";
const P_PENDING: &[u8] = b"pending\0";
const P_FILES: &[u8] = b"files\0";

/// Where a source partition stands as of a flushed epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionPosition {
    pub topic: String,
    pub partition: i32,
    /// The next offset to read.
    pub next_offset: i64,
    pub max_event_time: Option<EventTime>,
}

/// What recovery finds in the store.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Last flushed epoch (0 = fresh store).
    pub epoch: u64,
    pub watermark: Option<EventTime>,
    pub positions: HashMap<(String, i32), PartitionPosition>,
    /// File-source name → its encoded position (see `source::files::FilePosition`).
    pub file_positions: HashMap<String, Vec<u8>>,
}

/// Everything one epoch flushes, across all shards.
#[derive(Debug, Default)]
pub struct EpochWrite<'a> {
    pub epoch: u64,
    pub watermark: EventTime,
    /// (shard, query index, changes)
    pub changes: Vec<(usize, usize, &'a OperatorChanges)>,
    pub positions: Vec<&'a PartitionPosition>,
    /// (file-source name, encoded position).
    pub file_positions: Vec<(&'a str, Vec<u8>)>,
    /// (sink name, encoded rows) output of this epoch, kept until the sink has committed it.
    pub pending: Vec<(&'a str, Vec<u8>)>,
}

pub struct StateStore {
    db: DB,
    path: PathBuf,
    /// Column family names indexed by [shard][query].
    cf_names: Vec<Vec<String>>,
}

pub fn encode_window_start(start: EventTime) -> [u8; 8] {
    ((start as u64) ^ (1 << 63)).to_be_bytes()
}

fn decode_window_start(b: &[u8]) -> EventTime {
    (u64::from_be_bytes(b.try_into().unwrap()) ^ (1 << 63)) as i64
}

fn position_key(topic: &str, partition: i32) -> Vec<u8> {
    [P_POSITION, topic.as_bytes(), b"\0", &partition.to_be_bytes()].concat()
}

fn pending_key(epoch: u64, sink: &str) -> Vec<u8> {
    [P_PENDING, &epoch.to_be_bytes(), sink.as_bytes()].concat()
}

/// Memory all memtables may use together (see `StateStore::open`).
const MEMTABLE_BUDGET_BYTES: usize = 64 << 20;
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
    /// Opens (or creates) the store for `shards` shards running `queries` (query names).
    pub fn open(dir: &Path, shards: usize, queries: &[String]) -> StateResult<Self> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::CreateDir { path: dir.into(), source })?;
        let mut opts = column_family_options();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // All memtables together stay under this: RocksDB flushes the largest when it is
        // reached. Without it each column family (shards × queries) may hold 2 × 64 MB.
        opts.set_db_write_buffer_size(MEMTABLE_BUDGET_BYTES);
        let cf_names: Vec<Vec<String>> = (0..shards).map(|s| queries.iter().map(|q| format!("s{s}/{q}")).collect()).collect();
        let mut names: Vec<String> = DB::list_cf(&opts, dir).unwrap_or_default();
        for n in std::iter::once(META.to_string()).chain(cf_names.iter().flatten().cloned()) {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        let descriptors = names.iter().map(|n| ColumnFamilyDescriptor::new(n, column_family_options()));
        let db = DB::open_cf_descriptors(&opts, dir, descriptors).map_err(|source| StateError::Open { path: dir.into(), source })?;
        let store = StateStore {
            db,
            path: dir.into(),
            cf_names,
        };
        match store.meta_get(K_SHARDS)? {
            Some(v) => {
                let stored = u64::from_le_bytes(store.fixed8(K_SHARDS, &v)?) as usize;
                if stored != shards {
                    return Err(StateError::ShardCountChanged {
                        path: dir.into(),
                        stored,
                        configured: shards,
                    });
                }
            }
            None => store.db.put_cf(store.meta(), K_SHARDS, (shards as u64).to_le_bytes())?,
        }
        Ok(store)
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
        Ok(r)
    }

    /// Loads the open windows of (shard, query) into `op`; returns how many keys were loaded.
    pub fn load_windows(&self, shard: usize, query: usize, op: &mut WindowOperator) -> StateResult<usize> {
        let cf = self
            .db
            .cf_handle(&self.cf_names[shard][query])
            .expect("query column families are created at open");
        let mut n = 0;
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item?;
            let restored = if k.len() >= 8 {
                op.restore(decode_window_start(&k[..8]), &k[8..], &v)
            } else {
                Err("key shorter than 8 bytes".into())
            };
            if let Err(what) = restored {
                return Err(StateError::Corrupt {
                    key: format!("{}:{:?}", self.cf_names[shard][query], k),
                    what: format!("{what}: window state does not match the query's aggregates (did the query change? use a new state_dir)"),
                });
            }
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
        let mut batch = WriteBatch::default();
        for (shard, query, changes) in &w.changes {
            let cf = self
                .db
                .cf_handle(&self.cf_names[*shard][*query])
                .expect("query column families are created at open");
            if let Some(through) = changes.closed_through {
                batch.delete_range_cf(cf, encode_window_start(EventTime::MIN), encode_window_start(through.saturating_add(1)));
            }
            for (start, key) in &changes.deletes {
                batch.delete_cf(cf, [&encode_window_start(*start)[..], key].concat());
            }
            for (start, key, value) in &changes.puts {
                batch.put_cf(cf, [&encode_window_start(*start)[..], key].concat(), value);
            }
        }
        let meta = self.meta();
        for p in &w.positions {
            let mut v = Vec::with_capacity(17);
            v.extend_from_slice(&p.next_offset.to_le_bytes());
            v.push(p.max_event_time.is_some() as u8);
            v.extend_from_slice(&p.max_event_time.unwrap_or(0).to_le_bytes());
            batch.put_cf(meta, position_key(&p.topic, p.partition), v);
        }
        for (source, position) in &w.file_positions {
            batch.put_cf(meta, [P_FILES, source.as_bytes()].concat(), position);
        }
        for (sink, rows) in &w.pending {
            batch.put_cf(meta, pending_key(w.epoch, sink), rows);
        }
        batch.put_cf(meta, K_WATERMARK, w.watermark.to_le_bytes());
        batch.put_cf(meta, K_EPOCH, w.epoch.to_le_bytes());
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }

    /// Drops pending output once its sink holds it.
    pub fn clear_pending(&self, epoch: u64, sink: &str) -> StateResult<()> {
        self.db.delete_cf(self.meta(), pending_key(epoch, sink))?;
        Ok(())
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
    fn window_start_encoding_preserves_order() {
        let xs = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        for w in xs.windows(2) {
            assert!(encode_window_start(w[0]) < encode_window_start(w[1]));
            assert_eq!(decode_window_start(&encode_window_start(w[0])), w[0]);
        }
    }

    #[test]
    fn epoch_write_round_trips_and_shard_count_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let queries = vec!["q".to_string()];
        let store = StateStore::open(dir.path(), 2, &queries).unwrap();
        let r = store.recover().unwrap();
        assert_eq!(r.epoch, 0);
        let cfg = crate::config::parse_config(include_str!("../tests/data/minimal.toml")).unwrap();
        let op = WindowOperator::new(&cfg.queries[0], &cfg.sources[0]);
        let accs: Vec<crate::agg::Acc> = op.specs().iter().map(crate::agg::AggSpec::new_acc).collect();
        let mut state = Vec::new();
        crate::agg::encode_accs(&accs, &mut state);
        let changes = OperatorChanges {
            puts: vec![
                (10, b"k1".to_vec(), state.clone()),
                (20, b"k2".to_vec(), state.clone()),
                (30, b"k3".to_vec(), state),
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
                changes: vec![(1, 0, &changes)],
                positions: vec![&pos],
                file_positions: vec![("drops", b"{}".to_vec())],
                pending: vec![("sink", b"rows".to_vec())],
            })
            .unwrap();
        let close = OperatorChanges {
            closed_through: Some(10),
            deletes: vec![(30, b"k3".to_vec())],
            ..Default::default()
        };
        store
            .write_epoch(&EpochWrite {
                epoch: 2,
                watermark: 15,
                changes: vec![(1, 0, &close)],
                positions: vec![],
                file_positions: vec![],
                pending: vec![],
            })
            .unwrap();
        drop(store);

        let store = StateStore::open(dir.path(), 2, &queries).unwrap();
        let r = store.recover().unwrap();
        assert_eq!((r.epoch, r.watermark), (2, Some(15)));
        assert_eq!(r.positions[&("t".to_string(), 3)], pos);
        assert_eq!(r.file_positions["drops"], b"{}".to_vec());
        assert_eq!(store.pending().unwrap(), vec![(1, "sink".to_string(), b"rows".to_vec())]);
        store.clear_pending(1, "sink").unwrap();
        assert!(store.pending().unwrap().is_empty());
        let mut op = WindowOperator::new(&cfg.queries[0], &cfg.sources[0]);
        // Window 10 was range-deleted and 30 point-deleted by epoch 2; 20 survives, on shard 1 only.
        assert_eq!(store.load_windows(1, 0, &mut op).unwrap(), 1);
        assert_eq!(store.load_windows(0, 0, &mut op).unwrap(), 0);
        drop(store);

        match StateStore::open(dir.path(), 3, &queries) {
            Err(e @ StateError::ShardCountChanged { .. }) => assert!(e.to_string().contains("shards = 2")),
            other => panic!("expected ShardCountChanged, got {:?}", other.err()),
        }
    }
}
