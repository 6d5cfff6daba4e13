//! Host calls from a running tool: durable steps, answered from and recorded into the run stream.

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;
use kiln_proto::events::RunStepCompleted;
use kiln_proto::{DomainEvent, EventMetadata, NewEvent, StreamId, StreamVersion};
use kiln_store::{EventStore, ExpectedVersion, Store, StoreError};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::sandbox::HostCalls;

#[derive(Debug)]
pub(super) struct StepHost {
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
                Ok(match s.recorded.get(&key) {
                    Some(value) => json!({"found": true, "value": value}),
                    None => json!({"found": false}),
                })
            }
            "step.record" => {
                let key = key()?;
                let value = params.get("value").cloned().unwrap_or(Value::Null);
                let mut s = self.state.lock().await;
                if s.recorded.contains_key(&key) {
                    return Err(format!("step {key:?} is already recorded"));
                }
                let event = DomainEvent::from(RunStepCompleted {
                    attempt: self.attempt,
                    key: key.clone(),
                    result: value.clone(),
                });
                let event = NewEvent::from_domain(&event, self.metadata.clone());
                match self.store.append(&self.stream, ExpectedVersion::Exact(s.version), vec![event]).await {
                    Ok(r) => {
                        s.version = r.stream_version;
                        s.recorded.insert(key, value.clone());
                        Ok(json!({"value": value}))
                    }
                    Err(StoreError::WrongExpectedVersion { .. }) => {
                        self.fenced.cancel();
                        Err("this attempt no longer holds the run (its lease was lost); stopping".to_owned())
                    }
                    Err(e) => Err(format!("could not record step {key:?}: {e}")),
                }
            }
            "tools.call" => Err("ctx.tools.call is not available yet".to_owned()),
            other => Err(format!("unknown host call {other:?}")),
        }
    }
}
