//! The metrics endpoint of a running pipeline, scraped over TCP as Prometheus would:
//! counters equal what was produced, the probes answer, `promtool` accepts the text.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tidemark::broker::EmbeddedBroker;
use tidemark::config::parse_config;

/// One HTTP/1.1 GET; returns (status code, headers, body).
fn get(address: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(address).expect("connect to the metrics endpoint");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: */*\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("a complete response (Connection: close)");
    let (head, body) = response.split_once("\r\n\r\n").expect("headers end with a blank line");
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status code");
    (status, head.to_string(), body.to_string())
}

/// The value of the first sample line starting with `series` (name and labels), if any.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len() + 1..].parse().ok())
}

/// Sum over every sample of a family (all label values).
fn family_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .sum()
}

#[test]
fn metrics_endpoint_counts_what_was_produced_and_answers_probes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), PARTITIONS)]).unwrap();
    init_logs();
    let toml = pipeline_toml("metrics", broker.bootstrap_servers(), dir.path(), 2);
    assert!(toml.contains("listen = \"127.0.0.1:0\""));
    let running = tidemark::daemon::start(parse_config(&toml).unwrap(), Arc::new(AtomicBool::new(false))).unwrap();
    let address = running.metrics_address().expect("metrics are served");
    assert_ne!(address.port(), 0, "the bound port, not the configured 0");

    let events = plan(71, 0, 3000, 0.01, 0.02);
    produce(broker.bootstrap_servers(), &events);
    let produced = events.len() as f64;
    let mut text = String::new();
    wait_for("every produced event to be counted", Duration::from_secs(60), || {
        let (status, head, body) = get(address, "/metrics");
        assert_eq!(status, 200);
        assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
        text = body;
        // Every event counted, its epoch committed (so its latency is recorded), and the
        // partitions read to their end.
        family_sum(&text, "tidemark_events_received_total") == produced
            && value(&text, "tidemark_ingest_to_commit_seconds_count") == Some(produced)
            && value(&text, "tidemark_watermark_seconds").is_some()
            && family_sum(&text, "tidemark_consumer_lag_messages") == 0.0
    });
    for partition in 0..PARTITIONS {
        let series = format!(r#"{{source="clicks",partition="{partition}"}}"#);
        assert!(
            value(&text, &format!("tidemark_events_received_total{series}")).is_some_and(|v| v > 0.0),
            "{series}\n{text}"
        );
        assert_eq!(value(&text, &format!("tidemark_consumer_lag_messages{series}")), Some(0.0), "{series}");
        assert!(
            value(&text, &format!("tidemark_partition_watermark_seconds{series}")).is_some_and(|v| v > 1.7e9),
            "{series}"
        );
    }
    // Every received event was decoded or dead-lettered before decoding.
    let undecodable: f64 = ["decode", "schema", "event_time"]
        .iter()
        .map(|r| {
            text.lines()
                .filter(|l| l.starts_with("tidemark_events_dead_lettered_total{") && l.contains(&format!("reason=\"{r}\"")))
                .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
                .sum::<f64>()
        })
        .sum();
    assert!(undecodable > 0.0, "2% malformed events");
    assert_eq!(family_sum(&text, "tidemark_events_decoded_total") + undecodable, produced);
    assert_eq!(value(&text, "tidemark_event_time_to_commit_seconds_count"), Some(produced - undecodable));
    let late: f64 = text
        .lines()
        .filter(|l| l.starts_with("tidemark_events_dead_lettered_total{") && l.contains("reason=\"late\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(
        value(&text, r#"tidemark_late_events_total{query="views"}"#),
        Some(late),
        "one query: its late events are the late dead letters"
    );
    assert_eq!(family_sum(&text, "tidemark_rows_written_total"), running.stats().rows_written as f64);
    assert!(family_sum(&text, "tidemark_delta_commits_total") >= 1.0);
    assert_eq!(family_sum(&text, "tidemark_delta_commit_retries_total"), 0.0);
    assert!(family_sum(&text, "tidemark_shard_busy_seconds_total") > 0.0);
    assert!(value(&text, r#"tidemark_query_watermark_seconds{query="views"}"#).is_some());
    assert_eq!(value(&text, "tidemark_exchange_queue_capacity_batches"), Some(16.0));
    assert!(value(&text, r#"tidemark_exchange_queue_batches{from="0",to="1"}"#).is_some());
    assert!(value(&text, "tidemark_commit_queue_reports").is_some());
    // Latencies are positive and the buckets are cumulative up to the count.
    let p = value(&text, r#"tidemark_ingest_to_commit_seconds_bucket{le="+Inf"}"#).unwrap();
    assert_eq!(p, produced);
    assert!(value(&text, "tidemark_ingest_to_commit_seconds_sum").unwrap() > 0.0);
    assert_eq!(family_sum(&text, "tidemark_events_received_total"), produced);
    assert_eq!(running.stats().events_in as f64, produced);
    assert_eq!(family_sum(&text, "tidemark_bytes_received_total"), running.stats().bytes_in as f64);
    assert!(family_sum(&text, "tidemark_bytes_received_total") > produced);
    assert_eq!(value(&text, "tidemark_up"), Some(1.0));
    assert_eq!(value(&text, "tidemark_ready"), Some(1.0));
    assert!(
        family_sum(&text, "tidemark_events_dead_lettered_total") > 0.0,
        "2% malformed and 1% late events"
    );
    assert!(value(&text, "tidemark_watermark_seconds").unwrap() > 1.7e9);
    assert!(value(&text, "tidemark_watermark_lag_seconds").is_some());
    assert!(value(&text, "tidemark_epoch_commit_duration_seconds_count").unwrap() >= 1.0);
    assert_eq!(
        value(&text, r#"tidemark_epoch_commit_duration_seconds_bucket{le="+Inf"}"#),
        value(&text, "tidemark_epoch_commit_duration_seconds_count")
    );
    assert!(value(&text, "tidemark_state_size_bytes").is_some());
    assert!(value(&text, "process_resident_memory_bytes").unwrap() > 0.0);
    assert!(value(&text, "process_cpu_seconds_total").is_some());
    for family in ["tidemark_open_windows", "tidemark_state_keys"] {
        assert!(text.contains(&format!("# TYPE {family} ")), "{family} missing");
        assert!(
            value(&text, &format!("{family}{{query=\"views\",shard=\"1\"}}")).is_some(),
            "{family} per query and shard"
        );
    }
    assert!(family_sum(&text, "tidemark_state_keys") > 0.0);
    for family in ["tidemark_backpressure_pauses_total", "tidemark_shard_busy_ratio"] {
        assert!(value(&text, &format!("{family}{{shard=\"1\"}}")).is_some(), "{family} per shard");
    }

    assert_eq!(get(address, "/readyz").0, 200);
    let (status, _, body) = get(address, "/healthz");
    assert_eq!((status, body.trim()), (200, "ok"));
    assert_eq!(get(address, "/nope").0, 404);

    promtool_check(&text);

    // The scrape exports exactly the families config/prometheus/metric_families.txt lists
    // (the list the dashboard and the alert rules are checked against in tests/ops.rs).
    let listed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/prometheus/metric_families.txt")).unwrap();
    let mut listed: Vec<&str> = listed.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let mut exported: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    listed.sort_unstable();
    exported.sort_unstable();
    assert_eq!(exported, listed, "exported families vs config/prometheus/metric_families.txt");

    running.stop().unwrap();
    assert!(TcpStream::connect(address).is_err(), "the endpoint stops with the pipeline");
}

/// `promtool check metrics` on the scraped text (`scripts/test.sh` installs promtool).
fn promtool_check(text: &str) {
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => panic!(
            "cannot run promtool ({e}): run ./scripts/test.sh (it installs Debian's prometheus package, which ships promtool) or apt-get install prometheus"
        ),
    };
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_taken_port_leaves_metrics_off_and_the_pipeline_running() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[(TOPIC.to_string(), PARTITIONS)]).unwrap();
    init_logs();
    let toml = pipeline_toml("taken", broker.bootstrap_servers(), dir.path(), 1).replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let running = tidemark::daemon::start(parse_config(&toml).unwrap(), Arc::new(AtomicBool::new(false))).unwrap();
    assert_eq!(running.metrics_address(), None);
    wait_for("a committed epoch", Duration::from_secs(30), || running.stats().committed_epoch >= 1);
    running.stop().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let off = pipeline_toml("off", broker.bootstrap_servers(), dir.path(), 1).replace("127.0.0.1:0", "off");
    let running = tidemark::daemon::start(parse_config(&off).unwrap(), Arc::new(AtomicBool::new(false))).unwrap();
    assert_eq!(running.metrics_address(), None);
    running.stop().unwrap();
}
