//! File-drop source: reads a directory of JSON-lines files (one JSON event per line), plain or gzip.
//!
//! # The directory is the queue
//! Every regular file in [`FileSourceOptions::dir`] whose name ends with one of
//! [`FileSourceOptions::suffixes`] is read once, line by line. Hidden files (names starting with
//! `.`) and names ending in `.tmp` or `.partial` are ignored: **writers should write a file under
//! such a name (or elsewhere on the same file system) and rename it into place when complete.**
//! Files present at start are read, and new files are picked up as they appear: the caller polls
//! ([`FileSource::poll`]), and the directory is listed at most every
//! [`FileSourceOptions::rescan`] (200 ms by default) when nothing else is to be done.
//!
//! Files are read **one at a time, in name order**: name them so they sort in arrival order
//! (for example `events-20250101T120000Z-0001.jsonl.gz`). Which files are still to be read is
//! decided by the set of files already done, not by a name cursor, so a file that appears later
//! with a name sorting before files already read is still read (after the file being read now).
//! A plain file that is still growing holds back the files after it until it settles (see below).
//!
//! # Formats
//! A name ending in `.gz`, or a file starting with the gzip magic bytes `1f 8b`, is gzip;
//! concatenated (multi-member) gzip files are read fully. Anything else is plain UTF-8 text.
//! Lines end with `\n` (a `\r` before it is dropped). Lines holding only whitespace are skipped
//! (their bytes still count as read). A UTF-8 byte-order mark at the very start of a file is
//! dropped.
//!
//! # Position and exactly-once
//! [`FileSource::position`] is where reading stands after the last line handed out by `poll`: the
//! set of files read to the end ([`FilePosition::done`]) and the file being read with the byte
//! offset of its next unread line ([`FilePosition::current`]; for gzip, the offset is in the
//! *decompressed* stream). The caller stores it (it is serde-serializable) in the same atomic
//! commit as the state built from the lines handed out before it. On restart,
//! [`FileSource::open`] with that position resumes exactly there: no line is read twice and none
//! is skipped. Offsets always point at the start of a line; a line is never half taken.
//!
//! A file is *done* when:
//! - plain: the end of the file was reached, and the file has not changed (size and modification
//!   time) for [`FileSourceOptions::settle`] (5 s by default). A last line without `\n` is held
//!   back (the offset stays at its start) until the `\n` arrives or the file has settled; then it
//!   is taken as the last line. A writer still appending is therefore never cut off, unless it
//!   pauses for longer than `settle`. "Unchanged for `settle`" is known either from watching the
//!   file, or at once from its modification time being at least `settle` old (plus 2 s on file
//!   systems with whole-second timestamps), so files written a while ago are not waited for.
//! - gzip: the decoder read the trailer of the last member (and the CRC matched). A gzip file is
//!   done at once at the end of its stream: do not append gzip members to a file in place.
//!
//! # Identity
//! A file is known by its name *and* its identity ([`FileId`]): device and inode number, and a
//! hash of its first bytes (up to 4 KiB, as they are on disk), with its size and modification
//! time as a cheap change detector. At every listing, each done file still present is checked:
//! - unchanged size and modification time, same inode: the same file (no read);
//! - another inode (a new file renamed onto the name, log rotation): a new file, read in full;
//! - same inode but changed: its first bytes decide — the same: the file was appended to after
//!   it was read (a warning; appends to a finished file are not read); different: rewritten in
//!   place (`cp` over it, truncate-and-write rotation), a new file, read in full.
//!
//! The file being read is checked the same way whenever it is reopened (after a restart, or
//! after a read error): if it was replaced, or is now shorter than the position, the rest of
//! the old file is lost — reported as [`FileEvent::Replaced`] — and the new one is read from
//! its start. Only a new file that reuses the inode number of the one it replaces *and* starts
//! with the same bytes (the first 4 KiB, or all of a shorter old file) is taken for the old one.
//! Positions written before identities were kept restore as they are: the files present are
//! taken as the ones recorded, and their identities kept from then on.
//!
//! Resuming inside a plain file seeks to the offset. Resuming inside a gzip file re-decompresses
//! and discards the prefix up to the offset: its cost grows with the offset (gzip streams cannot
//! be entered in the middle), so prefer many moderate gzip files over one huge one.
//!
//! # Problems
//! Per line, [`Line::problem`] flags lines the caller should dead-letter instead of decoding:
//! [`LineProblem::TooLong`] (more than [`FileSourceOptions::max_line_bytes`] bytes; only that many
//! are handed, and the line is never held in memory whole) and [`LineProblem::InvalidUtf8`].
//!
//! Per file, problems that skip (the rest of) a file do not stop the source: they are logged
//! (`tracing` warnings) and queued as [`FileEvent`]s, which the caller takes with
//! [`FileSource::take_events`] after each `poll` and dead-letters or logs in the same epoch:
//! - [`FileEvent::Corrupt`]: a gzip file with a bad header, corrupt data or a CRC mismatch, or a
//!   plain file that shrank while being read. Lines before the reported offset were handed out
//!   (a gzip CRC is only checked at the end of its member, so lines decoded before a corruption
//!   was detected may be garbage; they normally fail to decode and are dead-lettered). The file
//!   is recorded as done.
//! - [`FileEvent::Truncated`]: a gzip stream that ends early. While the file keeps changing this
//!   is taken for a file still being written: complete lines decoded so far are handed out, and
//!   reading resumes from the same position when the file has grown. Once it has been unchanged
//!   for `settle` and is still cut short, it is reported and recorded as done.
//! - [`FileEvent::Vanished`]: a file that was listed (or was being read) but was deleted before
//!   it could be read. It is counted ([`FileSource::files_vanished`]) and not recorded as done.
//!
//! - [`FileEvent::Replaced`]: the file being read was replaced (see "Identity"); the new one is
//!   read from its start.
//! - [`FileEvent::Unreadable`]: opening or reading the file failed
//!   [`FileSourceOptions::max_read_attempts`] times in a row. It is recorded as done.
//!
//! I/O errors never stop the source. A file that cannot be opened or read is retried after a
//! backoff (doubling from [`FileSourceOptions::retry_backoff`] up to
//! [`FileSourceOptions::max_retry_backoff`]); one that fails before its first line is put
//! aside meanwhile and the files after it are read. After `max_read_attempts` failures in a
//! row it is given up ([`FileEvent::Unreadable`]). A directory that cannot be listed is
//! retried with the same backoff for as long as it takes. Every failure is logged and counted
//! ([`FileSource::read_errors`]); while the directory or a file keeps failing,
//! [`FileSource::progress`] says so (the watermark is not let past the source as idle). Only
//! [`FileSource::open`] fails, on a directory that is missing or is not one.
//!
//! # Limits
//! - One file at a time: a plain file whose writer keeps appending holds back the files after it.
//! - `done` names every file read that is still in the directory; names of files deleted or moved
//!   away are dropped from it at the next listing (a file that reappears under a name no longer in
//!   `done` is a new file and is read). Move or delete processed files to keep positions small.
//! - Appends to a file after it is done are not read (they are logged once).
//! - The settle rule trusts modification times against this machine's clock; on network file
//!   systems with a skewed clock, raise `settle`.
//! - A truncated gzip file is re-decompressed from its start each time it grows.
//! - Reading streams through a 256 KiB buffer; a line is copied only when it crosses the buffer's
//!   end, and at most `max_line_bytes` of a line are held in memory.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, Metadata};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use flate2::read::MultiGzDecoder;
use serde::{Deserialize, Serialize};

/// File events kept until taken; more are only logged (and counted in `events_dropped`).
const MAX_QUEUED_EVENTS: usize = 10_000;
/// Size of the read buffer (of decompressed bytes, for gzip).
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// Pending-line buffers larger than this are given back after use.
const KEEP_PENDING_BYTES: usize = 1024 * 1024;
/// Extra settle time when modification times look whole-second (coarse file-system timestamps).
const COARSE_MTIME_MARGIN: Duration = Duration::from_secs(2);
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";
/// How many of a file's first bytes its identity hashes.
const HEAD_BYTES: usize = 4096;

/// The suffixes read by default.
pub const DEFAULT_SUFFIXES: [&str; 6] = [".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz", ".ndjson.gz"];

/// How a [`FileSource`] reads its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSourceOptions {
    /// The directory files are dropped into.
    pub dir: PathBuf,
    /// Only names ending with one of these are read (default [`DEFAULT_SUFFIXES`]; an empty list
    /// reads every name). Hidden files (starting with `.`) and names ending in `.tmp`/`.partial`
    /// are always ignored — writers should write under such a name, then rename.
    pub suffixes: Vec<String>,
    /// A plain file is done, and a last line without `\n` is taken, only once the file has not
    /// changed (size and modification time) for this long (default 5 s). A truncated gzip file is
    /// reported after this long without change.
    pub settle: Duration,
    /// Lines longer than this many bytes are flagged [`LineProblem::TooLong`] (default 16 MiB).
    pub max_line_bytes: usize,
    /// When idle (nothing new, or waiting for a file to settle), the directory is listed and the
    /// waiting file checked at most this often (default 200 ms).
    pub rescan: Duration,
    /// The wait before retrying a failed read of a file or of the directory, doubled after each
    /// failure in a row (default 200 ms) ...
    pub retry_backoff: Duration,
    /// ... up to this (default 10 s).
    pub max_retry_backoff: Duration,
    /// A file whose open or read fails this many times in a row is given up as
    /// [`FileEvent::Unreadable`] (default 10, about 45 s of retries).
    pub max_read_attempts: u32,
}

impl FileSourceOptions {
    /// Options with the defaults for reading `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> FileSourceOptions {
        FileSourceOptions {
            dir: dir.into(),
            suffixes: DEFAULT_SUFFIXES.iter().map(|s| s.to_string()).collect(),
            settle: Duration::from_secs(5),
            max_line_bytes: 16 * 1024 * 1024,
            rescan: Duration::from_millis(200),
            retry_backoff: Duration::from_millis(200),
            max_retry_backoff: Duration::from_secs(10),
            max_read_attempts: 10,
        }
    }

    /// The wait after the `attempt`-th failure in a row (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doubled = self.retry_backoff.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        doubled.min(self.max_retry_backoff)
    }

    /// Whether a directory entry with this name is to be read.
    pub fn wants(&self, name: &str) -> bool {
        if name.starts_with('.') || name.ends_with(".tmp") || name.ends_with(".partial") {
            return false;
        }
        self.suffixes.is_empty() || self.suffixes.iter().any(|s| name.ends_with(s.as_str()))
    }
}

/// Where reading stands. Serializable (serde JSON) so the caller stores it with epoch state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePosition {
    /// Files read to the end, by name (relative to the directory).
    pub done: BTreeSet<String>,
    /// The file being read and the offset of its next unread line (in the decompressed stream
    /// for gzip).
    pub current: Option<(String, u64)>,
    /// Identities of the files in `done` and of the current one, by name (see "Identity").
    /// Absent from positions written before identities were kept: the files present are then
    /// taken as the ones recorded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ids: BTreeMap<String, FileId>,
}

/// What tells a file apart from another under the same name: device and inode, a hash of its
/// first bytes, and its size and modification time when last seen (a change detector only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
    pub mtime_ns: i64,
    /// How many first bytes `head_hash` covers (at most 4 KiB; fewer for a shorter file).
    pub head_len: u32,
    /// FNV-1a (64 bit) of those bytes.
    pub head_hash: u64,
}

/// How a file found under a recorded name relates to the recorded one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sameness {
    /// Unchanged.
    Same,
    /// The same file, grown or touched since.
    Changed,
    /// Another file.
    Other,
}

impl FileId {
    fn mtime_ns(meta: &Metadata) -> i64 {
        meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec())
    }

    /// The identity of an open file (read from its current position, which the caller resets).
    fn of(file: &mut File, meta: &Metadata) -> io::Result<FileId> {
        let (head_len, head_hash) = hash_head(file, HEAD_BYTES)?;
        Ok(FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: FileId::mtime_ns(meta),
            head_len,
            head_hash,
        })
    }

    fn read(path: &Path) -> io::Result<FileId> {
        let mut file = File::open(path)?;
        let meta = file.metadata()?;
        FileId::of(&mut file, &meta)
    }

    /// Compares the file at `path` (with metadata `meta`) with this identity, reading its first
    /// bytes only when the inode is the same but the size or modification time changed.
    fn compare(&self, path: &Path, meta: &Metadata) -> io::Result<Sameness> {
        if (meta.dev(), meta.ino()) != (self.dev, self.ino) {
            return Ok(Sameness::Other);
        }
        if (meta.len(), FileId::mtime_ns(meta)) == (self.len, self.mtime_ns) {
            return Ok(Sameness::Same);
        }
        self.compare_head(&mut File::open(path)?, meta)
    }

    /// Compares an open file (read from its current position, which the caller resets).
    fn compare_head(&self, file: &mut File, meta: &Metadata) -> io::Result<Sameness> {
        if (meta.dev(), meta.ino()) != (self.dev, self.ino) || meta.len() < u64::from(self.head_len) {
            return Ok(Sameness::Other);
        }
        let (len, hash) = hash_head(file, self.head_len as usize)?;
        Ok(if (len, hash) == (self.head_len, self.head_hash) {
            Sameness::Changed
        } else {
            Sameness::Other
        })
    }

    /// The same file, as seen now (size and modification time updated).
    fn seen(self, meta: &Metadata) -> FileId {
        FileId {
            len: meta.len(),
            mtime_ns: FileId::mtime_ns(meta),
            ..self
        }
    }
}

/// (bytes read, FNV-1a 64) of the next `max` bytes of `file` (fewer at its end).
fn hash_head(file: &mut File, max: usize) -> io::Result<(u32, u64)> {
    let mut buf = vec![0u8; max];
    let mut got = 0;
    while got < max {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((got as u32, fnv1a(&buf[..got])))
}

/// FNV-1a, 64 bit: stable across releases (it is stored), and enough to tell file heads apart.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Why a line should be dead-lettered rather than decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineProblem {
    /// The line has `len` bytes (without its `\n`), more than `max_line_bytes`; only the first
    /// `max_line_bytes` are handed.
    TooLong { len: usize },
    /// The line is not valid UTF-8.
    InvalidUtf8,
}

impl fmt::Display for LineProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LineProblem::TooLong { len } => write!(f, "line too long ({len} bytes, more than max_line_bytes; only its start is kept)"),
            LineProblem::InvalidUtf8 => f.write_str("line is not valid UTF-8"),
        }
    }
}

/// One line handed out by [`FileSource::poll`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line<'a> {
    /// The file's name, relative to the directory.
    pub file: &'a str,
    /// Byte offset of the line's start in the (decompressed) file.
    pub offset: u64,
    /// The line without its trailing `\n` or `\r\n` (and without a UTF-8 byte-order mark at the
    /// start of a file).
    pub bytes: &'a [u8],
    /// Set when the line should be dead-lettered.
    pub problem: Option<LineProblem>,
}

/// A file-level problem: the source skipped (the rest of) a file and goes on. Take these with
/// [`FileSource::take_events`] after each poll and dead-letter or log them with the same epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileEvent {
    /// The file cannot be decoded past `offset` (bad gzip header, corrupt data, CRC mismatch, or
    /// a plain file that shrank while being read). It is recorded as done.
    Corrupt { file: String, offset: u64, detail: String },
    /// The gzip stream ends early and the file stopped changing: lines up to `offset` were handed
    /// out, the rest is missing. It is recorded as done.
    Truncated { file: String, offset: u64 },
    /// The file was deleted before it was read (or while waiting at `offset`). Not recorded as
    /// done.
    Vanished { file: String, offset: u64 },
    /// The file being read (up to `offset`) was replaced by another under the same name, or cut
    /// shorter than `offset`: the rest of the old one is lost, the new one is read from its
    /// start.
    Replaced { file: String, offset: u64 },
    /// Opening or reading the file failed `attempts` times in a row (last error: `detail`);
    /// lines before `offset` were read. It is recorded as done.
    Unreadable { file: String, offset: u64, attempts: u32, detail: String },
}

impl FileEvent {
    /// The file the event is about.
    pub fn file(&self) -> &str {
        match self {
            FileEvent::Corrupt { file, .. }
            | FileEvent::Truncated { file, .. }
            | FileEvent::Vanished { file, .. }
            | FileEvent::Replaced { file, .. }
            | FileEvent::Unreadable { file, .. } => file,
        }
    }
}

impl fmt::Display for FileEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileEvent::Corrupt { file, offset, detail } => {
                write!(f, "{file} is corrupt at byte {offset} ({detail}); the rest of it was skipped")
            }
            FileEvent::Truncated { file, offset } => write!(
                f,
                "{file} is a truncated gzip file (it ends early and stopped changing); lines up to byte {offset} were read, the rest is missing. Writers should write elsewhere and rename the complete file in"
            ),
            FileEvent::Vanished { file, offset } => {
                write!(f, "{file} was deleted before it was read (at byte {offset}); its remaining lines were not read")
            }
            FileEvent::Replaced { file, offset } => write!(
                f,
                "{file} was replaced by another file (or cut shorter) while it was being read at byte {offset}; the rest of the old file was not read, the new one is read from its start. Writers should write under a new name (or a .tmp name) and rename it in"
            ),
            FileEvent::Unreadable {
                file,
                offset,
                attempts,
                detail,
            } => write!(
                f,
                "{file} could not be read ({detail}) in {attempts} attempts; it was skipped from byte {offset} on. Fix it and drop it again under a new name to have it read"
            ),
        }
    }
}

/// Errors opening the source, and read errors (retried inside [`FileSource::poll`]).
#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    #[error("file source directory {} does not exist; create it (mkdir -p {}) or fix the source's `path`", dir.display(), dir.display())]
    DirMissing { dir: PathBuf },
    #[error("file source path {} is not a directory; point the source's `path` at the directory files are dropped into", dir.display())]
    NotADirectory { dir: PathBuf },
    #[error("cannot list file source directory {}: {source} (check that it is readable by tidemark)", dir.display())]
    ListDir { dir: PathBuf, source: io::Error },
    #[error("cannot read {}: {source} (check that the file is readable by tidemark; polling again retries)", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("invalid file source options: {0}")]
    Options(String),
}

/// Reads the JSON-lines files of a directory, resuming from a [`FilePosition`].
pub struct FileSource {
    options: FileSourceOptions,
    done: BTreeSet<String>,
    /// Identities of done files (see "Identity"); a done name without one is adopted from the
    /// file present at the next listing.
    ids: BTreeMap<String, FileId>,
    current: Option<Current>,
    /// Names listed but not yet read, in name order.
    queue: BTreeSet<String>,
    /// Files put aside after failing before their first line: failures so far, next attempt.
    retry: BTreeMap<String, (u32, Instant)>,
    /// Failed reads (files and directory) since `open`.
    read_errors: u64,
    /// Failed listings of the directory in a row.
    dir_failures: u32,
    /// Done files found appended to, already warned about.
    warned_appended: HashSet<String>,
    last_scan: Option<Instant>,
    idle_until: Option<Instant>,
    events: Vec<FileEvent>,
    events_dropped: u64,
    vanished: u64,
    warned_names: HashSet<OsString>,
    buffer_bytes: usize,
}

/// Size and modification time of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: Option<SystemTime>,
}

impl Stamp {
    fn of(meta: &Metadata) -> Stamp {
        Stamp {
            len: meta.len(),
            mtime: meta.modified().ok(),
        }
    }
}

/// A stamp and since when it has been seen unchanged.
#[derive(Debug, Clone, Copy)]
struct Watch {
    stamp: Stamp,
    since: Instant,
}

impl Watch {
    fn settled(&self, settle: Duration, now: Instant) -> bool {
        if now.saturating_duration_since(self.since) >= settle {
            return true;
        }
        let Some(mtime) = self.stamp.mtime else { return false };
        let Ok(age) = SystemTime::now().duration_since(mtime) else { return false };
        let coarse = mtime.duration_since(SystemTime::UNIX_EPOCH).is_ok_and(|d| d.subsec_nanos() == 0);
        age >= if coarse { settle + COARSE_MTIME_MARGIN } else { settle }
    }
}

enum Stream {
    Plain(BufReader<File>),
    Gzip(Box<BufReader<MultiGzDecoder<File>>>),
}

impl Stream {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        match self {
            Stream::Plain(r) => r.fill_buf(),
            Stream::Gzip(r) => r.fill_buf(),
        }
    }

    fn consume(&mut self, n: usize) {
        match self {
            Stream::Plain(r) => r.consume(n),
            Stream::Gzip(r) => r.consume(n),
        }
    }
}

/// The file being read.
struct Current {
    name: String,
    /// Offset of the next unread line.
    offset: u64,
    /// Decided when the file is first opened.
    gzip: Option<bool>,
    /// Open reader, positioned at `offset + pending_len`.
    stream: Option<Stream>,
    /// The gzip stream ended early: reopen only once the file changed (or report it once settled).
    blocked: bool,
    /// Kept bytes (at most `max_line_bytes`) of the unfinished line at `offset`.
    pending: Vec<u8>,
    /// All bytes of the unfinished line read so far.
    pending_len: u64,
    /// Plain at its end, or gzip since opened: the file's stamp and since when it is unchanged.
    watch: Option<Watch>,
    /// Its identity, once opened (or as restored).
    id: Option<FileId>,
    /// Failed opens or reads in a row, and when to try again.
    attempts: u32,
    retry_at: Option<Instant>,
}

impl Current {
    fn new(name: String, offset: u64) -> Current {
        Current {
            name,
            offset,
            gzip: None,
            stream: None,
            blocked: false,
            pending: Vec::new(),
            pending_len: 0,
            watch: None,
            id: None,
            attempts: 0,
            retry_at: None,
        }
    }

    fn drop_stream(&mut self) {
        self.stream = None;
        self.clear_pending();
    }

    fn clear_pending(&mut self) {
        self.pending.clear();
        if self.pending.capacity() > KEEP_PENDING_BYTES {
            self.pending = Vec::new();
        }
        self.pending_len = 0;
    }
}

/// What reading the current file came to.
enum Step {
    /// `max_lines` handed out.
    Limit,
    /// Nothing more for now (growing, unsettled or truncated file).
    Wait,
    /// Read to the end.
    Done,
    /// Skip the rest of the file and record it as done.
    Problem(FileEvent),
    /// The file is gone.
    Vanished,
    /// Another file is under its name now (or it is shorter than the offset).
    Replaced,
}

/// What (re)opening the current file came to.
enum Open {
    Ready,
    /// The gzip stream ended early while skipping to the offset.
    Blocked,
    Wait,
    Problem(FileEvent),
    Vanished,
    Replaced,
}

impl FileSource {
    /// Opens the source on `options.dir`, resuming at `position` (use `FilePosition::default()` to
    /// start from scratch).
    pub fn open(options: FileSourceOptions, position: FilePosition) -> Result<FileSource, FileSourceError> {
        if options.max_line_bytes == 0 {
            return Err(FileSourceError::Options("max_line_bytes must be at least 1".into()));
        }
        check_dir(&options.dir)?;
        let FilePosition { done, current, mut ids } = position;
        let current = match current {
            Some((name, offset)) if done.contains(&name) => {
                tracing::warn!(file = %name, offset, "the saved file-source position lists its current file as done too; treating it as done");
                None
            }
            Some((name, offset)) => {
                let mut cur = Current::new(name, offset);
                cur.id = ids.remove(&cur.name);
                Some(cur)
            }
            None => None,
        };
        ids.retain(|name, _| done.contains(name));
        Ok(FileSource {
            options,
            done,
            ids,
            current,
            queue: BTreeSet::new(),
            retry: BTreeMap::new(),
            read_errors: 0,
            dir_failures: 0,
            warned_appended: HashSet::new(),
            last_scan: None,
            idle_until: None,
            events: Vec::new(),
            events_dropped: 0,
            vanished: 0,
            warned_names: HashSet::new(),
            buffer_bytes: READ_BUFFER_BYTES,
        })
    }

    /// Reads up to `max_lines` lines, calling `on_line` for each, in order. Never waits:
    /// returns `Ok(0)` when nothing new is there. Take [`FileSource::take_events`] afterwards.
    /// Read errors are retried (see "Problems"), never returned.
    pub fn poll(&mut self, max_lines: usize, mut on_line: impl FnMut(Line<'_>)) -> Result<usize, FileSourceError> {
        if max_lines == 0 {
            return Ok(0);
        }
        if let Some(until) = self.idle_until {
            if Instant::now() < until {
                return Ok(0);
            }
            self.idle_until = None;
        }
        let mut handed = 0;
        while handed < max_lines {
            if self.current.is_none() {
                match self.start_next() {
                    Ok(true) => {}
                    Ok(false) => {
                        self.idle_until = Some(Instant::now() + self.options.rescan);
                        break;
                    }
                    Err(e) => {
                        self.dir_failed(e);
                        break;
                    }
                }
            }
            let Some(cur) = self.current.as_mut() else { break };
            if let Some(at) = cur.retry_at {
                if Instant::now() < at {
                    self.idle_until = Some(at.min(Instant::now() + self.options.rescan));
                    break;
                }
                cur.retry_at = None;
            }
            let step = match read_current(cur, &self.options, self.buffer_bytes, max_lines, &mut handed, &mut on_line) {
                Ok(step) => {
                    cur.attempts = 0;
                    step
                }
                Err(e) => {
                    cur.drop_stream();
                    self.file_failed(e);
                    continue;
                }
            };
            match step {
                Step::Limit => break,
                Step::Wait => {
                    self.idle_until = Some(Instant::now() + self.options.rescan);
                    break;
                }
                Step::Done => {
                    if let Some(cur) = self.current.take() {
                        tracing::debug!(file = %cur.name, bytes = cur.offset, "file read to the end");
                        self.finish(cur.name);
                    }
                }
                Step::Problem(event) => {
                    if let Some(cur) = self.current.take() {
                        self.finish(cur.name);
                    }
                    self.report(event);
                }
                Step::Vanished => {
                    if let Some(cur) = self.current.take() {
                        self.note_vanished(cur.name, cur.offset);
                    }
                }
                Step::Replaced => {
                    if let Some(cur) = self.current.as_mut() {
                        let event = FileEvent::Replaced {
                            file: cur.name.clone(),
                            offset: cur.offset,
                        };
                        *cur = Current::new(cur.name.clone(), 0);
                        self.report(event);
                    }
                }
            }
        }
        Ok(handed)
    }

    /// Records a file as done, with its identity as it is now.
    fn finish(&mut self, name: String) {
        match FileId::read(&self.options.dir.join(&name)) {
            Ok(id) => {
                self.ids.insert(name.clone(), id);
            }
            // Gone or unreadable: adopted from the file under that name at the next listing.
            Err(_) => {
                self.ids.remove(&name);
            }
        }
        self.done.insert(name);
    }

    /// Opening or reading the current file failed: retry it after a backoff, put it aside if it
    /// failed before its first line, or give it up after `max_read_attempts`.
    fn file_failed(&mut self, error: FileSourceError) {
        self.read_errors += 1;
        let Some(cur) = self.current.as_mut() else { return };
        cur.attempts += 1;
        let attempts = cur.attempts;
        let max = self.options.max_read_attempts.max(1);
        if attempts >= max {
            let event = FileEvent::Unreadable {
                file: cur.name.clone(),
                offset: cur.offset,
                attempts,
                detail: error.to_string(),
            };
            if let Some(cur) = self.current.take() {
                self.finish(cur.name);
            }
            self.report(event);
            return;
        }
        let wait = self.options.backoff(attempts);
        tracing::warn!(
            file = %cur.name, offset = cur.offset, attempt = attempts, of = max, error = %error,
            "file source: {error}; retrying in {wait:?} (after {max} failed attempts in a row the file is given up as a dead letter)"
        );
        let at = Instant::now() + wait;
        if cur.offset == 0 {
            // Nothing of it read: read the files after it meanwhile.
            if let Some(cur) = self.current.take() {
                self.retry.insert(cur.name, (attempts, at));
            }
        } else {
            cur.retry_at = Some(at);
        }
    }

    /// Listing the directory failed: retried after a backoff, for as long as it takes.
    fn dir_failed(&mut self, error: FileSourceError) {
        self.read_errors += 1;
        self.dir_failures = self.dir_failures.saturating_add(1);
        let wait = self.options.backoff(self.dir_failures);
        tracing::warn!(attempt = self.dir_failures, error = %error, "file source: {error}; retrying in {wait:?}");
        self.idle_until = Some(Instant::now() + wait);
    }

    /// Where the source stands against its directory, as of its last listing: caught up when no
    /// file is being read, queued or waiting for a retry and the last listing worked; failing
    /// while the directory cannot be listed or the current file cannot be read.
    pub fn progress(&self) -> crate::watermark::Progress {
        use crate::watermark::Progress;
        if self.dir_failures > 0 || self.current.as_ref().is_some_and(|c| c.attempts > 0) {
            Progress::Failing
        } else if self.last_scan.is_none() {
            Progress::Unknown
        } else if self.current.is_some() || !self.queue.is_empty() || !self.retry.is_empty() {
            Progress::Behind
        } else {
            Progress::CaughtUp
        }
    }

    /// Failed reads of files or of the directory since `open` (each retried).
    pub fn read_errors(&self) -> u64 {
        self.read_errors
    }

    /// Files listed and waiting to be read (including those waiting for a retry), as of the
    /// last listing.
    pub fn files_queued(&self) -> usize {
        self.queue.len() + self.retry.keys().filter(|n| !self.queue.contains(*n)).count()
    }

    /// The file being read and the offset of its next unread line.
    pub fn current(&self) -> Option<(&str, u64)> {
        self.current.as_ref().map(|c| (c.name.as_str(), c.offset))
    }

    /// Lists the directory now (as the next poll would), so the queue is known; a failure is
    /// returned and left for `poll` to retry.
    pub fn list(&mut self) -> Result<(), FileSourceError> {
        self.scan()?;
        self.last_scan = Some(Instant::now());
        Ok(())
    }

    /// The position after the last line handed out by `poll`.
    pub fn position(&self) -> FilePosition {
        let mut ids = self.ids.clone();
        if let Some(c) = &self.current {
            if let Some(id) = c.id {
                ids.insert(c.name.clone(), id);
            }
        }
        FilePosition {
            done: self.done.clone(),
            current: self.current.as_ref().map(|c| (c.name.clone(), c.offset)),
            ids,
        }
    }

    /// Number of files recorded as done (as in [`FilePosition::done`]).
    pub fn files_done(&self) -> usize {
        self.done.len()
    }

    /// Number of files that were deleted before they were read, since `open`.
    pub fn files_vanished(&self) -> u64 {
        self.vanished
    }

    /// File-level problems since the last call (see [`FileEvent`]); every one is also logged as a
    /// warning. At most 10 000 are kept between calls; later ones are only logged and counted in
    /// [`FileSource::events_dropped`].
    pub fn take_events(&mut self) -> Vec<FileEvent> {
        std::mem::take(&mut self.events)
    }

    /// Number of file events not kept because 10 000 were waiting to be taken.
    pub fn events_dropped(&self) -> u64 {
        self.events_dropped
    }

    fn report(&mut self, event: FileEvent) {
        tracing::warn!("{event}");
        if self.events.len() < MAX_QUEUED_EVENTS {
            self.events.push(event);
        } else {
            self.events_dropped += 1;
        }
    }

    /// The options the source runs with.
    pub fn options(&self) -> &FileSourceOptions {
        &self.options
    }

    fn note_vanished(&mut self, file: String, offset: u64) {
        self.vanished += 1;
        self.report(FileEvent::Vanished { file, offset });
    }

    /// Makes the next file current; false when there is none.
    fn start_next(&mut self) -> Result<bool, FileSourceError> {
        let now = Instant::now();
        if self.last_scan.is_none_or(|t| now.saturating_duration_since(t) >= self.options.rescan) {
            self.scan()?;
            self.last_scan = Some(now);
        }
        let ready = |name: &String| self.retry.get(name).is_none_or(|(_, at)| *at <= now);
        let Some(name) = self.queue.iter().find(|n| !self.done.contains(*n) && ready(n)).cloned() else {
            return Ok(false);
        };
        self.queue.remove(&name);
        let mut cur = Current::new(name, 0);
        if let Some((attempts, _)) = self.retry.remove(&cur.name) {
            cur.attempts = attempts;
        }
        self.current = Some(cur);
        Ok(true)
    }

    /// Lists the directory: refreshes the queue, reports queued files that vanished, and forgets
    /// done files that are gone.
    fn scan(&mut self) -> Result<(), FileSourceError> {
        let dir = &self.options.dir;
        let entries = fs::read_dir(dir).map_err(|e| dir_error(dir, e))?;
        if self.dir_failures > 0 {
            tracing::info!(dir = %dir.display(), "file source directory can be listed again");
            self.dir_failures = 0;
        }
        let mut present = BTreeSet::new();
        for entry in entries {
            let entry = entry.map_err(|source| FileSourceError::ListDir { dir: dir.clone(), source })?;
            let name = match entry.file_name().into_string() {
                Ok(name) => name,
                Err(raw) => {
                    if self.warned_names.insert(raw.clone()) {
                        tracing::warn!(dir = %dir.display(), name = ?raw, "ignoring a file whose name is not UTF-8; rename it to be read");
                    }
                    continue;
                }
            };
            let is_file = match entry.file_type() {
                Ok(t) if t.is_file() => true,
                Ok(t) if t.is_symlink() => fs::metadata(entry.path()).is_ok_and(|m| m.is_file()),
                Ok(_) => false,
                // Not knowable now (e.g. deleted meanwhile): let opening it decide.
                Err(_) => true,
            };
            if is_file {
                present.insert(name);
            }
        }
        self.done.retain(|n| present.contains(n));
        self.ids.retain(|n, _| present.contains(n));
        self.retry.retain(|n, _| present.contains(n));
        self.check_done_files();
        let current = self.current.as_ref().map(|c| c.name.as_str());
        let queue: BTreeSet<String> = present
            .iter()
            .filter(|n| self.options.wants(n) && !self.done.contains(*n) && Some(n.as_str()) != current)
            .cloned()
            .collect();
        let gone: Vec<String> = self.queue.iter().filter(|n| !present.contains(*n)).cloned().collect();
        self.queue = queue;
        for name in gone {
            self.note_vanished(name, 0);
        }
        Ok(())
    }
}

impl FileSource {
    /// Checks each done file against its identity (see "Identity"): a new file under a done
    /// name is no longer done (so it is queued); a done name without an identity adopts the
    /// file present.
    fn check_done_files(&mut self) {
        let mut renewed = Vec::new();
        for name in &self.done {
            let path = self.options.dir.join(name);
            let Ok(meta) = fs::metadata(&path) else { continue };
            let Some(id) = self.ids.get(name).copied() else {
                if let Ok(id) = FileId::read(&path) {
                    self.ids.insert(name.clone(), id);
                }
                continue;
            };
            match id.compare(&path, &meta) {
                Ok(Sameness::Same) => {}
                Ok(Sameness::Changed) => {
                    if self.warned_appended.insert(name.clone()) {
                        tracing::warn!(file = %name, "{name} changed after it was read to the end (appended to, or touched); finished files are not read again: write new lines to a new file");
                    }
                    self.ids.insert(name.clone(), id.seen(&meta));
                }
                Ok(Sameness::Other) => renewed.push(name.clone()),
                // Unreadable right now: decided at the next listing.
                Err(_) => {}
            }
        }
        for name in renewed {
            tracing::info!(file = %name, "a new file replaced {name} after it was read; reading the new one");
            self.done.remove(&name);
            self.ids.remove(&name);
            self.warned_appended.remove(&name);
        }
    }
}

fn check_dir(dir: &Path) -> Result<(), FileSourceError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(FileSourceError::NotADirectory { dir: dir.to_path_buf() }),
        Err(e) => Err(dir_error(dir, e)),
    }
}

fn dir_error(dir: &Path, e: io::Error) -> FileSourceError {
    match e.kind() {
        io::ErrorKind::NotFound => FileSourceError::DirMissing { dir: dir.to_path_buf() },
        io::ErrorKind::NotADirectory => FileSourceError::NotADirectory { dir: dir.to_path_buf() },
        _ => FileSourceError::ListDir {
            dir: dir.to_path_buf(),
            source: e,
        },
    }
}

/// Reads the current file: (re)opens it if needed, then hands out lines.
fn read_current(
    cur: &mut Current,
    options: &FileSourceOptions,
    buffer_bytes: usize,
    max_lines: usize,
    handed: &mut usize,
    on_line: &mut impl FnMut(Line<'_>),
) -> Result<Step, FileSourceError> {
    // A blocked gzip file is reopened at most once per poll: it re-decompresses its prefix.
    let mut may_reopen = true;
    loop {
        if cur.stream.is_none() {
            let reopening = cur.blocked;
            match open_stream(cur, options, buffer_bytes, may_reopen)? {
                Open::Ready => {}
                Open::Blocked => {
                    may_reopen = may_reopen && !reopening;
                    continue;
                }
                Open::Wait => return Ok(Step::Wait),
                Open::Problem(event) => return Ok(Step::Problem(event)),
                Open::Vanished => return Ok(Step::Vanished),
                Open::Replaced => return Ok(Step::Replaced),
            }
            may_reopen = may_reopen && !reopening;
        }
        match pump(cur, options, max_lines, handed, on_line)? {
            Some(step) => return Ok(step),
            // The gzip stream ended early: see whether the file changed.
            None => continue,
        }
    }
}

/// Opens the current file at its offset.
fn open_stream(cur: &mut Current, options: &FileSourceOptions, buffer_bytes: usize, may_reopen: bool) -> Result<Open, FileSourceError> {
    let path = options.dir.join(&cur.name);
    let read_error = |source: io::Error| FileSourceError::Read { path: path.clone(), source };
    let now = Instant::now();
    if cur.blocked {
        let stamp = match fs::metadata(&path) {
            Ok(meta) => Stamp::of(&meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Open::Vanished),
            Err(e) => return Err(read_error(e)),
        };
        if let Some(watch) = cur.watch.filter(|w| w.stamp == stamp) {
            if watch.settled(options.settle, now) {
                return Ok(Open::Problem(FileEvent::Truncated {
                    file: cur.name.clone(),
                    offset: cur.offset,
                }));
            }
            return Ok(Open::Wait);
        }
        if !may_reopen {
            return Ok(Open::Wait);
        }
    }
    let mut file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Open::Vanished),
        Err(e) => return Err(read_error(e)),
    };
    let meta = file.metadata().map_err(read_error)?;
    let stamp = Stamp::of(&meta);
    match cur.id {
        None => cur.id = Some(FileId::of(&mut file, &meta).map_err(read_error)?),
        Some(id) => {
            if id.compare_head(&mut file, &meta).map_err(read_error)? == Sameness::Other {
                return Ok(Open::Replaced);
            }
        }
    }
    file.seek(SeekFrom::Start(0)).map_err(read_error)?;
    let gzip = match cur.gzip {
        Some(gzip) => gzip,
        None => {
            let gzip = cur.name.ends_with(".gz") || starts_with_gzip_magic(&mut file).map_err(read_error)?;
            file.seek(SeekFrom::Start(0)).map_err(read_error)?;
            cur.gzip = Some(gzip);
            gzip
        }
    };
    cur.clear_pending();
    cur.blocked = false;
    if !gzip {
        if stamp.len < cur.offset {
            return Ok(Open::Replaced);
        }
        file.seek(SeekFrom::Start(cur.offset)).map_err(read_error)?;
        cur.watch = None;
        cur.stream = Some(Stream::Plain(BufReader::with_capacity(buffer_bytes, file)));
        return Ok(Open::Ready);
    }
    cur.watch = Some(Watch { stamp, since: now });
    let mut reader = BufReader::with_capacity(buffer_bytes, MultiGzDecoder::new(file));
    let mut left = cur.offset;
    while left > 0 {
        let available = match reader.fill_buf() {
            Ok(buf) => buf.len(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                cur.blocked = true;
                return Ok(Open::Blocked);
            }
            Err(e) => {
                return Ok(Open::Problem(FileEvent::Corrupt {
                    file: cur.name.clone(),
                    offset: cur.offset,
                    detail: e.to_string(),
                }))
            }
        };
        if available == 0 {
            return Ok(Open::Replaced);
        }
        let n = usize::try_from(left).map_or(available, |left| left.min(available));
        reader.consume(n);
        left -= n as u64;
    }
    cur.stream = Some(Stream::Gzip(Box::new(reader)));
    Ok(Open::Ready)
}

fn starts_with_gzip_magic(file: &mut File) -> io::Result<bool> {
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < magic.len() {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got == 2 && magic == [0x1f, 0x8b])
}

/// Hands out lines from the open stream. `None`: the gzip stream ended early (the stream was
/// dropped and the file marked blocked).
fn pump(
    cur: &mut Current,
    options: &FileSourceOptions,
    max_lines: usize,
    handed: &mut usize,
    on_line: &mut impl FnMut(Line<'_>),
) -> Result<Option<Step>, FileSourceError> {
    let max_line = options.max_line_bytes;
    let gzip = cur.gzip == Some(true);
    let Current {
        name,
        offset,
        stream,
        blocked,
        pending,
        pending_len,
        watch,
        ..
    } = cur;
    let Some(reader) = stream.as_mut() else { return Ok(None) };
    // Whether the file was seen longer than what was read, and read again.
    let mut rechecked = false;
    loop {
        if *handed >= max_lines {
            return Ok(Some(Step::Limit));
        }
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if gzip && e.kind() == io::ErrorKind::UnexpectedEof => {
                *stream = None;
                *blocked = true;
                pending.clear();
                *pending_len = 0;
                return Ok(None);
            }
            Err(e) if gzip => {
                return Ok(Some(Step::Problem(FileEvent::Corrupt {
                    file: name.clone(),
                    offset: *offset,
                    detail: e.to_string(),
                })));
            }
            Err(source) => {
                return Err(FileSourceError::Read {
                    path: options.dir.join(name.as_str()),
                    source,
                })
            }
        };
        if buf.is_empty() {
            if !gzip {
                let Stream::Plain(plain) = &*reader else { return Ok(Some(Step::Wait)) };
                let meta = plain.get_ref().metadata().map_err(|source| FileSourceError::Read {
                    path: options.dir.join(name.as_str()),
                    source,
                })?;
                let stamp = Stamp::of(&meta);
                let consumed = *offset + *pending_len;
                if stamp.len > consumed {
                    // Written meanwhile: read again (once; a file that claims more than it
                    // yields is waited for).
                    if !rechecked {
                        rechecked = true;
                        continue;
                    }
                    return Ok(Some(Step::Wait));
                }
                if stamp.len < consumed {
                    let detail = format!(
                        "it shrank to {} bytes while being read at byte {consumed}: it was truncated or rewritten in place (writers should write elsewhere and rename)",
                        stamp.len
                    );
                    return Ok(Some(Step::Problem(FileEvent::Corrupt {
                        file: name.clone(),
                        offset: *offset,
                        detail,
                    })));
                }
                let now = Instant::now();
                let seen = match watch {
                    Some(w) if w.stamp == stamp => *w,
                    _ => *watch.insert(Watch { stamp, since: now }),
                };
                if !seen.settled(options.settle, now) {
                    return Ok(Some(Step::Wait));
                }
            }
            // The end: a gzip trailer was read, or a plain file settled.
            if *pending_len > 0 {
                emit(on_line, name, *offset, pending, *pending_len, max_line, handed);
                *offset += *pending_len;
            }
            return Ok(Some(Step::Done));
        }
        rechecked = false;
        match find_newline(buf) {
            Some(i) => {
                let len = *pending_len + i as u64;
                if *pending_len == 0 {
                    emit(on_line, name, *offset, &buf[..i], len, max_line, handed);
                } else {
                    keep(pending, &buf[..i], max_line);
                    emit(on_line, name, *offset, pending, len, max_line, handed);
                    pending.clear();
                    *pending_len = 0;
                }
                *offset += len + 1;
                reader.consume(i + 1);
            }
            None => {
                let n = buf.len();
                keep(pending, buf, max_line);
                *pending_len += n as u64;
                reader.consume(n);
            }
        }
    }
}

/// Appends to the pending line, keeping at most `max` bytes.
fn keep(pending: &mut Vec<u8>, bytes: &[u8], max: usize) {
    let room = max.saturating_sub(pending.len());
    pending.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

/// Hands out one line: `kept` holds its first bytes (all of them unless it is too long), `len`
/// its full length without the `\n`. Whitespace-only lines are skipped.
fn emit(on_line: &mut impl FnMut(Line<'_>), file: &str, offset: u64, kept: &[u8], len: u64, max: usize, handed: &mut usize) {
    let (bytes, problem) = if len > max as u64 {
        (
            &kept[..kept.len().min(max)],
            Some(LineProblem::TooLong {
                len: usize::try_from(len).unwrap_or(usize::MAX),
            }),
        )
    } else {
        let mut bytes = kept;
        if let [rest @ .., b'\r'] = bytes {
            bytes = rest;
        }
        if offset == 0 {
            bytes = bytes.strip_prefix(UTF8_BOM).unwrap_or(bytes);
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        (bytes, std::str::from_utf8(bytes).is_err().then_some(LineProblem::InvalidUtf8))
    };
    on_line(Line { file, offset, bytes, problem });
    *handed += 1;
}

/// Index of the first `\n`, eight bytes at a time.
fn find_newline(hay: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    const NEWLINES: u64 = u64::from_ne_bytes([b'\n'; 8]);
    let mut chunks = hay.chunks_exact(8);
    let mut base = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word) ^ NEWLINES;
        // The lowest set high bit marks the first zero byte (higher ones may be false).
        let zeros = x.wrapping_sub(ONES) & !x & HIGHS;
        if zeros != 0 {
            return Some(base + (zeros.trailing_zeros() / 8) as usize);
        }
        base += 8;
    }
    chunks.remainder().iter().position(|&b| b == b'\n').map(|i| base + i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use proptest::prelude::*;
    use std::io::Write;

    type Got = (String, u64, Vec<u8>, Option<LineProblem>);

    fn opts(dir: &Path, settle_ms: u64) -> FileSourceOptions {
        FileSourceOptions {
            settle: Duration::from_millis(settle_ms),
            rescan: Duration::ZERO,
            ..FileSourceOptions::new(dir)
        }
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) {
        fs::write(dir.join(name), bytes).unwrap();
    }

    fn append(dir: &Path, name: &str, bytes: &[u8]) {
        fs::OpenOptions::new().append(true).open(dir.join(name)).unwrap().write_all(bytes).unwrap();
    }

    /// Makes a file look written an hour ago, so it counts as settled at once.
    fn age(dir: &Path, name: &str) {
        let f = fs::OpenOptions::new().write(true).open(dir.join(name)).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(3600)).unwrap();
    }

    fn poll(src: &mut FileSource, max: usize, out: &mut Vec<Got>) -> usize {
        src.poll(max, |l| out.push((l.file.to_string(), l.offset, l.bytes.to_vec(), l.problem)))
            .unwrap()
    }

    /// Polls until `until` holds (or 3 s pass).
    fn poll_until(src: &mut FileSource, out: &mut Vec<Got>, until: impl Fn(&FileSource, &[Got]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while !until(src, out) {
            assert!(Instant::now() < deadline, "timed out; got {out:?}, position {:?}", src.position());
            if poll(src, 1000, out) == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    fn texts(out: &[Got]) -> Vec<String> {
        out.iter().map(|g| String::from_utf8_lossy(&g.2).into_owned()).collect()
    }

    #[test]
    fn reads_existing_plain_and_gzip_files_in_name_order_with_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "b.jsonl.gz", &gz(b"{\"b\":1}\n{\"b\":2}\n"));
        write(d, "a.jsonl", b"{\"a\":1}\n{\"a\":22}\n");
        write(d, "c.json", b"{\"c\":1}\r\n");
        // gzip detected by its magic despite the plain name; two members.
        let mut two = gz(b"{\"d\":1}\n");
        two.extend(gz(b"{\"d\":2}\n"));
        write(d, "d.ndjson", &two);
        for name in ["a.jsonl", "b.jsonl.gz", "c.json", "d.ndjson"] {
            age(d, name);
        }
        let mut src = FileSource::open(
            FileSourceOptions {
                rescan: Duration::ZERO,
                ..FileSourceOptions::new(d)
            },
            FilePosition::default(),
        )
        .unwrap();
        let mut out = Vec::new();
        assert_eq!(poll(&mut src, 100, &mut out), 7);
        let got: Vec<(&str, u64, String)> = out.iter().map(|g| (g.0.as_str(), g.1, String::from_utf8_lossy(&g.2).into_owned())).collect();
        let want = vec![
            ("a.jsonl", 0, "{\"a\":1}"),
            ("a.jsonl", 8, "{\"a\":22}"),
            ("b.jsonl.gz", 0, "{\"b\":1}"),
            ("b.jsonl.gz", 8, "{\"b\":2}"),
            ("c.json", 0, "{\"c\":1}"),
            ("d.ndjson", 0, "{\"d\":1}"),
            ("d.ndjson", 8, "{\"d\":2}"),
        ];
        let want: Vec<(&str, u64, String)> = want.into_iter().map(|(f, o, s)| (f, o, s.to_string())).collect();
        assert_eq!(got, want);
        assert!(out.iter().all(|g| g.3.is_none()));
        assert_eq!(src.files_done(), 4);
        assert_eq!(src.position().current, None);
        assert!(src.take_events().is_empty());
    }

    #[test]
    fn picks_up_a_file_created_after_open_even_if_it_sorts_first() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "m.jsonl", b"{\"m\":1}\n");
        let mut src = FileSource::open(opts(d, 0), FilePosition::default()).unwrap();
        let mut out = Vec::new();
        poll_until(&mut src, &mut out, |s, _| s.files_done() == 1);
        assert_eq!(poll(&mut src, 10, &mut out), 0);
        write(d, "a.jsonl", b"{\"a\":1}\n");
        write(d, "z.jsonl.tmp", b"{\"tmp\":1}\n");
        poll_until(&mut src, &mut out, |s, _| s.files_done() == 2);
        assert_eq!(texts(&out), ["{\"m\":1}", "{\"a\":1}"]);
        assert_eq!(src.position().done, BTreeSet::from(["a.jsonl".to_string(), "m.jsonl".to_string()]));
    }

    #[test]
    fn partial_last_line_is_held_until_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "f.jsonl", b"a\nb");
        let mut src = FileSource::open(opts(d, 60_000), FilePosition::default()).unwrap();
        let mut out = Vec::new();
        assert_eq!(poll(&mut src, 10, &mut out), 1);
        assert_eq!(poll(&mut src, 10, &mut out), 0);
        assert_eq!(texts(&out), ["a"]);
        assert_eq!(src.position().current, Some(("f.jsonl".into(), 2)));
        append(d, "f.jsonl", b"\nc\n");
        assert_eq!(poll(&mut src, 10, &mut out), 2);
        assert_eq!(texts(&out), ["a", "b", "c"]);
        assert_eq!(out[1].1, 2);
        assert_eq!(out[2].1, 4);
        // Not settled: the file stays current.
        assert_eq!(src.position().current, Some(("f.jsonl".into(), 6)));
        assert_eq!(src.files_done(), 0);
    }

    #[test]
    fn resuming_inside_a_held_partial_line_rereads_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "f.jsonl", b"one\ntw");
        let mut src = FileSource::open(opts(d, 60_000), FilePosition::default()).unwrap();
        let mut out = Vec::new();
        poll(&mut src, 10, &mut out);
        let pos = src.position();
        drop(src);
        append(d, "f.jsonl", b"o\n");
        let mut src = FileSource::open(opts(d, 60_000), pos).unwrap();
        poll(&mut src, 10, &mut out);
        assert_eq!(texts(&out), ["one", "two"]);
        assert_eq!(out[1].1, 4);
    }

    #[test]
    fn unterminated_last_line_is_taken_after_settle_and_the_file_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "f.jsonl", b"x\ny");
        write(d, "g.jsonl", b"z\n");
        let mut src = FileSource::open(opts(d, 50), FilePosition::default()).unwrap();
        let mut out = Vec::new();
        let start = Instant::now();
        poll_until(&mut src, &mut out, |s, _| s.files_done() == 2);
        assert!(start.elapsed() >= Duration::from_millis(40), "settled too early");
        assert_eq!(texts(&out), ["x", "y", "z"]);
        assert_eq!(out[1].1, 2);
        assert_eq!(src.position().current, None);
    }

    #[test]
    fn a_growing_plain_file_holds_the_next_file_until_it_settles() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "a.jsonl", b"1\n");
        write(d, "b.jsonl", b"2\n");
        age(d, "b.jsonl");
        let mut src = FileSource::open(opts(d, 60_000), FilePosition::default()).unwrap();
        let mut out = Vec::new();
        for _ in 0..3 {
            poll(&mut src, 10, &mut out);
        }
        assert_eq!(texts(&out), ["1"]);
        append(d, "a.jsonl", b"3\n");
        age(d, "a.jsonl");
        poll_until(&mut src, &mut out, |s, _| s.files_done() == 2);
        assert_eq!(texts(&out), ["1", "3", "2"]);
    }

    #[test]
    fn truncated_gzip_yields_only_complete_lines_then_the_rest_once_complete() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let lines: Vec<String> = (0..2000).map(|i| format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(i % 17))).collect();
        let text = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        e.write_all(text.as_bytes()).unwrap();
        let whole = e.finish().unwrap();
        let half = whole.len() / 2;
        write(d, "t.jsonl.gz", &whole[..half]);
        let mut src = FileSource::open(opts(d, 60_000), FilePosition::default()).unwrap();
        let mut out = Vec::new();
        for _ in 0..3 {
            poll(&mut src, 100_000, &mut out);
        }
        let first = texts(&out);
        assert!(!first.is_empty() && first.len() < lines.len(), "{} of {} lines", first.len(), lines.len());
        assert_eq!(first[..], lines[..first.len()], "only complete lines, in order");
        assert_eq!(src.files_done(), 0);
        let (file, offset) = src.position().current.unwrap();
        assert_eq!(file, "t.jsonl.gz");
        assert_eq!(offset, first.iter().map(|l| l.len() as u64 + 1).sum::<u64>());
        append(d, "t.jsonl.gz", &whole[half..]);
        poll_until(&mut src, &mut out, |s, _| s.files_done() == 1);
        assert_eq!(texts(&out), lines);
        assert!(src.take_events().is_empty());
    }

    #[test]
    fn truncated_gzip_that_stops_changing_is_reported_after_settle() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let whole = gz(b"{\"a\":1}\n{\"a\":2}\n");
        write(d, "t.json.gz", &whole[..whole.len() - 4]);
        write(d, "u.json", b"{\"u\":1}\n");
        let mut src = FileSource::open(opts(d, 30), FilePosition::default()).unwrap();
        let mut out = Vec::new();
        poll_until(&mut src, &mut out, |s, _| s.files_done() == 2);
        // The deflate data is complete, only the trailer is missing: both lines were decoded.
        assert_eq!(texts(&out), ["{\"a\":1}", "{\"a\":2}", "{\"u\":1}"]);
        assert_eq!(
            src.take_events(),
            vec![FileEvent::Truncated {
                file: "t.json.gz".into(),
                offset: 16
            }]
        );
    }

    #[test]
    fn corrupt_gzip_is_reported_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "a.jsonl", b"{\"a\":1}\n");
        let mut bad_crc = gz(b"{\"b\":1}\n");
        let n = bad_crc.len();
        bad_crc[n - 8] ^= 0xff;
        write(d, "b.jsonl.gz", &bad_crc);
        write(d, "c.jsonl.gz", b"this is not gzip\n");
        write(d, "d.jsonl", b"{\"d\":1}\n");
        for name in ["a.jsonl", "b.jsonl.gz", "c.jsonl.gz", "d.jsonl"] {
            age(d, name);
        }
        let mut src = FileSource::open(opts(d, 5_000), FilePosition::default()).unwrap();
        let mut out = Vec::new();
        poll_until(&mut src, &mut out, |s, _| s.files_done() == 4);
        // The corrupt member's lines come before its CRC is checked: they are handed out.
        assert_eq!(texts(&out), ["{\"a\":1}", "{\"b\":1}", "{\"d\":1}"]);
        let events = src.take_events();
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(
            matches!(&events[0], FileEvent::Corrupt { file, offset: 8, .. } if file == "b.jsonl.gz"),
            "{events:?}"
        );
        assert!(
            matches!(&events[1], FileEvent::Corrupt { file, offset: 0, detail } if file == "c.jsonl.gz" && detail.contains("header")),
            "{events:?}"
        );
        assert!(events[1].to_string().contains("c.jsonl.gz"));
        assert_eq!(src.events_dropped(), 0);
    }

    #[test]
    fn too_long_and_invalid_utf8_lines_are_flagged_and_empty_lines_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let long = "y".repeat(25);
        let text = format!("\n  \r\n{{}}\n\t\n{long}\n\u{FEFF}\n");
        let mut bytes = text.into_bytes();
        bytes.extend_from_slice(b"\xff\xfe\n{\"ok\":1}\n\n");
        write(d, "f.jsonl", &bytes);
        age(d, "f.jsonl");
        let mut src = FileSource::open(
            FileSourceOptions {
                max_line_bytes: 10,
                ..opts(d, 50)
            },
            FilePosition::default(),
        )
        .unwrap();
        src.buffer_bytes = 7; // lines cross buffer ends
        let mut out = Vec::new();
        poll_until(&mut src, &mut out, |s, _| s.files_done() == 1);
        let want: Vec<Got> = vec![
            ("f.jsonl".into(), 5, b"{}".to_vec(), None),
            ("f.jsonl".into(), 10, b"yyyyyyyyyy".to_vec(), Some(LineProblem::TooLong { len: 25 })),
            // A BOM only counts at the start of the file.
            ("f.jsonl".into(), 36, b"\xEF\xBB\xBF".to_vec(), None),
            ("f.jsonl".into(), 40, b"\xff\xfe".to_vec(), Some(LineProblem::InvalidUtf8)),
            ("f.jsonl".into(), 43, b"{\"ok\":1}".to_vec(), None),
        ];
        assert_eq!(out, want);
        assert!(LineProblem::TooLong { len: 25 }.to_string().contains("25 bytes"));
    }

    #[test]
    fn bom_at_file_start_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "f.jsonl", b"\xEF\xBB\xBF{\"a\":1}\n");
        let mut src = FileSource::open(opts(d, 60_000), FilePosition::default()).unwrap();
        let mut out = Vec::new();
        poll(&mut src, 10, &mut out);
        assert_eq!(out, vec![("f.jsonl".to_string(), 0, b"{\"a\":1}".to_vec(), None)]);
    }

    #[test]
    fn hidden_temporary_and_unsuffixed_files_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for name in [".hidden.jsonl", "x.jsonl.tmp", "x.jsonl.partial", "notes.txt", "y.jsonl.gz.tmp"] {
            write(d, name, b"{\"no\":1}\n");
        }
        fs::create_dir(d.join("sub.jsonl")).unwrap();
        write(d, "ok.jsonl", b"{\"yes\":1}\n");
        let mut src = FileSource::open(opts(d, 0), FilePosition::default()).unwrap();
        let mut out = Vec::new();
        poll_until(&mut src, &mut out, |s, _| s.files_done() == 1);
        for _ in 0..3 {
            assert_eq!(poll(&mut src, 10, &mut out), 0);
        }
        assert_eq!(texts(&out), ["{\"yes\":1}"]);
        assert!(src.take_events().is_empty());
    }

    #[test]
    fn a_file_deleted_before_it_is_read_is_counted_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "a.jsonl", b"1\n2\n");
        write(d, "b.jsonl", b"3\n");
        write(d, "c.jsonl", b"4\n");
        let mut src = FileSource::open(opts(d, 0), FilePosition::default()).unwrap();
        let mut out = Vec::new();
        assert_eq!(poll(&mut src, 1, &mut out), 1);
        fs::remove_file(d.join("b.jsonl")).unwrap();
        poll_until(&mut src, &mut out, |s, _| s.files_done() == 2);
        assert_eq!(texts(&out), ["1", "2", "4"]);
        assert_eq!(src.files_vanished(), 1);
        assert_eq!(
            src.take_events(),
            vec![FileEvent::Vanished {
                file: "b.jsonl".into(),
                offset: 0
            }]
        );
    }

    #[test]
    fn a_vanished_resume_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let pos = FilePosition {
            current: Some(("gone.jsonl".into(), 10)),
            ..FilePosition::default()
        };
        let mut src = FileSource::open(opts(dir.path(), 0), pos).unwrap();
        let mut out = Vec::new();
        assert_eq!(poll(&mut src, 10, &mut out), 0);
        assert_eq!(src.files_vanished(), 1);
        assert_eq!(
            src.take_events(),
            vec![FileEvent::Vanished {
                file: "gone.jsonl".into(),
                offset: 10
            }]
        );
        assert_eq!(src.position(), FilePosition::default());
    }

    #[test]
    fn done_files_deleted_from_the_directory_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "a.jsonl", b"1\n");
        let mut src = FileSource::open(opts(d, 0), FilePosition::default()).unwrap();
        let mut out = Vec::new();
        poll_until(&mut src, &mut out, |s, _| s.files_done() == 1);
        fs::remove_file(d.join("a.jsonl")).unwrap();
        poll(&mut src, 10, &mut out);
        assert_eq!(src.position(), FilePosition::default());
        assert_eq!(src.files_vanished(), 0);
    }

    #[test]
    fn missing_directory_error_names_it_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("drop");
        let err = FileSource::open(FileSourceOptions::new(&missing), FilePosition::default()).err().unwrap();
        let msg = err.to_string();
        assert!(matches!(err, FileSourceError::DirMissing { .. }));
        assert!(
            msg.contains(&missing.display().to_string()) && msg.contains("create it") && msg.contains("`path`"),
            "{msg}"
        );
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(matches!(
            FileSource::open(FileSourceOptions::new(&file), FilePosition::default()),
            Err(FileSourceError::NotADirectory { .. })
        ));
    }

    #[test]
    fn a_file_shorter_than_the_position_is_read_again_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "a.jsonl", b"1\n");
        write(d, "b.jsonl.gz", &gz(b"2\n"));
        for (name, offset, line) in [("a.jsonl", 3, "1"), ("b.jsonl.gz", 5, "2")] {
            age(d, name);
            let pos = FilePosition {
                current: Some((name.into(), offset)),
                ..FilePosition::default()
            };
            let mut src = FileSource::open(opts(d, 0), pos).unwrap();
            let mut out = Vec::new();
            poll_until(&mut src, &mut out, |s, _| s.files_done() == 2);
            assert!(texts(&out).contains(&line.to_string()), "{name}: {out:?}");
            let events = src.take_events();
            assert_eq!(events, vec![FileEvent::Replaced { file: name.into(), offset }]);
            assert!(events[0].to_string().contains("replaced"), "{}", events[0]);
        }
    }

    #[test]
    fn a_finished_file_replaced_under_the_same_name_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "app.jsonl", b"{\"gen\":1}\n");
        age(d, "app.jsonl");
        let mut src = FileSource::open(opts(d, 0), FilePosition::default()).unwrap();
        let mut out = Vec::new();
        poll_until(&mut src, &mut out, |s, _| s.files_done() == 1);
        // The position survives a restart with the identity.
        let pos = src.position();
        assert!(pos.ids.contains_key("app.jsonl"), "{pos:?}");
        let mut src = FileSource::open(opts(d, 0), serde_json::from_str(&serde_json::to_string(&pos).unwrap()).unwrap()).unwrap();
        for _ in 0..3 {
            assert_eq!(poll(&mut src, 10, &mut out), 0, "a finished file is not read twice");
        }
        // Rotation: a new file renamed onto the finished name (a new inode).
        write(d, ".incoming", b"{\"gen\":2}\n{\"gen\":2}\n");
        fs::rename(d.join(".incoming"), d.join("app.jsonl")).unwrap();
        age(d, "app.jsonl");
        poll_until(&mut src, &mut out, |_, out| out.len() == 3);
        // Rewritten in place (same inode, other bytes), as `cp new app.jsonl` does.
        let ino = fs::metadata(d.join("app.jsonl")).unwrap().ino();
        fs::write(d.join("app.jsonl"), b"{\"gen\":3}\n").unwrap();
        assert_eq!(fs::metadata(d.join("app.jsonl")).unwrap().ino(), ino);
        age(d, "app.jsonl");
        poll_until(&mut src, &mut out, |_, out| out.len() == 4);
        // Appended to after it was read: the same file; appended lines are not read (logged).
        append(d, "app.jsonl", b"{\"gen\":4}\n");
        age(d, "app.jsonl");
        for _ in 0..5 {
            poll(&mut src, 10, &mut out);
        }
        assert_eq!(texts(&out), ["{\"gen\":1}", "{\"gen\":2}", "{\"gen\":2}", "{\"gen\":3}"]);
        assert!(src.take_events().is_empty());
        assert_eq!(src.files_done(), 1);
    }

    #[test]
    fn positions_written_without_identities_still_restore() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "a.jsonl", b"1\n");
        write(d, "b.jsonl", b"2\n3\n");
        write(d, "c.jsonl", b"4\n");
        for name in ["a.jsonl", "b.jsonl", "c.jsonl"] {
            age(d, name);
        }
        // As stored before identities were kept.
        let old = r#"{"done":["a.jsonl"],"current":["b.jsonl",2]}"#;
        let pos: FilePosition = serde_json::from_str(old).unwrap();
        assert!(pos.ids.is_empty());
        let mut src = FileSource::open(opts(d, 0), pos).unwrap();
        let mut out = Vec::new();
        poll_until(&mut src, &mut out, |s, _| s.files_done() == 3);
        assert_eq!(texts(&out), ["3", "4"]);
        assert!(src.take_events().is_empty());
        // The files present were adopted: replacing one now is noticed.
        assert_eq!(src.position().ids.len(), 3);
        fs::remove_file(d.join("a.jsonl")).unwrap();
        write(d, "a.jsonl", b"5\n6\n");
        age(d, "a.jsonl");
        poll_until(&mut src, &mut out, |_, out| out.len() == 4);
        assert_eq!(texts(&out), ["3", "4", "5", "6"]);
    }

    #[test]
    fn position_round_trips_through_json() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.jsonl", b"1\n");
        let id = FileId::read(&dir.path().join("a.jsonl")).unwrap();
        let pos = FilePosition {
            done: BTreeSet::from(["a.jsonl".to_string()]),
            current: Some(("b.jsonl.gz".into(), 42)),
            ids: BTreeMap::from([("a.jsonl".to_string(), id)]),
        };
        let json = serde_json::to_string(&pos).unwrap();
        assert_eq!(serde_json::from_str::<FilePosition>(&json).unwrap(), pos);
        // Without identities the JSON is what older versions wrote and read.
        let bare = FilePosition { ids: BTreeMap::new(), ..pos };
        assert_eq!(serde_json::to_string(&bare).unwrap(), r#"{"done":["a.jsonl"],"current":["b.jsonl.gz",42]}"#);
    }

    /// A path whose reads fail with an I/O error, even for root: this process's own memory at
    /// address 0 (`/proc/self/mem` answers EIO there).
    fn unreadable(dir: &Path, name: &str) {
        std::os::unix::fs::symlink("/proc/self/mem", dir.join(name)).unwrap();
        assert!(
            File::open(dir.join(name)).unwrap().read(&mut [0u8; 16]).is_err(),
            "reading /proc/self/mem at 0 fails"
        );
    }

    #[test]
    fn an_unreadable_file_is_retried_with_backoff_then_given_up_while_the_others_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        unreadable(d, "a.jsonl");
        write(d, "b.jsonl", b"{\"b\":1}\n");
        age(d, "b.jsonl");
        let options = FileSourceOptions {
            retry_backoff: Duration::from_millis(20),
            max_retry_backoff: Duration::from_millis(80),
            max_read_attempts: 4,
            ..opts(d, 0)
        };
        assert_eq!(options.backoff(1), Duration::from_millis(20));
        assert_eq!(options.backoff(2), Duration::from_millis(40));
        assert_eq!(options.backoff(9), Duration::from_millis(80));
        let mut src = FileSource::open(options, FilePosition::default()).unwrap();
        let mut out = Vec::new();
        // b is read while a waits for its retry; nothing stops the source.
        poll_until(&mut src, &mut out, |s, _| s.files_done() == 1);
        assert_eq!(texts(&out), ["{\"b\":1}"]);
        assert!(src.read_errors() >= 1);
        assert_eq!(src.progress(), crate::watermark::Progress::Behind, "a is still to be read");
        let started = Instant::now();
        poll_until(&mut src, &mut out, |s, _| s.files_done() == 2);
        assert!(started.elapsed() >= Duration::from_millis(60), "retries wait: {:?}", started.elapsed());
        assert_eq!(src.read_errors(), 4);
        let events = src.take_events();
        assert!(
            matches!(&events[..], [FileEvent::Unreadable { file, offset: 0, attempts: 4, .. }] if file == "a.jsonl"),
            "{events:?}"
        );
        assert!(
            events[0].to_string().contains("a.jsonl") && events[0].to_string().contains("new name"),
            "{}",
            events[0]
        );
        assert_eq!(src.progress(), crate::watermark::Progress::CaughtUp);
        assert_eq!(src.position().done, BTreeSet::from(["a.jsonl".to_string(), "b.jsonl".to_string()]));
    }

    #[test]
    fn a_directory_that_cannot_be_listed_is_retried_and_the_source_says_it_is_failing() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = dir.path().join("inbox");
        fs::create_dir(&inbox).unwrap();
        let options = FileSourceOptions {
            retry_backoff: Duration::from_millis(10),
            max_retry_backoff: Duration::from_millis(20),
            ..opts(&inbox, 0)
        };
        let mut src = FileSource::open(options, FilePosition::default()).unwrap();
        let mut out = Vec::new();
        assert_eq!(poll(&mut src, 10, &mut out), 0);
        assert_eq!(src.progress(), crate::watermark::Progress::CaughtUp);
        fs::remove_dir(&inbox).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(poll(&mut src, 10, &mut out), 0, "a missing directory is not an error of poll");
        assert_eq!(src.progress(), crate::watermark::Progress::Failing);
        assert!(src.read_errors() >= 1);
        fs::create_dir(&inbox).unwrap();
        write(&inbox, "a.jsonl", b"1\n");
        age(&inbox, "a.jsonl");
        poll_until(&mut src, &mut out, |s, _| s.files_done() == 1);
        assert_eq!(texts(&out), ["1"]);
        assert_eq!(src.progress(), crate::watermark::Progress::CaughtUp);
    }

    #[test]
    fn the_source_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<FileSource>();
    }

    #[derive(Debug, Clone)]
    struct Case {
        /// Lines of each file; (gzip, members) per file.
        files: Vec<(Vec<String>, bool, usize)>,
        /// Whether a plain file's last line lacks its '\n'.
        unterminated: Vec<bool>,
        chunks: Vec<usize>,
        stop_after: usize,
        buffer: usize,
    }

    fn line() -> impl Strategy<Value = String> {
        prop_oneof![
            8 => "[a-z0-9{}\":, ]{1,40}".prop_map(|s| format!("{{\"v\":\"{s}\"}}")),
            1 => Just(String::new()),
            1 => Just("   ".to_string()),
        ]
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            prop::collection::vec((prop::collection::vec(line(), 0..30), any::<bool>(), 1usize..4), 1..6),
            prop::collection::vec(any::<bool>(), 6),
            prop::collection::vec(1usize..12, 1..40),
            0usize..40,
            prop_oneof![Just(1usize), 2usize..64, Just(READ_BUFFER_BYTES)],
        )
            .prop_map(|(files, unterminated, chunks, stop_after, buffer)| Case {
                files,
                unterminated,
                chunks,
                stop_after,
                buffer,
            })
    }

    fn encode(lines: &[String], gzip: bool, members: usize, unterminated: bool) -> Vec<u8> {
        let mut text = lines.iter().map(|l| format!("{l}\n")).collect::<String>().into_bytes();
        if unterminated && !gzip && text.last() == Some(&b'\n') {
            text.pop();
        }
        if !gzip {
            return text;
        }
        let step = text.len().div_ceil(members).max(1);
        let mut out = Vec::new();
        for part in text.chunks(step) {
            out.extend(gz(part));
        }
        if out.is_empty() {
            out = gz(b"");
        }
        out
    }

    fn expected(case: &Case) -> Vec<(String, u64, String)> {
        let mut want = Vec::new();
        for (i, (lines, _, _)) in case.files.iter().enumerate() {
            let mut offset = 0u64;
            for l in lines {
                if !l.trim().is_empty() {
                    want.push((file_name(case, i), offset, l.clone()));
                }
                offset += l.len() as u64 + 1;
            }
        }
        want
    }

    fn file_name(case: &Case, i: usize) -> String {
        format!("f{i:02}.{}", if case.files[i].1 { "jsonl.gz" } else { "jsonl" })
    }

    fn read_some(src: &mut FileSource, case: &Case, polls: usize, out: &mut Vec<(String, u64, String)>) {
        for k in 0..polls {
            let max = case.chunks[k % case.chunks.len()];
            let n = src
                .poll(max, |l| out.push((l.file.to_string(), l.offset, String::from_utf8(l.bytes.to_vec()).unwrap())))
                .unwrap();
            assert!(n <= max);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn resuming_from_a_serialized_position_reads_every_line_exactly_once(case in case()) {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            for (i, (lines, gzip, members)) in case.files.iter().enumerate() {
                write(d, &file_name(&case, i), &encode(lines, *gzip, *members, case.unterminated[i]));
            }
            let mut out = Vec::new();
            let mut src = FileSource::open(opts(d, 0), FilePosition::default()).unwrap();
            src.buffer_bytes = case.buffer;
            read_some(&mut src, &case, case.stop_after, &mut out);
            let json = serde_json::to_string(&src.position()).unwrap();
            drop(src);
            let mut src = FileSource::open(opts(d, 0), serde_json::from_str(&json).unwrap()).unwrap();
            src.buffer_bytes = case.buffer;
            loop {
                let before = out.len();
                read_some(&mut src, &case, 1, &mut out);
                if out.len() == before && src.poll(usize::MAX, |_| panic!("lines after a zero poll")).unwrap() == 0 && src.position().current.is_none() {
                    break;
                }
            }
            // Lines with a trailing '\r' lose it; the generator makes none.
            prop_assert_eq!(out, expected(&case));
            prop_assert_eq!(src.files_done(), case.files.len());
            prop_assert!(src.take_events().is_empty());
        }

        #[test]
        fn any_file_content_is_read_to_the_end_without_panicking(
            files in prop::collection::vec((prop::collection::vec(any::<u8>(), 0..300), 0usize..3, any::<u16>()), 1..5),
            max_line in 1usize..20,
            buffer in 1usize..40,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            for (i, (bytes, kind, flip)) in files.iter().enumerate() {
                // Random bytes as plain, as ".gz", and real gzip with one byte flipped.
                let (name, content) = match kind {
                    0 => (format!("f{i}.jsonl"), bytes.clone()),
                    1 => (format!("f{i}.jsonl.gz"), bytes.clone()),
                    _ => {
                        let mut z = gz(bytes);
                        let at = usize::from(*flip) % z.len();
                        z[at] ^= (*flip >> 8) as u8 | 1;
                        (format!("f{i}.jsonl.gz"), z)
                    }
                };
                write(d, &name, &content);
            }
            let mut src = FileSource::open(FileSourceOptions { max_line_bytes: max_line, ..opts(d, 0) }, FilePosition::default()).unwrap();
            src.buffer_bytes = buffer;
            let mut lines = 0;
            for _ in 0..10_000 {
                if src.files_done() == files.len() {
                    break;
                }
                lines += src.poll(7, |l| assert!(l.bytes.len() <= max_line)).unwrap();
            }
            prop_assert_eq!(src.files_done(), files.len());
            prop_assert!(lines <= files.iter().map(|f| f.0.len() + 1).sum::<usize>() * 4);
            prop_assert!(src.take_events().len() <= files.len());
        }

        #[test]
        fn find_newline_matches_a_plain_search(hay in prop::collection::vec(prop_oneof![Just(b'\n'), Just(0x0bu8), Just(0x8au8), any::<u8>()], 0..80)) {
            prop_assert_eq!(find_newline(&hay), hay.iter().position(|&b| b == b'\n'));
        }
    }
}
