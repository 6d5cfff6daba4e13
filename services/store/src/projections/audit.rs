//! The audit log: one row per auditable event, holding the finished audit line
//! (`kiln_proto::audit`, schema version 1, redacted) and the columns exports filter on. Exporting
//! is then a paged read of ready text in position order; nothing is decoded or redacted again.
//!
//! Run outcomes do not name their tool, so the projection remembers each run's tool and version
//! from its `run.requested` (table `audit_run_tools`). Lines are built from the event's type name
//! and raw payload, so event types other crates define (`auth.denied`) are audited by name.

use std::collections::HashMap;

use async_trait::async_trait;
use kiln_proto::audit::{AuditLine, RunTool, action_of};
use kiln_proto::{DomainEvent, RecordedEvent};

use crate::Result;
use crate::projection::{Projection, SqlValue, Stmt, TableSpec, WriteTx};

#[derive(Debug, Clone, Copy)]
pub struct Audit;

const LOG_COLUMNS: &[&str] = &["position", "at", "actor", "action", "tool", "outcome", "line"];

const TABLES: &[TableSpec] = &[
    TableSpec {
        name: "audit_log",
        create: "CREATE TABLE {table} (
            position BIGINT PRIMARY KEY,
            at       TEXT   NOT NULL,
            actor    TEXT   NOT NULL,
            action   TEXT   NOT NULL,
            tool     TEXT,
            outcome  TEXT   NOT NULL,
            line     TEXT   NOT NULL
        );
        CREATE INDEX {table}_by_actor ON {table} (actor, position);
        CREATE INDEX {table}_by_tool ON {table} (tool, position);
        CREATE INDEX {table}_by_action ON {table} (action, position);
        CREATE INDEX {table}_by_time ON {table} (at)",
        columns: LOG_COLUMNS,
        key: &["position"],
    },
    TableSpec {
        name: "audit_run_tools",
        create: "CREATE TABLE {table} (
            run_id  TEXT   PRIMARY KEY,
            tool    TEXT   NOT NULL,
            version BIGINT NOT NULL
        )",
        columns: &["run_id", "tool", "version"],
        key: &["run_id"],
    },
];

/// Rows per multi-row INSERT (7 binds each).
const CHUNK: usize = 1_000;

#[async_trait]
impl Projection for Audit {
    fn name(&self) -> &'static str {
        "audit"
    }

    fn version(&self) -> u32 {
        1
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
        let run_tools_table = format!("{prefix}audit_run_tools");
        let mut tools: HashMap<String, Option<RunTool>> = HashMap::new();
        let mut requested: Vec<(&str, RunTool)> = Vec::new();
        for (e, d) in events {
            let Some(run_id) = e.stream_id.as_str().strip_prefix("run-") else { continue };
            if let DomainEvent::RunRequested(r) = d {
                let rt = RunTool { tool: r.tool.as_str().to_owned(), version: u64::from(r.tool_version) };
                tools.insert(run_id.to_owned(), Some(rt.clone()));
                requested.push((run_id, rt));
            } else if d.is_run_terminal() {
                tools.entry(run_id.to_owned()).or_insert(None);
            }
        }
        let unknown: Vec<String> = tools.iter().filter(|(_, t)| t.is_none()).map(|(id, _)| id.clone()).collect();
        for chunk in unknown.chunks(CHUNK) {
            let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT run_id, tool, CAST(version AS TEXT) FROM {run_tools_table} WHERE run_id IN ({})",
                marks.join(", ")
            );
            let args: Vec<SqlValue> = chunk.iter().map(|id| id.as_str().into()).collect();
            for row in tx.fetch_rows(&Stmt::new(sql), &args).await? {
                if let [Some(id), Some(tool), version] = row.as_slice() {
                    let version = version.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0);
                    tools.insert(id.clone(), Some(RunTool { tool: tool.clone(), version }));
                }
            }
        }

        let mut rows: Vec<SqlValue> = Vec::new();
        let mut count = 0;
        for (e, _) in events {
            if action_of(&e.event_type).is_none() {
                continue;
            }
            let run_id = e.stream_id.as_str().strip_prefix("run-");
            let run = run_id.and_then(|id| tools.get(id)).and_then(Option::as_ref);
            let Some(line) = AuditLine::from_event(e, run) else { continue };
            let tool = match line.target.kind {
                "tool" => Some(line.target.id.clone()),
                _ => line.target.tool.clone(),
            };
            rows.extend([
                SqlValue::from(line.position as i64),
                line.time.as_str().into(),
                line.actor.as_str().into(),
                line.action.into(),
                tool.into(),
                line.outcome.into(),
                line.to_json().into(),
            ]);
            count += 1;
            if count == CHUNK {
                insert(tx, &format!("{prefix}audit_log"), LOG_COLUMNS, std::mem::take(&mut rows)).await?;
                count = 0;
            }
        }
        if count > 0 {
            insert(tx, &format!("{prefix}audit_log"), LOG_COLUMNS, rows).await?;
        }
        for chunk in requested.chunks(CHUNK) {
            let args: Vec<SqlValue> = chunk
                .iter()
                .flat_map(|(id, rt)| [(*id).into(), rt.tool.as_str().into(), SqlValue::from(rt.version as i64)])
                .collect();
            insert(tx, &run_tools_table, &["run_id", "tool", "version"], args).await?;
        }
        Ok(())
    }
}

/// One multi-row INSERT of `args` (a whole number of rows of `columns`).
async fn insert(tx: &mut WriteTx, table: &str, columns: &[&str], args: Vec<SqlValue>) -> Result<()> {
    let n = columns.len();
    let tuples: Vec<String> = (0..args.len() / n)
        .map(|r| format!("({})", (1..=n).map(|c| format!("${}", r * n + c)).collect::<Vec<_>>().join(", ")))
        .collect();
    let sql = format!("INSERT INTO {table} ({}) VALUES {}", columns.join(", "), tuples.join(", "));
    tx.execute(&Stmt::new(sql), &args).await?;
    Ok(())
}
