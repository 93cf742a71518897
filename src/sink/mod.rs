//! Sinks: what each Delta table receives, its Arrow schema, and rows → `RecordBatch`.
//!
//! A sink is fed either by one query (closed windows) or by sources as their dead-letter
//! sink. Rows travel from the shards to the committer as [`SinkRows`], are kept in the state
//! store until the table holds them (pending output), and become Arrow only at commit time.

pub mod delta;
mod delta_error;
#[cfg(test)]
mod delta_ops_tests;
pub mod durable;
pub mod epoch;
pub mod kafka;
mod table_files;

use std::path::PathBuf;
use std::sync::Arc;

use deltalake::arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};

use crate::config::{Config, FieldType, OutputMode, QueryKind, SinkConfig};
use crate::types::DeadLetterReason;
use crate::types::{decode_key, EventTime, Value};
use crate::window::{OutputRow, OutputShape};

/// A record that could not be processed, with everything needed to replay or debug it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub reason: DeadLetterReason,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Kept in pending output as text when it is UTF-8 (about its own size, not the ~3.6×
    /// of a JSON array of numbers); see [`payload_bytes`].
    #[serde(with = "payload_bytes")]
    pub payload: Vec<u8>,
    pub error: String,
    /// When it was routed (wall clock, µs since the epoch).
    pub routed_at: EventTime,
}

/// A dead letter's payload in the pending-output JSON: a string when the bytes are UTF-8,
/// `{"hex": "..."}` otherwise; an array of numbers (how older versions stored it) still reads.
mod payload_bytes {
    use serde::de::{self, MapAccess, SeqAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(bytes) {
            Ok(text) => s.serialize_str(text),
            Err(_) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("hex", &bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())?;
                m.end()
            }
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_any(PayloadVisitor)
    }

    struct PayloadVisitor;

    impl<'de> Visitor<'de> for PayloadVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a payload: a string, {\"hex\": ...} or an array of bytes")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
            Ok(v.as_bytes().to_vec())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::new();
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<u8>, A::Error> {
            let Some((key, hex)) = map.next_entry::<String, String>()? else {
                return Err(de::Error::custom("an empty payload object"));
            };
            if key != "hex" || hex.len() % 2 != 0 {
                return Err(de::Error::custom("a payload object holds \"hex\" with an even number of digits"));
            }
            (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(de::Error::custom))
                .collect()
        }
    }
}

/// Output of one epoch for one sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SinkRows {
    Windows(Vec<OutputRow>),
    DeadLetters(Vec<DeadLetter>),
}

impl SinkRows {
    pub fn len(&self) -> usize {
        match self {
            SinkRows::Windows(r) => r.len(),
            SinkRows::DeadLetters(r) => r.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn append(&mut self, other: SinkRows) {
        match (self, other) {
            (SinkRows::Windows(a), SinkRows::Windows(b)) => a.extend(b),
            (SinkRows::DeadLetters(a), SinkRows::DeadLetters(b)) => a.extend(b),
            _ => unreachable!("a sink receives one kind of rows (checked by plan_sinks)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum SinkRole {
    /// Result rows of query `query`.
    Windows {
        query: usize,
        /// Leading window columns (`window_start`, `window_end`; for sessions also `duration`).
        window_columns: Vec<&'static str>,
        /// Group-key columns (aggregations only).
        key_names: Vec<String>,
        key_types: Vec<FieldType>,
        /// Aggregates, then derived columns (or every column of the other query kinds).
        value_names: Vec<String>,
        value_types: Vec<FieldType>,
        mode: OutputMode,
        /// Columns identifying a row for upserts: window start (if any) and the group keys.
        merge_keys: Vec<String>,
        /// The query's `allowed_lateness` (µs): a window closes when the query's watermark
        /// passes its end plus this.
        allowed_lateness_us: i64,
    },
    DeadLetters,
}

#[derive(Debug, Clone)]
pub struct SinkPlan {
    pub name: String,
    pub path: PathBuf,
    /// Delta `txn` application id: `<pipeline>/<sink>`.
    pub app_id: String,
    /// Whether the sink holds the writer lock of its Delta table; not for the tasks of a
    /// scaled-out pipeline, which share their tables.
    pub lock_table: bool,
    pub schema: SchemaRef,
    pub role: SinkRole,
    /// The sink's table options.
    pub config: SinkConfig,
    /// Not fed by the shards: receives a copy of the rows of the first sink in its query's
    /// (or dead-letter) sink list, named here.
    pub copy_of: Option<String>,
    /// The plan index of `copy_of`.
    pub copy_from: Option<usize>,
}

impl SinkPlan {
    /// How this sink's table is written.
    pub fn mode(&self) -> OutputMode {
        match &self.role {
            SinkRole::Windows { mode, .. } => *mode,
            SinkRole::DeadLetters => OutputMode::Append,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("sink \"{sink}\" is fed by {first} and by {second}; give each query and each dead-letter stream its own sink")]
    SharedSink { sink: String, first: String, second: String },
    #[error("sources \"{first}\" and \"{second}\" share a dead-letter sink but list different ones (on_error = [{first_list}] and [{second_list}]); sources sharing a dead-letter sink must list the same sinks in the same order")]
    DeadLetterLists {
        first: String,
        first_list: String,
        second: String,
        second_list: String,
    },
    #[error("query \"{query}\" has no sink to write to (internal error: the configuration compiler resolves every query's sink)")]
    NoSink { query: String },
}

fn arrow_type(ty: FieldType) -> DataType {
    match ty {
        FieldType::String => DataType::Utf8,
        FieldType::Int => DataType::Int64,
        FieldType::Float => DataType::Float64,
        FieldType::Bool => DataType::Boolean,
        FieldType::Timestamp => timestamp_type(),
    }
}

fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// Decides which rows each sink receives and the table schema that follows.
/// `shapes`: each query's output shape, by query index.
pub fn plan_sinks(config: &Config, shapes: &[OutputShape]) -> Result<Vec<SinkPlan>, PlanError> {
    let mut feeders: Vec<Option<(String, SinkRole)>> = vec![None; config.sinks.len()];
    let mut claim = |sink: usize, who: String, role: SinkRole| -> Result<(), PlanError> {
        match &feeders[sink] {
            Some((first, SinkRole::DeadLetters)) if role == SinkRole::DeadLetters => {
                let _ = first; // several sources may share one dead-letter table
                Ok(())
            }
            Some((first, _)) => Err(PlanError::SharedSink {
                sink: config.sinks[sink].name.clone(),
                first: first.clone(),
                second: who,
            }),
            None => {
                feeders[sink] = Some((who, role));
                Ok(())
            }
        }
    };
    for (query, q) in config.queries.iter().enumerate() {
        let shape = &shapes[query];
        // Only aggregations have window and key columns of their own; the other kinds carry
        // every column as a value.
        let (window_columns, key_names) = match &q.kind {
            QueryKind::Aggregate => (q.window.columns().to_vec(), q.group_by.clone()),
            // Rows keyed (and upserted) by the primary key.
            QueryKind::Apply(a) => (Vec::new(), a.primary_key.clone()),
            _ => (Vec::new(), Vec::new()),
        };
        let merge_keys: Vec<String> = window_columns.iter().take(1).map(|c| c.to_string()).chain(key_names.iter().cloned()).collect();
        for &sink in &q.sink_indexes {
            claim(
                sink,
                format!("query \"{}\"", q.name),
                SinkRole::Windows {
                    query,
                    window_columns: window_columns.clone(),
                    key_names: key_names.clone(),
                    key_types: shape.key_types.clone(),
                    value_names: shape.value_names.clone(),
                    value_types: shape.value_types.clone(),
                    mode: q.output,
                    merge_keys: merge_keys.clone(),
                    allowed_lateness_us: i64::try_from(q.allowed_lateness.as_micros()).unwrap_or(i64::MAX),
                },
            )?;
        }
    }
    // Sources sharing a dead-letter sink list the same sinks: the first one receives the
    // rows, the others copies of them.
    let mut dead_letter_lists: Vec<(&str, &[String])> = Vec::new();
    for s in &config.sources {
        if let Some(first) = dead_letter_lists.iter().find(|(_, list)| list.iter().any(|n| s.on_error.contains(n))) {
            if first.1 != s.on_error.as_slice() {
                return Err(PlanError::DeadLetterLists {
                    first: first.0.to_string(),
                    first_list: first.1.join(", "),
                    second: s.name.clone(),
                    second_list: s.on_error.join(", "),
                });
            }
        } else if !s.on_error.is_empty() {
            dead_letter_lists.push((&s.name, &s.on_error));
        }
        for dlq in &s.on_error {
            let idx = config.sinks.iter().position(|k| &k.name == dlq).expect("compiled config");
            claim(idx, format!("dead letters of source \"{}\"", s.name), SinkRole::DeadLetters)?;
        }
    }
    // Extra sinks of a query or dead-letter list get a copy of the first sink's rows.
    let mut copy_of_name: Vec<Option<&str>> = vec![None; config.sinks.len()];
    let lists = config
        .queries
        .iter()
        .map(|q| q.sinks.as_slice())
        .chain(config.sources.iter().map(|s| s.on_error.as_slice()));
    for list in lists {
        for extra in list.iter().skip(1) {
            let idx = config.sinks.iter().position(|k| &k.name == extra).expect("compiled config");
            copy_of_name[idx] = Some(list[0].as_str());
        }
    }
    let mut plans = Vec::new();
    for ((sink, feeder), copy_of) in config.sinks.iter().zip(feeders).zip(&copy_of_name) {
        let Some((_, role)) = feeder else {
            tracing::warn!(sink = %sink.name, "sink is not fed by any query or source; it is ignored");
            continue;
        };
        let schema = match &role {
            SinkRole::Windows {
                window_columns,
                key_names,
                key_types,
                value_names,
                value_types,
                ..
            } => {
                let mut fields: Vec<Field> = window_columns
                    .iter()
                    .map(|c| match *c {
                        "duration" => Field::new(*c, DataType::Float64, false),
                        _ => Field::new(*c, timestamp_type(), false),
                    })
                    .collect();
                fields.extend(key_names.iter().zip(key_types).map(|(n, t)| Field::new(n, arrow_type(*t), true)));
                fields.extend(value_names.iter().zip(value_types).map(|(n, t)| Field::new(n, arrow_type(*t), true)));
                Arc::new(Schema::new(fields))
            }
            SinkRole::DeadLetters => delta::dead_letter_schema(),
        };
        plans.push(SinkPlan {
            name: sink.name.clone(),
            path: sink.path.clone(),
            app_id: match config.task {
                // Each task of a scaled-out pipeline numbers its own epochs.
                Some(task) => format!("{}/{}/task-{}", config.pipeline.name, sink.name, task.partition),
                None => format!("{}/{}", config.pipeline.name, sink.name),
            },
            // The tasks of a scaled-out pipeline share tables, and a task moved away from a
            // stalled process must not wait for it: the task's changelog fences the old owner
            // instead (it cannot commit another epoch, and an epoch it already committed is
            // skipped by the txn check).
            lock_table: config.task.is_none(),
            schema,
            role,
            config: sink.clone(),
            copy_of: copy_of.map(str::to_string),
            copy_from: None,
        });
    }
    // Names → plan indexes, now that unfed sinks are left out.
    for i in 0..plans.len() {
        if let Some(name) = &plans[i].copy_of {
            let primary = plans.iter().position(|p| &p.name == name).expect("the first sink of a list is fed");
            plans[i].copy_from = Some(primary);
        }
    }
    Ok(plans)
}

/// Converts one epoch's rows for `plan` into a RecordBatch of its schema.
pub fn to_record_batch(plan: &SinkPlan, rows: &SinkRows) -> Result<RecordBatch, String> {
    let columns: Vec<ArrayRef> = match (rows, &plan.role) {
        (
            SinkRows::Windows(rows),
            SinkRole::Windows {
                window_columns,
                key_types,
                value_types,
                ..
            },
        ) => {
            let keys: Vec<Vec<Value>> = rows.iter().map(|r| decode_key(&r.key).map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
            let mut cols: Vec<ArrayRef> = Vec::new();
            for c in window_columns {
                cols.push(match *c {
                    "duration" => {
                        let mut b = Float64Builder::new();
                        rows.iter().for_each(|r| b.append_value((r.window_end - r.window_start) as f64 / 1e6));
                        Arc::new(b.finish())
                    }
                    c if c.ends_with("_start") => time_column(rows.iter().map(|r| Some(r.window_start))),
                    _ => time_column(rows.iter().map(|r| Some(r.window_end))),
                });
            }
            for (i, ty) in key_types.iter().enumerate() {
                cols.push(value_column(*ty, keys.iter().map(|k| k.get(i).unwrap_or(&Value::Null)))?);
            }
            for (i, ty) in value_types.iter().enumerate() {
                cols.push(value_column(*ty, rows.iter().map(|r| r.values.get(i).unwrap_or(&Value::Null)))?);
            }
            cols
        }
        (SinkRows::DeadLetters(rows), SinkRole::DeadLetters) => {
            let mut reason = StringBuilder::new();
            let mut topic = StringBuilder::new();
            let mut partition = Int32Builder::new();
            let mut offset = Int64Builder::new();
            let mut payload = BinaryBuilder::new();
            let mut error = StringBuilder::new();
            for r in rows {
                reason.append_value(r.reason.as_str());
                topic.append_value(&r.topic);
                partition.append_value(r.partition);
                offset.append_value(r.offset);
                payload.append_value(&r.payload);
                error.append_value(&r.error);
            }
            vec![
                Arc::new(reason.finish()),
                Arc::new(topic.finish()),
                Arc::new(partition.finish()),
                Arc::new(offset.finish()),
                Arc::new(payload.finish()),
                Arc::new(error.finish()),
                time_column(rows.iter().map(|r| Some(r.routed_at))),
            ]
        }
        _ => return Err(format!("sink \"{}\" received rows of the wrong kind (internal error)", plan.name)),
    };
    RecordBatch::try_new(plan.schema.clone(), columns).map_err(|e| format!("sink \"{}\": building the Arrow batch failed: {e} (internal error)", plan.name))
}

fn time_column(values: impl Iterator<Item = Option<EventTime>>) -> ArrayRef {
    let mut b = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    values.for_each(|v| b.append_option(v));
    Arc::new(b.finish())
}

fn value_column<'a>(ty: FieldType, values: impl Iterator<Item = &'a Value>) -> Result<ArrayRef, String> {
    let mismatch = |v: &Value| format!("value {v:?} does not fit column type {ty:?} (internal error)");
    Ok(match ty {
        FieldType::String => {
            let mut b = StringBuilder::new();
            for v in values {
                match v {
                    Value::Str(s) => b.append_value(s),
                    Value::Null => b.append_null(),
                    other => return Err(mismatch(other)),
                }
            }
            Arc::new(b.finish())
        }
        FieldType::Int => {
            let mut b = Int64Builder::new();
            for v in values {
                match v {
                    Value::Int(i) => b.append_value(*i),
                    Value::Null => b.append_null(),
                    other => return Err(mismatch(other)),
                }
            }
            Arc::new(b.finish())
        }
        FieldType::Float => {
            let mut b = Float64Builder::new();
            for v in values {
                match v {
                    Value::Float(f) => b.append_value(*f),
                    Value::Int(i) => b.append_value(*i as f64),
                    Value::Null => b.append_null(),
                    other => return Err(mismatch(other)),
                }
            }
            Arc::new(b.finish())
        }
        FieldType::Bool => {
            let mut b = BooleanBuilder::new();
            for v in values {
                match v {
                    Value::Bool(x) => b.append_value(*x),
                    Value::Null => b.append_null(),
                    other => return Err(mismatch(other)),
                }
            }
            Arc::new(b.finish())
        }
        FieldType::Timestamp => {
            let mut out = Vec::new();
            for v in values {
                out.push(match v {
                    Value::Time(t) | Value::Int(t) => Some(*t),
                    Value::Null => None,
                    other => return Err(mismatch(other)),
                });
            }
            time_column(out.into_iter())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(payload: &[u8]) -> DeadLetter {
        DeadLetter {
            reason: DeadLetterReason::Decode,
            topic: "t".into(),
            partition: 0,
            offset: 1,
            payload: payload.to_vec(),
            error: "e".into(),
            routed_at: 2,
        }
    }

    /// Pending dead letters round-trip exactly, text payloads about their own size; the array
    /// form older versions wrote still reads.
    #[test]
    fn dead_letter_payloads_are_stored_compactly_and_round_trip() {
        let text = br#"{"user_id":"u1","page_url":"/a","timestamp":"2026-11-23T00:00:00Z"}"#;
        for payload in [&text[..], &[0xff, 0x00, 0x41][..], &[][..]] {
            let rows = SinkRows::DeadLetters(vec![letter(payload)]);
            let json = serde_json::to_vec(&rows).unwrap();
            assert_eq!(serde_json::from_slice::<SinkRows>(&json).unwrap(), rows);
        }
        let json = serde_json::to_vec(&letter(text)).unwrap();
        let overhead = json.len() - text.len();
        assert!(overhead < 150, "{} bytes for a {}-byte payload", json.len(), text.len());
        let old = r#"{"reason":"Decode","topic":"t","partition":0,"offset":1,"payload":[104,105],"error":"e","routed_at":2}"#;
        assert_eq!(serde_json::from_str::<DeadLetter>(old).unwrap().payload, b"hi");
    }
}
