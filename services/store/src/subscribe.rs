//! Catch-up subscriptions: read the log from a position, then wait on the store's head watch for
//! more. The watch is marked seen *before* each read, so an event committed while a read is in
//! flight always wakes the reader; nothing is polled and nothing is missed.

use std::collections::VecDeque;
use std::pin::Pin;

use futures::Stream;
use kiln_proto::{Position, RecordedEvent};

use crate::{EventStore, Result};

/// A never-ending stream of committed events in position order.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<RecordedEvent>> + Send>>;

const BATCH: usize = 512;

pub(crate) fn subscribe<S: EventStore + 'static>(store: S, after: Position) -> EventStream {
    let head = store.head_watch();
    let state = (store, head, after, VecDeque::<RecordedEvent>::new());
    Box::pin(futures::stream::unfold(state, |(store, mut head, mut after, mut buffer)| async move {
        loop {
            if let Some(event) = buffer.pop_front() {
                after = event.position;
                return Some((Ok(event), (store, head, after, buffer)));
            }
            head.borrow_and_update();
            match store.read_all(after, BATCH).await {
                Ok(batch) if !batch.is_empty() => buffer.extend(batch),
                Ok(_) => {
                    if head.changed().await.is_err() {
                        return None;
                    }
                }
                Err(e) => return Some((Err(e), (store, head, after, buffer))),
            }
        }
    }))
}
