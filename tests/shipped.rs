//! The shipped seed pipelines in `config/`, run as shipped (only the broker address, state and
//! table paths redirected to a temp dir) on events made here, each table compared with an
//! oracle computed here: click analytics (update), rolling metrics (sliding, append), user
//! sessions (append), daily totals (update), the file-drop pipeline, and change data capture
//! (Debezium change events applied per primary key).

mod common;

use common::{rows, sorted_rows};

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tidemark::broker::EmbeddedBroker;
use tidemark::config::{load_config, Bootstrap, Config};
use tidemark::source::producer::EventProducer;

/// 2026-11-23T00:00:00Z in ms.
const T0: i64 = 1_795_392_000_000;

fn shipped(name: &str, dir: &Path, bootstrap: Option<&str>) -> Config {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config").join(name);
    let mut cfg = load_config(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    cfg.pipeline.state_dir = dir.join("state");
    cfg.pipeline.commit_interval = Duration::from_millis(200);
    cfg.pipeline.shards = 2;
    if let Some(b) = bootstrap {
        cfg.kafka.bootstrap_servers = Bootstrap::Servers(b.to_string());
    }
    cfg.generator = None;
    // Tests run in parallel: an ephemeral port, not the shipped 9464.
    cfg.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    for s in cfg.sinks.iter_mut().filter(|s| s.kafka.is_none()) {
        s.path = dir.join(&s.name);
    }
    for s in &mut cfg.sources {
        if let Some(files) = &mut s.files {
            files.path = dir.join("inbox");
        }
    }
    cfg
}

fn produce(bootstrap: &str, topic: &str, events: &[serde_json::Value]) {
    let p = EventProducer::connect(bootstrap).unwrap();
    for e in events {
        p.send(topic, Some(0), b"k", e.to_string().as_bytes()).unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

/// Rows keyed by `key` columns, values the other listed columns; panics on a duplicate key.
fn keyed(table: &Path, key: &[&str], values: &[&str]) -> BTreeMap<Vec<String>, Vec<String>> {
    let mut out = BTreeMap::new();
    for r in rows(table) {
        let k: Vec<String> = key.iter().map(|c| r[*c].clone()).collect();
        let v: Vec<String> = values.iter().map(|c| r[*c].clone()).collect();
        assert!(out.insert(k.clone(), v).is_none(), "two rows for {k:?} in {}", table.display());
    }
    out
}

/// A timestamp cell as `rows` shows it: µs since the epoch.
fn ts(us: i64) -> String {
    us.to_string()
}

fn run_until(cfg: Config, what: &str, mut done: impl FnMut() -> bool) {
    let running = tidemark::daemon::start(cfg, Arc::new(AtomicBool::new(false))).expect("start");
    common::wait_for(what, Duration::from_secs(90), &mut done);
    running.stop().unwrap();
}

/// Click events: (ms, user, page, action).
fn clicks(n: i64, step_ms: i64) -> Vec<(i64, String, String, &'static str)> {
    let actions = ["view", "view", "click", "scroll", "view", "click", "purchase"];
    (0..n)
        .map(|i| {
            let jitter = (i * 7919) % 1500; // disorder under the pipelines' watermark delays
            (
                T0 + i * step_ms - jitter,
                format!("u{}", (i * 31) % 97),
                format!("/p{}", (i * 17) % 7),
                actions[(i % 7) as usize],
            )
        })
        .collect()
}

fn click_json(e: &(i64, String, String, &str)) -> serde_json::Value {
    serde_json::json!({ "user_id": e.1, "page_url": e.2, "action": e.3, "timestamp": common::rfc3339(e.0) })
}

#[test]
fn click_analytics_and_daily_totals_as_shipped() {
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[("click-events".to_string(), 1)]).unwrap();
    let events = clicks(3_000, 400); // 20 minutes
    produce(broker.bootstrap_servers(), "click-events", &events.iter().map(click_json).collect::<Vec<_>>());

    // Click analytics: update mode, so every window of the accepted events is in the table.
    let mut g: BTreeMap<(i64, String), (i64, BTreeSet<String>, i64)> = BTreeMap::new();
    for (t, user, page, action) in events.iter().filter(|e| e.3 == "view" || e.3 == "click") {
        let w = (t * 1000).div_euclid(300_000_000) * 300_000_000;
        let e = g.entry((w, page.clone())).or_default();
        e.1.insert(user.clone());
        if *action == "view" {
            e.0 += 1
        } else {
            e.2 += 1
        }
    }
    let expected: BTreeMap<Vec<String>, Vec<String>> = g
        .into_iter()
        .map(|((w, page), (views, users, clicks))| {
            let ctr = if views == 0 {
                "NULL".to_string()
            } else {
                (clicks as f64 / views as f64).to_string()
            };
            let date = chrono::DateTime::from_timestamp_micros(w).unwrap().format("%Y-%m-%d").to_string();
            (
                vec![ts(w), page],
                vec![views.to_string(), users.len().to_string(), clicks.to_string(), ctr, date],
            )
        })
        .collect();
    let cdir = dir.path().join("click");
    let table = cdir.join("page_stats_5min");
    let read = || {
        keyed(
            &table,
            &["window_start", "page_url"],
            &["views", "unique_users", "clicks", "click_through_rate", "window_date"],
        )
    };
    run_until(
        shipped("click_analytics.toml", &cdir, Some(broker.bootstrap_servers())),
        "click analytics",
        || read() == expected,
    );
    assert_eq!(read(), expected);

    // Daily totals over events spread across three days.
    let events = clicks(3_000, 90_000);
    let broker = EmbeddedBroker::start(&[("click-events".to_string(), 1)]).unwrap();
    produce(broker.bootstrap_servers(), "click-events", &events.iter().map(click_json).collect::<Vec<_>>());
    let mut g: BTreeMap<(i64, String), (i64, i64, BTreeSet<String>)> = BTreeMap::new();
    for (t, user, page, action) in &events {
        let day = (t * 1000).div_euclid(86_400_000_000) * 86_400_000_000;
        let e = g.entry((day, page.clone())).or_default();
        e.0 += 1;
        e.1 += (*action == "view") as i64;
        e.2.insert(user.clone());
    }
    let expected: BTreeMap<Vec<String>, Vec<String>> = g
        .into_iter()
        .map(|((d, page), (n, views, users))| {
            (
                vec![ts(d), page],
                vec![ts(d + 86_400_000_000), n.to_string(), views.to_string(), users.len().to_string()],
            )
        })
        .collect();
    assert!(expected.len() > 14);
    let ddir = dir.path().join("daily");
    let table = ddir.join("daily_page_totals");
    let read = || keyed(&table, &["window_start", "page_url"], &["window_end", "events", "views", "unique_users"]);
    run_until(shipped("daily_totals.toml", &ddir, Some(broker.bootstrap_servers())), "daily totals", || {
        read() == expected
    });
    assert_eq!(read(), expected);
}

#[test]
fn rolling_metrics_and_user_sessions_as_shipped() {
    let dir = tempfile::tempdir().unwrap();
    // Rolling metrics: one device event per second for an hour.
    let broker = EmbeddedBroker::start(&[("device-events".to_string(), 1)]).unwrap();
    let events: Vec<(i64, String, String, f64)> = (0..3_600i64)
        .map(|i| {
            (
                T0 + i * 1_000 - (i * 7919) % 20_000,
                format!("d{}", i % 5),
                format!("s{}", (i * 13) % 11),
                (i % 40) as f64 / 8.0,
            )
        })
        .collect();
    let json: Vec<_> = events
        .iter()
        .map(|e| serde_json::json!({ "device_id": e.1, "session_id": e.2, "click_rate": e.3, "ts": common::rfc3339(e.0) }))
        .collect();
    produce(broker.bootstrap_servers(), "device-events", &json);
    let watermark = (events.iter().map(|e| e.0).max().unwrap() - 30_000) * 1000;
    // (window start, device) → (events, rate sum, sessions, events with a rate above 2)
    type Window = (i64, f64, BTreeSet<String>, i64);
    let mut g: BTreeMap<(i64, String), Window> = BTreeMap::new();
    for (t, device, session, rate) in &events {
        let last = (t * 1000).div_euclid(300_000_000) * 300_000_000;
        for s in [last - 300_000_000, last] {
            if s + 600_000_000 <= watermark {
                let e = g.entry((s, device.clone())).or_default();
                e.0 += 1;
                e.1 += rate;
                e.2.insert(session.clone());
                e.3 += i64::from(*rate > 2.0);
            }
        }
    }
    let rdir = dir.path().join("rolling");
    let table = rdir.join("device_metrics_10m");
    let read = || {
        keyed(
            &table,
            &["window_start", "device_id"],
            &["events", "avg_click_rate", "distinct_sessions", "high_rate_share"],
        )
    };
    let expected_len = g.len();
    run_until(
        shipped("rolling_metrics.toml", &rdir, Some(broker.bootstrap_servers())),
        "rolling metrics",
        || read().len() >= expected_len,
    );
    let got = read();
    assert_eq!(got.len(), expected_len);
    for ((s, device), (n, sum, sessions, high)) in g {
        let row = &got[&vec![ts(s), device.clone()]];
        assert_eq!(row[0], n.to_string(), "{s} {device}");
        let avg: f64 = row[1].parse().unwrap();
        assert!((avg - sum / n as f64).abs() < 1e-9, "{s} {device}: avg {avg} vs {}", sum / n as f64);
        assert_eq!(row[2], sessions.len().to_string());
        let share: f64 = row[3].parse().unwrap();
        assert!((share - high as f64 / n as f64).abs() < 1e-9, "{s} {device}: share {share} vs {high}/{n}");
    }

    // User sessions: each user visits in bursts 45 minutes apart; a last event far ahead
    // moves the watermark past every session.
    let broker = EmbeddedBroker::start(&[("click-events".to_string(), 1)]).unwrap();
    let mut events = Vec::new();
    for u in 0..20i64 {
        for burst in 0..3i64 {
            for j in 0..(2 + (u + burst) % 4) {
                let t = T0 + u * 11_000 + burst * 45 * 60_000 + j * 4 * 60_000;
                events.push((t, format!("u{u}"), format!("/p{}", (u + j) % 5), "view"));
            }
        }
    }
    events.sort();
    let mut all = events.clone();
    all.push((T0 + 6 * 3_600_000, "clock".to_string(), "/".to_string(), "view"));
    produce(broker.bootstrap_servers(), "click-events", &all.iter().map(click_json).collect::<Vec<_>>());
    let gap = 30 * 60_000;
    let mut expected: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
    for u in 0..20 {
        let user = format!("u{u}");
        let mine: Vec<_> = events.iter().filter(|e| e.1 == user).collect();
        let mut sessions: Vec<Vec<&(i64, String, String, &str)>> = Vec::new();
        for e in mine {
            match sessions.last_mut() {
                Some(s) if e.0 < s.last().unwrap().0 + gap => s.push(e),
                _ => sessions.push(vec![e]),
            }
        }
        for s in sessions {
            let (start, end) = (s[0].0, s.last().unwrap().0 + gap);
            let pages: BTreeSet<&String> = s.iter().map(|e| &e.2).collect();
            expected.insert(
                vec![user.clone(), ts(start * 1000)],
                vec![
                    ts(end * 1000),
                    ((end - start) as f64 / 1000.0).to_string(),
                    s.len().to_string(),
                    pages.len().to_string(),
                    s[0].2.clone(),
                    s.last().unwrap().2.clone(),
                ],
            );
        }
    }
    assert!(expected.len() > 40); // some bursts are under 30 minutes apart and form one session
    let sdir = dir.path().join("sessions");
    let table = sdir.join("user_sessions");
    let read = || {
        let mut m = keyed(
            &table,
            &["user_id", "session_start"],
            &["session_end", "duration", "events", "pages_visited", "landing_page", "exit_page"],
        );
        m.retain(|k, _| k[0] != "clock");
        m
    };
    run_until(shipped("user_sessions.toml", &sdir, Some(broker.bootstrap_servers())), "user sessions", || {
        read() == expected
    });
    assert_eq!(read(), expected);
}

#[test]
fn file_drop_pipeline_as_shipped() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("inbox")).unwrap();
    let events = clicks(2_000, 500);
    let lines: String = events.iter().map(|e| click_json(e).to_string() + "\n").collect();
    let cut = lines[..lines.len() / 2].rfind('\n').unwrap() + 1;
    std::fs::write(dir.path().join("inbox/clicks-1.jsonl"), &lines[..cut]).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &lines.as_bytes()[cut..]).unwrap();
    std::fs::write(dir.path().join("inbox/clicks-2.jsonl.gz"), gz.finish().unwrap()).unwrap();
    let watermark = (events.iter().map(|e| e.0).max().unwrap() - 10_000) * 1000;
    let mut g: BTreeMap<(i64, String), (i64, BTreeSet<String>)> = BTreeMap::new();
    for (t, user, page, action) in &events {
        let w = (t * 1000).div_euclid(300_000_000) * 300_000_000;
        if w + 300_000_000 <= watermark {
            let e = g.entry((w, page.clone())).or_default();
            e.0 += (*action == "view") as i64;
            e.1.insert(user.clone());
        }
    }
    let expected: BTreeMap<Vec<String>, Vec<String>> = g
        .into_iter()
        .map(|((w, p), (v, u))| (vec![ts(w), p], vec![v.to_string(), u.len().to_string()]))
        .collect();
    assert!(expected.len() > 10);
    let table = dir.path().join("page_views_5min");
    let read = || keyed(&table, &["window_start", "page_url"], &["views", "unique_users"]);
    run_until(shipped("file_drop.toml", dir.path(), None), "file-drop pipeline", || read() == expected);
    assert_eq!(read(), expected);
}

#[test]
fn click_purchase_attribution_as_shipped() {
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[("click-events".to_string(), 1), ("purchase-events".to_string(), 1)]).unwrap();
    let events = clicks(900, 2_000); // 30 minutes
                                     // Purchases by the same users, some minutes after their clicks, in disorder.
    let purchases: Vec<(i64, String, String, f64)> = (0..150i64)
        .map(|i| {
            let jitter = (i * 4_999) % 4_000;
            (
                T0 + i * 12_000 + 60_000 - jitter,
                format!("u{}", (i * 13) % 97),
                format!("p{}", i % 11),
                (i % 40) as f64 + 0.5,
            )
        })
        .collect();
    let mut all_clicks: Vec<serde_json::Value> = events.iter().map(click_json).collect();
    all_clicks.push(click_json(&(T0 + 3 * 3_600_000, "clock".into(), "/".into(), "view")));
    let purchase_json = |p: &(i64, String, String, f64)| serde_json::json!({ "order_id": format!("o{}", p.0), "user_id": p.1, "product_id": p.2, "price": p.3, "timestamp": common::rfc3339(p.0) });
    let mut all_purchases: Vec<serde_json::Value> = purchases.iter().map(purchase_json).collect();
    all_purchases.push(purchase_json(&(T0 + 3 * 3_600_000, "clock".into(), "p0".into(), 1.0)));
    produce(broker.bootstrap_servers(), "click-events", &all_clicks);
    produce(broker.bootstrap_servers(), "purchase-events", &all_purchases);

    // The oracle: clicks LEFT JOIN purchases ON user AND purchase time in [click, click + 30m].
    let mut expected: Vec<Vec<String>> = Vec::new();
    for c in events.iter().filter(|e| e.3 == "click") {
        let matches: Vec<_> = purchases.iter().filter(|p| p.1 == c.1 && c.0 <= p.0 && p.0 <= c.0 + 30 * 60_000).collect();
        for p in &matches {
            expected.push(vec![
                c.1.clone(),
                c.2.clone(),
                ts(c.0 * 1000),
                p.2.clone(),
                p.3.to_string(),
                ts(p.0 * 1000),
                ((p.0 - c.0) as f64 / 1000.0).to_string(),
            ]);
        }
        if matches.is_empty() {
            expected.push(vec![
                c.1.clone(),
                c.2.clone(),
                ts(c.0 * 1000),
                "NULL".into(),
                "NULL".into(),
                "NULL".into(),
                "NULL".into(),
            ]);
        }
    }
    expected.sort();
    assert!(expected.iter().any(|r| r[3] != "NULL") && expected.iter().any(|r| r[3] == "NULL"));
    let adir = dir.path().join("attribution");
    let table = adir.join("click_purchase_attribution");
    let columns = [
        "user_id",
        "clicked_page",
        "click_time",
        "product_id",
        "purchase_amount",
        "purchase_time",
        "time_to_purchase_seconds",
    ];
    run_until(
        shipped("click_purchase_attribution.toml", &adir, Some(broker.bootstrap_servers())),
        "attribution",
        || rows(&table).len() >= expected.len(),
    );
    assert_eq!(sorted_rows(&table, &columns), expected);
}

#[test]
fn anomaly_detection_as_shipped() {
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[("sensor-events".to_string(), 1), ("alerts".to_string(), 1)]).unwrap();
    // Three devices, a reading every 20 s for an hour, small noise and a few spikes.
    let mut readings: Vec<(i64, String, f64)> = Vec::new();
    for i in 0..180i64 {
        for d in 0..3i64 {
            let spike = if (i + d * 7) % 47 == 40 { 15.0 } else { 0.0 };
            readings.push((T0 + i * 20_000 + d * 1_000, format!("d-{d}"), 20.0 + ((i * 37 + d) % 11) as f64 / 10.0 + spike));
        }
    }
    let reading_json =
        |r: &(i64, String, f64)| serde_json::json!({ "device_id": r.1, "sensor_type": "temperature", "value": r.2, "timestamp": common::rfc3339(r.0) });
    let mut all: Vec<serde_json::Value> = readings.iter().map(reading_json).collect();
    all.push(reading_json(&(T0 + 3 * 3_600_000, "clock".into(), 0.0)));
    produce(broker.bootstrap_servers(), "sensor-events", &all);

    // The oracle: each reading against the latest 15-minute window (1-minute slide) that ended
    // at or before it, at least 10 readings, outside mean ± 3σ (sample σ).
    let (size, slide) = (15 * 60_000i64, 60_000i64);
    let mut expected: Vec<(String, i64, f64, f64)> = Vec::new();
    for r in &readings {
        let end = r.0.div_euclid(slide) * slide;
        let window: Vec<f64> = readings.iter().filter(|x| x.1 == r.1 && x.0 >= end - size && x.0 < end).map(|x| x.2).collect();
        if window.len() < 10 {
            continue;
        }
        let n = window.len() as f64;
        let mean = window.iter().sum::<f64>() / n;
        let sd = (window.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        if r.2 > mean + 3.0 * sd || r.2 < mean - 3.0 * sd {
            expected.push((r.1.clone(), r.0 * 1000, mean, sd));
        }
    }
    expected.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    assert!(expected.len() >= 5, "the spikes make anomalies: {expected:?}");
    let ddir = dir.path().join("anomaly");
    let table = ddir.join("sensor_anomalies");
    run_until(shipped("anomaly_detection.toml", &ddir, Some(broker.bootstrap_servers())), "anomalies", || {
        rows(&table).len() >= expected.len()
    });
    let mut got: Vec<(String, i64, f64, f64)> = rows(&table)
        .into_iter()
        .map(|r| {
            assert_eq!(r["sensor_type"], "temperature");
            (
                r["device_id"].clone(),
                r["timestamp"].parse().unwrap(),
                r["expected_value"].parse().unwrap(),
                r["expected_stddev"].parse().unwrap(),
            )
        })
        .collect();
    got.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    assert_eq!(got.len(), expected.len(), "{got:?}\nvs\n{expected:?}");
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!((&g.0, g.1), (&e.0, e.1));
        assert!((g.2 - e.2).abs() < 1e-9 && (g.3 - e.3).abs() < 1e-9, "{g:?} vs {e:?}");
    }
    // The same anomalies as JSON messages on the alerts topic, keyed by device.
    let messages = common::kafka::read_committed(broker.bootstrap_servers(), "alerts", Duration::from_secs(30), |m| m.len() >= expected.len());
    let mut alerts: Vec<(String, i64)> = messages
        .iter()
        .map(|(key, value)| {
            let v: serde_json::Value = serde_json::from_str(value.as_deref().unwrap()).unwrap();
            assert_eq!(key.as_deref(), v["device_id"].as_str());
            let t = chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str().unwrap()).unwrap();
            (v["device_id"].as_str().unwrap().to_string(), t.timestamp_micros())
        })
        .collect();
    alerts.sort();
    let expected_alerts: Vec<(String, i64)> = expected.iter().map(|e| (e.0.clone(), e.1)).collect();
    assert_eq!(alerts, expected_alerts);
}

#[test]
fn bronze_and_silver_as_shipped() {
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[("click-events".to_string(), 1)]).unwrap();
    let mut events: Vec<serde_json::Value> = clicks(300, 1_000)
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut j = click_json(e);
            if i % 5 == 0 {
                j["page_url"] = serde_json::json!(format!("  {} ", e.2.to_uppercase()));
            }
            if i % 9 == 0 {
                j["action"] = serde_json::json!("hover");
            }
            j
        })
        .collect();
    events.insert(10, serde_json::json!({ "user_id": "u1", "timestamp": "not a time" })); // a dead letter at offset 10
    produce(broker.bootstrap_servers(), "click-events", &events);
    let valid: Vec<(i64, &serde_json::Value)> = events.iter().enumerate().filter(|(i, _)| *i != 10).map(|(i, e)| (i as i64, e)).collect();
    let bdir = dir.path().join("bronze");
    let (bronze, silver) = (bdir.join("bronze_clicks"), bdir.join("silver_clicks"));
    let expected_silver: Vec<Vec<String>> = {
        let mut v: Vec<Vec<String>> = valid
            .iter()
            .filter(|(_, e)| ["view", "click", "scroll", "purchase"].contains(&e["action"].as_str().unwrap()))
            .map(|(_, e)| {
                vec![
                    e["page_url"].as_str().unwrap().trim().to_lowercase(),
                    e["user_id"].as_str().unwrap().to_string(),
                ]
            })
            .collect();
        v.sort();
        v
    };
    run_until(shipped("bronze.toml", &bdir, Some(broker.bootstrap_servers())), "bronze and silver", || {
        rows(&bronze).len() >= valid.len() && rows(&silver).len() >= expected_silver.len()
    });
    let mut got = sorted_rows(&bronze, &["kafka_offset", "kafka_topic", "kafka_partition", "page_url", "event_date"]);
    got.sort_by_key(|r| r[0].parse::<i64>().unwrap());
    assert_eq!(got.len(), valid.len());
    for (row, (offset, e)) in got.iter().zip(&valid) {
        assert_eq!(row[0], offset.to_string());
        assert_eq!(row[1], "click-events");
        assert_eq!(row[2], "0");
        assert_eq!(row[3], e["page_url"].as_str().unwrap());
        assert_eq!(row[4], "2026-11-23");
    }
    assert_eq!(sorted_rows(&silver, &["page_url", "user_id"]), expected_silver);
}

#[test]
fn cdc_orders_as_shipped() {
    let dir = tempfile::tempdir().unwrap();
    let topic = "shop.public.orders";
    let broker = EmbeddedBroker::start(&[(topic.to_string(), 1)]).unwrap();
    let order = |id: i64, status: &str, amount: f64, at_s: i64| serde_json::json!({ "order_id": id, "customer_id": format!("c{}", id % 3), "status": status, "amount": amount, "updated_at": common::rfc3339(T0 + at_s * 1000) });
    let change = |op: &str, before: serde_json::Value, after: serde_json::Value, lsn: i64| {
        serde_json::json!({
            "before": before, "after": after, "op": op, "ts_ms": T0 + lsn + 5,
            "source": { "connector": "postgresql", "name": "shop", "ts_ms": T0 + lsn, "schema": "public", "table": "orders", "lsn": lsn },
        })
        .to_string()
    };
    let null = serde_json::Value::Null;
    let wrapped = |event: String| format!(r#"{{"schema":{{"type":"struct","optional":false}},"payload":{event}}}"#);
    let messages: Vec<String> = vec![
        // The connector's snapshot, then the stream.
        change("r", null.clone(), order(1, "pending", 10.0, 0), 100),
        change("r", null.clone(), order(2, "paid", 20.0, 0), 100),
        change("r", null.clone(), order(3, "pending", 30.0, 0), 100),
        change("c", null.clone(), order(4, "pending", 40.0, 1), 110),
        wrapped(change("u", order(1, "pending", 10.0, 0), order(1, "paid", 10.0, 2), 120)),
        change("u", order(2, "paid", 20.0, 0), order(2, "shipped", 20.0, 3), 130),
        change("d", order(3, "pending", 30.0, 0), null.clone(), 140),
        String::new(), // the tombstone after the delete
        // A duplicate, and a replay of an update older than order 1's current state.
        change("u", order(2, "paid", 20.0, 0), order(2, "shipped", 20.0, 3), 130),
        change("u", order(1, "pending", 10.0, 0), order(1, "cancelled", 10.0, 1), 115),
        // An update of order 3 from before its delete, replayed: it stays deleted.
        change("u", order(3, "pending", 30.0, 0), order(3, "paid", 30.0, 1), 135),
        change("u", order(4, "pending", 40.0, 1), order(4, "pending", 44.5, 4), 150),
        // Bad input: a wrong type, an unknown op, a missing position.
        change(
            "u",
            order(4, "pending", 44.5, 4),
            serde_json::json!({ "order_id": 4, "customer_id": "c1", "status": "x", "amount": "lots", "updated_at": common::rfc3339(T0) }),
            160,
        ),
        change("t", null.clone(), null.clone(), 170),
        change("c", null.clone(), order(5, "pending", 50.0, 5), 180).replace(r#","lsn":180"#, ""),
        wrapped(change("c", null.clone(), order(6, "pending", 60.0, 6), 190)),
    ];
    let p = EventProducer::connect(broker.bootstrap_servers()).unwrap();
    for m in &messages {
        p.send(topic, Some(0), b"k", m.as_bytes()).unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();

    let expected: BTreeMap<Vec<String>, Vec<String>> = [
        (1, "c1", "paid", "10", 2),
        (2, "c2", "shipped", "20", 3),
        (4, "c1", "pending", "44.5", 4),
        (6, "c0", "pending", "60", 6),
    ]
    .into_iter()
    .map(|(id, customer, status, amount, at_s)| {
        (
            vec![id.to_string()],
            vec![customer.to_string(), status.to_string(), amount.to_string(), ts((T0 + at_s * 1000) * 1000)],
        )
    })
    .collect();
    let cdir = dir.path().join("cdc");
    let (table, dead_letters) = (cdir.join("orders"), cdir.join("dead_letters"));
    let columns = ["customer_id", "status", "amount", "updated_at"];
    run_until(shipped("cdc_orders.toml", &cdir, Some(broker.bootstrap_servers())), "the orders table", || {
        rows(&dead_letters).len() >= 4 && keyed(&table, &["order_id"], &columns) == expected
    });
    assert_eq!(keyed(&table, &["order_id"], &columns), expected);
    let mut reasons: Vec<(String, String)> = rows(&dead_letters).into_iter().map(|r| (r["reason"].clone(), r["offset"].clone())).collect();
    reasons.sort_by_key(|(_, offset)| offset.parse::<i64>().unwrap());
    let want: Vec<(String, String)> = [("tombstone", 7), ("schema", 12), ("schema", 13), ("schema", 14)]
        .iter()
        .map(|(r, o)| (r.to_string(), o.to_string()))
        .collect();
    assert_eq!(reasons, want);
}
