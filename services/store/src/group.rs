//! Group commit, shared by both backends: appends are queued to one task per store, which takes
//! every append waiting and commits them together (how is the backend's business).

use kiln_proto::{NewEvent, StreamId};
use tokio::sync::{mpsc, oneshot};

use crate::queue::QueueOp;
use crate::store::{check_append, encode_payload};
use crate::{AppendResult, ExpectedVersion, Result, StoreError};

/// Most appends (and events) committed in one group.
const GROUP_APPENDS: usize = 256;
const GROUP_EVENTS: usize = 10_000;

/// An append waiting for its group.
pub(crate) struct PendingAppend {
    pub stream: StreamId,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    /// The events' payloads, encoded (and size-checked) by the caller.
    pub payloads: Vec<String>,
    pub queue: Vec<QueueOp>,
    pub reply: oneshot::Sender<Result<AppendResult>>,
}

/// Checks an append, hands it to the group commit task and waits for its result.
pub(crate) async fn submit(
    appends: &mpsc::UnboundedSender<PendingAppend>,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
    queue: &[QueueOp],
) -> Result<AppendResult> {
    check_append(stream, &events)?;
    let payloads = events.iter().map(encode_payload).collect::<Result<Vec<_>>>()?;
    let (reply, answer) = oneshot::channel();
    let append = PendingAppend { stream: stream.clone(), expected, events, payloads, queue: queue.to_vec(), reply };
    let closed = || StoreError::Database(sqlx::Error::PoolClosed);
    appends.send(append).map_err(|_| closed())?;
    answer.await.map_err(|_| closed())?
}

/// The next group: the first append to arrive and every one waiting behind it (within the
/// limits). None once every sender is gone.
pub(crate) async fn next_group(appends: &mut mpsc::UnboundedReceiver<PendingAppend>) -> Option<Vec<PendingAppend>> {
    let first = appends.recv().await?;
    let mut events = first.events.len();
    let mut group = vec![first];
    while group.len() < GROUP_APPENDS && events < GROUP_EVENTS {
        let Ok(next) = appends.try_recv() else { break };
        events += next.events.len();
        group.push(next);
    }
    Some(group)
}
