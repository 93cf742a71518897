//! The committer: its own thread with a tokio runtime (delta-rs needs one; shards never touch
//! it). For each epoch, once every shard has reported:
//!
//! 1. one synced RocksDB `WriteBatch` holds every shard's state changes, source positions,
//!    the pipeline watermark, and the epoch's output rows as *pending* — the epoch is now
//!    durable, and everything after this point can be redone from the store;
//! 2. each sink with rows gets one Delta commit tagged `txn(appId = <pipeline>/<sink>,
//!    version = epoch)`; a sink whose table already holds that version skips it;
//! 3. the pending rows are dropped.
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
use crate::sink::delta::{AppendOutcome, DeltaSinkError, DeltaTableSink, TableOptions};
use crate::sink::{to_record_batch, SinkPlan, SinkRows};
use crate::state::{EpochWrite, StateError, StateStore};
use crate::telemetry::PipelineStats;

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("sink \"{sink}\": {source}")]
    Sink { sink: String, source: DeltaSinkError },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("sink \"{sink}\": {message}")]
    Rows { sink: String, message: String },
    #[error("pending output for epoch {epoch} names sink \"{sink}\", which this config does not have; restore the sink in the config so its rows are delivered, or start from a new state_dir")]
    UnknownPendingSink { epoch: u64, sink: String },
    #[error("sink \"{sink}\" already holds epoch {table_epoch} of {app_id}, but the state store only reached epoch {state_epoch}: the state_dir was reset while the table was kept, and new epochs would be skipped as duplicates. Restore the state_dir, or point the sink at a new path")]
    TableAhead {
        sink: String,
        app_id: String,
        table_epoch: u64,
        state_epoch: u64,
    },
    #[error("cannot start the committer's tokio runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the shards stopped before finishing epoch {0} (see the error logged before this one)")]
    ShardsGone(u64),
}

pub struct Committer {
    store: Arc<StateStore>,
    plans: Vec<SinkPlan>,
    sinks: Vec<DeltaTableSink>,
    stats: Arc<PipelineStats>,
    /// Mirrors committed positions into the Kafka consumer group, for lag monitoring with
    /// standard tools. Never read back: the positions in the state store are the truth.
    group: Option<rdkafka::consumer::BaseConsumer>,
    /// Per sink: commits since the last compaction.
    since_compaction: Vec<u64>,
    /// Per complete-mode sink: hash of the result last written, so an unchanged result is
    /// not rewritten every epoch.
    last_complete: Vec<Option<u64>>,
}

/// The table options a sink's config asks for.
pub fn table_options(plan: &SinkPlan) -> TableOptions {
    TableOptions {
        partition_by: plan.config.partition_by.clone(),
        target_file_size_bytes: plan.config.target_file_size_bytes,
        checkpoint_interval: plan.config.checkpoint_interval,
    }
}

impl Committer {
    /// Opens (or creates) every sink table; an existing table with another schema is an error.
    pub async fn open(store: Arc<StateStore>, plans: Vec<SinkPlan>, stats: Arc<PipelineStats>) -> Result<Self, CommitError> {
        let mut sinks = Vec::new();
        for p in &plans {
            let sink = DeltaTableSink::open_or_create(&p.path, p.schema.clone(), &table_options(p))
                .await
                .map_err(|source| CommitError::Sink { sink: p.name.clone(), source })?;
            sinks.push(sink);
        }
        Ok(Committer {
            since_compaction: vec![0; plans.len()],
            last_complete: vec![None; plans.len()],
            store,
            plans,
            sinks,
            stats,
            group: None,
        })
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
        for (plan, sink) in self.plans.iter().zip(&mut self.sinks) {
            let table_epoch = sink.committed_epoch(&plan.app_id).await.map_err(|source| CommitError::Sink {
                sink: plan.name.clone(),
                source,
            })?;
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
            let idx = self.plans.iter().position(|p| p.name == sink_name).ok_or(CommitError::UnknownPendingSink {
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
        Ok(n)
    }

    async fn deliver(&mut self, idx: usize, epoch: u64, rows: &SinkRows) -> Result<AppendOutcome, CommitError> {
        let plan = &self.plans[idx];
        let sink_err = |source| CommitError::Sink {
            sink: plan.name.clone(),
            source,
        };
        let batch = |rows: &SinkRows| {
            to_record_batch(plan, rows).map_err(|message| CommitError::Rows {
                sink: plan.name.clone(),
                message,
            })
        };
        let sink = &mut self.sinks[idx];
        let outcome = match (plan.mode(), rows) {
            (OutputMode::Update, SinkRows::Windows(all)) => {
                let (retracts, upserts): (Vec<_>, Vec<_>) = all.iter().cloned().partition(|r| r.retract);
                let keys = match &plan.role {
                    crate::sink::SinkRole::Windows { merge_keys, .. } => merge_keys.clone(),
                    crate::sink::SinkRole::DeadLetters => Vec::new(),
                };
                let upserts = batch(&SinkRows::Windows(upserts))?;
                let deletes = batch(&SinkRows::Windows(retracts))?;
                sink.upsert_epoch(&plan.app_id, epoch, &keys, vec![upserts], vec![deletes]).await
            }
            (OutputMode::Complete, _) => sink.overwrite_epoch(&plan.app_id, epoch, vec![batch(rows)?]).await,
            _ => sink.append_epoch(&plan.app_id, epoch, vec![batch(rows)?]).await,
        };
        let counters = &self.stats.sinks[idx];
        let attempts = self.sinks[idx].attempts();
        counters.retries.store(attempts.retries, Relaxed);
        counters.conflicts.store(attempts.conflicts, Relaxed);
        let outcome = outcome.map_err(sink_err)?;
        if let AppendOutcome::Committed { .. } = outcome {
            counters.rows_written.fetch_add(rows.len() as u64, Relaxed);
            counters.commits.fetch_add(1, Relaxed);
            self.since_compaction[idx] += 1;
        }
        self.store.clear_pending(epoch, &plan.name)?;
        self.maintain(idx).await;
        Ok(outcome)
    }

    /// Compaction (and vacuum after it) every `compact_every` commits of a sink. Table
    /// maintenance never fails the pipeline: the data is committed already; a failure is logged
    /// and retried at the next interval.
    async fn maintain(&mut self, idx: usize) {
        let config = &self.plans[idx].config;
        if config.compact_every == 0 || self.since_compaction[idx] < config.compact_every {
            return;
        }
        self.since_compaction[idx] = 0;
        let sink = &mut self.sinks[idx];
        match sink.compact(config.compact_min_files).await {
            Ok(Some(report)) => tracing::info!(sink = %config.name, ?report, "compacted small files"),
            Ok(None) => {}
            Err(e) => tracing::warn!(sink = %config.name, error = %e, "compaction failed; the table is unchanged and compaction is retried later"),
        }
        if let Some(retention) = config.vacuum_retention {
            match sink.vacuum(retention).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(sink = %config.name, files = n, "vacuumed unreferenced data files"),
                Err(e) => tracing::warn!(sink = %config.name, error = %e, "vacuum failed; retried after the next compaction"),
            }
        }
    }

    /// Flushes and commits one complete epoch (a report from every shard).
    pub async fn commit_epoch(&mut self, epoch: u64, reports: Vec<EpochReport>) -> Result<(), CommitError> {
        let started = Instant::now();
        let mut outputs: Vec<Option<SinkRows>> = (0..self.plans.len()).map(|_| None).collect();
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
        let mut pending = Vec::new();
        for (idx, rows) in outputs.iter_mut().enumerate() {
            let plan = &self.plans[idx];
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
        let write = EpochWrite {
            epoch,
            watermark,
            changes: reports
                .iter()
                .flat_map(|r| r.changes.iter().enumerate().map(move |(q, c)| (r.shard, q, c)))
                .collect(),
            positions: reports.iter().flat_map(|r| r.positions.iter()).collect(),
            file_positions: reports
                .iter()
                .flat_map(|r| r.file_positions.iter().map(|(s, p)| (s.as_str(), p.clone())))
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
        self.commit_group_offsets(&reports.iter().flat_map(|r| r.positions.iter()).collect::<Vec<_>>());
        self.stats.watermark.store(watermark, Relaxed);
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
