//! A Kafka topic written one transaction per epoch: rows become JSON messages, and the epoch
//! number is committed *inside the same transaction* as the consumer-group offset of a marker
//! group (`<pipeline>/<sink>`) on partition 0 of the topic. A `read_committed` consumer
//! therefore sees an epoch's rows exactly when the marker says the epoch is in, and recovery
//! asks the marker which epoch the topic holds:
//!
//! - on open, `init_transactions` fences any earlier producer with the same transactional id
//!   and aborts its unfinished transaction (a crash mid-epoch leaves nothing visible);
//! - an epoch at or below the marker is skipped; any other is produced again in a new
//!   transaction.
//!
//! Message format: the value is a JSON object with one member per output column (timestamps
//! as RFC 3339 strings in UTC with microseconds; a dead letter's payload as text when it is
//! UTF-8, otherwise `null` with the bytes in `payload_hex`). The key is the `key` columns'
//! value (one column: its text; several: a JSON array); without `key`, append rows have no key
//! and update-mode rows are keyed by the window start and group keys. An update-mode row that
//! leaves the result is a tombstone: its key with a null value.

use std::time::Duration;

use deltalake::arrow::datatypes::SchemaRef;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value as Json;

use super::delta::{AppendOutcome, WriteAttempts};
use super::{DeadLetter, SinkPlan, SinkRole, SinkRows};
use crate::config::OutputMode;
use crate::types::{decode_key, EventTime, Value};
use crate::window::OutputRow;

/// Broker round trips: metadata, the marker read, fencing.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// One epoch's transaction: flushing its messages and committing.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Attempts at an epoch whose transaction was aborted by a transient failure.
const MAX_ATTEMPTS: u32 = 5;
/// How long to wait for room when librdkafka's local queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    #[error("cannot create a Kafka client for topic \"{topic}\" at {bootstrap}: {source}; check the sink's bootstrap_servers and options")]
    Create {
        topic: String,
        bootstrap: String,
        #[source]
        source: Box<KafkaError>,
    },
    #[error("topic \"{topic}\" does not exist at {bootstrap}: create it first (e.g. kafka-topics.sh --create --topic {topic} --bootstrap-server {bootstrap}), or point the sink at an existing topic")]
    NoTopic { topic: String, bootstrap: String },
    #[error("cannot reach Kafka at {bootstrap} for topic \"{topic}\": {source}; is the broker running and the address right?")]
    Unreachable {
        topic: String,
        bootstrap: String,
        #[source]
        source: Box<KafkaError>,
    },
    #[error("Kafka at {bootstrap} did not start transactions for transactional id \"{id}\": {source}; the broker must support transactions (a single-broker cluster needs transaction.state.log.replication.factor=1 and transaction.state.log.min.isr=1)")]
    InitTransactions {
        id: String,
        bootstrap: String,
        #[source]
        source: Box<KafkaError>,
    },
    #[error("cannot read which epoch topic \"{topic}\" holds (offset of consumer group \"{group}\" on partition 0): {source}")]
    Marker {
        topic: String,
        group: String,
        #[source]
        source: Box<KafkaError>,
    },
    #[error("another producer took over transactional id \"{id}\", so this one was fenced: {source}; run one tidemark process per pipeline and state_dir")]
    Fenced {
        id: String,
        #[source]
        source: Box<KafkaError>,
    },
    #[error(
        "the Kafka transaction of epoch {epoch} failed after {attempts} attempts: {source}; check the broker (the epoch is kept and written again on restart)"
    )]
    Transaction {
        epoch: u64,
        attempts: u32,
        #[source]
        source: Box<KafkaError>,
    },
    #[error("a row of epoch {epoch} could not be queued for topic \"{topic}\": {source}; check message.max.bytes on the sink and the broker")]
    Enqueue {
        epoch: u64,
        topic: String,
        #[source]
        source: Box<KafkaError>,
    },
}

/// A Kafka topic written one transaction per epoch.
pub struct KafkaEpochSink {
    plan: SinkPlan,
    topic: String,
    producer: BaseProducer,
    /// Never subscribes: reads and names the marker group.
    marker: BaseConsumer,
    group: ConsumerGroupMetadata,
    /// Per message, the output columns forming the key (indexes into the schema).
    key: Vec<usize>,
    /// The last epoch the topic holds, as read at open and advanced by each commit.
    committed: Option<u64>,
    attempts: WriteAttempts,
}

impl KafkaEpochSink {
    /// Connects, fences earlier producers of this sink and reads the last committed epoch.
    pub fn open(plan: SinkPlan) -> Result<KafkaEpochSink, KafkaSinkError> {
        let kafka = plan.config.kafka.clone().expect("a Kafka sink has its Kafka settings (compiled config)");
        let bootstrap = kafka.bootstrap_servers.clone().unwrap_or_default();
        let topic = kafka.topic.clone();
        let create = |source| KafkaSinkError::Create {
            topic: topic.clone(),
            bootstrap: bootstrap.clone(),
            source: Box::new(source),
        };
        let mut producer_config = ClientConfig::new();
        producer_config.set("bootstrap.servers", &bootstrap);
        for (k, v) in &kafka.options {
            producer_config.set(k, v);
        }
        producer_config.set("transactional.id", &plan.app_id).set("enable.idempotence", "true");
        let producer: BaseProducer = producer_config.create().map_err(create)?;
        let marker: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", &plan.app_id)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()
            .map_err(create)?;

        let metadata = producer
            .client()
            .fetch_metadata(Some(&topic), REQUEST_TIMEOUT)
            .map_err(|source| KafkaSinkError::Unreachable {
                topic: topic.clone(),
                bootstrap: bootstrap.clone(),
                source: Box::new(source),
            })?;
        let exists = metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
        if !exists {
            return Err(KafkaSinkError::NoTopic { topic, bootstrap });
        }
        producer.init_transactions(REQUEST_TIMEOUT).map_err(|source| KafkaSinkError::InitTransactions {
            id: plan.app_id.clone(),
            bootstrap: bootstrap.clone(),
            source: Box::new(source),
        })?;
        let group = marker.group_metadata().ok_or_else(|| KafkaSinkError::Marker {
            topic: topic.clone(),
            group: plan.app_id.clone(),
            source: Box::new(KafkaError::ClientCreation("no consumer group metadata".into())),
        })?;
        let key = key_columns(&plan);
        let mut sink = KafkaEpochSink {
            plan,
            topic,
            producer,
            marker,
            group,
            key,
            committed: None,
            attempts: WriteAttempts::default(),
        };
        sink.committed = sink.read_marker()?;
        Ok(sink)
    }

    pub fn plan(&self) -> &SinkPlan {
        &self.plan
    }

    pub fn attempts(&self) -> WriteAttempts {
        self.attempts
    }

    /// The last epoch the topic holds for this sink.
    pub fn committed_epoch(&self) -> Option<u64> {
        self.committed
    }

    fn read_marker(&self) -> Result<Option<u64>, KafkaSinkError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, 0);
        let marker_error = |source| KafkaSinkError::Marker {
            topic: self.topic.clone(),
            group: self.plan.app_id.clone(),
            source: Box::new(source),
        };
        let committed = self.marker.committed_offsets(tpl, REQUEST_TIMEOUT).map_err(marker_error)?;
        let offset = committed.elements().first().map(|e| e.offset());
        Ok(match offset {
            Some(Offset::Offset(epoch)) if epoch > 0 => Some(epoch as u64),
            _ => None,
        })
    }

    /// Writes one epoch's rows in one transaction (skipped when the topic holds the epoch).
    pub fn write_epoch(&mut self, epoch: u64, rows: &SinkRows) -> Result<AppendOutcome, KafkaSinkError> {
        if self.committed.is_some_and(|c| c >= epoch) {
            return Ok(AppendOutcome::AlreadyCommitted);
        }
        let messages = self.messages(rows);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_transaction(epoch, &messages) {
                Ok(()) => {
                    self.committed = Some(epoch);
                    return Ok(AppendOutcome::Committed { version: epoch as i64 });
                }
                Err(TxnFailure::Enqueue(source)) => {
                    let _ = self.producer.abort_transaction(COMMIT_TIMEOUT);
                    return Err(KafkaSinkError::Enqueue {
                        epoch,
                        topic: self.topic.clone(),
                        source: Box::new(source),
                    });
                }
                Err(TxnFailure::Kafka(source)) => {
                    let (fatal, abortable) = match &source {
                        KafkaError::Transaction(e) => (e.is_fatal(), e.txn_requires_abort()),
                        _ => (false, true),
                    };
                    if fatal || source.rdkafka_error_code() == Some(RDKafkaErrorCode::Fenced) {
                        return Err(KafkaSinkError::Fenced {
                            id: self.plan.app_id.clone(),
                            source: Box::new(source),
                        });
                    }
                    if attempt >= MAX_ATTEMPTS {
                        return Err(KafkaSinkError::Transaction {
                            epoch,
                            attempts: attempt,
                            source: Box::new(source),
                        });
                    }
                    tracing::warn!(sink = %self.plan.name, epoch, attempt, error = %source, "Kafka transaction failed; aborting it and producing the epoch again");
                    self.attempts.retries += 1;
                    if abortable {
                        if let Err(e) = self.producer.abort_transaction(COMMIT_TIMEOUT) {
                            tracing::warn!(sink = %self.plan.name, epoch, error = %e, "aborting the failed transaction failed too");
                        }
                    }
                    std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
                    // A commit that timed out may have landed: the marker says.
                    if let Ok(Some(c)) = self.read_marker() {
                        if c >= epoch {
                            self.committed = Some(c);
                            return Ok(AppendOutcome::AlreadyCommitted);
                        }
                    }
                }
            }
        }
    }

    fn try_transaction(&self, epoch: u64, messages: &[(Option<String>, Option<String>)]) -> Result<(), TxnFailure> {
        self.producer.begin_transaction().map_err(TxnFailure::Kafka)?;
        for (key, value) in messages {
            let mut record = BaseRecord::<str, str>::to(&self.topic);
            if let Some(k) = key {
                record = record.key(k.as_str());
            }
            if let Some(v) = value {
                record = record.payload(v.as_str());
            }
            let mut record = record;
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        self.producer.poll(QUEUE_FULL_WAIT);
                    }
                    Err((e, _)) => return Err(TxnFailure::Enqueue(e)),
                }
            }
        }
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset(&self.topic, 0, Offset::Offset(epoch as i64))
            .map_err(TxnFailure::Kafka)?;
        self.producer
            .send_offsets_to_transaction(&offsets, &self.group, COMMIT_TIMEOUT)
            .map_err(TxnFailure::Kafka)?;
        self.producer.commit_transaction(COMMIT_TIMEOUT).map_err(TxnFailure::Kafka)
    }

    /// (key, value) per row; a `None` value is a tombstone.
    fn messages(&self, rows: &SinkRows) -> Vec<(Option<String>, Option<String>)> {
        let schema = &self.plan.schema;
        let key_of = |columns: &[Json]| -> Option<String> {
            match self.key.as_slice() {
                [] => None,
                [one] => Some(match &columns[*one] {
                    Json::String(s) => s.clone(),
                    other => other.to_string(),
                }),
                many => Some(Json::Array(many.iter().map(|&i| columns[i].clone()).collect()).to_string()),
            }
        };
        let object = |columns: Vec<Json>, extra: Option<(&str, Json)>| -> String {
            let mut map: serde_json::Map<String, Json> = schema.fields().iter().map(|f| f.name().clone()).zip(columns).collect();
            if let Some((name, value)) = extra {
                map.insert(name.to_string(), value);
            }
            Json::Object(map).to_string()
        };
        match rows {
            SinkRows::Windows(rows) => rows
                .iter()
                .map(|r| {
                    let columns = window_row_columns(&self.plan, r);
                    let key = key_of(&columns);
                    let value = (!r.retract).then(|| object(columns, None));
                    (key, value)
                })
                .collect(),
            SinkRows::DeadLetters(rows) => rows
                .iter()
                .map(|d| {
                    let (columns, hex) = dead_letter_columns(d);
                    let key = key_of(&columns);
                    (key, Some(object(columns, hex.map(|h| ("payload_hex", Json::String(h))))))
                })
                .collect(),
        }
    }
}

enum TxnFailure {
    Kafka(KafkaError),
    Enqueue(KafkaError),
}

/// The schema indexes of the message key's columns.
fn key_columns(plan: &SinkPlan) -> Vec<usize> {
    let kafka = plan.config.kafka.as_ref().expect("a Kafka sink");
    let names: Vec<String> = match (&plan.role, kafka.key.is_empty()) {
        (_, false) => kafka.key.clone(),
        (
            SinkRole::Windows {
                mode: OutputMode::Update,
                merge_keys,
                ..
            },
            true,
        ) => merge_keys.clone(),
        _ => Vec::new(),
    };
    let schema: &SchemaRef = &plan.schema;
    names.iter().filter_map(|n| schema.index_of(n).ok()).collect()
}

fn time_json(t: EventTime) -> Json {
    match chrono::DateTime::from_timestamp_micros(t) {
        Some(d) => Json::String(d.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        None => Json::Null,
    }
}

fn value_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Str(s) => Json::String(s.to_string()),
        Value::Int(i) => Json::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::Bool(b) => Json::Bool(*b),
        Value::Time(t) => time_json(*t),
    }
}

/// A result row's columns in schema order: window columns, group keys, values.
fn window_row_columns(plan: &SinkPlan, row: &OutputRow) -> Vec<Json> {
    let SinkRole::Windows {
        window_columns,
        key_types,
        value_types,
        ..
    } = &plan.role
    else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(plan.schema.fields().len());
    for c in window_columns {
        out.push(match *c {
            "duration" => serde_json::Number::from_f64((row.window_end - row.window_start) as f64 / 1e6).map_or(Json::Null, Json::Number),
            c if c.ends_with("_start") => time_json(row.window_start),
            _ => time_json(row.window_end),
        });
    }
    let keys = decode_key(&row.key).unwrap_or_default();
    for (i, ty) in key_types.iter().enumerate() {
        out.push(typed_json(*ty, keys.get(i).unwrap_or(&Value::Null)));
    }
    for (i, ty) in value_types.iter().enumerate() {
        out.push(typed_json(*ty, row.values.get(i).unwrap_or(&Value::Null)));
    }
    out
}

/// A value as its column's type writes it (an integer in a timestamp column is a time).
fn typed_json(ty: crate::config::FieldType, v: &Value) -> Json {
    match (ty, v) {
        (crate::config::FieldType::Timestamp, Value::Int(t)) => time_json(*t),
        (crate::config::FieldType::Float, Value::Int(i)) => Json::from(*i as f64),
        _ => value_json(v),
    }
}

/// A dead letter's columns in schema order, and its payload as hex when it is not UTF-8.
fn dead_letter_columns(d: &DeadLetter) -> (Vec<Json>, Option<String>) {
    let (payload, hex) = match std::str::from_utf8(&d.payload) {
        Ok(text) => (Json::String(text.to_string()), None),
        Err(_) => (Json::Null, Some(d.payload.iter().map(|b| format!("{b:02x}")).collect())),
    };
    let columns = vec![
        Json::String(d.reason.as_str().to_string()),
        Json::String(d.topic.clone()),
        Json::from(d.partition),
        Json::from(d.offset),
        payload,
        Json::String(d.error.clone()),
        time_json(d.routed_at),
    ];
    (columns, hex)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::DeadLetterReason;

    #[test]
    fn non_utf8_payloads_travel_as_hex_and_text_as_text() {
        let mut d = DeadLetter {
            reason: DeadLetterReason::Decode,
            topic: "t".into(),
            partition: 1,
            offset: 7,
            payload: vec![0xff, 0x00, 0x41],
            error: "bad".into(),
            routed_at: 1_000_000,
        };
        let (cols, hex) = dead_letter_columns(&d);
        assert_eq!(cols[4], Json::Null);
        assert_eq!(hex.as_deref(), Some("ff0041"));
        assert_eq!(cols[6], Json::String("1970-01-01T00:00:01.000000Z".into()));
        d.payload = b"{\"a\":1}".to_vec();
        let (cols, hex) = dead_letter_columns(&d);
        assert_eq!(cols[4], Json::String("{\"a\":1}".into()));
        assert!(hex.is_none());
    }

    #[test]
    fn values_become_json_of_their_column_type() {
        use crate::config::FieldType;
        assert_eq!(
            typed_json(FieldType::Timestamp, &Value::Int(0)),
            Json::String("1970-01-01T00:00:00.000000Z".into())
        );
        assert_eq!(typed_json(FieldType::Float, &Value::Int(3)), Json::from(3.0));
        assert_eq!(typed_json(FieldType::Float, &Value::Float(f64::NAN)), Json::Null);
        assert_eq!(typed_json(FieldType::String, &Value::Str("x".into())), Json::String("x".into()));
    }
}
