//! The HTTP endpoint for monitoring: `GET /metrics` (Prometheus text exposition 0.0.4),
//! `GET /healthz` and `GET /readyz`.
//!
//! The server runs on its own std thread and answers one connection at a time with a short
//! timeout: a slow scraper delays the next scrape, never a shard. Every value is computed at
//! scrape time from the per-shard counters of [`PipelineStats`] (summed here, so recording
//! stays a relaxed store per poll round), the committer's histogram (locked briefly) and
//! the state store's size (asked here, not per event).

use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::config::Config;
use crate::state::StateStore;
use crate::telemetry::{PartitionStats, PipelineStats, ProcStats, ShardStats, SinkStats};
use crate::types::DeadLetterReason;
use crate::watermark::UNKNOWN;

/// How long a connection may take to send its request or accept the answer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// Requests larger than this are cut off (only the request line matters).
const MAX_REQUEST_BYTES: usize = 8 << 10;
/// Upper bounds (seconds) of the epoch commit duration buckets.
pub const COMMIT_DURATION_BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
/// Upper bounds (seconds) of the latency buckets: fine around one to two commit intervals
/// (where ingest→commit lives), coarse beyond.
pub const LATENCY_BUCKETS: [f64; 37] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5,
    10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// What the endpoint serves: the metrics text, and whether the process is healthy and ready.
pub trait Observed: Send + Sync + 'static {
    fn metrics(&self) -> String;
    fn healthy(&self) -> bool;
    fn ready(&self) -> bool;
}

/// What the endpoint reads from: one running pipeline.
#[derive(Clone)]
pub struct MetricsSource {
    pub stats: Arc<PipelineStats>,
    pub store: Arc<StateStore>,
    pub labels: MetricLabels,
    /// Set when the pipeline failed.
    pub failed: Arc<AtomicBool>,
}

/// The running endpoint; dropping it stops the server thread.
pub struct MetricsServer {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `listen` and serves on a new thread. A failure to bind (typically the address
    /// being in use by another daemon) is logged and leaves metrics off: the pipeline runs
    /// without them rather than not at all.
    pub fn start(listen: SocketAddr, source: impl Observed) -> Option<MetricsServer> {
        let bound = TcpListener::bind(listen).and_then(|l| {
            l.set_nonblocking(true)?;
            Ok((l.local_addr()?, l))
        });
        let (address, listener) = match bound {
            Ok(b) => b,
            Err(e) => {
                let hint = if e.kind() == ErrorKind::AddrInUse {
                    "another process uses it; set [metrics] listen to another address, or \"off\""
                } else {
                    "check [metrics] listen"
                };
                tracing::warn!(address = %listen, error = %e, "metrics endpoint disabled: cannot listen ({hint})");
                return None;
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("metrics".into())
                .spawn(move || serve(listener, &source, &stop))
        };
        match thread {
            Ok(thread) => {
                tracing::info!(address = %address, "serving /metrics, /healthz and /readyz on http://{address}");
                Some(MetricsServer {
                    address,
                    stop,
                    thread: Some(thread),
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint disabled: cannot spawn its thread");
                None
            }
        }
    }

    /// The bound address (with the actual port when the config asked for port 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: TcpListener, source: &dyn Observed, stop: &AtomicBool) {
    while !stop.load(Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = answer(stream, source) {
                    tracing::debug!(error = %e, "metrics connection failed");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

/// Reads one request, writes one response, closes.
fn answer(mut stream: TcpStream, source: &dyn Observed) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CONNECTION_TIMEOUT))?;
    stream.set_write_timeout(Some(CONNECTION_TIMEOUT))?;
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && !request.windows(2).any(|w| w == b"\n\n") && request.len() < MAX_REQUEST_BYTES {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(request.split(|b| *b == b'\n').next().unwrap_or(&[])).into_owned();
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = if method != "GET" && method != "HEAD" {
        ("405 Method Not Allowed", "text/plain; charset=utf-8", "only GET is served\n".to_string())
    } else {
        route(path, source)
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

fn route(path: &str, source: &dyn Observed) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", source.metrics()),
        "/healthz" if !source.healthy() => ("503 Service Unavailable", TEXT, "failed\n".into()),
        "/healthz" => ("200 OK", TEXT, "ok\n".into()),
        "/readyz" if source.ready() => ("200 OK", TEXT, "ready\n".into()),
        "/readyz" => ("503 Service Unavailable", TEXT, "not ready\n".into()),
        _ => ("404 Not Found", TEXT, "not found; try /metrics, /healthz or /readyz\n".into()),
    }
}

impl MetricsSource {
    fn scrape(&self, process: Option<ProcStats>) -> Scrape {
        Scrape {
            failed: self.failed.load(Relaxed),
            state_size_bytes: Some(self.store.size_on_disk_bytes()),
            now_micros: crate::time::now_micros(),
            process,
        }
    }
}

impl Observed for MetricsSource {
    fn metrics(&self) -> String {
        render(&self.stats, &self.labels, &self.scrape(ProcStats::read(std::process::id())))
    }

    fn healthy(&self) -> bool {
        !self.failed.load(Relaxed)
    }

    fn ready(&self) -> bool {
        self.stats.ready.load(Relaxed) && !self.failed.load(Relaxed)
    }
}

/// The tasks a scaled-out process runs, by task number, each registered while it runs.
#[derive(Clone, Default)]
pub struct TaskMetrics {
    pub tasks: Arc<std::sync::Mutex<std::collections::BTreeMap<i32, MetricsSource>>>,
}

impl Observed for TaskMetrics {
    /// Every running task's metrics with a `task` label, and the process's own once.
    fn metrics(&self) -> String {
        let tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Exposition::default();
        out.family("tidemark_tasks_running", "gauge", "Tasks of the scaled-out pipeline this process runs.");
        out.sample("tidemark_tasks_running", &[], tasks.len() as f64);
        for (task, source) in tasks.iter() {
            out.task = Some(task.to_string());
            render_into(&mut out, &source.stats, &source.labels, &source.scrape(None));
        }
        out.task = None;
        process_metrics(&mut out, ProcStats::read(std::process::id()));
        out.finish()
    }

    /// The process runs; a failed task is started again while the process owns it.
    fn healthy(&self) -> bool {
        true
    }

    /// Every task it runs is ready (none while it waits for tasks).
    fn ready(&self) -> bool {
        let tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        !tasks.is_empty() && tasks.values().all(|t| t.ready())
    }
}

/// Values read at scrape time from outside [`PipelineStats`].
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// The pipeline has failed (it is stopping): not ready, whatever recovery said.
    pub failed: bool,
    pub state_size_bytes: Option<u64>,
    pub now_micros: i64,
    pub process: Option<ProcStats>,
}

/// The names behind the metrics' labels, from the pipeline's configuration.
#[derive(Debug, Clone, Default)]
pub struct MetricLabels {
    /// Source names, by index into `Config::sources`.
    pub sources: Vec<String>,
    /// (query name, allowed lateness in µs), by query index.
    pub queries: Vec<(String, i64)>,
    /// Sink names, by sink plan index (the order the committer counts them in).
    pub sinks: Vec<String>,
    /// Batches each exchange channel between two shards holds.
    pub exchange_capacity: usize,
}

impl MetricLabels {
    pub fn new(config: &Config, sink_names: Vec<String>) -> Self {
        MetricLabels {
            sources: config.sources.iter().map(|s| s.name.clone()).collect(),
            queries: config.queries.iter().map(|q| (q.name.clone(), q.allowed_lateness.as_micros() as i64)).collect(),
            sinks: sink_names,
            exchange_capacity: config.pipeline.exchange_capacity,
        }
    }
}

/// A counter family read from one field of `T`: (name, help, field).
type CounterFamily<T> = (&'static str, &'static str, fn(&T) -> &AtomicU64);

/// Renders every metric in the Prometheus text format 0.0.4.
pub fn render(stats: &PipelineStats, labels: &MetricLabels, scrape: &Scrape) -> String {
    let mut out = Exposition::default();
    render_into(&mut out, stats, labels, scrape);
    process_metrics(&mut out, scrape.process);
    out.finish()
}

fn process_metrics(out: &mut Exposition, process: Option<ProcStats>) {
    if let Some(p) = process {
        out.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
        out.sample("process_resident_memory_bytes", &[], p.rss_bytes as f64);
        out.family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.");
        out.sample("process_cpu_seconds_total", &[], p.cpu_seconds);
    }
}

/// The pipeline's metrics, into `out`.
fn render_into(out: &mut Exposition, stats: &PipelineStats, labels: &MetricLabels, scrape: &Scrape) {
    let shard_label: Vec<String> = (0..stats.shards.len()).map(|i| i.to_string()).collect();
    let counter = |c: &AtomicU64| c.load(Relaxed) as f64;
    let total = |f: &dyn Fn(&ShardStats) -> f64| stats.shards.iter().map(f).sum::<f64>();
    let unknown = String::from("?");
    let source_name = |i: usize| labels.sources.get(i).unwrap_or(&unknown);
    // Every partition of every shard, with its labels.
    let partitions: Vec<(Arc<PartitionStats>, &String, String)> = stats
        .shards
        .iter()
        .flat_map(|s| s.partitions())
        .map(|p| {
            let (source, partition) = (source_name(p.source), p.partition.to_string());
            (p, source, partition)
        })
        .collect();
    let seconds = |micros: i64| micros as f64 / 1e6;

    out.family("tidemark_up", "gauge", "1 while the process runs.");
    out.sample("tidemark_up", &[], 1.0);
    out.family("tidemark_ready", "gauge", "1 once recovery is done and the sources are consuming, else 0.");
    let ready = stats.ready.load(Relaxed) && !scrape.failed;
    out.sample("tidemark_ready", &[], if ready { 1.0 } else { 0.0 });

    // Per source partition (file sources are partition -1).
    let per_partition: [CounterFamily<PartitionStats>; 3] = [
        ("tidemark_events_received_total", "Records read from the sources.", |p| &p.received),
        (
            "tidemark_events_decoded_total",
            "Records decoded into events (before filters and lateness).",
            |p| &p.decoded,
        ),
        ("tidemark_bytes_received_total", "Payload bytes read from the sources.", |p| &p.bytes),
    ];
    for (name, help, field) in per_partition {
        out.family(name, "counter", help);
        for (p, source, partition) in &partitions {
            out.sample(name, &[("source", source), ("partition", partition)], counter(field(p)));
        }
    }
    out.family("tidemark_events_dead_lettered_total", "counter", "Records routed to dead letters, by reason.");
    for (p, source, partition) in &partitions {
        for (i, reason) in DeadLetterReason::ALL.iter().enumerate() {
            let labels = [("source", source.as_str()), ("partition", partition), ("reason", reason.as_str())];
            out.sample("tidemark_events_dead_lettered_total", &labels, counter(&p.dead_letters[i]));
        }
    }
    out.family(
        "tidemark_consumer_lag_messages",
        "gauge",
        "Messages in the Kafka partition beyond the position read (broker high watermark from the last fetch minus the next offset).",
    );
    for (p, source, partition) in &partitions {
        let lag = p.lag.load(Relaxed);
        if lag >= 0 {
            out.sample("tidemark_consumer_lag_messages", &[("source", source), ("partition", partition)], lag as f64);
        }
    }
    out.family(
        "tidemark_partition_watermark_seconds",
        "gauge",
        "The partition's own watermark (its latest event time minus the source's watermark delay), as a Unix time.",
    );
    for (p, source, partition) in &partitions {
        let wm = p.watermark.load(Relaxed);
        if wm != UNKNOWN {
            out.sample(
                "tidemark_partition_watermark_seconds",
                &[("source", source), ("partition", partition)],
                seconds(wm),
            );
        }
    }

    // Per file source (read by one shard).
    let files: Vec<_> = stats.shards.iter().flat_map(|s| s.files()).collect();
    let file_gauges: [CounterFamily<crate::telemetry::FileSourceStats>; 2] = [
        (
            "tidemark_file_source_files_done",
            "Files the file source has read to the end (as recorded in its stored position).",
            |f| &f.files_done,
        ),
        (
            "tidemark_file_source_files_queued",
            "Files listed in the file source's directory and waiting to be read (not counting the one being read).",
            |f| &f.files_queued,
        ),
    ];
    for (name, help, field) in file_gauges {
        out.family(name, "gauge", help);
        for f in &files {
            out.sample(name, &[("source", source_name(f.source))], counter(field(f)));
        }
    }
    out.family(
        "tidemark_file_source_current_offset_bytes",
        "gauge",
        "Byte offset of the next unread line of the file being read (decompressed for gzip); absent between files.",
    );
    for f in &files {
        if let Some((file, offset)) = f.current.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            out.sample(
                "tidemark_file_source_current_offset_bytes",
                &[("source", source_name(f.source)), ("file", file)],
                *offset as f64,
            );
        }
    }
    out.family(
        "tidemark_file_source_read_errors_total",
        "counter",
        "Failed reads of a file source's directory or files (retried with backoff; a file that keeps failing is dead-lettered).",
    );
    for f in &files {
        out.sample(
            "tidemark_file_source_read_errors_total",
            &[("source", source_name(f.source))],
            counter(&f.read_errors),
        );
    }

    out.family(
        "tidemark_dead_letters_dropped_total",
        "counter",
        "Dead letters dropped because their source has no on_error sink.",
    );
    out.sample("tidemark_dead_letters_dropped_total", &[], total(&|s| counter(&s.dead_letters_dropped)));
    out.family(
        "tidemark_gaps_skipped_total",
        "counter",
        "Offset gaps (data deleted by the broker) skipped with on_gap = \"skip\".",
    );
    out.sample("tidemark_gaps_skipped_total", &[], total(&|s| counter(&s.gaps_skipped)));
    out.family("tidemark_offsets_skipped_total", "counter", "Offsets lost in skipped gaps.");
    out.sample("tidemark_offsets_skipped_total", &[], total(&|s| counter(&s.offsets_skipped)));

    // Per shard.
    out.family(
        "tidemark_backpressure_pauses_total",
        "counter",
        "Times a shard stopped reading its sources because a peer's channel was full.",
    );
    for (shard, s) in stats.shards.iter().enumerate() {
        out.sample(
            "tidemark_backpressure_pauses_total",
            &[("shard", &shard_label[shard])],
            counter(&s.backpressure_pauses),
        );
    }
    out.family(
        "tidemark_shard_busy_seconds_total",
        "counter",
        "Time the shard spent working rather than waiting for input.",
    );
    for (shard, s) in stats.shards.iter().enumerate() {
        out.sample(
            "tidemark_shard_busy_seconds_total",
            &[("shard", &shard_label[shard])],
            counter(&s.busy_micros) / 1e6,
        );
    }
    out.family(
        "tidemark_shard_busy_ratio",
        "gauge",
        "Share of the last second the shard spent working (1 = saturated).",
    );
    for (shard, s) in stats.shards.iter().enumerate() {
        out.sample("tidemark_shard_busy_ratio", &[("shard", &shard_label[shard])], counter(&s.busy_ratio_ppm) / 1e6);
    }
    out.family(
        "tidemark_exchange_queue_batches",
        "gauge",
        "Row batches queued from one shard to another (in the channel and held back by the sender).",
    );
    for (from, s) in stats.shards.iter().enumerate() {
        for (to, queued) in s.exchange_queued.iter().enumerate() {
            if to != from {
                out.sample(
                    "tidemark_exchange_queue_batches",
                    &[("from", &shard_label[from]), ("to", &shard_label[to])],
                    counter(queued),
                );
            }
        }
    }
    out.family(
        "tidemark_exchange_queue_capacity_batches",
        "gauge",
        "Batches an exchange channel holds before its sender pauses its sources (pipeline.exchange_capacity).",
    );
    out.sample("tidemark_exchange_queue_capacity_batches", &[], labels.exchange_capacity as f64);
    out.family("tidemark_commit_queue_reports", "gauge", "Shard epoch reports waiting for the committer.");
    out.sample("tidemark_commit_queue_reports", &[], counter(&stats.commit_queue));

    // Per query and shard.
    out.family("tidemark_open_windows", "gauge", "Windows open, as of the shard's last epoch.");
    out.per_query_and_shard(stats, labels, &shard_label, "tidemark_open_windows", |s| &s.open_windows_by_query);
    out.family(
        "tidemark_state_keys",
        "gauge",
        "(window, group key) entries held in state, as of the shard's last epoch.",
    );
    out.per_query_and_shard(stats, labels, &shard_label, "tidemark_state_keys", |s| &s.state_keys_by_query);
    out.family(
        "tidemark_late_events_total",
        "counter",
        "Events that arrived after their window closed (beyond allowed_lateness), dead-lettered as late.",
    );
    for (q, (name, _)) in labels.queries.iter().enumerate() {
        out.sample(
            "tidemark_late_events_total",
            &[("query", name)],
            total(&|s| s.late_by_query.get(q).map_or(0.0, counter)),
        );
    }
    out.family(
        "tidemark_cdc_changes_skipped_total",
        "counter",
        "Change events an apply query skipped: their key already had a change at that source position or later (duplicates, out-of-order replays).",
    );
    for (q, (name, _)) in labels.queries.iter().enumerate() {
        out.sample(
            "tidemark_cdc_changes_skipped_total",
            &[("query", name)],
            total(&|s| s.changes_skipped_by_query.get(q).map_or(0.0, counter)),
        );
    }
    if let Some(bytes) = scrape.state_size_bytes {
        out.family("tidemark_state_size_bytes", "gauge", "Size of the state store's live SST files.");
        out.sample("tidemark_state_size_bytes", &[], bytes as f64);
    }

    let watermark = stats.watermark.load(Relaxed);
    if watermark != UNKNOWN {
        out.family(
            "tidemark_watermark_seconds",
            "gauge",
            "The pipeline watermark of the last committed epoch (min over the source partitions), as a Unix time.",
        );
        out.sample("tidemark_watermark_seconds", &[], seconds(watermark));
        out.family("tidemark_watermark_lag_seconds", "gauge", "Wall-clock time minus the pipeline watermark.");
        out.sample("tidemark_watermark_lag_seconds", &[], seconds(scrape.now_micros - watermark));
    }
    let query_watermarks: Vec<(&str, i64)> = labels
        .queries
        .iter()
        .zip(&stats.query_watermarks)
        .filter_map(|((name, lateness), w)| {
            let w = w.load(Relaxed);
            (w != UNKNOWN).then(|| (name.as_str(), w - lateness))
        })
        .collect();
    if !query_watermarks.is_empty() {
        out.family(
            "tidemark_query_watermark_seconds",
            "gauge",
            "Event time up to which the query's results are final: the watermark of the sources it reads (the min over them) minus its allowed_lateness.",
        );
        for (name, w) in &query_watermarks {
            out.sample("tidemark_query_watermark_seconds", &[("query", name)], seconds(*w));
        }
        out.family("tidemark_query_watermark_lag_seconds", "gauge", "Wall-clock time minus the query's watermark.");
        for (name, w) in &query_watermarks {
            out.sample("tidemark_query_watermark_lag_seconds", &[("query", name)], seconds(scrape.now_micros - w));
        }
    }

    // Committer.
    out.family("tidemark_committed_epoch", "gauge", "The last committed epoch number.");
    out.sample("tidemark_committed_epoch", &[], counter(&stats.committed_epoch));
    out.family("tidemark_epochs_committed_total", "counter", "Epochs committed by this process.");
    out.sample("tidemark_epochs_committed_total", &[], counter(&stats.epochs_committed));
    let per_sink: [CounterFamily<SinkStats>; 4] = [
        ("tidemark_rows_written_total", "Rows committed to the Delta sink.", |s| &s.rows_written),
        (
            "tidemark_delta_commits_total",
            "Delta commits made (replays skipped as already committed are not counted).",
            |s| &s.commits,
        ),
        (
            "tidemark_delta_commit_retries_total",
            "Delta epoch writes retried after a transient failure.",
            |s| &s.retries,
        ),
        (
            "tidemark_delta_commit_conflicts_total",
            "Delta commit attempts that lost to another writer (version taken or conflicting change).",
            |s| &s.conflicts,
        ),
    ];
    for (name, help, field) in per_sink {
        out.family(name, "counter", help);
        for (i, sink) in stats.sinks.iter().enumerate() {
            out.sample(name, &[("sink", labels.sinks.get(i).unwrap_or(&unknown))], counter(field(sink)));
        }
    }
    out.family(
        "tidemark_sink_indexed_keys",
        "gauge",
        "Keys the sink's upsert index holds in memory: in an update-mode view, the keys of windows still open (all keys for global windows without reset).",
    );
    for (i, sink) in stats.sinks.iter().enumerate() {
        out.sample(
            "tidemark_sink_indexed_keys",
            &[("sink", labels.sinks.get(i).unwrap_or(&unknown))],
            counter(&sink.indexed_keys),
        );
    }
    {
        let h = stats.commit_duration.lock().unwrap_or_else(|e| e.into_inner());
        out.hdr_histogram(
            "tidemark_epoch_commit_duration_seconds",
            "Time to flush and commit one epoch (state write and Delta commits).",
            &h,
            &COMMIT_DURATION_BUCKETS,
        );
    }
    let latency = stats.latency();
    out.hdr_histogram(
        "tidemark_ingest_to_commit_seconds",
        "From receiving an event to committing the epoch that took it (its offsets, state and any rows it completed).",
        &latency.ingest_to_commit,
        &LATENCY_BUCKETS,
    );
    out.hdr_histogram(
        "tidemark_event_time_to_commit_seconds",
        "From an event's event time to committing the epoch that took it.",
        &latency.event_time_to_commit,
        &LATENCY_BUCKETS,
    );
}

/// A Prometheus text exposition being written: families in the order first declared, each
/// with its samples. With `task` set, samples carry a `task` label, so the pipelines of every
/// task of a scaled-out process share the families.
#[derive(Default)]
struct Exposition {
    /// (name, HELP and TYPE lines, sample lines)
    families: Vec<(String, String, String)>,
    current: usize,
    task: Option<String>,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        if let Some(i) = self.families.iter().position(|f| f.0 == name) {
            self.current = i;
            return;
        }
        let header = format!("# HELP {name} {}\n# TYPE {name} {kind}\n", escape_help(help));
        self.families.push((name.to_string(), header, String::new()));
        self.current = self.families.len() - 1;
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let task = self.task.as_deref().map(|t| ("task", t));
        let text = &mut self.families[self.current].2;
        text.push_str(name);
        if task.is_some() || !labels.is_empty() {
            text.push('{');
            for (i, (k, v)) in task.iter().chain(labels).enumerate() {
                if i > 0 {
                    text.push(',');
                }
                let _ = write!(text, "{k}=\"{}\"", escape_label_value(v));
            }
            text.push('}');
        }
        let _ = writeln!(text, " {}", format_value(value));
    }

    fn finish(self) -> String {
        self.families.into_iter().flat_map(|(_, header, samples)| [header, samples]).collect()
    }

    /// A histogram kept in microseconds, exposed in seconds with buckets at `bounds`.
    fn hdr_histogram(&mut self, name: &str, help: &str, h: &Histogram<u64>, bounds: &[f64]) {
        let buckets: Vec<(f64, u64)> = bounds.iter().map(|le| (*le, h.count_between(0, (le * 1e6) as u64))).collect();
        let sum_seconds = h.mean() * h.len() as f64 / 1e6;
        self.histogram(name, help, &buckets, sum_seconds, h.len());
    }

    fn per_query_and_shard(
        &mut self,
        stats: &PipelineStats,
        labels: &MetricLabels,
        shard_label: &[String],
        name: &str,
        field: fn(&ShardStats) -> &[AtomicU64],
    ) {
        for (q, (query, _)) in labels.queries.iter().enumerate() {
            for (shard, s) in stats.shards.iter().enumerate() {
                let v = field(s).get(q).map_or(0, |c| c.load(Relaxed));
                self.sample(name, &[("query", query), ("shard", &shard_label[shard])], v as f64);
            }
        }
    }

    /// `buckets` are (upper bound, cumulative count), ascending; `+Inf` is added.
    fn histogram(&mut self, name: &str, help: &str, buckets: &[(f64, u64)], sum: f64, count: u64) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for (le, n) in buckets {
            self.sample(&bucket, &[("le", &format_value(*le))], *n as f64);
        }
        self.sample(&bucket, &[("le", "+Inf")], count as f64);
        self.sample(&format!("{name}_sum"), &[], sum);
        self.sample(&format!("{name}_count"), &[], count as f64);
    }
}

/// Label values escape backslash, double quote and line feed.
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// HELP text escapes backslash and line feed.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sample_value(text: &str, series: &str) -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("{series} not in\n{text}"));
        line[series.len() + 1..].parse().unwrap()
    }

    #[test]
    fn renders_help_type_labels_and_sums() {
        let stats = PipelineStats::new(2, 2, 1);
        // Shard 0 reads clicks partitions 0 and 1; shard 1 reads the weirdly named file source.
        stats.shards[0].set_partitions(vec![Arc::new(PartitionStats::new(0, 0)), Arc::new(PartitionStats::new(0, 1))]);
        stats.shards[1].set_partitions(vec![Arc::new(PartitionStats::new(1, -1))]);
        let files = Arc::new(crate::telemetry::FileSourceStats::new(1));
        files.publish(3, 2, Some(("drop-0004.jsonl.gz", 1234)));
        ShardStats::add(&files.read_errors, 1);
        stats.shards[1].set_files(vec![files.clone()]);
        let (p0, f) = (stats.shards[0].partitions()[0].clone(), stats.shards[1].partitions()[0].clone());
        let mut tally = crate::telemetry::Tally {
            received: 5,
            decoded: 4,
            bytes: 50,
            dead_letters: [1, 0, 0, 0, 0, 0],
        };
        tally.publish(&p0);
        tally.received = 7;
        tally.dead_letters[3] = 2;
        tally.publish(&f);
        p0.lag.store(12, Relaxed);
        p0.watermark.store(1_700_000_001_000_000, Relaxed);
        ShardStats::add(&stats.shards[1].late_by_query[1], 2);
        ShardStats::add(&stats.shards[0].late_by_query[1], 1);
        stats.shards[1].state_keys_by_query[0].store(40, Relaxed);
        stats.shards[0].exchange_queued[1].store(3, Relaxed);
        stats.shards[1].busy_ratio_ppm.store(250_000, Relaxed);
        stats.sinks[0].retries.store(2, Relaxed);
        stats.watermark.store(1_700_000_000_500_000, Relaxed);
        // Each query has its own watermark (the min over the sources it reads).
        stats.query_watermarks[0].store(1_700_000_003_000_000, Relaxed);
        stats.query_watermarks[1].store(1_700_000_000_500_000, Relaxed);
        stats.ready.store(true, Relaxed);
        let labels = MetricLabels {
            sources: vec!["clicks".to_string(), "we\"ird\\name\nx".to_string()],
            queries: vec![("views".into(), 0), ("late_ok".into(), 2_000_000)],
            sinks: vec!["out".into()],
            exchange_capacity: 16,
        };
        let scrape = Scrape {
            failed: false,
            state_size_bytes: Some(4096),
            now_micros: 1_700_000_010_000_000,
            process: Some(ProcStats {
                rss_bytes: 1 << 20,
                peak_rss_bytes: 1 << 21,
                cpu_seconds: 1.5,
            }),
        };
        let text = render(&stats, &labels, &scrape);

        // Every sample belongs to a family announced just before with HELP and TYPE.
        let mut typed: Vec<(String, String)> = Vec::new();
        let mut helped = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                helped.push(rest.split(' ').next().unwrap().to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split(' ');
                let (name, kind) = (it.next().unwrap(), it.next().unwrap());
                assert_eq!(helped.last().map(String::as_str), Some(name), "HELP before TYPE for {name}");
                assert!(["counter", "gauge", "histogram"].contains(&kind));
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "{name}");
                }
                typed.push((name.to_string(), kind.to_string()));
            } else {
                let series = line.split([' ', '{']).next().unwrap();
                let (family, kind) = typed.last().expect("a sample after a TYPE line");
                let ok = series == family
                    || (kind == "histogram" && [format!("{family}_bucket"), format!("{family}_sum"), format!("{family}_count")].contains(&series.to_string()));
                assert!(ok, "sample {series} under family {family}");
            }
        }
        assert_eq!(typed.len(), helped.len());
        let names_only: Vec<&str> = typed.iter().map(|(n, _)| n.as_str()).collect();
        let mut unique = names_only.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names_only.len(), "each family once");

        assert_eq!(sample_value(&text, "tidemark_up"), 1.0);
        assert_eq!(sample_value(&text, "tidemark_ready"), 1.0);
        assert_eq!(sample_value(&text, r#"tidemark_events_received_total{source="clicks",partition="0"}"#), 5.0);
        assert_eq!(sample_value(&text, r#"tidemark_events_received_total{source="clicks",partition="1"}"#), 0.0);
        assert_eq!(
            sample_value(&text, r#"tidemark_events_received_total{source="we\"ird\\name\nx",partition="-1"}"#),
            7.0
        );
        assert_eq!(sample_value(&text, r#"tidemark_events_decoded_total{source="clicks",partition="0"}"#), 4.0);
        assert_eq!(sample_value(&text, r#"tidemark_bytes_received_total{source="clicks",partition="0"}"#), 50.0);
        assert_eq!(
            sample_value(
                &text,
                r#"tidemark_events_dead_lettered_total{source="we\"ird\\name\nx",partition="-1",reason="late"}"#
            ),
            2.0
        );
        assert_eq!(
            sample_value(&text, r#"tidemark_events_dead_lettered_total{source="clicks",partition="0",reason="decode"}"#),
            1.0
        );
        assert_eq!(sample_value(&text, r#"tidemark_consumer_lag_messages{source="clicks",partition="0"}"#), 12.0);
        assert!(
            !text.contains(r#"tidemark_consumer_lag_messages{source="clicks",partition="1"}"#),
            "unknown lag is left out"
        );
        assert_eq!(
            sample_value(&text, r#"tidemark_partition_watermark_seconds{source="clicks",partition="0"}"#),
            1_700_000_001.0
        );
        assert_eq!(sample_value(&text, r#"tidemark_late_events_total{query="late_ok"}"#), 3.0);
        assert_eq!(sample_value(&text, r#"tidemark_late_events_total{query="views"}"#), 0.0);
        let file_source = r#"source="we\"ird\\name\nx""#;
        assert_eq!(sample_value(&text, &format!("tidemark_file_source_files_done{{{file_source}}}")), 3.0);
        assert_eq!(sample_value(&text, &format!("tidemark_file_source_files_queued{{{file_source}}}")), 2.0);
        assert_eq!(sample_value(&text, &format!("tidemark_file_source_read_errors_total{{{file_source}}}")), 1.0);
        assert_eq!(
            sample_value(
                &text,
                &format!("tidemark_file_source_current_offset_bytes{{{file_source},file=\"drop-0004.jsonl.gz\"}}")
            ),
            1234.0
        );
        assert_eq!(sample_value(&text, r#"tidemark_state_keys{query="views",shard="1"}"#), 40.0);
        assert_eq!(sample_value(&text, r#"tidemark_exchange_queue_batches{from="0",to="1"}"#), 3.0);
        assert!(!text.contains(r#"tidemark_exchange_queue_batches{from="0",to="0"}"#));
        assert_eq!(sample_value(&text, "tidemark_exchange_queue_capacity_batches"), 16.0);
        assert_eq!(sample_value(&text, r#"tidemark_shard_busy_ratio{shard="1"}"#), 0.25);
        assert_eq!(sample_value(&text, r#"tidemark_delta_commit_retries_total{sink="out"}"#), 2.0);
        assert_eq!(sample_value(&text, r#"tidemark_backpressure_pauses_total{shard="1"}"#), 0.0);
        assert_eq!(sample_value(&text, r#"tidemark_query_watermark_seconds{query="late_ok"}"#), 1_699_999_998.5);
        assert_eq!(sample_value(&text, r#"tidemark_query_watermark_seconds{query="views"}"#), 1_700_000_003.0);
        assert_eq!(sample_value(&text, r#"tidemark_query_watermark_lag_seconds{query="late_ok"}"#), 11.5);
        assert_eq!(sample_value(&text, "tidemark_state_size_bytes"), 4096.0);
        assert_eq!(sample_value(&text, "tidemark_watermark_seconds"), 1_700_000_000.5);
        assert_eq!(sample_value(&text, "tidemark_watermark_lag_seconds"), 9.5);
        assert_eq!(sample_value(&text, "process_resident_memory_bytes"), 1048576.0);
        assert_eq!(sample_value(&text, "process_cpu_seconds_total"), 1.5);
        assert!(!text.contains("NaN"));

        let failed = Scrape { failed: true, ..scrape };
        assert_eq!(sample_value(&render(&stats, &labels, &failed), "tidemark_ready"), 0.0);
    }

    #[test]
    fn watermark_is_left_out_until_known() {
        let stats = PipelineStats::new(1, 1, 1);
        let text = render(&stats, &MetricLabels::default(), &Scrape::default());
        assert!(!text.contains("tidemark_watermark"));
        assert_eq!(sample_value(&text, "tidemark_ready"), 0.0);
        assert_eq!(sample_value(&text, "tidemark_epoch_commit_duration_seconds_count"), 0.0);
        assert_eq!(sample_value(&text, "tidemark_epoch_commit_duration_seconds_sum"), 0.0);
    }

    #[test]
    fn commit_histogram_buckets_are_cumulative_and_end_at_the_count() {
        let stats = PipelineStats::new(1, 1, 1);
        for ms in [1u64, 3, 20, 20, 80, 400, 1500, 7000, 120_000, 7_200_000] {
            stats.record_epoch_commit(Duration::from_millis(ms));
        }
        let text = render(&stats, &MetricLabels::default(), &Scrape::default());
        let buckets: Vec<(String, f64)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("tidemark_epoch_commit_duration_seconds_bucket{le=\""))
            .map(|rest| {
                let (le, value) = rest.split_once("\"} ").unwrap();
                (le.to_string(), value.parse().unwrap())
            })
            .collect();
        assert_eq!(buckets.len(), COMMIT_DURATION_BUCKETS.len() + 1);
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
        assert_eq!(buckets.last().unwrap(), &("+Inf".to_string(), 10.0));
        assert_eq!(sample_value(&text, "tidemark_epoch_commit_duration_seconds_count"), 10.0);
        assert_eq!(buckets[0], ("0.005".to_string(), 2.0));
        assert_eq!(buckets.iter().find(|(le, _)| le == "0.025").unwrap().1, 4.0);
        assert_eq!(buckets.iter().find(|(le, _)| le == "300").unwrap().1, 9.0);
        let sum = sample_value(&text, "tidemark_epoch_commit_duration_seconds_sum");
        // The clamp at 1h caps the last one; hdrhistogram rounds within 0.1%.
        assert!((sum - 3729.024).abs() < 4.0, "{sum}");
        assert_eq!(sample_value(&text, "tidemark_epochs_committed_total"), 10.0);
    }

    #[test]
    fn latency_histograms_are_exposed_in_seconds() {
        let stats = PipelineStats::new(2, 1, 1);
        let start = std::time::Instant::now();
        let mut e = crate::telemetry::EpochLatency::new(start, 0, Duration::from_secs(1));
        e.record_ingest(start, 3);
        e.record_ingest(start + Duration::from_millis(800), 1);
        stats.record_epoch_latency(1, &e, start + Duration::from_millis(1_150), 0);
        let text = render(&stats, &MetricLabels::default(), &Scrape::default());
        assert_eq!(sample_value(&text, "tidemark_ingest_to_commit_seconds_count"), 4.0);
        assert_eq!(sample_value(&text, r#"tidemark_ingest_to_commit_seconds_bucket{le="0.2"}"#), 0.0);
        assert_eq!(sample_value(&text, r#"tidemark_ingest_to_commit_seconds_bucket{le="0.4"}"#), 1.0);
        assert_eq!(sample_value(&text, r#"tidemark_ingest_to_commit_seconds_bucket{le="1.1"}"#), 1.0);
        assert_eq!(sample_value(&text, r#"tidemark_ingest_to_commit_seconds_bucket{le="1.2"}"#), 4.0);
        let sum = sample_value(&text, "tidemark_ingest_to_commit_seconds_sum");
        assert!((sum - 3.8).abs() < 0.01, "{sum}");
        assert_eq!(sample_value(&text, "tidemark_event_time_to_commit_seconds_count"), 0.0);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value("plain"), "plain");
        assert_eq!(escape_label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
