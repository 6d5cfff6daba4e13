//! Tool history: every published version (who, when, code hash) and every change of a tool's
//! state, each row holding the catalog entry as it stood after that change. The catalog at any
//! past position or time is then the latest change of each tool up to it (`kiln tools list
//! --at`). Tool events are rare, so each is written as it comes.

use async_trait::async_trait;
use kiln_proto::{DomainEvent, RecordedEvent};

use super::tool_catalog::{event_time, state};
use crate::Result;
use crate::projection::{Projection, SqlValue, Stmt, TableSpec, WriteTx};

#[derive(Debug, Clone, Copy)]
pub struct ToolVersions;

const TABLES: &[TableSpec] = &[
    TableSpec {
        name: "tool_versions",
        create: "CREATE TABLE {table} (
            name          TEXT   NOT NULL,
            version       BIGINT NOT NULL,
            code_sha256   TEXT   NOT NULL,
            title         TEXT,
            description   TEXT   NOT NULL,
            published_by  TEXT   NOT NULL,
            published_at  TEXT   NOT NULL,
            position      BIGINT NOT NULL,
            PRIMARY KEY (name, version)
        )",
        columns: &[
            "name",
            "version",
            "code_sha256",
            "title",
            "description",
            "published_by",
            "published_at",
            "position",
        ],
        key: &["name", "version"],
    },
    TableSpec {
        name: "tool_history",
        create: "CREATE TABLE {table} (
            position        BIGINT PRIMARY KEY,
            name            TEXT   NOT NULL,
            change          TEXT   NOT NULL,
            state           TEXT   NOT NULL,
            current_version BIGINT NOT NULL,
            actor           TEXT   NOT NULL,
            at              TEXT   NOT NULL
        );
        CREATE INDEX {table}_by_name ON {table} (name, position)",
        columns: &["position", "name", "change", "state", "current_version", "actor", "at"],
        key: &["position"],
    },
];

#[async_trait]
impl Projection for ToolVersions {
    fn name(&self) -> &'static str {
        "tool_versions"
    }

    fn version(&self) -> u32 {
        1
    }

    fn tables(&self) -> &'static [TableSpec] {
        TABLES
    }

    async fn apply(&self, tx: &mut WriteTx, prefix: &str, e: &RecordedEvent, decoded: &DomainEvent) -> Result<()> {
        // (tool, change, state after it if it sets one, version if it publishes one)
        let (tool, change, new_state, version) = match decoded {
            DomainEvent::ToolCreated(c) => (c.name.as_str(), "created", Some(state::ENABLED), None),
            DomainEvent::ToolVersionPublished(v) => (v.name.as_str(), "version_published", None, Some(v.version)),
            DomainEvent::ToolEnabled(x) => (x.name.as_str(), "enabled", Some(state::ENABLED), None),
            DomainEvent::ToolDisabled(x) => (x.name.as_str(), "disabled", Some(state::DISABLED), None),
            DomainEvent::ToolDeleted(x) => (x.name.as_str(), "deleted", Some(state::DELETED), None),
            _ => return Ok(()),
        };
        let (versions, history) = (format!("{prefix}tool_versions"), format!("{prefix}tool_history"));
        let actor = e.metadata.actor.as_str();
        let at = event_time(e);
        let pos = SqlValue::from(e.position.0 as i64);
        if let DomainEvent::ToolVersionPublished(v) = decoded {
            let sql = format!(
                "INSERT INTO {versions} (name, version, code_sha256, title, description, published_by, published_at,
                    position) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            );
            let args = [
                tool.into(),
                SqlValue::from(i64::from(v.version)),
                v.code_sha256.as_str().into(),
                v.definition.title.clone().into(),
                v.definition.description.as_str().into(),
                actor.into(),
                at.clone().into(),
                pos.clone(),
            ];
            tx.execute(&Stmt::new(sql), &args).await?;
        }
        // A change that sets no state keeps the previous one; one that publishes no version keeps
        // the newest (numbers continue across delete and re-create, so the newest is current).
        let sql = format!(
            "INSERT INTO {history} (position, name, change, state, current_version, actor, at)
             VALUES ($1, $2, $3,
                COALESCE($4, (SELECT state FROM {history} WHERE name = $2 ORDER BY position DESC LIMIT 1), $7),
                COALESCE($5, (SELECT MAX(version) FROM {versions} WHERE name = $2), 0), $6, $8)"
        );
        let args = [
            pos,
            tool.into(),
            change.into(),
            SqlValue::Text(new_state.map(str::to_owned)),
            SqlValue::Int(version.map(i64::from)),
            actor.into(),
            state::ENABLED.into(),
            at.into(),
        ];
        tx.execute(&Stmt::new(sql), &args).await?;
        Ok(())
    }
}
