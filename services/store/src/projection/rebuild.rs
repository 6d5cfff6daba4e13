//! Rebuilding a projection from the log, and verifying a live one against a fresh rebuild.
//!
//! Both build into scratch tables beside the live ones, so readers keep seeing the live read
//! model meanwhile. `rebuild` then swaps the result in, in one short transaction that holds the
//! checkpoint lock; `verify` compares it with the live tables at the same position and drops it.

use futures::TryStreamExt;
use kiln_proto::Position;
use serde::Serialize;

use super::runner::{apply_events, checkpoint, lock_checkpoint, read_until, set_checkpoint};
use super::{Projection, ProjectionRunner, TableSpec, WriteTx};
use crate::{EventStore, Result, Store};

/// One way a rebuilt table differs from the live one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Difference {
    MissingInLive { table: String, row: Vec<Option<String>> },
    ExtraInLive { table: String, row: Vec<Option<String>> },
    Changed { table: String, live: Vec<Option<String>>, rebuilt: Vec<Option<String>> },
}

/// The outcome of verifying one projection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    pub projection: String,
    pub position: u64,
    pub rows: u64,
    /// The first differences found (at most 20 per table).
    pub differences: Vec<Difference>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.differences.is_empty()
    }
}

const MAX_DIFFERENCES: usize = 20;

fn scratch_prefix() -> String {
    format!("kiln_scratch_{}_", &uuid::Uuid::now_v7().simple().to_string()[20..])
}

pub(super) async fn recreate_tables(tx: &mut WriteTx, p: &dyn Projection, prefix: &str) -> Result<()> {
    drop_tables(tx, p, prefix).await?;
    for t in p.tables() {
        tx.execute_raw(&t.create_sql(prefix)).await?;
    }
    Ok(())
}

async fn drop_tables(tx: &mut WriteTx, p: &dyn Projection, prefix: &str) -> Result<()> {
    for t in p.tables() {
        tx.execute_raw(&format!("DROP TABLE IF EXISTS {prefix}{}", t.name)).await?;
    }
    Ok(())
}

/// A rebuild of one projection into scratch tables named with `prefix`.
struct Scratch<'a> {
    store: &'a Store,
    p: &'a dyn Projection,
    prefix: &'a str,
    batch_size: usize,
}

impl Scratch<'_> {
    /// Builds from the start of the log up to `until`, one transaction per batch.
    async fn build(&self, until: Position, progress: &(dyn Fn(u64, u64) + Send + Sync)) -> Result<Position> {
        let mut tx = self.store.begin_write().await?;
        recreate_tables(&mut tx, self.p, self.prefix).await?;
        tx.commit().await?;
        let mut position = Position::START;
        let mut pages = std::pin::pin!(crate::replay(self.store, position, until, self.batch_size));
        while let Some(events) = pages.try_next().await? {
            let Some(last) = events.last().map(|e| e.position) else { break };
            let mut tx = self.store.begin_write().await?;
            if let WriteTx::Postgres(_) = tx {
                // Scratch tables are thrown away if the rebuild does not finish, so their batches
                // need not wait for the WAL flush; the swap into the live tables does.
                tx.execute_raw("SET LOCAL synchronous_commit = off").await?;
            }
            apply_events(&mut tx, self.p, self.prefix, &events).await?;
            tx.commit().await?;
            position = last;
            progress(position.0, until.0);
        }
        Ok(position)
    }

    /// Applies the events after `from` up to `until` inside `tx`.
    async fn finish(&self, tx: &mut WriteTx, mut from: Position, until: Position) -> Result<Position> {
        while from < until {
            let events = read_until(self.store, from, until, self.batch_size).await?;
            let Some(last) = events.last().map(|e| e.position) else { break };
            apply_events(tx, self.p, self.prefix, &events).await?;
            from = last;
        }
        Ok(from)
    }
}

/// Rebuilds one live projection from the whole log and swaps it in atomically.
pub async fn rebuild(
    runner: &ProjectionRunner,
    p: &dyn Projection,
    batch_size: usize,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<Position> {
    let store = runner.store();
    runner.prepare().await?;
    let prefix = scratch_prefix();
    let result = async {
        let scratch = Scratch { store, p, prefix: &prefix, batch_size };
        let built = scratch.build(store.head().await?, progress).await?;
        let mut tx = store.begin_write().await?;
        lock_checkpoint(&mut tx, p.name()).await?;
        let position = scratch.finish(&mut tx, built, store.head().await?).await?;
        for t in p.tables() {
            tx.execute_raw(&format!("DELETE FROM {}", t.name)).await?;
            tx.execute_raw(&format!("INSERT INTO {} SELECT * FROM {prefix}{}", t.name, t.name)).await?;
        }
        set_checkpoint(&mut tx, p.name(), position, p.version()).await?;
        drop_tables(&mut tx, p, &prefix).await?;
        tx.commit().await?;
        analyze(store, p).await;
        progress(position.0, position.0);
        Ok(position)
    }
    .await;
    cleanup(store, p, &prefix).await;
    result
}

/// Brings the live projection up to the head, rebuilds it into scratch tables at the same
/// position, and compares the two row by row.
pub async fn verify(runner: &ProjectionRunner, p: &dyn Projection, batch_size: usize) -> Result<VerifyReport> {
    let store = runner.store();
    runner.prepare().await?;
    runner.catch_up_one(p, None, &|_, _| {}).await?;
    let prefix = scratch_prefix();
    let result = async {
        let scratch = Scratch { store, p, prefix: &prefix, batch_size };
        let built = scratch.build(checkpoint(store, p.name()).await?, &|_, _| {}).await?;
        // Holding the checkpoint lock freezes the live read model while the two are compared.
        let mut tx = store.begin_write().await?;
        let live_at = lock_checkpoint(&mut tx, p.name()).await?;
        let position = scratch.finish(&mut tx, built, live_at).await?;
        let mut report =
            VerifyReport { projection: p.name().to_owned(), position: position.0, rows: 0, differences: Vec::new() };
        for t in p.tables() {
            let live = sorted_rows(&mut tx, t, "").await?;
            let rebuilt = sorted_rows(&mut tx, t, &prefix).await?;
            report.rows += live.len() as u64;
            report.differences.extend(compare(t, &live, &rebuilt));
        }
        tx.rollback().await?;
        Ok(report)
    }
    .await;
    cleanup(store, p, &prefix).await;
    result
}

/// PostgreSQL: refreshes the planner's statistics of the swapped-in tables. Without them, a table
/// that was just refilled looks nearly empty to the planner, which then sorts whole tables for
/// keyset pages (the audit export went from 3 ms to 200 ms a page).
async fn analyze(store: &Store, p: &dyn Projection) {
    if store.backend() != crate::Backend::Postgres {
        return;
    }
    for t in p.tables() {
        let analyzed = async {
            let mut tx = store.begin_write().await?;
            tx.execute_raw(&format!("ANALYZE {}", t.name)).await?;
            tx.commit().await
        };
        if let Err(e) = analyzed.await {
            tracing::warn!(error = %e, table = t.name, "could not analyze a rebuilt table");
        }
    }
}

async fn cleanup(store: &Store, p: &dyn Projection, prefix: &str) {
    let dropped = async {
        let mut tx = store.begin_write().await?;
        drop_tables(&mut tx, p, prefix).await?;
        tx.commit().await
    };
    if let Err(e) = dropped.await {
        tracing::warn!(error = %e, prefix, "could not drop scratch tables");
    }
}

fn dump_sql(t: &TableSpec, prefix: &str) -> String {
    let cols: Vec<String> = t.columns.iter().map(|c| format!("CAST({c} AS TEXT)")).collect();
    format!("SELECT {} FROM {prefix}{}", cols.join(", "), t.name)
}

/// A table's rows as text, ordered by key in Rust so both sides order identically whatever the
/// database's collation.
async fn sorted_rows(tx: &mut WriteTx, t: &TableSpec, prefix: &str) -> Result<Vec<Vec<Option<String>>>> {
    let mut rows = tx.fetch_text_rows(&dump_sql(t, prefix)).await?;
    let key_cols = key_columns(t);
    rows.sort_by(|a, b| key_cols.iter().map(|&i| &a[i]).cmp(key_cols.iter().map(|&i| &b[i])));
    Ok(rows)
}

fn key_columns(t: &TableSpec) -> Vec<usize> {
    t.key.iter().filter_map(|k| t.columns.iter().position(|c| c == k)).collect()
}

/// Merges two key-ordered row lists and reports where they differ.
fn compare(t: &TableSpec, live: &[Vec<Option<String>>], rebuilt: &[Vec<Option<String>>]) -> Vec<Difference> {
    let key_cols = key_columns(t);
    let key = |row: &Vec<Option<String>>| key_cols.iter().map(|&i| row[i].clone()).collect::<Vec<_>>();
    let table = t.name.to_owned();
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while (i < live.len() || j < rebuilt.len()) && out.len() < MAX_DIFFERENCES {
        match (live.get(i), rebuilt.get(j)) {
            (Some(l), Some(r)) if key(l) == key(r) => {
                if l != r {
                    out.push(Difference::Changed { table: table.clone(), live: l.clone(), rebuilt: r.clone() });
                }
                i += 1;
                j += 1;
            }
            (Some(l), Some(r)) if key(l) < key(r) => {
                out.push(Difference::ExtraInLive { table: table.clone(), row: l.clone() });
                i += 1;
            }
            (Some(l), None) => {
                out.push(Difference::ExtraInLive { table: table.clone(), row: l.clone() });
                i += 1;
            }
            (_, Some(r)) => {
                out.push(Difference::MissingInLive { table: table.clone(), row: r.clone() });
                j += 1;
            }
            (None, None) => break,
        }
    }
    out
}
