//! The repartitioner of a task: rewrites a source whose messages are not keyed by what its
//! queries keep state by into the source's repartition topic, keyed right.
//!
//! Task `p` repartitions the partitions `u` of such a source with `u % tasks == p`. Each
//! record goes, unchanged, to partition `hash(key fields) % tasks` of the repartition topic,
//! which task `hash % tasks` reads in place of the source. Records and the source offsets
//! they came from are committed in one Kafka transaction per commit interval (the offsets to
//! the pipeline's group, with the partition's largest event time as their metadata), so a
//! record is in the repartition topic exactly once however the repartitioner stops. Its
//! transactional id names the task: whoever runs the task next fences the one before.
//!
//! Window closing stays what one process would decide. Every record carries its source
//! partition, its offset there and the partition's largest event time *before* it, so the
//! reading task judges it late exactly as a task reading the source partition would. Each
//! transaction also writes a *marker* to every partition of the topic for each source
//! partition whose clock moved (its largest event time, and whether it is idle: quiet for
//! its idle timeout and read to its end), and again every few seconds: a reading task's
//! watermark is the min over all source partitions of what they last told it, so a fast
//! partition never makes a slow one's records late, and a replay of the topic decides the
//! same.

use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::{Config, Repartition, TaskId};
use crate::decode::SourceDecoder;
use crate::source::carried::write_headers;
use crate::source::SourceError;
use crate::types::{key_hash, EventTime};
use crate::watermark::{PartitionClock, Progress};

/// A marker is written again this often even when nothing changed, so a reading task that
/// restarted learns every partition's standing.
const HEARTBEAT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Offset-commit metadata: `max=<largest event time>`.
const MAX_METADATA: &str = "max=";

#[derive(Debug, thiserror::Error)]
pub enum RepartitionError {
    #[error("repartitioning: Kafka failed while {what}: {source} (is the broker up and the address right?)")]
    Kafka { what: String, source: KafkaError },
    #[error(transparent)]
    Source(#[from] SourceError),
}

fn kafka(what: impl Into<String>) -> impl FnOnce(KafkaError) -> RepartitionError {
    let what = what.into();
    move |source| RepartitionError::Kafka { what, source }
}

/// One source partition a repartitioner reads.
struct Upstream {
    /// Index into `[scale].repartition`.
    plan: usize,
    partition: i32,
    topic_c: CString,
    next_offset: Option<i64>,
    clock: PartitionClock,
    /// The last marker written: (largest event time, idle, when).
    marked: Option<(Option<EventTime>, bool, Instant)>,
}

/// What one task repartitions.
pub struct Repartitioner {
    task: TaskId,
    /// (index into `[scale].repartition`, source partition).
    parts: Vec<(usize, i32)>,
}

impl Repartitioner {
    /// The source partitions task `task` repartitions (`counts`: the sources' partition
    /// counts); `None` when there are none.
    pub fn plan(config: &Config, task: TaskId, counts: &[i32]) -> Option<Repartitioner> {
        let plans = config.scale.iter().flat_map(|s| s.repartition.iter().enumerate());
        let parts: Vec<(usize, i32)> = plans
            .flat_map(|(i, r)| (0..counts[r.source]).filter(|u| u % task.of == task.partition).map(move |u| (i, u)))
            .collect();
        (!parts.is_empty()).then_some(Repartitioner { task, parts })
    }

    /// Repartitions until `shutdown` is set, then commits and returns. Any Kafka error ends
    /// it: the open transaction is aborted by whoever runs the task next, which starts again
    /// from the committed offsets.
    pub fn run(config: &Config, bootstrap: &str, plan: Repartitioner, shutdown: &AtomicBool) -> Result<(), RepartitionError> {
        let plans: &[Repartition] = &config.scale.as_ref().expect("a [scale] pipeline").repartition;
        let tasks = plan.task.of;
        let transactional_id = format!("tidemark/{}/repartition-{}", config.pipeline.name, plan.task.partition);
        let mut c = crate::source::client_config(config, bootstrap);
        c.set("transactional.id", &transactional_id)
            .set("enable.idempotence", "true")
            .set("transaction.timeout.ms", "600000")
            .set("linger.ms", "5");
        let producer: ThreadedProducer<DefaultProducerContext> = c.create().map_err(kafka(format!("creating the producer {transactional_id}")))?;
        crate::changelog::retry_call(|| producer.init_transactions(REQUEST_TIMEOUT)).map_err(kafka(format!(
            "taking over the repartitioning of task {} ({transactional_id})",
            plan.task.partition
        )))?;

        let consumer: BaseConsumer = crate::source::consumer_config(config, bootstrap)
            .create()
            .map_err(kafka("creating the repartitioner's consumer"))?;
        let topic = |i: usize| config.sources[plans[i].source].topic.as_str();
        let mut wanted = TopicPartitionList::new();
        for &(i, u) in &plan.parts {
            wanted.add_partition(topic(i), u);
        }
        let committed = consumer
            .committed_offsets(wanted, REQUEST_TIMEOUT)
            .map_err(kafka(format!("reading the offsets committed for group \"{}\"", config.kafka.group_id)))?;
        let now = Instant::now();
        let mut ups = Vec::new();
        let mut assignment = Vec::new();
        for &(i, u) in &plan.parts {
            let source = &config.sources[plans[i].source];
            let elem = committed.find_partition(&source.topic, u);
            let stored = elem.as_ref().and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
            let max = elem
                .as_ref()
                .and_then(|e| e.metadata().strip_prefix(MAX_METADATA).and_then(|m| m.parse::<EventTime>().ok()));
            let (offset, skipped) = crate::source::resolve_start(&consumer, &source.topic, u, stored, source.starting_offsets, source.on_gap)?;
            if let Some((from, to)) = skipped {
                tracing::error!(topic = %source.topic, partition = u, from, to, "data loss: offsets {from}..{to} were deleted by the broker before they were repartitioned; skipping them because on_gap = \"skip\"");
            }
            assignment.push((source.topic.clone(), u, offset));
            ups.push(Upstream {
                plan: i,
                partition: u,
                topic_c: CString::new(source.topic.as_str()).unwrap_or_default(),
                next_offset: match offset {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                },
                clock: PartitionClock::new(source.watermark.delay, source.watermark.idle_timeout, max, now),
                marked: None,
            });
        }
        let list = crate::source::assignment_list(&assignment).map_err(kafka("listing the partitions to read"))?;
        consumer.assign(&list).map_err(kafka("assigning the partitions to repartition"))?;
        let group = consumer.group_metadata().ok_or_else(|| RepartitionError::Kafka {
            what: "reading the consumer's group metadata".into(),
            source: KafkaError::ClientCreation("no group metadata".into()),
        })?;
        tracing::info!(task = plan.task.partition, partitions = ups.len(), "repartitioning");

        let mut decoders: Vec<SourceDecoder> = plans.iter().map(|r| SourceDecoder::new(&config.sources[r.source])).collect();
        let mut key = Vec::new();
        loop {
            let round_end = Instant::now() + config.pipeline.commit_interval;
            let mut open = false;
            while Instant::now() < round_end && !shutdown.load(Relaxed) {
                let msg = match consumer.poll(Duration::from_millis(50)) {
                    None => continue,
                    Some(Ok(m)) => m,
                    Some(Err(e @ KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange))) => {
                        return Err(kafka("reading a source partition (its stored offset is gone: see on_gap)")(e));
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "repartitioner's consumer (librdkafka retries; check the broker if this repeats)");
                        continue;
                    }
                };
                let Some(up) = ups.iter_mut().find(|x| x.partition == msg.partition() && topic(x.plan) == msg.topic()) else {
                    continue;
                };
                if !open {
                    producer.begin_transaction().map_err(kafka("beginning a transaction"))?;
                    open = true;
                }
                let payload = msg.payload().unwrap_or(&[]);
                let r = &plans[up.plan];
                let decoder = &mut decoders[up.plan];
                key.clear();
                let before = up.clock.max_event_time;
                let to = match decoder.decode(payload) {
                    Ok(t) => {
                        for &f in &r.key {
                            decoder.write_key_component(payload, f, &mut key);
                        }
                        let future = config.sources[r.source]
                            .watermark
                            .max_future
                            .is_some_and(|m| t > crate::time::now_micros().saturating_add(m.as_micros() as i64));
                        if !future {
                            up.clock.observe(t, Instant::now());
                        }
                        (key_hash(&key) % tasks as u64) as i32
                    }
                    // The reading task dead-letters it with the same message.
                    Err(_) => up.partition % tasks,
                };
                let headers = write_headers(up.partition, Some(msg.offset()), before, None);
                let record = BaseRecord::to(&r.topic).partition(to).key(&key[..]).payload(payload).headers(headers);
                crate::changelog::send_waiting(&producer, record).map_err(kafka("writing to a repartition topic"))?;
                up.next_offset = Some(msg.offset() + 1);
            }
            let now = Instant::now();
            for up in &mut ups {
                let caught_up = crate::source::kafka::known_watermarks(&consumer, &up.topic_c, up.partition)
                    .is_some_and(|(low, high)| up.next_offset.unwrap_or(low) >= high);
                let idle = up.clock.is_idle(now, if caught_up { Progress::CaughtUp } else { Progress::Behind });
                let max = up.clock.max_event_time;
                let due = up.marked.is_none_or(|(m, i, at)| m != max || i != idle || now.duration_since(at) >= HEARTBEAT);
                if !due {
                    continue;
                }
                if !open {
                    producer.begin_transaction().map_err(kafka("beginning a transaction"))?;
                    open = true;
                }
                for to in 0..tasks {
                    let headers = write_headers(up.partition, None, max, Some(idle));
                    let marker = BaseRecord::<[u8], [u8]>::to(&plans[up.plan].topic).partition(to).headers(headers);
                    crate::changelog::send_waiting(&producer, marker).map_err(kafka("writing to a repartition topic"))?;
                }
                up.marked = Some((max, idle, now));
            }
            if open {
                let mut offsets = TopicPartitionList::new();
                for up in &ups {
                    let Some(next) = up.next_offset else { continue };
                    offsets
                        .add_partition_offset(topic(up.plan), up.partition, Offset::Offset(next))
                        .map_err(kafka("listing the offsets to commit"))?;
                    if let (Some(m), Some(mut e)) = (up.clock.max_event_time, offsets.find_partition(topic(up.plan), up.partition)) {
                        e.set_metadata(format!("{MAX_METADATA}{m}"));
                    }
                }
                crate::changelog::retry_call(|| producer.send_offsets_to_transaction(&offsets, &group, REQUEST_TIMEOUT))
                    .map_err(kafka("adding the source offsets to the transaction"))?;
                crate::changelog::retry_call(|| producer.commit_transaction(COMMIT_TIMEOUT)).map_err(kafka("committing a transaction"))?;
            }
            if shutdown.load(Relaxed) {
                tracing::info!(task = plan.task.partition, "repartitioner stopped");
                return Ok(());
            }
        }
    }
}
