//! The SQLite event store: the embedded default.
//!
//! One writer connection serialises every write in this process (SQLite allows one writer at a
//! time anyway; queueing in-process avoids busy-waiting on the file lock), and write transactions
//! start with `BEGIN IMMEDIATE` so a second process waits on `busy_timeout` instead of failing
//! mid-transaction. Readers use their own pool and see committed snapshots (WAL mode).
//! Subscribers are woken in-process when the writer commits.

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use kiln_proto::{
    Actor, EventId, EventMetadata, NewEvent, Position, RecordedEvent, StreamId, StreamVersion, TraceParent,
};
use serde_json::value::RawValue;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::group::PendingAppend;
use crate::queue::{QueueOp, RunFeedMessage};
use crate::store::{StoreOptions, advance_head};
use crate::{AppendResult, ExpectedVersion, Result, StoreError};

/// Rows per multi-row INSERT: 12 binds each stays far below SQLite's 32,766 variable limit.
const INSERT_CHUNK: usize = 1_000;

#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Exactly one connection: the only writer in this process.
    writer: SqlitePool,
    reader: SqlitePool,
    /// The last committed position; appends raise it after commit, subscribers wait on it.
    head: Arc<watch::Sender<Position>>,
    /// Raised after commits that pushed a job: wakes this process's workers.
    queue_signal: Arc<watch::Sender<u64>>,
    run_feed: tokio::sync::broadcast::Sender<RunFeedMessage>,
    /// Appends waiting for the group commit task.
    appends: mpsc::UnboundedSender<PendingAppend>,
}

impl SqliteStore {
    pub async fn open(options: &StoreOptions) -> Result<Self> {
        let url = &options.database_url;
        if url.contains(":memory:") || url.contains("mode=memory") {
            return Err(StoreError::UnsupportedUrl(format!(
                "{url} (in-memory SQLite is not supported: readers and the writer need one shared file)"
            )));
        }
        let connect = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if options.sqlite_full_sync { SqliteSynchronous::Full } else { SqliteSynchronous::Normal })
            .busy_timeout(options.busy_timeout)
            .foreign_keys(true)
            .pragma("cache_size", "-32000")
            .pragma("temp_store", "memory");
        if let Some(dir) = connect.get_filename().parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::UnsupportedUrl(format!("{url} (cannot create folder {}: {e})", dir.display()))
            })?;
        }
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(connect.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .connect_with(connect.read_only(true))
            .await?;
        let head = Arc::new(watch::Sender::new(Position::START));
        let queue_signal = Arc::new(watch::Sender::new(0));
        let (appends, pending) = mpsc::unbounded_channel();
        let group = GroupCommit { writer: writer.clone(), head: head.clone(), queue_signal: queue_signal.clone() };
        tokio::spawn(group.run(pending));
        let store =
            Self { writer, reader, head, queue_signal, run_feed: tokio::sync::broadcast::Sender::new(1024), appends };
        Ok(store)
    }

    pub(crate) fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    pub(crate) fn queue_signal(&self) -> &watch::Sender<u64> {
        &self.queue_signal
    }

    pub(crate) fn run_feed(&self) -> &tokio::sync::broadcast::Sender<RunFeedMessage> {
        &self.run_feed
    }

    pub(crate) fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    /// Re-reads the head from the database (after migrations, or after another process wrote).
    pub(crate) async fn refresh_head(&self) -> Result<()> {
        let head = self.head().await?;
        advance_head(&self.head, head);
        Ok(())
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
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
    /// Appends from concurrent callers are committed in groups: one task owns the writer, takes
    /// every append waiting for it and commits them in one transaction (each still checked
    /// against its own expected version). If anything fails mid-group, the group is rolled back
    /// and each append is retried alone, so one bad append cannot take others down with it.
    pub async fn append_queued(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        queue: &[QueueOp],
    ) -> Result<AppendResult> {
        crate::group::submit(&self.appends, stream, expected, events, queue).await
    }

    pub async fn read_stream(
        &self,
        stream: &StreamId,
        after: StreamVersion,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>> {
        let filter = "WHERE stream_id = ?1 AND stream_version > ?2 ORDER BY stream_version LIMIT ?3";
        self.read_page(filter, Some(stream.as_str()), after.0, limit).await
    }

    pub async fn read_all(&self, after: Position, limit: usize) -> Result<Vec<RecordedEvent>> {
        let filter = "WHERE ?1 IS NULL AND global_position > ?2 ORDER BY global_position LIMIT ?3";
        self.read_page(filter, None, after.0, limit).await
    }

    /// Reads the events `filter` selects as one page: SQLite concatenates their records, space
    /// separated, into one text parsed as a stream of JSON values. (sqlx would copy each column of
    /// each row into its own allocation and hand rows over one at a time, which costs several
    /// times more.) Records carry their position, so the page's order is checked here rather than
    /// trusted to `group_concat`. If the page does not parse, it is read again record by record to
    /// name the corrupt position.
    async fn read_page(
        &self,
        filter: &str,
        stream: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>> {
        let sql = format!("SELECT group_concat(record, ' ') FROM (SELECT record FROM kiln_events {filter})");
        let page: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(stream)
            .bind(after as i64)
            .bind(limit as i64)
            .fetch_one(&self.reader)
            .await?;
        let Some(page) = page else { return Ok(Vec::new()) };
        let parsed: Result<Vec<Record<'_>>, _> = serde_json::Deserializer::from_str(&page).into_iter().collect();
        if let Ok(records) = parsed {
            let mut events = records.into_iter().map(Record::into_event).collect::<Result<Vec<_>>>()?;
            if !events.is_sorted_by_key(|e| e.position) {
                events.sort_by_key(|e| e.position);
            }
            return Ok(events);
        }
        let sql = format!("SELECT global_position, record FROM kiln_events {filter}");
        let rows: Vec<(i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(stream)
            .bind(after as i64)
            .bind(limit as i64)
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|(position, record)| {
                serde_json::from_str::<Record<'_>>(record)
                    .map_err(|e| StoreError::corrupt(*position, format!("record: {e}")))?
                    .into_event()
            })
            .collect()
    }

    pub async fn stream_version(&self, stream: &StreamId) -> Result<Option<StreamVersion>> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(stream_version) FROM kiln_events WHERE stream_id = ?")
            .bind(stream.as_str())
            .fetch_one(&self.reader)
            .await?;
        Ok(v.map(|v| StreamVersion(v as u64)))
    }

    pub async fn head(&self) -> Result<Position> {
        let h: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(global_position), 0) FROM kiln_events")
            .fetch_one(&self.reader)
            .await?;
        Ok(Position(h as u64))
    }

    pub fn head_watch(&self) -> watch::Receiver<Position> {
        self.head.subscribe()
    }
}

/// The task that owns the writer for appends; see [`SqliteStore::append_queued`].
struct GroupCommit {
    writer: SqlitePool,
    head: Arc<watch::Sender<Position>>,
    queue_signal: Arc<watch::Sender<u64>>,
}

/// What one append of a group came to, before the group commits.
enum Staged {
    /// Written in the group's transaction; `pushed`: it enqueued a job.
    Written { result: AppendResult, pushed: bool },
    /// Nothing written: a retry of a stored append, or refused (wrong expected version, a
    /// partial duplicate). Final whether or not the group commits.
    Settled(Result<AppendResult>),
}

impl GroupCommit {
    /// Commits appends in groups until every sender is gone.
    async fn run(self, mut appends: mpsc::UnboundedReceiver<PendingAppend>) {
        while let Some(group) = crate::group::next_group(&mut appends).await {
            self.commit(group).await;
        }
    }

    async fn commit(&self, group: Vec<PendingAppend>) {
        match self.write(&group).await {
            Ok(staged) => {
                let mut last = None;
                let mut pushed = false;
                for (append, staged) in group.into_iter().zip(staged) {
                    let result = match staged {
                        Staged::Written { result, pushed: p } => {
                            pushed |= p;
                            last = last.max(Some(result.last_position));
                            Ok(result)
                        }
                        Staged::Settled(result) => result,
                    };
                    let _ = append.reply.send(result);
                }
                self.committed(last, pushed);
            }
            Err(e) if group.len() == 1 => {
                let _ = group.into_iter().next().map(|a| a.reply.send(Err(e)));
            }
            // Rolled back: each append alone, so the one that failed is the only one to fail.
            Err(_) => {
                for append in group {
                    let result = match self.write(std::slice::from_ref(&append)).await {
                        Ok(mut staged) => match staged.pop() {
                            Some(Staged::Written { result, pushed }) => {
                                self.committed(Some(result.last_position), pushed);
                                Ok(result)
                            }
                            Some(Staged::Settled(result)) => result,
                            None => unreachable!("one staged result per append"),
                        },
                        Err(e) => Err(e),
                    };
                    let _ = append.reply.send(result);
                }
            }
        }
    }

    /// After a commit: raises the head, wakes workers if a job was pushed.
    fn committed(&self, last: Option<Position>, pushed: bool) {
        if pushed {
            self.queue_signal.send_modify(|n| *n = n.wrapping_add(1));
        }
        if let Some(last) = last {
            advance_head(&self.head, last);
        }
    }

    /// Writes the group in one transaction and commits it; Err if the transaction failed (and
    /// was rolled back).
    async fn write(&self, group: &[PendingAppend]) -> Result<Vec<Staged>> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let mut staged = Vec::with_capacity(group.len());
        for append in group {
            staged.push(stage(&mut tx, append).await?);
        }
        tx.commit().await?;
        Ok(staged)
    }
}

/// Writes one append inside the group's transaction. Refusals (`Staged::Settled`) are decided
/// before anything is written, so a refused append leaves the transaction as it found it; an
/// Err means the transaction must be rolled back (the group is then retried one by one, and
/// alone the append gets the error).
async fn stage(tx: &mut sqlx::Transaction<'_, Sqlite>, append: &PendingAppend) -> Result<Staged> {
    let PendingAppend { stream, expected, events, payloads, queue, .. } = append;
    // One round trip for what the append needs to know: is it a retry, the stream's version,
    // the head.
    let (stored, actual, head): (i64, Option<i64>, i64) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM kiln_events WHERE event_id = ?1),
                (SELECT MAX(stream_version) FROM kiln_events WHERE stream_id = ?2),
                (SELECT COALESCE(MAX(global_position), 0) FROM kiln_events)",
    )
    .bind(events[0].event_id.to_string())
    .bind(stream.as_str())
    .fetch_one(&mut **tx)
    .await?;
    if stored != 0 {
        match already_stored(tx, stream, events).await {
            Ok(Some(done)) => return Ok(Staged::Settled(Ok(done))),
            Ok(None) => {}
            Err(e @ StoreError::PartialDuplicate { .. }) => return Ok(Staged::Settled(Err(e))),
            Err(e) => return Err(e),
        }
    }
    let actual = actual.map(|v| StreamVersion(v as u64));
    if !expected.admits(actual) {
        let refused = StoreError::WrongExpectedVersion { stream: stream.clone(), expected: *expected, actual };
        return Ok(Staged::Settled(Err(refused)));
    }

    let base_version = actual.map_or(0, |v| v.0 as i64);
    let recorded_at = Utc::now().timestamp_micros();
    let records = events
        .iter()
        .zip(payloads)
        .enumerate()
        .map(|(i, (e, payload))| record(head + i as i64 + 1, stream, base_version + i as i64 + 1, e, payload))
        .collect::<Result<Vec<_>>>()?;
    let rows: Vec<_> = events.iter().zip(records).enumerate().collect();
    for chunk in rows.chunks(INSERT_CHUNK) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO kiln_events (global_position, event_id, stream_id, stream_version, event_type, \
             occurred_at_us, recorded_at_us, actor, record) ",
        );
        insert.push_values(chunk, |mut row, (i, (e, record))| {
            let i = *i as i64 + 1;
            row.push_bind(head + i)
                .push_bind(e.event_id.to_string())
                .push_bind(stream.as_str())
                .push_bind(base_version + i)
                .push_bind(e.event_type.as_str())
                .push_bind(e.occurred_at.timestamp_micros())
                .push_bind(recorded_at)
                .push_bind(e.metadata.actor.as_str())
                .push_bind(record.as_str());
        });
        if let Err(e) = insert.build().execute(&mut **tx).await {
            if StoreError::is_unique_violation(&e) {
                // A later event of the batch is stored although the first is not. Earlier
                // chunks of this append may be written: the transaction must be rolled back.
                return Err(partial_duplicate(tx, events).await?);
            }
            return Err(e.into());
        }
    }
    crate::queue::apply_sqlite(tx, queue).await?;
    let n = events.len() as i64;
    Ok(Staged::Written {
        result: AppendResult {
            first_position: Position((head + 1) as u64),
            last_position: Position((head + n) as u64),
            stream_version: StreamVersion((base_version + n) as u64),
            written: true,
        },
        pushed: queue.iter().any(|op| matches!(op, QueueOp::Push { .. })),
    })
}

/// The error for an append some of whose events are stored (read inside the transaction, which
/// sees its group's own appends).
async fn partial_duplicate(tx: &mut sqlx::Transaction<'_, Sqlite>, events: &[NewEvent]) -> Result<StoreError> {
    for e in events {
        let stored: Option<String> = sqlx::query_scalar("SELECT stream_id FROM kiln_events WHERE event_id = ?")
            .bind(e.event_id.to_string())
            .fetch_optional(&mut **tx)
            .await?;
        if let Some(s) = stored {
            let stored_in = StreamId::parse(s).map_err(|err| StoreError::corrupt(0, err))?;
            return Ok(StoreError::PartialDuplicate { event_id: e.event_id, stored_in });
        }
    }
    Err(StoreError::Database(sqlx::Error::Protocol("unique violation without a duplicate event".into())))
}

/// If the batch's first event is already stored, this is a retry: returns where it landed, or
/// an error if the stored events are not exactly this batch.
async fn already_stored(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    stream: &StreamId,
    events: &[NewEvent],
) -> Result<Option<AppendResult>> {
    let first = events[0].event_id.to_string();
    let found: Option<(i64, String, i64)> =
        sqlx::query_as("SELECT global_position, stream_id, stream_version FROM kiln_events WHERE event_id = ?")
            .bind(&first)
            .fetch_optional(&mut **tx)
            .await?;
    let Some((first_position, stored_in, first_version)) = found else { return Ok(None) };
    let mut last = (first_position, first_version);
    for (i, e) in events.iter().enumerate().skip(1) {
        let row: Option<(i64, String, i64)> =
            sqlx::query_as("SELECT global_position, stream_id, stream_version FROM kiln_events WHERE event_id = ?")
                .bind(e.event_id.to_string())
                .fetch_optional(&mut **tx)
                .await?;
        match row {
            Some((p, s, v)) if s == stored_in && v == first_version + i as i64 => last = (p, v),
            _ => {
                return Err(StoreError::PartialDuplicate {
                    event_id: events[0].event_id,
                    stored_in: StreamId::parse(stored_in).map_err(|err| StoreError::corrupt(first_position, err))?,
                });
            }
        }
    }
    if stored_in != stream.as_str() {
        return Err(StoreError::PartialDuplicate {
            event_id: events[0].event_id,
            stored_in: StreamId::parse(stored_in).map_err(|err| StoreError::corrupt(first_position, err))?,
        });
    }
    Ok(Some(AppendResult {
        first_position: Position(first_position as u64),
        last_position: Position(last.0 as u64),
        stream_version: StreamVersion(last.1 as u64),
        written: false,
    }))
}

/// The JSON record of one event, as stored in the `record` column.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record<'a>(
    i64,
    #[serde(borrow)] Cow<'a, str>,
    #[serde(borrow)] Cow<'a, str>,
    i64,
    #[serde(borrow)] Cow<'a, str>,
    u16,
    i64,
    #[serde(borrow)] Cow<'a, str>,
    Option<Uuid>,
    Option<Uuid>,
    #[serde(borrow)] Option<Cow<'a, str>>,
    Box<RawValue>,
);

/// The record of an event about to be appended; `payload` is its already-encoded JSON.
fn record(position: i64, stream: &StreamId, version: i64, e: &NewEvent, payload: &str) -> Result<String> {
    let invalid = |err: serde_json::Error| StoreError::corrupt(position, format!("cannot encode the event: {err}"));
    let payload = RawValue::from_string(payload.to_owned()).map_err(invalid)?;
    let r = Record(
        position,
        Cow::Owned(e.event_id.to_string()),
        Cow::Borrowed(stream.as_str()),
        version,
        Cow::Borrowed(&e.event_type),
        e.schema_version,
        e.occurred_at.timestamp_micros(),
        Cow::Borrowed(e.metadata.actor.as_str()),
        e.metadata.correlation_id,
        e.metadata.causation_id.map(|c| c.as_uuid()),
        e.metadata.traceparent.as_ref().map(|t| Cow::Borrowed(t.as_str())),
        payload,
    );
    serde_json::to_string(&r).map_err(invalid)
}

impl Record<'_> {
    fn into_event(self) -> Result<RecordedEvent> {
        let Record(
            position,
            event_id,
            stream,
            version,
            event_type,
            schema,
            occurred_us,
            actor,
            corr,
            cause,
            tp,
            payload,
        ) = self;
        let bad = |what: &str, e: &dyn std::fmt::Display| StoreError::corrupt(position, format!("{what}: {e}"));
        Ok(RecordedEvent {
            position: Position(position as u64),
            stream_id: StreamId::parse(stream.into_owned()).map_err(|e| bad("stream_id", &e))?,
            stream_version: StreamVersion(version as u64),
            event_id: EventId::from_uuid(Uuid::parse_str(&event_id).map_err(|e| bad("event_id", &e))?),
            event_type: event_type.into_owned(),
            schema_version: schema,
            occurred_at: DateTime::from_timestamp_micros(occurred_us)
                .ok_or_else(|| bad("occurred_at", &occurred_us))?,
            metadata: EventMetadata {
                actor: Actor::parse(actor.into_owned()).map_err(|e| bad("actor", &e))?,
                correlation_id: corr,
                causation_id: cause.map(EventId::from_uuid),
                traceparent: tp
                    .map(|t| TraceParent::parse(t.into_owned()).map_err(|e| bad("traceparent", &e)))
                    .transpose()?,
            },
            payload,
        })
    }
}
