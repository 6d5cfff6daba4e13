//! Runs: requesting an invocation of a tool, and executing one attempt of it.
//!
//! The run's stream is the truth. A request appends `run.requested` (exact tool version,
//! validated arguments, idempotency key); executing folds the stream to find what is left,
//! appends `run.attempt_started` at the version it read (so two workers cannot both start the
//! same attempt), answers the tool's durable steps from the recorded ones and records new ones,
//! and appends the outcome with the retry decision, again at the version it last wrote. A worker
//! whose view is stale (its lease was lost and someone else moved on) is fenced out by the
//! store's expected-version check and records nothing. Queueing (who executes when) is not
//! decided here.

mod cancel;
mod children;
mod execute;
mod host;
mod request;
mod watch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_proto::arguments::ArgumentValidator;
use kiln_proto::run::RunState;
use kiln_proto::tool_state::ToolState;
use kiln_proto::{RecordedEvent, RunId, StreamId, StreamVersion, ToolName};
use kiln_store::{EventStore, Store};
use tokio_util::sync::CancellationToken;

pub use cancel::Cancelled;
pub use execute::{AttemptOutcome, ExecuteError, INLINE_RETRY_MAX};
pub use request::{RequestError, Requested, RunRequest};
pub use watch::{RunUpdate, RunView, RunWatch};

use crate::sandbox::Sandbox;

/// Requests and executes runs against one store and one sandbox.
#[derive(Debug, Clone)]
pub struct RunEngine {
    store: Store,
    sandbox: Arc<dyn Sandbox>,
    /// Names this worker in `run.attempt_started` (and so in leases).
    worker_id: String,
    /// Added to a tool's timeout to make an attempt's lease: an attempt cannot outlive its
    /// timeout, so a lease that long needs no renewal to stay truthful.
    lease_margin: Duration,
    /// Compiled input schemas by tool version.
    validators: Arc<Mutex<Validators>>,
    /// Tools as last folded, with the stream version they were folded at.
    tools: Arc<Mutex<HashMap<ToolName, Arc<ToolState>>>>,
    /// Runs executing in this process, to stop at once when cancelled.
    inflight: Arc<Mutex<HashMap<RunId, CancellationToken>>>,
    /// How deep child runs may nest (a run calling a tool that calls a tool...). Child
    /// invocations may exceed the sandbox pool's limits (their parents hold processes while they
    /// wait), so this also bounds how far a chain can exceed them.
    max_depth: usize,
    /// How long a worker may go without a heartbeat before its attempts count as lost (its
    /// workers' liveness, as the queue records it). None: only an attempt's lease expiry does.
    heartbeat_timeout: Option<Duration>,
    /// Ended runs, for watchers (started on first use).
    endings: watch::Endings,
    /// This process's worker, to hand requested runs to directly when it has a slot free.
    local: Option<crate::queue::LocalWorker>,
}

type Validators = HashMap<(ToolName, u32), Arc<ArgumentValidator>>;

impl RunEngine {
    pub fn new(store: Store, sandbox: Arc<dyn Sandbox>, worker_id: impl Into<String>) -> Self {
        Self {
            store,
            sandbox,
            worker_id: worker_id.into(),
            lease_margin: Duration::from_secs(30),
            validators: Arc::default(),
            tools: Arc::default(),
            inflight: Arc::default(),
            max_depth: 3,
            heartbeat_timeout: None,
            endings: watch::Endings::default(),
            local: None,
        }
    }

    /// Hands runs this engine requests to `local`'s worker directly when it has a slot free
    /// (see [`LocalWorker`](crate::queue::LocalWorker)), instead of queueing them for a claim.
    pub fn with_local_worker(mut self, local: crate::queue::LocalWorker) -> Self {
        self.local = Some(local);
        self
    }

    /// Treats an attempt as lost once its worker has sent no heartbeat for `timeout`, instead
    /// of waiting for the attempt's lease to expire. For engines whose workers heartbeat.
    pub fn with_heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout = Some(timeout);
        self
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Sets how deep child runs may nest (default 3).
    pub fn with_max_depth(mut self, depth: usize) -> Self {
        self.max_depth = depth.max(1);
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The tool as its stream says it is now.
    pub async fn tool_state(&self, name: &ToolName) -> Result<Option<ToolState>, ExecuteError> {
        let events = read_stream(&self.store, &StreamId::tool(name)).await?;
        Ok(ToolState::fold(&events)?)
    }

    /// The tool as its stream says it is now, folded again only when the stream has moved.
    async fn current_tool(&self, name: &ToolName) -> Result<Option<Arc<ToolState>>, ExecuteError> {
        let Some(version) = self.store.stream_version(&StreamId::tool(name)).await? else { return Ok(None) };
        if let Some(cached) = self.cached_tool(name).filter(|t| t.stream_version == version) {
            return Ok(Some(cached));
        }
        self.refresh_tool(name).await
    }

    /// A tool with `version` published: versions never change, so any cached fold that has it
    /// will do.
    async fn tool_with_version(&self, name: &ToolName, version: u32) -> Result<Option<Arc<ToolState>>, ExecuteError> {
        if let Some(cached) = self.cached_tool(name).filter(|t| t.versions.contains_key(&version)) {
            return Ok(Some(cached));
        }
        self.refresh_tool(name).await
    }

    fn cached_tool(&self, name: &ToolName) -> Option<Arc<ToolState>> {
        self.tools.lock().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    async fn refresh_tool(&self, name: &ToolName) -> Result<Option<Arc<ToolState>>, ExecuteError> {
        let Some(state) = self.tool_state(name).await?.map(Arc::new) else { return Ok(None) };
        let mut tools = self.tools.lock().unwrap_or_else(|e| e.into_inner());
        let newer = tools.get(name).is_none_or(|t| t.stream_version < state.stream_version);
        if newer {
            tools.insert(name.clone(), state.clone());
        }
        Ok(Some(state))
    }

    fn validator(&self, state: &ToolState, version: u32) -> Result<Arc<ArgumentValidator>, ExecuteError> {
        let key = (state.name.clone(), version);
        let mut cache = self.validators.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = cache.get(&key) {
            return Ok(v.clone());
        }
        let definition = &state.versions.get(&version).ok_or(ExecuteError::UnknownVersion(version))?.definition;
        let v = Arc::new(ArgumentValidator::new(definition).map_err(ExecuteError::Schema)?);
        cache.insert(key, v.clone());
        Ok(v)
    }
}

impl RunEngine {
    /// A run's events and the state they fold to.
    async fn load_run(&self, run_id: RunId) -> Result<(Vec<RecordedEvent>, RunState), ExecuteError> {
        let events = read_stream(&self.store, &StreamId::run(run_id)).await?;
        let state = fold_run(&events)?.ok_or(ExecuteError::UnknownRun(run_id))?;
        Ok((events, state))
    }
}

/// The state a run's events fold to; None for no events.
fn fold_run(events: &[RecordedEvent]) -> Result<Option<RunState>, ExecuteError> {
    let decoded = events.iter().map(|e| e.decode().map(|d| (e.stream_version, d))).collect::<Result<Vec<_>, _>>()?;
    Ok(RunState::fold(decoded.iter().map(|(v, d)| (*v, d)))?)
}

const PAGE: usize = 1_000;

/// Every event of a stream (streams of tools and runs are short).
async fn read_stream(
    store: &Store,
    stream: &StreamId,
) -> Result<Vec<kiln_proto::RecordedEvent>, kiln_store::StoreError> {
    let mut out = Vec::new();
    loop {
        let after = out.last().map_or(StreamVersion(0), |e: &RecordedEvent| e.stream_version);
        let page = store.read_stream(stream, after, PAGE).await?;
        let last = page.len() < PAGE;
        out.extend(page);
        if last {
            return Ok(out);
        }
    }
}
