//! The `tidemark-tools` command line: the load generator and the end-to-end load test.
//! Everything here is argument handling; the work is in the library crates.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use tidemark::config::parse_duration;
use tidemark::source::producer::{produce_events, EventProducer, ProduceProgress, ProduceSettings, Rate};
use tidemark_tools::families::{Family, FamilyGenerator, FamilySettings};
use tidemark_tools::loadgen::{kinds_line, progress_line, summary_line};
use tidemark_tools::loadtest::{find_daemon, LoadTestSettings};

#[derive(Parser)]
#[command(name = "tidemark-tools", version, about = "Load generator and load test for the tidemark daemon", long_about = None)]
struct Cli {
    /// Log as JSON lines instead of human-readable text (level from RUST_LOG, else info).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print how far a consumer group's committed offsets are behind the topics' ends; with
    /// --wait, wait until it catches up and print how long that took.
    Lag(LagArgs),
    /// Produce one event family into any Kafka broker at a target rate or flat out, and report the rate achieved.
    Loadgen {
        /// Bootstrap servers, e.g. 127.0.0.1:9092.
        #[arg(long)]
        brokers: String,
        /// Event family: click, sensor, purchase, nexmark or orders (Debezium change events).
        #[arg(long)]
        family: Family,
        /// Topic (default: <family>-events, e.g. click-events).
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
        /// Seed of the generated events: same seed, same events.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Distinct keys: users (click, purchase), devices (sensor), open auctions bids go to (nexmark), live orders (orders).
        #[arg(long, visible_alias = "users", default_value_t = 1000)]
        keys: u32,
        /// Orders family: share of changes sent twice (0..1).
        #[arg(long, default_value_t = 0.0)]
        duplicate_share: f64,
        /// Orders family: share of changes followed by a replay of an older change (0..1).
        #[arg(long, default_value_t = 0.0)]
        replay_share: f64,
        /// Distinct pages (`page_url`) of the click family [default: 500].
        #[arg(long)]
        pages: Option<u32>,
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
        /// The tidemark daemon binary that runs the pipeline (default: `tidemark` next to this executable).
        #[arg(long)]
        daemon: Option<PathBuf>,
    },
}

/// `lag`: how far a consumer group's committed offsets are behind the topics' ends.
#[derive(Args)]
struct LagArgs {
    /// Bootstrap servers, e.g. 127.0.0.1:9092.
    #[arg(long)]
    brokers: String,
    /// The consumer group (a tidemark pipeline commits its positions to `[kafka] group_id`).
    #[arg(long)]
    group: String,
    /// Topics, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    topics: Vec<String>,
    /// Wait until the group has caught up (lag 0), then print how long it took.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this long, e.g. 10m.
    #[arg(long, default_value = "30m", value_parser = duration_arg)]
    timeout: Duration,
}

/// How events arrive: disorder, very-late and malformed shares.
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    tidemark::telemetry::init_logging(cli.log_json);
    match cli.command {
        Command::Lag(args) => {
            let started = std::time::Instant::now();
            loop {
                match tidemark_tools::lag::group_lag(&args.brokers, &args.group, &args.topics) {
                    Ok((committed, end)) if !args.wait || committed >= end => {
                        println!(
                            "group {}: committed {committed} of {end} messages (lag {}){}",
                            args.group,
                            end - committed,
                            if args.wait {
                                format!(", caught up after {:.2} s", started.elapsed().as_secs_f64())
                            } else {
                                String::new()
                            }
                        );
                        return ExitCode::SUCCESS;
                    }
                    Ok(_) => {}
                    Err(e) if !args.wait => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                    Err(_) => {} // the coordinator may be busy while members come and go: ask again
                }
                if started.elapsed() > args.timeout {
                    eprintln!("error: group {} did not catch up within {:?}", args.group, args.timeout);
                    return ExitCode::FAILURE;
                }
                std::thread::sleep(Duration::from_millis(100));
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
            duplicate_share,
            replay_share,
            pages,
            envelope,
            report_every,
        } => {
            if !envelope.check() {
                return ExitCode::FAILURE;
            }
            if family == Family::Orders && (envelope.late_share > 0.0 || !envelope.disorder.is_zero()) {
                eprintln!("error: --late-share and --disorder apply to the other families; orders events mix in --duplicate-share and --replay-share instead");
                return ExitCode::FAILURE;
            }
            if family != Family::Orders && (duplicate_share > 0.0 || replay_share > 0.0) {
                eprintln!("error: --duplicate-share and --replay-share apply to the orders family only");
                return ExitCode::FAILURE;
            }
            if !(0.0..=1.0).contains(&duplicate_share) || !(0.0..=1.0).contains(&replay_share) {
                eprintln!("error: --duplicate-share and --replay-share must be between 0 and 1");
                return ExitCode::FAILURE;
            }
            if pages.is_some() && family != Family::Click {
                eprintln!("error: --pages applies to the click family only; {family} events have no pages");
                return ExitCode::FAILURE;
            }
            let settings = FamilySettings {
                seed,
                keys,
                click_pages: pages.unwrap_or(FamilySettings::default().click_pages),
                disorder_ms: envelope.disorder.as_millis() as i64,
                late_share: envelope.late_share,
                late_by_ms: envelope.late_by.as_millis() as i64,
                malformed_share: envelope.malformed_share,
                duplicate_share,
                replay_share,
            };
            let topic = topic.unwrap_or_else(|| family.default_topic().to_owned());
            let producer = match EventProducer::connect(&brokers) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let mut generator = FamilyGenerator::new(family, &settings);
            let produce = ProduceSettings {
                rate,
                count,
                duration,
                progress_every: Some(report_every),
                stop_on_failure: false,
            };
            let progress = |p: &ProduceProgress| println!("{}", progress_line(family, p));
            match produce_events(&producer, &topic, &mut generator, &produce, &shutdown_flag(), progress) {
                Ok(report) => {
                    println!("{}", kinds_line(&report));
                    println!("{}", summary_line(family, &report));
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
        Command::Loadtest {
            bootstrap,
            shards,
            events,
            partitions,
            step_seconds,
            keys,
            out,
            seed,
            daemon,
        } => {
            let step = match Duration::try_from_secs_f64(step_seconds) {
                Ok(step) if step > Duration::ZERO => step,
                _ => {
                    eprintln!("error: --step-seconds must be a positive number of seconds, e.g. 10");
                    return ExitCode::FAILURE;
                }
            };
            let exe = match std::env::current_exe() {
                Ok(tools) => find_daemon(&tools, daemon.as_deref()),
                Err(e) => {
                    eprintln!("error: cannot locate this executable to find the tidemark daemon next to it ({e}); name the daemon with --daemon PATH");
                    return ExitCode::FAILURE;
                }
            };
            let exe = match exe {
                Ok(exe) => exe,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let settings = LoadTestSettings {
                exe,
                bootstrap,
                shards: shards.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
                partitions,
                events,
                step,
                keys,
                out_dir: out,
                seed,
                command: std::env::args().collect::<Vec<_>>().join(" "),
            };
            match tidemark_tools::loadtest::run(&settings, &shutdown_flag()) {
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
    }
}
