//! Debezium change events of an orders table (with duplicates, out-of-order replays, malformed
//! events and tombstones) applied to a Delta table by the real binary, killed with SIGKILL at
//! random moments while they arrive and restarted with 1 or 2 shards: the table must end equal
//! to the database state computed here from the raw events (serde_json, not tidemark's
//! decoder), and the dead letters must be exactly the bad events, each once.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{rows, start_broker, wait_for, T0_MS};
use rand::{Rng, SeedableRng};
use tidemark::source::cdc_generator::{OrdersCdcGenerator, OrdersCdcSettings};
use tidemark::source::envelope::GeneratedEvent;
use tidemark::source::producer::EventProducer;

const BIN: &str = env!("CARGO_BIN_EXE_tidemark");
const TOPIC: &str = "shop.public.orders";

fn pipeline(addr: &str, dir: &Path, shards: usize) -> String {
    let d = dir.display();
    format!(
        r#"
[pipeline]
name = "cdc-crash"
state_dir = "{d}/state"
commit_interval = "150ms"
shards = {shards}
[kafka]
bootstrap_servers = "{addr}"
[metrics]
listen = "off"
[[sources]]
name = "orders_cdc"
topic = "{TOPIC}"
format = "debezium"
on_error = "dead_letters"
schema = {{ order_id = "int", customer_id = "string", status = "string", amount = "float", updated_at = "timestamp" }}
[[queries]]
name = "orders"
from = "orders_cdc"
apply = {{ primary_key = ["order_id"] }}
sink = "orders"
[[sinks]]
name = "orders"
kind = "delta"
path = "{d}/orders"
[[sinks]]
name = "dead_letters"
kind = "delta"
path = "{d}/dead_letters"
"#
    )
}

fn produce(addr: &str, events: &[GeneratedEvent]) {
    let p = EventProducer::connect(addr).unwrap();
    for e in events {
        // Partitioned by the Debezium key, as Kafka Connect does: one order, one partition.
        p.send(TOPIC, None, &e.key, &e.payload).unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

/// Why tidemark must dead-letter this payload, judged from the raw JSON; `None` for a change
/// to apply.
fn expected_reason(payload: &[u8]) -> Option<&'static str> {
    if payload.is_empty() {
        return Some("tombstone");
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return Some("decode");
    };
    if !v["source"]["lsn"].is_u64() {
        return Some("schema");
    }
    let row = if v["op"] == "d" { &v["before"] } else { &v["after"] };
    if !row["amount"].is_f64() && !row["amount"].is_u64() {
        return Some("schema");
    }
    if !v["source"]["ts_ms"].is_u64() && !v["ts_ms"].is_u64() {
        return Some("event_time");
    }
    None
}

/// The database state the changes describe: per order, the valid change with the highest
/// LSN (an upsert of its `after`, or a delete), as the table shows it.
fn oracle(events: &[GeneratedEvent]) -> BTreeMap<String, Vec<String>> {
    let mut latest: BTreeMap<u64, (u64, serde_json::Value)> = BTreeMap::new();
    for e in events.iter().filter(|e| expected_reason(&e.payload).is_none()) {
        let v: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
        let lsn = v["source"]["lsn"].as_u64().unwrap();
        let row = if v["op"] == "d" { &v["before"] } else { &v["after"] };
        let id = row["order_id"].as_u64().unwrap();
        if latest.get(&id).is_none_or(|(l, _)| lsn > *l) {
            latest.insert(id, (lsn, v));
        }
    }
    latest
        .into_iter()
        .filter(|(_, (_, v))| v["op"] != "d")
        .map(|(id, (_, v))| {
            let after = &v["after"];
            let updated_at = chrono::DateTime::parse_from_rfc3339(after["updated_at"].as_str().unwrap()).unwrap();
            (
                id.to_string(),
                vec![
                    after["customer_id"].as_str().unwrap().to_string(),
                    after["status"].as_str().unwrap().to_string(),
                    after["amount"].as_f64().unwrap().to_string(),
                    updated_at.timestamp_micros().to_string(),
                ],
            )
        })
        .collect()
}

fn table(dir: &Path) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for r in rows(&dir.join("orders")) {
        let values = ["customer_id", "status", "amount", "updated_at"].iter().map(|c| r[*c].clone()).collect();
        assert!(out.insert(r["order_id"].clone(), values).is_none(), "two rows for order {}", r["order_id"]);
    }
    out
}

fn dead_letters(dir: &Path) -> Vec<(String, Vec<u8>)> {
    common::read_dead_letters(&dir.join("dead_letters"))
}

#[test]
fn change_events_applied_through_sigkills_equal_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, addr) = start_broker(dir.path(), &[format!("{TOPIC}:4")]);
    let seed: u64 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("cdc crash test seed {seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut generator = OrdersCdcGenerator::new(OrdersCdcSettings {
        seed,
        orders: 200,
        duplicate_share: 0.05,
        replay_share: 0.1,
        malformed_share: 0.02,
        ..OrdersCdcSettings::default()
    });
    let mut events = Vec::new();
    let mut next = |n: usize, events: &mut Vec<GeneratedEvent>| {
        let from = events.len();
        for i in from..from + n {
            let mut e = GeneratedEvent::default();
            generator.next_event_into(T0_MS + i as i64 * 20, &mut e);
            events.push(e);
        }
        from
    };
    let config = dir.path().join("pipeline.toml");
    let crash_after = |rng: &mut rand_chacha::ChaCha8Rng, max_ms: u64| {
        std::fs::write(&config, pipeline(&addr, dir.path(), rng.random_range(1..=2))).unwrap();
        let mut child = Command::new(BIN).arg("run").arg(&config).stdout(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(rng.random_range(50..max_ms)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    };

    // Two batches of changes, the daemon killed while it reads them.
    let first = next(3_000, &mut events);
    produce(&addr, &events[first..]);
    for _ in 0..3 {
        crash_after(&mut rng, 2_000);
    }
    let second = next(3_000, &mut events);
    produce(&addr, &events[second..]);
    for _ in 0..3 {
        crash_after(&mut rng, 2_000);
    }

    let expected = oracle(&events);
    // The oracle is the generator's model database (each order's latest change wins).
    let model: BTreeMap<String, Vec<String>> = generator
        .table()
        .into_iter()
        .map(|r| {
            let amount = r.amount_cents as f64 / 100.0;
            (
                r.order_id.to_string(),
                vec![r.customer_id, r.status.to_string(), amount.to_string(), (r.updated_at_ms * 1000).to_string()],
            )
        })
        .collect();
    assert_eq!(expected, model, "the oracle disagrees with the generator's model");
    let mut expected_dead: Vec<(String, Vec<u8>)> = events
        .iter()
        .filter_map(|e| expected_reason(&e.payload).map(|r| (r.to_string(), e.payload.clone())))
        .collect();
    expected_dead.sort();
    let reasons: std::collections::BTreeSet<&str> = expected_dead.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(reasons.len(), 4, "tombstones and every kind of bad event: {reasons:?}");
    assert!(expected.len() > 100, "{} orders", expected.len());

    std::fs::write(&config, pipeline(&addr, dir.path(), 2)).unwrap();
    let mut child = Command::new(BIN).arg("run").arg(&config).stdout(Stdio::null()).spawn().unwrap();
    wait_for("the table and the dead letters after the crashes", Duration::from_secs(90), || {
        dead_letters(dir.path()).len() >= expected_dead.len() && table(dir.path()) == expected
    });
    assert!(Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap().success());
    assert!(child.wait().unwrap().success());
    let _ = broker.kill();
    let _ = broker.wait();
    assert_eq!(table(dir.path()), expected);
    assert_eq!(dead_letters(dir.path()), expected_dead);
}
