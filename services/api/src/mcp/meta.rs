//! The meta tools: managing the catalog (`tool_*`), running code (`tool_run`, `code_eval`) and
//! following runs (`run_*`; `run_replay`'s logic is in `replay`). Each checks its scope,
//! validates its arguments into types, and answers with structured content; a refusal is a tool
//! error naming what was wrong.

use kiln_proto::tool_state::{Lifecycle, ToolState};
use kiln_proto::{RunId, ToolName};
use kiln_store::queries::{self, QueryError};
use kiln_worker::runs::Cancelled;
use rmcp::model::{CallToolResponse, CallToolResult};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::call::Call;
use super::replay::ReplayArgs;
use super::schemas::RESERVED_PREFIX;
use super::{KilnMcp, result};
use crate::auth::{Principal, Scope};
use crate::catalog::{CatalogError, LifecycleChange, UPDATABLE_FIELDS, version_of};
use crate::runs;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NameArgs {
    name: String,
    #[serde(default)]
    expected_version: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GetArgs {
    name: String,
    #[serde(default)]
    version: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ListArgs {
    #[serde(default)]
    include_disabled: bool,
    #[serde(default)]
    include_code: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RunArgs {
    name: String,
    #[serde(default)]
    arguments: Option<Value>,
    #[serde(default)]
    version: Option<u32>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EvalArgs {
    code: String,
    #[serde(default)]
    arguments: Option<Value>,
    #[serde(default)]
    permissions: Option<Value>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RunIdArgs {
    run_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RunGetArgs {
    run_id: String,
    /// Add every event of the run (as `kiln runs show`), its children and its replays.
    #[serde(default)]
    include_timeline: bool,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RunListArgs {
    #[serde(default)]
    tool: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    actor: Option<String>,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    cursor: Option<String>,
}

/// The scope each meta tool needs.
pub fn scope_of(tool: &str) -> Option<&'static [Scope]> {
    Some(match tool {
        "tool_create" | "tool_update" | "tool_enable" | "tool_disable" | "tool_delete" => &[Scope::ToolsWrite],
        "tool_get" | "tool_versions" | "tool_list" => &[Scope::ToolsRead],
        "tool_run" | "run_cancel" => &[Scope::ToolsRun],
        // Arbitrary code is a tool made and run at once.
        "code_eval" => &[Scope::ToolsRun, Scope::ToolsWrite],
        "run_get" | "run_list" => &[Scope::RunsRead],
        // Starts runs, with arguments read from the history (which the caller may not otherwise
        // see), and answers with the original's outcome.
        "run_replay" => &[Scope::ToolsRun, Scope::RunsRead],
        _ => return None,
    })
}

fn args<T: DeserializeOwned>(tool: &str, arguments: Value) -> Result<T, CallToolResult> {
    serde_path_to_error::deserialize(arguments).map_err(|e| {
        let at = e.path().to_string();
        let at = if at == "." { String::new() } else { format!(" at {at}") };
        result::error("invalid_arguments", &format!("invalid arguments for {tool}{at}: {}", e.inner()), Value::Null)
    })
}

fn catalog_error(e: &CatalogError) -> CallToolResult {
    if matches!(e, CatalogError::Store(_) | CatalogError::Corrupt(_)) {
        tracing::error!(error = %e, "catalog operation failed");
    }
    result::error(e.code(), &e.to_string(), e.details())
}

fn lifecycle_name(l: Lifecycle) -> &'static str {
    match l {
        Lifecycle::Enabled => "enabled",
        Lifecycle::Disabled => "disabled",
        Lifecycle::Deleted => "deleted",
    }
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(r) => return Ok(r),
        }
    };
}

impl KilnMcp {
    /// A meta tool's call. `as_task`: the client declared the tasks extension, so `tool_run` and
    /// `code_eval` answer a run that outlives the budget with a task, as `tools/call` does.
    pub(super) async fn call_meta(
        &self,
        tool: &str,
        arguments: Value,
        principal: &Principal,
        context: &RequestContext<RoleServer>,
        as_task: bool,
    ) -> Result<CallToolResponse, McpError> {
        for scope in scope_of(tool).unwrap_or_default() {
            Self::require(principal, *scope)?;
        }
        let call = match tool {
            "tool_run" => self.tool_run_call(arguments),
            "code_eval" => match args::<EvalArgs>(tool, arguments) {
                Ok(a) => self.eval_call(a, principal).await,
                Err(refused) => Err(refused),
            },
            _ => return self.call_meta_result(tool, arguments, principal, context).await.map(Into::into),
        };
        Ok(match call {
            Ok(call) => self.run_tool_or_task(call, principal, context, as_task).await,
            Err(refused) => refused.into(),
        })
    }

    /// The call `tool_run` asks for.
    fn tool_run_call(&self, arguments: Value) -> Result<Call, CallToolResult> {
        let a: RunArgs = args("tool_run", arguments)?;
        if a.name.starts_with(RESERVED_PREFIX) {
            return Err(result::error("not_found", &format!("unknown tool \"{}\"", a.name), Value::Null));
        }
        Ok(Call {
            tool: a.name,
            arguments: a.arguments.unwrap_or_else(|| json!({})),
            version: a.version,
            idempotency_key: a.idempotency_key,
        })
    }

    /// The meta tools other than `tool_run` and `code_eval` (scopes already checked).
    async fn call_meta_result(
        &self,
        tool: &str,
        arguments: Value,
        principal: &Principal,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let catalog = &self.services.catalog;
        Ok(match tool {
            "tool_create" => {
                let name = arguments.get("name").and_then(Value::as_str).unwrap_or_default();
                if name.starts_with(RESERVED_PREFIX) {
                    return Ok(result::error(
                        "invalid_name",
                        &format!("tool names starting with \"{RESERVED_PREFIX}\" are reserved for Kiln"),
                        Value::Null,
                    ));
                }
                match catalog.create(principal, &arguments).await {
                    Ok(p) => {
                        self.services.live.wait_for(p.position).await;
                        result::ok(json!(p))
                    }
                    Err(e) => catalog_error(&e),
                }
            }
            "tool_update" => {
                let mut changes = match arguments {
                    Value::Object(m) => m,
                    _ => Map::new(),
                };
                let Some(Value::String(name)) = changes.remove("name") else {
                    return Ok(result::error("invalid_arguments", "tool_update needs the tool's name", Value::Null));
                };
                let expected = match changes.remove("expectedVersion") {
                    None | Some(Value::Null) => None,
                    Some(v) => match v.as_u64().and_then(|v| u32::try_from(v).ok()) {
                        Some(v) => Some(v),
                        None => {
                            return Ok(result::error(
                                "invalid_arguments",
                                "expectedVersion must be a positive integer",
                                Value::Null,
                            ));
                        }
                    },
                };
                if let Some(bad) = changes.keys().find(|k| !UPDATABLE_FIELDS.contains(&k.as_str())) {
                    return Ok(result::error(
                        "invalid_arguments",
                        &format!("tool_update cannot change {bad:?}; fields: {}", UPDATABLE_FIELDS.join(", ")),
                        Value::Null,
                    ));
                }
                match catalog.update(principal, &name, expected, &changes).await {
                    Ok(p) => {
                        self.services.live.wait_for(p.position).await;
                        result::ok(json!(p))
                    }
                    Err(e) => catalog_error(&e),
                }
            }
            "tool_enable" | "tool_disable" | "tool_delete" => {
                let a: NameArgs = tri!(args(tool, arguments));
                let change = match tool {
                    "tool_enable" => LifecycleChange::Enable,
                    "tool_disable" => LifecycleChange::Disable,
                    _ => LifecycleChange::Delete,
                };
                match catalog.change(principal, &a.name, a.expected_version, change).await {
                    Ok(c) => {
                        if let Some(p) = c.position {
                            self.services.live.wait_for(p).await;
                        }
                        result::ok(
                            json!({"name": c.name, "state": lifecycle_name(c.state), "version": c.version, "changed": c.changed}),
                        )
                    }
                    Err(e) => catalog_error(&e),
                }
            }
            "tool_get" => {
                let a: GetArgs = tri!(args(tool, arguments));
                let state = tri!(self.known(&a.name).await);
                match version_of(&state, a.version) {
                    Ok(v) => result::ok(json!({
                        "name": state.name,
                        "version": v.version,
                        "currentVersion": state.current().map(|c| c.version),
                        "state": lifecycle_name(state.lifecycle),
                        "codeSha256": v.code_sha256,
                        "actor": v.actor,
                        "publishedAt": v.published_at,
                        "definition": v.definition.to_value(),
                    })),
                    Err(e) => catalog_error(&e),
                }
            }
            "tool_versions" => {
                let a: GetArgs = tri!(args(tool, arguments));
                let state = tri!(self.known(&a.name).await);
                let versions: Vec<Value> = state.versions.values().map(|v| json!(v)).collect();
                result::ok(json!({"name": state.name, "state": lifecycle_name(state.lifecycle), "versions": versions}))
            }
            "tool_list" => {
                let a: ListArgs = tri!(args(tool, arguments));
                let tools: Vec<Value> = self
                    .services
                    .live
                    .snapshot()
                    .into_iter()
                    .filter(|(n, t)| {
                        !n.as_str().starts_with(RESERVED_PREFIX)
                            && match t.lifecycle {
                                Lifecycle::Enabled => true,
                                Lifecycle::Disabled => a.include_disabled,
                                Lifecycle::Deleted => false,
                            }
                    })
                    .filter_map(|(name, t)| {
                        let d = t.definition?;
                        let mut v = json!({
                            "name": name, "description": d.description, "version": t.version,
                            "state": lifecycle_name(t.lifecycle), "runtime": true, "codeSha256": t.code_sha256,
                            "inputSchema": d.input_schema, "createdBy": t.created_by, "updatedAt": t.updated_at,
                        });
                        if let Some(title) = &d.title {
                            v["title"] = json!(title);
                        }
                        if let Some(s) = &d.output_schema {
                            v["outputSchema"] = json!(s);
                        }
                        if a.include_code {
                            v["code"] = json!(d.code);
                        }
                        Some(v)
                    })
                    .collect();
                result::ok(json!({"tools": tools}))
            }
            "run_get" => {
                let a: RunGetArgs = tri!(args(tool, arguments));
                let run_id = tri!(parse_run_id(&a.run_id));
                let Some(engine) = &self.services.engine else {
                    return Ok(result::error("unavailable", "this server has no run engine", Value::Null));
                };
                let mut v = match runs::view(engine, run_id).await {
                    Ok(v) => json!(v),
                    Err(runs::RunsError::NotFound(_)) => {
                        return Ok(result::error("not_found", &format!("no run {run_id}"), Value::Null));
                    }
                    Err(e) => return Ok(result::error("internal", &e.to_string(), Value::Null)),
                };
                if a.include_timeline {
                    tri!(self.add_history(&mut v, run_id).await);
                }
                result::ok(v)
            }
            "run_list" => {
                let a: RunListArgs = tri!(args(tool, arguments));
                let filter =
                    tri!(run_filter(a.tool.as_deref(), a.status.as_deref(), a.since.as_deref(), a.until.as_deref()));
                let filter = queries::runs::RunFilter { actor: a.actor, ..filter };
                let store = &self.services.store;
                let page = async {
                    runs::caught_up(store).await?;
                    queries::runs::list(store, &filter, a.cursor.as_deref(), a.limit.unwrap_or(50)).await
                };
                match page.await {
                    Ok(page) => result::ok(json!(page)),
                    Err(e) => query_error(&e),
                }
            }
            "run_replay" => {
                let a: ReplayArgs = tri!(args(tool, arguments));
                self.replay(a, principal, context).await
            }
            "run_cancel" => {
                let a: RunIdArgs = tri!(args(tool, arguments));
                let run_id = tri!(parse_run_id(&a.run_id));
                let Some(engine) = &self.services.engine else {
                    return Ok(result::error("unavailable", "this server has no run engine", Value::Null));
                };
                match engine.cancel(run_id, principal.actor.clone(), None).await {
                    Ok(Cancelled::Cancelled) => {
                        result::ok(json!({"runId": run_id, "cancelled": true, "status": "cancelled"}))
                    }
                    Ok(Cancelled::AlreadyEnded(s)) => {
                        result::ok(json!({"runId": run_id, "cancelled": false, "status": s.name()}))
                    }
                    Err(kiln_worker::runs::ExecuteError::UnknownRun(_)) => {
                        result::error("not_found", &format!("no run {run_id}"), Value::Null)
                    }
                    Err(e) => result::error("internal", &e.to_string(), Value::Null),
                }
            }
            other => return Err(McpError::invalid_params(format!("unknown meta tool {other}"), None)),
        })
    }

    /// Adds a run's timeline (every event of its stream, from the log) and, from the read model,
    /// its children and replays, as `kiln runs show --json` and `GET /v1/runs/{id}` give them.
    async fn add_history(&self, v: &mut Value, run_id: RunId) -> Result<(), CallToolResult> {
        let store = &self.services.store;
        let history = async {
            let timeline = queries::runs::timeline(store, run_id).await?;
            runs::caught_up(store).await?;
            let detail = queries::runs::get(store, run_id).await?;
            Ok::<_, QueryError>((timeline, detail))
        };
        let (timeline, detail) = history.await.map_err(|e| query_error(&e))?;
        v["timeline"] = json!(timeline);
        v["children"] = json!(detail.as_ref().map(|d| &d.children).cloned().unwrap_or_default());
        v["replays"] = json!(detail.map(|d| d.replays).unwrap_or_default());
        Ok(())
    }

    /// A tool that exists (deleted ones too: their history stays readable).
    async fn known(&self, name: &str) -> Result<ToolState, CallToolResult> {
        let parsed = crate::catalog::parse_name(name).map_err(|e| catalog_error(&e))?;
        match self.services.catalog.state(&parsed).await {
            Ok(Some(s)) if !name.starts_with(RESERVED_PREFIX) => Ok(s),
            Ok(_) => Err(result::error("not_found", &format!("unknown tool \"{name}\""), Value::Null)),
            Err(e) => Err(catalog_error(&e)),
        }
    }

    /// One-off code: a hidden tool named after the code's hash (created once, reused for the
    /// same code and settings), run like any other, so the run is recorded.
    async fn eval_call(&self, a: EvalArgs, principal: &Principal) -> Result<Call, CallToolResult> {
        let mut definition = json!({
            "description": "one-off code run by code_eval",
            "code": a.code,
            "retry": {"maxAttempts": 1},
        });
        if let Some(p) = a.permissions {
            definition["permissions"] = p;
        }
        if let Some(t) = a.timeout_ms {
            definition["limits"] = json!({"timeoutMs": t});
        }
        // The hidden tool may have been made by someone else: the caller's own grant is checked
        // on every call, not only at creation.
        definition["name"] = json!(format!("{RESERVED_PREFIX}eval"));
        match kiln_proto::ToolDefinition::parse(&definition) {
            Ok(parsed) => {
                let beyond: Vec<String> = parsed
                    .definition
                    .permissions
                    .network
                    .iter()
                    .filter(|h| !principal.may_reach(h))
                    .map(ToString::to_string)
                    .collect();
                if !beyond.is_empty() {
                    return Err(catalog_error(&CatalogError::NetworkBeyondGrant {
                        actor: principal.actor.to_string(),
                        hosts: beyond,
                        allowed: principal.allowed_hosts_display(),
                    }));
                }
            }
            Err(e) => return Err(catalog_error(&CatalogError::Invalid(e))),
        }
        let digest = hex::encode(Sha256::digest(definition.to_string().as_bytes()));
        let name = format!("{RESERVED_PREFIX}eval.{}", &digest[..24]);
        definition["name"] = json!(name);
        let catalog = &self.services.catalog;
        let exists = matches!(catalog.existing(&name).await, Ok(s) if s.lifecycle == Lifecycle::Enabled);
        if !exists {
            match catalog.create(principal, &definition).await {
                Ok(_) | Err(CatalogError::AlreadyExists(_)) => {}
                Err(e) => return Err(catalog_error(&e)),
            }
        }
        Ok(Call {
            tool: name,
            arguments: a.arguments.unwrap_or_else(|| json!({})),
            version: None,
            idempotency_key: None,
        })
    }
}

/// The filters `run_list` and a bulk `run_replay` share, validated.
pub(super) fn run_filter(
    tool: Option<&str>,
    status: Option<&str>,
    since: Option<&str>,
    until: Option<&str>,
) -> Result<queries::runs::RunFilter, CallToolResult> {
    let invalid = |m: String| result::error("invalid_arguments", &m, Value::Null);
    Ok(queries::runs::RunFilter {
        tool: tool.map(ToolName::parse).transpose().map_err(|e| invalid(e.to_string()))?,
        status: status.map(str::parse).transpose().map_err(|e: QueryError| invalid(e.to_string()))?,
        since: since.map(queries::parse_time).transpose().map_err(|e| invalid(format!("since: {e}")))?,
        until: until.map(queries::parse_time).transpose().map_err(|e| invalid(format!("until: {e}")))?,
        ..queries::runs::RunFilter::default()
    })
}

/// A failed history query: the caller's mistake (a bad cursor) or the server's.
pub(super) fn query_error(e: &QueryError) -> CallToolResult {
    match e {
        QueryError::Invalid(m) => result::error("invalid_arguments", m, Value::Null),
        other => {
            tracing::error!(error = %other, "run history query failed");
            result::error("internal", &other.to_string(), Value::Null)
        }
    }
}

pub(super) fn parse_run_id(s: &str) -> Result<RunId, CallToolResult> {
    s.parse::<RunId>().map_err(|_| result::error("invalid_arguments", &format!("{s:?} is not a run id"), Value::Null))
}
