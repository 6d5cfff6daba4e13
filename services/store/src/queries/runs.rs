//! Runs: one run with its arguments, children and replays (`get`), a filtered page of runs
//! newest first (`list`), and every event of a run as a timeline (`timeline`, read from the log
//! itself, so it is never behind).

use std::str::FromStr;

use chrono::{DateTime, Utc};
use kiln_proto::{RecordedEvent, RunId, StreamId, StreamVersion, ToolName};
use serde::Serialize;
use serde_json::Value;

use super::{QueryError, QueryResult, Where, read_rows, stored_time};
use crate::{EventStore, Store};

/// A run's status as stored and filtered on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Running,
    RetryScheduled,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl Status {
    pub const ALL: &[Status] = &[
        Self::Queued,
        Self::Running,
        Self::RetryScheduled,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::RetryScheduled => "retry_scheduled",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled | Self::TimedOut)
    }
}

impl FromStr for Status {
    type Err = QueryError;
    fn from_str(s: &str) -> QueryResult<Status> {
        Self::ALL.iter().copied().find(|x| x.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|x| x.as_str()).collect();
            QueryError::Invalid(format!("unknown run status {s:?}: expected one of {}", names.join(", ")))
        })
    }
}

/// Which runs to list. Every field narrows the selection; times bound the request time
/// (`since` inclusive, `until` exclusive).
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub tool: Option<ToolName>,
    pub status: Option<Status>,
    pub actor: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub parent_run: Option<RunId>,
    pub replay_of: Option<RunId>,
}

/// One run as listed.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    pub run_id: RunId,
    pub tool: String,
    pub tool_version: u32,
    pub status: String,
    pub attempts: u32,
    pub actor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_run: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<String>,
    pub requested_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    /// From request to outcome, for ended runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    /// From the first attempt's start to the outcome, for ended runs that started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    /// The log position of the last event applied to this row.
    pub position: u64,
}

/// A page of runs, newest first; `next_cursor` continues after the last one.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunPage {
    pub runs: Vec<RunSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// One run in full: its summary, the arguments it was requested with, its child runs and the
/// runs that replayed it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunDetail {
    #[serde(flatten)]
    pub summary: RunSummary,
    pub arguments: Value,
    pub children: Vec<RunSummary>,
    pub replays: Vec<RunSummary>,
}

/// The most runs one page holds.
pub const MAX_PAGE: usize = 1_000;

const COLUMNS: &str = "run_id, tool, CAST(tool_version AS TEXT), status, CAST(attempts AS TEXT), actor,
    idempotency_key, parent_run, replay_of, requested_at, started_at, finished_at, next_attempt_at, output, error,
    CAST(last_position AS TEXT)";

/// A page of runs matching `filter`, newest first, after `cursor` (the previous page's
/// `next_cursor`). `limit` is capped at `MAX_PAGE`.
pub async fn list(store: &Store, filter: &RunFilter, cursor: Option<&str>, limit: usize) -> QueryResult<RunPage> {
    let limit = limit.clamp(1, MAX_PAGE);
    let mut w = Where::default();
    if let Some(t) = &filter.tool {
        w.add("tool = {}", t.as_str());
    }
    if let Some(s) = filter.status {
        w.add("status = {}", s.as_str());
    }
    if let Some(a) = &filter.actor {
        w.add("actor = {}", a.as_str());
    }
    if let Some(t) = &filter.since {
        w.add("requested_at >= {}", stored_time(t));
    }
    if let Some(t) = &filter.until {
        w.add("requested_at < {}", stored_time(t));
    }
    if let Some(p) = filter.parent_run {
        w.add("parent_run = {}", p.to_string());
    }
    if let Some(r) = filter.replay_of {
        w.add("replay_of = {}", r.to_string());
    }
    if let Some(c) = cursor {
        let id = RunId::from_str(c)
            .map_err(|_| QueryError::Invalid(format!("invalid cursor {c:?}: pass a previous page's nextCursor")))?;
        w.add("run_id < {}", id.to_string());
    }
    let limit_mark = w.bind((limit + 1) as i64);
    let sql = format!("SELECT {COLUMNS} FROM runs {} ORDER BY run_id DESC LIMIT {limit_mark}", w.sql());
    let mut runs = read_rows(store, sql, &w.args).await?.into_iter().map(summary).collect::<QueryResult<Vec<_>>>()?;
    let next_cursor = if runs.len() > limit {
        runs.truncate(limit);
        runs.last().map(|r| r.run_id.to_string())
    } else {
        None
    };
    Ok(RunPage { runs, next_cursor })
}

/// One run with its arguments, children and replays; None if the read model has no such run.
pub async fn get(store: &Store, run_id: RunId) -> QueryResult<Option<RunDetail>> {
    let sql = format!("SELECT {COLUMNS} FROM runs WHERE run_id = $1");
    let Some(row) = read_rows(store, sql, &[run_id.to_string().into()]).await?.into_iter().next() else {
        return Ok(None);
    };
    let summary = summary(row)?;
    let first = store.read_stream(&StreamId::run(run_id), StreamVersion(0), 1).await?;
    let arguments = first.first().map(|e| e.payload_value()["arguments"].clone()).unwrap_or(Value::Null);
    let children = all(store, &RunFilter { parent_run: Some(run_id), ..RunFilter::default() }).await?;
    let replays = all(store, &RunFilter { replay_of: Some(run_id), ..RunFilter::default() }).await?;
    Ok(Some(RunDetail { summary, arguments, children, replays }))
}

/// Every run matching `filter` (for short lists: children, replays, bulk replay selections).
pub async fn all(store: &Store, filter: &RunFilter) -> QueryResult<Vec<RunSummary>> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = list(store, filter, cursor.as_deref(), MAX_PAGE).await?;
        out.extend(page.runs);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(out),
        }
    }
}

/// One event of a run, as `kiln runs show` and `run_get` present it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TimelineEntry {
    pub position: u64,
    pub stream_version: u64,
    pub at: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub actor: String,
    /// The event's payload as recorded (types this version does not know included).
    pub payload: Value,
}

/// Every event of a run's stream, in order, straight from the log. Empty if there is no such run.
pub async fn timeline(store: &Store, run_id: RunId) -> QueryResult<Vec<TimelineEntry>> {
    let stream = StreamId::run(run_id);
    let mut out: Vec<TimelineEntry> = Vec::new();
    loop {
        let after = StreamVersion(out.last().map_or(0, |e| e.stream_version));
        let page = store.read_stream(&stream, after, 1_000).await?;
        if page.is_empty() {
            return Ok(out);
        }
        out.extend(page.iter().map(entry));
    }
}

fn entry(e: &RecordedEvent) -> TimelineEntry {
    TimelineEntry {
        position: e.position.0,
        stream_version: e.stream_version.0,
        at: stored_time(&e.occurred_at),
        event_type: e.event_type.clone(),
        actor: e.metadata.actor.as_str().to_owned(),
        payload: e.payload_value(),
    }
}

fn summary(row: Vec<Option<String>>) -> QueryResult<RunSummary> {
    let corrupt = |what: &str| QueryError::Invalid(format!("runs read model has a malformed {what}"));
    let mut it = row.into_iter();
    let mut next = || it.next().flatten();
    let run_id = next().and_then(|s| RunId::from_str(&s).ok()).ok_or_else(|| corrupt("run id"))?;
    let tool = next().unwrap_or_default();
    let tool_version = next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let status = next().unwrap_or_default();
    let attempts = next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let actor = next().unwrap_or_default();
    let idempotency_key = next();
    let parent_run = next();
    let replay_of = next();
    let requested_at = next().unwrap_or_default();
    let started_at = next();
    let finished_at = next();
    let next_attempt_at = next();
    let output = next().and_then(|s| serde_json::from_str(&s).ok());
    let error = next().and_then(|s| serde_json::from_str(&s).ok());
    let position = next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let between = |a: Option<&str>, b: Option<&str>| -> Option<f64> {
        let a = DateTime::parse_from_rfc3339(a?).ok()?;
        let b = DateTime::parse_from_rfc3339(b?).ok()?;
        Some((b - a).num_microseconds()? as f64 / 1_000.0)
    };
    let duration_ms = between(Some(&requested_at), finished_at.as_deref());
    let execution_ms = between(started_at.as_deref(), finished_at.as_deref());
    Ok(RunSummary {
        run_id,
        tool,
        tool_version,
        status,
        attempts,
        actor,
        idempotency_key,
        parent_run,
        replay_of,
        requested_at,
        started_at,
        finished_at,
        next_attempt_at,
        duration_ms,
        execution_ms,
        output,
        error,
        position,
    })
}
