//! Scale-out: three tidemark processes share one pipeline (a window per user and a left
//! interval join of clicks with purchases) through a Kafka consumer group, against a real
//! Apache Kafka broker. One is SIGKILLed, one stalls (SIGSTOP) past the session timeout and
//! comes back, and one is added mid-run; every table must end equal to an independent
//! computation, with no row lost or twice.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::kafka;
use common::{Sent, DELAY_MS, T0_MS, WINDOW_MS};
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

/// How the producers spread events over partitions.
#[derive(Clone, Copy, PartialEq)]
enum Keying {
    /// By user: the pipeline reads the topics as they are.
    ByUser,
    /// Round robin: a user's events are in every partition, so the pipeline repartitions.
    RoundRobin,
}

impl Keying {
    fn partition(self, user: &[u8], index: usize) -> i32 {
        match self {
            Keying::ByUser => user_partition(user),
            Keying::RoundRobin => (index % PARTITIONS as usize) as i32,
        }
    }
}

fn events(seed: u64, first: i64, count: i64, keying: Keying) -> Vec<Sent> {
    events_with_late(seed, first, count, keying, 0.0)
}

/// With a share of events an hour late (dead letters, unless first in their partition).
fn events_with_late(seed: u64, first: i64, count: i64, keying: Keying, late_share: f64) -> Vec<Sent> {
    common::plan(seed, first, count, late_share, 0.005)
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            s.partition = keying.partition(&s.event.key, i);
            s
        })
        .collect()
}

/// (ms, user, product) purchases, keyed by user like the clicks.
type Purchase = (i64, String, String);

fn purchases(from: i64, count: i64) -> Vec<Purchase> {
    (from..from + count)
        .map(|i| (T0_MS + i * 50 - (i * 7919) % 1_500, format!("u{}", (i * 7) % 200), format!("p{}", i % 13)))
        .collect()
}

fn produce_purchases(bootstrap: &str, topic: &str, purchases: &[Purchase], keying: Keying) -> Vec<i32> {
    let p = common::connect_producer(bootstrap);
    let mut partitions = Vec::new();
    for (i, (ms, user, product)) in purchases.iter().enumerate() {
        let json = serde_json::json!({ "user_id": user, "product_id": product, "timestamp": common::rfc3339(*ms) });
        let partition = keying.partition(user.as_bytes(), i);
        p.send(topic, Some(partition), user.as_bytes(), json.to_string().as_bytes()).unwrap();
        partitions.push(partition);
    }
    p.flush(Duration::from_secs(60)).unwrap();
    partitions
}

/// The user of partition `partition`'s clock events.
fn clock_user(partition: i32) -> String {
    (0..).map(|i| format!("clock{i}")).find(|u| user_partition(u.as_bytes()) == partition).unwrap()
}

const CLOCK_MS: i64 = T0_MS + 3_600_000;

/// One click and one purchase an hour ahead on every partition, so every task's watermark
/// passes everything before: all windows close, every unmatched click is emitted. (Each
/// clock click matches its purchase: one join row per partition.)
fn clocks(bootstrap: &str, clicks: &str, purchases_topic: &str) {
    let late = CLOCK_MS;
    let p = common::connect_producer(bootstrap);
    for partition in 0..PARTITIONS {
        let user = clock_user(partition);
        let click = serde_json::json!({ "user_id": user, "page_url": "/", "action": "view", "timestamp": common::rfc3339(late) });
        p.send(clicks, Some(partition), user.as_bytes(), click.to_string().as_bytes()).unwrap();
        let buy = serde_json::json!({ "user_id": user, "product_id": "p", "timestamp": common::rfc3339(late) });
        p.send(purchases_topic, Some(partition), user.as_bytes(), buy.to_string().as_bytes()).unwrap();
    }
    p.flush(Duration::from_secs(60)).unwrap();
}

fn config(name: &str, topic: &str, purchases: &str, bootstrap: &str, dir: &Path, keying: Keying) -> String {
    let text = format!(
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

[[sources]]
name = "purchases"
topic = "{purchases}"
key = ["user_id"]
event_time = {{ field = "timestamp" }}
watermark = {{ delay = "{DELAY_MS}ms", idle_timeout = "1h" }}
on_error = "dlq"
schema = {{ user_id = "string", product_id = "string", timestamp = "timestamp" }}

[[queries]]
name = "attribution"
from = "clicks"
join = {{ source = "purchases", type = "left", on = ["user_id"], between = ["0s", "10s"], left_as = "c", right_as = "p" }}
select = [
  {{ name = "user_id", expr = "c.user_id" }},
  {{ name = "click_time", expr = "c.timestamp" }},
  {{ name = "product_id", expr = "p.product_id" }},
  {{ name = "purchase_time", expr = "p.timestamp" }},
]
sink = "attribution"

[[sinks]]
name = "attribution"
kind = "delta"
path = "{attribution}"

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
        attribution = dir.join("attribution").display(),
    );
    match keying {
        // Keyed by user: read as they are; each process keeps standby copies of the tasks it
        // does not run.
        Keying::ByUser => text.replace("[scale]\n", "[scale]\nstandby = true\n"),
        // Not keyed by user: the pipeline repartitions both topics by user (and restores a
        // moved task from its changelog alone).
        Keying::RoundRobin => text.replace("key = [\"user_id\"]\n", ""),
    }
}

fn time_us(payload: &[u8]) -> i64 {
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
    chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str().unwrap())
        .unwrap()
        .timestamp_micros()
}

/// (window start µs, user) → count of the valid clicks (the clock events close every window).
fn oracle(events: &[Sent]) -> BTreeMap<(i64, String), i64> {
    let size = WINDOW_MS * 1000;
    let mut rows = BTreeMap::new();
    for s in events.iter().filter(|s| matches!(s.event.kind, EventKind::Valid)) {
        let start = time_us(&s.event.payload).div_euclid(size) * size;
        *rows.entry((start, String::from_utf8(s.event.key.clone()).unwrap())).or_insert(0) += 1;
    }
    rows
}

/// The left join of the valid clicks with the purchases: (user, click µs, product, purchase
/// µs) per match within 10 s after the click, or the click with NULLs.
fn join_oracle(events: &[Sent], purchases: &[Purchase]) -> Vec<Vec<String>> {
    let mut by_user: BTreeMap<&str, Vec<&Purchase>> = BTreeMap::new();
    for p in purchases {
        by_user.entry(p.1.as_str()).or_default().push(p);
    }
    let mut out = Vec::new();
    for s in events.iter().filter(|s| matches!(s.event.kind, EventKind::Valid)) {
        let user = std::str::from_utf8(&s.event.key).unwrap();
        let t = time_us(&s.event.payload) / 1000;
        let matches: Vec<&&Purchase> = by_user
            .get(user)
            .map(|ps| ps.iter().filter(|p| t <= p.0 && p.0 <= t + 10_000).collect())
            .unwrap_or_default();
        for p in &matches {
            out.push(vec![user.to_string(), (t * 1000).to_string(), p.2.clone(), (p.0 * 1000).to_string()]);
        }
        if matches.is_empty() {
            out.push(vec![user.to_string(), (t * 1000).to_string(), "NULL".into(), "NULL".into()]);
        }
    }
    out.sort();
    out
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
    start_with(config, dir, name, &[])
}

fn start_with(config: &Path, dir: &Path, name: &str, args: &[&str]) -> Member {
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(BIN)
        .arg("run")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Member { child, log }
}

/// A member left running when the test fails would run on against a broker that is gone.
impl Drop for Member {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(m: &Member, sig: &str) {
    assert!(Command::new("kill").arg(sig).arg(m.child.id().to_string()).status().unwrap().success());
}

fn stop(m: &mut Member) {
    signal(m, "-TERM");
    // A task that has just moved may still be restoring, and a last commit may wait for a
    // busy broker: stopping is bounded by those waits, not by the epoch.
    let deadline = Instant::now() + Duration::from_secs(200);
    let status = loop {
        if let Some(s) = m.child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = m.child.kill();
            let kept = std::env::temp_dir().join(format!("tidemark-scale-unstopped-{}.log", m.child.id()));
            let _ = std::fs::copy(&m.log, &kept);
            panic!(
                "member did not stop within 200 s; whole log kept in {}; its end:\n{}",
                kept.display(),
                tail_lines(&m.log, 150)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "member exited with {status}; log:\n{}", tail(&m.log));
}

/// GET /metrics from `address`.
fn scrape(address: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
}

fn tail(log: &Path) -> String {
    tail_lines(log, 40)
}

/// The last `n` lines of a member's log.
fn tail_lines(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn three_processes_with_a_kill_a_stall_and_a_newcomer_equal_the_oracle() {
    kill_stall_and_add(Keying::ByUser);
}

/// The same with topics not keyed by user: each task repartitions its share of both topics
/// by user, and reads its partition of the repartition topics.
#[test]
fn unkeyed_topics_are_repartitioned_and_equal_the_oracle_through_a_kill_a_stall_and_a_newcomer() {
    kill_stall_and_add(Keying::RoundRobin);
}

fn kill_stall_and_add(keying: Keying) {
    common::init_logs();
    let bootstrap = kafka::bootstrap();
    let name = kafka::unique("scale");
    let topic = kafka::unique("scale-clicks");
    let purchase_topic = kafka::unique("scale-purchases");
    kafka::create_topics(&bootstrap, &[(&topic, PARTITIONS), (&purchase_topic, PARTITIONS)]);
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("pipeline.toml");
    std::fs::write(&config_path, config(&name, &topic, &purchase_topic, &bootstrap, dir.path(), keying)).unwrap();

    let first = events(11, 0, 60_000, keying);
    let second = events(12, 60_000, 60_000, keying);
    let (first_buys, second_buys) = (purchases(0, 6_000), purchases(6_000, 6_000));
    common::produce_to(&bootstrap, &topic, &first);
    let mut buy_partitions = produce_purchases(&bootstrap, &purchase_topic, &first_buys, keying);

    let a = start(&config_path, dir.path(), "a");
    let mut b = start(&config_path, dir.path(), "b");
    let views = dir.path().join("views");
    common::wait_for("the first rows", Duration::from_secs(120), || !table_rows(&views).is_empty());
    // Both run tasks before one dies (a late joiner gets its share in a second rebalance).
    let runs_tasks = |m: &Member| std::fs::read_to_string(&m.log).unwrap_or_default().contains("tasks assigned");
    common::wait_for("a and b to run tasks", Duration::from_secs(60), || runs_tasks(&a) && runs_tasks(&b));

    // A dies without a word; C joins; B stalls past the session timeout, then wakes up.
    let mut a = a;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let metrics_address = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let mut c = start_with(&config_path, dir.path(), "c", &["--metrics", &metrics_address]);
    // b stalls while it runs tasks.
    std::thread::sleep(Duration::from_secs(2));
    signal(&b, "-STOP");
    std::thread::sleep(Duration::from_secs(SESSION_TIMEOUT_S + 6));
    signal(&b, "-CONT");
    common::produce_to(&bootstrap, &topic, &second);
    buy_partitions.extend(produce_purchases(&bootstrap, &purchase_topic, &second_buys, keying));
    clocks(&bootstrap, &topic, &purchase_topic);

    let all: Vec<Sent> = first.into_iter().chain(second).collect();
    let buys: Vec<Purchase> = first_buys.into_iter().chain(second_buys).collect();
    let mut ends = vec![1i64; PARTITIONS as usize]; // the clock event
    for s in &all {
        ends[s.partition as usize] += 1;
    }
    let mut buy_ends = vec![1i64; PARTITIONS as usize];
    for p in &buy_partitions {
        buy_ends[*p as usize] += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let (clicks_at, buys_at) = (committed(&bootstrap, &name, &topic), committed(&bootstrap, &name, &purchase_topic));
        if clicks_at == ends && buys_at == buy_ends {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every event was committed within 240 s: clicks {clicks_at:?} of {ends:?}, purchases {buys_at:?} of {buy_ends:?}\nlog b:\n{}\nlog c:\n{}",
            tail(&b.log),
            tail(&c.log)
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    let expected: Vec<((i64, String), i64)> = oracle(&all).into_iter().collect();
    let mut got = Vec::new();
    let done = (0..200).any(|_| {
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
    let mut joined = join_oracle(&all, &buys);
    joined.extend((0..PARTITIONS).map(|p| vec![clock_user(p), (CLOCK_MS * 1000).to_string(), "p".into(), (CLOCK_MS * 1000).to_string()]));
    joined.sort();
    assert!(joined.iter().filter(|r| r[2] != "NULL").count() > 1000 && joined.iter().any(|r| r[2] == "NULL"));
    let mut got_joined = Vec::new();
    let _ = (0..100).any(|_| {
        got_joined = common::sorted_rows(&dir.path().join("attribution"), &["user_id", "click_time", "product_id", "purchase_time"]);
        got_joined == joined || {
            std::thread::sleep(Duration::from_millis(300));
            false
        }
    });
    assert_eq!(got_joined.len(), joined.len(), "join rows: got {}, expected {}", got_joined.len(), joined.len());
    assert!(got_joined == joined, "the join differs from the oracle");
    assert_eq!(common::read_dead_letters(&dir.path().join("dlq")), common::expected_dead_letters(&all));
    // Dead letters name where the record was produced, also when it was read through a
    // repartition topic.
    let mut origins: Vec<Vec<String>> = all
        .iter()
        .filter(|s| !matches!(s.event.kind, EventKind::Valid))
        .map(|s| vec![s.partition.to_string(), topic.clone()])
        .collect();
    origins.sort();
    assert_eq!(common::sorted_rows(&dir.path().join("dlq"), &["partition", "topic"]), origins);
    // The run did what it claims: a ran tasks before it was killed, state moved to another
    // process through the changelog, and the stalled b lost its tasks.
    let log = |m: &Member| std::fs::read_to_string(&m.log).unwrap();
    assert!(log(&a).contains("tasks assigned"), "process a ran tasks before it was killed");
    let restored_state = |text: &str| {
        text.lines()
            .filter(|l| l.contains("restored the task's state from its changelog"))
            .any(|l| match keying {
                // The copy may already hold every record: what is left to read may be nothing.
                Keying::ByUser => l.contains("standby=true"),
                Keying::RoundRobin => l.contains("standby=false") && !l.contains("records=0 "),
            })
    };
    assert!(
        restored_state(&log(&b)) || restored_state(&log(&c)),
        "a task restored its state from the changelog (from a standby copy, with standby = true)"
    );
    assert!(log(&b).contains("tasks revoked"), "the stalled process lost its tasks; log:\n{}", tail(&b.log));
    let repartitioned = [&a, &b, &c].iter().any(|m| log(m).contains("repartitioning"));
    assert_eq!(
        repartitioned,
        keying == Keying::RoundRobin,
        "topics not keyed by user, and only they, are repartitioned"
    );
    if keying == Keying::RoundRobin {
        // What the tasks committed past in a repartition topic is deleted.
        let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
        let repartition_topic = format!("{name}-repartition-clicks");
        common::wait_for("consumed repartition records to be deleted", Duration::from_secs(60), || {
            (0..PARTITIONS).any(|p| {
                consumer
                    .fetch_watermarks(&repartition_topic, p, Duration::from_secs(10))
                    .is_ok_and(|(low, _)| low > 0)
            })
        });
    }
    // c serves one endpoint for all its tasks: each family once, each task's series labelled.
    let text = scrape(&metrics_address);
    let running: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tidemark_tasks_running "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tidemark_tasks_running in:\n{text}"));
    assert!(running >= 1.0, "c runs tasks");
    let helps: Vec<&str> = text.lines().filter(|l| l.starts_with("# HELP ")).collect();
    let unique: std::collections::BTreeSet<&&str> = helps.iter().collect();
    assert_eq!(helps.len(), unique.len(), "a family is declared twice");
    assert!(text.lines().any(|l| l.starts_with("tidemark_events_received_total{task=\"")), "{text}");
    stop(&mut b);
    stop(&mut c);
}

/// Every table, dead letters included, of one process without [scale] and of two processes
/// repartitioning the same unkeyed topics: repartitioned tasks judge each event late or not
/// as one process reading its source partition does, and dead letters name the same origin.
#[test]
fn repartitioned_tasks_decide_as_one_process_does() {
    common::init_logs();
    let bootstrap = kafka::bootstrap();
    let (topic, purchase_topic) = (kafka::unique("same-clicks"), kafka::unique("same-purchases"));
    kafka::create_topics(&bootstrap, &[(&topic, PARTITIONS), (&purchase_topic, PARTITIONS)]);
    let sent = events_with_late(31, 0, 40_000, Keying::RoundRobin, 0.003);
    assert!(sent.iter().filter(|s| matches!(s.event.kind, EventKind::VeryLate)).count() > 50);
    common::produce_to(&bootstrap, &topic, &sent);
    let buy_partitions = produce_purchases(&bootstrap, &purchase_topic, &purchases(0, 4_000), Keying::RoundRobin);
    clocks(&bootstrap, &topic, &purchase_topic);
    let mut ends = vec![1i64; PARTITIONS as usize];
    for s in &sent {
        ends[s.partition as usize] += 1;
    }
    let mut buy_ends = vec![1i64; PARTITIONS as usize];
    for p in &buy_partitions {
        buy_ends[*p as usize] += 1;
    }

    let tables = |dir: &Path| -> Vec<Vec<Vec<String>>> {
        vec![
            common::sorted_rows(&dir.join("views"), &["window_start", "user_id", "view_count"]),
            common::sorted_rows(&dir.join("attribution"), &["user_id", "click_time", "product_id", "purchase_time"]),
            common::sorted_rows(&dir.join("dlq"), &["reason", "topic", "partition", "offset", "payload"]),
        ]
    };
    let run = |name: &str, processes: usize, scale: bool| -> Vec<Vec<Vec<String>>> {
        let dir = tempfile::tempdir().unwrap();
        // A delay shorter than the events' disorder: whether a disordered event is late
        // depends on exactly which events of its partition came before it.
        let mut text = config(name, &topic, &purchase_topic, &bootstrap, dir.path(), Keying::RoundRobin)
            .replace(&format!("delay = \"{DELAY_MS}ms\""), "delay = \"300ms\"");
        if !scale {
            text = text.replace(&format!("session_timeout = \"{SESSION_TIMEOUT_S}s\""), "enabled = false");
        }
        let path = dir.path().join("pipeline.toml");
        std::fs::write(&path, text).unwrap();
        let mut members: Vec<Member> = (0..processes).map(|i| start(&path, dir.path(), &format!("{name}-{i}"))).collect();
        common::wait_for("every event committed", Duration::from_secs(180), || {
            committed(&bootstrap, name, &topic) == ends && committed(&bootstrap, name, &purchase_topic) == buy_ends
        });
        // The last events committed upstream reach the tables within a few epochs.
        let mut last = tables(dir.path());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            std::thread::sleep(Duration::from_secs(3));
            let now = tables(dir.path());
            if now == last && !now[0].is_empty() || Instant::now() > deadline {
                break;
            }
            last = now;
        }
        for m in &mut members {
            stop(m);
        }
        tables(dir.path())
    };
    let single = run(&kafka::unique("same-single"), 1, false);
    let scaled = run(&kafka::unique("same-scaled"), 2, true);
    let late = single[2].iter().filter(|r| r[0] == "late").count();
    let very_late = sent.iter().filter(|s| matches!(s.event.kind, EventKind::VeryLate)).count();
    assert!(
        late > very_late * 2,
        "disordered events were dead-lettered too ({late} late, {very_late} an hour late)"
    );
    for (what, (one, two)) in ["views", "join", "dead letters"].iter().zip(single.iter().zip(&scaled)) {
        assert_eq!(
            one.len(),
            two.len(),
            "{what}: {} rows by one process, {} by two repartitioning",
            one.len(),
            two.len()
        );
        assert!(one == two, "{what} differ: first difference {:?}", one.iter().zip(two).find(|(a, b)| a != b));
    }
}
