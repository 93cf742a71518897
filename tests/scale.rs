//! Scale-out: three tidemark processes share one pipeline through a Kafka consumer group,
//! against a real Apache Kafka broker. One is SIGKILLed, one stalls (SIGSTOP) past the
//! session timeout and comes back, and one is added mid-run; every table must end equal to an
//! independent computation, with no row lost or twice.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::kafka;
use common::{Sent, DELAY_MS, WINDOW_MS};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tidemark::source::generator::EventKind;

const BIN: &str = env!("CARGO_BIN_EXE_tidemark");
const PARTITIONS: i32 = 4;
const SESSION_TIMEOUT_S: u64 = 6;

/// The partition a producer keying by user would pick (any stable hash will do: the test
/// only needs every event of a user in one partition).
fn user_partition(key: &[u8]) -> i32 {
    let h = key
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
    (h % PARTITIONS as u64) as i32
}

fn events(seed: u64, first: i64, count: i64) -> Vec<Sent> {
    common::plan(seed, first, count, 0.0, 0.005)
        .into_iter()
        .map(|mut s| {
            s.partition = user_partition(&s.event.key);
            s
        })
        .collect()
}

fn config(name: &str, topic: &str, bootstrap: &str, dir: &Path) -> String {
    format!(
        r#"
[pipeline]
name = "{name}"
state_dir = "{state}"
commit_interval = "200ms"
progress_interval = "2s"

[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{name}"

[scale]
session_timeout = "{SESSION_TIMEOUT_S}s"

[[sources]]
name = "clicks"
topic = "{topic}"
key = ["user_id"]
event_time = {{ field = "timestamp" }}
watermark = {{ delay = "{DELAY_MS}ms", idle_timeout = "1h" }}
on_error = "dlq"
schema = {{ user_id = "string", page_url = "string", action = "string", timestamp = "timestamp" }}

[[queries]]
name = "user_views"
from = "clicks"
window = {{ tumbling = "{WINDOW_MS}ms" }}
group_by = ["user_id"]
aggregates = [ {{ name = "view_count", fn = "count" }} ]
sink = "views"

[[sinks]]
name = "views"
kind = "delta"
path = "{views}"

[[sinks]]
name = "dlq"
kind = "delta"
path = "{dlq}"

[metrics]
listen = "off"
"#,
        state = dir.join("state").display(),
        views = dir.join("views").display(),
        dlq = dir.join("dlq").display(),
    )
}

fn time_us(payload: &[u8]) -> i64 {
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
    chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str().unwrap())
        .unwrap()
        .timestamp_micros()
}

/// (window start µs, user) → count: each task closes the windows its own partition's
/// watermark (max event time there − delay) has passed.
fn oracle(events: &[Sent]) -> BTreeMap<(i64, String), i64> {
    let valid: Vec<&Sent> = events.iter().filter(|s| matches!(s.event.kind, EventKind::Valid)).collect();
    let mut watermark: BTreeMap<i32, i64> = BTreeMap::new();
    for s in &valid {
        let w = watermark.entry(s.partition).or_insert(i64::MIN);
        *w = (*w).max(time_us(&s.event.payload) - DELAY_MS * 1000);
    }
    let size = WINDOW_MS * 1000;
    let mut rows = BTreeMap::new();
    for s in valid {
        let start = time_us(&s.event.payload).div_euclid(size) * size;
        if start + size <= watermark[&s.partition] {
            *rows.entry((start, String::from_utf8(s.event.key.clone()).unwrap())).or_insert(0) += 1;
        }
    }
    rows
}

fn table_rows(dir: &Path) -> Vec<((i64, String), i64)> {
    let mut out: Vec<((i64, String), i64)> = common::rows(dir)
        .into_iter()
        .map(|r| ((r["window_start"].parse().unwrap(), r["user_id"].clone()), r["view_count"].parse().unwrap()))
        .collect();
    out.sort();
    out
}

/// Source positions the tasks committed, as mirrored into the consumer group `group`.
fn committed(bootstrap: &str, group: &str, topic: &str) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    // The group coordinator may be busy while members come and go: ask again next time.
    let Ok(got) = consumer.committed_offsets(tpl, Duration::from_secs(10)) else {
        return Vec::new();
    };
    got.elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .collect()
}

struct Member {
    child: Child,
    log: std::path::PathBuf,
}

fn start(config: &Path, dir: &Path, name: &str) -> Member {
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(BIN)
        .arg("run")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Member { child, log }
}

fn signal(m: &Member, sig: &str) {
    assert!(Command::new("kill").arg(sig).arg(m.child.id().to_string()).status().unwrap().success());
}

fn stop(mut m: Member) {
    signal(&m, "-TERM");
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = m.child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = m.child.kill();
            panic!("member did not stop within 90 s; log:\n{}", tail(&m.log));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "member exited with {status}; log:\n{}", tail(&m.log));
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn three_processes_with_a_kill_a_stall_and_a_newcomer_equal_the_oracle() {
    common::init_logs();
    let bootstrap = kafka::bootstrap();
    let name = kafka::unique("scale");
    let topic = kafka::unique("scale-clicks");
    kafka::create_topics(&bootstrap, &[(&topic, PARTITIONS)]);
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("pipeline.toml");
    std::fs::write(&config_path, config(&name, &topic, &bootstrap, dir.path())).unwrap();

    let first = events(11, 0, 60_000);
    let second = events(12, 60_000, 60_000);
    common::produce_to(&bootstrap, &topic, &first);

    let a = start(&config_path, dir.path(), "a");
    let b = start(&config_path, dir.path(), "b");
    let views = dir.path().join("views");
    common::wait_for("the first rows", Duration::from_secs(120), || !table_rows(&views).is_empty());

    // A dies without a word; C joins; B stalls past the session timeout, then wakes up.
    let mut a = a;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let c = start(&config_path, dir.path(), "c");
    std::thread::sleep(Duration::from_secs(2));
    signal(&b, "-STOP");
    std::thread::sleep(Duration::from_secs(SESSION_TIMEOUT_S + 6));
    signal(&b, "-CONT");
    common::produce_to(&bootstrap, &topic, &second);

    let all: Vec<Sent> = first.into_iter().chain(second).collect();
    let mut ends = vec![0i64; PARTITIONS as usize];
    for s in &all {
        ends[s.partition as usize] += 1;
    }
    common::wait_for("every event committed", Duration::from_secs(240), || {
        committed(&bootstrap, &name, &topic) == ends
    });

    let expected: Vec<((i64, String), i64)> = oracle(&all).into_iter().collect();
    let mut got = Vec::new();
    let done = (0..100).any(|_| {
        got = table_rows(&views);
        got == expected || {
            std::thread::sleep(Duration::from_millis(300));
            false
        }
    });
    if !done {
        let dups = got.windows(2).filter(|w| w[0].0 == w[1].0).count();
        panic!(
            "views differ from the oracle: {} rows, expected {}, {dups} duplicate keys; first difference: {:?}\nlog b:\n{}\nlog c:\n{}",
            got.len(),
            expected.len(),
            got.iter().zip(&expected).find(|(g, e)| g != e),
            tail(&b.log),
            tail(&c.log)
        );
    }
    assert!(expected.len() > 1000, "the oracle has windows to compare ({})", expected.len());
    assert_eq!(common::read_dead_letters(&dir.path().join("dlq")), common::expected_dead_letters(&all));
    // The run did what it claims: a ran tasks before it was killed, state moved to another
    // process through the changelog, and the stalled b found itself fenced when it woke.
    let log = |m: &Member| std::fs::read_to_string(&m.log).unwrap();
    assert!(log(&a).contains("tasks assigned"), "process a ran tasks before it was killed");
    let restored_state = |text: &str| {
        text.lines()
            .filter(|l| l.contains("restored the task's state from its changelog"))
            .any(|l| !l.contains("records=0 "))
    };
    assert!(
        restored_state(&log(&b)) || restored_state(&log(&c)),
        "a task restored its state from the changelog"
    );
    assert!(
        log(&b).contains("was fenced"),
        "the stalled process was fenced when it woke; log:\n{}",
        tail(&b.log)
    );
    stop(b);
    stop(c);
}
