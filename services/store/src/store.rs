//! `Store`: the backend chosen by the database URL, behind one type the rest of Kiln uses.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use kiln_proto::{NewEvent, Position, RecordedEvent, StreamId, StreamVersion};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::postgres::PgStore;
use crate::projection::WriteTx;
use crate::queue::QueueOp;
use crate::sqlite::SqliteStore;
use crate::{AppendResult, EventStore, ExpectedVersion, Result, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        })
    }
}

impl Backend {
    /// The backend a database URL names.
    pub fn of_url(url: &str) -> Result<Backend> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            Err(StoreError::UnsupportedUrl(url.to_owned()))
        }
    }
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub database_url: String,
    /// Connections for readers (PostgreSQL: for everything). SQLite always has one writer.
    pub max_connections: u32,
    /// SQLite only: fsync on every commit (`true`) or only at checkpoints (WAL `NORMAL`:
    /// durable across process crashes, may lose the last commits on power loss).
    pub sqlite_full_sync: bool,
    pub busy_timeout: Duration,
}

impl StoreOptions {
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            max_connections: 8,
            sqlite_full_sync: false,
            busy_timeout: Duration::from_secs(10),
        }
    }
}

/// The event store on whichever backend the URL named.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

impl Store {
    /// Connects (creating a SQLite file and its folder if needed). Does not migrate.
    pub async fn open(options: &StoreOptions) -> Result<Store> {
        match Backend::of_url(&options.database_url)? {
            Backend::Sqlite => SqliteStore::open(options).await.map(Store::Sqlite),
            Backend::Postgres => PgStore::open(options).await.map(Store::Postgres),
        }
    }

    /// Connects and brings the schema up to date.
    pub async fn open_and_migrate(options: &StoreOptions) -> Result<Store> {
        let store = Self::open(options).await?;
        store.migrate().await?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        match self {
            Self::Sqlite(_) => Backend::Sqlite,
            Self::Postgres(_) => Backend::Postgres,
        }
    }

    pub async fn migrate(&self) -> Result<()> {
        let migrator = crate::migrate::migrator(self.backend());
        match self {
            Self::Sqlite(s) => migrator.run(s.writer()).await?,
            Self::Postgres(s) => migrator.run(s.pool()).await?,
        }
        self.migrate_queue().await?;
        match self {
            Self::Sqlite(s) => s.refresh_head().await,
            Self::Postgres(s) => s.refresh_head().await,
        }
    }

    /// Appends like [`EventStore::append`] and applies `queue` changes in the same transaction:
    /// the events and the job rows commit together or not at all.
    pub async fn append_queued(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        queue: &[QueueOp],
    ) -> Result<AppendResult> {
        match self {
            Self::Sqlite(s) => s.append_queued(stream, expected, events, queue).await,
            Self::Postgres(s) => s.append_queued(stream, expected, events, queue).await,
        }
    }

    /// The schema version applied to the database (0: none).
    pub async fn schema_version(&self) -> Result<i64> {
        let sql = "SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success";
        let version = match self {
            Self::Sqlite(s) => sqlx::query_scalar::<_, i64>(sql).fetch_one(s.reader()).await,
            Self::Postgres(s) => sqlx::query_scalar::<_, i64>(sql).fetch_one(s.pool()).await,
        };
        match version {
            Ok(v) => Ok(v),
            Err(sqlx::Error::Database(e)) if e.message().contains("_sqlx_migrations") => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the database answers and its schema is what this binary expects.
    pub async fn ready(&self) -> Result<bool> {
        Ok(self.schema_version().await? == crate::migrate::latest_version(self.backend()))
    }

    /// Begins a write transaction for read models and checkpoints.
    pub async fn begin_write(&self) -> Result<WriteTx> {
        match self {
            Self::Sqlite(s) => Ok(WriteTx::Sqlite(s.writer().begin_with("BEGIN IMMEDIATE").await?)),
            Self::Postgres(s) => Ok(WriteTx::Postgres(s.pool().begin().await?)),
        }
    }

    /// Begins a read-only snapshot for comparing read models.
    pub async fn begin_read(&self) -> Result<WriteTx> {
        match self {
            Self::Sqlite(s) => Ok(WriteTx::Sqlite(s.reader().begin().await?)),
            Self::Postgres(s) => {
                Ok(WriteTx::Postgres(s.pool().begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?))
            }
        }
    }

    pub async fn close(&self) {
        match self {
            Self::Sqlite(s) => s.close().await,
            Self::Postgres(s) => s.close().await,
        }
    }
}

#[async_trait]
impl EventStore for Store {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        match self {
            Self::Sqlite(s) => s.append(stream, expected, events).await,
            Self::Postgres(s) => s.append(stream, expected, events).await,
        }
    }

    async fn read_stream(&self, stream: &StreamId, after: StreamVersion, limit: usize) -> Result<Vec<RecordedEvent>> {
        match self {
            Self::Sqlite(s) => s.read_stream(stream, after, limit).await,
            Self::Postgres(s) => s.read_stream(stream, after, limit).await,
        }
    }

    async fn read_all(&self, after: Position, limit: usize) -> Result<Vec<RecordedEvent>> {
        match self {
            Self::Sqlite(s) => s.read_all(after, limit).await,
            Self::Postgres(s) => s.read_all(after, limit).await,
        }
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<StreamVersion>> {
        match self {
            Self::Sqlite(s) => s.stream_version(stream).await,
            Self::Postgres(s) => s.stream_version(stream).await,
        }
    }

    async fn head(&self) -> Result<Position> {
        match self {
            Self::Sqlite(s) => s.head().await,
            Self::Postgres(s) => s.head().await,
        }
    }

    fn head_watch(&self) -> watch::Receiver<Position> {
        match self {
            Self::Sqlite(s) => s.head_watch(),
            Self::Postgres(s) => s.head_watch(),
        }
    }
}

/// Raises the watched head to `position` if it is behind; wakes subscribers.
pub(crate) fn advance_head(head: &watch::Sender<Position>, position: Position) {
    head.send_if_modified(|h| {
        let behind = *h < position;
        if behind {
            *h = position;
        }
        behind
    });
}

/// Checks the common preconditions of an append.
pub(crate) fn check_append(stream: &StreamId, events: &[NewEvent]) -> Result<()> {
    if events.is_empty() {
        return Err(StoreError::EmptyAppend(stream.clone()));
    }
    Ok(())
}

/// Largest payload one event may carry.
pub const MAX_PAYLOAD_BYTES: usize = 32 << 20;

/// An event's payload as the JSON text both backends store, within the size limit.
pub(crate) fn encode_payload(e: &NewEvent) -> Result<String> {
    let text = e.payload.to_string();
    if text.len() > MAX_PAYLOAD_BYTES {
        return Err(StoreError::EventTooLarge { event_id: e.event_id, size: text.len(), limit: MAX_PAYLOAD_BYTES });
    }
    Ok(text)
}
