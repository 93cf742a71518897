//! Standby copies (`[scale] standby = true`): a process keeps a local store of each task it
//! does not run, filled from the task's changelog partition as the owner commits epochs
//! (read-committed). When the task moves to this process, the copy becomes the task's store
//! and only the records written since are read ([`crate::changelog::Changelog::restore_rest`]),
//! instead of the whole partition.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::changelog::{ChangelogError, Restorer, Warm};
use crate::config::{Config, TaskId};
use crate::state::StateStore;

/// A standby copy being kept up to date by a thread of its own.
pub struct Standby {
    shutdown: Arc<AtomicBool>,
    thread: JoinHandle<Result<Warm, ChangelogError>>,
}

impl Standby {
    /// Starts a copy of task `task` from the beginning of its changelog partition, in
    /// `dir` (emptied first).
    pub fn start(task_config: Config, bootstrap: &str, task: TaskId, dir: PathBuf) -> Result<Standby, super::ScaleError> {
        let shutdown = Arc::new(AtomicBool::new(false));
        let (flag, bootstrap) = (shutdown.clone(), bootstrap.to_string());
        let thread = std::thread::Builder::new()
            .name(format!("standby-{}", task.partition))
            .spawn(move || keep(&task_config, &bootstrap, task, dir, &flag))
            .map_err(|e| super::ScaleError::Runtime(format!("cannot spawn a standby thread: {e}")))?;
        Ok(Standby { shutdown, thread })
    }

    /// Whether it stopped on its own (an error).
    pub fn ended(&self) -> bool {
        self.thread.is_finished()
    }

    /// Stops keeping the copy and returns it (closed), or `None` when it failed.
    pub fn finish(self, task: i32) -> Option<Warm> {
        self.shutdown.store(true, Relaxed);
        match self.thread.join() {
            Ok(Ok(warm)) => Some(warm),
            Ok(Err(e)) => {
                tracing::warn!(task, error = %e, "standby copy failed; the task restores from its changelog");
                None
            }
            Err(_) => {
                tracing::error!(task, "standby thread panicked (internal error)");
                None
            }
        }
    }

    /// Stops keeping the copy and removes it.
    pub fn discard(self, task: i32) {
        if let Some(warm) = self.finish(task) {
            let _ = std::fs::remove_dir_all(&warm.dir);
        }
    }
}

fn keep(config: &Config, bootstrap: &str, task: TaskId, dir: PathBuf, shutdown: &AtomicBool) -> Result<Warm, ChangelogError> {
    let scale = config.scale.as_ref().expect("a [scale] pipeline");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| ChangelogError::Invalid(format!("cannot clear the standby copy {}: {e}", dir.display())))?;
    }
    let plan = crate::plan::Plan::new(config).map_err(|e| ChangelogError::Invalid(format!("standby copy of task {}: {e}", task.partition)))?;
    let store = StateStore::open(&dir, config.pipeline.shards.max(1), &plan.layout.names)?.cache_only();
    let mut restorer = Restorer::start(config, bootstrap, &scale.changelog_topic, task.partition)?;
    tracing::info!(task = task.partition, "keeping a standby copy of the task");
    while !shutdown.load(Relaxed) {
        restorer.poll_into(&store, Duration::from_millis(200))?;
    }
    restorer.flush(&store)?;
    // The task that takes it over opens the files: what is in memory goes to them first.
    store.persist()?;
    drop(store);
    Ok(Warm { dir, restorer })
}
