//! The runs read model: one row per run with its tool, status, attempts, timing, outcome and
//! links (parent run, replay of). The worker decides from the run stream itself; this table serves
//! listing (`kiln runs list`, `/v1/runs`, MCP `run_list`), recovery scans and dashboards.
//!
//! A batch of events is folded in memory: the rows of the runs it touches are read once (runs
//! requested in the batch start from nothing), every event is applied to its row, and the rows
//! are written back in multi-row upserts. Rebuilding the log therefore costs a few statements per
//! thousand events instead of one per event.

use std::collections::HashMap;

use async_trait::async_trait;
use kiln_proto::events::RetryDecision;
use kiln_proto::{DomainEvent, RecordedEvent};

use super::tool_catalog::event_time;
use crate::Result;
use crate::projection::{Projection, SqlValue, Stmt, TableSpec, WriteTx};

#[derive(Debug, Clone, Copy)]
pub struct Runs;

/// Every column, in table order: the row struct below reads and writes them in this order.
const COLUMNS: &[&str] = &[
    "run_id",
    "tool",
    "tool_version",
    "status",
    "attempts",
    "actor",
    "idempotency_key",
    "parent_run",
    "replay_of",
    "requested_at",
    "started_at",
    "finished_at",
    "next_attempt_at",
    "output",
    "error",
    "error_kind",
    "updated_at",
    "last_position",
];

const TABLES: &[TableSpec] = &[TableSpec {
    name: "runs",
    create: "CREATE TABLE {table} (
        run_id          TEXT   PRIMARY KEY,
        tool            TEXT   NOT NULL,
        tool_version    BIGINT NOT NULL,
        status          TEXT   NOT NULL,
        attempts        BIGINT NOT NULL,
        actor           TEXT   NOT NULL,
        idempotency_key TEXT,
        parent_run      TEXT,
        replay_of       TEXT,
        requested_at    TEXT   NOT NULL,
        started_at      TEXT,
        finished_at     TEXT,
        next_attempt_at TEXT,
        output          TEXT,
        error           TEXT,
        error_kind      TEXT,
        updated_at      TEXT   NOT NULL,
        last_position   BIGINT NOT NULL
    );
    CREATE INDEX {table}_by_tool ON {table} (tool, run_id);
    CREATE INDEX {table}_by_status ON {table} (status, run_id);
    CREATE INDEX {table}_by_actor ON {table} (actor, run_id);
    CREATE INDEX {table}_by_parent ON {table} (parent_run);
    CREATE INDEX {table}_by_replay ON {table} (replay_of)",
    columns: COLUMNS,
    key: &["run_id"],
}];

/// Rows per multi-row upsert: 18 binds each stays below both backends' bind limits.
const UPSERT_CHUNK: usize = 500;

#[async_trait]
impl Projection for Runs {
    fn name(&self) -> &'static str {
        "runs"
    }

    fn version(&self) -> u32 {
        2
    }

    fn tables(&self) -> &'static [TableSpec] {
        TABLES
    }

    async fn apply(&self, tx: &mut WriteTx, prefix: &str, e: &RecordedEvent, decoded: &DomainEvent) -> Result<()> {
        self.apply_batch(tx, prefix, &[(e, decoded.clone())]).await
    }

    async fn apply_batch(
        &self,
        tx: &mut WriteTx,
        prefix: &str,
        events: &[(&RecordedEvent, DomainEvent)],
    ) -> Result<()> {
        let t = format!("{prefix}runs");
        let mut rows: HashMap<String, Option<RunRow>> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        // Runs this batch did not request: their rows are read once, up front.
        let mut missing: Vec<String> = Vec::new();
        for (e, d) in events {
            let Some(run_id) = e.stream_id.as_str().strip_prefix("run-") else { continue };
            if !is_run_event(d) || rows.contains_key(run_id) {
                continue;
            }
            if !matches!(d, DomainEvent::RunRequested(_)) {
                missing.push(run_id.to_owned());
            }
            rows.insert(run_id.to_owned(), None);
            order.push(run_id.to_owned());
        }
        for chunk in missing.chunks(UPSERT_CHUNK) {
            let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!("SELECT {} FROM {t} WHERE run_id IN ({})", select_list(), marks.join(", "));
            let args: Vec<SqlValue> = chunk.iter().map(|id| id.as_str().into()).collect();
            for row in tx.fetch_rows(&Stmt::new(sql), &args).await? {
                let row = RunRow::from_text(row);
                rows.insert(row.run_id.clone(), Some(row));
            }
        }
        for (e, d) in events {
            let Some(run_id) = e.stream_id.as_str().strip_prefix("run-") else { continue };
            if let Some(slot) = rows.get_mut(run_id) {
                apply(slot, run_id, e, d);
            }
        }
        let written: Vec<&RunRow> = order.iter().filter_map(|id| rows.get(id).and_then(Option::as_ref)).collect();
        for chunk in written.chunks(UPSERT_CHUNK) {
            upsert(tx, &t, chunk).await?;
        }
        Ok(())
    }
}

fn is_run_event(d: &DomainEvent) -> bool {
    matches!(
        d,
        DomainEvent::RunRequested(_)
            | DomainEvent::RunAttemptStarted(_)
            | DomainEvent::RunAttemptFailed(_)
            | DomainEvent::RunSucceeded(_)
            | DomainEvent::RunFailed(_)
            | DomainEvent::RunCancelled(_)
            | DomainEvent::RunTimedOut(_)
    )
}

/// One run's row, as stored.
#[derive(Debug, Clone, Default)]
struct RunRow {
    run_id: String,
    tool: String,
    tool_version: i64,
    status: String,
    attempts: i64,
    actor: String,
    idempotency_key: Option<String>,
    parent_run: Option<String>,
    replay_of: Option<String>,
    requested_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    next_attempt_at: Option<String>,
    output: Option<String>,
    error: Option<String>,
    error_kind: Option<String>,
    updated_at: String,
    last_position: i64,
}

fn select_list() -> String {
    COLUMNS
        .iter()
        .map(|c| {
            if matches!(*c, "tool_version" | "attempts" | "last_position") {
                format!("CAST({c} AS TEXT)")
            } else {
                (*c).to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl RunRow {
    fn from_text(row: Vec<Option<String>>) -> RunRow {
        let mut it = row.into_iter();
        let mut next = || it.next().flatten();
        let int = |s: Option<String>| s.and_then(|s| s.parse().ok()).unwrap_or(0);
        RunRow {
            run_id: next().unwrap_or_default(),
            tool: next().unwrap_or_default(),
            tool_version: int(next()),
            status: next().unwrap_or_default(),
            attempts: int(next()),
            actor: next().unwrap_or_default(),
            idempotency_key: next(),
            parent_run: next(),
            replay_of: next(),
            requested_at: next().unwrap_or_default(),
            started_at: next(),
            finished_at: next(),
            next_attempt_at: next(),
            output: next(),
            error: next(),
            error_kind: next(),
            updated_at: next().unwrap_or_default(),
            last_position: int(next()),
        }
    }

    fn into_values(self, out: &mut Vec<SqlValue>) {
        out.extend([
            self.run_id.into(),
            self.tool.into(),
            self.tool_version.into(),
            self.status.into(),
            self.attempts.into(),
            self.actor.into(),
            self.idempotency_key.into(),
            self.parent_run.into(),
            self.replay_of.into(),
            self.requested_at.into(),
            self.started_at.into(),
            self.finished_at.into(),
            self.next_attempt_at.into(),
            self.output.into(),
            self.error.into(),
            self.error_kind.into(),
            self.updated_at.into(),
            self.last_position.into(),
        ]);
    }
}

/// Applies one event to its run's row (`None`: the run has no row yet).
fn apply(slot: &mut Option<RunRow>, run_id: &str, e: &RecordedEvent, d: &DomainEvent) {
    let at = event_time(e);
    if let DomainEvent::RunRequested(r) = d {
        *slot = Some(RunRow {
            run_id: run_id.to_owned(),
            tool: r.tool.as_str().to_owned(),
            tool_version: i64::from(r.tool_version),
            status: "queued".to_owned(),
            attempts: 0,
            actor: e.metadata.actor.as_str().to_owned(),
            idempotency_key: r.idempotency_key.clone(),
            parent_run: r.parent_run.map(|p| p.to_string()),
            replay_of: r.replay_of.map(|p| p.to_string()),
            requested_at: at.clone(),
            updated_at: at,
            last_position: e.position.0 as i64,
            ..RunRow::default()
        });
        return;
    }
    // An event for a run the table has no row for (its request was never seen) changes nothing,
    // as the single-statement UPDATEs of version 1 did.
    let Some(row) = slot else { return };
    match d {
        DomainEvent::RunAttemptStarted(a) => {
            row.status = "running".to_owned();
            row.attempts = i64::from(a.attempt);
            row.started_at.get_or_insert_with(|| at.clone());
            row.next_attempt_at = None;
        }
        DomainEvent::RunAttemptFailed(f) => {
            let (status, next) = match &f.retry {
                RetryDecision::Retry { next_attempt_at, .. } => ("retry_scheduled", Some(time(next_attempt_at))),
                RetryDecision::GiveUp { .. } => ("running", None),
            };
            row.status = status.to_owned();
            row.next_attempt_at = next;
            row.error = Some(json(&f.error));
            row.error_kind = Some(f.error.kind.as_str().to_owned());
        }
        DomainEvent::RunSucceeded(s) => {
            row.finish("succeeded", &at);
            row.output = Some(s.output.to_string());
        }
        DomainEvent::RunFailed(f) => {
            row.finish("failed", &at);
            row.error = Some(json(&f.error));
            row.error_kind = Some(f.error.kind.as_str().to_owned());
        }
        DomainEvent::RunCancelled(_) => row.finish("cancelled", &at),
        DomainEvent::RunTimedOut(_) => row.finish("timed_out", &at),
        _ => return,
    }
    row.updated_at = at;
    row.last_position = e.position.0 as i64;
}

impl RunRow {
    fn finish(&mut self, status: &str, at: &str) {
        self.status = status.to_owned();
        self.finished_at = Some(at.to_owned());
        self.next_attempt_at = None;
    }
}

async fn upsert(tx: &mut WriteTx, table: &str, rows: &[&RunRow]) -> Result<()> {
    let n = COLUMNS.len();
    let tuples: Vec<String> = (0..rows.len())
        .map(|r| {
            let marks: Vec<String> = (1..=n).map(|c| format!("${}", r * n + c)).collect();
            format!("({})", marks.join(", "))
        })
        .collect();
    let updates: Vec<String> = COLUMNS[1..].iter().map(|c| format!("{c} = excluded.{c}")).collect();
    let sql = format!(
        "INSERT INTO {table} ({}) VALUES {} ON CONFLICT (run_id) DO UPDATE SET {}",
        COLUMNS.join(", "),
        tuples.join(", "),
        updates.join(", ")
    );
    let mut args = Vec::with_capacity(rows.len() * n);
    for row in rows {
        (*row).clone().into_values(&mut args);
    }
    tx.execute(&Stmt::new(sql), &args).await?;
    Ok(())
}

fn time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}
