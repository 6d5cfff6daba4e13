//! Identifiers: event and run ids (UUIDv7, so they sort by creation time), stream ids, global
//! positions and stream versions. Each is its own type so a run id can never be passed where an
//! event id is expected.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::tool::ToolName;

macro_rules! uuid_v7_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_v7_id!(
    /// Unique id of one event. Re-appending an event whose id is already stored is a no-op.
    EventId
);
uuid_v7_id!(
    /// Id of one run (one invocation of a tool), and of its stream `run-<id>`.
    RunId
);

impl EventId {
    /// A deterministic id (UUIDv8 from SHA-256) for an event that must be appended at most once
    /// per key, e.g. the request of a run with an idempotency key: a second append with the same
    /// id is recognised by the store instead of recorded twice.
    pub fn for_key(key: &str) -> EventId {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(key.as_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        EventId(uuid::Builder::from_custom_bytes(bytes).into_uuid())
    }
}

/// Position of an event in the global log: gapless, starting at 1, in commit order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Position(pub u64);

impl Position {
    /// Before the first event: reading all "after" it reads the whole log.
    pub const START: Position = Position(0);

    pub fn next(self) -> Position {
        Position(self.0 + 1)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Version of a stream: the number of events in it. The first event has version 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct StreamVersion(pub u64);

impl fmt::Display for StreamVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Name of a stream: `<category>-<id>`, e.g. `tool-weather` or `run-0192...`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamId(String);

/// A stream id that is empty, too long or has characters outside printable ASCII.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid stream id {0:?}: must be 1-200 printable ASCII characters without spaces")]
pub struct InvalidStreamId(pub String);

impl StreamId {
    pub const MAX_LEN: usize = 200;

    pub fn parse(s: impl Into<String>) -> Result<Self, InvalidStreamId> {
        let s = s.into();
        let ok = !s.is_empty() && s.len() <= Self::MAX_LEN && s.bytes().all(|b| b.is_ascii_graphic());
        if ok { Ok(Self(s)) } else { Err(InvalidStreamId(s)) }
    }

    /// The stream of one tool: its creation, every published version and state change.
    pub fn tool(name: &ToolName) -> Self {
        Self(format!("tool-{name}"))
    }

    /// The stream of one run: its request, attempts, steps and outcome.
    pub fn run(id: RunId) -> Self {
        Self(format!("run-{id}"))
    }

    /// The part before the first `-`: `tool`, `run`, ...
    pub fn category(&self) -> &str {
        self.0.split_once('-').map_or(self.0.as_str(), |(c, _)| c)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for StreamId {
    type Error = InvalidStreamId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<StreamId> for String {
    fn from(s: StreamId) -> String {
        s.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_have_categories() {
        let name = ToolName::parse("weather").unwrap();
        assert_eq!(StreamId::tool(&name).as_str(), "tool-weather");
        assert_eq!(StreamId::tool(&name).category(), "tool");
        assert_eq!(StreamId::run(RunId::new()).category(), "run");
    }

    #[test]
    fn stream_id_rejects_spaces_and_empty() {
        assert!(StreamId::parse("").is_err());
        assert!(StreamId::parse("a b").is_err());
        assert!(StreamId::parse("x".repeat(201)).is_err());
    }

    #[test]
    fn keyed_event_ids_are_deterministic_uuids() {
        assert_eq!(EventId::for_key("a"), EventId::for_key("a"));
        assert_ne!(EventId::for_key("a"), EventId::for_key("b"));
        assert_eq!(EventId::for_key("a").as_uuid().get_version_num(), 8);
    }

    #[test]
    fn event_ids_are_time_ordered() {
        let a = EventId::new();
        let b = EventId::new();
        assert!(a < b);
        assert_eq!(a.as_uuid().get_version_num(), 7);
    }
}
