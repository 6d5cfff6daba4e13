//! The PostgreSQL event store: for many API and worker replicas.
//!
//! Every append updates the single row of `kiln_log_head` to take its positions. That row lock
//! is held until commit, so appends commit one after another in position order: a reader can
//! never observe position N+1 while N is still in flight, which is the trap with plain
//! sequences (a later transaction commits first and a tailing reader moves past the gap).
//! The stream's version is read after the lock is taken, so it is always current. Appends
//! `NOTIFY kiln_events` with their last position; one `LISTEN` connection per process raises the
//! head watch that subscribers wait on.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kiln_proto::{
    Actor, EventId, EventMetadata, NewEvent, Position, RecordedEvent, StreamId, StreamVersion, TraceParent,
};
use serde_json::value::RawValue;
use sqlx::postgres::{PgListener, PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

use crate::group::PendingAppend;
use crate::queue::{QueueOp, RunFeedMessage};
use crate::store::{StoreOptions, advance_head};
use crate::{AppendResult, ExpectedVersion, Result, StoreError};

const CHANNEL: &str = "kiln_events";
/// Notified when a transaction pushed a run job: wakes workers in every process.
const QUEUE_CHANNEL: &str = "kiln_queue";
/// Live run updates (logs, progress): `<run id> <json>`.
pub(crate) const FEED_CHANNEL: &str = "kiln_run_feed";

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The last committed position known to this process; raised by appends and by NOTIFY.
    head: Arc<watch::Sender<Position>>,
    /// Raised when any process pushed a job (via NOTIFY): wakes this process's workers.
    queue_signal: Arc<watch::Sender<u64>>,
    run_feed: tokio::sync::broadcast::Sender<RunFeedMessage>,
    /// Stops the LISTEN task; cancelled by `close` or when the last handle is dropped.
    stop: CancellationToken,
    _stop_on_drop: Arc<DropGuard>,
    /// Appends waiting for the group commit task.
    appends: mpsc::UnboundedSender<PendingAppend>,
}

impl PgStore {
    pub async fn open(options: &StoreOptions) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(2))
            .acquire_timeout(options.busy_timeout)
            .connect(&options.database_url)
            .await?;
        let stop = CancellationToken::new();
        let (appends, pending) = mpsc::unbounded_channel();
        let store = Self {
            pool,
            head: Arc::new(watch::Sender::new(Position::START)),
            queue_signal: Arc::new(watch::Sender::new(0)),
            run_feed: tokio::sync::broadcast::Sender::new(1024),
            _stop_on_drop: Arc::new(stop.clone().drop_guard()),
            stop,
            appends,
        };
        store.spawn_listener().await?;
        // The task holds no sender: it ends when the last handle to the store is dropped.
        let group = Self { appends: mpsc::unbounded_channel().0, ..store.clone() };
        tokio::spawn(group.group_commit(pending));
        Ok(store)
    }

    pub(crate) fn queue_signal(&self) -> &watch::Sender<u64> {
        &self.queue_signal
    }

    pub(crate) fn run_feed(&self) -> &tokio::sync::broadcast::Sender<RunFeedMessage> {
        &self.run_feed
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn close(&self) {
        self.stop.cancel();
        self.pool.close().await;
    }

    /// Re-reads the head from the database (after migrations or a lost LISTEN connection).
    pub(crate) async fn refresh_head(&self) -> Result<()> {
        match self.head().await {
            Ok(head) => advance_head(&self.head, head),
            // Before migrations there is no head table yet; the head is 0.
            Err(StoreError::Database(sqlx::Error::Database(e))) if e.code().as_deref() == Some("42P01") => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Listens for appends from every process, until the last handle to this store is dropped
    /// or the store is closed.
    async fn spawn_listener(&self) -> Result<()> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen_all([CHANNEL, QUEUE_CHANNEL, FEED_CHANNEL]).await?;
        self.refresh_head().await?;
        let head = Arc::downgrade(&self.head);
        let queue_signal = Arc::downgrade(&self.queue_signal);
        let run_feed = self.run_feed.clone();
        let pool = self.pool.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let received = tokio::select! {
                    // Checked first: after `close`, a failing `try_recv` is ready at once too.
                    biased;
                    _ = stop.cancelled() => break,
                    r = listener.try_recv() => r,
                };
                let Some(head) = head.upgrade() else { break };
                match received {
                    Ok(Some(n)) if n.channel() == FEED_CHANNEL => {
                        if let Some((id, body)) = n.payload().split_once(' ')
                            && let Ok(run_id) = id.parse()
                        {
                            let _ = run_feed.send(RunFeedMessage { run_id, body: body.to_owned() });
                        }
                    }
                    Ok(Some(n)) if n.channel() == QUEUE_CHANNEL => {
                        if let Some(signal) = queue_signal.upgrade() {
                            signal.send_modify(|n| *n = n.wrapping_add(1));
                        }
                    }
                    Ok(Some(n)) => {
                        if let Ok(p) = n.payload().parse::<u64>() {
                            advance_head(&head, Position(p));
                        }
                    }
                    // The connection was lost and re-established: notifications may be lost.
                    Ok(None) => {
                        if let Some(signal) = queue_signal.upgrade() {
                            signal.send_modify(|n| *n = n.wrapping_add(1));
                        }
                        if let Ok(p) =
                            sqlx::query_scalar::<_, i64>("SELECT position FROM kiln_log_head").fetch_one(&pool).await
                        {
                            advance_head(&head, Position(p as u64));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection failed; retrying");
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
        });
        Ok(())
    }

    pub async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        self.append_queued(stream, expected, events, &[]).await
    }

    /// Appends and applies `queue` changes in the same transaction.
    ///
    /// Appends from concurrent callers in this process are committed in groups, as on SQLite:
    /// one task takes every append waiting and commits them in one transaction (one head lock,
    /// one commit), each checked against its own expected version. If the group fails, each
    /// append is retried alone.
    pub async fn append_queued(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        queue: &[QueueOp],
    ) -> Result<AppendResult> {
        crate::group::submit(&self.appends, stream, expected, events, queue).await
    }

    /// Commits appends in groups until every handle to the store is gone.
    async fn group_commit(self, mut appends: mpsc::UnboundedReceiver<PendingAppend>) {
        while let Some(mut group) = crate::group::next_group(&mut appends).await {
            if group.len() == 1 {
                let a = group.pop().expect("one append");
                let result = self.append_alone(&a.stream, a.expected, &a.events, a.payloads, &a.queue).await;
                let _ = a.reply.send(result);
                continue;
            }
            let staged = match self.write_group(&group).await {
                Ok(staged) => staged,
                Err(e) => {
                    tracing::debug!(error = %e, appends = group.len(), "group append failed; appending one by one");
                    group.iter().map(|_| None).collect()
                }
            };
            let mut alone = Vec::new();
            for (append, staged) in group.into_iter().zip(staged) {
                match staged {
                    Some(result) => {
                        let _ = append.reply.send(result);
                    }
                    None => alone.push(append),
                }
            }
            for a in alone {
                let result = self.append_alone(&a.stream, a.expected, &a.events, a.payloads, &a.queue).await;
                let _ = a.reply.send(result);
            }
        }
    }

    /// Writes a group of appends in one transaction. Per append: its result (refusals included),
    /// or None for those to append alone afterwards (their event ids repeat within the group,
    /// say concurrent retries of one append).
    async fn write_group(&self, group: &[PendingAppend]) -> Result<Vec<Option<Result<AppendResult>>>> {
        let mut tx = self.pool.begin().await?;
        let head: i64 = sqlx::query_scalar("SELECT position FROM kiln_log_head WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut *tx)
            .await?;
        let streams: Vec<&str> = group.iter().map(|a| a.stream.as_str()).collect();
        let ids: Vec<Uuid> = group.iter().flat_map(|a| a.events.iter().map(|e| e.event_id.as_uuid())).collect();
        // What the group needs to know, in one round trip: each stream's version, and which of
        // the event ids are stored already (retries).
        let rows: Vec<(Option<String>, Option<i64>, Option<Uuid>)> = sqlx::query_as(
            // Written as one scalar lookup per stream and per id (index probes): `= ANY(...)` and
            // joins let the planner choose a scan of the whole log (seen: one per group).
            "SELECT s, (SELECT MAX(stream_version) FROM kiln_events WHERE stream_id = s), NULL::uuid
             FROM unnest($1::text[]) AS s
             UNION ALL
             SELECT NULL, NULL, (SELECT event_id FROM kiln_events WHERE event_id = i)
             FROM unnest($2::uuid[]) AS i",
        )
        .bind(&streams)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut versions = std::collections::HashMap::new();
        let mut stored = std::collections::HashSet::new();
        for (stream, version, id) in rows {
            match (stream, version, id) {
                (Some(s), Some(v), _) => {
                    versions.insert(s, v);
                }
                (_, _, Some(id)) => {
                    stored.insert(id);
                }
                _ => {}
            }
        }
        // Job rows another transaction holds (apalis claiming or acknowledging a batch of jobs):
        // the group locks the rest without waiting, and appends that change a held row are
        // appended alone afterwards. Waiting for them here could deadlock: the group changes
        // several job rows and apalis locks several in its own order.
        let keys: Vec<String> = group.iter().flat_map(|a| a.queue.iter().map(|op| op.run_id().to_string())).collect();
        let busy: std::collections::HashSet<String> = if keys.is_empty() {
            Default::default()
        } else {
            sqlx::query_scalar(
                "WITH wanted AS (SELECT j.id, j.idempotency_key FROM unnest($2::text[]) AS k
                                 CROSS JOIN LATERAL (SELECT id, idempotency_key FROM apalis.jobs
                                                     WHERE job_type = $1 AND idempotency_key = k) j),
                      got AS (SELECT id FROM apalis.jobs WHERE id IN (SELECT id FROM wanted)
                              FOR UPDATE SKIP LOCKED)
                 SELECT idempotency_key FROM wanted WHERE id NOT IN (SELECT id FROM got)",
            )
            .bind(crate::queue::QUEUE)
            .bind(&keys)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect()
        };
        let mut seen = std::collections::HashSet::new();
        let mut results = Vec::with_capacity(group.len());
        let mut cols = GroupColumns::default();
        let mut queue = Vec::new();
        let mut next = head;
        for a in group {
            let ids = a.events.iter().map(|e| e.event_id.as_uuid());
            let held = a.queue.iter().any(|op| busy.contains(&op.run_id().to_string()));
            if held || ids.clone().any(|id| stored.contains(&id) || !seen.insert(id)) {
                // A retry, a duplicate or a held job row: decided alone, after the group (by
                // the same rules as any single append).
                results.push(None);
                continue;
            }
            let actual = versions.get(a.stream.as_str()).map(|v| StreamVersion(*v as u64));
            if !a.expected.admits(actual) {
                let refused =
                    StoreError::WrongExpectedVersion { stream: a.stream.clone(), expected: a.expected, actual };
                results.push(Some(Err(refused)));
                continue;
            }
            let base = actual.map_or(0, |v| v.0 as i64);
            for (j, (e, payload)) in a.events.iter().zip(&a.payloads).enumerate() {
                cols.stream.push(a.stream.as_str().to_owned());
                cols.columns.push(next + j as i64 + 1, base + j as i64 + 1, e, payload.clone());
            }
            let n = a.events.len() as i64;
            versions.insert(a.stream.as_str().to_owned(), base + n);
            results.push(Some(Ok(AppendResult {
                first_position: Position((next + 1) as u64),
                last_position: Position((next + n) as u64),
                stream_version: StreamVersion((base + n) as u64),
                written: true,
            })));
            next += n;
            queue.extend(a.queue.iter().cloned());
        }
        if next > head {
            let c = cols.columns;
            sqlx::query(
                "INSERT INTO kiln_events (global_position, event_id, stream_id, stream_version, event_type,
                    schema_version, occurred_at, actor, correlation_id, causation_id, traceparent, payload)
                 SELECT p, id, s, v, t, sv, o, a, c, ca, tp, pl::jsonb
                 FROM UNNEST($1::bigint[], $2::uuid[], $3::text[], $4::bigint[], $5::text[], $6::smallint[],
                             $7::timestamptz[], $8::text[], $9::uuid[], $10::uuid[], $11::text[], $12::text[])
                      AS u(p, id, s, v, t, sv, o, a, c, ca, tp, pl)",
            )
            .bind(c.position)
            .bind(c.event_id)
            .bind(cols.stream)
            .bind(c.version)
            .bind(c.event_type)
            .bind(c.schema_version)
            .bind(c.occurred_at)
            .bind(c.actor)
            .bind(c.correlation_id)
            .bind(c.causation_id)
            .bind(c.traceparent)
            .bind(c.payload)
            .execute(&mut *tx)
            .await?;
            crate::queue::apply_postgres(&mut tx, &queue).await?;
            let pushed = queue.iter().any(|op| matches!(op, QueueOp::Push { .. }));
            sqlx::query(
                "WITH h AS (UPDATE kiln_log_head SET position = $1 WHERE id = 1)
                 SELECT pg_notify($2, $3), CASE WHEN $4 THEN pg_notify($5, '') END",
            )
            .bind(next)
            .bind(CHANNEL)
            .bind(next.to_string())
            .bind(pushed)
            .bind(QUEUE_CHANNEL)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            if pushed {
                self.queue_signal.send_modify(|n| *n = n.wrapping_add(1));
            }
            advance_head(&self.head, Position(next as u64));
        }
        Ok(results)
    }

    /// One append in its own transaction.
    async fn append_alone(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
        payloads: Vec<String>,
        queue: &[QueueOp],
    ) -> Result<AppendResult> {
        match self.try_append(stream, expected, events, payloads, queue).await {
            Err(StoreError::Database(e)) if StoreError::is_unique_violation(&e) => {
                // A concurrent retry of this very append won, or a later event id is stored.
                match self.already_stored(stream, events).await? {
                    Some(done) => Ok(done),
                    None => Err(self.duplicate_error(events).await?),
                }
            }
            other => other,
        }
    }

    async fn try_append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
        payloads: Vec<String>,
        queue: &[QueueOp],
    ) -> Result<AppendResult> {
        if let Some(done) = self.already_stored(stream, events).await? {
            return Ok(done);
        }
        let n = events.len() as i64;
        let mut tx = self.pool.begin().await?;
        let last: i64 =
            sqlx::query_scalar("UPDATE kiln_log_head SET position = position + $1 WHERE id = 1 RETURNING position")
                .bind(n)
                .fetch_one(&mut *tx)
                .await?;
        let actual: Option<i64> =
            sqlx::query_scalar("SELECT MAX(stream_version) FROM kiln_events WHERE stream_id = $1")
                .bind(stream.as_str())
                .fetch_one(&mut *tx)
                .await?;
        let actual = actual.map(|v| StreamVersion(v as u64));
        if !expected.admits(actual) {
            return Err(StoreError::WrongExpectedVersion { stream: stream.clone(), expected, actual });
        }
        let first = last - n + 1;
        let base_version = actual.map_or(0, |v| v.0 as i64);
        let mut cols = Columns::with_capacity(events.len());
        for (i, (e, payload)) in events.iter().zip(payloads).enumerate() {
            cols.push(first + i as i64, base_version + i as i64 + 1, e, payload);
        }
        sqlx::query(
            "WITH ins AS (
                INSERT INTO kiln_events (global_position, event_id, stream_id, stream_version, event_type,
                    schema_version, occurred_at, actor, correlation_id, causation_id, traceparent, payload)
                SELECT p, id, $3, v, t, sv, o, a, c, ca, tp, pl::jsonb
                FROM UNNEST($1::bigint[], $2::uuid[], $4::bigint[], $5::text[], $6::smallint[],
                            $7::timestamptz[], $8::text[], $9::uuid[], $10::uuid[], $11::text[], $12::text[])
                     AS u(p, id, v, t, sv, o, a, c, ca, tp, pl)
             )
             SELECT pg_notify($13, $14)",
        )
        .bind(cols.position)
        .bind(cols.event_id)
        .bind(stream.as_str())
        .bind(cols.version)
        .bind(cols.event_type)
        .bind(cols.schema_version)
        .bind(cols.occurred_at)
        .bind(cols.actor)
        .bind(cols.correlation_id)
        .bind(cols.causation_id)
        .bind(cols.traceparent)
        .bind(cols.payload)
        .bind(CHANNEL)
        .bind(last.to_string())
        .execute(&mut *tx)
        .await?;
        if !queue.is_empty() {
            crate::queue::apply_postgres(&mut tx, queue).await?;
            if queue.iter().any(|op| matches!(op, QueueOp::Push { .. })) {
                sqlx::query("SELECT pg_notify($1, '')").bind(QUEUE_CHANNEL).execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        if queue.iter().any(|op| matches!(op, QueueOp::Push { .. })) {
            self.queue_signal.send_modify(|n| *n = n.wrapping_add(1));
        }

        advance_head(&self.head, Position(last as u64));
        Ok(AppendResult {
            first_position: Position(first as u64),
            last_position: Position(last as u64),
            stream_version: StreamVersion((base_version + n) as u64),
            written: true,
        })
    }

    /// If every event of the batch is already stored, in order, in this stream: where it landed.
    async fn already_stored(&self, stream: &StreamId, events: &[NewEvent]) -> Result<Option<AppendResult>> {
        let first: Option<(i64, String, i64)> =
            sqlx::query_as("SELECT global_position, stream_id, stream_version FROM kiln_events WHERE event_id = $1")
                .bind(events[0].event_id.as_uuid())
                .fetch_optional(&self.pool)
                .await?;
        let Some((first_position, stored_in, first_version)) = first else { return Ok(None) };
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id.as_uuid()).collect();
        let rows: Vec<(Option<i64>, Option<String>, Option<i64>)> = sqlx::query_as(
            "SELECT e.global_position, e.stream_id, e.stream_version
             FROM UNNEST($1::uuid[]) WITH ORDINALITY AS i(id, ord)
             LEFT JOIN kiln_events e ON e.event_id = i.id ORDER BY i.ord",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let consistent = rows.len() == events.len()
            && stored_in == stream.as_str()
            && rows
                .iter()
                .enumerate()
                .all(|(i, (_, s, v))| s.as_deref() == Some(stored_in.as_str()) && *v == Some(first_version + i as i64));
        if !consistent {
            return Err(StoreError::PartialDuplicate {
                event_id: events[0].event_id,
                stored_in: StreamId::parse(stored_in).map_err(|e| StoreError::corrupt(first_position, e))?,
            });
        }
        let (last_position, _, last_version) = rows[rows.len() - 1].clone();
        Ok(Some(AppendResult {
            first_position: Position(first_position as u64),
            last_position: Position(last_position.unwrap_or(first_position) as u64),
            stream_version: StreamVersion(last_version.unwrap_or(first_version) as u64),
            written: false,
        }))
    }

    async fn duplicate_error(&self, events: &[NewEvent]) -> Result<StoreError> {
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id.as_uuid()).collect();
        let found: Option<(Uuid, String)> =
            sqlx::query_as("SELECT event_id, stream_id FROM kiln_events WHERE event_id = ANY($1) LIMIT 1")
                .bind(&ids)
                .fetch_optional(&self.pool)
                .await?;
        match found {
            Some((id, s)) => Ok(StoreError::PartialDuplicate {
                event_id: EventId::from_uuid(id),
                stored_in: StreamId::parse(s).map_err(|e| StoreError::corrupt(0, e))?,
            }),
            None => {
                Err(StoreError::Database(sqlx::Error::Protocol("unique violation without a duplicate event".into())))
            }
        }
    }

    pub async fn read_stream(
        &self,
        stream: &StreamId,
        after: StreamVersion,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>> {
        sqlx::query(concat!(
            select_columns!(),
            " WHERE stream_id = $1 AND stream_version > $2 ORDER BY stream_version LIMIT $3"
        ))
        .bind(stream.as_str())
        .bind(after.0 as i64)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(decode_row)
        .collect()
    }

    pub async fn read_all(&self, after: Position, limit: usize) -> Result<Vec<RecordedEvent>> {
        sqlx::query(concat!(select_columns!(), " WHERE global_position > $1 ORDER BY global_position LIMIT $2"))
            .bind(after.0 as i64)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(decode_row)
            .collect()
    }

    pub async fn stream_version(&self, stream: &StreamId) -> Result<Option<StreamVersion>> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(stream_version) FROM kiln_events WHERE stream_id = $1")
            .bind(stream.as_str())
            .fetch_one(&self.pool)
            .await?;
        Ok(v.map(|v| StreamVersion(v as u64)))
    }

    pub async fn head(&self) -> Result<Position> {
        let h: i64 = sqlx::query_scalar("SELECT position FROM kiln_log_head").fetch_one(&self.pool).await?;
        Ok(Position(h as u64))
    }

    pub fn head_watch(&self) -> watch::Receiver<Position> {
        self.head.subscribe()
    }
}

/// The columns of a group's events, which belong to several streams.
#[derive(Default)]
struct GroupColumns {
    stream: Vec<String>,
    columns: Columns,
}

/// One array per column, for a single multi-row `INSERT ... SELECT FROM UNNEST`.
#[derive(Default)]
struct Columns {
    position: Vec<i64>,
    event_id: Vec<Uuid>,
    version: Vec<i64>,
    event_type: Vec<String>,
    schema_version: Vec<i16>,
    occurred_at: Vec<DateTime<Utc>>,
    actor: Vec<String>,
    correlation_id: Vec<Option<Uuid>>,
    causation_id: Vec<Option<Uuid>>,
    traceparent: Vec<Option<String>>,
    payload: Vec<String>,
}

impl Columns {
    fn with_capacity(n: usize) -> Self {
        Self {
            position: Vec::with_capacity(n),
            event_id: Vec::with_capacity(n),
            version: Vec::with_capacity(n),
            event_type: Vec::with_capacity(n),
            schema_version: Vec::with_capacity(n),
            occurred_at: Vec::with_capacity(n),
            actor: Vec::with_capacity(n),
            correlation_id: Vec::with_capacity(n),
            causation_id: Vec::with_capacity(n),
            traceparent: Vec::with_capacity(n),
            payload: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, position: i64, version: i64, e: &NewEvent, payload: String) {
        self.position.push(position);
        self.event_id.push(e.event_id.as_uuid());
        self.version.push(version);
        self.event_type.push(e.event_type.clone());
        self.schema_version.push(e.schema_version as i16);
        self.occurred_at.push(e.occurred_at);
        self.actor.push(e.metadata.actor.as_str().to_owned());
        self.correlation_id.push(e.metadata.correlation_id);
        self.causation_id.push(e.metadata.causation_id.map(|c| c.as_uuid()));
        self.traceparent.push(e.metadata.traceparent.as_ref().map(|t| t.as_str().to_owned()));
        self.payload.push(payload);
    }
}

macro_rules! select_columns {
    () => {
        "SELECT global_position, event_id, stream_id, stream_version, event_type, schema_version, \
         occurred_at, actor, correlation_id, causation_id, traceparent, payload::text FROM kiln_events"
    };
}
use select_columns;

fn decode_row(row: &PgRow) -> Result<RecordedEvent> {
    let position: i64 = row.try_get(0)?;
    let bad = |what: &str, e: &dyn std::fmt::Display| StoreError::corrupt(position, format!("{what}: {e}"));
    Ok(RecordedEvent {
        position: Position(position as u64),
        stream_id: StreamId::parse(row.try_get::<String, _>(2)?).map_err(|e| bad("stream_id", &e))?,
        stream_version: StreamVersion(row.try_get::<i64, _>(3)? as u64),
        event_id: EventId::from_uuid(row.try_get(1)?),
        event_type: row.try_get(4)?,
        schema_version: row.try_get::<i16, _>(5)? as u16,
        occurred_at: row.try_get(6)?,
        metadata: EventMetadata {
            actor: Actor::parse(row.try_get::<String, _>(7)?).map_err(|e| bad("actor", &e))?,
            correlation_id: row.try_get(8)?,
            causation_id: row.try_get::<Option<Uuid>, _>(9)?.map(EventId::from_uuid),
            traceparent: row
                .try_get::<Option<String>, _>(10)?
                .map(|t| TraceParent::parse(t).map_err(|e| bad("traceparent", &e)))
                .transpose()?,
        },
        payload: RawValue::from_string(row.try_get(11)?).map_err(|e| bad("payload", &e))?,
    })
}
