//! `tidemark-tools lag`: a consumer group's committed offsets against the end of its topics.
//! A tidemark pipeline mirrors the positions of every committed epoch into its `[kafka]
//! group_id`, so "lag 0" means every message read so far is in the sink tables.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const TIMEOUT: Duration = Duration::from_secs(10);

/// (committed offset, end offset) summed over every partition of `topics`.
pub fn group_lag(brokers: &str, group: &str, topics: &[String]) -> Result<(i64, i64), String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| format!("cannot create a Kafka client for {brokers}: {e}"))?;
    let mut tpl = TopicPartitionList::new();
    let mut end = 0;
    for topic in topics {
        let md = consumer
            .fetch_metadata(Some(topic), TIMEOUT)
            .map_err(|e| format!("cannot read the metadata of topic {topic}: {e}"))?;
        let partitions = md.topics().first().map_or(0, |t| t.partitions().len() as i32);
        if partitions == 0 {
            return Err(format!("topic {topic} does not exist on {brokers}"));
        }
        for p in 0..partitions {
            tpl.add_partition(topic, p);
            let (_, high) = consumer
                .fetch_watermarks(topic, p, TIMEOUT)
                .map_err(|e| format!("cannot read the end of {topic}[{p}]: {e}"))?;
            end += high;
        }
    }
    let committed = consumer
        .committed_offsets(tpl, TIMEOUT)
        .map_err(|e| format!("cannot read the offsets of group {group}: {e}"))?;
    let done = committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum();
    Ok((done, end))
}
