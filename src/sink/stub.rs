//! TEMPORARY: stand-ins until the Delta table operations land (branch delta-ops).
use std::time::Duration;

use deltalake::arrow::array::RecordBatch;
use deltalake::arrow::datatypes::SchemaRef;

use super::delta::{AppendOutcome, DeltaTableSink, SinkResult};

#[derive(Debug, Clone, Default)]
pub struct TableOptions {
    pub partition_by: Vec<String>,
    pub target_file_size_bytes: u64,
    pub checkpoint_interval: u64,
}

impl DeltaTableSink {
    pub async fn open_with(path: &std::path::Path, schema: SchemaRef, _o: &TableOptions) -> SinkResult<Self> {
        Self::open_or_create(path, schema).await
    }
    pub async fn upsert_epoch(&mut self, app_id: &str, epoch: u64, _k: &[String], up: Vec<RecordBatch>, _d: Vec<RecordBatch>) -> SinkResult<AppendOutcome> {
        self.append_epoch(app_id, epoch, up).await
    }
    pub async fn overwrite_epoch(&mut self, app_id: &str, epoch: u64, b: Vec<RecordBatch>) -> SinkResult<AppendOutcome> {
        self.append_epoch(app_id, epoch, b).await
    }
    pub async fn compact(&mut self, _m: usize) -> SinkResult<Option<()>> {
        Ok(None)
    }
    pub async fn vacuum(&mut self, _r: Duration) -> SinkResult<usize> {
        Ok(0)
    }
}
