//! Event builders for the store's tests; databases come from `kiln_store::testing`.

#![allow(dead_code, clippy::unwrap_used)]

use kiln_proto::events::{ToolCreated, ToolVersionPublished};
use kiln_proto::{Actor, DomainEvent, EventMetadata, NewEvent, ToolDefinition, ToolName};
use serde_json::json;

pub use kiln_store::testing::TestDb;

pub fn actor() -> Actor {
    Actor::parse("key:test").unwrap()
}

/// A generic event with a small payload.
pub fn event(kind: &str, n: u64) -> NewEvent {
    let e = DomainEvent::from(ToolCreated { name: ToolName::parse(format!("t{n}")).unwrap() });
    let mut e = NewEvent::from_domain(&e, EventMetadata::new(actor()));
    e.event_type = kind.to_owned();
    e.payload = json!({"n": n, "kind": kind});
    e
}

pub fn tool_definition(name: &str, code: &str) -> ToolDefinition {
    ToolDefinition::parse(&json!({"name": name, "description": format!("tool {name}"), "code": code}))
        .unwrap()
        .definition
}

pub fn domain(e: impl Into<DomainEvent>) -> NewEvent {
    NewEvent::from_domain(&e.into(), EventMetadata::new(actor()))
}

/// The events that create a tool with its first version.
pub fn create_tool(name: &str, code: &str) -> Vec<NewEvent> {
    let d = tool_definition(name, code);
    vec![
        domain(ToolCreated { name: d.name.clone() }),
        domain(ToolVersionPublished { name: d.name.clone(), version: 1, code_sha256: d.code_sha256(), definition: d }),
    ]
}
