//! Cancelling a run: `run.cancelled`, recorded with who asked. A queued run never starts; a
//! running one is stopped at once if this process runs it, and otherwise can record nothing more
//! (its next append is refused), so a run never has two outcomes.

use kiln_proto::events::RunCancelled;
use kiln_proto::run::RunStatus;
use kiln_proto::{Actor, DomainEvent, EventMetadata, NewEvent, RunId, StreamId};
use kiln_store::{ExpectedVersion, QueueOp, StoreError};

use super::{ExecuteError, RunEngine};

/// What a cancellation found.
#[derive(Debug, Clone, PartialEq)]
pub enum Cancelled {
    /// Recorded now.
    Cancelled,
    /// The run had already ended this way.
    AlreadyEnded(RunStatus),
}

impl RunEngine {
    pub async fn cancel(&self, run_id: RunId, actor: Actor, reason: Option<String>) -> Result<Cancelled, ExecuteError> {
        let stream = StreamId::run(run_id);
        loop {
            let (events, state) = self.load_run(run_id).await?;
            if state.status.is_terminal() {
                return Ok(Cancelled::AlreadyEnded(state.status));
            }
            let event = RunCancelled { reason: reason.clone(), cancelled_by: Some(actor.clone()) };
            let mut metadata = EventMetadata::new(actor.clone());
            metadata.correlation_id = events.first().and_then(|e| e.metadata.correlation_id);
            let event = NewEvent::from_domain(&DomainEvent::from(event), metadata);
            let queue = [QueueOp::Remove(run_id)];
            match self.store.append_queued(&stream, ExpectedVersion::Exact(state.version), vec![event], &queue).await {
                Ok(_) => {
                    if let Some(running) = self.inflight.lock().unwrap_or_else(|e| e.into_inner()).get(&run_id) {
                        running.cancel();
                    }
                    return Ok(Cancelled::Cancelled);
                }
                // The run moved meanwhile (an attempt started or ended): look again.
                Err(StoreError::WrongExpectedVersion { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}
