//! Runs as the API shows them: starting one and waiting for it within a budget (forwarding its
//! logs and progress), one run's view from its stream, and listing from the `runs` projection.

use std::time::Duration;

use kiln_proto::{RunId, ToolName};
use kiln_store::{EventStore, Store, StoreError};
use kiln_worker::runs::{ExecuteError, RunEngine, RunUpdate, RunView};
use serde_json::{Value, json};
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

/// Filters of `run_list`.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub tool: Option<ToolName>,
    pub status: Option<String>,
    pub limit: usize,
    /// The last run id of the previous page.
    pub cursor: Option<RunId>,
}

pub const STATUSES: &[&str] =
    &["queued", "running", "retry_scheduled", "succeeded", "failed", "cancelled", "timed_out"];

/// A page of runs from the projection, newest first (run ids are time-ordered UUIDv7).
pub async fn list(store: &Store, q: &ListQuery) -> Result<(Vec<Value>, Option<String>), RunsError> {
    // Read-your-writes: let the projection catch up with what was committed before this call
    // (bounded; a stalled projection shows in /readyz and the list is then as of its checkpoint).
    let head = store.head().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while kiln_store::projection::checkpoint(store, "runs").await? < head && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The store runs raw SQL only for text rows; every inlined value is validated: tool names
    // are [A-Za-z0-9._-], statuses come from a fixed list, the cursor is a parsed UUID.
    let mut filters = Vec::new();
    if let Some(t) = &q.tool {
        filters.push(format!("tool = '{}'", t.as_str()));
    }
    if let Some(s) = q.status.as_deref().filter(|s| STATUSES.contains(s)) {
        filters.push(format!("status = '{s}'"));
    }
    if let Some(c) = q.cursor {
        filters.push(format!("run_id < '{c}'"));
    }
    let filter = if filters.is_empty() { String::new() } else { format!(" WHERE {}", filters.join(" AND ")) };
    let limit = q.limit.clamp(1, 500);
    let sql = format!(
        "SELECT run_id, tool, CAST(tool_version AS TEXT), status, CAST(attempts AS TEXT), actor, parent_run,
            requested_at, started_at, finished_at, error
         FROM runs{filter} ORDER BY run_id DESC LIMIT {}",
        limit + 1
    );
    let mut tx = store.begin_read().await?;
    let rows = tx.fetch_text_rows(&sql).await?;
    tx.rollback().await?;
    let more = rows.len() > limit;
    let runs: Vec<Value> = rows
        .into_iter()
        .take(limit)
        .map(|r| {
            let c = |i: usize| r.get(i).cloned().flatten();
            let num = |i: usize| c(i).and_then(|v| v.parse::<u64>().ok());
            json!({
                "runId": c(0), "tool": c(1), "toolVersion": num(2), "status": c(3), "attempts": num(4),
                "actor": c(5), "parentRun": c(6), "requestedAt": c(7), "startedAt": c(8), "finishedAt": c(9),
                "error": c(10).and_then(|e| serde_json::from_str::<Value>(&e).ok()),
            })
        })
        .collect();
    let next = if more { runs.last().and_then(|r| r["runId"].as_str()).map(str::to_owned) } else { None };
    Ok((runs, next))
}
