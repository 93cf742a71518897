//! A pipeline with a stream-stream join and an anomaly detector over three topics, killed with
//! SIGKILL at random moments while its input arrives, restarted each time with 1 or 2 shards:
//! its tables must equal an oracle computed here over the whole input, with no row lost or
//! written twice.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{sorted_rows, start_broker, wait_for, T0_MS};
use rand::{Rng, SeedableRng};
use tidemark::source::producer::EventProducer;

const BIN: &str = env!("CARGO_BIN_EXE_tidemark");
const TOPICS: [&str; 3] = ["click-events", "purchase-events", "sensor-events"];

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

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn produce(addr: &str, (clicks, purchases, readings): &(Vec<Click>, Vec<Purchase>, Vec<Reading>)) {
    let p = EventProducer::connect(addr).unwrap();
    let send = |topic: &str, i: usize, json: serde_json::Value| p.send(topic, Some((i % 2) as i32), b"k", json.to_string().as_bytes()).unwrap();
    for (i, c) in clicks.iter().enumerate() {
        send(TOPICS[0], i, serde_json::json!({ "user_id": c.1, "page_url": c.2, "timestamp": rfc3339(c.0) }));
    }
    for (i, x) in purchases.iter().enumerate() {
        send(
            TOPICS[1],
            i,
            serde_json::json!({ "user_id": x.1, "product_id": x.2, "price": x.3, "timestamp": rfc3339(x.0) }),
        );
    }
    for (i, r) in readings.iter().enumerate() {
        send(TOPICS[2], i, serde_json::json!({ "device_id": r.1, "value": r.2, "timestamp": rfc3339(r.0) }));
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

fn pipeline(addr: &str, dir: &Path, shards: usize) -> String {
    let d = dir.display();
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
topic = "click-events"
event_time = {{ field = "timestamp" }}
watermark = {{ delay = "2s" }}
schema = {{ user_id = "string", page_url = "string", timestamp = "timestamp" }}
[[sources]]
name = "purchases"
topic = "purchase-events"
event_time = {{ field = "timestamp" }}
watermark = {{ delay = "2s" }}
schema = {{ user_id = "string", product_id = "string", price = "float", timestamp = "timestamp" }}
[[sources]]
name = "readings"
topic = "sensor-events"
event_time = {{ field = "timestamp" }}
watermark = {{ delay = "2s" }}
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
sink = "anomalies"
[[sinks]]
name = "attribution"
kind = "delta"
path = "{d}/attribution"
[[sinks]]
name = "anomalies"
kind = "delta"
path = "{d}/anomalies"
"#
    )
}

#[test]
fn join_and_anomalies_killed_at_random_moments_equal_the_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let topics: Vec<String> = TOPICS.iter().map(|t| format!("{t}:2")).collect();
    let (mut broker, addr) = start_broker(dir.path(), &topics);
    let seed: u64 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("join crash test seed {seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let config = dir.path().join("pipeline.toml");
    let crash_after = |rng: &mut rand_chacha::ChaCha8Rng, max_ms: u64| {
        std::fs::write(&config, pipeline(&addr, dir.path(), rng.random_range(1..=2))).unwrap();
        let mut child = Command::new(BIN).arg("run").arg(&config).stdout(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(rng.random_range(50..max_ms)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    };

    // Ten minutes of events in two halves, the daemon killed while they arrive; then a last
    // event an hour ahead on every partition moves the watermark past everything.
    let first = input(0, 300_000);
    let second = input(300_000, 600_000);
    produce(&addr, &first);
    for _ in 0..3 {
        crash_after(&mut rng, 2_000);
    }
    produce(&addr, &second);
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
    produce(&addr, &clock);
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

    std::fs::write(&config, pipeline(&addr, dir.path(), 2)).unwrap();
    let mut child = Command::new(BIN).arg("run").arg(&config).stdout(Stdio::null()).spawn().unwrap();
    let (attribution, anomaly_table) = (dir.path().join("attribution"), dir.path().join("anomalies"));
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
    let _ = broker.kill();
    let _ = broker.wait();
    let (j, a) = read();
    assert_eq!(j, joined);
    assert_eq!(a, anomalies);
}
