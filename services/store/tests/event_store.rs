//! The `EventStore` contract, proven against SQLite and PostgreSQL alike.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{TestDb, actor, event};
use futures::{FutureExt, StreamExt};
use kiln_proto::{EventId, EventMetadata, Position, StreamId, StreamVersion, TraceParent};
use kiln_store::{EventStore, ExpectedVersion, StoreError};
use rand::Rng;
use uuid::Uuid;

kiln_store::backend_tests!(
    append_then_read_returns_what_was_written,
    expected_version_cases,
    concurrent_writers_on_one_stream_exactly_one_wins,
    resending_stored_event_ids_is_a_no_op,
    append_is_all_or_nothing,
    empty_append_is_refused,
    tailing_reader_sees_every_event_once_while_8_tasks_append,
    subscription_wakes_on_append_without_polling,
    subscription_in_another_connection_wakes,
    read_all_pages_in_batches,
    concurrent_appends_succeed_or_fail_each_on_its_own,
);

fn stream(name: &str) -> StreamId {
    StreamId::parse(name).unwrap()
}

async fn append_then_read_returns_what_was_written(db: TestDb) {
    let s = stream("tool-roundtrip");
    let mut events = vec![event("test.a", 1), event("test.b", 2), event("test.c", 3)];
    events[1].metadata = EventMetadata {
        actor: actor(),
        correlation_id: Some(Uuid::now_v7()),
        causation_id: Some(events[0].event_id),
        traceparent: Some(TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap()),
    };
    events[2].payload = serde_json::json!({"nested": {"list": [1, 2.5, "x", null, true]}, "unicode": "héllo ✓"});
    let r = db.store.append(&s, ExpectedVersion::NoStream, events.clone()).await.unwrap();
    assert_eq!((r.first_position, r.last_position, r.stream_version), (Position(1), Position(3), StreamVersion(3)));
    assert!(r.written);

    let read = db.store.read_stream(&s, StreamVersion(0), 100).await.unwrap();
    assert_eq!(read.len(), 3);
    for (i, (got, sent)) in read.iter().zip(&events).enumerate() {
        assert_eq!(got.event_id, sent.event_id);
        assert_eq!(got.stream_id, s);
        assert_eq!(got.stream_version, StreamVersion(i as u64 + 1));
        assert_eq!(got.position, Position(i as u64 + 1));
        assert_eq!(got.event_type, sent.event_type);
        assert_eq!(got.schema_version, sent.schema_version);
        assert_eq!(got.occurred_at, sent.occurred_at);
        assert_eq!(got.metadata, sent.metadata);
        assert_eq!(got.payload_value(), sent.payload);
    }
    assert_eq!(db.store.read_all(Position::START, 100).await.unwrap(), read);
    assert_eq!(db.store.read_stream(&s, StreamVersion(2), 100).await.unwrap(), read[2..]);
    assert_eq!(db.store.stream_version(&s).await.unwrap(), Some(StreamVersion(3)));
    assert_eq!(db.store.stream_version(&stream("tool-none")).await.unwrap(), None);
    assert_eq!(db.store.head().await.unwrap(), Position(3));
}

async fn expected_version_cases(db: TestDb) {
    let s = stream("tool-versions");
    let conflict = |r: Result<_, StoreError>| match r {
        Err(e @ StoreError::WrongExpectedVersion { .. }) => e,
        other => panic!("expected a version conflict, got {other:?}"),
    };
    // Exact on a missing stream: conflict naming "no stream".
    let e = conflict(db.store.append(&s, ExpectedVersion::Exact(StreamVersion(1)), vec![event("x", 0)]).await);
    assert_eq!(e.to_string(), "version conflict on stream \"tool-versions\": expected 1, current is no stream");
    // NoStream on a missing stream: fine.
    db.store.append(&s, ExpectedVersion::NoStream, vec![event("x", 1), event("x", 2)]).await.unwrap();
    // NoStream on an existing stream: conflict.
    let e = conflict(db.store.append(&s, ExpectedVersion::NoStream, vec![event("x", 3)]).await);
    assert_eq!(e.to_string(), "version conflict on stream \"tool-versions\": expected no stream, current is 2");
    // Exact, stale and ahead: conflicts naming both versions.
    let e = conflict(db.store.append(&s, ExpectedVersion::Exact(StreamVersion(1)), vec![event("x", 3)]).await);
    assert_eq!(e.to_string(), "version conflict on stream \"tool-versions\": expected 1, current is 2");
    conflict(db.store.append(&s, ExpectedVersion::Exact(StreamVersion(9)), vec![event("x", 3)]).await);
    // Exact, right: fine.
    let r = db.store.append(&s, ExpectedVersion::Exact(StreamVersion(2)), vec![event("x", 3)]).await.unwrap();
    assert_eq!(r.stream_version, StreamVersion(3));
    // Any: always fine, on existing and missing streams.
    db.store.append(&s, ExpectedVersion::Any, vec![event("x", 4)]).await.unwrap();
    db.store.append(&stream("tool-other"), ExpectedVersion::Any, vec![event("x", 5)]).await.unwrap();
    // Conflicts wrote nothing.
    assert_eq!(db.store.stream_version(&s).await.unwrap(), Some(StreamVersion(4)));
    assert_eq!(db.store.head().await.unwrap(), Position(5));
}

async fn concurrent_writers_on_one_stream_exactly_one_wins(db: TestDb) {
    let s = stream("tool-race");
    db.store.append(&s, ExpectedVersion::NoStream, vec![event("x", 0)]).await.unwrap();
    for round in 1..=20u64 {
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let (store, s, barrier) = (db.store.clone(), s.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    store
                        .append(&s, ExpectedVersion::Exact(StreamVersion(round)), vec![event("x", round * 10 + w)])
                        .await
                })
            })
            .collect();
        let mut wins = 0;
        for w in writers {
            match w.await.unwrap() {
                Ok(r) => {
                    wins += 1;
                    assert_eq!(r.stream_version, StreamVersion(round + 1));
                }
                Err(StoreError::WrongExpectedVersion { expected, actual, .. }) => {
                    assert_eq!(expected, ExpectedVersion::Exact(StreamVersion(round)));
                    assert_eq!(actual, Some(StreamVersion(round + 1)));
                }
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        assert_eq!(wins, 1, "round {round}: exactly one writer must win");
    }
    assert_eq!(db.store.stream_version(&s).await.unwrap(), Some(StreamVersion(21)));
}

async fn resending_stored_event_ids_is_a_no_op(db: TestDb) {
    let s = stream("tool-idem");
    let batch = vec![event("x", 1), event("x", 2)];
    let first = db.store.append(&s, ExpectedVersion::NoStream, batch.clone()).await.unwrap();
    // The retry carries a now-stale expectation: it is still recognised as the same append.
    let again = db.store.append(&s, ExpectedVersion::NoStream, batch.clone()).await.unwrap();
    assert!(!again.written);
    assert_eq!((again.first_position, again.last_position), (first.first_position, first.last_position));
    assert_eq!(again.stream_version, first.stream_version);
    assert_eq!(db.store.read_all(Position::START, 10).await.unwrap().len(), 2);

    // Concurrent retries of one append store it once.
    let batch = vec![event("x", 3)];
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (store, s, batch) = (db.store.clone(), s.clone(), batch.clone());
            tokio::spawn(async move { store.append(&s, ExpectedVersion::Any, batch).await })
        })
        .collect();
    let mut written = 0;
    for t in tasks {
        written += usize::from(t.await.unwrap().unwrap().written);
    }
    assert_eq!(written, 1);
    assert_eq!(db.store.head().await.unwrap(), Position(3));

    // The same id in another stream, or a batch only partly stored, is an error, not a no-op.
    let e = db.store.append(&stream("tool-elsewhere"), ExpectedVersion::Any, batch.clone()).await.unwrap_err();
    assert!(matches!(e, StoreError::PartialDuplicate { .. }), "{e}");
    let e = db.store.append(&s, ExpectedVersion::Any, vec![batch[0].clone(), event("x", 4)]).await.unwrap_err();
    assert!(matches!(e, StoreError::PartialDuplicate { .. }), "{e}");
    assert_eq!(db.store.head().await.unwrap(), Position(3));
}

async fn append_is_all_or_nothing(db: TestDb) {
    let stored = event("x", 1);
    db.store.append(&stream("tool-a"), ExpectedVersion::Any, vec![stored.clone()]).await.unwrap();
    // The third event's id is already stored: the first two must not be written either.
    let batch = vec![event("x", 2), event("x", 3), stored];
    let e = db.store.append(&stream("tool-b"), ExpectedVersion::NoStream, batch).await.unwrap_err();
    assert!(matches!(e, StoreError::PartialDuplicate { .. }), "{e}");
    assert_eq!(db.store.stream_version(&stream("tool-b")).await.unwrap(), None);
    assert_eq!(db.store.head().await.unwrap(), Position(1));
    // Positions stay gapless after the failed append.
    let r = db.store.append(&stream("tool-b"), ExpectedVersion::NoStream, vec![event("x", 4)]).await.unwrap();
    assert_eq!(r.first_position, Position(2));
}

async fn empty_append_is_refused(db: TestDb) {
    let e = db.store.append(&stream("tool-empty"), ExpectedVersion::Any, vec![]).await.unwrap_err();
    assert_eq!(e.to_string(), "nothing to append to stream \"tool-empty\"");
}

async fn tailing_reader_sees_every_event_once_while_8_tasks_append(db: TestDb) {
    const TASKS: u64 = 8;
    const APPENDS: u64 = 60;
    // Two readers tail while the writers run: a subscription, and a plain `read_all` loop that
    // re-reads as fast as it can (the reader most exposed to out-of-order commits).
    let total = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done = tokio_util::sync::CancellationToken::new();
    let subscriber = {
        let (mut tail, total, done) = (db.store.subscribe(Position::START), total.clone(), done.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let target = total.load(std::sync::atomic::Ordering::SeqCst);
                if done.is_cancelled() && seen.len() == target {
                    return seen;
                }
                let next = tokio::select! {
                    e = tail.next() => e,
                    _ = done.cancelled(), if !done.is_cancelled() => continue,
                };
                let e = next.unwrap().unwrap();
                assert_eq!(e.position, Position(seen.len() as u64 + 1), "subscription skipped or repeated");
                seen.push(e.event_id);
            }
        })
    };
    let poller = {
        let (store, total, done) = (db.store.clone(), total.clone(), done.clone());
        tokio::spawn(async move {
            let mut seen: Vec<EventId> = Vec::new();
            loop {
                let finished = done.is_cancelled();
                let page = store.read_all(Position(seen.len() as u64), 50).await.unwrap();
                for e in &page {
                    assert_eq!(e.position, Position(seen.len() as u64 + 1), "read_all skipped or repeated");
                    seen.push(e.event_id);
                }
                if finished && page.is_empty() && seen.len() == total.load(std::sync::atomic::Ordering::SeqCst) {
                    return seen;
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let writers: Vec<_> = (0..TASKS)
        .map(|t| {
            let (store, total) = (db.store.clone(), total.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..APPENDS {
                    let (size, shared) = {
                        let mut rng = rand::rng();
                        (rng.random_range(1..=4u64), rng.random_bool(0.3))
                    };
                    let name = if shared { "run-shared".to_owned() } else { format!("run-t{t}") };
                    let batch: Vec<_> = (0..size).map(|k| event("x", t * 1_000_000 + i * 10 + k)).collect();
                    ids.extend(batch.iter().map(|e| e.event_id));
                    store.append(&stream(&name), ExpectedVersion::Any, batch).await.unwrap();
                    total.fetch_add(size as usize, std::sync::atomic::Ordering::SeqCst);
                }
                ids
            })
        })
        .collect();
    let mut expected = HashSet::new();
    for w in writers {
        expected.extend(w.await.unwrap());
    }
    done.cancel();
    for (reader, seen) in [
        ("subscription", tokio::time::timeout(Duration::from_secs(60), subscriber).await),
        ("read_all loop", tokio::time::timeout(Duration::from_secs(60), poller).await),
    ] {
        let seen = seen.unwrap_or_else(|_| panic!("{reader} stalled")).unwrap();
        let unique: HashSet<EventId> = seen.iter().copied().collect();
        assert_eq!(unique.len(), seen.len(), "{reader}: no event may be delivered twice");
        assert_eq!(unique, expected, "{reader}: every appended event is delivered");
    }
}

async fn subscription_wakes_on_append_without_polling(db: TestDb) {
    db.store.append(&stream("tool-s"), ExpectedVersion::Any, vec![event("x", 1)]).await.unwrap();
    let mut sub = db.store.subscribe(Position::START);
    assert_eq!(sub.next().await.unwrap().unwrap().position, Position(1));
    // Caught up: the subscription is now waiting.
    assert!(sub.next().now_or_never().is_none());
    let appended = db.store.append(&stream("tool-s"), ExpectedVersion::Any, vec![event("x", 2)]).await.unwrap();
    let woken = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("subscriber was not woken");
    assert_eq!(woken.unwrap().unwrap().position, appended.last_position);
}

/// A subscriber on one connection is woken by an append through another (another process, on
/// PostgreSQL; on SQLite, only appends through the same store handle wake it, which is the
/// embedded deployment's one process).
async fn subscription_in_another_connection_wakes(db: TestDb) {
    let writer = match db.store.backend() {
        kiln_store::Backend::Postgres => db.reopen().await,
        kiln_store::Backend::Sqlite => db.store.clone(),
    };
    let mut sub = db.store.subscribe(Position::START);
    assert!(sub.next().now_or_never().is_none());
    writer.append(&stream("tool-x"), ExpectedVersion::Any, vec![event("x", 1)]).await.unwrap();
    let woken = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("subscriber was not woken");
    assert_eq!(woken.unwrap().unwrap().position, Position(1));
}

async fn read_all_pages_in_batches(db: TestDb) {
    let events: Vec<_> = (0..25).map(|i| event("x", i)).collect();
    db.store.append(&stream("tool-p"), ExpectedVersion::Any, events).await.unwrap();
    let mut after = Position::START;
    let mut pages = 0;
    loop {
        let page = db.store.read_all(after, 10).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 10);
        assert_eq!(page[0].position, after.next());
        after = page.last().unwrap().position;
        pages += 1;
    }
    assert_eq!((pages, after), (3, Position(25)));
}

/// A row that a foreign writer corrupted is reported with its position, not skipped.
#[tokio::test]
async fn sqlite_corrupt_row_is_reported_with_its_position() {
    let db = TestDb::sqlite().await;
    db.store.append(&stream("tool-a"), ExpectedVersion::Any, vec![event("x", 1)]).await.unwrap();
    let mut tx = db.store.begin_write().await.unwrap();
    tx.execute_raw(
        "INSERT INTO kiln_events VALUES (2, '0192a0b0-0000-7000-8000-000000000000', 'tool-a', 2, 'x', 0, 0, \
         'key:test', '[2, \"0192a0b0-0000-7000-8000-000000000000\", {not json')",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let err = db.store.read_all(Position::START, 10).await.unwrap_err();
    assert!(err.to_string().starts_with("corrupt event at position 2: record:"), "{err}");
}

/// Concurrent appends may be committed together (SQLite commits waiting appends in one
/// transaction): each is still checked and refused on its own, a refused or failing one takes
/// none of the others down, and positions stay gapless.
async fn concurrent_appends_succeed_or_fail_each_on_its_own(db: TestDb) {
    let stored = event("x", 0);
    db.store.append(&stream("tool-base"), ExpectedVersion::NoStream, vec![stored.clone()]).await.unwrap();
    let tasks: Vec<_> = (0..96u64)
        .map(|i| {
            let (store, stored) = (db.store.clone(), stored.clone());
            tokio::spawn(async move {
                let s = stream(&format!("tool-c{i}"));
                let outcome = match i % 4 {
                    // Fine.
                    0 | 1 => {
                        store.append(&s, ExpectedVersion::NoStream, vec![event("x", i), event("x", i + 1000)]).await
                    }
                    // A stale expectation.
                    2 => store.append(&s, ExpectedVersion::Exact(StreamVersion(5)), vec![event("x", i)]).await,
                    // A batch whose last event is stored elsewhere: fails at the INSERT itself.
                    _ => store.append(&s, ExpectedVersion::NoStream, vec![event("x", i), stored]).await,
                };
                (i, outcome)
            })
        })
        .collect();
    let mut written = 0;
    for t in tasks {
        let (i, outcome) = t.await.unwrap();
        match (i % 4, outcome) {
            (0 | 1, Ok(r)) => {
                assert_eq!(r.stream_version, StreamVersion(2));
                written += 2;
            }
            (2, Err(StoreError::WrongExpectedVersion { actual: None, .. })) => {}
            (3, Err(StoreError::PartialDuplicate { stored_in, .. })) => assert_eq!(stored_in, stream("tool-base")),
            (i, other) => panic!("append {i}: unexpected {other:?}"),
        }
    }
    assert_eq!(written, 96);
    let all = db.store.read_all(Position::START, 1_000).await.unwrap();
    assert_eq!(all.len(), 1 + written);
    assert!(all.iter().enumerate().all(|(i, e)| e.position == Position(i as u64 + 1)), "gapless");
    for i in (0..96u64).filter(|i| i % 4 >= 2) {
        assert_eq!(db.store.stream_version(&stream(&format!("tool-c{i}"))).await.unwrap(), None, "nothing of {i}");
    }
}
