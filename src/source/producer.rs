//! Producing events into Kafka: a small producer wrapper and the one paced producing loop.
//!
//! [`produce_events`] is used by the daemon's built-in generator thread, by the load
//! generator and the load test of the tools crate (`tidemark-tools`), and by tests; it works
//! against any Kafka-protocol broker (the [embedded one](crate::broker) or a real one) with
//! any [`EventGenerator`].

use std::fmt;
use std::str::FromStr;
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
/// How long [`produce_events`] waits for outstanding deliveries before returning.
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// Serve delivery reports every this many sends, so they never pile up unread.
const POLL_EVERY_SENDS: u64 = 256;
/// How long to wait for room when librdkafka's local queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(10);
/// The pacing loop sleeps at most this long at a time, so it notices `stop` quickly.
const MAX_PACING_SLEEP: Duration = Duration::from_millis(50);
/// Events generated and queued between checks of the clock, the stop flag and the limits.
const MAX_BATCH: u64 = 1_024;

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

/// A target rate: events per second, or as fast as the broker takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    Max,
    PerSecond(u64),
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "max" => Ok(Rate::Max),
            _ => match s.parse::<u64>() {
                Ok(n) if n > 0 => Ok(Rate::PerSecond(n)),
                _ => Err(format!("rate `{s}` must be a positive number of events per second, or `max`")),
            },
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::Max => f.write_str("max"),
            Rate::PerSecond(n) => write!(f, "{n}"),
        }
    }
}

/// Token bucket against a fixed start: `rate` tokens a second, the first at the start, at
/// most `burst` saved up. Tokens beyond `burst` (after a stall) are forfeited.
#[derive(Debug, Clone)]
pub struct Pacer {
    start: Instant,
    rate: u64,
    burst: u64,
    forfeited: u64,
}

impl Pacer {
    pub fn new(start: Instant, rate: u64, burst: u64) -> Self {
        Pacer {
            start,
            rate: rate.max(1),
            burst: burst.max(1),
            forfeited: 0,
        }
    }

    /// How many more events may be sent at `now`, when `sent` have been sent.
    pub fn available(&mut self, sent: u64, now: Instant) -> u64 {
        let elapsed_ns = now.saturating_duration_since(self.start).as_nanos();
        let earned = u64::try_from(elapsed_ns * u128::from(self.rate) / 1_000_000_000).unwrap_or(u64::MAX);
        let available = earned.saturating_add(1).saturating_sub(self.forfeited).saturating_sub(sent);
        if available > self.burst {
            self.forfeited += available - self.burst;
            return self.burst;
        }
        available
    }

    /// When the next token arrives, once `sent` events have been sent.
    pub fn next_due(&self, sent: u64) -> Instant {
        let ns = u128::from(sent + self.forfeited) * 1_000_000_000 / u128::from(self.rate);
        self.start + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

/// Anything that writes generated events: the [click generator](super::generator), and the
/// load generator's other event families (in the tools crate).
pub trait EventGenerator {
    /// Overwrites `event` with the next event whose (pre-jitter) event time is `base_time_ms`.
    fn next_event_into(&mut self, base_time_ms: i64, event: &mut GeneratedEvent);
}

impl EventGenerator for super::generator::PurchaseGenerator {
    fn next_event_into(&mut self, base_time_ms: i64, event: &mut GeneratedEvent) {
        super::generator::PurchaseGenerator::next_event_into(self, base_time_ms, event);
    }
}

impl EventGenerator for ClickGenerator {
    fn next_event_into(&mut self, base_time_ms: i64, event: &mut GeneratedEvent) {
        ClickGenerator::next_event_into(self, base_time_ms, event);
    }
}

/// What [`produce_events`] produces and when it stops.
#[derive(Debug, Clone, PartialEq)]
pub struct ProduceSettings {
    pub rate: Rate,
    /// Stop after this many events.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Call the progress callback this often (`None`: never).
    pub progress_every: Option<Duration>,
    /// Stop at the first delivery failure seen and return it as an error (a long-running
    /// generator should not produce into a broken topic for hours); otherwise failures are
    /// counted and reported at the end (a load test wants the rate achieved regardless).
    pub stop_on_failure: bool,
}

impl ProduceSettings {
    /// `rate` events a second until stopped, no progress reports, failing at the first
    /// delivery failure: what the daemon's built-in generator runs.
    pub fn paced(rate: u64) -> Self {
        ProduceSettings {
            rate: Rate::PerSecond(rate),
            count: None,
            duration: None,
            progress_every: None,
            stop_on_failure: true,
        }
    }
}

/// Progress so far, handed to the callback every `progress_every`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProduceProgress {
    pub produced: u64,
    /// Key + payload bytes queued.
    pub bytes: u64,
    pub elapsed: Duration,
    /// Events per second since the previous report.
    pub recent_rate: f64,
    pub delivery_failures: u64,
}

/// What [`produce_events`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct ProduceReport {
    pub target: Rate,
    /// Events queued (each delivered or counted in `failed`).
    pub produced: u64,
    pub valid: u64,
    pub very_late: u64,
    pub malformed: u64,
    /// Key + payload bytes.
    pub bytes: u64,
    /// Until everything was delivered (the final flush included).
    pub elapsed: Duration,
    pub failed: u64,
    pub first_error: Option<String>,
}

impl ProduceReport {
    pub fn events_per_second(&self) -> f64 {
        self.produced as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn megabytes_per_second(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The one pacing loop: produces events of `generator` into `topic` (key = the event's key,
/// partition by key hash), event time = wall clock, until `count`, `duration` or `stop`.
/// Used by the daemon's built-in generator, by the load generator and by the load test.
///
/// Pacing is a token bucket scheduled against the start instant ([`Pacer`]): event *n* is
/// due at *n* / rate, so sleeping never accumulates drift; after a stall the loop catches up
/// in a burst of at most one second's worth of events, and forfeits the rest rather than
/// flooding the broker. `stop` is checked between batches of at most 1024 events and at
/// least every 50 ms while waiting. A full local producer queue is waited out (poll, retry),
/// never dropped. Calls `on_progress` every `progress_every`. Returns once everything is
/// delivered or failed (the final flush waits up to 30 s); delivery failures end the run
/// with an error under `stop_on_failure`, else they are counted in the report. Errors also
/// when a message cannot be queued at all or the flush times out.
pub fn produce_events(
    producer: &EventProducer,
    topic: &str,
    generator: &mut impl EventGenerator,
    settings: &ProduceSettings,
    stop: &AtomicBool,
    mut on_progress: impl FnMut(&ProduceProgress),
) -> Result<ProduceReport, ProducerError> {
    let start = Instant::now();
    let mut pacer = match settings.rate {
        Rate::Max => None,
        Rate::PerSecond(rate) => Some(Pacer::new(start, rate, rate)),
    };
    let progress_every = settings.progress_every.map(|every| every.max(Duration::from_millis(10)));
    // `None` also when a duration is too long to add to an instant: that time never comes.
    let mut next_progress = progress_every.and_then(|every| start.checked_add(every));
    let end = settings.duration.and_then(|duration| start.checked_add(duration));
    let (mut last_progress_at, mut last_progress_produced) = (start, 0);
    let mut report = ProduceReport {
        target: settings.rate,
        produced: 0,
        valid: 0,
        very_late: 0,
        malformed: 0,
        bytes: 0,
        elapsed: Duration::ZERO,
        failed: 0,
        first_error: None,
    };
    let mut event = GeneratedEvent::default();
    loop {
        let now = Instant::now();
        if let (Some(due), Some(every)) = (next_progress, progress_every) {
            if now >= due {
                let since = now - last_progress_at;
                on_progress(&ProduceProgress {
                    produced: report.produced,
                    bytes: report.bytes,
                    elapsed: now - start,
                    recent_rate: (report.produced - last_progress_produced) as f64 / since.as_secs_f64().max(1e-9),
                    delivery_failures: producer.unreported_failures(),
                });
                (last_progress_at, last_progress_produced) = (now, report.produced);
                // Skip reports missed during a stall instead of making them all at once.
                let mut next = Some(due);
                while let Some(at) = next.filter(|at| *at <= now) {
                    next = at.checked_add(every);
                }
                next_progress = next;
            }
        }
        let remaining = settings.count.map_or(u64::MAX, |count| count.saturating_sub(report.produced));
        if remaining == 0 || stop.load(Ordering::Relaxed) || end.is_some_and(|end| now >= end) {
            break;
        }
        if settings.stop_on_failure && producer.unreported_failures() > 0 {
            // Report the failure now instead of producing into a broken topic for hours.
            producer.flush(FINAL_FLUSH_TIMEOUT)?;
        }
        let mut batch = remaining.min(MAX_BATCH);
        if let Some(pacer) = &mut pacer {
            batch = batch.min(pacer.available(report.produced, now));
            if batch == 0 {
                // Keep serving delivery reports while waiting for the next token.
                producer.poll(Duration::ZERO);
                let mut wake = pacer.next_due(report.produced);
                if let Some(due) = next_progress {
                    wake = wake.min(due);
                }
                if let Some(end) = end {
                    wake = wake.min(end);
                }
                std::thread::sleep(wake.saturating_duration_since(Instant::now()).min(MAX_PACING_SLEEP));
                continue;
            }
        }
        for _ in 0..batch {
            generator.next_event_into(wall_clock_ms(), &mut event);
            producer.send(topic, None, &event.key, &event.payload)?;
            report.produced += 1;
            report.bytes += (event.key.len() + event.payload.len()) as u64;
            match event.kind {
                EventKind::Valid => report.valid += 1,
                EventKind::VeryLate => report.very_late += 1,
                EventKind::Malformed(_) => report.malformed += 1,
            }
        }
    }
    match producer.flush(FINAL_FLUSH_TIMEOUT) {
        Ok(()) => {}
        Err(ProducerError::DeliveryFailed { failed, first_error }) if !settings.stop_on_failure => {
            report.failed = failed;
            report.first_error = Some(first_error);
        }
        Err(other) => return Err(other),
    }
    report.elapsed = start.elapsed();
    tracing::debug!(
        produced = report.produced,
        valid = report.valid,
        very_late = report.very_late,
        malformed = report.malformed,
        failed = report.failed,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "producing finished"
    );
    Ok(report)
}

/// Milliseconds since the Unix epoch by the wall clock: the base event time of live events.
pub fn wall_clock_ms() -> i64 {
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
    fn rates_parse() {
        assert_eq!("max".parse::<Rate>(), Ok(Rate::Max));
        assert_eq!("2500".parse::<Rate>(), Ok(Rate::PerSecond(2_500)));
        for bad in ["0", "-3", "fast", ""] {
            assert!(bad.parse::<Rate>().unwrap_err().contains("or `max`"), "{bad}");
        }
        assert_eq!(Rate::PerSecond(7).to_string(), "7");
    }

    #[test]
    fn pacer_schedules_against_the_start_and_caps_bursts() {
        let start = Instant::now();
        let mut pacer = Pacer::new(start, 1_000, 100);
        assert_eq!(pacer.available(0, start), 1, "the first event is due at once");
        assert_eq!(pacer.available(1, start), 0);
        assert_eq!(pacer.next_due(1), start + Duration::from_millis(1));
        // 50 ms in: 51 tokens earned in total, whatever the sleeps in between did.
        assert_eq!(pacer.available(1, start + Duration::from_millis(50)), 50);
        assert_eq!(pacer.next_due(51), start + Duration::from_millis(51));
        // After a 2 s stall only the burst is available; the rest is forfeited and the
        // schedule continues from there.
        let late = start + Duration::from_millis(2_051);
        assert_eq!(pacer.available(51, late), 100);
        assert_eq!(pacer.available(151, late), 0);
        assert_eq!(pacer.next_due(151), late + Duration::from_millis(1));
        assert_eq!(pacer.available(151, late + Duration::from_millis(10)), 10);
    }

    fn count_at(rate: u64, count: u64) -> ProduceSettings {
        ProduceSettings {
            count: Some(count),
            ..ProduceSettings::paced(rate)
        }
    }

    #[test]
    fn produce_events_paces_counts_and_delivers_clicks() {
        let broker = EmbeddedBroker::start(&[("paced".to_owned(), PARTITIONS)]).unwrap();
        let producer = EventProducer::connect(broker.bootstrap_servers()).unwrap();
        let stop = AtomicBool::new(false);
        let before_ms = wall_clock_ms();
        let report = produce_events(&producer, "paced", &mut generator(2), &count_at(2_000, 600), &stop, |_| {}).unwrap();
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
    fn produce_events_stops_when_asked() {
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
        let report = produce_events(&producer, "endless", &mut generator(3), &ProduceSettings::paced(1_000), &stop, |_| {}).unwrap();
        stopper.join().unwrap();
        assert!((150..=600).contains(&report.produced), "produced {}", report.produced);
        assert_eq!(producer.delivered_count(), report.produced);
    }
}
