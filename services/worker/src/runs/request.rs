//! Requesting a run: resolve the tool version, validate the arguments, append `run.requested`.

use kiln_proto::arguments::InvalidArguments;
use kiln_proto::events::RunRequested;
use kiln_proto::job::RunJob;
use kiln_proto::tool_state::Lifecycle;
use kiln_proto::{
    Actor, DomainEvent, EventId, EventMetadata, NewEvent, RecordedEvent, RunId, StreamId, ToolName, TraceParent,
};
use kiln_store::{ExpectedVersion, QueueOp, StoreError};
use serde_json::Value;

use super::{ExecuteError, RunEngine, read_stream};

/// What a caller asks for.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub tool: ToolName,
    /// Default: the tool's current version.
    pub version: Option<u32>,
    pub arguments: Value,
    /// Scoped to the actor: the same actor and key always mean the same run.
    pub idempotency_key: Option<String>,
    pub parent_run: Option<RunId>,
    pub replay_of: Option<RunId>,
    /// With `replay_of`: answer durable steps from the original run's recorded results.
    pub reuse_steps: bool,
    pub actor: Actor,
    pub traceparent: Option<TraceParent>,
}

/// The run a request resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requested {
    pub run_id: RunId,
    pub tool_version: u32,
    /// The idempotency key named a run requested before: nothing new was recorded.
    pub existing: bool,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    #[error("unknown tool \"{0}\"")]
    UnknownTool(ToolName),
    #[error("tool \"{0}\" is disabled; enable it to run it")]
    Disabled(ToolName),
    #[error("tool \"{0}\" is deleted")]
    Deleted(ToolName),
    #[error("tool \"{tool}\" has no version {version} (latest is {latest})")]
    UnknownVersion { tool: ToolName, version: u32, latest: u32 },
    #[error(transparent)]
    InvalidArguments(#[from] InvalidArguments),
    #[error("idempotency key {key:?} was used for run {run_id} with another tool or other arguments")]
    KeyReused { key: String, run_id: RunId },
    #[error(transparent)]
    Engine(#[from] ExecuteError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RunEngine {
    /// Records a new run, or finds the one this actor's idempotency key already names.
    pub async fn request(&self, req: RunRequest) -> Result<Requested, RequestError> {
        let state = self.current_tool(&req.tool).await?.ok_or_else(|| RequestError::UnknownTool(req.tool.clone()))?;
        match state.lifecycle {
            Lifecycle::Enabled => {}
            Lifecycle::Disabled => return Err(RequestError::Disabled(req.tool)),
            Lifecycle::Deleted => return Err(RequestError::Deleted(req.tool)),
        }
        let latest = state.current().map_or(0, |v| v.version);
        let version = req.version.unwrap_or(latest);
        if !state.versions.contains_key(&version) {
            return Err(RequestError::UnknownVersion { tool: req.tool, version, latest });
        }
        self.validator(&state, version)?.check(&req.arguments)?;

        let run_id = RunId::new();
        let requested = RunRequested {
            run_id,
            tool: req.tool.clone(),
            tool_version: version,
            arguments: req.arguments.clone(),
            idempotency_key: req.idempotency_key.clone(),
            parent_run: req.parent_run,
            replay_of: req.replay_of,
            reuse_steps_from: req.replay_of.filter(|_| req.reuse_steps),
        };
        let mut metadata = EventMetadata::new(req.actor.clone());
        metadata.correlation_id = Some(req.parent_run.map_or(run_id.as_uuid(), |p| p.as_uuid()));
        metadata.traceparent = req.traceparent.clone();
        let mut event = NewEvent::from_domain(&DomainEvent::from(requested), metadata);
        if let Some(key) = &req.idempotency_key {
            event.event_id = EventId::for_key(&format!("run.requested\0{}\0{key}", req.actor));
        }
        // A child run is driven by its parent's attempt, not the queue. Others go to this
        // process's worker directly if it has a slot free, else to the queue.
        let job = RunJob { run_id, attempt: 1, traceparent: req.traceparent.clone() };
        let local = req.parent_run.is_none().then(|| self.local.as_ref().and_then(|l| l.try_slot())).flatten();
        let queue = match (&local, req.parent_run) {
            (_, Some(_)) => vec![],
            (Some(slot), None) => vec![QueueOp::PushClaimed { job: job.clone(), worker: slot.worker().to_owned() }],
            (None, None) => vec![QueueOp::push(job.clone())],
        };
        let stream = StreamId::run(run_id);
        let sent = local.is_some().then(|| event.clone());
        match self.store.append_queued(&stream, ExpectedVersion::NoStream, vec![event], &queue).await {
            Ok(appended) => {
                if let (Some(slot), Some(event)) = (local, sent)
                    && appended.written
                {
                    slot.hand_off(job, recorded(event, stream, &appended));
                }
                Ok(Requested { run_id, tool_version: version, existing: !appended.written })
            }
            Err(StoreError::PartialDuplicate { stored_in, .. }) => self.existing_run(&req, &stored_in).await,
            Err(e) => Err(e.into()),
        }
    }

    /// The run an idempotency key already names, if it asked for the same thing.
    async fn existing_run(&self, req: &RunRequest, stream: &StreamId) -> Result<Requested, RequestError> {
        let key = req.idempotency_key.clone().unwrap_or_default();
        let events = read_stream(&self.store, stream).await?;
        let first = events.first().map(|e| e.decode()).transpose().map_err(ExecuteError::from)?;
        let Some(DomainEvent::RunRequested(r)) = first else {
            return Err(ExecuteError::Corrupt(format!("{stream} does not start with run.requested")).into());
        };
        let same =
            r.tool == req.tool && r.arguments == req.arguments && req.version.is_none_or(|v| v == r.tool_version);
        if !same {
            return Err(RequestError::KeyReused { key, run_id: r.run_id });
        }
        Ok(Requested { run_id: r.run_id, tool_version: r.tool_version, existing: true })
    }
}

/// A single appended event as the store recorded it.
fn recorded(event: NewEvent, stream: StreamId, appended: &kiln_store::AppendResult) -> RecordedEvent {
    let payload = serde_json::value::to_raw_value(&event.payload).expect("a JSON value serializes");
    RecordedEvent {
        position: appended.first_position,
        stream_id: stream,
        stream_version: appended.stream_version,
        event_id: event.event_id,
        event_type: event.event_type,
        schema_version: event.schema_version,
        occurred_at: event.occurred_at,
        metadata: event.metadata,
        payload,
    }
}
