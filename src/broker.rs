//! An in-process broker that speaks the Kafka protocol, for demos and tests.
//!
//! [`EmbeddedBroker`] wraps librdkafka's mock cluster (`rdkafka::mocking::MockCluster`): a
//! single broker listening on an ephemeral loopback port that serves produce, fetch, consumer
//! groups and offset commits. Every Kafka client (ours, `kcat`, another process) can reach it
//! through [`EmbeddedBroker::bootstrap_servers`] for as long as the value is alive.
//!
//! # Retention: the mock cluster forgets old data
//!
//! The mock cluster keeps only the newest **~5 MB or 100,000 batches per partition** (both
//! limits are hard-coded in librdkafka's `rdkafka_mock.c`) and silently drops older batches:
//! a consumer that falls further behind than that loses data without any error. That is fine
//! for a live demo whose consumer keeps up, and for small tests; it is wrong for preloading a
//! large backlog (benchmarks) or for restarting a daemon that has built up lag. Use a real
//! broker for those (see `shared/CRATES.md`, "Brokers on this machine").

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// Why the embedded broker could not start or create a topic.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// librdkafka could not create the mock cluster (its listener or thread failed).
    #[error(
        "could not start the embedded Kafka broker: {0}; \
         check that a loopback port can be bound and threads can be spawned, \
         or point the daemon at an external broker instead"
    )]
    Start(#[source] KafkaError),
    /// A topic definition was rejected before it reached the broker.
    #[error("invalid topic `{name}` with {partitions} partitions: {reason}; fix the topic settings")]
    InvalidTopic { name: String, partitions: i32, reason: &'static str },
    /// The mock cluster refused to create the topic.
    #[error("the embedded Kafka broker could not create topic `{name}`: {source}; this is a bug or an unsupported topic setting")]
    CreateTopic {
        name: String,
        #[source]
        source: KafkaError,
    },
}

/// An in-process, single-broker Kafka-protocol cluster (librdkafka's mock cluster).
///
/// Dropping it shuts the broker down and discards all its data; clients still connected then
/// see connection errors. Keep it alive for as long as producers and consumers use it.
///
/// Retention is limited to the newest ~5 MB or 100,000 batches per partition, silently
/// dropping older data (hard-coded in librdkafka's `rdkafka_mock.c`): good for a live demo
/// that keeps up, not for preloaded big backlogs. See the [module docs](self).
///
/// `EmbeddedBroker` is `Send` and `Sync` although `MockCluster` (a raw pointer) is neither;
/// see the safety note on the impls below.
pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
    bootstrap_servers: String,
}

// SAFETY: `MockCluster` holds a raw `*mut rd_kafka_mock_cluster_t` and the `Client` that owns
// it (which is itself `Send + Sync`). librdkafka runs the mock cluster on its own thread and
// every control call we make (`rd_kafka_mock_topic_create`) is posted as an op to that
// thread's queue and awaited, which librdkafka documents as "a thread-safe manner without
// locking" (`rd_kafka_mock_cluster_new`). The bootstrap string is written once at creation
// and only read afterwards (we copy it anyway). `rd_kafka_mock_cluster_destroy` (run on drop)
// posts a terminate op and joins the mock thread, which is valid from any thread other than
// the mock thread itself, and no code of ours runs on that thread.
unsafe impl Send for EmbeddedBroker {}
// SAFETY: see `Send` above; `&self` methods only post ops to the mock thread's queue.
unsafe impl Sync for EmbeddedBroker {}

impl EmbeddedBroker {
    /// Starts a mock cluster with one broker and creates `topics` as (name, partitions).
    ///
    /// Topics that already exist are left as they are (their partition count is not
    /// changed). Producing to a topic that was never created auto-creates it with the mock
    /// cluster's default of 4 partitions.
    pub fn start(topics: &[(String, i32)]) -> Result<Self, BrokerError> {
        let cluster = MockCluster::new(1).map_err(BrokerError::Start)?;
        let bootstrap_servers = cluster.bootstrap_servers();
        let broker = EmbeddedBroker { cluster, bootstrap_servers };
        for (name, partitions) in topics {
            broker.create_topic(name, *partitions)?;
        }
        tracing::info!(
            bootstrap_servers = %broker.bootstrap_servers,
            topics = topics.len(),
            "embedded Kafka broker started"
        );
        Ok(broker)
    }

    /// Creates `name` with `partitions` partitions (replication factor 1).
    ///
    /// Succeeds without changes if the topic already exists, whatever its partition count.
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), BrokerError> {
        let invalid = |reason| BrokerError::InvalidTopic {
            name: name.to_owned(),
            partitions,
            reason,
        };
        if name.is_empty() {
            return Err(invalid("the name is empty"));
        }
        if name.contains('\0') {
            return Err(invalid("the name contains a NUL byte"));
        }
        if partitions < 1 {
            return Err(invalid("a topic needs at least one partition"));
        }
        match self.cluster.create_topic(name, partitions, 1) {
            Ok(()) => Ok(()),
            Err(KafkaError::MockCluster(RDKafkaErrorCode::TopicAlreadyExists)) => Ok(()),
            Err(source) => Err(BrokerError::CreateTopic { name: name.to_owned(), source }),
        }
    }

    /// Takes the broker down (`false`: connections are dropped and refused) or up again, to
    /// see how clients behave while it is unreachable (tests, drills).
    pub fn set_up(&self, up: bool) -> Result<(), KafkaError> {
        if up {
            self.cluster.broker_up(-1)
        } else {
            self.cluster.broker_down(-1)
        }
    }

    /// The `bootstrap.servers` value for clients, e.g. `127.0.0.1:38719` (loopback IPv4 and
    /// an ephemeral port chosen at start).
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn embedded_broker_is_send_and_sync() {
        assert_send_sync::<EmbeddedBroker>();
    }

    #[test]
    fn starts_on_loopback_and_tolerates_existing_topics() {
        let broker = EmbeddedBroker::start(&[("clicks".to_owned(), 2)]).unwrap();
        let servers = broker.bootstrap_servers();
        let (host, port) = servers.rsplit_once(':').expect("host:port");
        assert_eq!(host, "127.0.0.1");
        assert!(port.parse::<u16>().unwrap() > 0);
        broker.create_topic("clicks", 2).unwrap();
        broker.create_topic("clicks", 8).unwrap();
        broker.create_topic("other", 1).unwrap();
    }

    #[test]
    fn rejects_bad_topics() {
        let broker = EmbeddedBroker::start(&[]).unwrap();
        assert!(matches!(broker.create_topic("t", 0), Err(BrokerError::InvalidTopic { .. })));
        assert!(matches!(broker.create_topic("", 1), Err(BrokerError::InvalidTopic { .. })));
    }

    #[test]
    fn can_move_to_another_thread_and_drop_there() {
        let broker = EmbeddedBroker::start(&[("t".to_owned(), 1)]).unwrap();
        std::thread::spawn(move || {
            broker.create_topic("u", 3).unwrap();
            drop(broker);
        })
        .join()
        .unwrap();
    }
}
