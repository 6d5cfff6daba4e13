//! Runs as the API shows them: waiting for one within a budget (forwarding its logs and
//! progress), one run's view from its stream, and waiting for the `runs` read model to catch up
//! before a query (`kiln_store::queries::runs`, shared with the CLI and `/v1/runs`).

use std::time::Duration;

use kiln_proto::RunId;
use kiln_store::{EventStore, Store, StoreError};
use kiln_worker::runs::{ExecuteError, RunEngine, RunUpdate, RunView};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What a running tool reports while the caller waits.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    Log { level: String, message: String },
    Progress { done: f64, total: Option<f64>, message: Option<String> },
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunsError {
    #[error("no run {0}")]
    NotFound(RunId),
    #[error(transparent)]
    Engine(#[from] ExecuteError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The run as its stream says now.
pub async fn view(engine: &RunEngine, run_id: RunId) -> Result<RunView, RunsError> {
    engine.view(run_id).await?.ok_or(RunsError::NotFound(run_id))
}

/// Waits up to `budget` for a run (executed by the queue's workers) to end, forwarding its
/// logs and progress to `updates`. Past the budget, or when the caller goes away, the run
/// carries on and its current view is returned.
pub async fn wait(
    engine: &RunEngine,
    run_id: RunId,
    budget: Duration,
    updates: Option<mpsc::Sender<Update>>,
    cancel: CancellationToken,
) -> Result<RunView, RunsError> {
    let mut watch = engine.watch(run_id).await?;
    let deadline = tokio::time::Instant::now() + budget;
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => break,
            next = watch.next() => next,
        };
        let update = match next {
            Some(RunUpdate::Ended(view)) => return Ok(*view),
            None => break,
            Some(RunUpdate::Log { level, message, .. }) => Update::Log { level, message },
            Some(RunUpdate::Progress { progress, total, message }) => {
                Update::Progress { done: progress, total, message }
            }
        };
        if let Some(tx) = &updates {
            // A slow client loses updates rather than slowing the run's watcher.
            let _ = tx.try_send(update);
        }
    }
    view(engine, run_id).await
}

/// Read-your-writes for the read models: waits (up to two seconds) until the `runs` projection
/// has applied what was committed before this call. A stalled projection shows in /readyz; the
/// answer is then as of its checkpoint.
pub async fn caught_up(store: &Store) -> Result<(), StoreError> {
    let head = store.head().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while kiln_store::projection::checkpoint(store, "runs").await? < head && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
