//! Delta commit time as the log grows: 10,000 epochs of 10 rows appended to one table with a
//! checkpoint every 10 versions and small files compacted every 10 epochs (the sinks'
//! defaults, so the active files stay few and only the log grows), once keeping every log file and once deleting the expired
//! ones at each checkpoint (retention 0 here, so every checkpoint cleans up), in the same run.
//! Prints the median and p99 commit time per block of 1,000 versions, the log files left and
//! the time to reopen the table (what a restart pays).
//!
//! `cargo bench -p tidemark-tools --bench delta_log` runs the full size (TIDEMARK_BENCH_VERSIONS,
//! default 10,000; TIDEMARK_BENCH_KEPT_VERSIONS for the variant keeping every file, default the
//! same); under `cargo test` a smoke size checks that it works.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deltalake::arrow::array::{Int64Array, RecordBatch, StringArray};
use deltalake::arrow::datatypes::{DataType, Field, Schema};
use tidemark::sink::delta::{DeltaTableSink, TableOptions};

const BLOCK: usize = 1_000;

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

async fn run(versions: u64, log_retention: Option<Duration>, label: &str) {
    let dir = tempfile::tempdir().unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, true),
        Field::new("n", DataType::Int64, true),
    ]));
    let options = TableOptions {
        checkpoint_interval: 10,
        log_retention,
        ..TableOptions::default()
    };
    let mut sink = DeltaTableSink::open_or_create(dir.path(), schema.clone(), &options).await.unwrap();
    let mut times = Vec::with_capacity(versions as usize);
    for epoch in 1..=versions {
        let keys: Vec<String> = (0..10).map(|i| format!("k{epoch}-{i}")).collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(StringArray::from(keys)), Arc::new(Int64Array::from_iter_values(0..10))],
        )
        .unwrap();
        let started = Instant::now();
        sink.append_epoch("bench/log", epoch, vec![batch]).await.unwrap();
        times.push(started.elapsed());
        // As the pipeline's sinks do by default: the active files stay few, only the log grows.
        if epoch % 10 == 0 {
            sink.compact(4).await.unwrap();
        }
    }
    let block = BLOCK.min(times.len());
    println!("{label}:");
    for (i, chunk) in times.chunks(block).enumerate() {
        let mut sorted = chunk.to_vec();
        sorted.sort();
        println!(
            "  versions {:>6}..{:<6} commit p50 {:>6.2} ms  p99 {:>6.2} ms",
            i * block + 1,
            i * block + chunk.len(),
            quantile(&sorted, 0.5).as_secs_f64() * 1e3,
            quantile(&sorted, 0.99).as_secs_f64() * 1e3
        );
    }
    let logs = std::fs::read_dir(dir.path().join("_delta_log")).unwrap().count();
    drop(sink);
    let started = Instant::now();
    let mut reopened = DeltaTableSink::open_or_create(dir.path(), schema, &options).await.unwrap();
    let reopen = started.elapsed();
    assert_eq!(reopened.committed_epoch("bench/log").await.unwrap(), Some(versions));
    println!("  files in _delta_log: {logs}; reopening the table: {:.1} ms", reopen.as_secs_f64() * 1e3);
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let versions: u64 = if full {
        std::env::var("TIDEMARK_BENCH_VERSIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
    } else {
        60
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // Keeping every file makes each commit slower as the log grows: TIDEMARK_BENCH_KEPT_VERSIONS
    // (default: the same count) bounds that variant's run time.
    let kept: u64 = std::env::var("TIDEMARK_BENCH_KEPT_VERSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(versions);
    rt.block_on(async {
        run(kept, None, "every log file kept").await;
        run(versions, Some(Duration::ZERO), "expired log files deleted at each checkpoint").await;
    });
}
