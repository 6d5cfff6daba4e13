//! Composition: `ctx.tools.call(name, args)` starts a child run (its own stream, linked to its
//! parent), waits for it, and returns its output or throws its error in the parent.
//!
//! The call is journaled like a step (`tools.call#<n>` records the child's run id), and the child
//! is requested with an idempotency key derived from the parent and that step, so a parent that is
//! retried or resumed finds the same child instead of starting another. Calls deeper than
//! `max_depth` are refused, and so is a call that would repeat an ancestor (same tool, same
//! arguments): that recursion could never end.

use kiln_proto::events::RunRequested;
use kiln_proto::run::RunStatus;
use kiln_proto::{DomainEvent, RunId, StreamId, ToolName};
use kiln_store::EventStore;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{AttemptOutcome, RunEngine, RunRequest};

impl RunEngine {
    /// Requests `tool(args)` as a child of `parent` (or finds the one requested for this call
    /// before), after the depth and cycle checks.
    pub(super) async fn request_child(
        &self,
        parent: &RunRequested,
        journal_key: &str,
        tool: &str,
        arguments: Value,
        actor: kiln_proto::Actor,
    ) -> Result<RunId, String> {
        let tool = ToolName::parse(tool).map_err(|e| e.to_string())?;
        let ancestors = self.ancestors(parent).await?;
        if ancestors.len() >= self.max_depth {
            return Err(format!(
                "calling \"{tool}\" would nest runs {} deep; the limit is {}",
                ancestors.len() + 1,
                self.max_depth
            ));
        }
        if let Some(same) = ancestors.iter().find(|a| a.tool == tool && a.arguments == arguments) {
            return Err(format!(
                "calling \"{tool}\" with these arguments repeats run {} above it: a cycle that would never end",
                same.run_id
            ));
        }
        let request = RunRequest {
            tool,
            version: None,
            arguments,
            idempotency_key: Some(format!("child of {} at {journal_key}", parent.run_id)),
            parent_run: Some(parent.run_id),
            replay_of: None,
            reuse_steps: false,
            actor,
            traceparent: None,
        };
        Ok(self.request(request).await.map_err(|e| e.to_string())?.run_id)
    }

    /// Executes a child run here until it ends, waiting out its retries.
    pub(super) async fn wait_for(&self, child: RunId) -> Result<Value, String> {
        loop {
            let outcome = Box::pin(self.execute(child, CancellationToken::new())).await.map_err(|e| e.to_string())?;
            match outcome {
                AttemptOutcome::Finished(_) => {
                    let (_, state) = self.load_run(child).await.map_err(|e| e.to_string())?;
                    return match (state.status, state.output, state.error) {
                        (RunStatus::Succeeded, Some(output), _) => Ok(output),
                        (RunStatus::Failed, _, Some(error)) => {
                            Err(format!("child run {child} failed: {}", error.message))
                        }
                        (status, ..) => Err(format!("child run {child} {}", status.name())),
                    };
                }
                AttemptOutcome::RetryAt(at) | AttemptOutcome::Leased { until: at } => {
                    let wait = (at - kiln_proto::envelope::now_micros()).to_std().unwrap_or_default();
                    tokio::time::sleep(wait).await;
                }
                AttemptOutcome::Fenced => {}
                AttemptOutcome::Abandoned => return Err(format!("child run {child} was abandoned")),
            }
        }
    }

    /// The requests of `run` and every run above it, nearest first.
    async fn ancestors(&self, run: &RunRequested) -> Result<Vec<RunRequested>, String> {
        let mut chain = vec![run.clone()];
        while let Some(parent) = chain.last().and_then(|r| r.parent_run) {
            if chain.len() > self.max_depth {
                break;
            }
            chain.push(self.requested(parent).await?);
        }
        Ok(chain)
    }

    async fn requested(&self, run: RunId) -> Result<RunRequested, String> {
        let events = self.store.read_stream(&StreamId::run(run), kiln_proto::StreamVersion(0), 1).await;
        match events.map_err(|e| e.to_string())?.first().map(|e| e.decode()) {
            Some(Ok(DomainEvent::RunRequested(r))) => Ok(r),
            _ => Err(format!("run {run} has no request")),
        }
    }
}
