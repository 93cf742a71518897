//! The Kafka partitions one shard reads, through one consumer of its own. Partitions are
//! assigned (never subscribed) at the offsets stored with the last flushed epoch; an offset
//! the broker no longer has is a gap, fatal unless the source says `on_gap = "skip"`.

use std::ffi::{CStr, CString};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::Offset;

use super::{assignment_list, consumer_config, resolve_start, InputInfo, Polled, SourceError, SourcePartition};
use crate::config::{Config, GapPolicy};
use crate::state::{PartitionPosition, Recovered};
use crate::telemetry::ShardStats;
use crate::types::EventTime;

/// How long a shard waits for its topics' metadata before assigning its partitions.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

struct OwnedPartition {
    source: usize,
    partition: i32,
    topic: Rc<str>,
    /// The next offset to read, once known.
    next_offset: Option<i64>,
    /// The topic as a C string, for asking librdkafka the partition's high watermark.
    topic_c: CString,
    restored_max_event_time: Option<EventTime>,
}

pub struct KafkaSource {
    consumer: BaseConsumer,
    config: Arc<Config>,
    bootstrap: String,
    parts: Vec<OwnedPartition>,
    /// (topic, partition → index into `parts`)
    topics: Vec<(Rc<str>, Vec<Option<usize>>)>,
    stats: Arc<crate::telemetry::PipelineStats>,
    shard: usize,
}

fn client_error(bootstrap: &str) -> impl Fn(KafkaError) -> SourceError + '_ {
    move |source| SourceError::Client {
        bootstrap: bootstrap.to_string(),
        source,
    }
}

/// librdkafka's last known (low, high) watermarks of a partition (the high one updated with
/// every fetch; no request made), or `None` before the first fetch.
fn known_watermarks(consumer: &BaseConsumer, topic: &CStr, partition: i32) -> Option<(i64, i64)> {
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives; `topic` is NUL-terminated
    // and outlives the call; librdkafka only reads it and writes the two out-parameters, and
    // the call takes its own locks (it is documented as thread-safe and non-blocking).
    let err = unsafe { rdkafka::bindings::rd_kafka_get_watermark_offsets(consumer.client().native_ptr(), topic.as_ptr(), partition, &mut low, &mut high) };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some((low.max(0), high))
}

/// The next offset an assignment starts at, when it is a concrete one (not Beginning/End).
fn known_offset(offset: Offset) -> Option<i64> {
    match offset {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// A gap skipped because the source allows it: logged as data loss and counted.
fn record_skipped_gap(stats: &ShardStats, topic: &str, partition: i32, from: i64, to: i64) {
    tracing::error!(
        topic,
        partition,
        from,
        to,
        "data loss: offsets {from}..{to} were deleted by the broker before they were read; skipping them because on_gap = \"skip\""
    );
    ShardStats::add(&stats.gaps_skipped, 1);
    ShardStats::add(&stats.offsets_skipped, (to - from) as u64);
}

impl KafkaSource {
    /// Creates the shard's consumer and assigns `partitions` at their stored positions (or
    /// the sources' `starting_offsets`).
    pub fn open(
        config: Arc<Config>,
        bootstrap: &str,
        partitions: &[SourcePartition],
        recovered: &Recovered,
        stats: Arc<crate::telemetry::PipelineStats>,
        shard: usize,
    ) -> Result<KafkaSource, SourceError> {
        let consumer: BaseConsumer = consumer_config(&config, bootstrap).create().map_err(client_error(bootstrap))?;
        let mut topics: Vec<(Rc<str>, Vec<Option<usize>>)> = Vec::new();
        let mut parts = Vec::new();
        let mut assignment = Vec::new();
        for sp in partitions {
            let src = &config.sources[sp.source];
            let ti = match topics.iter().position(|t| *t.0 == *src.topic) {
                Some(ti) => ti,
                None => {
                    topics.push((src.topic.as_str().into(), Vec::new()));
                    topics.len() - 1
                }
            };
            let stored = recovered.positions.get(&(src.topic.clone(), sp.partition));
            let (offset, skipped) = resolve_start(
                &consumer,
                &src.topic,
                sp.partition,
                stored.map(|p| p.next_offset),
                src.starting_offsets,
                src.on_gap,
            )?;
            if let Some((from, to)) = skipped {
                record_skipped_gap(&stats.shards[shard], &src.topic, sp.partition, from, to);
            }
            let by_partition = &mut topics[ti].1;
            if by_partition.len() <= sp.partition as usize {
                by_partition.resize(sp.partition as usize + 1, None);
            }
            by_partition[sp.partition as usize] = Some(parts.len());
            parts.push(OwnedPartition {
                source: sp.source,
                partition: sp.partition,
                topic: topics[ti].0.clone(),
                next_offset: known_offset(offset),
                topic_c: CString::new(src.topic.as_str())
                    .map_err(|_| client_error(bootstrap)(KafkaError::ClientCreation(format!("topic name {:?} contains a NUL byte", src.topic))))?,
                restored_max_event_time: stored.and_then(|p| p.max_event_time),
            });
            assignment.push((src.topic.clone(), sp.partition, offset));
        }
        // librdkafka resolves a logical start (earliest/latest) once it has the topic's
        // metadata; a consumer without it waits for a 500 ms retry before its first fetch.
        for (topic, _) in &topics {
            if let Err(e) = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT) {
                tracing::debug!(topic = %topic, error = %e, "no topic metadata before assigning (the first fetch may start later)");
            }
        }
        let tpl = assignment_list(&assignment).map_err(client_error(bootstrap))?;
        consumer.assign(&tpl).map_err(client_error(bootstrap))?;
        Ok(KafkaSource {
            consumer,
            config,
            bootstrap: bootstrap.to_string(),
            parts,
            topics,
            stats,
            shard,
        })
    }

    pub fn inputs(&self) -> Vec<InputInfo> {
        self.parts
            .iter()
            .map(|p| InputInfo {
                source: p.source,
                partition: p.partition,
                label: p.topic.clone(),
                restored_max_event_time: p.restored_max_event_time,
            })
            .collect()
    }

    pub fn input_count(&self) -> usize {
        self.parts.len()
    }

    fn part_index(&self, topic: &str, partition: i32) -> Option<usize> {
        let t = self.topics.iter().find(|t| &*t.0 == topic)?;
        *t.1.get(partition as usize)?
    }

    /// Polls up to `max` messages without waiting.
    pub fn poll(&mut self, max: usize, mut on: impl FnMut(Polled<'_>)) -> Result<usize, SourceError> {
        let mut polled = 0;
        while polled < max {
            let msg = match self.consumer.poll(Duration::ZERO) {
                None => break,
                Some(Ok(m)) => m,
                Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange))) => {
                    self.handle_out_of_range()?;
                    break;
                }
                Some(Err(e)) => {
                    tracing::warn!(shard = self.shard, error = %e, "Kafka consumer error (librdkafka retries; check the broker if this repeats)");
                    break;
                }
            };
            polled += 1;
            let Some(pi) = self.part_index(msg.topic(), msg.partition()) else { continue };
            self.parts[pi].next_offset = Some(msg.offset() + 1);
            let payload = msg.payload().unwrap_or(&[]);
            on(Polled {
                input: pi,
                offset: msg.offset(),
                payload,
                file: "",
                is_record: true,
                bytes: payload.len() as u64,
                problem: None,
            });
        }
        Ok(polled)
    }

    /// The broker no longer has the offset we asked for: find which partitions, report the gap.
    fn handle_out_of_range(&mut self) -> Result<(), SourceError> {
        let mut reassign = false;
        for pi in 0..self.parts.len() {
            let part = &self.parts[pi];
            let src = &self.config.sources[part.source];
            let Some(next) = part.next_offset else { continue };
            let (offset, skipped) = resolve_start(&self.consumer, &src.topic, part.partition, Some(next), src.starting_offsets, src.on_gap)?;
            if let Some((from, to)) = skipped {
                debug_assert_eq!(src.on_gap, GapPolicy::Skip);
                record_skipped_gap(&self.stats.shards[self.shard], &src.topic, part.partition, from, to);
                self.parts[pi].next_offset = known_offset(offset).or(self.parts[pi].next_offset);
                reassign = true;
            }
        }
        if reassign {
            let list: Vec<_> = self
                .parts
                .iter()
                .map(|p| (p.topic.to_string(), p.partition, p.next_offset.map_or(Offset::Beginning, Offset::Offset)))
                .collect();
            let tpl = assignment_list(&list).map_err(client_error(&self.bootstrap))?;
            self.consumer.assign(&tpl).map_err(client_error(&self.bootstrap))?;
        }
        Ok(())
    }

    /// Messages behind the partition's end (-1 while unknown). Before the first record, the
    /// position is the start of the retained log.
    pub fn lag(&self, input: usize) -> i64 {
        let p = &self.parts[input];
        known_watermarks(&self.consumer, &p.topic_c, p.partition).map_or(-1, |(low, high)| (high - p.next_offset.unwrap_or(low)).max(0))
    }

    /// Where each partition stands, for the epoch's write batch (`max_event_time(input)`: the
    /// largest event time the shard saw on it).
    pub fn positions(&self, max_event_time: impl Fn(usize) -> Option<EventTime>, out: &mut Vec<PartitionPosition>) {
        out.extend(self.parts.iter().enumerate().filter_map(|(i, p)| {
            p.next_offset.map(|next_offset| PartitionPosition {
                topic: p.topic.to_string(),
                partition: p.partition,
                next_offset,
                max_event_time: max_event_time(i),
            })
        }));
    }
}
