//! Micro-benchmarks of the per-event hot paths, each beside a baseline that does the minimum
//! equivalent work, measured in the same run (STYLE.md habit 9). Read the ratio, not the
//! absolute numbers: these machines are shared and noisy.
//!
//! - `decode`: [`SourceDecoder::decode`] of click events vs `serde_json` into a `Value` and
//!   into a borrowing derive struct.
//! - `window_update`: [`WindowOperator::update`] (tumbling count at 1k and 100k keys; sliding
//!   10m/5m; session 30m) vs a plain `HashMap<Box<[u8]>, u64>` increment.
//! - `sketches`: HyperLogLog and percentile-sketch inserts and merges vs exact `HashSet<u64>`
//!   and `Vec<f64>`.
//! - `exchange`: [`ExchangeBatch`] push + flume bounded channel to another thread vs a
//!   `Vec` of plain records over `std::sync::mpsc::sync_channel`.
//!
//! `cargo bench --bench micro` measures (about a minute and a half); under `cargo test
//! --all-targets` criterion runs every bench once as a smoke test.

use std::collections::{HashMap, HashSet};
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BatchSize, BenchmarkGroup, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tidemark::agg::{AggFunc, AggSpec, In};
use tidemark::config::{parse_config, Config, FieldType};
use tidemark::decode::SourceDecoder;
use tidemark::shard::{ExchangeBatch, ShardMsg};
use tidemark::source::generator::{ClickGenerator, ClickGeneratorSettings};
use tidemark::types::{encode_key_str, EventTime};
use tidemark::window::{InSlot, WindowOperator};

/// Elements processed per measured iteration in every group (one exchange batch, too).
const CHUNK: usize = 1024;
/// 2026-11-23T00:00:00Z in µs: the start of a 5-minute window, a 10m/5m pane and a day.
const BASE_US: EventTime = 1_795_392_000_000_000;

fn config() -> Config {
    parse_config(
        r#"
[pipeline]
name = "micro"
[[sources]]
name = "clicks"
topic = "clicks"
event_time = { field = "timestamp" }
schema = { user_id = "string", page_url = "string", action = "string", timestamp = "timestamp" }
[[queries]]
name = "tumbling"
from = "clicks"
window = { tumbling = "5m" }
group_by = ["page_url"]
aggregates = [ { name = "n", fn = "count" } ]
sink = "out_tumbling"
[[queries]]
name = "sliding"
from = "clicks"
window = { sliding = "10m", slide = "5m" }
group_by = ["page_url"]
aggregates = [ { name = "n", fn = "count" } ]
sink = "out_sliding"
[[queries]]
name = "session"
from = "clicks"
window = { session = "30m" }
group_by = ["page_url"]
aggregates = [ { name = "n", fn = "count" } ]
sink = "out_session"
# Never opened: the benches build operators from the compiled queries only.
[[sinks]]
name = "out_tumbling"
kind = "delta"
path = "/tmp/tidemark-micro/tumbling"
[[sinks]]
name = "out_sliding"
kind = "delta"
path = "/tmp/tidemark-micro/sliding"
[[sinks]]
name = "out_session"
kind = "delta"
path = "/tmp/tidemark-micro/session"
"#,
    )
    .expect("bench config is valid")
}

/// Short measurements so the whole file runs in well under two minutes.
fn configure<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    g
}

// ---------------------------------------------------------------------------------------------
// decode
// ---------------------------------------------------------------------------------------------

/// The fields a click query reads, borrowed from the payload: the least a typed decode can do.
#[derive(serde::Deserialize)]
#[allow(dead_code)] // read only by the deserializer
struct ClickRef<'a> {
    user_id: &'a str,
    page_url: &'a str,
    action: &'a str,
    timestamp: &'a str,
}

fn click_events(n: usize) -> Vec<Vec<u8>> {
    let mut g = ClickGenerator::new(ClickGeneratorSettings {
        seed: 7,
        users: 100_000,
        pages: 1_000,
        disorder_ms: 2_000,
        late_share: 0.0,
        late_by_ms: 0,
        malformed_share: 0.0,
    });
    (0..n).map(|i| g.next_event(BASE_US / 1000 + i as i64).payload).collect()
}

fn decode(c: &mut Criterion) {
    let cfg = config();
    let events = click_events(CHUNK);
    let mean_len = events.iter().map(Vec::len).sum::<usize>() / events.len();
    let mut g = configure(c, "decode");
    g.throughput(Throughput::Elements(CHUNK as u64));
    let mut decoder = SourceDecoder::new(&cfg.sources[0]);
    g.bench_function(format!("tidemark_SourceDecoder_{mean_len}B"), |b| {
        b.iter(|| {
            for e in &events {
                black_box(decoder.decode(black_box(e)).expect("valid click"));
            }
        })
    });
    g.bench_function("baseline_serde_json_Value", |b| {
        b.iter(|| {
            for e in &events {
                black_box(serde_json::from_slice::<serde_json::Value>(black_box(e)).expect("valid JSON"));
            }
        })
    });
    g.bench_function("baseline_serde_derive_borrowed", |b| {
        b.iter(|| {
            for e in &events {
                black_box(serde_json::from_slice::<ClickRef<'_>>(black_box(e)).expect("valid click"));
            }
        })
    });
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// window_update
// ---------------------------------------------------------------------------------------------

/// `n` distinct pre-encoded group keys, and a shuffled stream of indexes into them that touches
/// every key (so the whole key space is resident from the first chunk on).
fn keys_and_stream(n: usize, len: usize) -> (Vec<Vec<u8>>, Vec<u32>) {
    let keys: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let mut k = Vec::new();
            encode_key_str(&mut k, format!("/products/{i}").as_bytes());
            k
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(11);
    let mut stream: Vec<u32> = (0..len.max(n)).map(|i| (i % n) as u32).collect();
    stream.shuffle(&mut rng);
    (keys, stream)
}

/// One chunk of updates per iteration, walking the key stream; event times stay inside one
/// window (one pane, one session per key) so the state size is steady.
fn bench_operator(g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>, name: &str, op: &mut WindowOperator, keys: &[Vec<u8>], stream: &[u32]) {
    let mut pos = 0usize;
    let mut tick: EventTime = 0;
    g.bench_function(name, |b| {
        b.iter(|| {
            for _ in 0..CHUNK {
                let key = &keys[stream[pos] as usize];
                pos = if pos + 1 == stream.len() { 0 } else { pos + 1 };
                tick = (tick + 1) % 60_000_000;
                op.update(BASE_US + tick, key, &[InSlot::Null], &[]);
            }
        })
    });
}

fn bench_hashmap(g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>, name: &str, keys: &[Vec<u8>], stream: &[u32]) {
    let mut counts: HashMap<Box<[u8]>, u64> = HashMap::new();
    let mut pos = 0usize;
    g.bench_function(name, |b| {
        b.iter(|| {
            for _ in 0..CHUNK {
                let key = keys[stream[pos] as usize].as_slice();
                pos = if pos + 1 == stream.len() { 0 } else { pos + 1 };
                match counts.get_mut(key) {
                    Some(n) => *n += 1,
                    None => {
                        counts.insert(key.into(), 1);
                    }
                }
            }
        })
    });
    black_box(counts.len());
}

fn window_update(c: &mut Criterion) {
    let cfg = config();
    let source = &cfg.sources[0];
    let mut g = configure(c, "window_update");
    g.throughput(Throughput::Elements(CHUNK as u64));
    for keys_n in [1_000usize, 100_000] {
        let (keys, stream) = keys_and_stream(keys_n, 1 << 20);
        let label = if keys_n == 1_000 { "1k" } else { "100k" };
        let mut tumbling = WindowOperator::new(&cfg.queries[0], source);
        bench_operator(&mut g, &format!("tidemark_tumbling_count_{label}_keys"), &mut tumbling, &keys, &stream);
        bench_hashmap(&mut g, &format!("baseline_hashmap_{label}_keys"), &keys, &stream);
        if keys_n == 1_000 {
            let mut sliding = WindowOperator::new(&cfg.queries[1], source);
            bench_operator(&mut g, "tidemark_sliding_10m_5m_count_1k_keys", &mut sliding, &keys, &stream);
            let mut session = WindowOperator::new(&cfg.queries[2], source);
            bench_operator(&mut g, "tidemark_session_30m_count_1k_keys", &mut session, &keys, &stream);
        }
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// sketches
// ---------------------------------------------------------------------------------------------

const DISTINCT_USERS: usize = 100_000;

fn sketches(c: &mut Criterion) {
    let hll = AggSpec {
        func: AggFunc::ApproxCountDistinct,
        input: Some(FieldType::String),
    };
    let pct = AggSpec {
        func: AggFunc::ApproxPercentile { p: 0.95 },
        input: Some(FieldType::Float),
    };
    let mut rng = StdRng::seed_from_u64(13);
    // Key-encoded user ids (what the shard hands approx_count_distinct) and the same ids as u64.
    let user_ids: Vec<u64> = (0..1 << 16).map(|_| rng.random_range(0..DISTINCT_USERS as u64)).collect();
    let user_keys: Vec<Vec<u8>> = user_ids
        .iter()
        .map(|u| {
            let mut k = Vec::new();
            encode_key_str(&mut k, format!("u{u}").as_bytes());
            k
        })
        .collect();
    // Latency-like values: log-uniform between 0.1 ms and 10 s.
    let latencies: Vec<f64> = (0..1 << 16).map(|_| 10f64.powf(rng.random_range(-1.0..4.0))).collect();

    let mut g = configure(c, "sketches");
    g.throughput(Throughput::Elements(CHUNK as u64));
    let mut acc = hll.new_acc();
    let mut pos = 0usize;
    g.bench_function("tidemark_hll_insert", |b| {
        b.iter(|| {
            for _ in 0..CHUNK {
                acc.update(&hll, In::Bytes(&user_keys[pos]), 0);
                pos = (pos + 1) % user_keys.len();
            }
        })
    });
    let mut set: HashSet<u64> = HashSet::new();
    g.bench_function("baseline_hashset_u64_insert", |b| {
        b.iter(|| {
            for _ in 0..CHUNK {
                set.insert(user_ids[pos]);
                pos = (pos + 1) % user_ids.len();
            }
        })
    });
    let mut q = pct.new_acc();
    g.bench_function("tidemark_percentile_insert", |b| {
        b.iter(|| {
            for _ in 0..CHUNK {
                q.update(&pct, In::Float(latencies[pos]), 0);
                pos = (pos + 1) % latencies.len();
            }
        })
    });
    // Capacity is kept across clears, so this is a push into a preallocated buffer.
    let mut values: Vec<f64> = Vec::new();
    g.bench_function("baseline_vec_f64_push", |b| {
        b.iter(|| {
            if values.len() >= 1 << 20 {
                values.clear();
            }
            for _ in 0..CHUNK {
                values.push(latencies[pos]);
                pos = (pos + 1) % latencies.len();
            }
        })
    });

    // Merges: two sketches of 32k inputs each (HLL dense, ~28k distinct users); one merge per
    // element. The baselines merge the exact structures built from the same inputs.
    g.throughput(Throughput::Elements(1));
    let half = user_keys.len() / 2;
    let build_hll = |range: std::ops::Range<usize>| {
        let mut a = hll.new_acc();
        range.for_each(|i| a.update(&hll, In::Bytes(&user_keys[i]), 0));
        a
    };
    let (hll_a, hll_b) = (build_hll(0..half), build_hll(half..user_keys.len()));
    g.bench_function("tidemark_hll_merge", |b| {
        b.iter_batched_ref(|| hll_a.clone(), |a| a.merge(&hll, &hll_b), BatchSize::SmallInput)
    });
    let set_a: HashSet<u64> = user_ids[..half].iter().copied().collect();
    let set_b: HashSet<u64> = user_ids[half..].iter().copied().collect();
    g.bench_function("baseline_hashset_union", |b| {
        b.iter_batched_ref(|| set_a.clone(), |a| a.extend(set_b.iter().copied()), BatchSize::SmallInput)
    });
    let build_q = |range: std::ops::Range<usize>| {
        let mut a = pct.new_acc();
        range.for_each(|i| a.update(&pct, In::Float(latencies[i]), 0));
        a
    };
    let (q_a, q_b) = (build_q(0..half), build_q(half..latencies.len()));
    g.bench_function("tidemark_percentile_merge", |b| {
        b.iter_batched_ref(|| q_a.clone(), |a| a.merge(&pct, &q_b), BatchSize::SmallInput)
    });
    let (v_a, v_b) = (latencies[..half].to_vec(), latencies[half..].to_vec());
    g.bench_function("baseline_vec_f64_concat", |b| {
        b.iter_batched_ref(|| v_a.clone(), |a| a.extend_from_slice(&v_b), BatchSize::SmallInput)
    });
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// exchange
// ---------------------------------------------------------------------------------------------

/// The default `pipeline.exchange_capacity`: batches in flight per shard pair.
const CAPACITY: usize = 16;

/// A baseline record: the same bytes as an exchanged count record, inline and fixed-size.
#[derive(Clone, Copy)]
#[allow(dead_code)] // carried, never read
struct PlainRec {
    query: u16,
    key_len: u8,
    key: [u8; 24],
    event_time: EventTime,
    input: i64,
}

/// Sends `batches` batches of CHUNK records from this thread to a consumer thread, which drops
/// them (freeing on the receiving side, as the shard does after applying). Returns the time from
/// the first push until the consumer has received the last batch.
fn run_flume(batches: u64, keys: &[Vec<u8>]) -> Duration {
    let (tx, rx) = flume::bounded::<ShardMsg>(CAPACITY);
    let consumer = std::thread::spawn(move || {
        let mut n = 0u64;
        while let Ok(msg) = rx.recv() {
            n += matches!(black_box(msg), ShardMsg::Rows(_)) as u64;
        }
        n
    });
    let started = Instant::now();
    for i in 0..batches {
        let mut batch = ExchangeBatch::default();
        for r in 0..CHUNK {
            batch.push(0, 0, &keys[r % keys.len()], BASE_US + i as i64, &[InSlot::Null], &[]);
        }
        tx.send(ShardMsg::Rows(batch)).expect("consumer alive");
    }
    drop(tx);
    assert_eq!(consumer.join().expect("consumer"), batches);
    started.elapsed()
}

fn run_std(batches: u64, keys: &[Vec<u8>]) -> Duration {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<PlainRec>>(CAPACITY);
    let consumer = std::thread::spawn(move || {
        let mut n = 0u64;
        while let Ok(batch) = rx.recv() {
            n += !black_box(batch).is_empty() as u64;
        }
        n
    });
    let started = Instant::now();
    for i in 0..batches {
        let mut batch = Vec::new();
        for r in 0..CHUNK {
            let k = &keys[r % keys.len()];
            let mut key = [0u8; 24];
            key[..k.len()].copy_from_slice(k);
            batch.push(PlainRec {
                query: 0,
                key_len: k.len() as u8,
                key,
                event_time: BASE_US + i as i64,
                input: 0,
            });
        }
        tx.send(batch).expect("consumer alive");
    }
    drop(tx);
    assert_eq!(consumer.join().expect("consumer"), batches);
    started.elapsed()
}

fn exchange(c: &mut Criterion) {
    let (keys, _) = keys_and_stream(1_000, 0);
    assert!(keys.iter().all(|k| k.len() <= 24));
    let mut g = configure(c, "exchange");
    g.throughput(Throughput::Elements(CHUNK as u64));
    g.bench_function("tidemark_ExchangeBatch_flume", |b| b.iter_custom(|n| run_flume(n, &keys)));
    g.bench_function("baseline_vec_std_sync_channel", |b| b.iter_custom(|n| run_std(n, &keys)));
    g.finish();
}

criterion_group!(benches, decode, window_update, sketches, exchange);

/// `criterion_main!`, except that libtest's `--test-threads` (which `cargo test --all-targets --
/// --test-threads=2` hands every test binary, and criterion's argument parser rejects) is
/// dropped by running this binary again without it.
fn main() {
    let mut kept = Vec::new();
    let mut dropped = false;
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--test-threads") => {
                args.next();
                dropped = true;
            }
            Some(a) if a.starts_with("--test-threads=") => dropped = true,
            _ => kept.push(arg),
        }
    }
    if dropped {
        let exe = std::env::current_exe().expect("path of this bench binary");
        let status = std::process::Command::new(exe).args(kept).status().expect("re-run this bench binary");
        std::process::exit(status.code().unwrap_or(1));
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
