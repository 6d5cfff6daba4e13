//! Runs as the API shows them: starting one and waiting for it within a budget (forwarding its
//! logs and progress), one run's view from its stream, and listing from the `runs` projection.

use std::time::Duration;

use kiln_proto::run::RunState;
use kiln_proto::{RunId, StreamId, ToolName};
use kiln_store::{Store, StoreError};
use kiln_worker::runs::RunEngine;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::catalog::read_stream;

/// What a running tool reports while the caller waits.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    Log { level: String, message: String },
    Progress { done: f64, total: Option<f64>, message: Option<String> },
}

/// A run as clients see it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunView {
    pub run_id: RunId,
    pub tool: ToolName,
    pub tool_version: u32,
    pub status: String,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<kiln_proto::events::RunError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_run: Option<RunId>,
}

impl RunView {
    pub fn ended(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed" | "cancelled" | "timed_out")
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunsError {
    #[error("no run {0}")]
    NotFound(RunId),
    #[error("invalid run stream: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The run as its stream says now.
pub async fn view(store: &Store, run_id: RunId) -> Result<RunView, RunsError> {
    let events = read_stream(store, &StreamId::run(run_id)).await?;
    let decoded = events
        .iter()
        .map(|e| e.decode().map(|d| (e.stream_version, d)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| RunsError::Corrupt(e.to_string()))?;
    let state = RunState::fold(decoded.iter().map(|(v, d)| (*v, d)))
        .map_err(|e| RunsError::Corrupt(e.to_string()))?
        .ok_or(RunsError::NotFound(run_id))?;
    Ok(RunView {
        run_id,
        tool: state.request.tool.clone(),
        tool_version: state.request.tool_version,
        status: state.status.name().to_owned(),
        attempts: state.attempts,
        output: state.output.clone(),
        error: state.error.clone(),
        parent_run: state.request.parent_run,
    })
}

/// Executes `run_id` (here, until the durable queue's workers do it) and waits up to `budget`
/// for it to end. Past the budget the run carries on in the background and its current view is
/// returned.
pub async fn wait(
    engine: &RunEngine,
    run_id: RunId,
    budget: Duration,
    _updates: Option<mpsc::Sender<Update>>,
    cancel: CancellationToken,
) -> Result<RunView, RunsError> {
    let executor = engine.clone();
    let stop = CancellationToken::new();
    let task = tokio::spawn(async move {
        loop {
            match executor.execute(run_id, stop.clone()).await {
                Ok(kiln_worker::runs::AttemptOutcome::Finished(_)) | Err(_) => return,
                Ok(
                    kiln_worker::runs::AttemptOutcome::RetryAt(at)
                    | kiln_worker::runs::AttemptOutcome::Leased { until: at },
                ) => {
                    let wait = (at - chrono::Utc::now()).to_std().unwrap_or_default();
                    tokio::time::sleep(wait).await;
                }
                Ok(_) => return,
            }
        }
    });
    tokio::select! {
        _ = tokio::time::timeout(budget, task) => {}
        _ = cancel.cancelled() => {}
    }
    view(engine.store(), run_id).await
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
