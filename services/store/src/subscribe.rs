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
    // `caught_up`: the last read returned less than a full batch, so nothing more was committed
    // before it began; wait for the head to move before reading again.
    let state = (store, head, after, VecDeque::<RecordedEvent>::new(), false);
    Box::pin(futures::stream::unfold(state, |(store, mut head, mut after, mut buffer, mut caught_up)| async move {
        loop {
            if let Some(event) = buffer.pop_front() {
                after = event.position;
                return Some((Ok(event), (store, head, after, buffer, caught_up)));
            }
            if caught_up {
                if head.changed().await.is_err() {
                    return None;
                }
                caught_up = false;
            }
            head.borrow_and_update();
            match store.read_all(after, BATCH).await {
                Ok(batch) => {
                    caught_up = batch.len() < BATCH;
                    buffer.extend(batch);
                }
                Err(e) => return Some((Err(e), (store, head, after, buffer, caught_up))),
            }
        }
    }))
}
