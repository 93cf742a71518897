//! Every aggregate and column type end to end: a sensor topic with epoch-millis event times,
//! a (string, bool) group key, count / sum / min / max / avg over int, float and timestamp
//! fields, read back from Delta and compared with an oracle computed here.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use deltalake::arrow::array::{Array, AsArray};
use deltalake::arrow::datatypes::{Float64Type, Int64Type, TimestampMicrosecondType};
use rand::{Rng, SeedableRng};
use tidemark::broker::EmbeddedBroker;
use tidemark::config::parse_config;
use tidemark::source::producer::EventProducer;

const T0_MS: i64 = 1_795_392_000_000;

#[derive(Debug, Default, Clone, PartialEq)]
struct Agg {
    count: i64,
    total: i64,
    min_v: f64,
    max_v: f64,
    avg_v: f64,
    max_n: i64,
}

#[test]
fn every_aggregate_and_column_type_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(&[("sensors".to_string(), 3)]).unwrap();
    let toml = format!(
        r#"
[pipeline]
name = "sensors"
state_dir = "{state}"
commit_interval = "100ms"
shards = 2
[kafka]
bootstrap_servers = "{bootstrap}"
[[sources]]
name = "readings"
topic = "sensors"
event_time = {{ field = "ts", format = "epoch_millis" }}
watermark = {{ delay = "2s", idle_timeout = "1h" }}
schema = {{ sensor = "string", indoor = "bool", value = "float", n = "int", ts = "int" }}
[[queries]]
name = "stats"
from = "readings"
window = {{ tumbling = "10s", offset = "3s" }}
group_by = ["sensor", "indoor"]
aggregates = [
  {{ name = "count", fn = "count" }},
  {{ name = "total", fn = "sum", field = "n" }},
  {{ name = "min_v", fn = "min", field = "value" }},
  {{ name = "max_v", fn = "max", field = "value" }},
  {{ name = "avg_v", fn = "avg", field = "value" }},
  {{ name = "max_n", fn = "max", field = "n" }},
]
sink = "stats"
[[sinks]]
name = "stats"
kind = "delta"
path = "{out}"
[metrics]
listen = "127.0.0.1:0"
"#,
        state = dir.path().join("state").display(),
        bootstrap = broker.bootstrap_servers(),
        out = dir.path().join("out").display()
    );
    let cfg = parse_config(&toml).expect("valid");

    // Events: 3 partitions, event time increasing by 7 ms with up to 1 s of disorder.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let p = EventProducer::connect(broker.bootstrap_servers()).unwrap();
    let mut sent = Vec::new();
    for i in 0..6000i64 {
        let ts = T0_MS + i * 7 - rng.random_range(0..1000);
        let sensor = format!("s{}", rng.random_range(0..5));
        let indoor = rng.random_bool(0.5);
        let value: f64 = (rng.random_range(-5000..5000) as f64) / 8.0; // exact in binary
        let n: i64 = rng.random_range(-1000..1000);
        let payload = serde_json::json!({ "sensor": sensor, "indoor": indoor, "value": value, "n": n, "ts": ts }).to_string();
        p.send("sensors", Some((i % 3) as i32), sensor.as_bytes(), payload.as_bytes()).unwrap();
        sent.push((i % 3, ts, sensor, indoor, value, n));
    }
    p.flush(Duration::from_secs(30)).unwrap();

    // Oracle: windows [k*10s + 3s, …) closed by min over partitions of max ts − 2 s.
    let mut max_per_partition = BTreeMap::new();
    for (part, ts, ..) in &sent {
        let m = max_per_partition.entry(*part).or_insert(i64::MIN);
        *m = (*m).max(*ts);
    }
    let watermark_ms = max_per_partition.values().min().unwrap() - 2_000;
    let mut groups: BTreeMap<(i64, String, bool), Vec<(f64, i64)>> = BTreeMap::new();
    for (_, ts, sensor, indoor, value, n) in &sent {
        let start = (ts - 3_000).div_euclid(10_000) * 10_000 + 3_000;
        if start + 10_000 <= watermark_ms {
            groups.entry((start * 1000, sensor.clone(), *indoor)).or_default().push((*value, *n));
        }
    }
    let expected: BTreeMap<(i64, String, bool), Agg> = groups
        .into_iter()
        .map(|(k, xs)| {
            let count = xs.len() as i64;
            let agg = Agg {
                count,
                total: xs.iter().map(|x| x.1).sum(),
                min_v: xs.iter().map(|x| x.0).fold(f64::INFINITY, f64::min),
                max_v: xs.iter().map(|x| x.0).fold(f64::NEG_INFINITY, f64::max),
                avg_v: xs.iter().map(|x| x.0).sum::<f64>() / count as f64,
                max_n: xs.iter().map(|x| x.1).max().unwrap(),
            };
            (k, agg)
        })
        .collect();
    assert!(expected.len() > 20);

    let running = tidemark::daemon::start(cfg, Arc::new(AtomicBool::new(false))).unwrap();
    let read = || -> BTreeMap<(i64, String, bool), Agg> {
        let path = dir.path().join("out");
        if !path.join("_delta_log").exists() {
            return BTreeMap::new();
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut out = BTreeMap::new();
        for b in rt.block_on(tidemark::sink::delta::read_table(&path, None)).unwrap() {
            let start = b.column_by_name("window_start").unwrap().as_primitive::<TimestampMicrosecondType>();
            let sensor = b.column_by_name("sensor").unwrap().as_string::<i32>();
            let indoor = b.column_by_name("indoor").unwrap().as_boolean();
            let int = |c: &str| b.column_by_name(c).unwrap().as_primitive::<Int64Type>().clone();
            let float = |c: &str| b.column_by_name(c).unwrap().as_primitive::<Float64Type>().clone();
            let (count, total, max_n) = (int("count"), int("total"), int("max_n"));
            let (min_v, max_v, avg_v) = (float("min_v"), float("max_v"), float("avg_v"));
            for i in 0..b.num_rows() {
                assert!(!avg_v.is_null(i));
                let key = (start.value(i), sensor.value(i).to_string(), indoor.value(i));
                let agg = Agg {
                    count: count.value(i),
                    total: total.value(i),
                    min_v: min_v.value(i),
                    max_v: max_v.value(i),
                    avg_v: avg_v.value(i),
                    max_n: max_n.value(i),
                };
                assert!(out.insert(key, agg).is_none(), "duplicate row");
            }
        }
        out
    };
    common::wait_for("the sensor table to match the oracle", Duration::from_secs(60), || {
        read().len() == expected.len()
    });
    running.stop().unwrap();
    let got = read();
    assert_eq!(got.len(), expected.len());
    for (k, e) in &expected {
        let g = &got[k];
        assert_eq!(
            (g.count, g.total, g.min_v, g.max_v, g.max_n),
            (e.count, e.total, e.min_v, e.max_v, e.max_n),
            "{k:?}"
        );
        assert!(
            (g.avg_v - e.avg_v).abs() < 1e-9 * e.avg_v.abs().max(1.0),
            "{k:?}: avg {} vs {}",
            g.avg_v,
            e.avg_v
        );
    }
}
