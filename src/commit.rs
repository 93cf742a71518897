//! The committer: its own thread with a tokio runtime (delta-rs needs one; shards never touch
//! it). For each epoch, once every shard has reported:
//!
//! 1. one synced RocksDB `WriteBatch` holds every shard's state changes, source positions,
//!    the pipeline watermark, and the epoch's output rows as *pending* — the epoch is now
//!    durable, and everything after this point can be redone from the store;
//! 2. each sink with rows gets the epoch through the epoch-sink interface
//!    ([`EpochSink`]), tagged with its application id `<pipeline>/<sink>` and the epoch
//!    number; a sink that already holds that epoch skips it;
//! 3. the pending rows are dropped;
//! 4. every sink gets the queries' watermarks of the epoch, so a view's sink learns which
//!    windows closed and forgets their keys ([`EpochSink::close_windows`]).
//!
//! Recovery runs step 2–3 for every pending epoch before new epochs start, so a crash at any
//! instant neither loses nor duplicates a row.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use flume::Receiver;

use crate::config::OutputMode;
use crate::shard::EpochReport;
use crate::sink::epoch::{EpochSink, SinkError, WriteOutcome};
use crate::sink::{SinkPlan, SinkRows};
use crate::state::{EpochWrite, StateError, StateStore};
use crate::telemetry::PipelineStats;

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("sink \"{sink}\": {source}")]
    Sink { sink: String, source: SinkError },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("sink \"{sink}\": {message}")]
    Rows { sink: String, message: String },
    #[error("pending output for epoch {epoch} names sink \"{sink}\", which this config does not have; restore the sink in the config so its rows are delivered, or start from a new state_dir")]
    UnknownPendingSink { epoch: u64, sink: String },
    #[error("sink \"{sink}\" already holds epoch {table_epoch} of {app_id}, but the state store only reached epoch {state_epoch}: the state_dir was reset while the table was kept, and new epochs would be skipped as duplicates. Restore the state_dir, or point the sink at a new path (a Kafka sink: a new topic, or delete its marker group {app_id})")]
    TableAhead {
        sink: String,
        app_id: String,
        table_epoch: u64,
        state_epoch: u64,
    },
    #[error("sink \"{sink}\" ({location}) holds epochs only up to {table_epoch}, but it confirmed holding epoch {confirmed}: the table (or topic) was deleted or restored from an older backup, and the rows in between are gone. Restore it, or start afresh: a new path (or topic) with a new state_dir")]
    TableBehind {
        sink: String,
        location: String,
        table_epoch: u64,
        confirmed: u64,
    },
    #[error("cannot start the committer's tokio runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the shards stopped before finishing epoch {0} (see the error logged before this one)")]
    ShardsGone(u64),
}

pub struct Committer {
    store: Arc<StateStore>,
    sinks: Vec<EpochSink>,
    stats: Arc<PipelineStats>,
    /// Mirrors committed positions into the Kafka consumer group, for lag monitoring with
    /// standard tools. Never read back: the positions in the state store are the truth.
    group: Option<rdkafka::consumer::BaseConsumer>,
    /// Per complete-mode sink: hash of the result last written, so an unchanged result is
    /// not rewritten every epoch.
    last_complete: Vec<Option<u64>>,
    /// The pipeline's queries, in plan order (their watermarks are stored by name).
    query_names: Vec<String>,
    /// A scaled-out task's repartition topics: what it has committed past is deleted.
    purge: Option<Purge>,
}

/// Deletes the records of repartition topics a task has committed past (nobody reads them
/// again: a task that moves resumes from the positions in its changelog).
pub struct Purge {
    admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
    topics: Vec<String>,
    next: Instant,
}

/// How often a task deletes what it has read of its repartition topics.
const PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Purge {
    pub fn new(admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>, topics: Vec<String>) -> Purge {
        Purge {
            admin,
            topics,
            next: Instant::now() + PURGE_EVERY,
        }
    }

    /// Best effort: a failure leaves the records to the topic's retention.
    async fn run(&mut self, positions: &[&crate::state::PartitionPosition]) {
        if Instant::now() < self.next {
            return;
        }
        self.next = Instant::now() + PURGE_EVERY;
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in positions.iter().filter(|p| self.topics.contains(&p.topic)) {
            if tpl.add_partition_offset(&p.topic, p.partition, rdkafka::Offset::Offset(p.next_offset)).is_err() {
                return;
            }
        }
        if tpl.count() == 0 {
            return;
        }
        let options = rdkafka::admin::AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(30)));
        match self.admin.delete_records(&tpl, &options).await {
            Ok(_) => tracing::debug!(partitions = tpl.count(), "deleted the repartition records this task has committed past"),
            Err(e) => tracing::debug!(error = %e, "could not delete consumed repartition records (the topic's retention removes them)"),
        }
    }
}

impl Committer {
    /// Opens (or creates) every sink table; an existing table with another schema is an error.
    pub async fn open(store: Arc<StateStore>, plans: Vec<SinkPlan>, stats: Arc<PipelineStats>, query_names: Vec<String>) -> Result<Self, CommitError> {
        let mut sinks = Vec::new();
        let count = plans.len();
        for p in plans {
            let name = p.name.clone();
            sinks.push(EpochSink::open(p).await.map_err(|source| CommitError::Sink { sink: name, source })?);
        }
        Ok(Committer {
            last_complete: vec![None; count],
            store,
            sinks,
            stats,
            group: None,
            query_names,
            purge: None,
        })
    }

    /// Also delete what the epochs committed past in these repartition topics (best effort).
    pub fn with_purge(mut self, purge: Purge) -> Self {
        self.purge = Some(purge);
        self
    }

    /// Also commit each epoch's source positions to this consumer's group (best effort).
    pub fn with_group_offsets(mut self, consumer: rdkafka::consumer::BaseConsumer) -> Self {
        self.group = Some(consumer);
        self
    }

    fn commit_group_offsets(&self, positions: &[&crate::state::PartitionPosition]) {
        use rdkafka::consumer::{CommitMode, Consumer};
        let Some(consumer) = &self.group else { return };
        let list: Vec<_> = positions
            .iter()
            .filter(|p| p.next_offset != crate::state::NO_OFFSET)
            .map(|p| (p.topic.clone(), p.partition, rdkafka::Offset::Offset(p.next_offset)))
            .collect();
        if list.is_empty() {
            return;
        }
        match crate::source::assignment_list(&list).and_then(|tpl| consumer.commit(&tpl, CommitMode::Async)) {
            Ok(()) => {}
            Err(e) => tracing::debug!(error = %e, "could not mirror offsets to the consumer group (lag monitoring only)"),
        }
        // Serve the commit results so they do not pile up in the client's queue.
        while consumer.poll(std::time::Duration::ZERO).is_some() {}
    }

    /// Delivers output of flushed epochs that did not reach (or were not confirmed by) a sink,
    /// and checks that no table is ahead of the state (`flushed_epoch`).
    pub async fn recover(&mut self, flushed_epoch: u64) -> Result<usize, CommitError> {
        for sink in &mut self.sinks {
            let table_epoch = sink.committed_epoch().await.map_err(|source| CommitError::Sink {
                sink: sink.plan().name.clone(),
                source,
            })?;
            let plan = sink.plan();
            if let Some(confirmed) = self.store.sink_epoch(&plan.name)?.filter(|c| table_epoch.is_none_or(|t| t < *c)) {
                return Err(CommitError::TableBehind {
                    sink: plan.name.clone(),
                    location: match &plan.config.kafka {
                        Some(k) => format!("topic \"{}\"", k.topic),
                        None => plan.path.display().to_string(),
                    },
                    table_epoch: table_epoch.unwrap_or(0),
                    confirmed,
                });
            }
            if let Some(table_epoch) = table_epoch.filter(|e| *e > flushed_epoch) {
                return Err(CommitError::TableAhead {
                    sink: plan.name.clone(),
                    app_id: plan.app_id.clone(),
                    table_epoch,
                    state_epoch: flushed_epoch,
                });
            }
        }
        let pending = self.store.pending()?;
        let n = pending.len();
        for (epoch, sink_name, bytes) in pending {
            let idx = self
                .sinks
                .iter()
                .position(|s| s.plan().name == sink_name)
                .ok_or(CommitError::UnknownPendingSink {
                    epoch,
                    sink: sink_name.clone(),
                })?;
            let rows: SinkRows = serde_json::from_slice(&bytes).map_err(|e| CommitError::Rows {
                sink: sink_name.clone(),
                message: format!("pending rows of epoch {epoch} are unreadable: {e}"),
            })?;
            let outcome = self.deliver(idx, epoch, &rows).await?;
            tracing::info!(sink = %sink_name, epoch, ?outcome, "recovered pending output");
        }
        // The flushed epoch's query watermarks (restored into the stats at start): windows they
        // closed stay closed, so a view's sink rebuilds its index for the open ones only.
        let watermarks: Vec<crate::types::EventTime> = self.stats.query_watermarks.iter().map(|w| w.load(Relaxed)).collect();
        for sink in &mut self.sinks {
            sink.close_windows(&watermarks);
        }
        Ok(n)
    }

    async fn deliver(&mut self, idx: usize, epoch: u64, rows: &SinkRows) -> Result<WriteOutcome, CommitError> {
        let sink = &mut self.sinks[idx];
        let outcome = sink.write_epoch(epoch, rows).await;
        let counters = &self.stats.sinks[idx];
        let attempts = sink.attempts();
        counters.retries.store(attempts.retries, Relaxed);
        counters.conflicts.store(attempts.conflicts, Relaxed);
        let outcome = outcome.map_err(|source| CommitError::Sink {
            sink: sink.plan().name.clone(),
            source,
        })?;
        if let WriteOutcome::Committed { .. } = outcome {
            counters.rows_written.fetch_add(rows.len() as u64, Relaxed);
            counters.commits.fetch_add(1, Relaxed);
        }
        let written = matches!(outcome, WriteOutcome::Committed { .. } | WriteOutcome::AlreadyCommitted);
        counters.indexed_keys.store(sink.indexed_keys() as u64, Relaxed);
        self.store.clear_pending(epoch, &sink.plan().name, written)?;
        sink.maintain().await;
        Ok(outcome)
    }

    /// Flushes and commits one complete epoch (a report from every shard).
    pub async fn commit_epoch(&mut self, epoch: u64, reports: Vec<EpochReport>) -> Result<(), CommitError> {
        let started = Instant::now();
        let mut outputs: Vec<Option<SinkRows>> = (0..self.sinks.len()).map(|_| None).collect();
        let mut reports = reports;
        for r in &mut reports {
            for (i, rows) in std::mem::take(&mut r.outputs).into_iter().enumerate() {
                match (rows, &mut outputs[i]) {
                    (Some(rows), Some(acc)) => acc.append(rows),
                    (Some(rows), slot) => *slot = Some(rows),
                    (None, _) => {}
                }
            }
        }
        // Sinks listed after the first of a query (or dead-letter list) get copies.
        for idx in 0..outputs.len() {
            if let Some(from) = self.sinks[idx].plan().copy_from {
                outputs[idx] = outputs[from].clone();
            }
        }
        let mut pending = Vec::new();
        for (idx, rows) in outputs.iter_mut().enumerate() {
            let plan: &SinkPlan = self.sinks[idx].plan();
            let Some(sink_rows) = rows.as_mut().filter(|r| !r.is_empty()) else { continue };
            let complete = plan.mode() == OutputMode::Complete;
            if let (true, SinkRows::Windows(r)) = (complete, &mut *sink_rows) {
                r.sort_by(|a, b| (a.window_start, &a.key).cmp(&(b.window_start, &b.key)));
            }
            let bytes = serde_json::to_vec(sink_rows).map_err(|e| CommitError::Rows {
                sink: plan.name.clone(),
                message: e.to_string(),
            })?;
            if complete {
                // A complete result identical to the one last written is not rewritten.
                let hash = Some(xxhash_rust::xxh3::xxh3_64(&bytes));
                if hash == self.last_complete[idx] {
                    *rows = None;
                    continue;
                }
                self.last_complete[idx] = hash;
            }
            pending.push((plan.name.as_str(), bytes));
        }
        let watermark = reports.iter().map(|r| r.watermark).max().unwrap_or(crate::watermark::UNKNOWN);
        let query_watermarks: Vec<crate::types::EventTime> = reports.first().map(|r| r.query_watermarks.clone()).unwrap_or_default();
        let write = EpochWrite {
            epoch,
            watermark,
            query_watermarks: self.query_names.iter().map(String::as_str).zip(query_watermarks.iter().copied()).collect(),
            changes: reports.iter().flat_map(|r| r.writes.iter().map(|(table, w)| (*table, w))).collect(),
            positions: reports.iter().flat_map(|r| r.positions.partitions.iter()).collect(),
            file_positions: reports
                .iter()
                .flat_map(|r| r.positions.files.iter().map(|(s, p)| (s.as_str(), p.clone())))
                .collect(),
            pending,
        };
        self.store.write_epoch(&write)?;
        drop(write);
        for (idx, rows) in outputs.iter().enumerate() {
            if let Some(rows) = rows.as_ref().filter(|r| !r.is_empty()) {
                self.deliver(idx, epoch, rows).await?;
            }
        }
        for (sink, counters) in self.sinks.iter_mut().zip(&self.stats.sinks) {
            sink.close_windows(&query_watermarks);
            counters.indexed_keys.store(sink.indexed_keys() as u64, Relaxed);
        }
        let positions: Vec<_> = reports.iter().flat_map(|r| r.positions.partitions.iter()).collect();
        self.commit_group_offsets(&positions);
        if let Some(purge) = &mut self.purge {
            purge.run(&positions).await;
        }
        self.stats.watermark.store(watermark, Relaxed);
        for (w, stat) in query_watermarks.iter().zip(&self.stats.query_watermarks) {
            stat.store(*w, Relaxed);
        }
        self.stats.committed_epoch.store(epoch, Relaxed);
        self.stats.record_epoch_commit(started.elapsed());
        let (committed, committed_wall) = (Instant::now(), crate::time::now_micros());
        for r in &reports {
            self.stats.record_epoch_latency(r.shard, &r.latency, committed, committed_wall);
        }
        tracing::debug!(epoch, elapsed_ms = started.elapsed().as_millis() as u64, "epoch committed");
        Ok(())
    }

    /// Collects reports until an epoch is complete, commits it; returns after the last epoch.
    pub async fn run(mut self, reports: Receiver<EpochReport>, shards: usize) -> Result<(), CommitError> {
        let mut open: BTreeMap<u64, Vec<EpochReport>> = BTreeMap::new();
        loop {
            let report = match reports.recv_async().await {
                Ok(r) => {
                    self.stats.commit_queue.store(reports.len() as u64, Relaxed);
                    r
                }
                Err(_) => return Err(CommitError::ShardsGone(open.keys().next().copied().unwrap_or(0))),
            };
            let epoch = report.epoch;
            open.entry(epoch).or_default().push(report);
            // Epochs complete in order: every shard reports epoch n before n+1.
            while let Some(entry) = open.first_entry() {
                if entry.get().len() < shards {
                    break;
                }
                let (epoch, batch) = entry.remove_entry();
                let last = batch.iter().any(|r| r.last);
                self.commit_epoch(epoch, batch).await?;
                if last {
                    return Ok(());
                }
            }
        }
    }
}
