//! A pipeline with a stream-stream join and an anomaly detector over three topics, killed with
//! SIGKILL at random moments while its input arrives, restarted each time with 1 or 2 shards:
//! its tables must equal an oracle computed here over the whole input, with no row lost or
//! written twice. Against the embedded broker, and against Apache Kafka with the anomalies
//! also going to a Kafka topic (transactions), read by an independent `read_committed`
//! consumer while the daemon is being killed.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{rows, sorted_rows, start_broker, wait_for, T0_MS};
use rand::{Rng, SeedableRng};
use tidemark::source::producer::EventProducer;

const BIN: &str = env!("CARGO_BIN_EXE_tidemark");

/// Where the pipeline reads and, against Apache Kafka, what it also writes to topics.
struct Topics {
    /// clicks, purchases, readings
    inputs: [String; 3],
    /// (alerts topic, dead-letter topic)
    kafka_out: Option<(String, String)>,
}

/// (ms, user, page) clicks; (ms, user, product, price) purchases; (ms, device, value) readings.
type Click = (i64, String, String);
type Purchase = (i64, String, String, f64);
type Reading = (i64, String, f64);

fn input(from_ms: i64, to_ms: i64) -> (Vec<Click>, Vec<Purchase>, Vec<Reading>) {
    let jitter = |i: i64| (i * 7919) % 1_500;
    let clicks = (from_ms / 200..to_ms / 200)
        .map(|i| (T0_MS + i * 200 - jitter(i), format!("u{}", (i * 31) % 30), format!("/p{}", i % 7)))
        .collect();
    let purchases = (from_ms / 2_000..to_ms / 2_000)
        .map(|i| {
            (
                T0_MS + i * 2_000 - jitter(i),
                format!("u{}", (i * 7) % 30),
                format!("p{}", i % 13),
                (i % 50) as f64 + 0.25,
            )
        })
        .collect();
    let readings = (from_ms / 1_000..to_ms / 1_000)
        .flat_map(|i| {
            (0..3i64).map(move |d| {
                let spike = if (i + d * 11) % 97 == 60 { 25.0 } else { 0.0 };
                (
                    T0_MS + i * 1_000 - jitter(i + d),
                    format!("d{d}"),
                    10.0 + ((i * 37 + d) % 13) as f64 / 10.0 + spike,
                )
            })
        })
        .collect();
    (clicks, purchases, readings)
}

fn produce(addr: &str, topics: &Topics, (clicks, purchases, readings): &(Vec<Click>, Vec<Purchase>, Vec<Reading>)) {
    let p = EventProducer::connect(addr).unwrap();
    let [c, pu, r] = &topics.inputs;
    let topics = [c.as_str(), pu.as_str(), r.as_str()];
    let send = |topic: &str, i: usize, json: serde_json::Value| p.send(topic, Some((i % 2) as i32), b"k", json.to_string().as_bytes()).unwrap();
    for (i, c) in clicks.iter().enumerate() {
        send(
            topics[0],
            i,
            serde_json::json!({ "user_id": c.1, "page_url": c.2, "timestamp": common::rfc3339(c.0) }),
        );
    }
    for (i, x) in purchases.iter().enumerate() {
        send(
            topics[1],
            i,
            serde_json::json!({ "user_id": x.1, "product_id": x.2, "price": x.3, "timestamp": common::rfc3339(x.0) }),
        );
    }
    for (i, r) in readings.iter().enumerate() {
        send(
            topics[2],
            i,
            serde_json::json!({ "device_id": r.1, "value": r.2, "timestamp": common::rfc3339(r.0) }),
        );
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

fn pipeline(addr: &str, topics: &Topics, dir: &Path, shards: usize) -> String {
    let d = dir.display();
    let [clicks, purchases, readings] = &topics.inputs;
    let (on_error, anomaly_sinks, kafka_sinks) = match &topics.kafka_out {
        None => (String::new(), "\"anomalies\"".to_string(), String::new()),
        Some((alerts, dead_letters)) => (
            "on_error = [\"dlq\", \"dlq_topic\"]".to_string(),
            "[\"anomalies\", \"alerts\"]".to_string(),
            format!(
                r#"
[[sinks]]
name = "alerts"
kind = "kafka"
topic = "{alerts}"
key = ["device_id"]
[[sinks]]
name = "dlq_topic"
kind = "kafka"
topic = "{dead_letters}"
[[sinks]]
name = "dlq"
kind = "delta"
path = "{d}/dlq"
"#
            ),
        ),
    };
    format!(
        r#"
[pipeline]
name = "join-crash"
state_dir = "{d}/state"
commit_interval = "150ms"
shards = {shards}
[kafka]
bootstrap_servers = "{addr}"
[metrics]
listen = "off"
[[sources]]
name = "clicks"
topic = "{clicks}"
event_time = {{ field = "timestamp" }}
watermark = {{ delay = "2s" }}
schema = {{ user_id = "string", page_url = "string", timestamp = "timestamp" }}
[[sources]]
name = "purchases"
topic = "{purchases}"
event_time = {{ field = "timestamp" }}
watermark = {{ delay = "2s" }}
schema = {{ user_id = "string", product_id = "string", price = "float", timestamp = "timestamp" }}
[[sources]]
name = "readings"
topic = "{readings}"
event_time = {{ field = "timestamp" }}
watermark = {{ delay = "2s" }}
{on_error}
schema = {{ device_id = "string", value = "float", timestamp = "timestamp" }}
[[queries]]
name = "attribution"
from = "clicks"
join = {{ source = "purchases", type = "left", on = ["user_id"], between = ["0s", "2m"], left_as = "c", right_as = "p" }}
select = [
  {{ name = "user_id", expr = "c.user_id" }},
  {{ name = "click_time", expr = "c.timestamp" }},
  {{ name = "product_id", expr = "p.product_id" }},
  {{ name = "purchase_time", expr = "p.timestamp" }},
]
sink = "attribution"
[[queries]]
name = "anomalies"
from = "readings"
window = {{ sliding = "2m", slide = "30s" }}
group_by = ["device_id"]
anomaly = {{ field = "value", min_count = 5, judge = "containing" }}
sink = {anomaly_sinks}
[[sinks]]
name = "attribution"
kind = "delta"
path = "{d}/attribution"
[[sinks]]
name = "anomalies"
kind = "delta"
path = "{d}/anomalies"
{kafka_sinks}"#
    )
}

#[test]
fn join_and_anomalies_killed_at_random_moments_equal_the_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let topics = Topics {
        inputs: ["click-events".into(), "purchase-events".into(), "sensor-events".into()],
        kafka_out: None,
    };
    let specs: Vec<String> = topics.inputs.iter().map(|t| format!("{t}:2")).collect();
    let (mut broker, addr) = start_broker(dir.path(), &specs);
    killed_at_random_moments(&addr, &topics, dir.path());
    let _ = broker.kill();
    let _ = broker.wait();
}

/// On Apache Kafka, the anomalies also go to an alerts topic and the readings' dead letters
/// to a dead-letter topic, both written in Kafka transactions. A `read_committed` consumer
/// reading the alerts while the daemon is being killed must see each anomaly exactly once:
/// the same rows as the Delta table, which equals the oracle.
#[test]
fn on_apache_kafka_alerts_reach_a_read_committed_consumer_exactly_once() {
    let addr = common::kafka::bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let name = common::kafka::unique("join-crash");
    let topics = Topics {
        inputs: [format!("{name}-clicks"), format!("{name}-purchases"), format!("{name}-readings")],
        kafka_out: Some((format!("{name}-alerts"), format!("{name}-dead-letters"))),
    };
    let (alerts, dead_letter_topic) = topics.kafka_out.clone().unwrap();
    let mut all: Vec<(&str, i32)> = topics.inputs.iter().map(|t| (t.as_str(), 2)).collect();
    all.extend([(alerts.as_str(), 1), (dead_letter_topic.as_str(), 1)]);
    common::kafka::create_topics(&addr, &all);
    // Malformed readings: dead letters in the Delta table and in the topic, once each.
    let bad: Vec<String> = (0..5).map(|i| format!("not json {i}")).collect();
    let p = EventProducer::connect(&addr).unwrap();
    for b in &bad {
        p.send(&topics.inputs[2], Some(0), b"k", b.as_bytes()).unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();

    // The independent reader runs from the start, while the daemon is killed again and again.
    let reader = {
        let (addr, alerts) = (addr.clone(), alerts.clone());
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = done.clone();
        let handle = std::thread::spawn(move || {
            common::kafka::read_committed(&addr, &alerts, Duration::from_secs(600), |_| stop.load(std::sync::atomic::Ordering::Relaxed))
        });
        (handle, done)
    };
    let anomalies = killed_at_random_moments(&addr, &topics, dir.path());
    // Give the reader time to catch up with the last commit, then stop it.
    std::thread::sleep(Duration::from_secs(3));
    reader.1.store(true, std::sync::atomic::Ordering::Relaxed);
    let messages = reader.0.join().unwrap();
    let mut from_topic: Vec<Vec<String>> = messages
        .iter()
        .map(|(key, value)| {
            let v: serde_json::Value = serde_json::from_str(value.as_deref().expect("an anomaly is a message, not a tombstone")).unwrap();
            let micros = |field: &str| {
                let text = v[field].as_str().unwrap_or_else(|| panic!("{field} in {v}"));
                chrono::DateTime::parse_from_rfc3339(text).unwrap().timestamp_micros().to_string()
            };
            assert_eq!(key.as_deref(), v["device_id"].as_str(), "the message key is the device");
            vec![micros("window_start"), v["device_id"].as_str().unwrap().to_string(), micros("timestamp")]
        })
        .collect();
    from_topic.sort();
    assert_eq!(from_topic, anomalies, "the alerts topic, read committed, holds each anomaly exactly once");

    let mut dead: Vec<String> = common::kafka::read_committed(&addr, &dead_letter_topic, Duration::from_secs(30), |got| got.len() >= bad.len())
        .into_iter()
        .map(|(_, v)| {
            let v: serde_json::Value = serde_json::from_str(&v.unwrap()).unwrap();
            assert_eq!(v["reason"], "decode");
            v["payload"].as_str().unwrap().to_string()
        })
        .collect();
    // Anything beyond the expected count would have arrived with them: read a little longer.
    dead.sort();
    assert_eq!(dead, bad, "the dead-letter topic holds each bad reading once");
    let mut in_table: Vec<String> = rows(&dir.path().join("dlq")).into_iter().map(|r| r["payload"].clone()).collect();
    in_table.sort();
    assert_eq!(in_table.len(), bad.len(), "the dead-letter table holds each bad reading once: {in_table:?}");
}

/// Runs the pipeline over ten minutes of input, killed at random moments while it arrives;
/// asserts the tables equal the oracle and returns the anomalies oracle
/// (window_start µs, device, timestamp µs), sorted.
fn killed_at_random_moments(addr: &str, topics: &Topics, dir: &Path) -> Vec<Vec<String>> {
    let seed: u64 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("join crash test seed {seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let config = dir.join("pipeline.toml");
    let crash_after = |rng: &mut rand_chacha::ChaCha8Rng, max_ms: u64| {
        std::fs::write(&config, pipeline(addr, topics, dir, rng.random_range(1..=2))).unwrap();
        let mut child = Command::new(BIN).arg("run").arg(&config).stdout(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(rng.random_range(50..max_ms)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    };

    // Ten minutes of events in two halves, the daemon killed while they arrive; then a last
    // event an hour ahead on every partition moves the watermark past everything.
    let first = input(0, 300_000);
    let second = input(300_000, 600_000);
    produce(addr, topics, &first);
    for _ in 0..3 {
        crash_after(&mut rng, 2_000);
    }
    produce(addr, topics, &second);
    for _ in 0..3 {
        crash_after(&mut rng, 2_000);
    }
    let late = T0_MS + 3_600_000;
    let clock = (
        vec![
            (late, "clock-c".to_string(), "/".to_string()),
            (late + 1, "clock-c".to_string(), "/".to_string()),
        ],
        vec![
            (late, "clock-p".to_string(), "p".to_string(), 1.0),
            (late + 1, "clock-p".to_string(), "p".to_string(), 1.0),
        ],
        vec![(late, "clock".to_string(), 1.0), (late + 1, "clock".to_string(), 1.0)],
    );
    produce(addr, topics, &clock);
    crash_after(&mut rng, 1_500);

    let clicks: Vec<Click> = first.0.iter().chain(&second.0).cloned().collect();
    let purchases: Vec<Purchase> = first.1.iter().chain(&second.1).cloned().collect();
    let readings: Vec<Reading> = first.2.iter().chain(&second.2).cloned().collect();
    let mut joined: Vec<Vec<String>> = Vec::new();
    for c in &clicks {
        let matches: Vec<&Purchase> = purchases.iter().filter(|p| p.1 == c.1 && c.0 <= p.0 && p.0 <= c.0 + 120_000).collect();
        for p in &matches {
            joined.push(vec![c.1.clone(), (c.0 * 1000).to_string(), p.2.clone(), (p.0 * 1000).to_string()]);
        }
        if matches.is_empty() {
            joined.push(vec![c.1.clone(), (c.0 * 1000).to_string(), "NULL".into(), "NULL".into()]);
        }
    }
    joined.sort();
    // Every window [s, s + 2m), s a multiple of 30 s, judging each reading in it.
    let mut anomalies: Vec<Vec<String>> = Vec::new();
    let (size, slide) = (120_000i64, 30_000i64);
    let first_start = (T0_MS - size).div_euclid(slide) * slide;
    for s in (first_start..T0_MS + 600_000).step_by(slide as usize) {
        for d in ["d0", "d1", "d2"] {
            let w: Vec<&Reading> = readings.iter().filter(|r| r.1 == d && r.0 >= s && r.0 < s + size).collect();
            if w.len() < 5 {
                continue;
            }
            let n = w.len() as f64;
            let mean = w.iter().map(|r| r.2).sum::<f64>() / n;
            let sd = (w.iter().map(|r| (r.2 - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
            for r in w.iter().filter(|r| r.2 > mean + 3.0 * sd || r.2 < mean - 3.0 * sd) {
                anomalies.push(vec![(s * 1000).to_string(), d.to_string(), (r.0 * 1000).to_string()]);
            }
        }
    }
    anomalies.sort();
    assert!(anomalies.len() >= 3 && joined.iter().any(|r| r[2] != "NULL"));

    std::fs::write(&config, pipeline(addr, topics, dir, 2)).unwrap();
    let mut child = Command::new(BIN).arg("run").arg(&config).stdout(Stdio::null()).spawn().unwrap();
    let (attribution, anomaly_table) = (dir.join("attribution"), dir.join("anomalies"));
    let read = || {
        (
            sorted_rows(&attribution, &["user_id", "click_time", "product_id", "purchase_time"]),
            sorted_rows(&anomaly_table, &["window_start", "device_id", "timestamp"]),
        )
    };
    wait_for("the tables to match the oracle after crashes", Duration::from_secs(90), || {
        let (j, a) = read();
        j.len() >= joined.len() && a.len() >= anomalies.len()
    });
    assert!(Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap().success());
    assert!(child.wait().unwrap().success());
    let (j, a) = read();
    assert_eq!(j, joined);
    assert_eq!(a, anomalies);
    anomalies
}
