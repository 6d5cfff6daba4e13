//! The tool catalog: each tool's current version, state and definition, as of the log.

use async_trait::async_trait;
use chrono::SecondsFormat;
use kiln_proto::{DomainEvent, RecordedEvent};

use crate::Result;
use crate::projection::{Projection, SqlValue, Stmt, TableSpec, WriteTx};

/// Tool states as stored: `enabled`, `disabled`, `deleted`.
pub mod state {
    pub const ENABLED: &str = "enabled";
    pub const DISABLED: &str = "disabled";
    pub const DELETED: &str = "deleted";
}

#[derive(Debug, Clone, Copy)]
pub struct ToolCatalog;

const TABLES: &[TableSpec] = &[TableSpec {
    name: "tool_catalog",
    create: "CREATE TABLE {table} (
        name            TEXT   PRIMARY KEY,
        state           TEXT   NOT NULL,
        current_version BIGINT NOT NULL,
        code_sha256     TEXT   NOT NULL,
        title           TEXT,
        description     TEXT   NOT NULL,
        definition      TEXT   NOT NULL,
        created_by      TEXT   NOT NULL,
        created_at      TEXT   NOT NULL,
        updated_by      TEXT   NOT NULL,
        updated_at      TEXT   NOT NULL,
        last_position   BIGINT NOT NULL
    )",
    columns: &[
        "name",
        "state",
        "current_version",
        "code_sha256",
        "title",
        "description",
        "definition",
        "created_by",
        "created_at",
        "updated_by",
        "updated_at",
        "last_position",
    ],
    key: &["name"],
}];

/// The event's time, as every read model stores times: RFC 3339 UTC with microseconds.
pub fn event_time(e: &RecordedEvent) -> String {
    e.occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

#[async_trait]
impl Projection for ToolCatalog {
    fn name(&self) -> &'static str {
        "tool_catalog"
    }

    fn version(&self) -> u32 {
        1
    }

    fn tables(&self) -> &'static [TableSpec] {
        TABLES
    }

    async fn apply(&self, tx: &mut WriteTx, prefix: &str, e: &RecordedEvent, decoded: &DomainEvent) -> Result<()> {
        let t = format!("{prefix}tool_catalog");
        let actor = e.metadata.actor.as_str();
        let at = event_time(e);
        let pos = SqlValue::from(e.position.0 as i64);
        match decoded {
            DomainEvent::ToolCreated(c) => {
                // A name can be reused after deletion: creation starts a fresh catalog entry.
                let sql = format!(
                    "INSERT INTO {t} (name, state, current_version, code_sha256, title, description, definition,
                        created_by, created_at, updated_by, updated_at, last_position)
                     VALUES ($1, $2, 0, '', NULL, '', '{{}}', $3, $4, $3, $4, $5)
                     ON CONFLICT (name) DO UPDATE SET state = excluded.state, created_by = excluded.created_by,
                        created_at = excluded.created_at, updated_by = excluded.updated_by,
                        updated_at = excluded.updated_at, last_position = excluded.last_position"
                );
                let args = [c.name.as_str().into(), state::ENABLED.into(), actor.into(), at.into(), pos];
                tx.execute(&Stmt::new(sql), &args).await?;
            }
            DomainEvent::ToolVersionPublished(v) => {
                let d = &v.definition;
                let sql = format!(
                    "UPDATE {t} SET current_version = $2, code_sha256 = $3, title = $4, description = $5,
                        definition = $6, updated_by = $7, updated_at = $8, last_position = $9 WHERE name = $1"
                );
                let args = [
                    v.name.as_str().into(),
                    SqlValue::from(i64::from(v.version)),
                    v.code_sha256.as_str().into(),
                    d.title.clone().into(),
                    d.description.as_str().into(),
                    d.to_value().to_string().into(),
                    actor.into(),
                    at.into(),
                    pos,
                ];
                tx.execute(&Stmt::new(sql), &args).await?;
            }
            DomainEvent::ToolEnabled(x) => {
                set_state(tx, &t, x.name.as_str(), state::ENABLED, Change { actor, at, pos }).await?
            }
            DomainEvent::ToolDisabled(x) => {
                set_state(tx, &t, x.name.as_str(), state::DISABLED, Change { actor, at, pos }).await?
            }
            DomainEvent::ToolDeleted(x) => {
                set_state(tx, &t, x.name.as_str(), state::DELETED, Change { actor, at, pos }).await?
            }
            _ => {}
        }
        Ok(())
    }
}

/// Who changed a tool, when, and at which position.
struct Change<'a> {
    actor: &'a str,
    at: String,
    pos: SqlValue,
}

async fn set_state(tx: &mut WriteTx, table: &str, name: &str, state: &str, c: Change<'_>) -> Result<()> {
    let sql =
        format!("UPDATE {table} SET state = $2, updated_by = $3, updated_at = $4, last_position = $5 WHERE name = $1");
    tx.execute(&Stmt::new(sql), &[name.into(), state.into(), c.actor.into(), c.at.into(), c.pos]).await?;
    Ok(())
}
