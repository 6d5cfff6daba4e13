//! Tools through time: the catalog as it stood at a past position or time (`catalog_at`), and
//! every published version of a tool (`versions`), from the `tool_versions` read model.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{QueryError, QueryResult, read_rows, stored_time};
use crate::Store;

/// A point in the log's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// After the event at this global position was applied.
    Position(u64),
    /// After every event that occurred at or before this time.
    Time(DateTime<Utc>),
}

impl FromStr for At {
    type Err = QueryError;
    /// A bare number is a position; anything else must be a time (RFC 3339 or a date).
    fn from_str(s: &str) -> QueryResult<At> {
        if let Ok(p) = s.parse::<u64>() {
            return Ok(At::Position(p));
        }
        super::parse_time(s).map(At::Time).map_err(|_| {
            QueryError::Invalid(format!(
                "invalid --at {s:?}: expected a log position (e.g. 1200) or a time (RFC 3339 or YYYY-MM-DD)"
            ))
        })
    }
}

/// A tool as the catalog showed it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CatalogEntry {
    pub name: String,
    /// `enabled`, `disabled` or `deleted`.
    pub state: String,
    pub version: u32,
    pub code_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub description: Option<String>,
    /// Who made the last change before the point asked for, when, and at which position.
    pub changed_by: String,
    pub changed_at: String,
    pub position: u64,
}

/// The catalog at `at`, by name; deleted tools only if `include_deleted`.
pub async fn catalog_at(store: &Store, at: At, include_deleted: bool) -> QueryResult<Vec<CatalogEntry>> {
    let (column, bound) = match at {
        At::Position(p) => ("position", i64::try_from(p).unwrap_or(i64::MAX).into()),
        At::Time(t) => ("at", stored_time(&t).into()),
    };
    let sql = format!(
        "SELECT h.name, h.state, CAST(h.current_version AS TEXT), v.code_sha256, v.title, v.description, h.actor, h.at,
            CAST(h.position AS TEXT)
         FROM tool_history h LEFT JOIN tool_versions v ON v.name = h.name AND v.version = h.current_version
         WHERE h.position = (SELECT MAX(x.position) FROM tool_history x WHERE x.name = h.name AND x.{column} <= $1)
         ORDER BY h.name"
    );
    let rows = read_rows(store, sql, &[bound]).await?;
    let entries = rows.into_iter().map(|r| {
        let mut it = r.into_iter();
        let mut next = || it.next().flatten();
        CatalogEntry {
            name: next().unwrap_or_default(),
            state: next().unwrap_or_default(),
            version: next().and_then(|v| v.parse().ok()).unwrap_or(0),
            code_sha256: next(),
            title: next(),
            description: next(),
            changed_by: next().unwrap_or_default(),
            changed_at: next().unwrap_or_default(),
            position: next().and_then(|v| v.parse().ok()).unwrap_or(0),
        }
    });
    Ok(entries.filter(|e| include_deleted || e.state != "deleted").collect())
}

/// One published version of a tool.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionEntry {
    pub version: u32,
    pub code_sha256: String,
    pub published_by: String,
    pub published_at: String,
    pub position: u64,
}

/// Every version of a tool, oldest first.
pub async fn versions(store: &Store, tool: &str) -> QueryResult<Vec<VersionEntry>> {
    let sql = "SELECT CAST(version AS TEXT), code_sha256, published_by, published_at, CAST(position AS TEXT)
               FROM tool_versions WHERE name = $1 ORDER BY version";
    let rows = read_rows(store, sql.to_owned(), &[tool.into()]).await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let mut it = r.into_iter();
            let mut next = || it.next().flatten();
            VersionEntry {
                version: next().and_then(|v| v.parse().ok()).unwrap_or(0),
                code_sha256: next().unwrap_or_default(),
                published_by: next().unwrap_or_default(),
                published_at: next().unwrap_or_default(),
                position: next().and_then(|v| v.parse().ok()).unwrap_or(0),
            }
        })
        .collect())
}
