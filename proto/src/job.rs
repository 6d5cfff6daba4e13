//! Job payloads: what the queue carries to workers. A job only points at a run; the run's stream
//! is the source of truth, so a duplicated or stale job can never invent work.

use serde::{Deserialize, Serialize};

use crate::envelope::TraceParent;
use crate::ids::RunId;

/// Execute (or resume) the run `run_id`. Workers read the run stream to find out what is left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunJob {
    pub run_id: RunId,
    /// The attempt this job is for; a job for an attempt that already ended is dropped.
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<TraceParent>,
}
