//! The runs read model: one row per run with its tool, status, attempts, timing, outcome and
//! links (parent run, replay of). Written event by event; the worker decides from the run stream
//! itself, this table serves listing, recovery scans and dashboards.

use async_trait::async_trait;
use kiln_proto::events::RetryDecision;
use kiln_proto::{DomainEvent, RecordedEvent};

use super::tool_catalog::event_time;
use crate::Result;
use crate::projection::{Projection, SqlValue, Stmt, TableSpec, WriteTx};

#[derive(Debug, Clone, Copy)]
pub struct Runs;

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
        updated_at      TEXT   NOT NULL,
        last_position   BIGINT NOT NULL
    )",
    columns: &[
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
        "updated_at",
        "last_position",
    ],
    key: &["run_id"],
}];

#[async_trait]
impl Projection for Runs {
    fn name(&self) -> &'static str {
        "runs"
    }

    fn version(&self) -> u32 {
        1
    }

    fn tables(&self) -> &'static [TableSpec] {
        TABLES
    }

    async fn apply(&self, tx: &mut WriteTx, prefix: &str, e: &RecordedEvent, decoded: &DomainEvent) -> Result<()> {
        let t = format!("{prefix}runs");
        let Some(run_id) = e.stream_id.as_str().strip_prefix("run-") else { return Ok(()) };
        let at = event_time(e);
        let pos = SqlValue::from(e.position.0 as i64);
        let (sql, args): (String, Vec<SqlValue>) = match decoded {
            DomainEvent::RunRequested(r) => (
                format!(
                    "INSERT INTO {t} (run_id, tool, tool_version, status, attempts, actor, idempotency_key, parent_run,
                        replay_of, requested_at, updated_at, last_position)
                     VALUES ($1, $2, $3, 'queued', 0, $4, $5, $6, $7, $8, $8, $9)"
                ),
                vec![
                    run_id.into(),
                    r.tool.as_str().into(),
                    SqlValue::from(i64::from(r.tool_version)),
                    e.metadata.actor.as_str().into(),
                    r.idempotency_key.clone().into(),
                    r.parent_run.map(|p| p.to_string()).into(),
                    r.replay_of.map(|p| p.to_string()).into(),
                    at.into(),
                    pos,
                ],
            ),
            DomainEvent::RunAttemptStarted(a) => (
                format!(
                    "UPDATE {t} SET status = 'running', attempts = $2, started_at = COALESCE(started_at, $3),
                        next_attempt_at = NULL, updated_at = $3, last_position = $4 WHERE run_id = $1"
                ),
                vec![run_id.into(), SqlValue::from(i64::from(a.attempt)), at.into(), pos],
            ),
            DomainEvent::RunAttemptFailed(f) => {
                let (status, next) = match &f.retry {
                    RetryDecision::Retry { next_attempt_at, .. } => ("retry_scheduled", Some(time(next_attempt_at))),
                    RetryDecision::GiveUp { .. } => ("running", None),
                };
                (
                    format!(
                        "UPDATE {t} SET status = $2, next_attempt_at = $3, error = $4, updated_at = $5,
                            last_position = $6 WHERE run_id = $1"
                    ),
                    vec![run_id.into(), status.into(), next.into(), json(&f.error).into(), at.into(), pos],
                )
            }
            DomainEvent::RunSucceeded(s) => {
                Outcome { status: "succeeded", output: Some(s.output.to_string()), error: None }
                    .sql(&t, run_id, at, pos)
            }
            DomainEvent::RunFailed(f) => {
                Outcome { status: "failed", output: None, error: Some(json(&f.error)) }.sql(&t, run_id, at, pos)
            }
            DomainEvent::RunCancelled(_) => {
                Outcome { status: "cancelled", output: None, error: None }.sql(&t, run_id, at, pos)
            }
            DomainEvent::RunTimedOut(_) => {
                Outcome { status: "timed_out", output: None, error: None }.sql(&t, run_id, at, pos)
            }
            _ => return Ok(()),
        };
        tx.execute(&Stmt::new(sql), &args).await?;
        Ok(())
    }
}

/// How a run ended.
struct Outcome {
    status: &'static str,
    output: Option<String>,
    error: Option<String>,
}

impl Outcome {
    fn sql(self, t: &str, run_id: &str, at: String, pos: SqlValue) -> (String, Vec<SqlValue>) {
        let sql = format!(
            "UPDATE {t} SET status = $2, output = $3, error = COALESCE($4, error), finished_at = $5,
                next_attempt_at = NULL, updated_at = $5, last_position = $6 WHERE run_id = $1"
        );
        (sql, vec![run_id.into(), self.status.into(), self.output.into(), self.error.into(), at.into(), pos])
    }
}

fn time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}
