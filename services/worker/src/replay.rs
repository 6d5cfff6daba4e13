//! Replay: running a past run again with its original arguments, as a new run linked to it by
//! `replayOf`, and comparing the two outcomes. Used by `kiln runs replay` and MCP `run_replay`.
//!
//! Requesting (`request_replay`) and comparing (`compare`) are separate so each caller chooses
//! how the new run gets executed: by the queue's workers (wait with `RunEngine::watch`), or in
//! this process (`execute_here`, for a CLI with no worker running). With `reuse_steps` the new
//! run answers `ctx.step` keys from the original's recorded results, so only the changed logic
//! runs and recorded side effects are not repeated.

use std::str::FromStr;

use kiln_proto::run::RunStatus;
use kiln_proto::{Actor, RunId, TraceParent};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::runs::{AttemptOutcome, ExecuteError, RequestError, RunEngine, RunRequest, RunUpdate, RunView};

/// Which version of the tool a replay runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplayVersion {
    /// The version the original ran.
    #[default]
    Recorded,
    /// The tool's current version.
    Latest,
    Exact(u32),
}

impl FromStr for ReplayVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "recorded" => Ok(Self::Recorded),
            "latest" => Ok(Self::Latest),
            n => n
                .parse()
                .map(Self::Exact)
                .map_err(|_| format!("invalid version {s:?}: expected recorded, latest or a version number")),
        }
    }
}

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub version: ReplayVersion,
    /// Answer durable steps from the original run's recorded results.
    pub reuse_steps: bool,
    pub actor: Actor,
    pub traceparent: Option<TraceParent>,
}

/// A replay that was requested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Replay {
    pub original: RunId,
    pub run_id: RunId,
    pub tool_version: u32,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    #[error("no run {0} to replay")]
    UnknownRun(RunId),
    #[error("cannot replay run {original}: {source}")]
    Request { original: RunId, source: RequestError },
    #[error(transparent)]
    Engine(#[from] ExecuteError),
    #[error("the store closed before run {0} ended")]
    Interrupted(RunId),
}

/// Requests a new run of `original`'s tool with its original arguments, linked by `replayOf`.
pub async fn request_replay(engine: &RunEngine, original: RunId, opts: &ReplayOptions) -> Result<Replay, ReplayError> {
    let view = engine.view(original).await?.ok_or(ReplayError::UnknownRun(original))?;
    let version = match opts.version {
        ReplayVersion::Recorded => Some(view.tool_version),
        ReplayVersion::Latest => None,
        ReplayVersion::Exact(n) => Some(n),
    };
    let request = RunRequest {
        tool: view.tool.clone(),
        version,
        arguments: view.arguments.clone(),
        idempotency_key: None,
        parent_run: None,
        replay_of: Some(original),
        reuse_steps: opts.reuse_steps,
        actor: opts.actor.clone(),
        traceparent: opts.traceparent.clone(),
    };
    let requested = engine.request(request).await.map_err(|source| ReplayError::Request { original, source })?;
    Ok(Replay { original, run_id: requested.run_id, tool_version: requested.tool_version })
}

/// Executes a run's attempts in this process until it ends, waiting out scheduled retries (what
/// a worker would do); for callers with no worker running. Another worker holding the run is
/// waited for, not raced.
pub async fn execute_here(engine: &RunEngine, run_id: RunId, stop: CancellationToken) -> Result<(), ExecuteError> {
    loop {
        let wait_until = match engine.execute(run_id, stop.clone()).await? {
            AttemptOutcome::Finished(_) | AttemptOutcome::Abandoned => return Ok(()),
            AttemptOutcome::RetryAt(at) | AttemptOutcome::Leased { until: at } => at,
            AttemptOutcome::Fenced => kiln_proto::envelope::now_micros(),
        };
        let wait = (wait_until - kiln_proto::envelope::now_micros()).to_std().unwrap_or_default();
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait.max(std::time::Duration::from_millis(5))) => {}
        }
    }
}

/// How often `wait_for_end` also reads the run itself.
const RECHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// Waits until `run_id` has ended (whoever executes it) and returns how it ended.
///
/// The run's watch wakes on this process's appends and, on PostgreSQL, on every process's; a
/// SQLite store is not told of another process's commits (a `kiln serve` worker finishing the
/// run while the CLI waits), so the run is also re-read every half second.
pub async fn wait_for_end(engine: &RunEngine, run_id: RunId) -> Result<RunView, ReplayError> {
    let mut watch = engine.watch(run_id).await?;
    loop {
        tokio::select! {
            update = watch.next() => match update {
                Some(RunUpdate::Ended(view)) => return Ok(*view),
                Some(_) => {}
                None => return Err(ReplayError::Interrupted(run_id)),
            },
            _ = tokio::time::sleep(RECHECK) => {
                if let Some(view) = engine.view(run_id).await?.filter(RunView::is_ended) {
                    return Ok(view);
                }
            }
        }
    }
}

/// The original and the replay side by side, with what changed between their outcomes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayReport {
    pub original: RunSide,
    pub replay: RunSide,
    /// Whether the two outcomes are the same (no changes).
    pub same: bool,
    pub changes: Vec<Change>,
}

/// One run of a replay report.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunSide {
    pub run_id: RunId,
    pub tool_version: u32,
    pub status: &'static str,
    pub attempts: u32,
}

/// Compares two ended runs' outcomes (see `outcome`).
pub fn compare(original: &RunView, replay: &RunView) -> ReplayReport {
    let side = |v: &RunView| RunSide {
        run_id: v.run_id,
        tool_version: v.tool_version,
        status: v.status,
        attempts: v.attempts,
    };
    let changes = diff(&outcome(original), &outcome(replay));
    ReplayReport { original: side(original), replay: side(replay), same: changes.is_empty(), changes }
}

/// What a run's ending is compared on: `{status, output}` or `{status, error: {kind, name,
/// message}}`. Stacks, timings and attempt counts are left out: they differ between any two runs.
pub fn outcome(view: &RunView) -> Value {
    let mut m = Map::new();
    m.insert("status".to_owned(), json!(view.status));
    if let Some(output) = &view.output {
        m.insert("output".to_owned(), output.clone());
    }
    if let Some(e) = view.error.as_ref().filter(|_| !matches!(view.state, RunStatus::Succeeded)) {
        let mut err = Map::new();
        err.insert("kind".to_owned(), json!(e.kind));
        if let Some(name) = &e.name {
            err.insert("name".to_owned(), json!(name));
        }
        err.insert("message".to_owned(), json!(e.message));
        m.insert("error".to_owned(), Value::Object(err));
    }
    Value::Object(m)
}

/// A difference between two JSON documents, at a JSON Pointer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Change {
    Added { path: String, after: Value },
    Removed { path: String, before: Value },
    Changed { path: String, before: Value, after: Value },
}

/// The differences between `before` and `after`: objects are compared key by key, arrays index by
/// index (an element past the other's end is added or removed), anything else as a whole.
pub fn diff(before: &Value, after: &Value) -> Vec<Change> {
    let mut out = Vec::new();
    diff_at(String::new(), before, after, &mut out);
    out
}

fn diff_at(path: String, before: &Value, after: &Value, out: &mut Vec<Change>) {
    match (before, after) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))).collect();
            keys.sort();
            for k in keys {
                let p = format!("{path}/{}", k.replace('~', "~0").replace('/', "~1"));
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff_at(p, x, y, out),
                    (Some(x), None) => out.push(Change::Removed { path: p, before: x.clone() }),
                    (None, Some(y)) => out.push(Change::Added { path: p, after: y.clone() }),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for i in 0..a.len().max(b.len()) {
                let p = format!("{path}/{i}");
                match (a.get(i), b.get(i)) {
                    (Some(x), Some(y)) => diff_at(p, x, y, out),
                    (Some(x), None) => out.push(Change::Removed { path: p, before: x.clone() }),
                    (None, Some(y)) => out.push(Change::Added { path: p, after: y.clone() }),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(Change::Changed { path, before: a.clone(), after: b.clone() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_every_added_removed_and_changed_path() {
        let before = json!({"status": "failed", "error": {"kind": "user_error", "message": "boom"}, "a/b": [1, 2, 3]});
        let after = json!({"status": "succeeded", "output": {"sum": 3}, "a/b": [1, 5]});
        assert_eq!(
            diff(&before, &after),
            [
                Change::Changed { path: "/a~1b/1".into(), before: json!(2), after: json!(5) },
                Change::Removed { path: "/a~1b/2".into(), before: json!(3) },
                Change::Removed { path: "/error".into(), before: json!({"kind": "user_error", "message": "boom"}) },
                Change::Added { path: "/output".into(), after: json!({"sum": 3}) },
                Change::Changed { path: "/status".into(), before: json!("failed"), after: json!("succeeded") },
            ]
        );
        assert!(diff(&before, &before).is_empty());
        assert_eq!(
            diff(&json!(1), &json!("1")),
            [Change::Changed { path: String::new(), before: json!(1), after: json!("1") }]
        );
    }

    #[test]
    fn versions_parse() {
        assert_eq!("recorded".parse(), Ok(ReplayVersion::Recorded));
        assert_eq!("latest".parse(), Ok(ReplayVersion::Latest));
        assert_eq!("3".parse(), Ok(ReplayVersion::Exact(3)));
        assert!("newest".parse::<ReplayVersion>().unwrap_err().contains("recorded, latest or a version number"));
    }
}
