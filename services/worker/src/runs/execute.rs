//! Executing one attempt of a run.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use kiln_proto::envelope::now_micros;
use kiln_proto::events::{
    ErrorKind, LogEntry, RetryDecision, RunAttemptFailed, RunAttemptStarted, RunError, RunFailed, RunLogs,
    RunSucceeded, RunTimedOut,
};
use kiln_proto::job::RunJob;
use kiln_proto::run::{InvalidRunStream, RunStatus};
use kiln_proto::{Actor, DecodeError, DomainEvent, EventMetadata, NewEvent, RecordedEvent, RunId, StreamId};
use kiln_store::{EventStore, ExpectedVersion, QueueOp, StoreError};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::RunEngine;
use super::host::{StepHost, StepState};
use crate::sandbox::{Invocation, SandboxError, SandboxEvent, ToolVersion};

/// How executing a run went, from the queue's point of view.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptOutcome {
    /// The run has ended (now, or before this worker looked).
    Finished(RunStatus),
    /// The next attempt may start at this time.
    RetryAt(DateTime<Utc>),
    /// Another worker holds the run until then.
    Leased { until: DateTime<Utc> },
    /// Someone else wrote to the run meanwhile; this worker recorded nothing more.
    Fenced,
    /// The worker was asked to stop; the attempt was left for its lease to expire.
    Abandoned,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecuteError {
    #[error("no run {0}")]
    UnknownRun(RunId),
    #[error("the run's tool has no version {0}")]
    UnknownVersion(u32),
    #[error("input schema does not compile: {0}")]
    Schema(String),
    #[error("corrupt log: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    InvalidStream(#[from] InvalidRunStream),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RunEngine {
    /// Executes the next attempt of `run_id`, if there is one to make now.
    pub async fn execute(&self, run_id: RunId, stop: CancellationToken) -> Result<AttemptOutcome, ExecuteError> {
        self.execute_from(run_id, None, stop).await
    }

    /// [`execute`](Self::execute), starting from `known`, the run's stream as the caller has it
    /// (the request it just appended), instead of reading it. A stale `known` only costs the
    /// attempt: its first append is refused and the outcome is `Fenced`.
    pub async fn execute_from(
        &self,
        run_id: RunId,
        known: Option<Vec<RecordedEvent>>,
        stop: CancellationToken,
    ) -> Result<AttemptOutcome, ExecuteError> {
        let stream = StreamId::run(run_id);
        let (events, state) = match known {
            Some(events) => {
                let state = super::fold_run(&events)?.ok_or(ExecuteError::UnknownRun(run_id))?;
                (events, state)
            }
            None => self.load_run(run_id).await?,
        };
        let first = events.first().ok_or(ExecuteError::UnknownRun(run_id))?;
        let metadata = EventMetadata {
            actor: Actor::system("worker"),
            correlation_id: first.metadata.correlation_id,
            causation_id: Some(first.event_id),
            traceparent: first.metadata.traceparent.clone(),
        };
        let tool = self
            .tool_with_version(&state.request.tool, state.request.tool_version)
            .await?
            .ok_or(ExecuteError::UnknownVersion(state.request.tool_version))?;
        let definition = &tool
            .versions
            .get(&state.request.tool_version)
            .ok_or(ExecuteError::UnknownVersion(state.request.tool_version))?
            .definition;
        let record = Recorder {
            engine: self,
            stream: &stream,
            metadata: &metadata,
            run_id,
            queued: state.request.parent_run.is_none(),
        };

        let mut version = state.version;
        let now = now_micros();
        match &state.status {
            s if s.is_terminal() => return Ok(AttemptOutcome::Finished(s.clone())),
            RunStatus::Running { lease_expires_at, worker_id, .. }
                if *lease_expires_at > now && self.holder_alive(run_id, worker_id).await? =>
            {
                return Ok(AttemptOutcome::Leased { until: *lease_expires_at });
            }
            RunStatus::Running { attempt, worker_id, .. } => {
                // The holder died or stalled past its lease: its attempt failed.
                let error = RunError {
                    kind: ErrorKind::SandboxCrash,
                    message: format!("worker {worker_id} lost its lease on attempt {attempt}"),
                    name: None,
                    stack: None,
                    non_retryable: false,
                };
                match record.failure(version, *attempt, error, definition.retry, vec![]).await? {
                    Recorded::Written(v, None) => version = v,
                    Recorded::Written(_, Some(outcome)) => return Ok(outcome),
                    Recorded::Fenced => return Ok(AttemptOutcome::Fenced),
                }
            }
            RunStatus::RetryScheduled { next_attempt_at, .. } if *next_attempt_at > now => {
                return Ok(AttemptOutcome::RetryAt(*next_attempt_at));
            }
            _ => {}
        }

        let attempt = state.attempts + 1;
        let lease = chrono::Duration::from_std(
            std::time::Duration::from_millis(definition.limits.timeout_ms) + self.lease_margin,
        )
        .unwrap_or_default();
        let started = DomainEvent::from(RunAttemptStarted {
            attempt,
            worker_id: self.worker_id.clone(),
            lease_expires_at: now_micros() + lease,
        });
        match record.append(version, vec![started]).await? {
            Some(v) => version = v,
            None => return Ok(AttemptOutcome::Fenced),
        }

        let host = Arc::new(StepHost {
            engine: self.clone(),
            request: state.request.clone(),
            requester: first.metadata.actor.clone(),
            store: self.store.clone(),
            stream: stream.clone(),
            attempt,
            metadata: metadata.clone(),
            fenced: CancellationToken::new(),
            state: tokio::sync::Mutex::new(StepState {
                version,
                recorded: self.reused_steps(&state).await?,
                used: HashSet::new(),
                calls: 0,
            }),
        });
        let mut invocation = Invocation::new(
            Arc::new(ToolVersion::new(definition, state.request.tool_version)),
            state.request.arguments.clone(),
        );
        invocation.run_id = run_id;
        invocation.attempt = attempt;
        // A child's parent holds its process while it waits: the child must not queue behind it.
        invocation.nested = state.request.parent_run.is_some();
        invocation.host = Some(host.clone());
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        invocation.events = Some(events_tx);
        let invoked = CancellationToken::new();
        let logs = tokio::spawn(collect_logs(self.store.clone(), run_id, attempt, events_rx, invoked.clone()));
        let cancel = invocation.cancel.clone();
        let cancelled_here = CancellationToken::new();
        self.inflight.lock().unwrap_or_else(|e| e.into_inner()).insert(run_id, cancelled_here.clone());
        let (fenced, stopping) = (host.fenced.clone(), stop.clone());
        let moved_on = stream_moved_on(host.clone());
        let watcher = tokio::spawn(async move {
            tokio::select! {
                _ = fenced.cancelled() => cancel.cancel(),
                _ = stopping.cancelled() => cancel.cancel(),
                _ = cancelled_here.cancelled() => cancel.cancel(),
                // Cancelled or taken over by another process: stop now rather than at the end.
                () = moved_on => cancel.cancel(),
            }
        });
        let result = self.sandbox.invoke(invocation).await;
        invoked.cancel();
        watcher.abort();
        self.inflight.lock().unwrap_or_else(|e| e.into_inner()).remove(&run_id);
        let logs = logs.await.unwrap_or(None);
        if host.fenced.is_cancelled() {
            return Ok(AttemptOutcome::Fenced);
        }
        let version = host.state.lock().await.version;
        let with_logs = |event: DomainEvent| logs.clone().map(DomainEvent::from).into_iter().chain([event]).collect();
        match result {
            Ok(out) => {
                let output = match out.value {
                    Value::Object(map) => Value::Object(map),
                    other => json!({ "result": other }),
                };
                let done = DomainEvent::from(RunSucceeded { attempt, output });
                Ok(match record.append(version, with_logs(done)).await? {
                    Some(_) => AttemptOutcome::Finished(RunStatus::Succeeded),
                    None => AttemptOutcome::Fenced,
                })
            }
            Err(SandboxError::Cancelled) if stop.is_cancelled() => {
                // Handed back: the attempt is recorded as cut short and the run goes straight
                // back to the queue for another worker.
                let error = RunError {
                    kind: ErrorKind::SandboxCrash,
                    message: format!("worker {} shut down during attempt {attempt}", self.worker_id),
                    name: None,
                    stack: None,
                    non_retryable: false,
                };
                let failed = RunAttemptFailed {
                    attempt,
                    error,
                    retry: RetryDecision::Retry { delay_ms: 0, next_attempt_at: now_micros() },
                };
                let job = RunJob { run_id, attempt: attempt + 1, traceparent: metadata.traceparent.clone() };
                let queue = if state.request.parent_run.is_none() { vec![QueueOp::push(job)] } else { vec![] };
                record.append_queued(version, with_logs(failed.into()), &queue).await?;
                Ok(AttemptOutcome::Abandoned)
            }
            Err(e) => {
                let mut error = e.to_run_error();
                error.non_retryable |= error.name.as_deref() == Some("NonRetryableError");
                let logs = logs.map(DomainEvent::from).into_iter().collect();
                Ok(match record.failure(version, attempt, error, definition.retry, logs).await? {
                    Recorded::Written(_, Some(outcome)) => outcome,
                    Recorded::Written(_, None) => AttemptOutcome::RetryAt(now_micros()),
                    Recorded::Fenced => AttemptOutcome::Fenced,
                })
            }
        }
    }
}

enum Recorded {
    /// Appended; the new stream version, and the outcome if the run ended or must wait.
    Written(kiln_proto::StreamVersion, Option<AttemptOutcome>),
    Fenced,
}

/// Appends to one run's stream at an expected version.
struct Recorder<'a> {
    engine: &'a RunEngine,
    stream: &'a StreamId,
    metadata: &'a EventMetadata,
    run_id: RunId,
    /// The run has a queue job (a child run is driven by its parent instead).
    queued: bool,
}

/// Retries due within this long are waited for by the worker that ran the failed attempt;
/// later ones are queued with their due time.
pub const INLINE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);

impl Recorder<'_> {
    /// Appends at `version`; `None` if the stream moved on (fenced). An event that ends the run
    /// removes its job from the queue in the same commit.
    async fn append(
        &self,
        version: kiln_proto::StreamVersion,
        events: Vec<DomainEvent>,
    ) -> Result<Option<kiln_proto::StreamVersion>, ExecuteError> {
        let queue =
            if events.iter().any(DomainEvent::is_run_terminal) { vec![QueueOp::Remove(self.run_id)] } else { vec![] };
        self.append_queued(version, events, &queue).await
    }

    async fn append_queued(
        &self,
        version: kiln_proto::StreamVersion,
        events: Vec<DomainEvent>,
        queue: &[QueueOp],
    ) -> Result<Option<kiln_proto::StreamVersion>, ExecuteError> {
        let events = events.iter().map(|e| NewEvent::from_domain(e, self.metadata.clone())).collect();
        match self.engine.store.append_queued(self.stream, ExpectedVersion::Exact(version), events, queue).await {
            Ok(r) => Ok(Some(r.stream_version)),
            Err(StoreError::WrongExpectedVersion { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Records a failed attempt with the retry decision, and the run's end if it gives up.
    async fn failure(
        &self,
        version: kiln_proto::StreamVersion,
        attempt: u32,
        error: RunError,
        policy: kiln_proto::tool::RetryPolicy,
        mut events: Vec<DomainEvent>,
    ) -> Result<Recorded, ExecuteError> {
        let now = now_micros();
        let decision = policy.decide(attempt, &error, now, jitter(self.run_id, attempt));
        events.push(RunAttemptFailed { attempt, error: error.clone(), retry: decision.clone() }.into());
        let outcome = match &decision {
            RetryDecision::Retry { next_attempt_at, .. } if *next_attempt_at > now => {
                Some(AttemptOutcome::RetryAt(*next_attempt_at))
            }
            RetryDecision::Retry { .. } => None,
            RetryDecision::GiveUp { .. } if error.kind == ErrorKind::Timeout => {
                events.push(RunTimedOut { attempts: attempt, timeout_ms: 0 }.into());
                Some(AttemptOutcome::Finished(RunStatus::TimedOut))
            }
            RetryDecision::GiveUp { .. } => {
                events.push(RunFailed { attempts: attempt, error }.into());
                Some(AttemptOutcome::Finished(RunStatus::Failed))
            }
        };
        // A retry far enough ahead goes back to the queue, due then, instead of holding a
        // worker slot while it waits.
        let mut queue = vec![];
        if let RetryDecision::Retry { next_attempt_at, .. } = &decision
            && *next_attempt_at - now > chrono::Duration::from_std(INLINE_RETRY_MAX).unwrap_or_default()
            && self.queued
        {
            let job =
                RunJob { run_id: self.run_id, attempt: attempt + 1, traceparent: self.metadata.traceparent.clone() };
            queue.push(QueueOp::Push { job, not_before: Some(*next_attempt_at) });
        }
        if matches!(decision, RetryDecision::GiveUp { .. }) {
            queue.push(QueueOp::Remove(self.run_id));
        }
        Ok(match self.append_queued(version, events, &queue).await? {
            Some(v) => Recorded::Written(v, outcome),
            None => Recorded::Fenced,
        })
    }
}

/// A uniform number in [0, 1) fixed by run and attempt: jitter that differs between runs yet
/// replays identically.
fn jitter(run_id: RunId, attempt: u32) -> f64 {
    let bits = run_id.as_uuid().as_u128() ^ (u128::from(attempt) * 0x9E37_79B9_7F4A_7C15);
    let mixed = (bits as u64) ^ ((bits >> 64) as u64);
    (mixed.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
}

impl RunEngine {
    /// Whether the worker holding a running attempt still heartbeats (always, for engines that
    /// do not track heartbeats: then only the lease decides).
    async fn holder_alive(&self, run_id: RunId, holder: &str) -> Result<bool, ExecuteError> {
        let Some(timeout) = self.heartbeat_timeout else { return Ok(true) };
        if holder == self.worker_id {
            return Ok(self.inflight.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&run_id));
        }
        let seen = self.store.worker_last_seen(holder).await?;
        let timeout = chrono::Duration::from_std(timeout).unwrap_or_default();
        Ok(seen.is_some_and(|seen| now_micros() - seen < timeout))
    }

    /// The step results an attempt starts from: the run's own, and for a replay that reuses
    /// steps, the original run's for keys this run has not recorded.
    async fn reused_steps(
        &self,
        state: &kiln_proto::run::RunState,
    ) -> Result<std::collections::BTreeMap<String, Value>, ExecuteError> {
        let mut steps = state.steps.clone();
        if let Some(original) = state.request.reuse_steps_from {
            let (_, original) = self.load_run(original).await?;
            for (key, value) in original.steps {
                steps.entry(key).or_insert(value);
            }
        }
        Ok(steps)
    }
}

/// Resolves once the run's stream has an event this attempt did not write (a cancellation,
/// or another worker's takeover), checked whenever the log's head moves.
async fn stream_moved_on(host: Arc<StepHost>) {
    let mut head = host.store.head_watch();
    // At most a few checks a second per running attempt, however busy the log is; none for
    // attempts over within that (a cancel from this process stops them at once, see `inflight`).
    const EVERY: std::time::Duration = std::time::Duration::from_millis(50);
    tokio::time::sleep(EVERY).await;
    loop {
        if head.changed().await.is_err() {
            return std::future::pending().await;
        }
        let known = host.state.lock().await.version;
        if let Ok(Some(current)) = host.store.stream_version(&host.stream).await
            && current > known
        {
            // Re-check under the lock: an append of this attempt may have been in flight.
            let known = host.state.lock().await.version;
            if let Ok(Some(current)) = host.store.stream_version(&host.stream).await
                && current > known
            {
                return;
            }
        }
        tokio::time::sleep(EVERY).await;
    }
}

/// Gathers an attempt's logs for its `run.logs` event and forwards logs and progress to live
/// watchers as they happen.
async fn collect_logs(
    store: kiln_store::Store,
    run_id: RunId,
    attempt: u32,
    mut events: tokio::sync::mpsc::UnboundedReceiver<SandboxEvent>,
    invoked: CancellationToken,
) -> Option<RunLogs> {
    let mut logs = RunLogs { attempt, entries: vec![], truncated: false };
    loop {
        // Once the invocation has returned, take what it sent and stop: the sandbox may hold
        // the sender a while longer (a process being stopped after a cancel).
        let event = tokio::select! {
            biased;
            event = events.recv() => event,
            _ = invoked.cancelled() => events.try_recv().ok(),
        };
        let Some(event) = event else { break };
        let live = match &event {
            SandboxEvent::Log { level, message } => {
                let level = serde_json::to_value(level).ok().and_then(|v| v.as_str().map(str::to_owned));
                let level = level.unwrap_or_else(|| "info".to_owned());
                logs.entries.push(LogEntry { level: level.clone(), message: message.clone(), at: now_micros() });
                json!({"type": "log", "attempt": attempt, "level": level, "message": message})
            }
            SandboxEvent::Progress { done, total, message } => {
                json!({"type": "progress", "attempt": attempt, "progress": done, "total": total, "message": message})
            }
            SandboxEvent::LogsTruncated { .. } => {
                logs.truncated = true;
                continue;
            }
        };
        store.publish_run_feed(run_id, live.to_string()).await;
    }
    (!logs.entries.is_empty() || logs.truncated).then_some(logs)
}
