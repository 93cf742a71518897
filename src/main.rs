//! The `tidemark` command line. Everything here is argument handling; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use tidemark::config::{load_config, parse_duration, Bootstrap};
use tidemark::source::families::{Family, FamilyGenerator, FamilySettings};
use tidemark::source::generator::{ClickGenerator, ClickGeneratorSettings};
use tidemark::source::loadgen::{run_loadgen, LoadSettings, Rate};
use tidemark::source::producer::{run_generator, EventProducer};

#[derive(Parser)]
#[command(name = "tidemark", version, about = "Real-time analytics daemon: Kafka in, event-time windows, exactly-once Delta Lake out", long_about = None)]
struct Cli {
    /// Log as JSON lines instead of human-readable text (level from RUST_LOG, else the pipeline's [log] level, else info).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline until SIGINT/SIGTERM (the current epoch is committed before exit).
    Run {
        /// The pipeline TOML file.
        pipeline: PathBuf,
        /// Use these Kafka bootstrap servers instead of [kafka] bootstrap_servers.
        #[arg(long)]
        brokers: Option<String>,
    },
    /// Check a pipeline file; exit 0 if valid, else exit 1 listing every error with its TOML path and line.
    Validate {
        /// The pipeline TOML file.
        pipeline: PathBuf,
    },
    /// Run the embedded Kafka-protocol broker as a process of its own, until SIGINT/SIGTERM.
    Broker {
        /// Topic to create, as NAME:PARTITIONS (repeatable), e.g. --topic click-events:4.
        #[arg(long = "topic", value_name = "NAME:PARTITIONS")]
        topics: Vec<String>,
        /// Also create the topics of this pipeline's [[sources]] (with their partitions).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Write the bootstrap address to this file once listening (for scripts).
        #[arg(long)]
        address_file: Option<PathBuf>,
    },
    /// Produce seeded click events into any Kafka broker.
    Generate {
        /// Bootstrap servers, e.g. 127.0.0.1:9092.
        #[arg(long)]
        brokers: String,
        #[arg(long, default_value = "click-events")]
        topic: String,
        /// Events per second; 0 = as fast as possible.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Stop after this many events (default: run until interrupted).
        #[arg(long)]
        count: Option<u64>,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, default_value_t = 1000)]
        users: u32,
        #[arg(long, default_value_t = 50)]
        pages: u32,
        #[command(flatten)]
        envelope: EnvelopeArgs,
    },
    /// Load-test a broker: produce one event family at a target rate or flat out, report the rate achieved.
    Loadgen {
        /// Bootstrap servers, e.g. 127.0.0.1:9092.
        #[arg(long)]
        brokers: String,
        /// Event family: click, sensor, purchase or nexmark.
        #[arg(long)]
        family: Family,
        /// Topic (default: <family>-events, e.g. nexmark-events).
        #[arg(long)]
        topic: Option<String>,
        /// Events per second, or `max` for as fast as the broker takes them.
        #[arg(long, default_value = "max")]
        rate: Rate,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this long, e.g. 30s (with neither --count nor --duration: until interrupted).
        #[arg(long, value_parser = duration_arg)]
        duration: Option<Duration>,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Distinct keys: users (click, purchase), devices (sensor), open auctions bids go to (nexmark).
        #[arg(long, default_value_t = 1000)]
        keys: u32,
        #[command(flatten)]
        envelope: EnvelopeArgs,
        /// Print the achieved rate this often.
        #[arg(long, default_value = "5s", value_parser = duration_arg)]
        report_every: Duration,
    },
    /// End-to-end load test of the demo's click query: baseline, catch-up, max sustained rate, latency, RSS.
    Loadtest {
        /// Kafka bootstrap servers (e.g. from scripts/kafka-broker.sh); default: the embedded broker.
        #[arg(long)]
        bootstrap: Option<String>,
        /// Pipeline shards, and baseline threads (default: one per core).
        #[arg(long)]
        shards: Option<usize>,
        /// Prefilled events for the baseline and the catch-up (must fit the embedded broker's ~5 MB per partition).
        #[arg(long, default_value_t = 320_000)]
        events: u64,
        /// Partitions of the load-test topic (a fresh one per run).
        #[arg(long, default_value_t = 16)]
        partitions: i32,
        /// Length of each live step of the rate search, and of the latency phase.
        #[arg(long, default_value_t = 10.0)]
        step_seconds: f64,
        /// Also fill this many distinct page_url keys in one 5-minute window and report the RSS.
        #[arg(long)]
        keys: Option<u64>,
        /// Where the pipeline file, its log, the last /metrics scrape and the report go.
        #[arg(long, default_value = "data/loadtest")]
        out: PathBuf,
        /// Seed of the generated events.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

/// How events arrive (disorder, very-late and malformed shares), shared by `generate` and `loadgen`.
#[derive(Args)]
struct EnvelopeArgs {
    /// Maximum event-time disorder, e.g. 2s.
    #[arg(long, default_value = "0s", value_parser = duration_arg)]
    disorder: Duration,
    /// Share of very-late events (0..1).
    #[arg(long, default_value_t = 0.0)]
    late_share: f64,
    /// How far behind very-late events are, e.g. 1h.
    #[arg(long, default_value = "1h", value_parser = duration_arg)]
    late_by: Duration,
    /// Share of malformed events (0..1).
    #[arg(long, default_value_t = 0.0)]
    malformed_share: f64,
}

impl EnvelopeArgs {
    /// The shares are between 0 and 1, or an error is printed.
    fn check(&self) -> bool {
        let ok = (0.0..=1.0).contains(&self.late_share) && (0.0..=1.0).contains(&self.malformed_share);
        if !ok {
            eprintln!("error: --late-share and --malformed-share must be between 0 and 1");
        }
        ok
    }

    fn disorder_ms(&self) -> i64 {
        self.disorder.as_millis() as i64
    }

    fn late_by_ms(&self) -> i64 {
        self.late_by.as_millis() as i64
    }
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

fn shutdown_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while shutting down exits at once.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone());
        let _ = signal_hook::flag::register(sig, flag.clone());
    }
    flag
}

/// Loads a pipeline file, or prints every error in it and returns None.
fn load_or_report(path: &std::path::Path) -> Option<tidemark::config::Config> {
    match load_config(path) {
        Ok(cfg) => Some(cfg),
        Err(errors) => {
            eprintln!("{}: {} error(s):", path.display(), errors.0.len());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            None
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tidemark::telemetry::init_logging(cli.log_json);
    match cli.command {
        Command::Validate { pipeline } => {
            let Some(cfg) = load_or_report(&pipeline) else { return ExitCode::FAILURE };
            for warning in &cfg.warnings {
                eprintln!("warning: {warning}");
            }
            if let Err(e) = tidemark::plan::Plan::new(&cfg) {
                eprintln!("{}: {e}", pipeline.display());
                return ExitCode::FAILURE;
            }
            println!(
                "{}: valid (sources: {}, queries: {}, sinks: {})",
                pipeline.display(),
                cfg.sources.len(),
                cfg.queries.len(),
                cfg.sinks.len()
            );
            ExitCode::SUCCESS
        }
        Command::Run { pipeline, brokers } => {
            let Some(mut cfg) = load_or_report(&pipeline) else { return ExitCode::FAILURE };
            if let Some(level) = &cfg.log.level {
                tidemark::telemetry::apply_config_log_level(level);
            }
            if let Some(b) = brokers {
                cfg.kafka.bootstrap_servers = Bootstrap::Servers(b);
            }
            let shutdown = shutdown_flag();
            let running = match tidemark::daemon::start(cfg, shutdown) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            println!(
                "tidemark running: brokers {} shards {} (Ctrl-C to stop)",
                running.bootstrap_servers(),
                running.shards()
            );
            match running.wait() {
                Ok(summary) => {
                    let s = summary.stats;
                    println!(
                        "stopped: committed epoch {}, {} events in, {} rows written, {} dead letters",
                        s.committed_epoch, s.events_in, s.rows_written, s.dead_letters
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Broker { topics, config, address_file } => {
            let mut list = Vec::new();
            for t in &topics {
                match t.rsplit_once(':').map(|(n, p)| (n, p.parse::<i32>())) {
                    Some((name, Ok(p))) if p > 0 && !name.is_empty() => list.push((name.to_string(), p)),
                    _ => {
                        eprintln!("error: --topic {t:?} must look like NAME:PARTITIONS, e.g. click-events:4");
                        return ExitCode::FAILURE;
                    }
                }
            }
            if let Some(path) = config {
                let Some(cfg) = load_or_report(&path) else { return ExitCode::FAILURE };
                list.extend(cfg.sources.iter().filter(|s| s.files.is_none()).map(|s| (s.topic.clone(), s.partitions as i32)));
            }
            let broker = match tidemark::broker::EmbeddedBroker::start(&list) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let addr = broker.bootstrap_servers().to_string();
            if let Some(f) = address_file {
                if let Err(e) = std::fs::write(&f, &addr) {
                    eprintln!("error: cannot write {}: {e}", f.display());
                    return ExitCode::FAILURE;
                }
            }
            println!("broker listening on {addr}");
            let shutdown = shutdown_flag();
            while !shutdown.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
            }
            drop(broker);
            ExitCode::SUCCESS
        }
        Command::Generate {
            brokers,
            topic,
            rate,
            count,
            seed,
            users,
            pages,
            envelope,
        } => {
            if !envelope.check() {
                return ExitCode::FAILURE;
            }
            let producer = match EventProducer::connect(&brokers) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let mut generator = ClickGenerator::new(ClickGeneratorSettings {
                seed,
                users,
                pages,
                disorder_ms: envelope.disorder_ms(),
                late_share: envelope.late_share,
                late_by_ms: envelope.late_by_ms(),
                malformed_share: envelope.malformed_share,
            });
            let shutdown = shutdown_flag();
            match run_generator(&producer, &topic, &mut generator, rate, count, &shutdown) {
                Ok(r) => {
                    println!(
                        "produced {} events ({} valid, {} very late, {} malformed) in {:.1}s = {:.0} events/s",
                        r.produced,
                        r.valid,
                        r.very_late,
                        r.malformed,
                        r.elapsed.as_secs_f64(),
                        r.produced as f64 / r.elapsed.as_secs_f64().max(1e-9)
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Loadtest {
            bootstrap,
            shards,
            events,
            partitions,
            step_seconds,
            keys,
            out,
            seed,
        } => {
            let exe = match std::env::current_exe() {
                Ok(exe) => exe,
                Err(e) => {
                    eprintln!("error: cannot find the tidemark binary to run the pipeline with: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if !(step_seconds.is_finite() && step_seconds > 0.0) {
                eprintln!("error: --step-seconds must be a positive number of seconds, e.g. 10");
                return ExitCode::FAILURE;
            }
            let settings = tidemark::loadtest::LoadTestSettings {
                exe,
                bootstrap,
                shards: shards.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
                partitions,
                events,
                step: Duration::from_secs_f64(step_seconds),
                keys,
                out_dir: out,
                seed,
                command: std::env::args().collect::<Vec<_>>().join(" "),
            };
            match tidemark::loadtest::run(&settings, &shutdown_flag()) {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Loadgen {
            brokers,
            family,
            topic,
            rate,
            count,
            duration,
            seed,
            keys,
            envelope,
            report_every,
        } => {
            if !envelope.check() {
                return ExitCode::FAILURE;
            }
            let topic = topic.unwrap_or_else(|| family.default_topic().to_owned());
            let producer = match EventProducer::connect(&brokers) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let mut generator = FamilyGenerator::new(
                family,
                &FamilySettings {
                    seed,
                    keys,
                    disorder_ms: envelope.disorder_ms(),
                    late_share: envelope.late_share,
                    late_by_ms: envelope.late_by_ms(),
                    malformed_share: envelope.malformed_share,
                },
            );
            let settings = LoadSettings {
                rate,
                count,
                duration,
                report_every,
            };
            let shutdown = shutdown_flag();
            let progress = |p: &tidemark::source::loadgen::LoadProgress| {
                println!(
                    "loadgen: {family} {} events in {:.1} s, now {:.0} events/s, overall {:.0} events/s ({:.1} MB/s), {} delivery failures",
                    p.produced,
                    p.elapsed.as_secs_f64(),
                    p.recent_rate,
                    p.produced as f64 / p.elapsed.as_secs_f64().max(1e-9),
                    p.bytes as f64 / 1e6 / p.elapsed.as_secs_f64().max(1e-9),
                    p.delivery_failures
                );
            };
            match run_loadgen(&producer, &topic, &mut generator, &settings, &shutdown, progress) {
                Ok(report) => {
                    println!("{}", report.summary_line());
                    if report.failed > 0 {
                        eprintln!(
                            "error: {} of {} events were not delivered to `{topic}` (first error: {}); check the topic and the broker",
                            report.failed,
                            report.produced,
                            report.first_error.as_deref().unwrap_or("unknown")
                        );
                        return ExitCode::FAILURE;
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
