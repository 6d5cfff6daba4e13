//! Per-actor limits kept in the database, against SQLite and PostgreSQL alike: the rate's burst
//! is shared by every connection (as by every replica), refusals say when to retry, slots come
//! back when released, and the slots of a replica that died come back when their lease expires.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kiln_store::limits::{self, Admission, Limits};
use kiln_store::testing::TestDb;

kiln_store::backend_tests!(
    the_burst_is_shared_by_two_connections_then_refused_with_a_retry_time,
    concurrency_slots_come_back_when_released,
    slots_of_a_dead_replica_expire,
);

const RATE: Limits =
    Limits { requests_per_second: 1.0, burst: 3, max_concurrent: 0, slot_lease: Duration::from_secs(60) };

async fn the_burst_is_shared_by_two_connections_then_refused_with_a_retry_time(db: TestDb) {
    let other = db.reopen().await;
    let mut admitted = 0;
    for i in 0..6 {
        let store = if i % 2 == 0 { &db.store } else { &other };
        match limits::admit(store, "key:ci", &RATE).await.unwrap() {
            Admission::Admitted { slot } => {
                admitted += 1;
                limits::release(store, &slot).await.unwrap();
            }
            Admission::Rate { retry_after } => {
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1), "{retry_after:?}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // A burst of 3 (a little more if a second passed in between), not 3 per connection.
    assert!((3..=4).contains(&admitted), "admitted {admitted}");
    // Another actor has its own bucket.
    assert!(matches!(limits::admit(&other, "key:other", &RATE).await.unwrap(), Admission::Admitted { .. }));
}

async fn concurrency_slots_come_back_when_released(db: TestDb) {
    let l = Limits { requests_per_second: 0.0, burst: 0, max_concurrent: 2, slot_lease: Duration::from_secs(60) };
    let other = db.reopen().await;
    let Admission::Admitted { slot: a } = limits::admit(&db.store, "local", &l).await.unwrap() else { panic!() };
    let Admission::Admitted { slot: _b } = limits::admit(&other, "local", &l).await.unwrap() else { panic!() };
    assert_eq!(limits::admit(&db.store, "local", &l).await.unwrap(), Admission::Concurrency { limit: 2 });
    limits::release(&other, &a).await.unwrap();
    // Releasing twice does not free a second slot.
    limits::release(&other, &a).await.unwrap();
    assert!(matches!(limits::admit(&db.store, "local", &l).await.unwrap(), Admission::Admitted { .. }));
    assert_eq!(limits::admit(&db.store, "local", &l).await.unwrap(), Admission::Concurrency { limit: 2 });
}

async fn slots_of_a_dead_replica_expire(db: TestDb) {
    let short =
        Limits { requests_per_second: 0.0, burst: 0, max_concurrent: 1, slot_lease: Duration::from_millis(300) };
    // The slot's holder never releases it, as a replica killed mid-request would not.
    assert!(matches!(limits::admit(&db.store, "local", &short).await.unwrap(), Admission::Admitted { .. }));
    assert_eq!(limits::admit(&db.store, "local", &short).await.unwrap(), Admission::Concurrency { limit: 1 });
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(matches!(limits::admit(&db.store, "local", &short).await.unwrap(), Admission::Admitted { .. }));
}
