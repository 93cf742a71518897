//! The changelog of a task of a scaled-out pipeline (see `crate::scale`): its partition of the compacted changelog topic holds every write the
//! task's state store made, one Kafka transaction per epoch (see [`crate::state::Mirror`]).
//!
//! The producer's transactional id names the task, so the process that takes a task over
//! fences the one that had it: `init_transactions` aborts the old owner's open transaction,
//! and every later commit of the old owner fails. The new owner then reads the partition
//! (read-committed) to its end into an empty store, and carries on from the last epoch the
//! old owner committed.
//!
//! A record's key is the column family (u16 length, big endian, then its name) followed by
//! the store key; its value is the stored value, or none (a tombstone) for a delete, so
//! compaction keeps exactly the live state. A value larger than [`CHUNK_BYTES`] (an epoch's
//! pending output) travels as chunk records (key `0xFFFF`, chunk index, then the record key)
//! written before its record, which then carries no value and a `chunks` header; deleting or
//! rewriting it deletes the chunks too.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use std::collections::HashMap;
use std::sync::Mutex;

use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::{Config, TaskId};
use crate::state::{Mirror, MirrorOp, StateStore};

/// Kafka requests of the changelog (metadata, init, commit) give up after this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a commit or abort that timed out is tried again (librdkafka allows retrying
/// the same call) before the epoch's transaction counts as failed.
const CALL_ATTEMPTS: u32 = 5;
/// One call committing an epoch's transaction waits this long (it flushes the epoch first).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);
/// A restore that reads nothing new for this long stops with an error.
const RESTORE_STALL: Duration = Duration::from_secs(120);
/// Transaction attempts per epoch before the task stops.
const MAX_ATTEMPTS: u32 = 3;
/// Values above this are split into chunk records (brokers refuse messages above 1 MB by
/// default).
pub const CHUNK_BYTES: usize = 256 << 10;
/// The header naming how many chunk records hold a record's value.
const CHUNKS_HEADER: &str = "chunks";
/// A chunk record's key starts with this, a column-family length no record key has.
const CHUNK_MARK: [u8; 2] = [0xFF, 0xFF];

#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    #[error("Kafka failed while {what}: {source} (is the broker up and the address right?)")]
    Kafka { what: String, source: KafkaError },
    #[error("changelog: {0}")]
    Invalid(String),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

pub struct Changelog {
    topic: String,
    partition: i32,
    transactional_id: String,
    producer: ThreadedProducer<DefaultProducerContext>,
    /// Record key → number of chunk records of its current value, for the values written in
    /// chunks (restored ones included), so deleting or rewriting one removes its chunks.
    chunked: Mutex<HashMap<Vec<u8>, u32>>,
}

fn chunk_key(record_key: &[u8], index: u32) -> Vec<u8> {
    [&CHUNK_MARK[..], &index.to_be_bytes(), record_key].concat()
}

/// (chunk index, record key) of a chunk record's key.
fn parse_chunk_key(key: &[u8]) -> Option<(u32, &[u8])> {
    let rest = key.strip_prefix(&CHUNK_MARK[..])?;
    Some((u32::from_be_bytes(rest.get(..4)?.try_into().ok()?), &rest[4..]))
}

/// The transactional id of a task's changelog producer.
pub fn transactional_id(config: &Config, task: TaskId) -> String {
    format!("tidemark/{}/task-{}", config.pipeline.name, task.partition)
}

pub fn encode_key(cf: &str, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + cf.len() + key.len());
    out.extend_from_slice(&(cf.len() as u16).to_be_bytes());
    out.extend_from_slice(cf.as_bytes());
    out.extend_from_slice(key);
    out
}

pub fn decode_key(record: &[u8]) -> Option<(String, Vec<u8>)> {
    let len = u16::from_be_bytes(record.get(..2)?.try_into().ok()?) as usize;
    let cf = std::str::from_utf8(record.get(2..2 + len)?).ok()?;
    Some((cf.to_string(), record[2 + len..].to_vec()))
}

/// A standby copy of a task's state, ready for the task: its store's directory (closed), and
/// where its reader stands.
pub struct Warm {
    pub dir: std::path::PathBuf,
    pub restorer: Restorer,
}

/// Standby copies handed over to the tasks about to start in this process, by the task's
/// transactional id.
static WARM: Mutex<Option<HashMap<String, Warm>>> = Mutex::new(None);

/// Leaves a standby copy for the task with this transactional id.
pub fn offer_warm(transactional_id: String, warm: Warm) {
    WARM.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(transactional_id, warm);
}

/// The standby copy left for the task with this transactional id, if any.
pub fn take_warm(transactional_id: &str) -> Option<Warm> {
    WARM.lock().unwrap_or_else(|e| e.into_inner()).as_mut()?.remove(transactional_id)
}

fn kafka(what: String) -> impl FnOnce(KafkaError) -> ChangelogError {
    move |source| ChangelogError::Kafka { what, source }
}

/// Reads a task's changelog partition (committed records only) into a store, from the
/// beginning: to its end when a task starts, or continuously for a standby copy, which the
/// task then finishes ([`Changelog::restore_rest`]).
pub struct Restorer {
    topic: String,
    partition: i32,
    consumer: BaseConsumer,
    /// Records read so far.
    read: u64,
    replay: Replay,
}

/// What a [`Restorer`] has read and not yet written, and what it knows of chunked values.
#[derive(Default)]
struct Replay {
    /// Read, not yet written to the store.
    ops: Vec<MirrorOp>,
    /// Chunks of values whose record has not come yet: record key → index → bytes.
    parts: HashMap<Vec<u8>, HashMap<u32, Vec<u8>>>,
    /// Record key → chunk count of the values held in chunks (see [`Changelog`]).
    chunked: HashMap<Vec<u8>, u32>,
}

impl Restorer {
    pub fn start(config: &Config, bootstrap: &str, topic: &str, partition: i32) -> Result<Restorer, ChangelogError> {
        let mut c = crate::source::consumer_config(config, bootstrap);
        c.set("group.id", format!("{}.restore", config.kafka.group_id))
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest");
        let consumer: BaseConsumer = c.create().map_err(kafka("creating the changelog reader".into()))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Beginning)
            .map_err(kafka("assigning the changelog partition".into()))?;
        consumer.assign(&tpl).map_err(kafka("assigning the changelog partition".into()))?;
        Ok(Restorer {
            topic: topic.to_string(),
            partition,
            consumer,
            read: 0,
            replay: Replay::default(),
        })
    }

    /// The next offset the reader fetches (past control records too), once known.
    fn position(&self) -> Option<i64> {
        let position = self.consumer.position().ok()?;
        let offset = position.find_partition(&self.topic, self.partition)?.offset().to_raw();
        offset.filter(|o| *o >= 0)
    }

    /// Reads what arrives within `wait` (and what is already there, up to a batch), writing to
    /// `store` in batches. Returns the number of records read.
    pub fn poll_into(&mut self, store: &StateStore, wait: Duration) -> Result<usize, ChangelogError> {
        let mut n = 0;
        let mut timeout = wait;
        while n < 10_000 {
            let m = match self.consumer.poll(timeout) {
                None => break,
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(kafka(format!("reading {}[{}]", self.topic, self.partition))(e)),
            };
            timeout = Duration::ZERO;
            n += 1;
            self.read += 1;
            self.replay.apply(&m).map_err(|()| {
                ChangelogError::Invalid(format!(
                    "record at offset {} of {}[{}] has a key tidemark did not write, or a value whose chunks are missing; the topic is used by something else",
                    m.offset(),
                    self.topic,
                    self.partition
                ))
            })?;
            if self.replay.ops.len() >= 10_000 {
                store.restore(std::mem::take(&mut self.replay.ops))?;
            }
        }
        if n == 0 || self.replay.ops.len() >= 1_000 {
            self.flush(store)?;
        }
        Ok(n)
    }

    pub fn flush(&mut self, store: &StateStore) -> Result<(), ChangelogError> {
        if !self.replay.ops.is_empty() {
            store.restore(std::mem::take(&mut self.replay.ops))?;
        }
        Ok(())
    }
}

impl Replay {
    /// Takes one changelog record; `Err` when it is not one tidemark wrote.
    fn apply(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) -> Result<(), ()> {
        let unknown = || ();
        let key = m.key().unwrap_or_default();
        if let Some((index, record_key)) = parse_chunk_key(key) {
            match m.payload() {
                Some(bytes) => {
                    self.parts.entry(record_key.to_vec()).or_default().insert(index, bytes.to_vec());
                }
                None => {
                    if let Some(p) = self.parts.get_mut(record_key) {
                        p.remove(&index);
                    }
                }
            }
            return Ok(());
        }
        let (cf, store_key) = decode_key(key).ok_or_else(unknown)?;
        let chunks = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == CHUNKS_HEADER).and_then(|h| h.value))
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map(u32::from_be_bytes);
        let value = match (chunks, m.payload()) {
            (Some(n), _) => {
                let mut got = self.parts.remove(key).unwrap_or_default();
                let mut value = Vec::new();
                for i in 0..n {
                    value.extend(got.remove(&i).ok_or_else(unknown)?);
                }
                self.chunked.insert(key.to_vec(), n);
                Some(value)
            }
            (None, payload) => {
                self.chunked.remove(key);
                payload.map(<[u8]>::to_vec)
            }
        };
        self.ops.push(MirrorOp { cf, key: store_key, value });
        Ok(())
    }
}

impl Changelog {
    /// Connects as the task's writer, fencing any earlier one.
    pub fn open(config: &Config, bootstrap: &str, task: TaskId) -> Result<Changelog, ChangelogError> {
        let scale = config.scale.as_ref().expect("a task runs a [scale] pipeline");
        let transactional_id = transactional_id(config, task);
        let mut c = crate::source::client_config(config, bootstrap);
        c.set("transactional.id", &transactional_id)
            .set("enable.idempotence", "true")
            // Longer than a slow commit may take on a loaded machine (CALL_ATTEMPTS ×
            // COMMIT_TIMEOUT); brokers allow up to 15 minutes by default.
            .set("transaction.timeout.ms", "600000");
        let producer: ThreadedProducer<DefaultProducerContext> = c.create().map_err(|source| ChangelogError::Kafka {
            what: format!("creating the changelog producer {transactional_id}"),
            source,
        })?;
        producer.init_transactions(REQUEST_TIMEOUT).map_err(|source| ChangelogError::Kafka {
            what: format!("taking over task {} (init_transactions of {transactional_id})", task.partition),
            source,
        })?;
        Ok(Changelog {
            topic: scale.changelog_topic.clone(),
            partition: task.partition,
            transactional_id,
            producer,
            chunked: Mutex::new(HashMap::new()),
        })
    }

    /// Reads the task's partition, committed records only, to its end into `store` (empty).
    /// Returns the number of records read.
    pub fn restore_into(&self, config: &Config, bootstrap: &str, store: &StateStore) -> Result<u64, ChangelogError> {
        let restorer = Restorer::start(config, bootstrap, &self.topic, self.partition)?;
        self.restore_rest(restorer, store)
    }

    /// Reads from where `restorer` stands (a standby copy, `store`) to the partition's end.
    /// Returns the number of records read.
    pub fn restore_rest(&self, mut restorer: Restorer, store: &StateStore) -> Result<u64, ChangelogError> {
        // Read-committed: the end is the last stable offset; the open transaction of a fenced
        // writer was aborted by `open`, so nothing is left undecided below it.
        let (low, end) = restorer
            .consumer
            .fetch_watermarks(&self.topic, self.partition, REQUEST_TIMEOUT)
            .map_err(kafka(format!("reading the end of {}[{}]", self.topic, self.partition)))?;
        let read_before = restorer.read;
        let mut last_progress = Instant::now();
        while end > low && restorer.position().is_none_or(|p| p < end) {
            if restorer.poll_into(store, Duration::from_millis(200))? > 0 {
                last_progress = Instant::now();
            } else if last_progress.elapsed() > RESTORE_STALL {
                return Err(ChangelogError::Invalid(format!(
                    "restoring from {}[{}] read nothing for {} s before reaching offset {end}; is the broker up?",
                    self.topic,
                    self.partition,
                    RESTORE_STALL.as_secs()
                )));
            }
        }
        restorer.flush(store)?;
        *self.chunked.lock().unwrap() = std::mem::take(&mut restorer.replay.chunked);
        Ok(restorer.read - read_before)
    }

    fn send(&self, key: &[u8], value: Option<&[u8]>, headers: Option<OwnedHeaders>) -> Result<(), KafkaError> {
        let mut record = BaseRecord::<[u8], [u8]>::to(&self.topic).partition(self.partition).key(key);
        if let Some(v) = value {
            record = record.payload(v);
        }
        if let Some(h) = headers {
            record = record.headers(h);
        }
        send_waiting(&self.producer, record)
    }

    /// Sends the records of `ops` in one transaction; returns the chunk counts it leaves.
    fn try_commit(&self, ops: &[MirrorOp]) -> Result<HashMap<Vec<u8>, Option<u32>>, KafkaError> {
        let known = self.chunked.lock().unwrap();
        // Record key → chunks of its new value (None: not chunked), as of this transaction.
        let mut changed: HashMap<Vec<u8>, Option<u32>> = HashMap::new();
        self.producer.begin_transaction()?;
        for op in ops {
            let key = encode_key(&op.cf, &op.key);
            let before = changed.get(&key).copied().unwrap_or_else(|| known.get(&key).copied()).unwrap_or(0);
            let now = match &op.value {
                Some(v) if v.len() > CHUNK_BYTES => {
                    let pieces: Vec<&[u8]> = v.chunks(CHUNK_BYTES).collect();
                    for (i, piece) in pieces.iter().enumerate() {
                        self.send(&chunk_key(&key, i as u32), Some(piece), None)?;
                    }
                    let n = pieces.len() as u32;
                    let header = OwnedHeaders::new().insert(Header {
                        key: CHUNKS_HEADER,
                        value: Some(&n.to_be_bytes()[..]),
                    });
                    self.send(&key, None, Some(header))?;
                    n
                }
                value => {
                    self.send(&key, value.as_deref(), None)?;
                    0
                }
            };
            for stale in now..before {
                self.send(&chunk_key(&key, stale), None, None)?;
            }
            changed.insert(key, (now > 0).then_some(now));
        }
        retry_call(|| self.producer.commit_transaction(COMMIT_TIMEOUT))?;
        Ok(changed)
    }
}

/// Sends a record, waiting while the producer's queue is full.
pub(crate) fn send_waiting(producer: &ThreadedProducer<DefaultProducerContext>, mut record: BaseRecord<'_, [u8], [u8]>) -> Result<(), KafkaError> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Calls a transaction API again while it fails with an error librdkafka says may be
/// retried (a timeout): the call picks up where the last one stopped.
pub(crate) fn retry_call(mut call: impl FnMut() -> Result<(), KafkaError>) -> Result<(), KafkaError> {
    let mut attempt = 1;
    loop {
        match call() {
            Err(KafkaError::Transaction(e)) if e.is_retriable() && attempt < CALL_ATTEMPTS => {
                tracing::debug!(attempt, error = %e, "transaction call timed out; calling it again");
                attempt += 1;
            }
            Err(e @ KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) if attempt < CALL_ATTEMPTS => {
                tracing::debug!(attempt, error = %e, "flushing the transaction timed out; calling it again");
                attempt += 1;
            }
            other => return other,
        }
    }
}

impl Mirror for Changelog {
    fn commit(&self, epoch: u64, ops: &[MirrorOp]) -> Result<(), String> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let e = match self.try_commit(ops) {
                Ok(changed) => {
                    let mut chunked = self.chunked.lock().unwrap();
                    for (key, n) in changed {
                        match n {
                            Some(n) => chunked.insert(key, n),
                            None => chunked.remove(&key),
                        };
                    }
                    return Ok(());
                }
                Err(e) => e,
            };
            let (fatal, abortable) = match &e {
                KafkaError::Transaction(t) => (t.is_fatal(), t.txn_requires_abort()),
                _ => (false, true),
            };
            if fatal || e.rdkafka_error_code() == Some(RDKafkaErrorCode::Fenced) {
                return Err(format!(
                    "another process took this task over (its changelog writer {} was fenced: {e}); this process stops the task",
                    self.transactional_id
                ));
            }
            if attempt >= MAX_ATTEMPTS {
                return Err(format!(
                    "{attempt} transactions on {}[{}] failed, the last with: {e} (is the broker up?)",
                    self.topic, self.partition
                ));
            }
            tracing::warn!(epoch, attempt, error = %e, "changelog transaction failed; aborting it and writing the epoch again");
            if abortable {
                if let Err(abort) = retry_call(|| self.producer.abort_transaction(REQUEST_TIMEOUT)) {
                    return Err(format!(
                        "aborting a failed transaction on {}[{}] failed too: {abort} (is the broker up?)",
                        self.topic, self.partition
                    ));
                }
            }
            std::thread::sleep(Duration::from_millis(500 * u64::from(attempt)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_round_trip() {
        for (cf, key) in [("meta", b"epoch".to_vec()), ("t/q/windows", vec![0, 1, 255]), ("", Vec::new())] {
            assert_eq!(decode_key(&encode_key(cf, &key)), Some((cf.to_string(), key)));
        }
        assert_eq!(decode_key(&[0]), None);
        assert_eq!(decode_key(&[0, 9, b'a']), None);
        let record = encode_key("meta", b"pending\0");
        assert_eq!(parse_chunk_key(&chunk_key(&record, 7)), Some((7, &record[..])));
        assert_eq!(parse_chunk_key(&record), None, "a record key is never a chunk key");
    }
}
