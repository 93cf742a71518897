//! Durability and single-writer fencing of a local Delta table.
//!
//! - [`sync_files`]: before a commit references data files, they and their directories are
//!   on disk (fsync), so a crash cannot leave a log entry pointing at a file that is gone;
//!   [`sync_log`] then syncs the commit's log file and `_delta_log`. Only after both does the
//!   committer drop the epoch's pending rows from the state store.
//! - [`TableLock`]: one writer per table. The sink holds an exclusive lock (`flock`) on
//!   `_tidemark.lock` in the table directory for as long as it is open (the kernel drops it
//!   when the process dies, so a crash never leaves a stale lock); a second process opening
//!   the table for writing is refused, naming the holder. Names starting with `_` are hidden
//!   from Delta readers and from vacuum.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file in the table directory.
pub const LOCK_FILE: &str = "_tidemark.lock";

#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("cannot sync {path} to disk: {source}; the disk may be failing or full (the epoch is kept and written again at the next start)")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("table {table} is being written by another process ({holder}): two writers would interleave their epochs. Run one pipeline per table, or point this sink at another path")]
    Locked { table: PathBuf, holder: String },
    #[error("cannot create the writer lock {path}: {source}; check that the table directory is writable")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Decodes `%XX` escapes (paths in the Delta log are URL-encoded).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn sync_path(path: &Path) -> Result<(), DurableError> {
    let sync = |p: &Path| File::open(p).and_then(|f| f.sync_all());
    sync(path).map_err(|source| DurableError::Sync {
        path: path.to_path_buf(),
        source,
    })
}

/// Syncs the data files at `relative` paths (as written in the Delta log) of the table at
/// `table`, then the directories holding them.
pub fn sync_files<'a>(table: &Path, relative: impl Iterator<Item = &'a str>) -> Result<(), DurableError> {
    let mut dirs = BTreeSet::new();
    for rel in relative {
        let decoded = table.join(percent_decode(rel));
        let file = if decoded.exists() { decoded } else { table.join(rel) };
        sync_path(&file)?;
        if let Some(dir) = file.parent() {
            dirs.insert(dir.to_path_buf());
        }
    }
    for dir in dirs {
        sync_path(&dir)?;
    }
    Ok(())
}

/// Syncs the log file of `version` and the `_delta_log` directory (which holds its name).
pub fn sync_log(table: &Path, version: i64) -> Result<(), DurableError> {
    let log = table.join("_delta_log");
    sync_path(&log.join(format!("{version:020}.json")))?;
    sync_path(&log)
}

/// An exclusive writer lock on a table directory, held while the value lives.
#[derive(Debug)]
pub struct TableLock {
    _file: File,
}

impl TableLock {
    /// Takes the lock (creating the table directory if needed), writing `owner` into the
    /// lock file for the error another writer would see.
    pub fn acquire(table: &Path, owner: &str) -> Result<TableLock, DurableError> {
        let path = table.join(LOCK_FILE);
        let lock_err = |source| DurableError::Lock { path: path.clone(), source };
        std::fs::create_dir_all(table).map_err(lock_err)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(lock_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(DurableError::Locked {
                    table: table.to_path_buf(),
                    holder: if holder.is_empty() { "unknown".into() } else { holder.to_string() },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(lock_err(e)),
        }
        let text = format!("{owner}, pid {}", std::process::id());
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(text.as_bytes()))
            .map_err(lock_err)?;
        Ok(TableLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("t");
        let first = TableLock::acquire(&table, "pipeline \"a\"").unwrap();
        let err = TableLock::acquire(&table, "pipeline \"b\"").unwrap_err().to_string();
        assert!(err.contains("is being written by another process (pipeline \"a\", pid"), "{err}");
        drop(first);
        TableLock::acquire(&table, "pipeline \"b\"").unwrap();
    }

    #[test]
    fn log_paths_are_decoded_to_the_files_on_disk() {
        assert_eq!(percent_decode("page=%2Fa%20b/part-1.parquet"), "page=/a b/part-1.parquet");
        assert_eq!(percent_decode("100%"), "100%");
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("d=x y")).unwrap();
        std::fs::write(dir.path().join("d=x y/f.parquet"), b"1").unwrap();
        sync_files(dir.path(), ["d=x%20y/f.parquet"].into_iter()).unwrap();
        let missing = sync_files(dir.path(), ["gone.parquet"].into_iter()).unwrap_err();
        assert!(missing.to_string().contains("cannot sync"), "{missing}");
    }
}
