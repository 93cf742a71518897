//! `tidemark-tools loadtest` through the real binaries, tiny: every phase runs and the report
//! has all its parts. Behaviour, not timing: numbers must be there and positive, no rate is
//! asserted. The load test runs the `tidemark` daemon found next to `tidemark-tools` (cargo
//! builds both with `--workspace`).

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tidemark-tools");

/// Fails with how to build the daemon when this test runs without it (e.g. `-p tidemark-tools`
/// alone builds only this package's binary).
fn require_daemon() {
    let daemon = Path::new(BIN).with_file_name("tidemark");
    assert!(
        daemon.is_file(),
        "{} is missing: build it with `cargo build --release -p tidemark`, or run the tests with --workspace",
        daemon.display()
    );
}

fn number(report: &serde_json::Value, pointer: &str) -> f64 {
    report
        .pointer(pointer)
        .and_then(serde_json::Value::as_f64)
        .unwrap_or_else(|| panic!("{pointer} is not a number in {report:#}"))
}

#[test]
fn a_tiny_load_test_runs_every_phase_and_reports_it() {
    require_daemon();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["loadtest", "--events", "8000", "--partitions", "4", "--shards", "2"])
        .args(["--step-seconds", "1", "--keys", "5000", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "loadtest failed:\n{stdout}\n{stderr}");

    for part in [
        "tidemark load test, ",
        "machine:  ",
        "broker:   embedded",
        "baseline (raw consume + JSON decode, 2 threads)",
        "pipeline (Kafka JSON → window → Delta)",
        "pipeline / baseline",
        "pipeline per CPU-second of the child",
        "max sustained: ",
        "latency at half the max sustained rate: ",
        "ingest → commit ",
        "event time → commit ",
        "peak RSS of the pipeline (VmHWM)",
        "5000 keys in one 5-minute window:",
        "pipeline exit after SIGTERM         exit status: 0",
        "promtool check metrics: ",
    ] {
        assert!(stdout.contains(part), "the report lacks {part:?}:\n{stdout}");
    }
    // Progress goes to stderr, phase by phase.
    for phase in [
        "loadtest: round 1/3: baseline (raw consume + JSON decode, 2 threads) ",
        "loadtest: round 3/3: ",
        ", pipeline catch-up ",
        "loadtest: latency at ",
        "loadtest: filling 5000",
    ] {
        assert!(stderr.contains(phase), "no {phase:?} on stderr:\n{stderr}");
    }

    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(number(&report, "/baseline/events"), 8000.0);
    assert_eq!(number(&report, "/catch_up/events"), 8000.0);
    assert_eq!(report["baseline_rounds"].as_array().unwrap().len(), 3);
    assert_eq!(report["catch_up_rounds"].as_array().unwrap().len(), 3);
    for positive in [
        "/event_bytes_avg",
        "/baseline/seconds",
        "/catch_up/seconds",
        "/catch_up/events_measured",
        "/catch_up/startup_seconds",
        "/lag_cap",
        "/max_sustained_rate",
        "/latency/rate",
        "/latency/step/produced",
        "/peak_rss_bytes",
        "/child_cpu_seconds",
        "/keys/rss_bytes",
        "/keys/peak_rss_bytes",
    ] {
        assert!(number(&report, positive) > 0.0, "{positive} > 0 in {report:#}");
    }
    assert!(number(&report, "/keys/state_keys") >= 5000.0, "{report:#}");
    let steps = report["steps"].as_array().unwrap();
    assert!(!steps.is_empty());
    assert!(steps.iter().any(|s| s["sustained"] == true), "{report:#}");
    for step in steps {
        assert!(step["target_rate"].as_u64().unwrap() > 0 && step["produced"].as_u64().unwrap() > 0, "{step}");
    }
    // The highest sustained rate is one of the rates tried, and sustained there.
    let max = report["max_sustained_rate"].as_u64().unwrap();
    assert!(steps.iter().any(|s| s["target_rate"].as_u64() == Some(max) && s["sustained"] == true));
    // Quantiles, where the pipeline exports the histograms, are ordered and positive.
    for histogram in ["ingest_to_commit", "event_time_to_commit"] {
        let q = &report["latency"][histogram];
        if !q.is_null() {
            let (p50, p99, p999) = (q["p50"].as_f64().unwrap(), q["p99"].as_f64().unwrap(), q["p999"].as_f64().unwrap());
            assert!(0.0 < p50 && p50 <= p99 && p99 <= p999, "{histogram}: {q}");
        }
    }

    let scrape = std::fs::read_to_string(dir.path().join("metrics.prom")).unwrap();
    assert!(scrape.contains("tidemark_events_received_total{"), "{scrape}");
    for file in ["pipeline.toml", "pipeline.log", "lag.csv", "report.txt"] {
        assert!(dir.path().join(file).is_file(), "{file} written");
    }
}

#[test]
fn a_load_test_too_big_for_the_embedded_broker_says_what_to_do() {
    require_daemon();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["loadtest", "--events", "50000000", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for hint in ["retention", "lower --events", "--bootstrap", "scripts/kafka-broker.sh"] {
        assert!(stderr.contains(hint), "{hint:?} in:\n{stderr}");
    }
    let help = Command::new(BIN).args(["loadtest", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in ["--bootstrap", "--shards", "--events", "--step-seconds", "--keys", "--out", "--daemon"] {
        assert!(help.contains(flag), "{flag} in:\n{help}");
    }
}

#[test]
fn a_missing_daemon_binary_is_named_with_how_to_build_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-tidemark");
    let out = Command::new(BIN)
        .args(["loadtest", "--events", "8000", "--daemon"])
        .arg(&missing)
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for hint in [missing.display().to_string().as_str(), "cargo build --release -p tidemark", "--daemon PATH"] {
        assert!(stderr.contains(hint), "{hint:?} in:\n{stderr}");
    }
    assert!(!dir.path().join("report.txt").exists(), "nothing ran");
}
