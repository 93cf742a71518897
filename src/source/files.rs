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
//! Errors that a retry may fix or that need the operator ([`FileSourceError`]: the directory is
//! missing or unreadable, a file cannot be opened, a stored offset lies beyond the end of its
//! file) are returned by `poll` without moving the position; calling `poll` again retries.
//!
//! # Limits
//! - One file at a time: a plain file whose writer keeps appending holds back the files after it.
//! - `done` names every file read that is still in the directory; names of files deleted or moved
//!   away are dropped from it at the next listing (a file that reappears under a name no longer in
//!   `done` is a new file and is read). Move or delete processed files to keep positions small.
//! - Appends to a file after it is done are not read.
//! - The settle rule trusts modification times against this machine's clock; on network file
//!   systems with a skewed clock, raise `settle`.
//! - A truncated gzip file is re-decompressed from its start each time it grows.
//! - Reading streams through a 256 KiB buffer; a line is copied only when it crosses the buffer's
//!   end, and at most `max_line_bytes` of a line are held in memory.

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, Metadata};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
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
        }
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
}

impl FileEvent {
    /// The file the event is about.
    pub fn file(&self) -> &str {
        match self {
            FileEvent::Corrupt { file, .. } | FileEvent::Truncated { file, .. } | FileEvent::Vanished { file, .. } => file,
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
        }
    }
}

/// Errors that stop a poll (the position does not move; polling again retries).
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
    #[error(
        "the saved position says {} was read up to byte {offset}, but it now holds only {len} (decompressed) bytes: it was truncated or replaced after being read. Restore the file, or start over with a new state_dir",
        path.display()
    )]
    BeyondEnd { path: PathBuf, offset: u64, len: u64 },
    #[error("invalid file source options: {0}")]
    Options(String),
}

/// Reads the JSON-lines files of a directory, resuming from a [`FilePosition`].
pub struct FileSource {
    options: FileSourceOptions,
    done: BTreeSet<String>,
    current: Option<Current>,
    /// Names listed but not yet read, in name order.
    queue: BTreeSet<String>,
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
}

/// What (re)opening the current file came to.
enum Open {
    Ready,
    /// The gzip stream ended early while skipping to the offset.
    Blocked,
    Wait,
    Problem(FileEvent),
    Vanished,
}

impl FileSource {
    /// Opens the source on `options.dir`, resuming at `position` (use `FilePosition::default()` to
    /// start from scratch).
    pub fn open(options: FileSourceOptions, position: FilePosition) -> Result<FileSource, FileSourceError> {
        if options.max_line_bytes == 0 {
            return Err(FileSourceError::Options("max_line_bytes must be at least 1".into()));
        }
        check_dir(&options.dir)?;
        let FilePosition { done, current } = position;
        let current = match current {
            Some((name, offset)) if done.contains(&name) => {
                tracing::warn!(file = %name, offset, "the saved file-source position lists its current file as done too; treating it as done");
                None
            }
            Some((name, offset)) => Some(Current::new(name, offset)),
            None => None,
        };
        Ok(FileSource {
            options,
            done,
            current,
            queue: BTreeSet::new(),
            last_scan: None,
            idle_until: None,
            events: Vec::new(),
            events_dropped: 0,
            vanished: 0,
            warned_names: HashSet::new(),
            buffer_bytes: READ_BUFFER_BYTES,
        })
    }

    /// Reads up to `max_lines` lines, calling `on_line` for each, in order. Never waits: returns
    /// `Ok(0)` when nothing new is there. Take [`FileSource::take_events`] afterwards.
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
            if self.current.is_none() && !self.start_next()? {
                self.idle_until = Some(Instant::now() + self.options.rescan);
                break;
            }
            let Some(cur) = self.current.as_mut() else { break };
            let step = match read_current(cur, &self.options, self.buffer_bytes, max_lines, &mut handed, &mut on_line) {
                Ok(step) => step,
                Err(e) => {
                    cur.drop_stream();
                    return Err(e);
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
                        self.done.insert(cur.name);
                    }
                }
                Step::Problem(event) => {
                    if let Some(cur) = self.current.take() {
                        self.done.insert(cur.name);
                    }
                    self.report(event);
                }
                Step::Vanished => {
                    if let Some(cur) = self.current.take() {
                        self.note_vanished(cur.name, cur.offset);
                    }
                }
            }
        }
        Ok(handed)
    }

    /// The position after the last line handed out by `poll`.
    pub fn position(&self) -> FilePosition {
        FilePosition {
            done: self.done.clone(),
            current: self.current.as_ref().map(|c| (c.name.clone(), c.offset)),
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
        while let Some(name) = self.queue.pop_first() {
            if !self.done.contains(&name) {
                self.current = Some(Current::new(name, 0));
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Lists the directory: refreshes the queue, reports queued files that vanished, and forgets
    /// done files that are gone.
    fn scan(&mut self) -> Result<(), FileSourceError> {
        let dir = &self.options.dir;
        let entries = fs::read_dir(dir).map_err(|e| dir_error(dir, e))?;
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
        let current = self.current.as_ref().map(|c| c.name.as_str());
        let queue: BTreeSet<String> = present
            .iter()
            .filter(|n| self.options.wants(n) && !self.done.contains(*n) && Some(n.as_str()) != current)
            .cloned()
            .collect();
        let gone: Vec<String> = self.queue.iter().filter(|n| !present.contains(*n)).cloned().collect();
        self.queue = queue;
        self.done.retain(|n| present.contains(n));
        for name in gone {
            self.note_vanished(name, 0);
        }
        Ok(())
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
    let stamp = Stamp::of(&file.metadata().map_err(read_error)?);
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
            return Err(FileSourceError::BeyondEnd {
                path,
                offset: cur.offset,
                len: stamp.len,
            });
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
            return Err(FileSourceError::BeyondEnd {
                path,
                offset: cur.offset,
                len: cur.offset - left,
            });
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
            done: BTreeSet::new(),
            current: Some(("gone.jsonl".into(), 10)),
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
    fn an_offset_beyond_the_end_is_an_error_and_does_not_move() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "a.jsonl", b"1\n");
        write(d, "b.jsonl.gz", &gz(b"1\n"));
        for (name, offset) in [("a.jsonl", 3), ("b.jsonl.gz", 5)] {
            let pos = FilePosition {
                done: BTreeSet::new(),
                current: Some((name.into(), offset)),
            };
            let mut src = FileSource::open(opts(d, 0), pos.clone()).unwrap();
            let err = src.poll(10, |_| {}).unwrap_err();
            assert!(matches!(err, FileSourceError::BeyondEnd { .. }), "{err}");
            assert!(err.to_string().contains(name));
            assert_eq!(src.position(), pos);
        }
    }

    #[test]
    fn position_round_trips_through_json() {
        let pos = FilePosition {
            done: BTreeSet::from(["a.jsonl".to_string()]),
            current: Some(("b.jsonl.gz".into(), 42)),
        };
        let json = serde_json::to_string(&pos).unwrap();
        assert_eq!(serde_json::from_str::<FilePosition>(&json).unwrap(), pos);
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
