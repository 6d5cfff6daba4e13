//! Projections: read models derived from the log, each with a name, a version, its tables and a
//! checkpoint. A batch of events is applied and the checkpoint advanced in one transaction, so a
//! crash never applies an event twice or skips one. The checkpoint row is locked while a batch is
//! applied, so several processes may run the same projection and each event is still applied once.
//!
//! Projections write portable SQL (`TEXT` and `BIGINT` columns, `$n` placeholders) that runs on
//! both backends, through `WriteTx`. Their tables are named with a prefix, so `verify` can rebuild
//! into scratch tables beside the live ones and compare.

mod rebuild;
mod runner;
mod tx;

use async_trait::async_trait;
use kiln_proto::{DomainEvent, RecordedEvent};

pub use rebuild::{Difference, REBUILD_BATCH, VerifyReport, rebuild, verify};
pub use runner::{ProjectionRunner, ProjectionStatus, RunnerOptions, checkpoint};
pub use tx::{SqlValue, Stmt, WriteTx};

use crate::Result;

/// One table of a read model.
#[derive(Debug, Clone)]
pub struct TableSpec {
    /// The table's name without prefix.
    pub name: &'static str,
    /// `CREATE TABLE {table} (...)` in portable SQL; `{table}` is replaced by the prefixed name.
    pub create: &'static str,
    /// Every column, in the order `verify` compares them.
    pub columns: &'static [&'static str],
    /// The primary key columns, which order rows for comparison.
    pub key: &'static [&'static str],
}

impl TableSpec {
    /// The table and its secondary indexes.
    pub fn create_sql(&self, prefix: &str) -> String {
        self.create.replace("{table}", &format!("{prefix}{}", self.name))
    }

    /// The `CREATE TABLE` statement alone (with its primary key): a rebuild bulk-loads into the
    /// bare table and indexes it afterwards.
    pub fn table_sql(&self, prefix: &str) -> String {
        let table = self.create.split(';').next().unwrap_or_default();
        table.replace("{table}", &format!("{prefix}{}", self.name))
    }

    /// Each secondary index as (its name's suffix after the table's name, its `CREATE INDEX`
    /// statement for the table named `{prefix}{name}`). `create` names every index
    /// `{table}_suffix`, so the prefixed table's index is the prefixed index.
    pub fn indexes(&self, prefix: &str) -> Vec<(&'static str, String)> {
        self.create
            .split(';')
            .skip(1)
            .filter_map(|stmt| {
                let name = stmt.split_whitespace().find(|w| w.starts_with("{table}"))?;
                Some((name.strip_prefix("{table}")?, stmt.trim().replace("{table}", &format!("{prefix}{}", self.name))))
            })
            .collect()
    }
}

/// A read model derived from the log.
#[async_trait]
pub trait Projection: Send + Sync + std::fmt::Debug {
    /// Stable name: the checkpoint's key.
    fn name(&self) -> &'static str;

    /// Bump when the tables or the handlers change meaning: the projection is then rebuilt.
    fn version(&self) -> u32;

    fn tables(&self) -> &'static [TableSpec];

    /// Applies one event. Events of no interest are ignored; every event is decoded first, so an
    /// unknown or malformed event stops the projection with its position instead of being skipped.
    async fn apply(&self, tx: &mut WriteTx, prefix: &str, event: &RecordedEvent, decoded: &DomainEvent) -> Result<()>;

    /// Applies consecutive events, all decoded. The default applies them one by one; a projection
    /// that sees many events (runs, audit) folds a batch in memory and writes it in a few
    /// multi-row statements instead.
    async fn apply_batch(
        &self,
        tx: &mut WriteTx,
        prefix: &str,
        events: &[(&RecordedEvent, DomainEvent)],
    ) -> Result<()> {
        for (e, d) in events {
            self.apply(tx, prefix, e, d).await.map_err(|err| at_position(self.name(), e, err))?;
        }
        Ok(())
    }
}

/// Names the projection and the event's position in an error that does not already.
pub(crate) fn at_position(projection: &str, e: &RecordedEvent, err: crate::StoreError) -> crate::StoreError {
    match err {
        crate::StoreError::Projection { .. } => err,
        other => crate::StoreError::Projection {
            projection: projection.to_owned(),
            position: e.position.0,
            message: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_splits_into_its_bare_table_and_named_indexes() {
        let t = TableSpec {
            name: "runs",
            create: "CREATE TABLE {table} (run_id TEXT PRIMARY KEY, tool TEXT);
                CREATE INDEX {table}_by_tool ON {table} (tool, run_id);
                CREATE UNIQUE INDEX {table}_by_x ON {table} (tool)",
            columns: &["run_id", "tool"],
            key: &["run_id"],
        };
        assert_eq!(t.table_sql("s_"), "CREATE TABLE s_runs (run_id TEXT PRIMARY KEY, tool TEXT)");
        assert_eq!(
            t.indexes("s_"),
            [
                ("_by_tool", "CREATE INDEX s_runs_by_tool ON s_runs (tool, run_id)".to_owned()),
                ("_by_x", "CREATE UNIQUE INDEX s_runs_by_x ON s_runs (tool)".to_owned()),
            ]
        );
        let bare = TableSpec { create: "CREATE TABLE {table} (k TEXT PRIMARY KEY)", ..t };
        assert!(bare.indexes("").is_empty());
    }
}
