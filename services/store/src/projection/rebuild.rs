//! Rebuilding a projection from the log, and verifying a live one against a fresh rebuild.
//!
//! Both build into scratch tables beside the live ones, so readers keep seeing the live read
//! model meanwhile. The scratch tables are bulk-loaded with only their primary keys; secondary
//! indexes are built once at the end, which is cheaper than maintaining them row by row.
//! `rebuild` then swaps the result in by renaming (not copying) the scratch tables, in one
//! transaction that holds the checkpoint lock: a reader sees the old tables or the new ones,
//! never a mix. `verify` compares the scratch tables with the live ones at the same position and
//! drops them.

use futures::StreamExt;
use kiln_proto::{DomainEvent, Position, RecordedEvent};
use serde::Serialize;
use tokio::sync::mpsc;

use super::runner::{
    apply_decoded, apply_events, checkpoint, decode_events, lock_checkpoint, read_until, set_checkpoint,
};
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

/// The scratch tables without their secondary indexes.
async fn create_bare_tables(tx: &mut WriteTx, p: &dyn Projection, prefix: &str) -> Result<()> {
    drop_tables(tx, p, prefix).await?;
    for t in p.tables() {
        tx.execute_raw(&t.table_sql(prefix)).await?;
    }
    Ok(())
}

/// Replaces the live tables with the scratch ones inside `tx` (which holds the checkpoint lock),
/// by renaming: nothing is copied.
///
/// PostgreSQL: the scratch tables were indexed before the swap (`index_scratch`), under their
/// prefixed names; renaming the indexes (the primary key's `{table}_pkey` too) gives them the
/// live names back. SQLite renames a table's primary key index with it but cannot rename an
/// index, so its secondary indexes are built here, under their final names, once the live
/// table and its indexes are dropped.
async fn swap(tx: &mut WriteTx, p: &dyn Projection, prefix: &str) -> Result<()> {
    let postgres = matches!(tx, WriteTx::Postgres(_));
    for t in p.tables() {
        let (live, scratch) = (t.name, format!("{prefix}{}", t.name));
        tx.execute_raw(&format!("DROP TABLE {live}")).await?;
        tx.execute_raw(&format!("ALTER TABLE {scratch} RENAME TO {live}")).await?;
        if postgres {
            tx.execute_raw(&format!("ALTER INDEX {scratch}_pkey RENAME TO {live}_pkey")).await?;
            for (suffix, _) in t.indexes(prefix) {
                tx.execute_raw(&format!("ALTER INDEX {scratch}{suffix} RENAME TO {live}{suffix}")).await?;
            }
        } else {
            for (_, create) in t.indexes("") {
                tx.execute_raw(&create).await?;
            }
        }
    }
    Ok(())
}

/// PostgreSQL: builds the scratch tables' secondary indexes before the swap, outside the
/// checkpoint lock, so the live projection keeps up meanwhile (see `swap` for SQLite).
async fn index_scratch(store: &Store, p: &dyn Projection, prefix: &str) -> Result<()> {
    if store.backend() != crate::Backend::Postgres {
        return Ok(());
    }
    let mut tx = store.begin_write().await?;
    for t in p.tables() {
        for (_, create) in t.indexes(prefix) {
            tx.execute_raw(&create).await?;
        }
    }
    tx.commit().await
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
        create_bare_tables(&mut tx, self.p, self.prefix).await?;
        tx.commit().await?;
        let mut position = Position::START;
        let mut pages = read_ahead(self.store, self.p.name(), until, self.batch_size);
        while let Some(page) = pages.recv().await {
            let (events, decoded) = page?;
            let Some(last) = events.last().map(|e| e.position) else { break };
            let mut tx = self.store.begin_write().await?;
            if let WriteTx::Postgres(_) = tx {
                // Scratch tables are thrown away if the rebuild does not finish, so their batches
                // need not wait for the WAL flush; the swap into the live tables does.
                tx.execute_raw("SET LOCAL synchronous_commit = off").await?;
            }
            apply_decoded(&mut tx, self.p, self.prefix, &events, decoded).await?;
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

/// A decoded page of the log, for `Scratch::build`.
type Page = Result<(Vec<RecordedEvent>, Vec<DomainEvent>)>;

/// Reads and decodes the log up to `until` in a task of its own, a few pages ahead of the
/// writer, so reading and decoding the next pages overlaps writing the current one (a stream
/// polled by the writer would only read while the writer waits for it). The task stops after
/// an error, or when the receiver is dropped.
fn read_ahead(store: &Store, projection: &'static str, until: Position, batch_size: usize) -> mpsc::Receiver<Page> {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    let pages = crate::replay(store, Position::START, until, batch_size);
    tokio::spawn(async move {
        let mut pages = std::pin::pin!(pages);
        while let Some(page) = pages.next().await {
            let page = page.and_then(|events| {
                let decoded = decode_events(projection, &events)?;
                Ok((events, decoded))
            });
            let failed = page.is_err();
            if tx.send(page).await.is_err() || failed {
                break;
            }
        }
    });
    rx
}

/// Decoded pages `read_ahead` may hold while the writer is busy.
const READ_AHEAD: usize = 2;

/// The batch size `kiln projections rebuild|verify` use at least (one page read, one scratch
/// transaction written). Nobody reads the scratch tables, so large transactions cost nothing but
/// memory (a few pages of decoded events); at 1M events, 5 000 instead of the live runner's
/// 1 000 almost doubled PostgreSQL's rebuild speed (fewer commits and round trips, fewer runs
/// straddling two batches).
pub const REBUILD_BATCH: usize = 5_000;

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
        index_scratch(store, p, &prefix).await?;
        let mut tx = store.begin_write().await?;
        lock_checkpoint(&mut tx, p.name()).await?;
        let locked = std::time::Instant::now();
        let position = scratch.finish(&mut tx, built, store.head().await?).await?;
        swap(&mut tx, p, &prefix).await?;
        set_checkpoint(&mut tx, p.name(), position, p.version()).await?;
        tx.commit().await?;
        // How long the projection's writers (and, on SQLite, every writer) waited on the swap.
        let lock_ms = locked.elapsed().as_secs_f64() * 1e3;
        tracing::info!(projection = p.name(), position = position.0, lock_ms, "rebuilt read model swapped in");
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
