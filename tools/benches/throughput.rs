//! End-to-end throughput: Kafka JSON → 2 shards → 5-minute tumbling count per page → Delta,
//! beside the baseline measured in the same run on the same messages: raw consume + JSON
//! decode on the same number of threads, with nothing else (the practical ceiling here); and
//! the same events through a stream-stream interval join (views joined with clicks); and as
//! many sensor readings through the anomaly-detection pipeline as shipped (rolling statistics
//! and the trailing detector), with its windows scaled to the prefill's event-time span.
//! All are timed from the first event read to the last.
//! The prefill, the pipeline file and the baseline are the load test's
//! (`tidemark_tools::loadtest`); here the pipeline runs in this process, `tidemark-tools
//! loadtest` runs it as a child process and adds the live rate search, latency and RSS.
//!
//! `cargo bench -p tidemark-tools --bench throughput` runs the full size (TIDEMARK_BENCH_EVENTS, default 320,000:
//! it must fit the embedded broker's ~5 MB per partition retention). Under `cargo test` it
//! runs a small smoke size so CI checks that it works.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark::broker::EmbeddedBroker;
use tidemark::config::parse_config;
use tidemark::source::producer::EventProducer;
use tidemark_tools::families::{FamilyGenerator, FamilySettings};
use tidemark_tools::loadtest::{click_generator, click_pipeline_toml, consume_and_decode, prefill_events, ClickPipeline};

const TOPIC: &str = "bench";
const SENSOR_TOPIC: &str = "bench-sensors";
/// Devices of the sensor prefill: ~100 readings per device and 10 s window.
const SENSOR_DEVICES: u32 = 1_000;
const PARTITIONS: i32 = 16;
const SHARDS: usize = 2;

fn config_text(bootstrap: &str, dir: &std::path::Path) -> String {
    click_pipeline_toml(&ClickPipeline {
        name: "bench",
        bootstrap,
        topic: TOPIC,
        partitions: PARTITIONS,
        shards: SHARDS,
        state_dir: &dir.join("state"),
        sink_dir: &dir.join("out"),
        metrics_listen: "127.0.0.1:0",
    })
}

/// The same pipeline with its query replaced by a stream-stream interval join of the clicks
/// with themselves: each view joined with the same user's clicks in the 10 ms after it
/// (inner), so both join sides hold their rows in state until the watermark passes them.
fn join_config_text(bootstrap: &str, dir: &std::path::Path) -> String {
    let text = config_text(bootstrap, dir);
    let (start, end) = (text.find("[[queries]]").unwrap(), text.find("[[sinks]]").unwrap());
    let join = r#"[[queries]]
name = "page_views_5min"
from = "clicks"
where = "action = 'view'"
join = { source = "clicks", on = ["user_id"], between = ["0s", "10ms"], left_as = "v", right_as = "c", where = "action = 'click'" }
select = [
  { name = "user_id", expr = "v.user_id" },
  { name = "viewed_page", expr = "v.page_url" },
  { name = "clicked_page", expr = "c.page_url" },
  { name = "view_time", expr = "v.timestamp" },
  { name = "click_time", expr = "c.timestamp" },
]
sink = "page_views_5min"

"#;
    format!("{}{join}{}", &text[..start], &text[end..])
}

/// `config/anomaly_detection.toml` on the sensor prefill: the same statistics query and
/// trailing detector, with 10 s windows sliding every second (the prefill spans 32 s of event
/// time at the default size), in the click pipeline's settings; its alerts topic is left out.
fn anomaly_config_text(bootstrap: &str, dir: &std::path::Path) -> String {
    let text = config_text(bootstrap, dir);
    let (start, end) = (text.find("[[sources]]").unwrap(), text.find("[metrics]").unwrap());
    let shipped = include_str!("../../config/anomaly_detection.toml");
    let body = &shipped[shipped.find("[[sources]]").unwrap()..];
    let body = body
        .replace(
            "topic = \"sensor-events\"",
            &format!("topic = \"{SENSOR_TOPIC}\"\npartitions = {PARTITIONS}\nstarting_offsets = \"earliest\""),
        )
        .replace("delay = \"30s\"", "delay = \"5s\"")
        .replace(
            "window = { sliding = \"15m\", slide = \"1m\" }",
            "window = { sliding = \"10s\", slide = \"1s\" }",
        )
        .replace("./data/", &format!("{}/", dir.display()))
        // Delta output only, as the click pipeline it is compared with.
        .replace("sink = [\"sensor_anomalies\", \"alerts\"]", "sink = \"sensor_anomalies\"")
        .replace(
            "[[sinks]]\nname = \"alerts\"\nkind = \"kafka\"\ntopic = \"alerts\"\nkey = [\"device_id\"]\n",
            "",
        );
    assert!(body.matches("sliding = \"10s\"").count() == 2, "the shipped anomaly pipeline changed shape");
    assert!(!body.contains("\"alerts\""), "the shipped anomaly pipeline's alerts sink changed shape");
    format!("{}{body}\n{}", &text[..start], &text[end..])
}

/// The pipeline from its first event read to its last, as the baseline is timed (both leave
/// out the wait for the first fetch answer); returns events/s.
fn pipeline(total: u64, text: impl FnOnce(&std::path::Path) -> String) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let text = text(dir.path());
    let cfg = parse_config(&text).unwrap();
    let running = tidemark::daemon::start(cfg, Arc::new(AtomicBool::new(false))).unwrap();
    let launched = Instant::now();
    let deadline = launched + Duration::from_secs(120);
    let mut first: Option<(Instant, u64)> = None;
    loop {
        let read = running.stats().events_in;
        if read > 0 && first.is_none() {
            first = Some((Instant::now(), read));
        }
        if read >= total {
            break;
        }
        assert!(Instant::now() < deadline, "pipeline did not read everything");
        std::thread::sleep(Duration::from_micros(500));
    }
    // Shards publish their counts every few ms: a run shorter than that is seen all at once
    // and is timed from the start instead (the smoke size under `cargo test`).
    let rate = match first {
        Some((started, read_before)) if read_before < total => (total - read_before) as f64 / started.elapsed().as_secs_f64().max(1e-6),
        _ => total as f64 / launched.elapsed().as_secs_f64(),
    };
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
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), PARTITIONS), (SENSOR_TOPIC.to_string(), PARTITIONS)]).unwrap();
    let producer = EventProducer::connect(broker.bootstrap_servers()).unwrap();
    // 2026-11-23T00:00:00Z onwards, ten events per millisecond.
    let prefill = prefill_events(&producer, TOPIC, PARTITIONS, total, 1_795_392_000_000, &mut click_generator(1)).unwrap();
    let sensors = FamilySettings {
        keys: SENSOR_DEVICES,
        ..FamilySettings::default()
    };
    let sensor_prefill = prefill_events(
        &producer,
        SENSOR_TOPIC,
        PARTITIONS,
        total,
        1_795_392_000_000,
        &mut FamilyGenerator::new(tidemark_tools::families::Family::Sensor, &sensors),
    )
    .unwrap();
    let per_partition_mb = prefill.bytes.max(sensor_prefill.bytes) as f64 / PARTITIONS as f64 / 1e6;
    assert!(
        per_partition_mb < 4.5,
        "{per_partition_mb:.1} MB per partition exceeds the embedded broker's retention"
    );

    let cfg = parse_config(&config_text(broker.bootstrap_servers(), std::path::Path::new("/tmp"))).unwrap();
    let rounds = if full { 3 } else { 1 };
    let (mut base, mut pipe, mut join, mut anomaly) = (0f64, 0f64, 0f64, 0f64);
    let bootstrap = broker.bootstrap_servers();
    for _ in 0..rounds {
        let baseline = consume_and_decode(&cfg, broker.bootstrap_servers(), SHARDS, &prefill.per_partition, Duration::from_secs(120)).unwrap();
        base = base.max(baseline.events_per_second());
        pipe = pipe.max(pipeline(total, |dir| config_text(bootstrap, dir)));
        join = join.max(pipeline(total, |dir| join_config_text(bootstrap, dir)));
        anomaly = anomaly.max(pipeline(total, |dir| anomaly_config_text(bootstrap, dir)));
    }
    println!(
        "events: {total} ({:.0} bytes avg, {PARTITIONS} partitions, {SHARDS} shards/threads), best of {rounds}",
        prefill.average_event_bytes()
    );
    println!("baseline consume+decode: {:>10.0} events/s ({:.0} per thread)", base, base / SHARDS as f64);
    println!("pipeline end to end:     {:>10.0} events/s ({:.0} per shard)", pipe, pipe / SHARDS as f64);
    println!("pipeline / baseline:     {:>10.2}", pipe / base);
    println!("join pipeline:           {:>10.0} events/s ({:.0} per shard)", join, join / SHARDS as f64);
    println!("join / pipeline:         {:>10.2}", join / pipe);
    println!(
        "anomaly pipeline:        {:>10.0} events/s ({:.0} per shard; sensor readings, {:.0} bytes avg)",
        anomaly,
        anomaly / SHARDS as f64,
        sensor_prefill.average_event_bytes()
    );
    println!("anomaly / pipeline:      {:>10.2}", anomaly / pipe);
}
