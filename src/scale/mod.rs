//! Scale-out: several tidemark processes run one pipeline together, with Kafka as the
//! distributed engine.
//!
//! - **Tasks.** The sources read as they are are co-partitioned (the same partition count,
//!   keyed alike); partition number `p` of every source is task `p`. A task is the whole engine
//!   ([`crate::daemon::start`]) restricted to those partitions, with its own epochs, its own
//!   application id on every sink (`<pipeline>/<sink>/task-<p>`) and its own state.
//! - **Membership.** Each process joins the consumer group `<group_id>.members` on the
//!   changelog topic (one partition per task, cooperative-sticky assignment): the partitions
//!   it is assigned are the tasks it runs. A process that leaves, dies or stalls past the
//!   session timeout loses its tasks to the others.
//! - **State follows its task.** Every epoch of a task is first committed as a Kafka
//!   transaction to its changelog partition ([`crate::changelog::Changelog`]), then to the local
//!   RocksDB, then to the sinks. A process taking a task over fences the previous owner's
//!   writer, restores the state from the changelog into an empty local store, delivers the
//!   output of the last epoch (sinks skip what they hold, by the task's application id), and
//!   reads on from the stored source positions.
//! - **Repartitioning.** A source whose messages are not keyed by what its queries keep state
//!   by is rewritten, keyed right, to a topic with one partition per task by the tasks'
//!   repartitioners ([`repartition`]), and the tasks read that topic in its place.
//! - **Zombies.** A stalled owner that wakes up cannot commit another epoch (its changelog
//!   transaction is fenced); an epoch it had committed is the same epoch the new owner
//!   delivers, and a sink holding it skips it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, TopicPartitionList};

use crate::config::{Bootstrap, Config, Repartitioned, StartingOffsets, TaskId};
use crate::daemon::{DaemonError, Summary};
use crate::metrics::{MetricsServer, TaskMetrics};
use crate::state::StateError;

pub mod repartition;
pub mod standby;

#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    #[error("Kafka failed while {what}: {source} (is the broker up and the address right?)")]
    Kafka { what: String, source: KafkaError },
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error("[scale] needs co-partitioned sources (the same number of partitions, keyed alike), but {0}; give the topics the same partition count")]
    NotCoPartitioned(String),
    #[error("topic \"{topic}\" has {found} partitions, but the pipeline has {tasks} tasks (its sources' partition count): it belongs to another pipeline shape. Delete it or point [scale] changelog_topic at a new topic (and start with new state), or give the sources {found} partitions")]
    TopicShape { topic: String, found: i32, tasks: i32 },
    #[error("{0}")]
    Runtime(String),
}

/// This process's directory under `state_dir`: processes on one machine may share the
/// pipeline file, and a task moving between them must not meet its old local copy.
fn process_dir(config: &Config) -> std::path::PathBuf {
    config.pipeline.state_dir.join(format!("process-{}", std::process::id()))
}

/// Removes the local state copies of processes of this machine that are gone (their tasks
/// restore from the changelog wherever they run next).
fn sweep_dead_processes(config: &Config) {
    let Ok(entries) = std::fs::read_dir(&config.pipeline.state_dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("process-")).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => tracing::info!(dir = %entry.path().display(), "removed the local state copy of a process that is gone"),
                Err(e) => tracing::warn!(dir = %entry.path().display(), error = %e, "cannot remove the local state copy of a process that is gone"),
            }
        }
    }
}

/// The configuration task `task` runs: only its partitions, its own state directory, one
/// shard (a process runs several tasks), no metrics endpoint of its own. A repartitioned
/// source is read from its repartition topic (`counts`: the sources' partition counts).
pub fn task_config(config: &Config, task: TaskId, counts: &[i32]) -> Config {
    let mut c = config.clone();
    c.task = Some(task);
    c.pipeline.state_dir = process_dir(config).join(format!("task-{}", task.partition));
    c.pipeline.shards = 1;
    // The epoch budget is the pipeline's, shared by its tasks: an epoch's changes travel in
    // one changelog transaction.
    c.pipeline.max_epoch_bytes = (config.pipeline.max_epoch_bytes / task.of.max(1) as u64).max(1 << 20);
    c.metrics.listen = None;
    for r in config.scale.iter().flat_map(|s| &s.repartition) {
        let source = &mut c.sources[r.source];
        source.repartitioned = Some(Repartitioned {
            topic: std::mem::replace(&mut source.topic, r.topic.clone()),
            upstream_partitions: counts[r.source],
        });
        // Everything in a repartition topic was written for the tasks: read it all.
        source.starting_offsets = StartingOffsets::Earliest;
    }
    c
}

/// The sources' partition counts, and the number of tasks: the common partition count of
/// the sources read as they are (the largest count when every source is repartitioned).
fn task_count(config: &Config, bootstrap: &str) -> Result<(i32, Vec<i32>), ScaleError> {
    let counts = crate::source::fetch_partition_counts(config, bootstrap, Duration::from_secs(15))?;
    let repartitioned = |si: usize| config.scale.iter().flat_map(|s| &s.repartition).any(|r| r.source == si);
    let direct: Vec<usize> = (0..counts.len()).filter(|&si| !repartitioned(si)).collect();
    let Some(&first) = direct.first() else {
        return Ok((counts.iter().copied().max().unwrap_or(0), counts));
    };
    if direct.iter().any(|&si| counts[si] != counts[first]) {
        let listed: Vec<String> = direct
            .iter()
            .map(|&si| format!("\"{}\" has {}", config.sources[si].topic, counts[si]))
            .collect();
        return Err(ScaleError::NotCoPartitioned(listed.join(", ")));
    }
    Ok((counts[first], counts))
}

/// Creates a topic with `partitions` partitions unless it exists with that many.
fn ensure_topic(config: &Config, bootstrap: &str, topic: &str, partitions: i32, settings: &[(&str, &str)]) -> Result<(), ScaleError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let scale = config.scale.as_ref().expect("a [scale] pipeline");
    let kafka = |what: String| move |source| ScaleError::Kafka { what, source };
    let c = crate::source::client_config(config, bootstrap);
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = c.create().map_err(kafka("creating an admin client".into()))?;
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(scale.changelog_replication));
    for (k, v) in settings {
        new = new.set(k, v);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ScaleError::Runtime(format!("cannot start a tokio runtime: {e}")))?;
    let results = rt
        .block_on(admin.create_topics([&new], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))))
        .map_err(kafka(format!("creating topic \"{topic}\"")))?;
    for r in results {
        match r {
            Ok(_) => tracing::info!(topic = %topic, partitions, "created topic"),
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(ScaleError::Kafka {
                    what: format!("creating topic \"{topic}\""),
                    source: KafkaError::AdminOp(code),
                })
            }
        }
    }
    let consumer: BaseConsumer = c.create().map_err(kafka("reading metadata".into()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(kafka(format!("reading the metadata of topic \"{topic}\"")))?;
        let found = md.topics().first().map_or(0, |t| t.partitions().len() as i32);
        if found == partitions {
            return Ok(());
        }
        if found != 0 || Instant::now() > deadline {
            return Err(ScaleError::TopicShape {
                topic: topic.to_string(),
                found,
                tasks: partitions,
            });
        }
        std::thread::sleep(Duration::from_millis(200)); // just created: metadata catches up
    }
}

/// Creates the changelog topic (compacted) and the repartition topics, one partition per
/// task each, unless they exist.
fn ensure_topics(config: &Config, bootstrap: &str, tasks: i32) -> Result<(), ScaleError> {
    let scale = config.scale.as_ref().expect("a [scale] pipeline");
    // Compaction only cleans closed segments: roll them often, so a restore reads little
    // more than the live state.
    let compacted = [("cleanup.policy", "compact"), ("segment.ms", "600000"), ("min.cleanable.dirty.ratio", "0.1")];
    ensure_topic(config, bootstrap, &scale.changelog_topic, tasks, &compacted)?;
    for r in &scale.repartition {
        ensure_topic(config, bootstrap, &r.topic, tasks, &[])?;
    }
    Ok(())
}

/// A task this process runs: the engine on its partitions, and the repartitioner of its
/// share of the repartitioned sources' partitions when there are any.
struct Task {
    shutdown: Arc<AtomicBool>,
    thread: JoinHandle<Result<Summary, DaemonError>>,
    repartitioner: Option<JoinHandle<Result<(), repartition::RepartitionError>>>,
    started: Instant,
}

impl Task {
    fn start(config: &Config, bootstrap: &str, task: TaskId, counts: &[i32], metrics: &TaskMetrics) -> Result<Task, ScaleError> {
        let shutdown = Arc::new(AtomicBool::new(false));
        let task_config = task_config(config, task, counts);
        let (flag, metrics) = (shutdown.clone(), metrics.clone());
        let spawn_error = |e: std::io::Error| ScaleError::Runtime(format!("cannot spawn a task thread: {e}"));
        let thread = std::thread::Builder::new()
            .name(format!("task-{}", task.partition))
            .spawn(move || {
                tracing::info!(task = task.partition, "starting task");
                let running = crate::daemon::start(task_config, flag)?;
                let served = || metrics.tasks.lock().unwrap_or_else(|e| e.into_inner());
                served().insert(task.partition, running.metrics_source());
                let result = running.wait();
                served().remove(&task.partition);
                result
            })
            .map_err(spawn_error)?;
        let repartitioner = match repartition::Repartitioner::plan(config, task, counts) {
            None => None,
            Some(plan) => {
                let (config, bootstrap, flag) = (config.clone(), bootstrap.to_string(), shutdown.clone());
                let handle = std::thread::Builder::new()
                    .name(format!("repartition-{}", task.partition))
                    .spawn(move || repartition::Repartitioner::run(&config, &bootstrap, plan, &flag))
                    .map_err(spawn_error)?;
                Some(handle)
            }
        };
        Ok(Task {
            shutdown,
            thread,
            repartitioner,
            started: Instant::now(),
        })
    }

    /// Whether the engine or the repartitioner has ended (on its own: an error).
    fn ended(&self) -> bool {
        self.thread.is_finished() || self.repartitioner.as_ref().is_some_and(|r| r.is_finished())
    }

    /// Commits the current epoch (and the repartitioner's current transaction) and stops.
    fn stop(self, task: i32) {
        self.shutdown.store(true, Relaxed);
        if let Some(r) = self.repartitioner {
            match r.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(task, error = %e, "repartitioner stopped with an error"),
                Err(_) => tracing::error!(task, "repartitioner thread panicked (internal error)"),
            }
        }
        match self.thread.join() {
            Ok(Ok(summary)) => tracing::info!(task, epoch = summary.stats.committed_epoch, "task stopped"),
            Ok(Err(e)) => tracing::warn!(task, error = %e, "task stopped with an error"),
            Err(_) => tracing::error!(task, "task thread panicked (internal error)"),
        }
    }
}

/// Stops tasks together: all are asked to commit their current epoch first, then each is
/// waited for.
fn stop_all(tasks: Vec<(i32, Task)>) {
    for (_, t) in &tasks {
        t.shutdown.store(true, Relaxed);
    }
    for (p, t) in tasks {
        t.stop(p);
    }
}

/// The tasks this process runs, shared by the rebalance callbacks and the member loop.
#[derive(Default)]
struct Tasks {
    running: HashMap<i32, Task>,
    /// Assigned, waiting to be started (or restarted after a failure, not before the instant).
    to_start: HashMap<i32, Instant>,
    /// Consecutive failures per task, for the restart back-off.
    failures: HashMap<i32, u32>,
    /// Standby copies of the tasks this process does not run (`[scale] standby`), and when a
    /// failed one may start again.
    standbys: HashMap<i32, standby::Standby>,
    standby_retry: HashMap<i32, Instant>,
}

struct MemberContext {
    topic: String,
    tasks: Arc<Mutex<Tasks>>,
}

impl ClientContext for MemberContext {}

fn partitions_of(topic: &str, tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().filter(|e| e.topic() == topic).map(|e| e.partition()).collect()
}

impl ConsumerContext for MemberContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // Tasks leaving this process commit their current epoch before anyone else may take
        // them (cooperative rebalancing hands them out only after this returns).
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked = partitions_of(&self.topic, tpl);
            let stopping: Vec<(i32, Task)> = {
                let mut tasks = self.tasks.lock().unwrap();
                revoked
                    .iter()
                    .filter_map(|p| {
                        tasks.to_start.remove(p);
                        tasks.running.remove(p).map(|t| (*p, t))
                    })
                    .collect()
            };
            if !revoked.is_empty() {
                tracing::info!(tasks = ?revoked, "tasks revoked");
            }
            stop_all(stopping);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // Membership only: the tasks read the changelog themselves.
            if let Err(e) = consumer.pause(tpl) {
                tracing::debug!(error = %e, "pausing the membership consumer's partitions");
            }
            let assigned = partitions_of(&self.topic, tpl);
            if !assigned.is_empty() {
                tracing::info!(tasks = ?assigned, "tasks assigned");
            }
            let mut tasks = self.tasks.lock().unwrap();
            for p in assigned {
                tasks.to_start.insert(p, Instant::now());
            }
        }
    }
}

/// Keeps a standby copy of every task this process does not run; one that failed starts
/// again after a while.
fn keep_standbys(config: &Config, bootstrap: &str, counts: &[i32], tasks_total: i32, t: &mut Tasks) {
    let failed: Vec<i32> = t.standbys.iter().filter(|(_, s)| s.ended()).map(|(p, _)| *p).collect();
    for p in failed {
        if let Some(s) = t.standbys.remove(&p) {
            s.discard(p);
        }
        t.standby_retry.insert(p, Instant::now() + Duration::from_secs(10));
    }
    for p in 0..tasks_total {
        let wanted = !t.running.contains_key(&p) && !t.to_start.contains_key(&p);
        if !wanted || t.standbys.contains_key(&p) || t.standby_retry.get(&p).is_some_and(|at| *at > Instant::now()) {
            continue;
        }
        let task = TaskId { partition: p, of: tasks_total };
        let dir = process_dir(config).join(format!("standby-{p}"));
        match standby::Standby::start(task_config(config, task, counts), bootstrap, task, dir) {
            Ok(s) => {
                t.standbys.insert(p, s);
            }
            Err(e) => {
                tracing::warn!(task = p, error = %e, "cannot keep a standby copy");
                t.standby_retry.insert(p, Instant::now() + Duration::from_secs(10));
            }
        }
    }
}

/// Runs this process's share of a `[scale]` pipeline until `shutdown` is set: joins the
/// group, runs the tasks it is given, and on shutdown commits and stops them and leaves.
pub fn run(config: Config, shutdown: Arc<AtomicBool>) -> Result<(), ScaleError> {
    let scale = config.scale.clone().expect("a [scale] pipeline");
    let bootstrap = match &config.kafka.bootstrap_servers {
        Bootstrap::Servers(s) => s.clone(),
        Bootstrap::Embedded => return Err(ScaleError::Runtime("[scale] needs [kafka] bootstrap_servers".into())),
    };
    sweep_dead_processes(&config);
    let (tasks_total, counts) = task_count(&config, &bootstrap)?;
    ensure_topics(&config, &bootstrap, tasks_total)?;
    let tasks = Arc::new(Mutex::new(Tasks::default()));
    // One endpoint for every task this process runs (each task's series carry its number).
    let metrics = TaskMetrics::default();
    let _server = config.metrics.listen.and_then(|listen| MetricsServer::start(listen, metrics.clone()));
    let context = MemberContext {
        topic: scale.changelog_topic.clone(),
        tasks: tasks.clone(),
    };
    let mut c = crate::source::client_config(&config, &bootstrap);
    let session_ms = scale.session_timeout.as_millis().to_string();
    let heartbeat_ms = (scale.session_timeout.as_millis() / 4).max(100).to_string();
    c.set("group.id", format!("{}.members", config.kafka.group_id))
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", &session_ms)
        .set("heartbeat.interval.ms", &heartbeat_ms)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer<MemberContext> = c.create_with_context(context).map_err(|source| ScaleError::Kafka {
        what: "creating the membership consumer".into(),
        source,
    })?;
    consumer.subscribe(&[&scale.changelog_topic]).map_err(|source| ScaleError::Kafka {
        what: format!("joining the group on {}", scale.changelog_topic),
        source,
    })?;
    tracing::info!(
        pipeline = %config.pipeline.name,
        tasks = tasks_total,
        group = %format!("{}.members", config.kafka.group_id),
        changelog = %scale.changelog_topic,
        "joined the pipeline's group; waiting for tasks"
    );
    let mut last_log = Instant::now();
    while !shutdown.load(Relaxed) {
        if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
            tracing::warn!(error = %e, "membership consumer");
        }
        let mut t = tasks.lock().unwrap();
        // Tasks that ended on their own (an error; e.g. fenced by a new owner): start again
        // after a back-off while this process still has them.
        let ended: Vec<i32> = t.running.iter().filter(|(_, task)| task.ended()).map(|(p, _)| *p).collect();
        for p in ended {
            let task = t.running.remove(&p).expect("listed above");
            let failures = t.failures.entry(p).or_insert(0);
            // A task that ran a while before failing starts over with a short back-off.
            if task.started.elapsed() > Duration::from_secs(60) {
                *failures = 0;
            }
            *failures += 1;
            let backoff = Duration::from_secs(1 << (*failures).min(5));
            task.stop(p);
            tracing::warn!(
                task = p,
                retry_in_s = backoff.as_secs(),
                "task ended; starting it again while this process owns it"
            );
            t.to_start.insert(p, Instant::now() + backoff);
        }
        let due: Vec<i32> = t.to_start.iter().filter(|(_, at)| **at <= Instant::now()).map(|(p, _)| *p).collect();
        for p in due {
            t.to_start.remove(&p);
            // A standby copy of the task becomes its store.
            if let Some(warm) = t.standbys.remove(&p).and_then(|s| s.finish(p)) {
                crate::changelog::offer_warm(crate::changelog::transactional_id(&config, TaskId { partition: p, of: tasks_total }), warm);
            }
            match Task::start(&config, &bootstrap, TaskId { partition: p, of: tasks_total }, &counts, &metrics) {
                Ok(task) => {
                    t.running.insert(p, task);
                }
                Err(e) => {
                    tracing::error!(task = p, error = %e, "cannot start task");
                    t.to_start.insert(p, Instant::now() + Duration::from_secs(5));
                }
            }
        }
        if scale.standby {
            keep_standbys(&config, &bootstrap, &counts, tasks_total, &mut t);
        }
        if last_log.elapsed() >= config.pipeline.progress_interval {
            let mut owned: Vec<i32> = t.running.keys().copied().collect();
            owned.sort_unstable();
            tracing::info!(tasks = ?owned, "member: running tasks");
            last_log = Instant::now();
        }
    }
    tracing::info!("shutdown requested: committing and stopping every task, then leaving the group");
    let mut t = std::mem::take(&mut *tasks.lock().unwrap());
    stop_all(t.running.drain().collect());
    let standbys: Vec<_> = t.standbys.drain().collect();
    for (p, s) in standbys {
        s.discard(p);
    }
    consumer.unsubscribe();
    // Nothing here is needed again: a task restores from its changelog wherever it runs.
    let _ = std::fs::remove_dir_all(process_dir(&config));
    Ok(())
}
