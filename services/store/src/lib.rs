//! Kiln's storage: the append-only event log (`EventStore`) on SQLite and PostgreSQL, the
//! projection framework that derives read models from it, and the schema migrations of both.
//!
//! Both backends honour the same contract, proven by one test suite run against each:
//! appends are atomic and checked against an expected stream version; every event gets a
//! gapless global position in commit order, so a reader tailing the log never skips an event;
//! re-appending an event id that is already stored is a no-op; subscribers are woken without
//! polling. This crate knows events only as envelopes with JSON payloads; what they mean is
//! `kiln_proto`'s business, and projections decode them.

mod error;
mod event_store;
mod group;
pub mod limits;
pub mod migrate;
pub mod postgres;
pub mod projection;
pub mod projections;
pub mod queries;
pub mod queue;
mod replay;
pub mod sqlite;
mod store;
mod subscribe;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::{Result, StoreError};
pub use event_store::{AppendResult, EventStore, ExpectedVersion};
pub use queue::{QueueOp, QueuePool};
pub use replay::replay;
pub use store::{Backend, Store, StoreOptions};
pub use subscribe::EventStream;
