//! The `tidemark` command line. Everything here is argument handling; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use tidemark::config::{load_config, Bootstrap};

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
        /// Serve /metrics, /healthz and /readyz on this address instead of [metrics] listen
        /// (e.g. 127.0.0.1:9101 for a second process on one machine; "off" for none).
        #[arg(long)]
        metrics: Option<String>,
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

/// glibc's malloc serves a block of at least its mmap threshold with a mapping of its own,
/// returned to the kernel when freed, but raises the threshold (up to 32 MiB) to the size of
/// each such block freed. After warm-up, the large buffers this daemon frees all the time
/// (Parquet pages and files, Kafka fetch buffers, RocksDB memtable blocks, rows of an epoch)
/// therefore come from the per-thread arenas, whose resident high-water marks only grow:
/// the process held 25–35 MiB more after a few minutes of the join demo (BENCHMARKS.md, "The
/// join's memory over minutes, found"). A fixed threshold keeps them in mappings of their
/// own. An operator's `MALLOC_MMAP_THRESHOLD_` wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn fix_malloc_mmap_threshold() {
    const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
    const THRESHOLD_BYTES: std::ffi::c_int = 256 * 1024;
    extern "C" {
        fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: called first thing in main, before any other thread exists; mallopt only
        // changes malloc's parameters.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fix_malloc_mmap_threshold() {}

fn main() -> ExitCode {
    fix_malloc_mmap_threshold();
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
        Command::Run { pipeline, brokers, metrics } => {
            let Some(mut cfg) = load_or_report(&pipeline) else { return ExitCode::FAILURE };
            if let Some(level) = &cfg.log.level {
                tidemark::telemetry::apply_config_log_level(level);
            }
            if let Some(b) = brokers {
                cfg.kafka.bootstrap_servers = Bootstrap::Servers(b);
            }
            match metrics.as_deref() {
                None => {}
                Some("off") => cfg.metrics.listen = None,
                Some(address) => match address.parse() {
                    Ok(a) => cfg.metrics.listen = Some(a),
                    Err(_) => {
                        eprintln!("error: --metrics {address:?} is not an address like 127.0.0.1:9101 (or \"off\")");
                        return ExitCode::FAILURE;
                    }
                },
            }
            let shutdown = shutdown_flag();
            if cfg.scale.is_some() {
                // One member of a scaled-out pipeline: it runs the tasks the group gives it.
                println!(
                    "tidemark running as a member of pipeline {} (group {}.members; Ctrl-C to stop)",
                    cfg.pipeline.name, cfg.kafka.group_id
                );
                return match tidemark::scale::run(cfg, shutdown) {
                    Ok(()) => {
                        println!("stopped: every task committed its last epoch and left the group");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::FAILURE
                    }
                };
            }
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
    }
}
