//! Calling a runtime tool: request a durable run (arguments checked against the inputSchema),
//! wait for it within the budget while forwarding its progress and logs as MCP notifications,
//! and turn the outcome into a `tools/call` result.

use kiln_proto::ToolName;
use kiln_worker::runs::{RequestError, RunRequest, RunView};
use rmcp::RoleServer;
use rmcp::model::{
    CallToolResponse, CallToolResult, LoggingLevel, LoggingMessageNotificationParam, ProgressNotificationParam,
};
use rmcp::service::RequestContext;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{KilnMcp, result, tasks};
use crate::auth::Principal;
use crate::runs::{self, Update};

/// One call of a runtime tool.
#[derive(Debug, Clone)]
pub struct Call {
    pub tool: String,
    pub arguments: Value,
    pub version: Option<u32>,
    pub idempotency_key: Option<String>,
}

impl KilnMcp {
    /// Runs a tool for `principal` and answers as `tools/call` does. Every failure the caller can
    /// fix is a tool error (`isError: true`) saying what was wrong. With `as_task` (the client
    /// declared the tasks extension), a run still going when the budget runs out is answered
    /// with a task instead of a run handle.
    pub(super) async fn run_tool_or_task(
        &self,
        call: Call,
        principal: &Principal,
        context: &RequestContext<RoleServer>,
        as_task: bool,
    ) -> CallToolResponse {
        let Some(engine) = &self.services.engine else {
            return result::error("unavailable", "this server has no sandbox to run tools", Value::Null).into();
        };
        let tool = match ToolName::parse(call.tool.as_str()) {
            Ok(t) => t,
            Err(e) => return result::error("invalid_name", &e.to_string(), Value::Null).into(),
        };
        if !call.arguments.is_object() {
            return result::error("invalid_arguments", "arguments must be a JSON object", Value::Null).into();
        }
        let request = RunRequest {
            tool: tool.clone(),
            version: call.version,
            arguments: call.arguments,
            idempotency_key: call.idempotency_key,
            parent_run: None,
            replay_of: None,
            reuse_steps: false,
            actor: principal.actor.clone(),
            traceparent: None,
        };
        let requested = match engine.request(request).await {
            Ok(r) => r,
            Err(e) => return request_error(&e).into(),
        };
        let updates = self.forward_updates(context);
        let view =
            match runs::wait(engine, requested.run_id, self.services.call_budget, updates, context.ct.clone()).await {
                Ok(v) => v,
                Err(e) => {
                    let message = format!("cannot read run {}: {e}", requested.run_id);
                    return result::error("internal", &message, Value::Null).into();
                }
            };
        if as_task && !view.is_ended() {
            if context.peer.peer_info().is_some() {
                self.notify_when_ended(view.run_id, context.peer.clone());
            }
            return CallToolResponse::Task(tasks::created(&view));
        }
        self.run_result(&view).await.into()
    }

    /// A run as a `tools/call` result, its output checked against the `outputSchema` of the
    /// tool version that ran: from the live catalog when that is the current version (the usual
    /// case), else from the tool's stream.
    pub(super) async fn run_result(&self, view: &RunView) -> CallToolResult {
        let live = self.services.live.get(view.tool.as_str()).filter(|t| t.version == view.tool_version);
        let schema =
            match live.and_then(|t| t.definition) {
                Some(d) => d.output_schema.clone(),
                None => {
                    self.services.catalog.state(&view.tool).await.ok().flatten().and_then(|s| {
                        s.versions.get(&view.tool_version).and_then(|v| v.definition.output_schema.clone())
                    })
                }
            };
        result::from_run(view, schema.as_ref())
    }

    /// A channel whose updates become progress (if the client sent a progress token) and
    /// logging notifications of this request.
    pub(super) fn forward_updates(&self, context: &RequestContext<RoleServer>) -> Option<mpsc::Sender<Update>> {
        let (tx, mut rx) = mpsc::channel::<Update>(64);
        let peer = context.peer.clone();
        let token = context.meta.get_progress_token();
        let min_level = *self.log_level.lock().unwrap_or_else(|e| e.into_inner());
        tokio::spawn(async move {
            while let Some(update) = rx.recv().await {
                match update {
                    Update::Progress { done, total, message } => {
                        if let Some(token) = &token {
                            let mut p = ProgressNotificationParam::new(token.clone(), done);
                            p.total = total;
                            p.message = message;
                            let _ = peer.notify_progress(p).await;
                        }
                    }
                    Update::Log { level, message } => {
                        let level = log_level(&level);
                        if rank(level) >= rank(min_level) {
                            #[allow(deprecated)]
                            let _ = peer
                                .notify_logging_message(
                                    LoggingMessageNotificationParam::new(level, json!(message)).with_logger("tool"),
                                )
                                .await;
                        }
                    }
                }
            }
        });
        Some(tx)
    }
}

fn rank(level: LoggingLevel) -> u8 {
    match level {
        LoggingLevel::Debug => 0,
        LoggingLevel::Info => 1,
        LoggingLevel::Notice => 2,
        LoggingLevel::Warning => 3,
        LoggingLevel::Error => 4,
        _ => 5,
    }
}

fn log_level(level: &str) -> LoggingLevel {
    match level {
        "debug" => LoggingLevel::Debug,
        "warn" | "warning" => LoggingLevel::Warning,
        "error" => LoggingLevel::Error,
        _ => LoggingLevel::Info,
    }
}

/// A refused run request's error code.
pub(super) fn request_code(e: &RequestError) -> &'static str {
    match e {
        RequestError::InvalidArguments(_) => "invalid_arguments",
        RequestError::UnknownTool(_) => "not_found",
        RequestError::Disabled(_) => "disabled",
        RequestError::Deleted(_) => "deleted",
        RequestError::UnknownVersion { .. } => "unknown_version",
        RequestError::KeyReused { .. } => "idempotency_key_reused",
        _ => "internal",
    }
}

/// A refused run request as a tool error.
pub(super) fn request_error(e: &RequestError) -> CallToolResult {
    match e {
        RequestError::InvalidArguments(invalid) => result::error(
            request_code(e),
            &invalid.to_string(),
            json!({"tool": invalid.tool, "violations": invalid.violations}),
        ),
        other if request_code(other) == "internal" => {
            tracing::error!(error = %other, "run request failed");
            result::error("internal", &format!("cannot start the run: {other}"), Value::Null)
        }
        other => result::error(request_code(other), &other.to_string(), Value::Null),
    }
}
