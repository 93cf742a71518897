//! A task's changelog: its partition of the compacted changelog topic holds every write the
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
//! compaction keeps exactly the live state.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use super::ScaleError;
use crate::config::{Config, TaskId};
use crate::state::{Mirror, MirrorOp, StateStore};

/// Kafka requests of the changelog (metadata, init, commit) give up after this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A restore that reads nothing new for this long stops with an error.
const RESTORE_STALL: Duration = Duration::from_secs(120);
/// Transaction attempts per epoch before the task stops.
const MAX_ATTEMPTS: u32 = 3;

pub struct Changelog {
    topic: String,
    partition: i32,
    transactional_id: String,
    producer: rdkafka::producer::BaseProducer,
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

impl Changelog {
    /// Connects as the task's writer, fencing any earlier one.
    pub fn open(config: &Config, bootstrap: &str, task: TaskId) -> Result<Changelog, ScaleError> {
        let scale = config.scale.as_ref().expect("a task runs a [scale] pipeline");
        let transactional_id = transactional_id(config, task);
        let mut c = ClientConfig::new();
        for (k, v) in &config.kafka.options {
            c.set(k, v);
        }
        c.set("bootstrap.servers", bootstrap)
            .set("transactional.id", &transactional_id)
            .set("enable.idempotence", "true")
            .set("transaction.timeout.ms", "60000");
        let producer: rdkafka::producer::BaseProducer = c.create().map_err(|source| ScaleError::Kafka {
            what: format!("creating the changelog producer {transactional_id}"),
            source,
        })?;
        producer.init_transactions(REQUEST_TIMEOUT).map_err(|source| ScaleError::Kafka {
            what: format!("taking over task {} (init_transactions of {transactional_id})", task.partition),
            source,
        })?;
        Ok(Changelog {
            topic: scale.changelog_topic.clone(),
            partition: task.partition,
            transactional_id,
            producer,
        })
    }

    /// Reads the task's partition, committed records only, to its end into `store` (empty).
    /// Returns the number of records read.
    pub fn restore_into(&self, config: &Config, bootstrap: &str, store: &StateStore) -> Result<u64, ScaleError> {
        let kafka = |what: String| move |source| ScaleError::Kafka { what, source };
        let mut c = crate::source::consumer_config(config, bootstrap);
        c.set("group.id", format!("{}.restore", config.kafka.group_id))
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest");
        let consumer: BaseConsumer = c.create().map_err(kafka("creating the changelog reader".into()))?;
        // Read-committed: the end is the last stable offset; the open transaction of a fenced
        // writer was aborted by `open`, so nothing is left undecided below it.
        let (low, end) = consumer
            .fetch_watermarks(&self.topic, self.partition, REQUEST_TIMEOUT)
            .map_err(kafka(format!("reading the end of {}[{}]", self.topic, self.partition)))?;
        if end <= low {
            return Ok(0);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, self.partition, Offset::Beginning)
            .map_err(kafka("assigning the changelog partition".into()))?;
        consumer.assign(&tpl).map_err(kafka("assigning the changelog partition".into()))?;
        let mut read = 0u64;
        let mut chunk = Vec::new();
        let mut last_progress = Instant::now();
        loop {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    last_progress = Instant::now();
                    read += 1;
                    let Some((cf, key)) = m.key().and_then(decode_key) else {
                        return Err(ScaleError::Changelog(format!(
                            "record at offset {} of {}[{}] has a key tidemark did not write; the topic is used by something else",
                            m.offset(),
                            self.topic,
                            self.partition
                        )));
                    };
                    chunk.push(MirrorOp {
                        cf,
                        key,
                        value: m.payload().map(<[u8]>::to_vec),
                    });
                    if chunk.len() >= 10_000 {
                        store.restore(std::mem::take(&mut chunk))?;
                    }
                }
                Some(Err(e)) => {
                    return Err(ScaleError::Kafka {
                        what: format!("reading {}[{}]", self.topic, self.partition),
                        source: e,
                    })
                }
                None if last_progress.elapsed() > RESTORE_STALL => {
                    return Err(ScaleError::Changelog(format!(
                        "restoring from {}[{}] read nothing for {} s before reaching offset {end}; is the broker up?",
                        self.topic,
                        self.partition,
                        RESTORE_STALL.as_secs()
                    )))
                }
                None => {}
            }
            let position = consumer
                .position()
                .ok()
                .and_then(|p| p.find_partition(&self.topic, self.partition).and_then(|e| e.offset().to_raw()));
            if position.is_some_and(|p| p >= end) {
                break;
            }
        }
        store.restore(chunk)?;
        Ok(read)
    }

    fn try_commit(&self, ops: &[MirrorOp]) -> Result<(), KafkaError> {
        self.producer.begin_transaction()?;
        for op in ops {
            let key = encode_key(&op.cf, &op.key);
            let mut record = BaseRecord::<[u8], [u8]>::to(&self.topic).partition(self.partition).key(&key);
            if let Some(v) = &op.value {
                record = record.payload(v);
            }
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        self.producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => return Err(e),
                }
            }
        }
        self.producer.commit_transaction(REQUEST_TIMEOUT)
    }
}

impl Mirror for Changelog {
    fn commit(&self, epoch: u64, ops: &[MirrorOp]) -> Result<(), String> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Err(e) = self.try_commit(ops) else { return Ok(()) };
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
                if let Err(abort) = self.producer.abort_transaction(REQUEST_TIMEOUT) {
                    tracing::warn!(epoch, error = %abort, "aborting the failed changelog transaction failed too");
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
    }
}
