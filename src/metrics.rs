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
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::decode::DeadLetterReason;
use crate::state::StateStore;
use crate::telemetry::PipelineStats;
use crate::watermark::UNKNOWN;

/// How long a connection may take to send its request or accept the answer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// Requests larger than this are cut off (only the request line matters).
const MAX_REQUEST_BYTES: usize = 8 << 10;
/// Upper bounds (seconds) of the epoch commit duration buckets.
pub const COMMIT_DURATION_BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
/// Linux reports CPU time in clock ticks; USER_HZ is 100 on every mainstream architecture.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// What the endpoint reads from.
pub struct MetricsSource {
    pub stats: Arc<PipelineStats>,
    pub store: Arc<StateStore>,
    /// Source names, in config order (labels of the per-source counters).
    pub source_names: Vec<String>,
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
    pub fn start(listen: SocketAddr, source: MetricsSource) -> Option<MetricsServer> {
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

fn serve(listener: TcpListener, source: &MetricsSource, stop: &AtomicBool) {
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
fn answer(mut stream: TcpStream, source: &MetricsSource) -> std::io::Result<()> {
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

fn route(path: &str, source: &MetricsSource) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", scrape(source)),
        "/healthz" if source.failed.load(Relaxed) => ("503 Service Unavailable", TEXT, "failed\n".into()),
        "/healthz" => ("200 OK", TEXT, "ok\n".into()),
        "/readyz" if source.stats.ready.load(Relaxed) && !source.failed.load(Relaxed) => ("200 OK", TEXT, "ready\n".into()),
        "/readyz" => ("503 Service Unavailable", TEXT, "not ready\n".into()),
        _ => ("404 Not Found", TEXT, "not found; try /metrics, /healthz or /readyz\n".into()),
    }
}

fn scrape(source: &MetricsSource) -> String {
    let now_micros = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
    let scrape = Scrape {
        state_size_bytes: Some(source.store.size_on_disk_bytes()),
        now_micros,
        process: ProcessStats::read(),
    };
    render(&source.stats, &source.source_names, &scrape)
}

/// Values read at scrape time from outside [`PipelineStats`].
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub state_size_bytes: Option<u64>,
    pub now_micros: i64,
    pub process: Option<ProcessStats>,
}

/// This process's resource use, from `/proc/self`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    pub resident_memory_bytes: u64,
    pub cpu_seconds: f64,
}

impl ProcessStats {
    /// `None` where `/proc` is not available.
    pub fn read() -> Option<ProcessStats> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        Self::parse(&status, &stat)
    }

    fn parse(status: &str, stat: &str) -> Option<ProcessStats> {
        let rss_kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
        // Fields after the command name (which may hold spaces) start at field 3 (state);
        // utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(ProcessStats {
            resident_memory_bytes: rss_kb * 1024,
            cpu_seconds: ticks as f64 / CLOCK_TICKS_PER_SECOND,
        })
    }
}

/// Renders every metric in the Prometheus text format 0.0.4.
pub fn render(stats: &PipelineStats, source_names: &[String], scrape: &Scrape) -> String {
    let mut out = Exposition::default();
    let shard_label: Vec<String> = (0..stats.shards.len()).map(|i| i.to_string()).collect();
    let counter = |c: &std::sync::atomic::AtomicU64| c.load(Relaxed) as f64;
    let total = |f: &dyn Fn(&crate::telemetry::ShardStats) -> f64| stats.shards.iter().map(f).sum::<f64>();

    out.family("tidemark_up", "gauge", "1 while the process runs.");
    out.sample("tidemark_up", &[], 1.0);
    out.family("tidemark_ready", "gauge", "1 once recovery is done and the sources are consuming, else 0.");
    out.sample("tidemark_ready", &[], if stats.ready.load(Relaxed) { 1.0 } else { 0.0 });

    out.family(
        "tidemark_events_received_total",
        "counter",
        "Records read from the sources, per shard and source.",
    );
    for (shard, s) in stats.shards.iter().enumerate() {
        for (i, name) in source_names.iter().enumerate() {
            let v = s.events_by_source.get(i).map_or(0.0, counter);
            out.sample("tidemark_events_received_total", &[("shard", &shard_label[shard]), ("source", name)], v);
        }
    }
    out.family(
        "tidemark_bytes_received_total",
        "counter",
        "Payload bytes read from the sources, per shard and source.",
    );
    for (shard, s) in stats.shards.iter().enumerate() {
        for (i, name) in source_names.iter().enumerate() {
            let v = s.bytes_by_source.get(i).map_or(0.0, counter);
            out.sample("tidemark_bytes_received_total", &[("shard", &shard_label[shard]), ("source", name)], v);
        }
    }
    out.family("tidemark_events_dead_lettered_total", "counter", "Records routed to dead letters, by reason.");
    for (i, reason) in DeadLetterReason::ALL.iter().enumerate() {
        let v = total(&|s| counter(&s.dead_letters[i]));
        out.sample("tidemark_events_dead_lettered_total", &[("reason", reason.as_str())], v);
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

    out.family("tidemark_open_windows", "gauge", "Windows open in the shard, as of its last epoch.");
    for (shard, s) in stats.shards.iter().enumerate() {
        out.sample("tidemark_open_windows", &[("shard", &shard_label[shard])], counter(&s.open_windows));
    }
    out.family("tidemark_state_keys", "gauge", "Group keys held in the shard's state, as of its last epoch.");
    for (shard, s) in stats.shards.iter().enumerate() {
        out.sample("tidemark_state_keys", &[("shard", &shard_label[shard])], counter(&s.open_keys));
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
            "The pipeline watermark (event time), in seconds since the Unix epoch.",
        );
        out.sample("tidemark_watermark_seconds", &[], watermark as f64 / 1e6);
        out.family("tidemark_watermark_lag_seconds", "gauge", "Wall-clock time minus the pipeline watermark.");
        out.sample("tidemark_watermark_lag_seconds", &[], (scrape.now_micros - watermark) as f64 / 1e6);
    }

    out.family("tidemark_committed_epoch", "gauge", "The last committed epoch number.");
    out.sample("tidemark_committed_epoch", &[], counter(&stats.committed_epoch));
    out.family("tidemark_epochs_committed_total", "counter", "Epochs committed by this process.");
    out.sample("tidemark_epochs_committed_total", &[], counter(&stats.epochs_committed));
    out.family("tidemark_rows_written_total", "counter", "Rows committed to the Delta sinks.");
    out.sample("tidemark_rows_written_total", &[], counter(&stats.rows_written));
    out.family(
        "tidemark_delta_commits_total",
        "counter",
        "Delta commits made (skipped duplicates not counted).",
    );
    out.sample("tidemark_delta_commits_total", &[], counter(&stats.delta_commits));

    {
        let h = stats.commit_duration.lock().unwrap_or_else(|e| e.into_inner());
        let buckets: Vec<(f64, u64)> = COMMIT_DURATION_BUCKETS.iter().map(|le| (*le, h.count_between(0, (le * 1e6) as u64))).collect();
        let sum_seconds = h.mean() * h.len() as f64 / 1e6;
        out.histogram(
            "tidemark_epoch_commit_duration_seconds",
            "Time to flush and commit one epoch (state write and Delta commits).",
            &buckets,
            sum_seconds,
            h.len(),
        );
    }

    if let Some(p) = scrape.process {
        out.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
        out.sample("process_resident_memory_bytes", &[], p.resident_memory_bytes as f64);
        out.family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.");
        out.sample("process_cpu_seconds_total", &[], p.cpu_seconds);
    }
    out.text
}

/// A Prometheus text exposition being written.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape_label_value(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", format_value(value));
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
        let stats = PipelineStats::new(2, 2);
        crate::telemetry::ShardStats::add(&stats.shards[0].events_by_source[0], 5);
        crate::telemetry::ShardStats::add(&stats.shards[1].events_by_source[1], 7);
        crate::telemetry::ShardStats::add(&stats.shards[1].dead_letters[3], 2);
        crate::telemetry::ShardStats::add(&stats.shards[0].dead_letters[3], 1);
        stats.watermark.store(1_700_000_000_500_000, Relaxed);
        stats.ready.store(true, Relaxed);
        let names = vec!["clicks".to_string(), "we\"ird\\name\nx".to_string()];
        let scrape = Scrape {
            state_size_bytes: Some(4096),
            now_micros: 1_700_000_010_000_000,
            process: Some(ProcessStats {
                resident_memory_bytes: 1 << 20,
                cpu_seconds: 1.5,
            }),
        };
        let text = render(&stats, &names, &scrape);

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
        assert_eq!(sample_value(&text, r#"tidemark_events_received_total{shard="0",source="clicks"}"#), 5.0);
        assert_eq!(
            sample_value(&text, r#"tidemark_events_received_total{shard="1",source="we\"ird\\name\nx"}"#),
            7.0
        );
        assert_eq!(sample_value(&text, r#"tidemark_events_dead_lettered_total{reason="late"}"#), 3.0);
        assert_eq!(sample_value(&text, r#"tidemark_events_dead_lettered_total{reason="decode"}"#), 0.0);
        assert_eq!(sample_value(&text, r#"tidemark_backpressure_pauses_total{shard="1"}"#), 0.0);
        assert_eq!(sample_value(&text, "tidemark_state_size_bytes"), 4096.0);
        assert_eq!(sample_value(&text, "tidemark_watermark_seconds"), 1_700_000_000.5);
        assert_eq!(sample_value(&text, "tidemark_watermark_lag_seconds"), 9.5);
        assert_eq!(sample_value(&text, "process_resident_memory_bytes"), 1048576.0);
        assert_eq!(sample_value(&text, "process_cpu_seconds_total"), 1.5);
        assert!(!text.contains("NaN"));
    }

    #[test]
    fn watermark_is_left_out_until_known() {
        let stats = PipelineStats::new(1, 1);
        let text = render(&stats, &["s".into()], &Scrape::default());
        assert!(!text.contains("tidemark_watermark"));
        assert_eq!(sample_value(&text, "tidemark_ready"), 0.0);
        assert_eq!(sample_value(&text, "tidemark_epoch_commit_duration_seconds_count"), 0.0);
        assert_eq!(sample_value(&text, "tidemark_epoch_commit_duration_seconds_sum"), 0.0);
    }

    #[test]
    fn commit_histogram_buckets_are_cumulative_and_end_at_the_count() {
        let stats = PipelineStats::new(1, 1);
        for ms in [1u64, 3, 20, 20, 80, 400, 1500, 7000, 120_000, 7_200_000] {
            stats.record_epoch_commit(Duration::from_millis(ms));
        }
        let text = render(&stats, &["s".into()], &Scrape::default());
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
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value("plain"), "plain");
        assert_eq!(escape_label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn process_stats_parse_proc_files() {
        let status = "Name:\ttidemark\nVmPeak:\t  9000 kB\nVmRSS:\t    2048 kB\n";
        let stat = "1234 (tide mark) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 100 1000 500";
        let p = ProcessStats::parse(status, stat).unwrap();
        assert_eq!(p.resident_memory_bytes, 2048 * 1024);
        assert_eq!(p.cpu_seconds, 3.0);
        assert!(ProcessStats::read().is_some_and(|p| p.resident_memory_bytes > 0));
    }
}
