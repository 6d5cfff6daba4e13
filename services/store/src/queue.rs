//! Queue storage: the run queue's job rows, kept in apalis's tables (`Jobs`/`Workers` on SQLite,
//! `apalis.jobs`/`apalis.workers` on PostgreSQL) so apalis workers claim them.
//!
//! Kiln changes job rows only inside its own event-log transactions ([`QueueOp`] given to
//! [`Store::append_queued`](crate::Store::append_queued)): a run is requested and enqueued in one
//! commit, and its job row is removed in the commit that records its end. A run has at most one
//! job row: the row's idempotency key is the run id, and every push first removes the run's
//! previous row. Why apalis's own push, retry, cancel and idempotency paths are not used is in
//! `docs/design/apalis-evaluation.md`.

use chrono::{DateTime, Utc};
use kiln_proto::RunId;
use kiln_proto::job::RunJob;
use sqlx::{PgConnection, SqliteConnection};
use ulid::Ulid;

use crate::{Result, Store, StoreError};

/// The apalis queue (`job_type`) Kiln's run jobs live in.
pub const QUEUE: &str = "kiln-runs";

/// A change to the run queue, committed atomically with an append.
#[derive(Debug, Clone, PartialEq)]
pub enum QueueOp {
    /// Enqueue the run (replacing any job row it has), to be claimed at or after `not_before`.
    Push { job: RunJob, not_before: Option<DateTime<Utc>> },
    /// Enqueue the run already claimed by the live worker named `worker`, which executes it
    /// at once (a run handed straight to this process's worker). If that worker dies, apalis
    /// re-enqueues the row like any job of a worker that stopped heartbeating.
    PushClaimed { job: RunJob, worker: String },
    /// Remove the run's job row, if it has one (its end was recorded, or it was cancelled).
    Remove(RunId),
}

impl QueueOp {
    pub fn push(job: RunJob) -> Self {
        Self::Push { job, not_before: None }
    }

    /// The run whose job row this changes.
    pub fn run_id(&self) -> RunId {
        match self {
            Self::Push { job, .. } | Self::PushClaimed { job, .. } => job.run_id,
            Self::Remove(run_id) => *run_id,
        }
    }
}

/// The connection pool apalis workers use: on SQLite, Kiln's single writer (one writer per
/// file keeps claims and appends from contending on the file lock).
#[derive(Debug, Clone)]
pub enum QueuePool {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// A job row's id: the run id (UUIDv7) as a ULID with the job's sequence number mixed into its
/// random bits, unique per push yet traceable to its run.
pub fn job_id(run_id: RunId, attempt: u32) -> Ulid {
    Ulid::from(run_id.as_uuid().as_u128() ^ u128::from(attempt))
}

fn task(job: &RunJob, not_before: Option<DateTime<Utc>>) -> Result<apalis_core::task::Task<Vec<u8>>> {
    let args = serde_json::to_vec(job).map_err(|e| StoreError::Queue(format!("cannot encode job: {e}")))?;
    let mut builder = apalis_core::task::builder::TaskBuilder::new(args)
        .task_id(apalis_core::task::task_id::TaskId::from_ulid(job_id(job.run_id, job.attempt)))
        // Kiln records attempts and schedules retries itself.
        .max_attempts(1)
        .idempotency_key(job.run_id.to_string());
    if let Some(at) = not_before {
        // apalis schedules in whole seconds; rounding down means a job may be claimed up to a
        // second early, and the run engine waits out the rest.
        builder = builder.run_at_timestamp(at.timestamp().max(0) as u64);
    }
    Ok(builder.build())
}

pub(crate) async fn apply_sqlite(conn: &mut SqliteConnection, ops: &[QueueOp]) -> Result<()> {
    for op in ops {
        let run_id = op.run_id();
        sqlx::query("DELETE FROM Jobs WHERE job_type = ?1 AND idempotency_key = ?2")
            .bind(QUEUE)
            .bind(run_id.to_string())
            .execute(&mut *conn)
            .await?;
        let (job, not_before) = match op {
            QueueOp::Push { job, not_before } => (job, *not_before),
            QueueOp::PushClaimed { job, .. } => (job, None),
            QueueOp::Remove(_) => continue,
        };
        apalis_sqlite::queries::push_tasks(&mut *conn, QUEUE, &[task(job, not_before)?])
            .await
            .map_err(|e| StoreError::Queue(format!("cannot enqueue run {}: {e}", job.run_id)))?;
        if let QueueOp::PushClaimed { job, worker } = op {
            sqlx::query(
                "UPDATE Jobs SET status = 'Running', lock_by = ?1, lock_at = strftime('%s', 'now') WHERE id = ?2",
            )
            .bind(worker)
            .bind(job_id(job.run_id, job.attempt).to_string())
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

pub(crate) async fn apply_postgres(conn: &mut PgConnection, ops: &[QueueOp]) -> Result<()> {
    for op in ops {
        let run_id = op.run_id();
        sqlx::query("DELETE FROM apalis.jobs WHERE job_type = $1 AND idempotency_key = $2")
            .bind(QUEUE)
            .bind(run_id.to_string())
            .execute(&mut *conn)
            .await?;
        let (job, not_before) = match op {
            QueueOp::Push { job, not_before } => (job, *not_before),
            QueueOp::PushClaimed { job, .. } => (job, None),
            QueueOp::Remove(_) => continue,
        };
        apalis_postgres::queries::push_tasks(&mut *conn, QUEUE, vec![task(job, not_before)?])
            .await
            .map_err(|e| StoreError::Queue(format!("cannot enqueue run {}: {e}", job.run_id)))?;
        if let QueueOp::PushClaimed { job, worker } = op {
            sqlx::query("UPDATE apalis.jobs SET status = 'Running', lock_by = $1, lock_at = NOW() WHERE id = $2")
                .bind(worker)
                .bind(job_id(job.run_id, job.attempt).to_string())
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

impl Store {
    /// The pool apalis workers claim jobs through.
    pub fn queue_pool(&self) -> QueuePool {
        match self {
            Self::Sqlite(s) => QueuePool::Sqlite(s.writer().clone()),
            Self::Postgres(s) => QueuePool::Postgres(s.pool().clone()),
        }
    }

    /// Creates or upgrades apalis's tables, in their own migrations table (`_apalis_migrations`
    /// on SQLite, `apalis._sqlx_migrations` on PostgreSQL) so Kiln's schema version stays its own.
    pub(crate) async fn migrate_queue(&self) -> Result<()> {
        match self {
            Self::Sqlite(s) => {
                // Never `SqliteStorage::setup()`: it turns `synchronous` off on the connection.
                let mut migrator = apalis_sqlite::SqliteStorage::<()>::migrations();
                migrator.dangerous_set_table_name("_apalis_migrations");
                migrator.run(s.writer()).await?;
            }
            Self::Postgres(s) => {
                apalis_postgres::PostgresStorage::<()>::migrations().run(s.pool()).await?;
            }
        }
        Ok(())
    }

    /// Wakes this process's workers: a job was pushed (or became due).
    pub fn signal_queue(&self) {
        self.queue_signal().send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Changes whenever a job was pushed, by this process (and on PostgreSQL, by any process).
    pub fn queue_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.queue_signal().subscribe()
    }

    fn queue_signal(&self) -> &tokio::sync::watch::Sender<u64> {
        match self {
            Self::Sqlite(s) => s.queue_signal(),
            Self::Postgres(s) => s.queue_signal(),
        }
    }

    /// When the worker named `worker_id` last sent a heartbeat; None if it never registered.
    pub async fn worker_last_seen(&self, worker_id: &str) -> Result<Option<DateTime<Utc>>> {
        match self {
            Self::Sqlite(s) => {
                let seen: Option<i64> = sqlx::query_scalar("SELECT last_seen FROM Workers WHERE id = ?1")
                    .bind(worker_id)
                    .fetch_optional(s.writer())
                    .await?;
                Ok(seen.and_then(|secs| DateTime::from_timestamp(secs, 0)))
            }
            Self::Postgres(s) => Ok(sqlx::query_scalar("SELECT last_seen FROM apalis.workers WHERE id = $1")
                .bind(worker_id)
                .fetch_optional(s.pool())
                .await?),
        }
    }

    /// Whether the run has a job row (queued, claimed or running).
    pub async fn has_job(&self, run_id: RunId) -> Result<bool> {
        let key = run_id.to_string();
        Ok(match self {
            Self::Sqlite(s) => {
                sqlx::query_scalar::<_, i64>(
                    "SELECT COUNT(*) FROM Jobs WHERE job_type = ?1 AND idempotency_key = ?2 AND status <> 'Done'",
                )
                .bind(QUEUE)
                .bind(key)
                .fetch_one(s.writer())
                .await?
            }
            Self::Postgres(s) => sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM apalis.jobs WHERE job_type = $1 AND idempotency_key = $2 AND status <> 'Done'",
            )
            .bind(QUEUE)
            .bind(key)
            .fetch_one(s.pool())
            .await?,
        } > 0)
    }

    /// Applies queue changes in a transaction of their own.
    pub async fn apply_queue(&self, ops: &[QueueOp]) -> Result<()> {
        match self {
            Self::Sqlite(s) => {
                let mut tx = s.writer().begin_with("BEGIN IMMEDIATE").await?;
                apply_sqlite(&mut tx, ops).await?;
                tx.commit().await?;
            }
            Self::Postgres(s) => {
                let mut tx = s.pool().begin().await?;
                apply_postgres(&mut tx, ops).await?;
                tx.commit().await?;
            }
        }
        if ops.iter().any(|op| matches!(op, QueueOp::Push { .. })) {
            self.signal_queue();
        }
        Ok(())
    }

    /// Runs the `runs` read model shows as neither ended nor queued since before `quiet_since`:
    /// no live job row, top-level (a child run is driven by its parent). Candidates only: the
    /// read model may lag, so check each run's stream before queueing it.
    pub async fn stranded_runs(&self, quiet_since: DateTime<Utc>, limit: i64) -> Result<Vec<RunId>> {
        let since = quiet_since.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let sql = |jobs: &str| {
            format!(
                "SELECT r.run_id FROM runs r
                 WHERE r.status IN ('queued', 'running', 'retry_scheduled') AND r.parent_run IS NULL
                   AND r.updated_at < $1
                   AND NOT EXISTS (SELECT 1 FROM {jobs} j
                                   WHERE j.job_type = $2 AND j.idempotency_key = r.run_id AND j.status <> 'Done')
                 ORDER BY r.updated_at LIMIT $3"
            )
        };
        let ids: Vec<String> = match self {
            Self::Sqlite(s) => {
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql("Jobs").replace('$', "?")))
                    .bind(since)
                    .bind(QUEUE)
                    .bind(limit)
                    .fetch_all(s.reader())
                    .await?
            }
            Self::Postgres(s) => {
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql("apalis.jobs")))
                    .bind(since)
                    .bind(QUEUE)
                    .bind(limit)
                    .fetch_all(s.pool())
                    .await?
            }
        };
        Ok(ids.iter().filter_map(|id| id.parse().ok()).collect())
    }

    /// The run's job row, if it has one: its status (`Pending`, `Queued`, `Running`, `Done`...)
    /// and the worker that claimed it.
    pub async fn job_of(&self, run_id: RunId) -> Result<Option<(String, Option<String>)>> {
        let key = run_id.to_string();
        Ok(match self {
            Self::Sqlite(s) => {
                sqlx::query_as("SELECT status, lock_by FROM Jobs WHERE job_type = ?1 AND idempotency_key = ?2")
                    .bind(QUEUE)
                    .bind(key)
                    .fetch_optional(s.writer())
                    .await?
            }
            Self::Postgres(s) => {
                sqlx::query_as("SELECT status, lock_by FROM apalis.jobs WHERE job_type = $1 AND idempotency_key = $2")
                    .bind(QUEUE)
                    .bind(key)
                    .fetch_optional(s.pool())
                    .await?
            }
        })
    }

    /// Job rows in the run queue by status, for status pages and tests.
    pub async fn queue_depth(&self) -> Result<Vec<(String, i64)>> {
        let rows = match self {
            Self::Sqlite(s) => {
                sqlx::query_as("SELECT status, COUNT(*) FROM Jobs WHERE job_type = ?1 GROUP BY status ORDER BY status")
                    .bind(QUEUE)
                    .fetch_all(s.reader())
                    .await?
            }
            Self::Postgres(s) => {
                sqlx::query_as(
                    "SELECT status, COUNT(*) FROM apalis.jobs WHERE job_type = $1 GROUP BY status ORDER BY status",
                )
                .bind(QUEUE)
                .fetch_all(s.pool())
                .await?
            }
        };
        Ok(rows)
    }
}

/// A live update about a run (a log line, progress), for whoever watches it. Not stored:
/// a watcher that misses one loses nothing durable (logs are recorded with the attempt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunFeedMessage {
    pub run_id: RunId,
    /// JSON, at most [`MAX_FEED_BYTES`].
    pub body: String,
}

/// PostgreSQL's NOTIFY payload limit, less room for the run id.
pub const MAX_FEED_BYTES: usize = 7_900;

impl Store {
    /// Publishes a live update about a run to watchers in this process (SQLite) or in every
    /// process (PostgreSQL). Best effort: a full or failing channel drops it.
    pub async fn publish_run_feed(&self, run_id: RunId, body: String) {
        if body.len() > MAX_FEED_BYTES {
            return;
        }
        match self {
            Self::Sqlite(s) => {
                let _ = s.run_feed().send(RunFeedMessage { run_id, body });
            }
            Self::Postgres(s) => {
                let payload = format!("{run_id} {body}");
                if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(crate::postgres::FEED_CHANNEL)
                    .bind(payload)
                    .execute(s.pool())
                    .await
                {
                    tracing::debug!(error = %e, "run feed update dropped");
                }
            }
        }
    }

    /// Live updates about runs, from now on.
    pub fn run_feed(&self) -> tokio::sync::broadcast::Receiver<RunFeedMessage> {
        match self {
            Self::Sqlite(s) => s.run_feed().subscribe(),
            Self::Postgres(s) => s.run_feed().subscribe(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_differ_per_attempt_and_keep_the_run() {
        let run = RunId::new();
        let (a, b) = (job_id(run, 1), job_id(run, 2));
        assert_ne!(a, b);
        assert_eq!(a.0 >> 8, run.as_uuid().as_u128() >> 8);
    }
}
