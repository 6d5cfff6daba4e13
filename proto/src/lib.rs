//! Kiln's vocabulary: the event envelope, the domain events of tool and run streams, the tool
//! definition with its validation, and the job payloads workers pull from the queue.
//!
//! This crate does no IO. Everything that crosses a process or storage boundary is defined here
//! once, with its wire format (camelCase JSON, as MCP uses) and its validation, so the store,
//! the worker and the API cannot disagree about what an event or a tool is.

pub mod arguments;
pub mod audit;
pub mod envelope;
pub mod events;
pub mod ids;
pub mod job;
pub mod run;
pub mod tool;
pub mod tool_state;

pub use envelope::{Actor, EventMetadata, NewEvent, RecordedEvent, TraceParent};
pub use events::{DecodeError, DomainEvent};
pub use ids::{EventId, Position, RunId, StreamId, StreamVersion};
pub use tool::{ToolDefinition, ToolName, ValidationErrors};
