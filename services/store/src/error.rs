//! Errors at the store's boundary. Each says what was wrong and where.

use kiln_proto::{DecodeError, EventId, StreamId, StreamVersion};

use crate::event_store::ExpectedVersion;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another writer got there first, or the caller's view of the stream is stale.
    #[error("version conflict on stream \"{stream}\": expected {expected}, current is {}", current_label(*.actual))]
    WrongExpectedVersion { stream: StreamId, expected: ExpectedVersion, actual: Option<StreamVersion> },

    /// Some, but not all, of the events were already stored: this is not a retry of one append.
    #[error(
        "event {event_id} is already stored in stream \"{stored_in}\" but the rest of this append is not; an append is retried whole or not at all"
    )]
    PartialDuplicate { event_id: EventId, stored_in: StreamId },

    #[error("nothing to append to stream \"{0}\"")]
    EmptyAppend(StreamId),

    #[error("event {event_id} is {size} bytes of payload; the limit is {limit} bytes")]
    EventTooLarge { event_id: EventId, size: usize, limit: usize },

    /// A row in the log cannot be read back as an event (corruption or a foreign writer).
    #[error("corrupt event at position {position}: {message}")]
    Corrupt { position: u64, message: String },

    /// An event cannot be decoded into a domain event (unknown type, malformed payload).
    #[error(transparent)]
    Decode(#[from] DecodeError),

    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://...")]
    UnsupportedUrl(String),

    #[error("projection {projection:?} failed at position {position}: {message}")]
    Projection { projection: String, position: u64, message: String },

    #[error("unknown projection {0:?}")]
    UnknownProjection(String),

    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    #[error("run queue: {0}")]
    Queue(String),

    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

fn current_label(v: Option<StreamVersion>) -> String {
    match v {
        Some(v) => v.to_string(),
        None => "no stream".to_owned(),
    }
}

impl StoreError {
    pub(crate) fn corrupt(position: i64, message: impl ToString) -> Self {
        Self::Corrupt { position: position as u64, message: message.to_string() }
    }

    /// Whether the database reported a unique-constraint violation.
    pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
        matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
    }
}
