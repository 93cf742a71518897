//! `start(config, shutdown) → RunningPipeline`: the one entry point used by `main` and by the
//! tests, so a test runs the whole pipeline exactly as the binary does.
//!
//! Start-up order is the recovery order of DESIGN.md §1: open the state store, open the sink
//! tables and deliver pending output of flushed epochs, then start the shards at the stored
//! positions. A coordinator thread issues epoch barriers every `commit_interval`, logs
//! progress, and turns a shutdown request into a final barrier.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::broker::{BrokerError, EmbeddedBroker};
use crate::commit::{CommitError, Committer};
use crate::config::{Bootstrap, Config, GeneratorFamily};
use crate::metrics::{MetricLabels, MetricsServer, MetricsSource};
use crate::plan::Plan;
use crate::shard::{run_shard, Control, ShardContext, ShardError};
use crate::sink::PlanError;
use crate::source::cdc_generator::{OrdersCdcGenerator, OrdersCdcSettings};
use crate::source::envelope::GeneratedEvent;
use crate::source::generator::{ClickGenerator, ClickGeneratorSettings, PurchaseGenerator};
use crate::source::producer::{produce_events, EventGenerator, EventProducer, ProduceSettings};
use crate::source::{assign_partitions, fetch_partition_counts, SourceError, SourceSpec};
use crate::state::{StateError, StateStore};
use crate::telemetry::{PipelineStats, StatsSnapshot};
use crate::time::format_micros;

/// Epochs issued but not yet committed before the coordinator waits for the committer.
const MAX_EPOCHS_IN_FLIGHT: u64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("embedded broker: {0}")]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error(transparent)]
    Fingerprint(#[from] crate::fingerprint::FingerprintError),
    #[error("{0}")]
    Runtime(String),
}

/// Final numbers of a run.
#[derive(Debug, Clone)]
pub struct Summary {
    pub stats: StatsSnapshot,
}

pub struct RunningPipeline {
    shutdown: Arc<AtomicBool>,
    coordinator: Option<JoinHandle<Result<Summary, DaemonError>>>,
    stats: Arc<PipelineStats>,
    bootstrap: String,
    shards: usize,
    /// Dropped (server stopped) when the pipeline has ended.
    metrics: Option<MetricsServer>,
    observed: MetricsSource,
    _broker: Option<EmbeddedBroker>,
}

impl RunningPipeline {
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None` when `[metrics] listen =
    /// "off"` or the address could not be bound.
    pub fn metrics_address(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::address)
    }

    /// What a metrics endpoint serves of this pipeline (a scaled-out process serves all its
    /// tasks' on one endpoint).
    pub fn metrics_source(&self) -> MetricsSource {
        self.observed.clone()
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Asks for a graceful stop (commit the current epoch, then exit) and waits for it.
    pub fn stop(self) -> Result<Summary, DaemonError> {
        self.shutdown.store(true, Relaxed);
        self.wait()
    }

    /// Waits until the pipeline ends: after the shutdown flag is set, or on failure.
    pub fn wait(mut self) -> Result<Summary, DaemonError> {
        let handle = self.coordinator.take().expect("waited once");
        handle
            .join()
            .map_err(|_| DaemonError::Runtime("the coordinator thread panicked (internal error)".into()))?
    }
}

/// Records the first failure and tells everyone to stop.
#[derive(Default)]
struct Failure {
    abort: Arc<AtomicBool>,
    first: Mutex<Option<DaemonError>>,
}

impl Failure {
    fn set(&self, e: DaemonError) {
        let mut first = self.first.lock().unwrap();
        if first.is_none() {
            tracing::error!(error = %e, "pipeline failed");
            *first = Some(e);
        } else {
            tracing::debug!(error = %e, "after the first failure");
        }
        self.abort.store(true, Relaxed);
    }
}

/// Starts the pipeline. Returns once recovery is done and the shards are starting.
pub fn start(config: Config, shutdown: Arc<AtomicBool>) -> Result<RunningPipeline, DaemonError> {
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let config = Arc::new(config);
    let shards = match config.pipeline.shards {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let kafka_sources = config.sources.iter().any(|s| s.files.is_none());
    // Kafka sinks on the pipeline's brokers (no bootstrap_servers of their own).
    let kafka_sink_topics: Vec<(String, i32)> = config
        .sinks
        .iter()
        .filter_map(|s| s.kafka.as_ref())
        .filter(|k| k.bootstrap_servers.is_none())
        .map(|k| (k.topic.clone(), 1))
        .collect();
    let (broker, bootstrap) = match &config.kafka.bootstrap_servers {
        // Only file sources: no broker to start (the generator needs a Kafka source anyway).
        Bootstrap::Embedded if !kafka_sources && kafka_sink_topics.is_empty() => (None, String::new()),
        Bootstrap::Embedded => {
            let topics: Vec<(String, i32)> = config
                .sources
                .iter()
                .filter(|s| s.files.is_none())
                .map(|s| (s.topic.clone(), s.partitions as i32))
                .chain(kafka_sink_topics.iter().cloned())
                .collect();
            let b = EmbeddedBroker::start(&topics)?;
            let addr = b.bootstrap_servers().to_string();
            tracing::info!(address = %addr, "embedded Kafka-protocol broker listening (any Kafka client can produce to it, e.g. kcat -P -b {addr} -t <topic>)");
            (Some(b), addr)
        }
        Bootstrap::Servers(s) => (None, s.clone()),
    };
    let counts = fetch_partition_counts(&config, &bootstrap, Duration::from_secs(15))?;
    let assignment = match config.task {
        // A task of a scaled-out pipeline reads its partition number of every source.
        Some(task) => crate::source::assign_task_partitions(&counts, shards, task.partition),
        None => assign_partitions(&counts, shards),
    };
    let file_assignment = crate::source::assign_file_sources(&config, shards);
    let plan = Arc::new(Plan::new(&config)?);
    let mut plans = plan.sinks.clone();
    for k in plans.iter_mut().filter_map(|p| p.config.kafka.as_mut()) {
        k.bootstrap_servers.get_or_insert_with(|| bootstrap.clone());
    }
    let store = Arc::new(open_store(&config, &bootstrap, shards, &plan.layout.names)?);
    let mut recovered = store.recover()?;
    recovered.query_lateness_us = crate::fingerprint::check_and_record(&config, &store, recovered.epoch)?;
    if broker.is_some() && !recovered.positions.is_empty() {
        // The embedded broker lives and dies with this process: the positions stored by the
        // previous run point into a log that no longer exists. Its data was consumed or is
        // gone with it; window state, watermark and epochs carry on.
        tracing::info!(
            partitions = recovered.positions.len(),
            "embedded broker starts empty: forgetting the previous run's source positions"
        );
        recovered.positions.clear();
    }
    let recovered = Arc::new(recovered);
    let stats = Arc::new(PipelineStats::new(shards, config.queries.len(), plans.len()));
    stats.committed_epoch.store(recovered.epoch, Relaxed);
    if let Some(wm) = recovered.watermark {
        stats.watermark.store(wm, Relaxed);
    }
    for (q, stat) in config.queries.iter().zip(&stats.query_watermarks) {
        stat.store(recovered.query_watermark(&q.name).unwrap_or(crate::watermark::UNKNOWN), Relaxed);
    }
    tracing::info!(pipeline = %config.pipeline.name, shards, epoch = recovered.epoch, state_dir = %config.pipeline.state_dir.display(), "recovering from the last flushed epoch");

    // Committer: open tables and deliver pending output before any shard starts.
    let failure = Arc::new(Failure::default());
    // Serving starts before recovery's slow part, so /healthz answers and /readyz says 503
    // while the committer delivers pending output.
    let observed = MetricsSource {
        stats: stats.clone(),
        store: store.clone(),
        labels: MetricLabels::new(&config, plans.iter().map(|p| p.name.clone()).collect()),
        failed: failure.abort.clone(),
    };
    let metrics = config.metrics.listen.and_then(|listen| MetricsServer::start(listen, observed.clone()));
    let (report_tx, report_rx) = flume::bounded(shards * 4);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), CommitError>>();
    let committer = {
        let (store, stats, failure) = (store.clone(), stats.clone(), failure.clone());
        let flushed_epoch = recovered.epoch;
        let query_names: Vec<String> = config.queries.iter().map(|q| q.name.clone()).collect();
        // A task deletes what it has committed past in the repartition topics it reads.
        let repartition_topics: Vec<String> = config.sources.iter().filter(|s| s.repartitioned.is_some()).map(|s| s.topic.clone()).collect();
        let purge = if repartition_topics.is_empty() {
            None
        } else {
            match crate::source::client_config(&config, &bootstrap).create() {
                Ok(admin) => Some(crate::commit::Purge::new(admin, repartition_topics)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot delete consumed repartition records (the topic's retention removes them)");
                    None
                }
            }
        };
        let group_client = if kafka_sources {
            crate::source::consumer_config(&config, &bootstrap)
                .create::<rdkafka::consumer::BaseConsumer>()
                .map(Some)
        } else {
            Ok(None)
        };
        std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(CommitError::Runtime(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let opened = async {
                        let mut c = Committer::open(store, plans, stats, query_names).await?;
                        match group_client {
                            Ok(Some(consumer)) => c = c.with_group_offsets(consumer),
                            Ok(None) => {}
                            Err(e) => tracing::warn!(error = %e, "no consumer-group offset mirroring (lag monitoring only)"),
                        }
                        if let Some(purge) = purge {
                            c = c.with_purge(purge);
                        }
                        c.recover(flushed_epoch).await?;
                        Ok::<_, CommitError>(c)
                    }
                    .await;
                    let c = match opened {
                        Ok(c) => {
                            let _ = ready_tx.send(Ok(()));
                            c
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    if let Err(e) = c.run(report_rx, shards).await {
                        failure.set(e.into());
                    }
                });
            })
            .map_err(|e| DaemonError::Runtime(format!("cannot spawn the committer thread: {e}")))?
    };
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = committer.join();
            return Err(e.into());
        }
        Err(_) => return Err(DaemonError::Runtime("the committer thread died during start-up (internal error)".into())),
    }

    // The mesh: one bounded FIFO per ordered pair of shards.
    let mut outbound: Vec<Vec<Option<flume::Sender<_>>>> = (0..shards).map(|_| (0..shards).map(|_| None).collect()).collect();
    let mut inbound: Vec<Vec<(usize, flume::Receiver<_>)>> = (0..shards).map(|_| Vec::new()).collect();
    for (from, row) in outbound.iter_mut().enumerate() {
        for (to, slot) in row.iter_mut().enumerate() {
            if from != to {
                let (tx, rx) = flume::bounded(config.pipeline.exchange_capacity);
                *slot = Some(tx);
                inbound[to].push((from, rx));
            }
        }
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Watches the topics for partitions added while running; it stops with the last shard.
    // (A task keeps to its partition number: a partition added later is a task of its own.)
    let partition_watch = (kafka_sources && config.task.is_none()).then(|| crate::source::kafka::PartitionWatch::start(&config, &bootstrap, &counts));
    let mut controls = Vec::new();
    let mut shard_threads = Vec::new();
    for (id, (outbound, inbound)) in outbound.into_iter().zip(inbound).enumerate() {
        let (ctl_tx, ctl_rx) = flume::unbounded();
        controls.push(ctl_tx);
        let ctx = ShardContext {
            id,
            shards,
            config: config.clone(),
            bootstrap: bootstrap.clone(),
            store: store.clone(),
            plan: plan.clone(),
            key_groups: store.key_groups(),
            recovered: recovered.clone(),
            // Every shard reads Kafka when any source does, even with no partition yet: it may
            // own partitions added while running.
            sources: std::iter::once(assignment[id].clone())
                .filter(|_| kafka_sources)
                .map(|partitions| SourceSpec::Kafka {
                    partitions,
                    watch: partition_watch.clone(),
                })
                .chain(file_assignment[id].iter().map(|&si| SourceSpec::Files(si)))
                .collect(),
            inbound,
            outbound,
            control: ctl_rx,
            reports: report_tx.clone(),
            stats: stats.clone(),
            abort: failure.abort.clone(),
        };
        let failure = failure.clone();
        // The tasks of a scaled-out pipeline share the cores with each other and other
        // processes: the scheduler places them.
        let placement = match config.task {
            Some(_) => glommio::Placement::Unbound,
            None => glommio::Placement::Fixed(id % cpus),
        };
        let builder = glommio::LocalExecutorBuilder::new(placement).name(&format!("shard-{id}")).io_memory(64 << 10);
        let handle = builder
            .spawn(move || async move {
                if let Err(e) = run_shard(ctx).await {
                    if !matches!(e, ShardError::Aborted(_)) {
                        failure.set(e.into());
                    }
                }
            })
            .map_err(|e| DaemonError::Runtime(format!("cannot start shard {id} on CPU {}: {e}", id % cpus)))?;
        shard_threads.push(handle);
    }
    drop(report_tx);
    stats.ready.store(true, Relaxed);

    let generator = match &config.generator {
        Some(g) => {
            let settings = ClickGeneratorSettings {
                seed: g.seed,
                users: g.users,
                pages: g.pages,
                disorder_ms: g.disorder.as_millis() as i64,
                late_share: g.late_share,
                late_by_ms: g.late_by.as_millis() as i64,
                malformed_share: g.malformed_share,
            };
            let topic = config.sources[g.source_index].topic.clone();
            let purchases = g
                .purchases
                .as_ref()
                .map(|p| (config.sources[p.source_index].topic.clone(), p.rate, PurchaseGenerator::new(g.seed, g.users)));
            let (rate, bootstrap, shutdown, failure) = (g.rate, bootstrap.clone(), shutdown.clone(), failure.clone());
            let family = g.family.clone();
            let handle = std::thread::Builder::new()
                .name("generator".into())
                .spawn(move || {
                    let producer = match EventProducer::connect(&bootstrap) {
                        Ok(p) => p,
                        Err(e) => return tracing::error!(error = %e, "generator cannot connect; no events will be generated"),
                    };
                    let mut generator = match &family {
                        GeneratorFamily::Click => FamilyGenerator::Click(ClickGenerator::new(settings)),
                        GeneratorFamily::Orders(o) => FamilyGenerator::Orders(OrdersCdcGenerator::new(OrdersCdcSettings {
                            seed: settings.seed,
                            orders: o.orders,
                            duplicate_share: o.duplicate_share,
                            replay_share: o.replay_share,
                            malformed_share: settings.malformed_share,
                            first_lsn: crate::time::now_micros().max(0) as u64,
                        })),
                    };
                    let stop = AtomicBool::new(false);
                    std::thread::scope(|s| {
                        s.spawn(|| {
                            while !shutdown.load(Relaxed) && !failure.abort.load(Relaxed) {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            stop.store(true, Relaxed);
                        });
                        if let Some((topic, rate, mut purchases)) = purchases {
                            let (producer, stop) = (&producer, &stop);
                            s.spawn(
                                move || match produce_events(producer, &topic, &mut purchases, &ProduceSettings::paced(rate), stop, |_| {}) {
                                    Ok(report) => tracing::info!(produced = report.produced, "purchase generator stopped"),
                                    Err(e) => tracing::error!(error = %e, "purchase generator failed"),
                                },
                            );
                        }
                        match produce_events(&producer, &topic, &mut generator, &ProduceSettings::paced(rate), &stop, |_| {}) {
                            Ok(report) => tracing::info!(produced = report.produced, "generator stopped"),
                            Err(e) => tracing::error!(error = %e, "generator failed"),
                        }
                    });
                })
                .map_err(|e| DaemonError::Runtime(format!("cannot spawn the generator thread: {e}")))?;
            Some(handle)
        }
        None => None,
    };

    let coordinator = {
        let (stats, shutdown, config) = (stats.clone(), shutdown.clone(), config.clone());
        let first_epoch = recovered.epoch + 1;
        std::thread::Builder::new()
            .name("coordinator".into())
            .spawn(move || {
                coordinate(&config, first_epoch, &controls, &stats, &shutdown, &failure);
                drop(controls);
                for h in shard_threads {
                    if h.join().is_err() {
                        failure.set(DaemonError::Runtime("a shard thread panicked (internal error)".into()));
                    }
                }
                if committer.join().is_err() {
                    failure.set(DaemonError::Runtime("the committer thread panicked (internal error)".into()));
                }
                shutdown.store(true, Relaxed);
                if let Some(g) = generator {
                    let _ = g.join();
                }
                let snapshot = stats.snapshot();
                match failure.first.lock().unwrap().take() {
                    Some(e) => Err(e),
                    None => {
                        tracing::info!(epoch = snapshot.committed_epoch, events = snapshot.events_in, "pipeline stopped cleanly");
                        Ok(Summary { stats: snapshot })
                    }
                }
            })
            .map_err(|e| DaemonError::Runtime(format!("cannot spawn the coordinator thread: {e}")))?
    };

    Ok(RunningPipeline {
        shutdown,
        coordinator: Some(coordinator),
        stats,
        bootstrap,
        shards,
        metrics,
        observed,
        _broker: broker,
    })
}

/// Opens the state store. A task of a scaled-out pipeline starts from an empty local store
/// filled from its changelog (the local copy may be stale: another process may have run the
/// task since), and mirrors every later write to it.
fn open_store(config: &Config, bootstrap: &str, shards: usize, tables: &[String]) -> Result<StateStore, DaemonError> {
    let dir = &config.pipeline.state_dir;
    let Some(task) = config.task else {
        return Ok(StateStore::open(dir, shards, tables)?);
    };
    let scale = |e: crate::changelog::ChangelogError| DaemonError::Runtime(format!("task {}: {e}", task.partition));
    // Fence the previous owner first: its open transaction is aborted before we read.
    let changelog = crate::changelog::Changelog::open(config, bootstrap, task).map_err(scale)?;
    // A standby copy this process kept of the task becomes the local store; otherwise it
    // starts empty. Either way it is a cache of the changelog, written without a write-ahead
    // log: it is never reopened after a crash (each process has a directory of its own).
    let warm = crate::changelog::take_warm(&crate::changelog::transactional_id(config, task));
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| DaemonError::Runtime(format!("cannot clear the local state copy {}: {e}", dir.display())))?;
    }
    let standby = warm.is_some();
    let started = Instant::now();
    let (mut store, records) = match warm {
        Some(warm) => {
            std::fs::rename(&warm.dir, dir)
                .map_err(|e| DaemonError::Runtime(format!("cannot move the standby copy {} to {}: {e}", warm.dir.display(), dir.display())))?;
            let store = StateStore::open(dir, shards, tables)?.cache_only();
            let records = changelog.restore_rest(warm.restorer, &store).map_err(scale)?;
            (store, records)
        }
        None => {
            let store = StateStore::open(dir, shards, tables)?.cache_only();
            let records = changelog.restore_into(config, bootstrap, &store).map_err(scale)?;
            (store, records)
        }
    };
    tracing::info!(
        task = task.partition,
        records,
        standby,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "restored the task's state from its changelog"
    );
    store.set_mirror(Box::new(changelog));
    Ok(store)
}

/// Issues barriers until shutdown (then one last barrier) or failure.
fn coordinate(config: &Config, first_epoch: u64, controls: &[flume::Sender<Control>], stats: &PipelineStats, shutdown: &AtomicBool, failure: &Failure) {
    let interval = config.pipeline.commit_interval;
    let mut epoch = first_epoch;
    let mut next_tick = Instant::now() + interval;
    let mut progress = ProgressLog::new(config.pipeline.progress_interval);
    let bytes_read = || stats.shards.iter().flat_map(|s| s.partitions()).map(|p| p.bytes.load(Relaxed)).sum::<u64>();
    let mut epoch_began_at = bytes_read();
    loop {
        // An epoch ends at its interval, or early once it has read max_epoch_bytes or a shard
        // has read its share of them (it pauses its sources; the others may have less left).
        let share_read = || stats.shards.iter().any(|s| s.read_epoch_share.load(Relaxed) == epoch);
        while Instant::now() < next_tick && !shutdown.load(Relaxed) && bytes_read() - epoch_began_at < config.pipeline.max_epoch_bytes && !share_read() {
            if failure.abort.load(Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5).min(interval));
            progress.maybe_log(stats);
        }
        while epoch - stats.committed_epoch.load(Relaxed) > MAX_EPOCHS_IN_FLIGHT {
            if failure.abort.load(Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let last = shutdown.load(Relaxed);
        for c in controls {
            if c.send(Control::Barrier { epoch, last }).is_err() {
                return; // the shard is gone; its error is recorded
            }
        }
        if last {
            tracing::info!(epoch, "shutdown requested: committing the current epoch");
            return;
        }
        epoch += 1;
        epoch_began_at = bytes_read();
        next_tick += interval;
        let now = Instant::now();
        if next_tick < now {
            next_tick = now + interval; // commits are slower than the interval: don't burst
        }
    }
}

struct ProgressLog {
    every: Duration,
    last_at: Instant,
    last_events: u64,
}

impl ProgressLog {
    fn new(every: Duration) -> Self {
        ProgressLog {
            every,
            last_at: Instant::now(),
            last_events: 0,
        }
    }

    fn maybe_log(&mut self, stats: &PipelineStats) {
        let elapsed = self.last_at.elapsed();
        if elapsed < self.every {
            return;
        }
        let s = stats.snapshot();
        let rate = (s.events_in - self.last_events) as f64 / elapsed.as_secs_f64();
        let watermark = s.watermark.map_or("none yet".to_string(), format_micros);
        tracing::info!(
            "progress: events_in={} events_per_s={:.0} watermark={} committed_epoch={} rows_written={} dead_letters={} open_keys={}",
            s.events_in,
            rate,
            watermark,
            s.committed_epoch,
            s.rows_written,
            s.dead_letters,
            s.open_keys
        );
        self.last_at = Instant::now();
        self.last_events = s.events_in;
    }
}

/// The event family a `[generator]` section produces.
enum FamilyGenerator {
    Click(ClickGenerator),
    Orders(OrdersCdcGenerator),
}

impl EventGenerator for FamilyGenerator {
    fn next_event_into(&mut self, base_time_ms: i64, event: &mut GeneratedEvent) {
        match self {
            FamilyGenerator::Click(g) => g.next_event_into(base_time_ms, event),
            FamilyGenerator::Orders(g) => g.next_event_into(base_time_ms, event),
        }
    }
}
