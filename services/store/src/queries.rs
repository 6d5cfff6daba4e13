//! The read side: typed queries over the read models (runs, tool versions, audit) for the CLI,
//! the HTTP API and MCP. Queries never write, and read whatever the projections have applied;
//! a caller that needs the model current to the log's head catches the projection up first
//! (`catch_up`), as the CLI does when no server runs beside it.
//!
//! Filters arrive as text from flags and query strings and are validated here, once, into
//! typed filters; a bad one is a `QueryError::Invalid` that says what was wrong.

pub mod audit;
pub mod runs;
pub mod tools;

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};

use crate::projection::{ProjectionRunner, RunnerOptions, SqlValue, Stmt, WriteTx};
use crate::{Store, StoreError, projections};

/// Why a query could not be answered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// The caller asked for something malformed: a bad filter, cursor or time.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type QueryResult<T> = std::result::Result<T, QueryError>;

/// A time given as RFC 3339 (`2026-11-22T10:00:00Z`) or a UTC date (`2026-11-22`, midnight).
pub fn parse_time(s: &str) -> QueryResult<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(t.and_utc());
    }
    Err(QueryError::Invalid(format!(
        "invalid time {s:?}: expected RFC 3339 (2026-11-22T10:00:00Z) or a date (2026-11-22)"
    )))
}

/// A time as the read models store it (and so compare it, as text): RFC 3339 UTC, microseconds.
pub fn stored_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Brings the named projections up to the log's head in this process (for a CLI that runs
/// without a server, or a caller that must read its own writes).
pub async fn catch_up(store: &Store, names: &[&str]) -> crate::Result<()> {
    let selected = names.iter().map(|n| projections::by_name(n)).collect::<crate::Result<Vec<_>>>()?;
    let runner = ProjectionRunner::new(store.clone(), selected, RunnerOptions::default());
    runner.prepare().await?;
    runner.catch_up().await
}

/// A `WHERE` clause under construction: conditions with numbered binds.
#[derive(Debug, Default)]
pub(crate) struct Where {
    conditions: Vec<String>,
    pub(crate) args: Vec<SqlValue>,
}

impl Where {
    /// Adds a condition; `{}` in it stands for the next bind.
    pub(crate) fn add(&mut self, condition: &str, value: impl Into<SqlValue>) {
        self.args.push(value.into());
        self.conditions.push(condition.replace("{}", &format!("${}", self.args.len())));
    }

    /// The next bind's placeholder, for a value added with `bind`.
    pub(crate) fn bind(&mut self, value: impl Into<SqlValue>) -> String {
        self.args.push(value.into());
        format!("${}", self.args.len())
    }

    pub(crate) fn sql(&self) -> String {
        if self.conditions.is_empty() { String::new() } else { format!("WHERE {}", self.conditions.join(" AND ")) }
    }
}

/// Runs a read query in a read snapshot.
pub(crate) async fn read_rows(
    store: &Store,
    sql: String,
    args: &[SqlValue],
) -> crate::Result<Vec<Vec<Option<String>>>> {
    let mut tx: WriteTx = store.begin_read().await?;
    let rows = tx.fetch_rows(&Stmt::new(sql), args).await;
    tx.rollback().await?;
    rows
}
