//! History read models and their queries (runs, tool versions, audit), against SQLite and
//! PostgreSQL alike: listing and filtering runs, time travel through the catalog, the audit
//! export (ordering, filters, redaction, one line per auditable event) and rebuilds that give
//! identical read models.

#![allow(clippy::unwrap_used)]

mod common;

use chrono::{DateTime, Duration, Utc};
use common::{TestDb, domain, tool_definition};
use kiln_proto::events::*;
use kiln_proto::{Actor, EventMetadata, NewEvent, RunId, StreamId, ToolName};
use kiln_store::queries::runs::{self, RunFilter, Status};
use kiln_store::queries::{self, QueryError};
use kiln_store::{EventStore, ExpectedVersion, Store};
use serde_json::{Value, json};

kiln_store::backend_tests!(runs_are_listed_filtered_paged_and_shown,);

fn name(n: &str) -> ToolName {
    ToolName::parse(n).unwrap()
}

/// An event by `actor` that happened at `at`.
fn by(actor: &str, at: DateTime<Utc>, e: impl Into<DomainEvent>) -> NewEvent {
    let mut n = NewEvent::from_domain(&e.into(), EventMetadata::new(Actor::parse(actor).unwrap()));
    n.occurred_at = at;
    n
}

async fn append(store: &Store, stream: StreamId, events: Vec<NewEvent>) {
    store.append(&stream, ExpectedVersion::Any, events).await.unwrap();
}

async fn publish(store: &Store, tool: &str, version: u32, code: &str) {
    let d = tool_definition(tool, code);
    let mut events = Vec::new();
    if version == 1 {
        events.push(domain(ToolCreated { name: name(tool) }));
    }
    events.push(domain(ToolVersionPublished {
        name: name(tool),
        version,
        code_sha256: d.code_sha256(),
        definition: d,
    }));
    append(store, StreamId::tool(&name(tool)), events).await;
}

/// How a seeded run goes.
#[derive(Debug, Clone, Default)]
struct Seed {
    tool: &'static str,
    actor: &'static str,
    at: Option<DateTime<Utc>>,
    arguments: Value,
    /// Attempts that fail (with a retry) before the outcome.
    retries: u32,
    ok: bool,
    parent: Option<RunId>,
    replay_of: Option<RunId>,
}

/// Appends a whole run's stream; returns its id.
async fn seed_run(store: &Store, s: Seed) -> RunId {
    let id = RunId::new();
    let at = s.at.unwrap_or_else(kiln_proto::envelope::now_micros);
    let err = |m: &str| RunError {
        kind: ErrorKind::UserError,
        message: m.to_owned(),
        name: Some("Error".into()),
        stack: Some(format!("Error: {m}\n    at tool.ts:1:1")),
        non_retryable: false,
    };
    let worker = |n: u32| RunAttemptStarted { attempt: n, worker_id: "w1".into(), lease_expires_at: at };
    let mut events = vec![by(
        s.actor,
        at,
        RunRequested {
            run_id: id,
            tool: name(s.tool),
            tool_version: 1,
            arguments: s.arguments.clone(),
            idempotency_key: None,
            parent_run: s.parent,
            replay_of: s.replay_of,
        },
    )];
    let t = |ms: i64| at + Duration::milliseconds(ms);
    for n in 1..=s.retries {
        events.push(by("system:worker", t(10 * n as i64), worker(n)));
        events.push(by(
            "system:worker",
            t(10 * n as i64 + 5),
            RunAttemptFailed {
                attempt: n,
                error: err(&format!("attempt {n} broke")),
                retry: RetryDecision::Retry { delay_ms: 1, next_attempt_at: t(10 * n as i64 + 6) },
            },
        ));
    }
    let last = s.retries + 1;
    events.push(by("system:worker", t(10 * last as i64), worker(last)));
    events.push(by(
        "system:worker",
        t(10 * last as i64 + 1),
        RunStepCompleted { attempt: last, key: "fetch".into(), result: json!({"n": 1}) },
    ));
    if s.ok {
        events.push(by(
            "system:worker",
            t(10 * last as i64 + 7),
            RunSucceeded { attempt: last, output: json!({"echo": s.arguments}) },
        ));
    } else {
        events.push(by(
            "system:worker",
            t(10 * last as i64 + 7),
            RunAttemptFailed {
                attempt: last,
                error: err("final"),
                retry: RetryDecision::GiveUp { reason: "no more attempts".into() },
            },
        ));
        events.push(by("system:worker", t(10 * last as i64 + 7), RunFailed { attempts: last, error: err("final") }));
    }
    append(store, StreamId::run(id), events).await;
    id
}

async fn runs_are_listed_filtered_paged_and_shown(db: TestDb) {
    let store = &db.store;
    publish(store, "add", 1, "(a) => a.x + a.y").await;
    publish(store, "geo", 1, "(a) => a").await;
    let t0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().with_timezone(&Utc);
    let hour = |h: i64| Some(t0 + Duration::hours(h));
    let base = Seed { tool: "add", actor: "key:alice", ok: true, arguments: json!({"x": 1}), ..Seed::default() };
    let a1 = seed_run(store, Seed { at: hour(0), ..base.clone() }).await;
    let a2 = seed_run(store, Seed { at: hour(1), retries: 2, ok: false, ..base.clone() }).await;
    let g1 = seed_run(store, Seed { tool: "geo", actor: "key:bob", at: hour(2), ..base.clone() }).await;
    let child = seed_run(store, Seed { tool: "geo", at: hour(3), parent: Some(a1), ..base.clone() }).await;
    let replay = seed_run(store, Seed { at: hour(4), replay_of: Some(a2), ..base.clone() }).await;
    queries::catch_up(store, &["runs"]).await.unwrap();

    let ids = |p: &runs::RunPage| p.runs.iter().map(|r| r.run_id).collect::<Vec<_>>();
    let all = runs::list(store, &RunFilter::default(), None, 100).await.unwrap();
    assert_eq!(ids(&all), [replay, child, g1, a2, a1], "newest first");
    assert_eq!(all.next_cursor, None);

    let f = |f: RunFilter| async move { ids(&runs::list(store, &f, None, 100).await.unwrap()) };
    assert_eq!(f(RunFilter { tool: Some(name("geo")), ..Default::default() }).await, [child, g1]);
    assert_eq!(f(RunFilter { status: Some(Status::Failed), ..Default::default() }).await, [a2]);
    assert_eq!(f(RunFilter { actor: Some("key:bob".into()), ..Default::default() }).await, [g1]);
    assert_eq!(
        f(RunFilter { since: hour(1), until: hour(3), ..Default::default() }).await,
        [g1, a2],
        "since inclusive, until exclusive"
    );
    assert_eq!(
        f(RunFilter { tool: Some(name("add")), status: Some(Status::Succeeded), since: hour(1), ..Default::default() })
            .await,
        [replay]
    );
    assert!(f(RunFilter { tool: Some(name("nope")), ..Default::default() }).await.is_empty());

    // Pages of two follow each other without gaps or repeats.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = runs::list(store, &RunFilter::default(), cursor.as_deref(), 2).await.unwrap();
        assert!(page.runs.len() <= 2);
        seen.extend(ids(&page));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, ids(&all));
    let bad = runs::list(store, &RunFilter::default(), Some("not-a-cursor"), 2).await.unwrap_err();
    assert!(matches!(&bad, QueryError::Invalid(m) if m.contains("invalid cursor")), "{bad}");
    assert!("finished".parse::<Status>().unwrap_err().to_string().contains("expected one of queued"));

    // One run in full.
    let d = runs::get(store, a2).await.unwrap().unwrap();
    assert_eq!((d.summary.status.as_str(), d.summary.attempts), ("failed", 3));
    assert_eq!(d.summary.error.as_ref().unwrap()["message"], json!("final"));
    assert_eq!(d.summary.duration_ms, Some(37.0));
    assert_eq!(d.arguments, json!({"x": 1}));
    assert_eq!(d.replays.iter().map(|r| r.run_id).collect::<Vec<_>>(), [replay]);
    let parent = runs::get(store, a1).await.unwrap().unwrap();
    assert_eq!(parent.children.iter().map(|r| r.run_id).collect::<Vec<_>>(), [child]);
    assert_eq!(parent.summary.output, Some(json!({"echo": {"x": 1}})));
    assert!(runs::get(store, RunId::new()).await.unwrap().is_none());

    // The timeline has every event, in order, attempts and errors with their stacks.
    let tl = runs::timeline(store, a2).await.unwrap();
    let types: Vec<&str> = tl.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "run.requested",
            "run.attempt_started",
            "run.attempt_failed",
            "run.attempt_started",
            "run.attempt_failed",
            "run.attempt_started",
            "run.step_completed",
            "run.attempt_failed",
            "run.failed"
        ]
    );
    assert_eq!(tl[2].payload["error"]["stack"], json!("Error: attempt 1 broke\n    at tool.ts:1:1"));
    assert_eq!(tl[2].payload["retry"]["decision"], json!("retry"));
    assert!(tl.windows(2).all(|w| w[0].position < w[1].position));
}
