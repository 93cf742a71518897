//! The real binary: CLI behaviour, the demo, and crash recovery under SIGKILL.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_tidemark");

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap().success();
    assert!(ok, "kill -TERM failed");
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `tidemark broker` as its own process with topic `TOPIC` of `PARTITIONS`
/// partitions; returns it and its address.
#[test]
fn version_and_help() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("tidemark {}", env!("CARGO_PKG_VERSION")));
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "validate", "broker"] {
        assert!(help.contains(cmd), "--help lists {cmd}: {help}");
    }
    // The load generator and the load test are tidemark-tools' commands, not the daemon's.
    for tool in ["generate", "loadgen", "loadtest"] {
        let out = Command::new(BIN).arg(tool).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "`tidemark {tool}` is not a command");
        assert!(String::from_utf8_lossy(&out.stderr).contains("unrecognized subcommand"), "{tool}");
    }
}

#[test]
fn validate_accepts_every_shipped_config() {
    let mut n = 0;
    for entry in std::fs::read_dir(manifest_dir().join("config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(BIN).arg("validate").arg(&path).output().unwrap();
            assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
            n += 1;
        }
    }
    assert!(n >= 6, "every seed pipeline is shipped");
}

#[test]
fn validate_lists_every_error_with_path_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(
        &path,
        r#"[pipeline]
name = "broken"
commit_interval = "soon"

[[sources]]
name = "clicks"
topic = "clicks"
event_time = { field = "ts" }
schema = { page = "string", ts = "timestamp" }
colour = "blue"

[[queries]]
name = "q"
from = "clikcs"
window = { tumbling = "5m" }
aggregates = [ { name = "n", fn = "count" } ]
sink = "nowhere"
"#,
    )
    .unwrap();
    let out = Command::new(BIN).arg("validate").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["line 3", "commit_interval", "line 10", "colour", "line 14", "clikcs", "nowhere"] {
        assert!(err.contains(needle), "expected {needle:?} in:\n{err}");
    }
    // A TOML syntax error also names its line.
    std::fs::write(&path, "[pipeline]\nname = \n").unwrap();
    let out = Command::new(BIN).arg("validate").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn demo_runs_and_writes_a_readable_delta_table() {
    let dir = tempfile::tempdir().unwrap();
    // The shipped demo, with 1 s windows and a 1 s delay so a window closes within seconds.
    let demo = std::fs::read_to_string(manifest_dir().join("config/demo.toml")).unwrap();
    let fast = demo
        .replace("tumbling = \"10s\"", "tumbling = \"1s\"")
        .replace("delay = \"5s\"", "delay = \"1s\"");
    assert_ne!(fast, demo, "the demo config still has the 10s query this test speeds up");
    // Tests run in parallel: an ephemeral port, not the shipped 9464.
    let fast = format!("{fast}\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
    std::fs::write(dir.path().join("demo.toml"), fast).unwrap();
    let table = dir.path().join("data/gold/page_views_10s");
    let read_rows = || -> usize {
        if !table.join("_delta_log").exists() {
            return 0;
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(tidemark::sink::delta::read_table(&table, None))
            .map(|b| b.iter().map(|b| b.num_rows()).sum())
            .unwrap_or(0)
    };
    // Twice in the same directory: the second run continues from the first one's state
    // (its embedded broker starts empty) and adds rows.
    let mut rows_before = 0;
    for run in 0..2 {
        let mut child = Command::new(BIN)
            .args(["run", "demo.toml"])
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for("the demo to commit window rows", Duration::from_secs(60), || read_rows() > rows_before);
        sigterm(&child);
        let status = wait_exit(&mut child, Duration::from_secs(30));
        assert!(status.success(), "run {run}: graceful stop exits 0, got {status}");
        rows_before = read_rows();
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let batches = rt.block_on(tidemark::sink::delta::read_table(&table, None)).unwrap();
    let schema = batches[0].schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["window_start", "window_end", "page_url", "action", "events"]);
    // The demo's join: clicks matched with purchases by the same user a moment later.
    let joined = rows(&dir.path().join("data/gold/click_to_purchase"));
    let matched: Vec<_> = joined.iter().filter(|r| r["product_id"] != "NULL").collect();
    assert!(!matched.is_empty(), "the demo's join wrote no matched row ({} rows)", joined.len());
    for r in matched {
        let (click, purchase): (i64, i64) = (r["click_time"].parse().unwrap(), r["purchase_time"].parse().unwrap());
        assert!(click <= purchase && purchase <= click + 60_000_000, "{r:?}");
    }
}

#[test]
fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, addr) = start_broker(dir.path(), &[format!("{TOPIC}:{PARTITIONS}")]);
    crash_and_restart_until_the_oracle("crash", &addr, TOPIC, 12_000, |_| 2);
    sigterm(&broker);
    wait_exit(&mut broker, Duration::from_secs(10));
}

/// The same on Apache Kafka, with a million and a half events: far beyond what the embedded
/// broker retains, so every restart really resumes from its stored offsets.
#[test]
fn sigkill_on_apache_kafka_with_a_million_events_loses_and_duplicates_nothing() {
    let addr = common::kafka::bootstrap();
    let topic = common::kafka::unique("crash-clicks");
    common::kafka::create_topics(&addr, &[(topic.as_str(), PARTITIONS)]);
    crash_and_restart_until_the_oracle(&common::kafka::unique("crash"), &addr, &topic, 1_500_000, |_| 2);
}

/// Every restart runs with 1, 2 or 3 shards (more shards than this machine's cores share
/// them): the key groups move between shards, and the tables still equal the oracle.
#[test]
fn shard_count_changed_between_sigkills_gives_the_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, addr) = start_broker(dir.path(), &[format!("{TOPIC}:{PARTITIONS}")]);
    crash_and_restart_until_the_oracle("rescale", &addr, TOPIC, 12_000, |rng| rng.random_range(1..=3));
    sigterm(&broker);
    wait_exit(&mut broker, Duration::from_secs(10));
}

/// Produces events in two phases while the daemon is killed with SIGKILL at random moments
/// and restarted with `shards(rng)` shards each time; then the tables must equal the oracle.
/// `first`: events in the first phase (produced at once).
fn crash_and_restart_until_the_oracle(name: &str, addr: &str, topic: &str, first: i64, shards: impl Fn(&mut rand_chacha::ChaCha8Rng) -> usize) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pipeline.toml");
    let seed: u64 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("{name} test seed {seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let run = |rng: &mut rand_chacha::ChaCha8Rng| {
        std::fs::write(&config, pipeline_toml_on(topic, name, addr, dir.path(), shards(rng))).unwrap();
        Command::new(BIN).arg("run").arg(&config).stdout(Stdio::null()).spawn().unwrap()
    };
    let crash_after = |rng: &mut rand_chacha::ChaCha8Rng, max_ms: u64| {
        let mut child = run(rng);
        std::thread::sleep(Duration::from_millis(rng.random_range(50..max_ms)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    };

    let mut events = plan(21, 0, first, 0.0, 0.02);
    produce_to(addr, topic, &events);
    for _ in 0..4 {
        crash_after(&mut rng, 2_500);
    }
    // Very-late events are only deterministic once a watermark is committed: wait for the
    // first closed windows, crash again, then produce them.
    let mut child = run(&mut rng);
    wait_for("first committed windows", Duration::from_secs(60), || {
        !read_views(&dir.path().join("views")).is_empty()
    });
    child.kill().unwrap();
    child.wait().unwrap();
    // Phase 2 arrives while the daemon keeps getting killed, so crashes land mid-stream:
    // between reads, mid-epoch, mid-flush and mid-commit.
    let phase2 = plan(22, first, 8_000, 0.03, 0.02);
    let trickle = {
        let (addr, topic, phase2) = (addr.to_string(), topic.to_string(), phase2.clone());
        std::thread::spawn(move || {
            for chunk in phase2.chunks(400) {
                produce_to(&addr, &topic, chunk);
                std::thread::sleep(Duration::from_millis(150));
            }
        })
    };
    events.extend(phase2);
    while !trickle.is_finished() {
        crash_after(&mut rng, 1_500);
    }
    trickle.join().unwrap();
    crash_after(&mut rng, 1_500);

    let mut child = run(&mut rng);
    let expected = oracle(&events, final_watermark_us(&events));
    let expected_dlq = expected_dead_letters(&events);
    wait_for("the tables to match the oracle after crashes", Duration::from_secs(90), || {
        as_rows(&read_views(&dir.path().join("views"))) == expected && read_dead_letters(&dir.path().join("dlq")) == expected_dlq
    });
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).success());
    assert_eq!(as_rows(&read_views(&dir.path().join("views"))), expected);
    assert_eq!(read_dead_letters(&dir.path().join("dlq")), expected_dlq);
}

#[test]
fn an_unreachable_broker_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pipeline.toml");
    std::fs::write(&config, pipeline_toml("down", "127.0.0.1:1", dir.path(), 1)).unwrap();
    let out = Command::new(BIN).arg("run").arg(&config).env("RUST_LOG", "off").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach Kafka at 127.0.0.1:1") && err.contains("is the broker running"),
        "{err}"
    );
}

/// The file-drop source under SIGKILL: JSON-lines files (plain and gzip) are dropped into a
/// directory while the daemon keeps getting killed; one file is written in two parts with a
/// half line in between. After a clean final run the tables equal the oracle: every line read
/// exactly once.
#[test]
fn file_drop_source_killed_and_restarted_equals_the_oracle() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let config = dir.path().join("pipeline.toml");
    std::fs::write(&config, common::file_pipeline_toml("files", &inbox, dir.path(), 2)).unwrap();
    let seed: u64 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("file crash test seed {seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let events = plan(41, 0, 12_000, 0.0, 0.02);
    let lines = |chunk: &[common::Sent]| -> Vec<u8> {
        let mut out = Vec::new();
        for s in chunk {
            // Malformed generator payloads may contain newlines only if not JSON; keep one line each.
            out.extend(s.event.payload.iter().map(|&b| if b == b'\n' { b' ' } else { b }));
            out.push(b'\n');
        }
        out
    };
    // Drops a file atomically (write elsewhere, rename in), gzip for odd indexes.
    let drop_file = |index: usize, chunk: &[common::Sent]| {
        let body = lines(chunk);
        let (name, bytes) = if index % 2 == 1 {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&body).unwrap();
            (format!("part-{index:04}.jsonl.gz"), gz.finish().unwrap())
        } else {
            (format!("part-{index:04}.jsonl"), body)
        };
        let tmp = dir.path().join(format!("{name}.tmp"));
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, inbox.join(name)).unwrap();
    };
    let chunks: Vec<&[common::Sent]> = events.chunks(1_000).collect();
    for (i, chunk) in chunks[..4].iter().enumerate() {
        drop_file(i, chunk);
    }
    let run = || Command::new(BIN).arg("run").arg(&config).stdout(Stdio::null()).spawn().unwrap();
    let crash_after = |rng: &mut rand_chacha::ChaCha8Rng, max_ms: u64| {
        let mut child = run();
        std::thread::sleep(Duration::from_millis(rng.random_range(50..max_ms)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    };
    for _ in 0..3 {
        crash_after(&mut rng, 2_500);
    }
    // A plain file written in place, in two parts: the first ends in the middle of a line.
    let growing = inbox.join("part-0004.jsonl");
    let body = lines(chunks[4]);
    let cut = body.len() / 2;
    std::fs::write(&growing, &body[..cut]).unwrap();
    crash_after(&mut rng, 1_500);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&growing)
        .unwrap()
        .write_all(&body[cut..])
        .unwrap();
    // The rest arrive while the daemon keeps getting killed.
    for (i, chunk) in chunks.iter().enumerate().skip(5) {
        drop_file(i, chunk);
        crash_after(&mut rng, 1_200);
    }

    let mut child = run();
    let expected = oracle(&events, file_watermark_us(&events));
    let expected_dlq = expected_dead_letters(&events);
    let deadline = Instant::now() + Duration::from_secs(90);
    while as_rows(&read_views(&dir.path().join("views"))) != expected || read_dead_letters(&dir.path().join("dlq")) != expected_dlq {
        if Instant::now() > deadline {
            let got = as_rows(&read_views(&dir.path().join("views")));
            let diff: Vec<_> = expected
                .iter()
                .filter(|(k, v)| got.get(*k) != Some(*v))
                .map(|(k, v)| (k, v, got.get(k)))
                .collect();
            let extra: Vec<_> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
            let dlq = read_dead_letters(&dir.path().join("dlq"));
            panic!(
                "after crashes the file-fed tables differ from the oracle: (key, expected, got) {diff:?}; unexpected keys {extra:?}; dead letters {} vs {}",
                dlq.len(),
                expected_dlq.len()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).success());
    assert_eq!(as_rows(&read_views(&dir.path().join("views"))), expected);
    assert_eq!(read_dead_letters(&dir.path().join("dlq")), expected_dlq);
}

/// Whether an event is late does not depend on speed, epoch cuts or crashes: the same input
/// read at once, read as it trickles in with short epochs, and read by a daemon killed with
/// SIGKILL at random moments gives identical tables and dead letters. The watermark delay
/// (500 ms) is shorter than the input's disorder (2 s), so many events are late by a margin
/// that any timing-dependent rule would judge differently.
#[test]
fn fast_slow_and_killed_runs_write_identical_tables_and_dead_letters() {
    let events = plan(97, 0, 16_000, 0.01, 0.02);
    let toml = |name: &str, addr: &str, dir: &std::path::Path| {
        pipeline_toml(name, addr, dir, 2)
            .replace(&format!("delay = \"{DELAY_MS}ms\""), "delay = \"500ms\"")
            .replace("commit_interval = \"200ms\"", "commit_interval = \"50ms\"")
    };
    let tables = |dir: &std::path::Path| (read_views(&dir.join("views")), read_dead_letters(&dir.join("dlq")));
    let in_process = |slow: bool| {
        let dir = tempfile::tempdir().unwrap();
        let broker = tidemark::broker::EmbeddedBroker::start(&[(TOPIC.to_string(), PARTITIONS)]).unwrap();
        if !slow {
            produce(broker.bootstrap_servers(), &events);
        }
        let cfg = tidemark::config::parse_config(&toml("same", broker.bootstrap_servers(), dir.path())).unwrap();
        let running = tidemark::daemon::start(cfg, std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))).unwrap();
        if slow {
            for chunk in events.chunks(500) {
                produce(broker.bootstrap_servers(), chunk);
                std::thread::sleep(Duration::from_millis(60));
            }
        }
        wait_for("every event read", Duration::from_secs(60), || running.stats().events_in == events.len() as u64);
        running.stop().unwrap();
        tables(dir.path())
    };
    let fast = in_process(false);
    let late = fast.1.iter().filter(|(reason, _)| reason == "late").count();
    assert!(late > 100, "the input must make many late events ({late})");
    assert!(!fast.0.is_empty());
    let slow = in_process(true);
    assert_eq!(slow, fast, "read slowly, the tables differ from the run that read everything at once");

    let dir = tempfile::tempdir().unwrap();
    let (mut broker, addr) = start_broker(dir.path(), &[format!("{TOPIC}:{PARTITIONS}")]);
    let config = dir.path().join("pipeline.toml");
    std::fs::write(&config, toml("same", &addr, dir.path())).unwrap();
    let seed: u64 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("identical-runs test seed {seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let trickle = {
        let (addr, events) = (addr.clone(), events.clone());
        std::thread::spawn(move || {
            for chunk in events.chunks(800) {
                produce(&addr, chunk);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    while !trickle.is_finished() {
        let mut child = Command::new(BIN).arg("run").arg(&config).stdout(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(rng.random_range(50..1_200)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    trickle.join().unwrap();
    let mut child = Command::new(BIN).arg("run").arg(&config).stdout(Stdio::null()).spawn().unwrap();
    let mut last = (Vec::new(), Vec::new());
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("the killed run's tables to equal the fast run's", Duration::from_secs(90), || {
            last = tables(dir.path());
            last == fast
        })
    }));
    sigterm(&child);
    wait_exit(&mut child, Duration::from_secs(30));
    sigterm(&broker);
    wait_exit(&mut broker, Duration::from_secs(10));
    if waited.is_err() {
        assert_eq!(last.1, fast.1, "dead letters of the killed run differ");
        assert_eq!(last.0, fast.0, "tables of the killed run differ");
    }
}
