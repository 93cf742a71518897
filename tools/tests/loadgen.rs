//! `tidemark-tools loadgen` through the real binary, into an embedded broker started by the
//! test (a process apart from the load generator): what lands on the topic, pacing, progress
//! and summary lines, and bad arguments.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use tidemark::broker::EmbeddedBroker;

const BIN: &str = env!("CARGO_BIN_EXE_tidemark-tools");
const PARTITIONS: i32 = 4;

fn broker(topics: &[&str]) -> EmbeddedBroker {
    EmbeddedBroker::start(&topics.iter().map(|t| (t.to_string(), PARTITIONS)).collect::<Vec<_>>()).unwrap()
}

/// (partition, key, payload)
type Received = (i32, Vec<u8>, Vec<u8>);

/// Every message on `topic`, read from the beginning by an independent consumer; the count is
/// checked against the broker's watermarks first.
fn read_topic(addr: &str, topic: &str) -> Vec<Received> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("group.id", "check")
        .create()
        .unwrap();
    let mut total = 0;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..PARTITIONS {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap();
        total += (high - low) as usize;
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut messages = Vec::with_capacity(total);
    let deadline = Instant::now() + Duration::from_secs(30);
    while messages.len() < total && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            messages.push((m.partition(), m.key().unwrap_or_default().to_vec(), m.payload().unwrap_or_default().to_vec()));
        }
    }
    assert_eq!(messages.len(), total, "every message the watermarks count can be read");
    messages
}

#[test]
fn version_and_help() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("tidemark-tools {}", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["loadgen", "loadtest"] {
        assert!(help.contains(cmd), "--help lists {cmd}: {help}");
    }
    let out = Command::new(BIN).args(["loadgen", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--brokers",
        "--family",
        "--topic",
        "--rate",
        "--count",
        "--duration",
        "--seed",
        "--keys",
        "--users",
        "--pages",
        "--disorder",
        "--late-share",
        "--late-by",
        "--malformed-share",
        "--report-every",
    ] {
        assert!(help.contains(flag), "{flag} in:\n{help}");
    }
}

#[test]
fn click_family_produces_seeded_clicks_with_users_pages_and_malformed_share() {
    let broker = broker(&["clicks", "clicks-again"]);
    let addr = broker.bootstrap_servers().to_owned();
    let run = |topic: &str| {
        Command::new(BIN)
            .args(["loadgen", "--brokers", &addr, "--family", "click", "--topic", topic])
            .args(["--rate", "max", "--count", "500", "--users", "20", "--pages", "7", "--malformed-share", "0.1"])
            .args(["--disorder", "2s", "--late-share", "0.05", "--late-by", "1h"])
            .output()
            .unwrap()
    };
    let out = run("clicks");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.last().unwrap().starts_with("loadgen: click 500 events in "), "{text}");
    let kinds = lines[lines.len() - 2];
    let counts: Vec<u64> = kinds
        .trim_start_matches("loadgen: ")
        .split(", ")
        .map(|part| part.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(counts.iter().sum::<u64>(), 500, "{kinds}");
    assert!(counts[1] > 0 && counts[2] > 0, "very late and malformed events: {kinds}");

    let messages = read_topic(&addr, "clicks");
    assert_eq!(messages.len(), 500);
    let (mut users, mut pages, mut bad_json) = (BTreeSet::new(), BTreeSet::new(), 0);
    for (_, key, payload) in &messages {
        users.insert(key.clone());
        match serde_json::from_slice::<serde_json::Value>(payload) {
            Ok(json) => {
                if let Some(page) = json["page_url"].as_str() {
                    pages.insert(page.to_owned());
                }
            }
            Err(_) => bad_json += 1,
        }
    }
    assert!(
        bad_json > 0 && bad_json < 50,
        "about 1 in 40 is not JSON (a quarter of the 10% malformed): {bad_json}"
    );
    assert_eq!((users.len(), pages.len()), (20, 7), "--users and --pages set the distinct keys and pages");

    // Seeded: a second run makes the same events (their times come from the clock), so each
    // partition gets the same users in the same order.
    let out = run("clicks-again");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let per_partition = |messages: &[Received]| {
        let mut keys: BTreeMap<i32, Vec<Vec<u8>>> = BTreeMap::new();
        for (partition, key, _) in messages {
            keys.entry(*partition).or_default().push(key.clone());
        }
        keys
    };
    let again = read_topic(&addr, "clicks-again");
    assert_eq!(again.len(), 500);
    assert_eq!(per_partition(&again), per_partition(&messages));

    // --pages belongs to the click family.
    let out = Command::new(BIN)
        .args(["loadgen", "--brokers", &addr, "--family", "sensor", "--pages", "7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pages applies to the click family only"));
}

#[test]
fn loadgen_produces_nexmark_flat_out() {
    let broker = broker(&["nexmark-events"]);
    let addr = broker.bootstrap_servers();
    let out = Command::new(BIN)
        .args(["loadgen", "--brokers", addr, "--family", "nexmark", "--count", "5000", "--rate", "max"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let summary = text.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with("loadgen: nexmark 5000 events in ") && summary.contains(" events/s (") && summary.ends_with(" MB/s), target max"),
        "{text}"
    );
    // On the default topic, all 5000: exactly 1 : 3 : 46, keyed by auction (person) id.
    let messages = read_topic(addr, "nexmark-events");
    assert_eq!(messages.len(), 5_000);
    let mut counts = BTreeMap::new();
    for (_, key, payload) in &messages {
        let json: serde_json::Value = serde_json::from_slice(payload).unwrap();
        let event_type = json["event_type"].as_str().unwrap().to_owned();
        let key_field = if event_type == "bid" { &json["auction"] } else { &json["id"] };
        assert_eq!(key_field.to_string().as_bytes(), key.as_slice(), "{json}");
        *counts.entry(event_type).or_insert(0) += 1;
    }
    assert_eq!(
        counts,
        [("auction".to_owned(), 300), ("bid".to_owned(), 4_600), ("person".to_owned(), 100)].into()
    );
}

#[test]
fn loadgen_paces_to_the_target_rate() {
    let broker = broker(&["sensor-events"]);
    let addr = broker.bootstrap_servers();
    let started = Instant::now();
    let out = Command::new(BIN)
        .args([
            "loadgen",
            "--brokers",
            addr,
            "--family",
            "sensor",
            "--rate",
            "2000",
            "--count",
            "3000",
            "--report-every",
            "500ms",
        ])
        .args(["--disorder", "2s", "--late-share", "0.05", "--malformed-share", "0.05"])
        .output()
        .unwrap();
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    // 3000 events at 2000/s: the last is due at 1.5 s.
    assert!(took >= Duration::from_secs(1) && took <= Duration::from_secs(6), "took {took:?}");
    assert!(text.lines().any(|l| l.contains("now ") && l.contains("events/s")), "progress lines: {text}");
    assert!(text.lines().last().unwrap().starts_with("loadgen: sensor 3000 events in "), "{text}");
    assert!(text.trim_end().ends_with("target 2000"), "{text}");
    let messages = read_topic(addr, "sensor-events");
    assert_eq!(messages.len(), 3_000);
    let bad_json = messages
        .iter()
        .filter(|(_, _, p)| serde_json::from_slice::<serde_json::Value>(p).is_err())
        .count();
    assert!(
        (10..=80).contains(&bad_json),
        "about 1 in 80 is not JSON (a quarter of the 5% malformed): {bad_json}"
    );
    // A bad rate is refused before connecting.
    let out = Command::new(BIN)
        .args(["loadgen", "--brokers", addr, "--family", "sensor", "--rate", "fast"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("or `max`"));
}
