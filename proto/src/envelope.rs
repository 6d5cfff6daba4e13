//! The event envelope: what every event in the log carries besides its payload. The acting
//! identity and the W3C trace context travel inside every event, so audit and tracing never
//! depend on side channels.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::events::DomainEvent;
use crate::ids::{EventId, Position, StreamId, StreamVersion};

/// Who did it: `local` (the loopback user when auth is off), `system:<component>`,
/// `key:<api-key-name>` or `jwt:<sub>`. Free-form but bounded and printable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Actor(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid actor {0:?}: must be 1-256 characters with no control characters")]
pub struct InvalidActor(pub String);

impl Actor {
    pub fn parse(s: impl Into<String>) -> Result<Self, InvalidActor> {
        let s = s.into();
        let ok = !s.is_empty() && s.chars().count() <= 256 && !s.chars().any(char::is_control);
        if ok { Ok(Self(s)) } else { Err(InvalidActor(s)) }
    }

    /// A Kiln component acting on its own, e.g. `system:worker`.
    pub fn system(component: &str) -> Self {
        Self(format!("system:{component}"))
    }

    /// The local user of a loopback server without auth.
    pub fn local() -> Self {
        Self("local".to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Actor {
    type Error = InvalidActor;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<Actor> for String {
    fn from(a: Actor) -> String {
        a.0
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A W3C `traceparent` header value: `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TraceParent(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid traceparent {0:?}: expected 00-<32 hex>-<16 hex>-<2 hex> with non-zero ids")]
pub struct InvalidTraceParent(pub String);

impl TraceParent {
    pub fn parse(s: impl Into<String>) -> Result<Self, InvalidTraceParent> {
        let s = s.into();
        let parts: Vec<&str> = s.split('-').collect();
        let hex =
            |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let nonzero = |p: &str| p.bytes().any(|b| b != b'0');
        let ok = parts.len() == 4
            && hex(parts[0], 2)
            && parts[0] != "ff"
            && hex(parts[1], 32)
            && nonzero(parts[1])
            && hex(parts[2], 16)
            && nonzero(parts[2])
            && hex(parts[3], 2);
        if ok { Ok(Self(s)) } else { Err(InvalidTraceParent(s)) }
    }

    pub fn trace_id(&self) -> &str {
        &self.0[3..35]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TraceParent {
    type Error = InvalidTraceParent;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<TraceParent> for String {
    fn from(t: TraceParent) -> String {
        t.0
    }
}

/// Who caused an event and in which causal chain and trace it happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventMetadata {
    pub actor: Actor,
    /// Groups every event of one logical operation (e.g. a run and its children).
    pub correlation_id: Option<Uuid>,
    /// The event that directly caused this one.
    pub causation_id: Option<EventId>,
    pub traceparent: Option<TraceParent>,
}

impl EventMetadata {
    pub fn new(actor: Actor) -> Self {
        Self { actor, correlation_id: None, causation_id: None, traceparent: None }
    }
}

/// An event to append: everything but its place in the log, which the store assigns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewEvent {
    pub event_id: EventId,
    pub event_type: String,
    pub schema_version: u16,
    pub occurred_at: DateTime<Utc>,
    #[serde(flatten)]
    pub metadata: EventMetadata,
    pub payload: serde_json::Value,
}

impl NewEvent {
    /// Wraps a domain event with a fresh id and the current time.
    pub fn from_domain(event: &DomainEvent, metadata: EventMetadata) -> Self {
        Self {
            event_id: EventId::new(),
            event_type: event.event_type().to_owned(),
            schema_version: event.schema_version(),
            occurred_at: now_micros(),
            metadata,
            payload: event.to_payload(),
        }
    }
}

/// An event as stored: the appended event plus its stream version and global position.
///
/// The payload stays raw JSON text until someone asks for it: replaying the log only scans it,
/// and decoding goes straight from the text into the typed event.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedEvent {
    pub position: Position,
    pub stream_id: StreamId,
    pub stream_version: StreamVersion,
    pub event_id: EventId,
    pub event_type: String,
    pub schema_version: u16,
    pub occurred_at: DateTime<Utc>,
    #[serde(flatten)]
    pub metadata: EventMetadata,
    pub payload: Box<RawValue>,
}

impl PartialEq for RecordedEvent {
    fn eq(&self, other: &Self) -> bool {
        self.position == other.position
            && self.stream_id == other.stream_id
            && self.stream_version == other.stream_version
            && self.event_id == other.event_id
            && self.event_type == other.event_type
            && self.schema_version == other.schema_version
            && self.occurred_at == other.occurred_at
            && self.metadata == other.metadata
            && self.payload.get() == other.payload.get()
    }
}

impl RecordedEvent {
    /// The payload parsed into a generic JSON value.
    pub fn payload_value(&self) -> serde_json::Value {
        serde_json::from_str(self.payload.get()).unwrap_or(serde_json::Value::Null)
    }

    /// Decodes the payload into its domain event; an unknown type or a malformed payload is an
    /// error naming this event's position.
    pub fn decode(&self) -> Result<DomainEvent, crate::events::DecodeError> {
        DomainEvent::decode(&self.event_type, self.schema_version, self.payload.get()).map_err(|e| e.at(self.position))
    }
}

/// The current time truncated to microseconds: what both backends store exactly, so an event
/// reads back equal to what was appended.
pub fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_accepts_w3c_example() {
        let t = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn traceparent_rejects_malformed_and_zero_ids() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceParent::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn actor_is_bounded_and_printable() {
        assert!(Actor::parse("key:ci-bot").is_ok());
        assert!(Actor::parse("").is_err());
        assert!(Actor::parse("a\nb").is_err());
        assert!(Actor::parse("x".repeat(257)).is_err());
    }
}
