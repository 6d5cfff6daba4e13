//! The audit export: the audit read model's lines (JSON, one per auditable event, schema in
//! `kiln_proto::audit`), filtered and in position order, as a stream of text chunks. Memory stays
//! flat however long the export: a page at a time is read (keyset on position), and each page
//! arrives from the database as one text (`group_concat` / `string_agg`) rather than row by row.

use chrono::{DateTime, Utc};
use futures::Stream;
use kiln_proto::audit::AUDITED;

use super::{QueryError, QueryResult, Where, read_rows, stored_time};
use crate::{Backend, Store};

/// Which audit lines to export. Every field narrows the selection; times bound the event time
/// (`since` inclusive, `until` exclusive).
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub actor: Option<String>,
    /// A tool's name: its own changes and its runs.
    pub tool: Option<String>,
    pub action: Option<ActionFilter>,
    /// Only lines after this position (to resume an export).
    pub after: Option<u64>,
}

/// An action (`run.failed`) or every action of a kind (`run.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionFilter {
    Exact(String),
    Prefix(String),
}

impl std::str::FromStr for ActionFilter {
    type Err = QueryError;
    fn from_str(s: &str) -> QueryResult<ActionFilter> {
        let actions = || AUDITED.iter().map(|(_, a)| *a);
        if let Some(kind) = s.strip_suffix(".*") {
            let prefix = format!("{kind}.");
            if actions().any(|a| a.starts_with(&prefix)) {
                return Ok(ActionFilter::Prefix(prefix));
            }
        } else if actions().any(|a| a == s) {
            return Ok(ActionFilter::Exact(s.to_owned()));
        }
        let known: Vec<&str> = actions().collect();
        Err(QueryError::Invalid(format!(
            "unknown audit action {s:?}: expected one of {} (or tool.*, run.*, auth.*)",
            known.join(", ")
        )))
    }
}

/// Lines read per page.
pub const PAGE: usize = 5_000;

/// The matching lines, each ending in a newline, in chunks of up to `page` lines, in position
/// order. The selection is fixed when the export starts: lines appended later are not included.
pub fn export(
    store: Store,
    filter: AuditFilter,
    page: usize,
) -> impl Stream<Item = QueryResult<String>> + Send + 'static {
    let page = page.max(1);
    let state = (store, filter, None::<u64>, false);
    futures::stream::try_unfold(state, move |(store, filter, mut until, done)| async move {
        if done {
            return Ok(None);
        }
        let until_position = match until {
            Some(u) => u,
            None => {
                let head =
                    read_rows(&store, "SELECT CAST(COALESCE(MAX(position), 0) AS TEXT) FROM audit_log".into(), &[])
                        .await?;
                let head = head.first().and_then(|r| r.first().cloned().flatten()).and_then(|v| v.parse().ok());
                *until.insert(head.unwrap_or(0))
            }
        };
        let after = filter.after.unwrap_or(0);
        if after >= until_position {
            return Ok(None);
        }
        let (text, last, count) = read_page(&store, &filter, after, until_position, page).await?;
        let Some(last) = last else { return Ok(None) };
        let next = AuditFilter { after: Some(last), ..filter };
        Ok(Some((text, (store, next, until, count < page))))
    })
}

/// One page: the lines joined (with a final newline), the last position, and how many.
async fn read_page(
    store: &Store,
    filter: &AuditFilter,
    after: u64,
    until: u64,
    page: usize,
) -> QueryResult<(String, Option<u64>, usize)> {
    let mut w = Where::default();
    w.add("position > {}", after as i64);
    w.add("position <= {}", until as i64);
    if let Some(t) = &filter.since {
        w.add("at >= {}", stored_time(t));
    }
    if let Some(t) = &filter.until {
        w.add("at < {}", stored_time(t));
    }
    if let Some(a) = &filter.actor {
        w.add("actor = {}", a.as_str());
    }
    if let Some(t) = &filter.tool {
        w.add("tool = {}", t.as_str());
    }
    match &filter.action {
        Some(ActionFilter::Exact(a)) => w.add("action = {}", a.as_str()),
        Some(ActionFilter::Prefix(p)) => w.add("action LIKE {}", format!("{p}%")),
        None => {}
    }
    let limit = w.bind(page as i64);
    let concat = match store.backend() {
        Backend::Sqlite => "group_concat(line, char(10) ORDER BY position)",
        Backend::Postgres => "string_agg(line, chr(10) ORDER BY position)",
    };
    let sql = format!(
        "SELECT {concat}, CAST(MAX(position) AS TEXT), CAST(COUNT(*) AS TEXT)
         FROM (SELECT position, line FROM audit_log {} ORDER BY position LIMIT {limit}) page",
        w.sql()
    );
    let row = read_rows(store, sql, &w.args).await?.into_iter().next().unwrap_or_default();
    let mut it = row.into_iter();
    let mut text = it.next().flatten().unwrap_or_default();
    let last = it.next().flatten().and_then(|v| v.parse().ok());
    let count = it.next().flatten().and_then(|v| v.parse().ok()).unwrap_or(0);
    if count > 0 {
        text.push('\n');
    }
    Ok((text, last, count))
}
