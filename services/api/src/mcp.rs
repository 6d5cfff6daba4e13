//! The MCP server: Kiln's meta tools plus every enabled runtime tool under its own name, over
//! Streamable HTTP (see [`crate::build`]) or stdio (`kiln mcp --stdio`).
//!
//! One [`KilnMcp`] handler serves one session. Each session forwards catalog changes from the
//! live catalog as `notifications/tools/list_changed` (and through `subscriptions/listen` on the
//! 2026-07-28 protocol). The caller's [`Principal`] comes from the HTTP gate (request
//! extensions) or, on stdio, is fixed to the local user.

// Logging notifications are deprecated by SEP-2577 (2026-07-28) but are how clients on the
// protocol versions in use today show a tool's logs.
#![allow(deprecated)]

mod call;
mod meta;
mod replay;
mod result;
pub mod schemas;
mod tasks;

pub use meta::scope_of as meta_scope;

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_proto::tool_state::Lifecycle;
use kiln_store::Store;
use kiln_worker::runs::RunEngine;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CancelTaskParams, GetTaskParams, GetTaskResult, Implementation,
    InitializeResult, ListToolsResult, LoggingLevel, PaginatedRequestParams, ServerCapabilities, SetLevelRequestParams,
    SubscriptionFilter, Tool,
};
use rmcp::service::{NotificationContext, RequestContext, SubscriptionContext};
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::auth::{Principal, Scope};
use crate::catalog::Catalog;
use crate::live::LiveCatalog;

/// Everything the MCP handlers share, once per process.
#[derive(Debug)]
pub struct Services {
    pub store: Store,
    pub catalog: Catalog,
    pub live: LiveCatalog,
    /// Requests and executes runs; None when this process has no sandbox.
    pub engine: Option<RunEngine>,
    /// How long `tools/call` waits for a run before answering with a run handle.
    pub call_budget: Duration,
}

/// The handler of one MCP session.
#[derive(Debug, Clone)]
pub struct KilnMcp {
    services: Arc<Services>,
    /// Fixed caller (stdio); None: taken from each HTTP request.
    principal: Option<Principal>,
    /// The client's `logging/setLevel`; tool logs below it are not forwarded.
    log_level: Arc<Mutex<LoggingLevel>>,
}

impl KilnMcp {
    pub fn new(services: Arc<Services>, principal: Option<Principal>) -> Self {
        Self { services, principal, log_level: Arc::new(Mutex::new(LoggingLevel::Debug)) }
    }

    /// Who sent this request.
    fn principal(&self, context: &RequestContext<RoleServer>) -> Result<Principal, McpError> {
        if let Some(p) = &self.principal {
            return Ok(p.clone());
        }
        context
            .extensions
            .get::<http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<Principal>())
            .cloned()
            .ok_or_else(|| McpError::internal_error("request reached the MCP server without authentication", None))
    }

    fn require(principal: &Principal, scope: Scope) -> Result<(), McpError> {
        if principal.has(scope) {
            Ok(())
        } else {
            Err(McpError::invalid_request(format!("{} lacks the scope {scope}", principal.actor), None))
        }
    }

    fn runtime_tools(&self) -> Vec<Tool> {
        self.services
            .live
            .snapshot()
            .into_iter()
            .filter(|(name, t)| {
                t.lifecycle == Lifecycle::Enabled && !name.as_str().starts_with(schemas::RESERVED_PREFIX)
            })
            .filter_map(|(name, t)| {
                let d = t.definition?;
                let mut tool = json!({
                    "name": name.as_str(),
                    "description": d.description,
                    "inputSchema": d.input_schema,
                    "_meta": {"kiln/runtime": true, "kiln/version": t.version},
                });
                if let Some(title) = &d.title {
                    tool["title"] = json!(title);
                }
                if let Some(s) = &d.output_schema {
                    tool["outputSchema"] = json!(s);
                }
                if let Some(a) = &d.annotations {
                    tool["annotations"] = json!(a);
                }
                to_tool(tool)
            })
            .collect()
    }
}

pub(crate) fn to_tool(v: Value) -> Option<Tool> {
    serde_json::from_value(v).map_err(|e| tracing::warn!(error = %e, "cannot list a tool")).ok()
}

impl ServerHandler for KilnMcp {
    fn get_info(&self) -> InitializeResult {
        let capabilities = ServerCapabilities::builder()
            .enable_tools()
            .enable_tool_list_changed()
            .enable_logging()
            .enable_tasks()
            .build();
        let mut info = InitializeResult::new(capabilities).with_instructions(
            "Kiln runs tools that you create at runtime. Create one with tool_create (JavaScript/TypeScript run in a \
             Deno sandbox), then call it by its name, or with tool_run if your tool list is cached. Every call is a \
             durable, recorded run (run_get, run_list).",
        );
        info.server_info = Implementation::new("kiln", env!("CARGO_PKG_VERSION"));
        info
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Self::require(&self.principal(&context)?, Scope::ToolsRead)?;
        let mut tools: Vec<Tool> = schemas::meta_tools().into_iter().filter_map(to_tool).collect();
        tools.extend(self.runtime_tools());
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let principal = self.principal(&context)?;
        let arguments = Value::Object(request.arguments.clone().unwrap_or_default());
        let name: Cow<'_, str> = request.name.clone();
        // A client that declared the tasks extension gets a task for a run that outlives the
        // budget; any other keeps getting the run handle.
        let as_task = context.client_capabilities().is_some_and(|c| c.supports_tasks());
        if schemas::is_meta(&name) {
            return self.call_meta(&name, arguments, &principal, &context, as_task).await;
        }
        Self::require(&principal, Scope::ToolsRun)?;
        let listed = self.services.live.get(&name).filter(|t| t.lifecycle != Lifecycle::Deleted);
        if name.starts_with(schemas::RESERVED_PREFIX) || listed.is_none() {
            // Unknown and deleted tools are a protocol error (as the MCP spec and the conformance
            // suite expect); a disabled tool is a tool error the model can read. The log is asked
            // too: the live catalog may not have seen a change made on another replica yet.
            if self.services.catalog.existing(&name).await.is_err() {
                return Err(McpError::invalid_params(
                    format!("unknown tool \"{name}\"; tools/list (or tool_list) shows the tools there are"),
                    None,
                ));
            }
        }
        let call = call::Call { tool: name.into_owned(), arguments, version: None, idempotency_key: None };
        Ok(self.run_tool_or_task(call, &principal, &context, as_task).await)
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, McpError> {
        let principal = self.principal(&context)?;
        Self::require(&principal, Scope::ToolsRun)?;
        self.get_task_of(&request.task_id, &principal).await
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        let principal = self.principal(&context)?;
        Self::require(&principal, Scope::ToolsRun)?;
        self.cancel_task_of(&request.task_id, &principal).await
    }

    async fn set_level(
        &self,
        request: SetLevelRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        *self.log_level.lock().unwrap_or_else(|e| e.into_inner()) = request.level;
        Ok(())
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        let mut changes = self.services.live.subscribe();
        let peer = context.peer;
        tokio::spawn(async move {
            loop {
                let next = tokio::time::timeout(Duration::from_secs(30), changes.recv()).await;
                match next {
                    Ok(Ok(_) | Err(RecvError::Lagged(_))) => {
                        // Coalesce a burst of changes into one notification.
                        while changes.try_recv().is_ok() {}
                        if peer.notify_tool_list_changed().await.is_err() {
                            return;
                        }
                    }
                    Ok(Err(RecvError::Closed)) => return,
                    Err(_) if peer.is_transport_closed() => return,
                    Err(_) => {}
                }
            }
        });
    }

    fn accepted_subscription_filter(&self, requested: &SubscriptionFilter) -> Option<SubscriptionFilter> {
        let mut accepted = SubscriptionFilter::new();
        accepted.tools_list_changed = requested.tools_list_changed;
        Some(accepted)
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), McpError> {
        let mut changes = self.services.live.subscribe();
        loop {
            tokio::select! {
                _ = context.cancelled() => return Ok(()),
                next = changes.recv() => match next {
                    Ok(_) | Err(RecvError::Lagged(_)) => {
                        while changes.try_recv().is_ok() {}
                        if context.sink().notify_tool_list_changed().await.is_err() {
                            return Ok(());
                        }
                    }
                    Err(RecvError::Closed) => return Ok(()),
                },
            }
        }
    }
}
