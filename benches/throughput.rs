//! End-to-end throughput: Kafka JSON → 2 shards → 5-minute tumbling count per page → Delta,
//! beside the baseline measured in the same run on the same messages: raw consume + JSON
//! decode on the same number of threads, with nothing else (the practical ceiling here).
//!
//! `cargo bench --bench throughput` runs the full size (TIDEMARK_BENCH_EVENTS, default 320,000:
//! it must fit the embedded broker's ~5 MB per partition retention). Under `cargo test` it
//! runs a small smoke size so CI checks that it works.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tidemark::broker::EmbeddedBroker;
use tidemark::config::parse_config;
use tidemark::decode::SourceDecoder;
use tidemark::source::generator::{ClickGenerator, ClickGeneratorSettings};
use tidemark::source::producer::EventProducer;

const TOPIC: &str = "bench";
const PARTITIONS: i32 = 16;
const SHARDS: usize = 2;

fn config_text(bootstrap: &str, dir: &std::path::Path) -> String {
    format!(
        r#"
[pipeline]
name = "bench"
state_dir = "{state}"
commit_interval = "1s"
shards = {SHARDS}
progress_interval = "1h"
[kafka]
bootstrap_servers = "{bootstrap}"
[[sources]]
name = "clicks"
topic = "{TOPIC}"
event_time = {{ field = "timestamp" }}
watermark = {{ delay = "10s", idle_timeout = "1h" }}
schema = {{ user_id = "string", page_url = "string", action = "string", timestamp = "timestamp" }}
[[queries]]
name = "page_views_5min"
from = "clicks"
window = {{ tumbling = "5m" }}
group_by = ["page_url"]
aggregates = [ {{ name = "view_count", fn = "count" }} ]
sink = "out"
[[sinks]]
name = "out"
kind = "delta"
path = "{out}"
[metrics]
listen = "127.0.0.1:0"
"#,
        state = dir.join("state").display(),
        out = dir.join("out").display()
    )
}

/// Baseline: SHARDS threads, each consuming its share of the partitions and decoding every
/// message with the same decoder the pipeline uses. Returns events/s.
fn consume_and_decode(bootstrap: &str, total: u64, cfg: &tidemark::config::Config) -> f64 {
    let started = Instant::now();
    std::thread::scope(|s| {
        for shard in 0..SHARDS {
            s.spawn(move || {
                let consumer: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", bootstrap)
                    .set("group.id", "baseline")
                    .set("enable.auto.commit", "false")
                    .create()
                    .unwrap();
                let mut tpl = TopicPartitionList::new();
                for p in (0..PARTITIONS).filter(|p| *p as usize % SHARDS == shard) {
                    tpl.add_partition_offset(TOPIC, p, Offset::Beginning).unwrap();
                }
                consumer.assign(&tpl).unwrap();
                let mut decoder = SourceDecoder::new(&cfg.sources[0]);
                let mut n = 0u64;
                let want = total / SHARDS as u64;
                let deadline = Instant::now() + Duration::from_secs(120);
                while n < want && Instant::now() < deadline {
                    if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                        std::hint::black_box(decoder.decode(m.payload().unwrap_or(&[])).ok());
                        n += 1;
                    }
                }
                assert_eq!(n, want, "baseline consumed everything");
            });
        }
    });
    total as f64 / started.elapsed().as_secs_f64()
}

/// The pipeline from start to every event read; returns events/s.
fn pipeline(bootstrap: &str, total: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let cfg = parse_config(&config_text(bootstrap, dir.path())).unwrap();
    let started = Instant::now();
    let running = tidemark::daemon::start(cfg, Arc::new(AtomicBool::new(false))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while running.stats().events_in < total {
        assert!(Instant::now() < deadline, "pipeline did not read everything");
        std::thread::sleep(Duration::from_millis(2));
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    running.stop().unwrap();
    rate
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let total: u64 = if full {
        std::env::var("TIDEMARK_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(320_000)
    } else {
        16_000
    };
    let total = total - total % (PARTITIONS as u64 * SHARDS as u64);
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), PARTITIONS)]).unwrap();
    let producer = EventProducer::connect(broker.bootstrap_servers()).unwrap();
    let mut g = ClickGenerator::new(ClickGeneratorSettings {
        seed: 1,
        users: 100_000,
        pages: 1_000,
        disorder_ms: 2_000,
        late_share: 0.0,
        late_by_ms: 0,
        malformed_share: 0.0,
    });
    let mut bytes = 0u64;
    for seq in 0..total {
        let e = g.next_event(1_795_392_000_000 + seq as i64 / 10);
        bytes += e.payload.len() as u64;
        producer.send(TOPIC, Some((seq % PARTITIONS as u64) as i32), &e.key, &e.payload).unwrap();
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    let per_partition_mb = bytes as f64 / PARTITIONS as f64 / 1e6;
    assert!(
        per_partition_mb < 4.5,
        "{per_partition_mb:.1} MB per partition exceeds the embedded broker's retention"
    );

    let cfg = parse_config(&config_text(broker.bootstrap_servers(), std::path::Path::new("/tmp"))).unwrap();
    let rounds = if full { 3 } else { 1 };
    let (mut base, mut pipe) = (0f64, 0f64);
    for _ in 0..rounds {
        base = base.max(consume_and_decode(broker.bootstrap_servers(), total, &cfg));
        pipe = pipe.max(pipeline(broker.bootstrap_servers(), total));
    }
    println!(
        "events: {total} ({:.0} bytes avg, {PARTITIONS} partitions, {SHARDS} shards/threads), best of {rounds}",
        bytes as f64 / total as f64
    );
    println!("baseline consume+decode: {:>10.0} events/s ({:.0} per thread)", base, base / SHARDS as f64);
    println!("pipeline end to end:     {:>10.0} events/s ({:.0} per shard)", pipe, pipe / SHARDS as f64);
    println!("pipeline / baseline:     {:>10.2}", pipe / base);
}
