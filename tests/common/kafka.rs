//! A real Apache Kafka broker for the tests that need one (`scripts/kafka.sh`).
//!
//! `./scripts/test.sh` starts one broker for the whole run and passes its address in
//! `TIDEMARK_TEST_KAFKA`; a test binary run on its own (`cargo test --test NAME`) starts its
//! own broker, stopped by a watchdog when the test process exits. Tests sharing a broker keep
//! apart by topic and group names ([`unique`]).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh")
}

/// The broker's bootstrap address.
pub fn bootstrap() -> String {
    static ADDR: OnceLock<String> = OnceLock::new();
    ADDR.get_or_init(|| {
        if let Ok(addr) = std::env::var("TIDEMARK_TEST_KAFKA") {
            return addr;
        }
        let dir = tempfile::Builder::new().prefix("tidemark-test-kafka").tempdir().unwrap().keep();
        let out = Command::new(script()).arg("start").arg(&dir).stderr(Stdio::inherit()).output().unwrap();
        assert!(out.status.success(), "scripts/kafka.sh start failed (see its messages above)");
        let addr = String::from_utf8(out.stdout).unwrap().trim().to_string();
        // Stop the broker when this test process is gone, however it ends.
        let watchdog = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; '{script}' stop '{dir}' --clean",
            pid = std::process::id(),
            script = script().display(),
            dir = dir.display()
        );
        // `setsid -f` forks the watchdog into a session of its own and returns at once.
        let started = Command::new("setsid")
            .args(["-f", "bash", "-c", &watchdog])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(started.success(), "could not start the broker's watchdog");
        addr
    })
    .clone()
}

/// A name no other test on the shared broker uses.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Creates topics (name, partitions) and waits until they exist.
pub fn create_topics(bootstrap: &str, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    let new: Vec<NewTopic> = topics.iter().map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1))).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let results = rt
        .block_on(admin.create_topics(&new, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))))
        .unwrap();
    for r in results {
        r.unwrap_or_else(|(topic, e)| panic!("creating topic {topic}: {e}"));
    }
}

/// Runs a Kafka command-line tool through `scripts/kafka.sh tool`; returns its stdout.
pub fn tool(name: &str, args: &[&str]) -> String {
    let out = Command::new(script()).arg("tool").arg(name).args(args).output().unwrap();
    assert!(out.status.success(), "{name} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `kafka-consumer-groups --describe`: per partition (topic, partition, current offset, lag).
pub fn group_offsets(bootstrap: &str, group: &str) -> Vec<(String, i32, i64, i64)> {
    let text = tool("kafka-consumer-groups", &["--bootstrap-server", bootstrap, "--describe", "--group", group]);
    let mut out = Vec::new();
    let mut header: Option<Vec<&str>> = None;
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.contains(&"CURRENT-OFFSET") {
            header = Some(cols);
            continue;
        }
        let Some(h) = &header else { continue };
        if cols.len() < h.len() {
            continue;
        }
        let at = |name: &str| cols[h.iter().position(|c| *c == name).unwrap()];
        out.push((
            at("TOPIC").to_string(),
            at("PARTITION").parse().unwrap(),
            at("CURRENT-OFFSET").parse().unwrap_or(-1),
            at("LAG").parse().unwrap_or(-1),
        ));
    }
    out.sort();
    out
}

/// Reads a topic from the start as a `read_committed` consumer would, until `until` holds for
/// what was read or `timeout` passes; returns (key, value) per message, value `None` for a
/// tombstone.
pub fn read_committed(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
    mut until: impl FnMut(&[(Option<String>, Option<String>)]) -> bool,
) -> Vec<(Option<String>, Option<String>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = std::time::Instant::now() + timeout;
    let mut got = Vec::new();
    while !until(&got) && std::time::Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8(b.to_vec()).unwrap());
            got.push((text(m.key()), text(m.payload())));
        }
    }
    got
}
