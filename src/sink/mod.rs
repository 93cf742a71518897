//! Sinks: what each Delta table receives, its Arrow schema, and rows → `RecordBatch`.
//!
//! A sink is fed either by one query (closed windows) or by sources as their dead-letter
//! sink. Rows travel from the shards to the committer as [`SinkRows`], are kept in the state
//! store until the table holds them (pending output), and become Arrow only at commit time.

pub mod delta;
mod delta_error;
#[cfg(test)]
mod delta_ops_tests;
pub mod epoch;
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
    pub payload: Vec<u8>,
    pub error: String,
    /// When it was routed (wall clock, µs since the epoch).
    pub routed_at: EventTime,
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
    },
    DeadLetters,
}

#[derive(Debug, Clone)]
pub struct SinkPlan {
    pub name: String,
    pub path: PathBuf,
    /// Delta `txn` application id: `<pipeline>/<sink>`.
    pub app_id: String,
    pub schema: SchemaRef,
    pub role: SinkRole,
    /// The sink's table options.
    pub config: SinkConfig,
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
        let merge_keys = window_columns.iter().take(1).map(|c| c.to_string()).chain(key_names.iter().cloned()).collect();
        claim(
            q.sink_index,
            format!("query \"{}\"", q.name),
            SinkRole::Windows {
                query,
                window_columns,
                key_names,
                key_types: shape.key_types.clone(),
                value_names: shape.value_names.clone(),
                value_types: shape.value_types.clone(),
                mode: q.output,
                merge_keys,
            },
        )?;
    }
    for s in &config.sources {
        if let Some(dlq) = &s.on_error {
            let idx = config.sinks.iter().position(|k| &k.name == dlq).expect("compiled config");
            claim(idx, format!("dead letters of source \"{}\"", s.name), SinkRole::DeadLetters)?;
        }
    }
    let mut plans = Vec::new();
    for (sink, feeder) in config.sinks.iter().zip(feeders) {
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
            app_id: format!("{}/{}", config.pipeline.name, sink.name),
            schema,
            role,
            config: sink.clone(),
        });
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
