//! `run_replay`: past runs again with their original arguments, as new runs linked by
//! `replayOf`, and the structured diff of each pair of outcomes. The logic is
//! `kiln_worker::replay`, as `kiln runs replay` uses it; here the new runs are only requested and
//! executed by the queue's workers like any run, and the call waits for them within its budget
//! (else it answers with their handles, to follow with `run_get`).
//!
//! One run by `runId`, or in bulk the runs of a `tool` in a status (default `failed`) and time
//! range, oldest first, up to `limit`.

use std::time::Duration;

use kiln_proto::RunId;
use kiln_worker::replay::{self, ReplayError, ReplayOptions, ReplayVersion};
use kiln_worker::runs::{RunEngine, RunView};
use rmcp::RoleServer;
use rmcp::model::CallToolResult;
use rmcp::service::RequestContext;
use serde::Deserialize;
use serde_json::{Value, json};

use super::call::request_code;
use super::meta::{parse_run_id, query_error, run_filter};
use super::schemas::RESERVED_PREFIX;
use super::{KilnMcp, result};
use crate::auth::{Principal, Scope};
use crate::runs;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct ReplayArgs {
    #[serde(default)]
    run_id: Option<String>,
    #[serde(default)]
    tool: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    /// `"recorded"` (default), `"latest"` or a version number.
    #[serde(default)]
    version: Option<Value>,
    #[serde(default)]
    reuse_steps: bool,
    #[serde(default)]
    wait_ms: Option<u64>,
}

/// The most runs one bulk `run_replay` replays.
pub const MAX_BULK: usize = 100;
const DEFAULT_BULK: usize = 10;

fn invalid(message: &str) -> CallToolResult {
    result::error("invalid_arguments", message, Value::Null)
}

fn parse_version(v: Option<&Value>) -> Result<ReplayVersion, CallToolResult> {
    let bad = || invalid("version must be \"recorded\", \"latest\" or a version number (1 or more)");
    match v {
        None | Some(Value::Null) => Ok(ReplayVersion::Recorded),
        Some(Value::String(s)) => match s.parse() {
            Ok(ReplayVersion::Exact(0)) | Err(_) => Err(bad()),
            Ok(v) => Ok(v),
        },
        Some(Value::Number(n)) => match n.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) if n >= 1 => Ok(ReplayVersion::Exact(n)),
            _ => Err(bad()),
        },
        Some(_) => Err(bad()),
    }
}

/// A replay that was requested and is being waited for.
struct Started {
    original: RunView,
    run_id: RunId,
}

impl KilnMcp {
    pub(super) async fn replay(
        &self,
        a: ReplayArgs,
        principal: &Principal,
        context: &RequestContext<RoleServer>,
    ) -> CallToolResult {
        let Some(engine) = &self.services.engine else {
            return result::error("unavailable", "this server has no run engine", Value::Null);
        };
        let version = match parse_version(a.version.as_ref()) {
            Ok(v) => v,
            Err(r) => return r,
        };
        let opts =
            ReplayOptions { version, reuse_steps: a.reuse_steps, actor: principal.actor.clone(), traceparent: None };
        let budget =
            a.wait_ms.map_or(self.services.call_budget, |w| Duration::from_millis(w).min(self.services.call_budget));
        let bulk_only = [
            ("status", a.status.is_some()),
            ("since", a.since.is_some()),
            ("until", a.until.is_some()),
            ("limit", a.limit.is_some()),
        ];
        match (&a.run_id, &a.tool) {
            (Some(id), None) => {
                if let Some((name, _)) = bulk_only.iter().find(|(_, set)| *set) {
                    return invalid(&format!("{name} selects runs to replay in bulk: pass it with tool, not runId"));
                }
                let original = match parse_run_id(id) {
                    Ok(id) => id,
                    Err(r) => return r,
                };
                let started = match start(engine, original, &opts, principal).await {
                    Ok(s) => s,
                    Err(r) => return r,
                };
                let updates = self.forward_updates(context);
                match runs::wait(engine, started.run_id, budget, updates, context.ct.clone()).await {
                    Ok(after) => result::ok(report(&started.original, &after)),
                    Err(e) => {
                        result::error("internal", &format!("cannot read run {}: {e}", started.run_id), Value::Null)
                    }
                }
            }
            (None, Some(_)) => self.replay_many(&a, &opts, budget, principal, context).await,
            _ => invalid("name the run to replay (runId), or a tool whose runs to replay in bulk (tool), not both"),
        }
    }

    /// Replays the runs of a tool selected by status (default failed) and time range, oldest
    /// first: every replay is requested, then all are waited for together within the budget.
    async fn replay_many(
        &self,
        a: &ReplayArgs,
        opts: &ReplayOptions,
        budget: Duration,
        principal: &Principal,
        context: &RequestContext<RoleServer>,
    ) -> CallToolResult {
        let Some(engine) = &self.services.engine else {
            return result::error("unavailable", "this server has no run engine", Value::Null);
        };
        let filter = match run_filter(
            a.tool.as_deref(),
            Some(a.status.as_deref().unwrap_or("failed")),
            a.since.as_deref(),
            a.until.as_deref(),
        ) {
            Ok(f) => f,
            Err(r) => return r,
        };
        let limit = a.limit.unwrap_or(DEFAULT_BULK);
        if !(1..=MAX_BULK).contains(&limit) {
            return invalid(&format!("limit must be between 1 and {MAX_BULK}"));
        }
        let store = &self.services.store;
        let selected = async {
            runs::caught_up(store).await?;
            kiln_store::queries::runs::all(store, &filter).await
        };
        // Selected before any replay is requested, so this call's own replays are never picked.
        let mut selected = match selected.await {
            Ok(s) => s,
            Err(e) => return query_error(&e),
        };
        selected.reverse();
        let more = selected.len().saturating_sub(limit);
        selected.truncate(limit);
        let mut entries: Vec<Option<Value>> = Vec::new();
        let mut started = Vec::new();
        for run in &selected {
            match start(engine, run.run_id, opts, principal).await {
                Ok(s) => {
                    started.push((entries.len(), s));
                    entries.push(None);
                }
                Err(r) => entries.push(Some(json!({"replayOf": run.run_id, "notReplayed": refusal(&r)}))),
            }
        }
        let waits = started.iter().map(|(_, s)| runs::wait(engine, s.run_id, budget, None, context.ct.clone()));
        for ((i, s), after) in started.iter().zip(futures::future::join_all(waits).await) {
            entries[*i] = Some(match after {
                Ok(after) => report(&s.original, &after),
                Err(e) => json!({"replayOf": s.original.run_id, "runId": s.run_id, "notReplayed": e.to_string()}),
            });
        }
        let replays: Vec<Value> = entries.into_iter().flatten().collect();
        result::ok(json!({"replays": replays, "selected": selected.len(), "more": more}))
    }
}

/// Checks that `original` exists and has ended, and requests its replay.
async fn start(
    engine: &RunEngine,
    original: RunId,
    opts: &ReplayOptions,
    caller: &Principal,
) -> Result<Started, CallToolResult> {
    let view = match engine.view(original).await {
        Ok(Some(v)) => v,
        Ok(None) => return Err(result::error("not_found", &format!("no run {original}"), Value::Null)),
        Err(e) => return Err(result::error("internal", &e.to_string(), Value::Null)),
    };
    // Running `code_eval`'s one-off code again is running arbitrary code: it needs what
    // `code_eval` needs.
    if view.tool.as_str().starts_with(RESERVED_PREFIX) && !caller.has(Scope::ToolsWrite) {
        let message = format!("run {original} ran code_eval's one-off code; replaying it needs the scope tools:write");
        return Err(result::error("permission_denied", &message, Value::Null));
    }
    if !view.is_ended() {
        let message = format!("run {original} has not ended yet ({}); replay it once it has", view.status);
        return Err(result::error("not_ended", &message, Value::Null));
    }
    match replay::request_replay(engine, original, opts).await {
        Ok(r) => Ok(Started { original: view, run_id: r.run_id }),
        Err(ReplayError::Request { source, .. }) => {
            let message = format!("cannot replay run {original}: {source}");
            Err(result::error(request_code(&source), &message, Value::Null))
        }
        Err(ReplayError::UnknownRun(_)) => Err(result::error("not_found", &format!("no run {original}"), Value::Null)),
        Err(e) => Err(result::error("internal", &e.to_string(), Value::Null)),
    }
}

/// A tool error's message, for a bulk replay's entry.
fn refusal(r: &CallToolResult) -> String {
    r.content.iter().filter_map(|c| c.as_text()).map(|t| t.text.clone()).collect::<Vec<_>>().join("\n")
}

/// The replay's handle and, once it has ended, its outcome and the diff with the original's.
fn report(original: &RunView, after: &RunView) -> Value {
    let mut v = json!({
        "runId": after.run_id, "replayOf": original.run_id, "tool": after.tool,
        "toolVersion": after.tool_version, "status": after.status,
    });
    if after.is_ended() {
        let outcome = replay::outcome(after);
        for key in ["output", "error"] {
            if let Some(x) = outcome.get(key) {
                v[key] = x.clone();
            }
        }
        v["diff"] = json!(replay::compare(original, after));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_recorded_latest_or_a_positive_number() {
        assert_eq!(parse_version(None).unwrap(), ReplayVersion::Recorded);
        assert_eq!(parse_version(Some(&json!("latest"))).unwrap(), ReplayVersion::Latest);
        assert_eq!(parse_version(Some(&json!(3))).unwrap(), ReplayVersion::Exact(3));
        assert_eq!(parse_version(Some(&json!("3"))).unwrap(), ReplayVersion::Exact(3));
        for bad in [json!("newest"), json!(0), json!(-1), json!(1.5), json!(true), json!(["latest"]), json!("0")] {
            assert!(parse_version(Some(&bad)).is_err(), "{bad}");
        }
    }
}
