//! MCP tasks (the `io.modelcontextprotocol/tasks` extension, SEP-2663, as rmcp 3.9 serves it)
//! backed by Kiln runs. A `tools/call` from a client that declared the extension and that
//! outlives the call budget answers with a task instead of a run handle; the task id is the run
//! id, so there is no second state to keep: `tasks/get` reads the run's stream, its result is the
//! run's `tools/call` result, and `tasks/cancel` cancels the run with the caller recorded as the
//! actor. Tasks live as long as their runs (`ttlMs: null`).
//!
//! Not here: `tasks/update` (Kiln tools never ask the client for input mid-run), and the
//! 2025-11-25 draft of tasks (`task` in `tools/call` params, `tasks/result`, `tasks/list`), which
//! rmcp 3.9 does not parse.

use kiln_proto::RunId;
use kiln_worker::runs::{Cancelled, ExecuteError, RunView};
use rmcp::model::{
    CallToolResult, CreateTaskResult, DetailedTask, GetTaskResult, JsonObject, ServerNotification, Task, TaskPayload,
    TaskStatusNotification, TaskStatusNotificationParams,
};
use rmcp::{ErrorData as McpError, Peer, RoleServer};

use super::KilnMcp;
use crate::auth::{Principal, Scope};
use crate::runs;

/// How often a client should poll `tasks/get`.
const POLL_INTERVAL_MS: u64 = 1_000;

/// How long a session waits for a task's run to end to notify it; past that the client polls.
const TASK_WATCH_LIMIT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The task of a run, with its payload (the result once the run has ended).
pub(super) fn detailed(run: &RunView, result: Option<CallToolResult>) -> DetailedTask {
    let mut task = Task::new(
        run.run_id.to_string(),
        Default::default(),
        run.requested_at.to_rfc3339(),
        run.updated_at.to_rfc3339(),
    )
    .with_poll_interval_ms(POLL_INTERVAL_MS)
    .with_status_message(format!("run {} of tool \"{}\" is {}", run.run_id, run.tool, run.status));
    // Runs are kept for good, and so are their tasks.
    task.ttl_ms = None;
    let payload = match (run.status, result) {
        ("cancelled", _) => TaskPayload::Cancelled,
        // A failed or timed-out run is a tool error: the request itself completed.
        (_, Some(result)) if run.is_ended() => match serde_json::to_value(result) {
            Ok(serde_json::Value::Object(result)) => TaskPayload::Completed { result },
            _ => TaskPayload::Failed { error: internal_error("cannot encode the run's result") },
        },
        _ => TaskPayload::Working,
    };
    DetailedTask::new(task, payload)
}

fn internal_error(message: &str) -> JsonObject {
    let mut e = JsonObject::new();
    e.insert("code".into(), (-32603).into());
    e.insert("message".into(), message.into());
    e
}

/// The `tools/call` answer for a run still going when the budget ran out.
pub(super) fn created(run: &RunView) -> CreateTaskResult {
    CreateTaskResult::new(detailed(run, None).task)
}

impl KilnMcp {
    /// The run behind task `task_id`, if `principal` may see it: its own runs, or any with
    /// `runs:read` (which can read every run anyway).
    async fn task_run(&self, task_id: &str, principal: &Principal) -> Result<RunView, McpError> {
        let unknown = || McpError::invalid_params(format!("no task \"{task_id}\""), None);
        let run_id = task_id.parse::<RunId>().map_err(|_| unknown())?;
        let engine = self
            .services
            .engine
            .as_ref()
            .ok_or_else(|| McpError::internal_error("this server has no run engine to keep tasks", None))?;
        let run = match runs::view(engine, run_id).await {
            Ok(run) => run,
            Err(runs::RunsError::NotFound(_)) => return Err(unknown()),
            Err(e) => return Err(McpError::internal_error(format!("cannot read run {run_id}: {e}"), None)),
        };
        if run.actor != principal.actor && !principal.has(Scope::RunsRead) {
            return Err(unknown());
        }
        Ok(run)
    }

    /// `tasks/get`.
    pub(super) async fn get_task_of(&self, task_id: &str, principal: &Principal) -> Result<GetTaskResult, McpError> {
        let run = self.task_run(task_id, principal).await?;
        let result = if run.is_ended() { Some(self.run_result(&run).await) } else { None };
        Ok(GetTaskResult::new(detailed(&run, result)))
    }

    /// `tasks/cancel`: cancels the run, recording the caller as who cancelled it. Only the run's
    /// own actor (or an admin) may.
    pub(super) async fn cancel_task_of(&self, task_id: &str, principal: &Principal) -> Result<(), McpError> {
        let run = self.task_run(task_id, principal).await?;
        if run.actor != principal.actor && !principal.has(Scope::Admin) {
            return Err(McpError::invalid_request(
                format!("task \"{task_id}\" belongs to {}; only it or an admin may cancel it", run.actor),
                None,
            ));
        }
        let Some(engine) = &self.services.engine else { return Ok(()) };
        match engine.cancel(run.run_id, principal.actor.clone(), Some("tasks/cancel".to_owned())).await {
            Ok(Cancelled::Cancelled | Cancelled::AlreadyEnded(_)) => Ok(()),
            Err(ExecuteError::UnknownRun(_)) => Err(McpError::invalid_params(format!("no task \"{task_id}\""), None)),
            Err(e) => Err(McpError::internal_error(format!("cannot cancel run {}: {e}", run.run_id), None)),
        }
    }

    /// Sends `notifications/tasks` with the final state once the run ends, to a client with a
    /// session (a stateless 2026-07-28 client has no stream to receive it and polls instead).
    pub(super) fn notify_when_ended(&self, run_id: RunId, peer: Peer<RoleServer>) {
        let this = self.clone();
        tokio::spawn(async move {
            let Some(engine) = &this.services.engine else { return };
            let closed = tokio_util::sync::CancellationToken::new();
            let watch_peer = peer.clone();
            let guard = closed.clone();
            // Stop watching when the session goes away.
            let watcher = tokio::spawn(async move {
                while !watch_peer.is_transport_closed() {
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                }
                guard.cancel();
            });
            let ended = runs::wait(engine, run_id, TASK_WATCH_LIMIT, None, closed.clone()).await;
            watcher.abort();
            let Ok(run) = ended else { return };
            if !run.is_ended() {
                return;
            }
            let result = this.run_result(&run).await;
            let params = TaskStatusNotificationParams::new(detailed(&run, Some(result)));
            let note = ServerNotification::TaskStatusNotification(TaskStatusNotification::new(params));
            if let Err(e) = peer.send_notification(note).await {
                tracing::debug!(error = %e, run = %run_id, "cannot send notifications/tasks");
            }
        });
    }
}
