//! Runs projections: prepares their tables, applies new events in checkpointed batches, and
//! follows the log as it grows.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::TryStreamExt;
use kiln_proto::{DomainEvent, Position, RecordedEvent};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{Projection, SqlValue, Stmt, WriteTx};
use crate::{EventStore, Result, Store, StoreError};

#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// Events applied per transaction.
    pub batch_size: usize,
    /// Fault injection for tests: fail after applying the event at this position, before the
    /// checkpoint is written, as a crash there would.
    pub fail_before_checkpoint_at: Option<Position>,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        Self { batch_size: 1_000, fail_before_checkpoint_at: None }
    }
}

/// Where a projection is, and why it stopped if it did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectionStatus {
    pub position: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ProjectionRunner {
    store: Store,
    projections: Vec<Arc<dyn Projection>>,
    options: RunnerOptions,
    status: Arc<RwLock<BTreeMap<&'static str, ProjectionStatus>>>,
}

impl ProjectionRunner {
    pub fn new(store: Store, projections: Vec<Arc<dyn Projection>>, options: RunnerOptions) -> Self {
        Self { store, projections, options, status: Arc::default() }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn projections(&self) -> &[Arc<dyn Projection>] {
        &self.projections
    }

    pub fn status(&self) -> BTreeMap<&'static str, ProjectionStatus> {
        self.status.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Creates missing tables and resets any projection whose version changed.
    pub async fn prepare(&self) -> Result<()> {
        for p in &self.projections {
            prepare(&self.store, p.as_ref()).await?;
            let position = checkpoint(&self.store, p.name()).await?.0;
            let mut status = self.status.write().unwrap_or_else(|e| e.into_inner());
            status.insert(p.name(), ProjectionStatus { position, error: None });
        }
        Ok(())
    }

    /// Brings every projection up to the current head.
    pub async fn catch_up(&self) -> Result<()> {
        for p in &self.projections {
            self.catch_up_one(p.as_ref(), None, &|_, _| {}).await?;
        }
        Ok(())
    }

    /// Applies events to one live projection until it reaches `until` (default: the head), calling
    /// `progress(position, head)` after each batch. Returns the projection's position.
    pub async fn catch_up_one(
        &self,
        p: &dyn Projection,
        until: Option<Position>,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<Position> {
        let result = self.catch_up_inner(p, until, progress).await;
        let mut status = self.status.write().unwrap_or_else(|e| e.into_inner());
        let entry = status.entry(p.name()).or_insert(ProjectionStatus { position: 0, error: None });
        match &result {
            Ok(pos) => *entry = ProjectionStatus { position: pos.0, error: None },
            Err(e) => entry.error = Some(e.to_string()),
        }
        result
    }

    async fn catch_up_inner(
        &self,
        p: &dyn Projection,
        until: Option<Position>,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<Position> {
        let head = match until {
            Some(u) => u,
            None => self.store.head().await?,
        };
        let mut position = checkpoint(&self.store, p.name()).await?;
        'restart: while position < head {
            // Dropped before a restart: its read-ahead queries hold pool connections.
            let mut pages = std::pin::pin!(crate::replay(&self.store, position, head, self.options.batch_size));
            while let Some(events) = pages.try_next().await? {
                let applied = self.apply_batch(p, position, &events).await?;
                let moved = applied != events.last().map_or(position, |e| e.position);
                position = applied;
                progress(position.0, head.0);
                if moved {
                    // Another runner got further: continue from its checkpoint.
                    continue 'restart;
                }
            }
            break;
        }
        Ok(position)
    }

    /// Applies `events` (which follow `from`) and advances the checkpoint, in one transaction.
    /// Returns the new checkpoint, or the one another runner got to first. If an event cannot be
    /// applied, the events before it are still committed, so the projection stops exactly there.
    async fn apply_batch(&self, p: &dyn Projection, from: Position, events: &[RecordedEvent]) -> Result<Position> {
        match self.try_apply_batch(p, from, events).await {
            // An injected crash commits nothing, as a real crash would not.
            Err(StoreError::Projection { projection, position, message })
                if self.options.fail_before_checkpoint_at != Some(Position(position)) =>
            {
                let good = events.iter().take_while(|e| e.position.0 < position).count();
                if good > 0 && good < events.len() {
                    Box::pin(self.try_apply_batch(p, from, &events[..good])).await?;
                }
                Err(StoreError::Projection { projection, position, message })
            }
            other => other,
        }
    }

    async fn try_apply_batch(&self, p: &dyn Projection, from: Position, events: &[RecordedEvent]) -> Result<Position> {
        let mut tx = self.store.begin_write().await?;
        let current = lock_checkpoint(&mut tx, p.name()).await?;
        if current != from {
            tx.rollback().await?;
            return Ok(current);
        }
        apply_events(&mut tx, p, "", events).await?;
        let last = events.last().map_or(from, |e| e.position);
        if let Some(fail_at) = self.options.fail_before_checkpoint_at
            && events.iter().any(|e| e.position == fail_at)
        {
            return Err(StoreError::Projection {
                projection: p.name().to_owned(),
                position: fail_at.0,
                message: "injected failure before checkpoint".to_owned(),
            });
        }
        set_checkpoint(&mut tx, p.name(), last, p.version()).await?;
        tx.commit().await?;
        Ok(last)
    }

    /// Follows the log until `shutdown`: applies new events as they are committed. A projection
    /// that fails (say, on an undecodable event) is retried with backoff and reported in
    /// `status`, never skipped past.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut head = self.store.head_watch();
        let mut backoff = Duration::from_millis(100);
        let mut last_error = None;
        loop {
            head.borrow_and_update();
            let mut failed = false;
            for p in &self.projections {
                if let Err(e) = self.catch_up_one(p.as_ref(), None, &|_, _| {}).await {
                    failed = true;
                    let msg = e.to_string();
                    if last_error.as_ref() != Some(&msg) {
                        tracing::error!(projection = p.name(), error = %msg, "projection stopped");
                        last_error = Some(msg);
                    }
                }
            }
            if failed {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
            backoff = Duration::from_millis(100);
            last_error = None;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = head.changed() => if changed.is_err() { return },
            }
        }
    }
}

/// Reads the events after `after` up to and including `until`.
pub(super) async fn read_until(
    store: &Store,
    after: Position,
    until: Position,
    limit: usize,
) -> Result<Vec<RecordedEvent>> {
    let mut events = store.read_all(after, limit).await?;
    events.retain(|e| e.position <= until);
    Ok(events)
}

/// Decodes and applies events with their positions named in any error. Every event is decoded
/// before any is applied, so an undecodable one stops the batch (the runner then commits the
/// events before it on their own).
pub(super) async fn apply_events(
    tx: &mut WriteTx,
    p: &dyn Projection,
    prefix: &str,
    events: &[RecordedEvent],
) -> Result<()> {
    let decoded = decode_events(p.name(), events)?;
    apply_decoded(tx, p, prefix, events, decoded).await
}

/// Decodes every event of a batch; an unknown or malformed one is an error at its position.
pub(super) fn decode_events(projection: &str, events: &[RecordedEvent]) -> Result<Vec<DomainEvent>> {
    events
        .iter()
        .map(|e| {
            e.decode().map_err(|err| StoreError::Projection {
                projection: projection.to_owned(),
                position: e.position.0,
                message: err.to_string(),
            })
        })
        .collect()
}

/// Applies a batch `decode_events` decoded.
pub(super) async fn apply_decoded(
    tx: &mut WriteTx,
    p: &dyn Projection,
    prefix: &str,
    events: &[RecordedEvent],
    decoded: Vec<DomainEvent>,
) -> Result<()> {
    let decoded: Vec<(&RecordedEvent, DomainEvent)> = events.iter().zip(decoded).collect();
    let first = events.first();
    p.apply_batch(tx, prefix, &decoded).await.map_err(|err| match first {
        Some(e) => super::at_position(p.name(), e, err),
        None => err,
    })
}

/// Where a projection's checkpoint stands (0 if it has none).
pub async fn checkpoint(store: &Store, name: &str) -> Result<Position> {
    let mut tx = store.begin_read().await?;
    let stmt = Stmt::new("SELECT position FROM kiln_projection_checkpoints WHERE name = $1");
    let position = tx.fetch_int(&stmt, &[name.into()]).await?;
    tx.rollback().await?;
    Ok(Position(position.unwrap_or(0) as u64))
}

pub(super) async fn lock_checkpoint(tx: &mut WriteTx, name: &str) -> Result<Position> {
    let sql = format!("SELECT position FROM kiln_projection_checkpoints WHERE name = $1{}", tx.for_update());
    let position = tx.fetch_int(&Stmt::new(sql), &[name.into()]).await?;
    Ok(Position(position.unwrap_or(0) as u64))
}

pub(super) async fn set_checkpoint(tx: &mut WriteTx, name: &str, position: Position, version: u32) -> Result<()> {
    let stmt = Stmt::new(
        "INSERT INTO kiln_projection_checkpoints (name, position, version, updated_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (name) DO UPDATE SET position = excluded.position, version = excluded.version,
         updated_at = excluded.updated_at",
    );
    let now = kiln_proto::envelope::now_micros().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    tx.execute(
        &stmt,
        &[name.into(), SqlValue::from(position.0 as i64), SqlValue::from(i64::from(version)), now.into()],
    )
    .await?;
    Ok(())
}

/// Creates a projection's tables if it has no checkpoint, or recreates them empty if its version
/// changed; either way the projection then starts from the beginning of the log.
async fn prepare(store: &Store, p: &dyn Projection) -> Result<()> {
    let mut tx = store.begin_write().await?;
    let sql = format!("SELECT version FROM kiln_projection_checkpoints WHERE name = $1{}", tx.for_update());
    let version = tx.fetch_int(&Stmt::new(sql), &[p.name().into()]).await?;
    if version != Some(i64::from(p.version())) {
        if let Some(old) = version {
            tracing::info!(projection = p.name(), old, new = p.version(), "projection version changed; rebuilding");
        }
        super::rebuild::recreate_tables(&mut tx, p, "").await?;
        set_checkpoint(&mut tx, p.name(), Position::START, p.version()).await?;
    }
    tx.commit().await
}
