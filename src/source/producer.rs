//! Producing events into Kafka: a small producer wrapper and the paced generator loop.
//!
//! Used by `tidemark generate`, by the daemon's built-in generator thread and by tests; it
//! works against any Kafka-protocol broker (the [embedded one](crate::broker) or a real one).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Message};

use super::generator::{ClickGenerator, EventKind, GeneratedEvent};

/// How long [`EventProducer::connect`] waits for the broker to answer a metadata request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`run_generator`] waits for outstanding deliveries before returning.
pub(crate) const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// Serve delivery reports every this many sends, so they never pile up unread.
const POLL_EVERY_SENDS: u64 = 256;
/// How long to wait for room when librdkafka's local queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(10);
/// The pacing loop sleeps at most this long at a time, so it notices `stop` quickly.
const MAX_PACING_SLEEP: Duration = Duration::from_millis(50);

/// Why producing failed.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// librdkafka rejected the producer configuration.
    #[error("could not create a Kafka producer for `{bootstrap_servers}`: {source}; check the bootstrap servers setting")]
    Create {
        bootstrap_servers: String,
        #[source]
        source: KafkaError,
    },
    /// No broker answered at the bootstrap address.
    #[error("no Kafka broker answered at `{bootstrap_servers}` within {timeout:?}: {source}; check that the broker is running and the address is right")]
    Unreachable {
        bootstrap_servers: String,
        timeout: Duration,
        #[source]
        source: KafkaError,
    },
    /// The message could not even be queued locally (e.g. too large, bad topic name).
    #[error("could not queue a message for topic `{topic}`: {source}; check the topic name, partition and message size")]
    Enqueue {
        topic: String,
        #[source]
        source: KafkaError,
    },
    /// Messages were still undelivered when the flush timeout ran out; they stay queued.
    #[error("{in_flight} messages were still undelivered after {timeout:?}; the broker may be down or overloaded: check it, then flush again")]
    FlushTimedOut { in_flight: i32, timeout: Duration },
    /// librdkafka failed the flush for another reason.
    #[error("flushing the Kafka producer failed: {0}; check the broker")]
    Flush(#[source] KafkaError),
    /// The broker rejected messages, or they timed out in the producer (`message.timeout.ms`).
    #[error("{failed} messages could not be delivered (first error: {first_error}); check that the topic and partition exist and the broker is healthy, then produce them again")]
    DeliveryFailed { failed: u64, first_error: String },
}

/// Counts delivery reports; librdkafka calls it from [`BaseProducer::poll`].
#[derive(Default)]
struct DeliveryTracker {
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((error, message)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
                if first.is_none() {
                    *first = Some(format!("{error} (topic `{}`, partition {})", message.topic(), message.partition()));
                }
            }
        }
    }
}

/// A Kafka producer tuned for streams of small events: 5 ms linger so messages travel in
/// batches, `acks=all`, key-hash partitioning by librdkafka.
///
/// Call [`flush`](Self::flush) before dropping it: dropping purges whatever is still queued.
pub struct EventProducer {
    producer: BaseProducer<DeliveryTracker>,
    sends: AtomicU64,
}

impl EventProducer {
    /// Creates the producer and checks that a broker answers at `bootstrap_servers`.
    pub fn connect(bootstrap_servers: &str) -> Result<Self, ProducerError> {
        let producer: BaseProducer<DeliveryTracker> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap_servers)
            .set("client.id", "tidemark-producer")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .create_with_context(DeliveryTracker::default())
            .map_err(|source| ProducerError::Create {
                bootstrap_servers: bootstrap_servers.to_owned(),
                source,
            })?;
        // Creating a client never fails for an unreachable broker; ask it something so a
        // wrong address is reported now rather than as delivery timeouts minutes later.
        producer
            .client()
            .fetch_metadata(None, CONNECT_TIMEOUT)
            .map_err(|source| ProducerError::Unreachable {
                bootstrap_servers: bootstrap_servers.to_owned(),
                timeout: CONNECT_TIMEOUT,
                source,
            })?;
        Ok(EventProducer {
            producer,
            sends: AtomicU64::new(0),
        })
    }

    /// Queue one message; when the local queue is full, poll and retry (never drop).
    ///
    /// With `partition: None` librdkafka picks the partition by hashing `key`.
    pub fn send(&self, topic: &str, partition: Option<i32>, key: &[u8], payload: &[u8]) -> Result<(), ProducerError> {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).key(key).payload(payload);
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    // Serving delivery reports is what frees queue slots.
                    record = returned;
                    self.producer.poll(QUEUE_FULL_WAIT);
                }
                Err((source, _)) => {
                    return Err(ProducerError::Enqueue {
                        topic: topic.to_owned(),
                        source,
                    })
                }
            }
        }
        if self.sends.fetch_add(1, Ordering::Relaxed).is_multiple_of(POLL_EVERY_SENDS) {
            self.producer.poll(Duration::ZERO);
        }
        Ok(())
    }

    /// Block until everything queued is delivered, or error after `timeout`.
    ///
    /// Delivery failures seen since the previous flush are reported as
    /// [`ProducerError::DeliveryFailed`] (and then forgotten).
    pub fn flush(&self, timeout: Duration) -> Result<(), ProducerError> {
        match self.producer.flush(timeout) {
            Ok(()) => {}
            Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) => {
                return Err(ProducerError::FlushTimedOut {
                    in_flight: self.producer.in_flight_count(),
                    timeout,
                })
            }
            Err(other) => return Err(ProducerError::Flush(other)),
        }
        let tracker = self.producer.context();
        let failed = tracker.failed.swap(0, Ordering::Relaxed);
        if failed > 0 {
            let first_error = tracker
                .first_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .unwrap_or_else(|| "unknown".to_owned());
            return Err(ProducerError::DeliveryFailed { failed, first_error });
        }
        Ok(())
    }

    /// Messages the broker has acknowledged so far.
    pub fn delivered_count(&self) -> u64 {
        self.producer.context().delivered.load(Ordering::Relaxed)
    }

    /// Serve delivery reports (and wait up to `timeout` for one); frees local queue slots.
    pub fn poll(&self, timeout: Duration) {
        self.producer.poll(timeout);
    }

    /// Delivery failures not yet reported by [`flush`](Self::flush).
    pub fn unreported_failures(&self) -> u64 {
        self.producer.context().failed.load(Ordering::Relaxed)
    }
}

/// What [`run_generator`] produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GeneratorReport {
    pub produced: u64,
    pub valid: u64,
    pub very_late: u64,
    pub malformed: u64,
    pub elapsed: Duration,
}

/// Paced generation: produce `count` events (None = until `stop` is set) at `rate_per_sec`
/// (0 = flat out) from `generator` into `topic`, event time = wall clock ms. Returns counts
/// by kind. Used by `tidemark generate` and by the daemon's built-in generator thread.
///
/// Pacing follows a fixed schedule from the start (event *n* is due at *n* / rate), so a
/// slow moment is caught up in a burst rather than lowering the average rate. `stop` is
/// checked before every event and at least every 50 ms while waiting. Before returning, it
/// flushes for up to 30 s, so `Ok` means everything was delivered; it stops early with an
/// error as soon as a delivery failure is seen.
pub fn run_generator(
    producer: &EventProducer,
    topic: &str,
    generator: &mut ClickGenerator,
    rate_per_sec: u64,
    count: Option<u64>,
    stop: &AtomicBool,
) -> Result<GeneratorReport, ProducerError> {
    let start = Instant::now();
    let mut report = GeneratorReport::default();
    let mut event = GeneratedEvent::default();
    loop {
        if count.is_some_and(|count| report.produced >= count) || stop.load(Ordering::Relaxed) {
            break;
        }
        if rate_per_sec > 0 {
            let due_at = Duration::from_nanos(
                (u128::from(report.produced) * 1_000_000_000 / u128::from(rate_per_sec))
                    .try_into()
                    .unwrap_or(u64::MAX),
            );
            let elapsed = start.elapsed();
            if due_at > elapsed {
                // Keep serving delivery reports while idle at low rates.
                producer.producer.poll(Duration::ZERO);
                std::thread::sleep((due_at - elapsed).min(MAX_PACING_SLEEP));
                continue;
            }
        }
        generator.next_event_into(wall_clock_ms(), &mut event);
        producer.send(topic, None, &event.key, &event.payload)?;
        report.produced += 1;
        match event.kind {
            EventKind::Valid => report.valid += 1,
            EventKind::VeryLate => report.very_late += 1,
            EventKind::Malformed(_) => report.malformed += 1,
        }
        if report.produced.is_multiple_of(4096) && producer.unreported_failures() > 0 {
            // Report the failure now instead of producing into a broken topic for hours.
            producer.flush(FINAL_FLUSH_TIMEOUT)?;
        }
    }
    producer.flush(FINAL_FLUSH_TIMEOUT)?;
    report.elapsed = start.elapsed();
    tracing::debug!(
        produced = report.produced,
        valid = report.valid,
        very_late = report.very_late,
        malformed = report.malformed,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "generator finished"
    );
    Ok(report)
}

pub(crate) fn wall_clock_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::EmbeddedBroker;
    use crate::source::generator::ClickGeneratorSettings;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    use std::sync::Arc;

    const PARTITIONS: i32 = 4;

    fn generator(seed: u64) -> ClickGenerator {
        ClickGenerator::new(ClickGeneratorSettings {
            seed,
            users: 200,
            pages: 20,
            disorder_ms: 1_000,
            late_share: 0.05,
            late_by_ms: 60_000,
            malformed_share: 0.05,
        })
    }

    /// Reads `expected` messages from all partitions of `topic` from the beginning, as
    /// (partition, key, payload).
    fn consume_all(servers: &str, topic: &str, expected: usize) -> Vec<(i32, Vec<u8>, Vec<u8>)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", servers)
            .set("group.id", "tidemark-producer-test")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut assignment = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            assignment.add_partition_offset(topic, partition, Offset::Beginning).unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut messages = Vec::with_capacity(expected);
        while messages.len() < expected && Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => messages.push((
                    message.partition(),
                    message.key().unwrap_or_default().to_vec(),
                    message.payload().unwrap_or_default().to_vec(),
                )),
                Some(Err(error)) => panic!("consumer error: {error}"),
                None => {}
            }
        }
        // Nothing beyond what was produced.
        assert!(consumer.poll(Duration::from_millis(300)).is_none());
        messages
    }

    fn multiset(payloads: impl IntoIterator<Item = Vec<u8>>) -> BTreeMap<Vec<u8>, usize> {
        let mut counts = BTreeMap::new();
        for payload in payloads {
            *counts.entry(payload).or_default() += 1;
        }
        counts
    }

    #[test]
    fn round_trip_through_embedded_broker_keeps_every_payload() {
        let broker = EmbeddedBroker::start(&[("clicks".to_owned(), PARTITIONS)]).unwrap();
        let producer = EventProducer::connect(broker.bootstrap_servers()).unwrap();
        let mut generator = generator(1);
        let base_ms = 1_795_464_000_000;
        let sent: Vec<GeneratedEvent> = (0..1_000).map(|seq| generator.next_event(base_ms + seq * 10)).collect();
        for event in &sent {
            producer.send("clicks", None, &event.key, &event.payload).unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
        assert_eq!(producer.delivered_count(), 1_000);

        let received = consume_all(broker.bootstrap_servers(), "clicks", sent.len());
        assert_eq!(received.len(), sent.len());
        assert_eq!(
            multiset(received.iter().map(|(_, _, payload)| payload.clone())),
            multiset(sent.iter().map(|event| event.payload.clone())),
        );
        // librdkafka hashed the keys: one partition per user, several partitions in use.
        let mut partitions_by_key: HashMap<&[u8], BTreeSet<i32>> = HashMap::new();
        for (partition, key, _) in &received {
            partitions_by_key.entry(key).or_default().insert(*partition);
        }
        assert!(partitions_by_key.values().all(|set| set.len() == 1));
        let used: BTreeSet<i32> = received.iter().map(|(p, _, _)| *p).collect();
        assert_eq!(used.len(), PARTITIONS as usize);
    }

    #[test]
    fn explicit_partition_is_respected() {
        let broker = EmbeddedBroker::start(&[("pinned".to_owned(), PARTITIONS)]).unwrap();
        let producer = EventProducer::connect(broker.bootstrap_servers()).unwrap();
        for i in 0..50u32 {
            let key = format!("u{i}");
            producer.send("pinned", Some(2), key.as_bytes(), b"{}").unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
        let received = consume_all(broker.bootstrap_servers(), "pinned", 50);
        assert_eq!(received.len(), 50);
        assert!(received.iter().all(|(partition, _, _)| *partition == 2));
    }

    #[test]
    fn producing_to_a_missing_partition_is_reported() {
        let broker = EmbeddedBroker::start(&[("small".to_owned(), 1)]).unwrap();
        let producer = EventProducer::connect(broker.bootstrap_servers()).unwrap();
        // `connect` fetched metadata, so librdkafka refuses the message right away.
        let error = producer.send("small", Some(7), b"u1", b"{}").unwrap_err();
        assert!(matches!(error, ProducerError::Enqueue { .. }), "{error}");

        // For a topic created after `connect` it only learns of the missing partition once
        // its metadata arrives, and fails the delivery instead.
        broker.create_topic("fresh", 1).unwrap();
        producer.send("fresh", Some(7), b"u1", b"{}").unwrap();
        producer.send("fresh", Some(0), b"u1", b"{}").unwrap();
        match producer.flush(Duration::from_secs(10)) {
            Err(ProducerError::DeliveryFailed { failed, first_error }) => {
                assert_eq!(failed, 1);
                assert!(first_error.contains("fresh"), "{first_error}");
            }
            other => panic!("expected a delivery failure, got {other:?}"),
        }
        // Reported once; the producer keeps working.
        producer.send("fresh", Some(0), b"u2", b"{}").unwrap();
        producer.flush(Duration::from_secs(10)).unwrap();
        assert_eq!(producer.delivered_count(), 2);
    }

    #[test]
    fn connect_reports_an_unreachable_broker() {
        // Bind and drop a listener to get a port where nothing listens.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let error = EventProducer::connect(&format!("127.0.0.1:{port}")).err().expect("no broker there");
        assert!(matches!(error, ProducerError::Unreachable { .. }), "{error}");
    }

    #[test]
    fn run_generator_paces_counts_and_delivers() {
        let broker = EmbeddedBroker::start(&[("paced".to_owned(), PARTITIONS)]).unwrap();
        let producer = EventProducer::connect(broker.bootstrap_servers()).unwrap();
        let stop = AtomicBool::new(false);
        let before_ms = wall_clock_ms();
        let report = run_generator(&producer, "paced", &mut generator(2), 2_000, Some(600), &stop).unwrap();
        assert_eq!(report.produced, 600);
        assert_eq!(report.valid + report.very_late + report.malformed, 600);
        assert!(report.valid > 450 && report.malformed > 10 && report.very_late > 10);
        // 600 events at 2000/s: the last is due at 299.5 ms.
        assert!(report.elapsed >= Duration::from_millis(290), "{report:?}");
        assert!(report.elapsed < Duration::from_secs(5), "{report:?}");

        let received = consume_all(broker.bootstrap_servers(), "paced", 600);
        assert_eq!(received.len(), 600);
        // Event times come from the wall clock (minus disorder / lateness).
        let after_ms = wall_clock_ms();
        for (_, _, payload) in &received {
            let Ok(json) = serde_json::from_slice::<serde_json::Value>(payload) else {
                continue;
            };
            let Some(timestamp) = json["timestamp"].as_str() else {
                continue;
            };
            let Ok(time) = chrono::DateTime::parse_from_rfc3339(timestamp) else {
                continue;
            };
            let ms = time.timestamp_millis();
            assert!(ms <= after_ms && ms >= before_ms - 60_000 - 1_000, "{timestamp}");
        }
    }

    #[test]
    fn run_generator_stops_when_asked() {
        let broker = EmbeddedBroker::start(&[("endless".to_owned(), PARTITIONS)]).unwrap();
        let producer = EventProducer::connect(broker.bootstrap_servers()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopper = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                stop.store(true, Ordering::Relaxed);
            })
        };
        let report = run_generator(&producer, "endless", &mut generator(3), 1_000, None, &stop).unwrap();
        stopper.join().unwrap();
        assert!((150..=600).contains(&report.produced), "produced {}", report.produced);
        assert_eq!(producer.delivered_count(), report.produced);
    }
}
