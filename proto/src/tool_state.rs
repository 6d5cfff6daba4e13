//! A tool's state folded from its stream: which versions exist, which is current, whether it is
//! enabled, and at which stream version the next change must land. Creating, updating and
//! enabling tools, and resolving the version a run uses, read this fold (the log is the truth;
//! the catalog projection may lag).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::envelope::{Actor, RecordedEvent};
use crate::events::{DecodeError, DomainEvent};
use crate::ids::StreamVersion;
use crate::tool::{ToolDefinition, ToolName};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    Enabled,
    Disabled,
    Deleted,
}

/// One published version, as history shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    pub version: u32,
    pub code_sha256: String,
    pub actor: Actor,
    pub published_at: DateTime<Utc>,
    #[serde(skip)]
    pub definition: ToolDefinition,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolState {
    pub name: ToolName,
    pub lifecycle: Lifecycle,
    /// Every version ever published, by number (deletion keeps them).
    pub versions: BTreeMap<u32, VersionInfo>,
    /// The stream's version after the last event: the expected version of the next change.
    pub stream_version: StreamVersion,
}

impl ToolState {
    /// Folds a tool's events, in stream order. `None` for an empty stream.
    pub fn fold(events: &[RecordedEvent]) -> Result<Option<ToolState>, DecodeError> {
        let mut state: Option<ToolState> = None;
        for e in events {
            let decoded = e.decode()?;
            let s = match (&mut state, decoded) {
                (_, DomainEvent::ToolCreated(c)) => {
                    let versions = state.take().map(|s| s.versions).unwrap_or_default();
                    state.insert(ToolState {
                        name: c.name,
                        lifecycle: Lifecycle::Enabled,
                        versions,
                        stream_version: e.stream_version,
                    })
                }
                (Some(s), DomainEvent::ToolVersionPublished(v)) => {
                    s.versions.insert(
                        v.version,
                        VersionInfo {
                            version: v.version,
                            code_sha256: v.code_sha256,
                            actor: e.metadata.actor.clone(),
                            published_at: e.occurred_at,
                            definition: v.definition,
                        },
                    );
                    s
                }
                (Some(s), DomainEvent::ToolEnabled(_)) => {
                    s.lifecycle = Lifecycle::Enabled;
                    s
                }
                (Some(s), DomainEvent::ToolDisabled(_)) => {
                    s.lifecycle = Lifecycle::Disabled;
                    s
                }
                (Some(s), DomainEvent::ToolDeleted(_)) => {
                    s.lifecycle = Lifecycle::Deleted;
                    s
                }
                // Events of other kinds, or before creation, say nothing about the tool.
                _ => continue,
            };
            s.stream_version = e.stream_version;
        }
        Ok(state)
    }

    /// The newest version.
    pub fn current(&self) -> Option<&VersionInfo> {
        self.versions.values().next_back()
    }

    /// The number the next published version gets (numbers continue across delete and re-create).
    pub fn next_version(&self) -> u32 {
        self.versions.keys().next_back().map_or(1, |v| v + 1)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::envelope::{EventMetadata, NewEvent};
    use crate::events::{ToolCreated, ToolDeleted, ToolDisabled, ToolVersionPublished};
    use crate::ids::{Position, StreamId};

    fn recorded(events: Vec<DomainEvent>) -> Vec<RecordedEvent> {
        events
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                let n = NewEvent::from_domain(&d, EventMetadata::new(Actor::local()));
                RecordedEvent {
                    position: Position(i as u64 + 1),
                    stream_id: StreamId::parse("tool-t").unwrap(),
                    stream_version: StreamVersion(i as u64 + 1),
                    event_id: n.event_id,
                    event_type: n.event_type,
                    schema_version: n.schema_version,
                    occurred_at: n.occurred_at,
                    metadata: n.metadata,
                    payload: serde_json::value::RawValue::from_string(n.payload.to_string()).unwrap(),
                }
            })
            .collect()
    }

    fn published(version: u32, code: &str) -> DomainEvent {
        let d = ToolDefinition::parse(&json!({"name": "t", "description": "d", "code": code})).unwrap().definition;
        ToolVersionPublished { name: d.name.clone(), version, code_sha256: d.code_sha256(), definition: d }.into()
    }

    #[test]
    fn versions_and_lifecycle_follow_the_stream() {
        let name = ToolName::parse("t").unwrap();
        let events = recorded(vec![
            ToolCreated { name: name.clone() }.into(),
            published(1, "return 1"),
            published(2, "return 2"),
            ToolDisabled { name: name.clone(), reason: None }.into(),
        ]);
        let s = ToolState::fold(&events).unwrap().unwrap();
        assert_eq!(s.lifecycle, Lifecycle::Disabled);
        assert_eq!(s.current().unwrap().version, 2);
        assert_eq!(s.current().unwrap().definition.code, "return 2");
        assert_eq!(s.next_version(), 3);
        assert_eq!(s.stream_version, StreamVersion(4));
        assert!(ToolState::fold(&[]).unwrap().is_none());
    }

    #[test]
    fn a_deleted_tool_can_be_created_again_keeping_its_history() {
        let name = ToolName::parse("t").unwrap();
        let events = recorded(vec![
            ToolCreated { name: name.clone() }.into(),
            published(1, "return 1"),
            ToolDeleted { name: name.clone() }.into(),
            ToolCreated { name: name.clone() }.into(),
            published(2, "return 'again'"),
        ]);
        let s = ToolState::fold(&events).unwrap().unwrap();
        assert_eq!(s.lifecycle, Lifecycle::Enabled);
        assert_eq!(s.versions.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    }
}
