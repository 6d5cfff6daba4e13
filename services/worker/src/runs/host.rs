//! Host calls from a running tool: durable steps, answered from and recorded into the run stream.

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;
use kiln_proto::events::{RunRequested, RunStepCompleted};
use kiln_proto::{Actor, DomainEvent, EventMetadata, NewEvent, StreamId, StreamVersion};
use kiln_store::{EventStore, ExpectedVersion, Store, StoreError};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::RunEngine;
use crate::sandbox::HostCalls;

#[derive(Debug)]
pub(super) struct StepHost {
    pub engine: RunEngine,
    /// The run this attempt belongs to, as requested (parent of any child it starts).
    pub request: RunRequested,
    /// Who asked for the run: its children run on the same authority.
    pub requester: Actor,
    pub store: Store,
    pub stream: StreamId,
    pub attempt: u32,
    pub metadata: EventMetadata,
    /// Cancelled when an append is refused: this attempt lost the run, the tool must stop.
    pub fenced: CancellationToken,
    /// Held across the append so steps are recorded one at a time, in order.
    pub state: Mutex<StepState>,
}

#[derive(Debug)]
pub(super) struct StepState {
    /// The stream version this attempt last wrote or read: the expectation of its next append.
    pub version: StreamVersion,
    /// Step results recorded by this and earlier attempts.
    pub recorded: BTreeMap<String, Value>,
    /// Keys this attempt has used: a key used twice in one run is the tool's bug.
    pub used: HashSet<String>,
    /// `ctx.tools.call`s made by this attempt so far: the n-th is journaled as `tools.call#n`.
    pub calls: u32,
}

impl StepHost {
    /// Fails (and fences the attempt) if the run's stream has moved past what this attempt
    /// last wrote: it was cancelled, or another worker took it over.
    async fn check_still_holding(&self, known: StreamVersion) -> Result<(), String> {
        match self.store.stream_version(&self.stream).await {
            Ok(Some(current)) if current > known => {
                self.fenced.cancel();
                Err("this attempt no longer holds the run (cancelled, or taken over after its lease was lost); stopping"
                    .to_owned())
            }
            Ok(_) => Ok(()),
            Err(e) => Err(format!("could not check the run's state: {e}")),
        }
    }

    /// Records a step's result in the run stream, at the version this attempt last wrote.
    async fn record(&self, key: String, value: Value) -> Result<(), String> {
        let mut s = self.state.lock().await;
        if s.recorded.contains_key(&key) {
            return Err(format!("step {key:?} is already recorded"));
        }
        let event =
            DomainEvent::from(RunStepCompleted { attempt: self.attempt, key: key.clone(), result: value.clone() });
        let event = NewEvent::from_domain(&event, self.metadata.clone());
        match self.store.append(&self.stream, ExpectedVersion::Exact(s.version), vec![event]).await {
            Ok(r) => {
                s.version = r.stream_version;
                s.recorded.insert(key, value);
                Ok(())
            }
            Err(StoreError::WrongExpectedVersion { .. }) => {
                self.fenced.cancel();
                Err("this attempt no longer holds the run (its lease was lost); stopping".to_owned())
            }
            Err(e) => Err(format!("could not record step {key:?}: {e}")),
        }
    }
}

#[async_trait]
impl HostCalls for StepHost {
    async fn call(&self, method: &str, params: Value) -> Result<Value, String> {
        let key = || params.get("key").and_then(Value::as_str).map(str::to_owned).ok_or("a step needs a string key");
        match method {
            "step.lookup" => {
                let key = key()?;
                let mut s = self.state.lock().await;
                if !s.used.insert(key.clone()) {
                    return Err(format!("step key {key:?} is used twice in this run; step keys must be unique"));
                }
                if let Some(value) = s.recorded.get(&key) {
                    return Ok(json!({"found": true, "value": value}));
                }
                // About to run the step's side effects: make sure this attempt still holds the
                // run (a paused worker whose run moved on must not repeat them).
                self.check_still_holding(s.version).await?;
                Ok(json!({"found": false}))
            }
            "step.record" => {
                let key = key()?;
                let value = params.get("value").cloned().unwrap_or(Value::Null);
                self.record(key, value.clone()).await?;
                Ok(json!({"value": value}))
            }
            "tools.call" => {
                let name = params.get("name").and_then(Value::as_str).ok_or("ctx.tools.call needs a tool name")?;
                let args = params.get("args").cloned().unwrap_or_else(|| json!({}));
                let key = {
                    let mut s = self.state.lock().await;
                    s.calls += 1;
                    format!("tools.call#{}", s.calls)
                };
                let recorded = self.state.lock().await.recorded.get(&key).cloned();
                if let Some(id) = recorded.as_ref().and_then(|v| v.get("runId")).and_then(Value::as_str) {
                    // Journaled by an earlier attempt: wait for that same child.
                    let id = id.parse().map_err(|_| format!("journaled child run id {id:?} is invalid"))?;
                    return self.engine.wait_for(id).await;
                }
                let known = self.state.lock().await.version;
                self.check_still_holding(known).await?;
                let requester = self.requester.clone();
                let child = self.engine.request_child(&self.request, &key, name, args, requester).await?;
                self.record(key, json!({"runId": child.to_string(), "tool": name})).await?;
                self.engine.wait_for(child).await
            }
            other => Err(format!("unknown host call {other:?}")),
        }
    }
}
