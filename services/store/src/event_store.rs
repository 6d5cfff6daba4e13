//! The `EventStore` contract shared by both backends.

use std::fmt;

use async_trait::async_trait;
use kiln_proto::{NewEvent, Position, RecordedEvent, StreamId, StreamVersion};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::Result;
use crate::subscribe::{EventStream, subscribe};

/// What the writer believes about the stream it appends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind", content = "version")]
pub enum ExpectedVersion {
    /// Append whatever the stream's state.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must be at exactly this version.
    Exact(StreamVersion),
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any version"),
            Self::NoStream => f.write_str("no stream"),
            Self::Exact(v) => v.fmt(f),
        }
    }
}

impl ExpectedVersion {
    /// Whether a stream at `actual` (None: it does not exist) satisfies this expectation.
    pub fn admits(self, actual: Option<StreamVersion>) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => actual.is_none(),
            Self::Exact(v) => actual == Some(v),
        }
    }
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppendResult {
    pub first_position: Position,
    pub last_position: Position,
    /// The stream's version after the append: what to expect next time.
    pub stream_version: StreamVersion,
    /// False when every event was already stored (an idempotent retry): nothing was written.
    pub written: bool,
}

/// The append-only event log.
#[async_trait]
pub trait EventStore: Send + Sync + fmt::Debug {
    /// Appends `events` to `stream` atomically, if the stream is at `expected`. Re-sending the
    /// same event ids (a retry) returns where they were stored and writes nothing.
    async fn append(&self, stream: &StreamId, expected: ExpectedVersion, events: Vec<NewEvent>)
    -> Result<AppendResult>;

    /// Events of one stream with a version greater than `after`, oldest first.
    async fn read_stream(&self, stream: &StreamId, after: StreamVersion, limit: usize) -> Result<Vec<RecordedEvent>>;

    /// Events of the whole log with a position greater than `after`, in position order.
    async fn read_all(&self, after: Position, limit: usize) -> Result<Vec<RecordedEvent>>;

    /// The current version of a stream; None if it has no events.
    async fn stream_version(&self, stream: &StreamId) -> Result<Option<StreamVersion>>;

    /// The position of the last committed event.
    async fn head(&self) -> Result<Position>;

    /// A receiver that changes whenever events are committed; its value is a known head.
    fn head_watch(&self) -> watch::Receiver<Position>;

    /// Every event after `after`, then every new one as it is committed, without polling.
    fn subscribe(&self, after: Position) -> EventStream
    where
        Self: Clone + Sized + 'static,
    {
        subscribe(self.clone(), after)
    }
}
