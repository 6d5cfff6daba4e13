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

pub use rebuild::{Difference, VerifyReport, rebuild, verify};
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
    pub fn create_sql(&self, prefix: &str) -> String {
        self.create.replace("{table}", &format!("{prefix}{}", self.name))
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
