//! Replay: reading a stretch of the log as fast as the machine allows. Positions are gapless, so
//! the pages of a stretch are known before reading, and two are read at once (each backend reads
//! a page on its own connection), while the caller consumes the previous one, in order.

use futures::{Stream, StreamExt, TryStreamExt};
use kiln_proto::{Position, RecordedEvent};

use crate::{EventStore, Result};

/// Pages read ahead of the consumer.
const IN_FLIGHT: usize = 2;

/// The events after `after` up to and including `until`, in pages of `page_size`, in order.
pub fn replay<S: EventStore + Clone + 'static>(
    store: &S,
    after: Position,
    until: Position,
    page_size: usize,
) -> impl Stream<Item = Result<Vec<RecordedEvent>>> + Send + 'static {
    let page_size = page_size.max(1) as u64;
    let starts = (after.0..until.0).step_by(page_size as usize);
    let store = store.clone();
    futures::stream::iter(starts)
        .map(move |start| {
            let store = store.clone();
            let limit = page_size.min(until.0 - start) as usize;
            async move { store.read_all(Position(start), limit).await }
        })
        .buffered(IN_FLIGHT)
        .try_take_while(|page| std::future::ready(Ok(!page.is_empty())))
}
