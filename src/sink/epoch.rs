//! The one interface the committer writes through. An epoch sink takes numbered epochs of
//! rows, says which epoch it already holds, and skips an epoch it has (Delta: the
//! `txn(appId, epoch)` action), so a replay after a crash writes nothing twice. How the rows
//! change the table — append, upsert on the window and group keys, or replace — follows the
//! sink's plan; table maintenance runs between epochs. After each epoch the committer hands
//! every sink the queries' watermarks ([`EpochSink::close_windows`]): a view's sink learns
//! which windows closed, so it stops tracking their rows. Dispatch is by enum on the sink kind:
//! a Delta table, or a Kafka topic written in transactions ([`super::kafka`]).

use super::delta::{AppendOutcome, DeltaSinkError, DeltaTableSink, TableOptions, WindowColumns, WriteAttempts};
use super::kafka::{KafkaEpochSink, KafkaSinkError};
use super::{to_record_batch, SinkPlan, SinkRole, SinkRows};
use crate::config::OutputMode;
use crate::types::EventTime;

/// What writing an epoch did.
pub type WriteOutcome = AppendOutcome;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Delta(#[from] DeltaSinkError),
    #[error(transparent)]
    Kafka(#[from] KafkaSinkError),
    /// Internal: rows that do not fit the sink's columns.
    #[error("{0}")]
    Rows(String),
}

/// A sink of numbered epochs.
pub enum EpochSink {
    Delta(Box<DeltaEpochSink>),
    Kafka(Box<KafkaEpochSink>),
}

/// A Delta table written one commit per epoch.
pub struct DeltaEpochSink {
    plan: SinkPlan,
    /// This process is the table's only writer while it holds this.
    _lock: Option<super::durable::TableLock>,
    table: DeltaTableSink,
    /// Commits since the last compaction.
    since_compaction: u64,
}

/// The table options a sink's config asks for.
pub fn table_options(plan: &SinkPlan) -> TableOptions {
    TableOptions {
        partition_by: plan.config.partition_by.clone(),
        target_file_size_bytes: plan.config.target_file_size_bytes,
        checkpoint_interval: plan.config.checkpoint_interval,
        log_retention: Some(plan.config.log_retention),
        window_columns: window_columns(plan),
    }
}

/// An update-mode view of windows that close: the columns of each row's window start and end.
/// Global windows without reset never close; rows of other queries carry no window.
fn window_columns(plan: &SinkPlan) -> Option<WindowColumns> {
    match &plan.role {
        SinkRole::Windows {
            mode: OutputMode::Update,
            window_columns,
            ..
        } => match window_columns.as_slice() {
            [start, end, ..] => Some(WindowColumns {
                start: start.to_string(),
                end: end.to_string(),
            }),
            _ => None,
        },
        _ => None,
    }
}

impl EpochSink {
    /// Opens (or creates) the sink's table; an existing table with other columns is an error.
    pub async fn open(plan: SinkPlan) -> Result<EpochSink, SinkError> {
        if plan.config.kind == crate::config::SinkKind::Kafka {
            return Ok(EpochSink::Kafka(Box::new(KafkaEpochSink::open(plan)?)));
        }
        let lock = match plan.lock_table {
            true => Some(super::durable::TableLock::acquire(&plan.path, &format!("pipeline/sink {}", plan.app_id)).map_err(DeltaSinkError::from)?),
            false => None,
        };
        let table = DeltaTableSink::open_or_create(&plan.path, plan.schema.clone(), &table_options(&plan)).await?;
        Ok(EpochSink::Delta(Box::new(DeltaEpochSink {
            _lock: lock,
            plan,
            table,
            since_compaction: 0,
        })))
    }

    pub fn plan(&self) -> &SinkPlan {
        match self {
            EpochSink::Delta(d) => &d.plan,
            EpochSink::Kafka(k) => k.plan(),
        }
    }

    /// The last epoch the sink holds for its application id, if any.
    pub async fn committed_epoch(&mut self) -> Result<Option<u64>, SinkError> {
        match self {
            EpochSink::Delta(d) => Ok(d.table.committed_epoch(&d.plan.app_id).await?),
            EpochSink::Kafka(k) => Ok(k.committed_epoch()),
        }
    }

    /// Writes one epoch's rows (skipped when the sink already holds the epoch).
    pub async fn write_epoch(&mut self, epoch: u64, rows: &SinkRows) -> Result<WriteOutcome, SinkError> {
        match self {
            EpochSink::Delta(d) => d.write_epoch(epoch, rows).await,
            EpochSink::Kafka(k) => Ok(k.write_epoch(epoch, rows)?),
        }
    }

    /// After an epoch: the queries' watermarks as of that epoch (by query index). A view's sink
    /// takes the windows its query closed (end + allowed lateness ≤ the query's watermark) as
    /// final: their keys leave its upsert index.
    pub fn close_windows(&mut self, query_watermarks: &[EventTime]) {
        let EpochSink::Delta(d) = self else { return };
        if let SinkRole::Windows {
            query, allowed_lateness_us, ..
        } = &d.plan.role
        {
            if let Some(&watermark) = query_watermarks.get(*query).filter(|w| **w > EventTime::MIN / 2) {
                d.table.close_windows_through(watermark.saturating_sub(*allowed_lateness_us));
            }
        }
    }

    /// Keys the sink's upsert index holds (0 for other sinks), for the metrics.
    pub fn indexed_keys(&self) -> usize {
        match self {
            EpochSink::Delta(d) => d.table.indexed_keys(),
            EpochSink::Kafka(_) => 0,
        }
    }

    /// Failed attempts so far (retries and commit conflicts), for the metrics.
    pub fn attempts(&self) -> WriteAttempts {
        match self {
            EpochSink::Delta(d) => d.table.attempts(),
            EpochSink::Kafka(k) => k.attempts(),
        }
    }

    /// Between epochs: compaction (and vacuum after it) every `compact_every` commits. Never
    /// fails the pipeline: the data is committed already; a failure is logged and retried at
    /// the next interval.
    pub async fn maintain(&mut self) {
        match self {
            EpochSink::Delta(d) => d.maintain().await,
            EpochSink::Kafka(_) => {}
        }
    }
}

impl DeltaEpochSink {
    async fn write_epoch(&mut self, epoch: u64, rows: &SinkRows) -> Result<WriteOutcome, SinkError> {
        let plan = &self.plan;
        let batch = |rows: &SinkRows| to_record_batch(plan, rows).map_err(|message| SinkError::Rows(format!("sink \"{}\": {message}", plan.name)));
        let table = &mut self.table;
        let outcome = match (plan.mode(), rows, &plan.role) {
            (OutputMode::Update, SinkRows::Windows(all), SinkRole::Windows { merge_keys, .. }) => {
                let (retracts, upserts): (Vec<_>, Vec<_>) = all.iter().cloned().partition(|r| r.retract);
                let upserts = batch(&SinkRows::Windows(upserts))?;
                let deletes = batch(&SinkRows::Windows(retracts))?;
                table.upsert_epoch(&plan.app_id, epoch, merge_keys, vec![upserts], vec![deletes]).await?
            }
            (OutputMode::Complete, _, _) => table.overwrite_epoch(&plan.app_id, epoch, vec![batch(rows)?]).await?,
            _ => table.append_epoch(&plan.app_id, epoch, vec![batch(rows)?]).await?,
        };
        if let AppendOutcome::Committed { .. } = outcome {
            self.since_compaction += 1;
        }
        Ok(outcome)
    }

    async fn maintain(&mut self) {
        let config = &self.plan.config;
        if config.compact_every == 0 || self.since_compaction < config.compact_every {
            return;
        }
        self.since_compaction = 0;
        match self.table.compact(config.compact_min_files).await {
            Ok(Some(report)) => tracing::info!(sink = %config.name, ?report, "compacted small files"),
            Ok(None) => {}
            Err(e) => tracing::warn!(sink = %config.name, error = %e, "compaction failed; the table is unchanged and compaction is retried later"),
        }
        if let Some(retention) = config.vacuum_retention {
            match self.table.vacuum(retention).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(sink = %config.name, files = n, "vacuumed unreferenced data files"),
                Err(e) => tracing::warn!(sink = %config.name, error = %e, "vacuum failed; retried after the next compaction"),
            }
        }
    }
}
