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

kiln_store::backend_tests!(
    runs_are_listed_filtered_paged_and_shown,
    the_catalog_travels_back_in_time,
    audit_export_over_100000_events,
    rebuilding_every_projection_gives_identical_read_models,
    readers_during_a_rebuild_see_the_whole_old_or_the_whole_new_read_model,
);

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
            reuse_steps_from: None,
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

async fn the_catalog_travels_back_in_time(db: TestDb) {
    let store = &db.store;
    let t0 = DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z").unwrap().with_timezone(&Utc);
    let at = |m: i64| t0 + Duration::minutes(m);
    let wx = name("wx");
    let version = |v: u32, code: &str| {
        let d = tool_definition("wx", code);
        ToolVersionPublished { name: wx.clone(), version: v, code_sha256: d.code_sha256(), definition: d }
    };
    let stream = StreamId::tool(&wx);
    let mut positions = Vec::new();
    let steps: Vec<Vec<NewEvent>> = vec![
        vec![by("key:alice", at(0), ToolCreated { name: wx.clone() }), by("key:alice", at(0), version(1, "1"))],
        vec![by("key:bob", at(10), version(2, "2"))],
        vec![by("key:carol", at(20), ToolDisabled { name: wx.clone(), reason: Some("broken".into()) })],
        vec![by("key:bob", at(30), version(3, "3"))],
        vec![by("key:carol", at(40), ToolEnabled { name: wx.clone() })],
        vec![by("key:dave", at(50), ToolDeleted { name: wx.clone() })],
        vec![by("key:erin", at(60), ToolCreated { name: wx.clone() }), by("key:erin", at(60), version(4, "4"))],
    ];
    for events in steps {
        positions.push(store.append(&stream, ExpectedVersion::Any, events).await.unwrap().last_position.0);
    }
    // Another tool that exists from minute 25 on.
    publish(store, "other", 1, "0").await;
    queries::catch_up(store, &["tool_versions"]).await.unwrap();

    use kiln_store::queries::tools::{At, catalog_at, versions};
    let wx_at = |at: At, deleted: bool| async move {
        let entries = catalog_at(store, at, deleted).await.unwrap();
        entries.into_iter().find(|e| e.name == "wx").map(|e| (e.state, e.version, e.changed_by))
    };
    let v = |state: &str, version: u32, by: &str| Some((state.to_owned(), version, by.to_owned()));
    assert_eq!(wx_at(At::Position(0), false).await, None, "nothing before the first event");
    assert_eq!(wx_at(At::Position(positions[0]), false).await, v("enabled", 1, "key:alice"));
    assert_eq!(wx_at(At::Position(positions[1]), false).await, v("enabled", 2, "key:bob"));
    assert_eq!(wx_at(At::Position(positions[2]), false).await, v("disabled", 2, "key:carol"));
    assert_eq!(wx_at(At::Position(positions[3]), false).await, v("disabled", 3, "key:bob"));
    assert_eq!(wx_at(At::Position(positions[4]), false).await, v("enabled", 3, "key:carol"));
    assert_eq!(wx_at(At::Position(positions[5]), false).await, None, "deleted tools are hidden");
    assert_eq!(wx_at(At::Position(positions[5]), true).await, v("deleted", 3, "key:dave"));
    assert_eq!(wx_at(At::Position(positions[6]), false).await, v("enabled", 4, "key:erin"));
    // By time: the state after every change at or before it.
    assert_eq!(wx_at(At::Time(at(-1)), false).await, None);
    assert_eq!(wx_at(At::Time(at(0)), false).await, v("enabled", 1, "key:alice"));
    assert_eq!(wx_at(At::Time(at(25)), false).await, v("disabled", 2, "key:carol"));
    assert_eq!(wx_at(At::Time(at(45)), false).await, v("enabled", 3, "key:carol"));
    assert_eq!(wx_at(At::Time(at(59)), false).await, None);
    let now = catalog_at(store, At::Position(u64::MAX), false).await.unwrap();
    assert_eq!(now.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["other", "wx"]);
    let entry = &now[1];
    assert_eq!(entry.code_sha256.as_deref(), Some(tool_definition("wx", "4").code_sha256().as_str()));
    let history = versions(store, "wx").await.unwrap();
    assert_eq!(
        history.iter().map(|v| (v.version, v.published_by.as_str())).collect::<Vec<_>>(),
        [(1, "key:alice"), (2, "key:bob"), (3, "key:bob"), (4, "key:erin")]
    );
    assert!("yesterday".parse::<At>().unwrap_err().to_string().contains("invalid --at"));
}

/// Secrets seeded into arguments, outputs and errors; none may appear in an export.
const SECRETS: &[&str] = &[
    "hunter2-seeded",
    "SEEDTOKEN0123456789abcdef",
    "ghp_SEED0123456789abcdefABCDEF0123",
    "c2VlZDpzZWNyZXQ=",
    "sk-seed-0123456789abcdef",
    "out-seed-tok",
    "AKIASEEDEXAMPLE12345",
];

/// Arguments carrying seeded secrets under sensitive keys and in text.
fn secret_arguments(i: usize) -> Value {
    match i % 4 {
        0 => json!({"city": "Oslo", "password": "hunter2-seeded"}),
        1 => {
            json!({"headers": {"Authorization": "Basic c2VlZDpzZWNyZXQ="}, "note": "Bearer SEEDTOKEN0123456789abcdef"})
        }
        2 => json!({"q": "use ghp_SEED0123456789abcdefABCDEF0123 please", "keys": ["AKIASEEDEXAMPLE12345"]}),
        _ => json!({"n": i}),
    }
}

/// Seeds about `events` events: tools with versions and state changes, and runs by several
/// actors over several hours, most with many durable steps. Returns the log position reached.
async fn seed_history(store: &Store, events: usize) -> u64 {
    let t0 = DateTime::parse_from_rfc3339("2026-05-01T00:00:00Z").unwrap().with_timezone(&Utc);
    let tools = ["alpha", "beta", "gamma"];
    for (i, t) in tools.iter().enumerate() {
        publish(store, t, 1, "1").await;
        publish(store, t, 2, "2").await;
        if i == 1 {
            append(store, StreamId::tool(&name(t)), vec![domain(ToolDisabled { name: name(t), reason: None })]).await;
            append(store, StreamId::tool(&name(t)), vec![domain(ToolEnabled { name: name(t) })]).await;
        }
    }
    let actors = ["key:alice", "key:bob", "jwt:carol"];
    let mut written = 0;
    let mut i = 0;
    while written < events {
        let id = RunId::new();
        let at = t0 + Duration::seconds(i as i64 * 7);
        let actor = actors[i % actors.len()];
        let tool = tools[i % tools.len()];
        let steps = if i % 10 == 0 { 2 } else { 60 };
        let mut evs = vec![by(
            actor,
            at,
            RunRequested {
                run_id: id,
                tool: name(tool),
                tool_version: 2,
                arguments: secret_arguments(i),
                idempotency_key: None,
                parent_run: None,
                replay_of: None,
                reuse_steps_from: None,
            },
        )];
        evs.push(by(
            "system:worker",
            at,
            RunAttemptStarted { attempt: 1, worker_id: "w".into(), lease_expires_at: at },
        ));
        for s in 0..steps {
            evs.push(by("system:worker", at, RunStepCompleted { attempt: 1, key: format!("s{s}"), result: json!(s) }));
        }
        let error = RunError {
            kind: ErrorKind::UserError,
            message: "upstream refused key sk-seed-0123456789abcdef".into(),
            name: None,
            stack: None,
            non_retryable: true,
        };
        evs.push(match i % 5 {
            0..=2 => {
                by("system:worker", at, RunSucceeded { attempt: 1, output: json!({"token": "out-seed-tok", "ok": i}) })
            }
            3 => by("system:worker", at, RunFailed { attempts: 1, error }),
            _ => by("key:alice", at, RunCancelled { reason: Some("stop".into()), cancelled_by: None }),
        });
        written += evs.len();
        append(store, StreamId::run(id), evs).await;
        i += 1;
    }
    store.head().await.unwrap().0
}

/// An audit line as expected: (position, action, actor, tool, time).
type Expected = (u64, String, String, String, String);

/// The audit lines the log calls for, worked out from the raw events independently of the
/// audit projection: (position, action, actor, tool, time).
async fn expected_audit(store: &Store) -> Vec<Expected> {
    let mapping = [
        ("tool.created", "tool.created"),
        ("tool.version_published", "tool.updated"),
        ("tool.enabled", "tool.enabled"),
        ("tool.disabled", "tool.disabled"),
        ("tool.deleted", "tool.deleted"),
        ("run.requested", "run.requested"),
        ("run.succeeded", "run.succeeded"),
        ("run.failed", "run.failed"),
        ("run.cancelled", "run.cancelled"),
        ("run.timed_out", "run.timed_out"),
    ];
    let mut run_tools = std::collections::HashMap::new();
    let mut out = Vec::new();
    let mut after = kiln_proto::Position(0);
    loop {
        let page = store.read_all(after, 5_000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.position;
        for e in &page {
            let p = e.payload_value();
            let tool = if e.event_type == "run.requested" {
                run_tools.insert(e.stream_id.clone(), p["tool"].as_str().unwrap().to_owned());
                p["tool"].as_str().unwrap().to_owned()
            } else if e.event_type.starts_with("tool.") {
                p["name"].as_str().unwrap().to_owned()
            } else {
                run_tools.get(&e.stream_id).cloned().unwrap_or_default()
            };
            if let Some((_, action)) = mapping.iter().find(|(t, _)| *t == e.event_type) {
                let time = queries::stored_time(&e.occurred_at);
                out.push((e.position.0, action.to_string(), e.metadata.actor.to_string(), tool, time));
            }
        }
    }
    out
}

async fn export_text(store: &Store, filter: kiln_store::queries::audit::AuditFilter, page: usize) -> String {
    use futures::TryStreamExt;
    let chunks: Vec<String> =
        kiln_store::queries::audit::export(store.clone(), filter, page).try_collect().await.unwrap();
    chunks.concat()
}

async fn audit_export_over_100000_events(db: TestDb) {
    use kiln_store::queries::audit::{ActionFilter, AuditFilter};
    let store = &db.store;
    let head = seed_history(store, 100_000).await;
    assert!(head >= 100_000);
    queries::catch_up(store, &["audit"]).await.unwrap();
    let expected = expected_audit(store).await;

    let text = export_text(store, AuditFilter::default(), 777).await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), expected.len(), "one line per auditable event");
    assert!(text.ends_with('\n'));
    for (line, (position, action, actor, tool, time)) in lines.iter().zip(&expected) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("invalid JSON {e}: {line}"));
        assert_eq!(v["v"], json!(1));
        assert_eq!(v["position"], json!(position), "stable order by position");
        assert_eq!((v["action"].as_str().unwrap(), v["actor"].as_str().unwrap()), (action.as_str(), actor.as_str()));
        assert_eq!(v["time"].as_str().unwrap(), time);
        let target_tool =
            v["target"]["tool"].as_str().or(v["target"]["id"].as_str().filter(|_| action.starts_with("tool.")));
        assert_eq!(target_tool, Some(tool.as_str()), "{line}");
        if action == "tool.updated" {
            assert_eq!(v["codeSha256"].as_str().map(str::len), Some(64), "{line}");
        }
    }
    for secret in SECRETS {
        assert!(!text.contains(secret), "secret {secret:?} leaked into the export");
    }
    assert!(text.contains(r#""password":"[REDACTED]""#) && text.contains("Bearer [REDACTED]"));
    assert_eq!(export_text(store, AuditFilter::default(), 5_000).await, text, "the same bytes whatever the page size");

    // Filters select exactly the lines they name.
    let positions = |text: &str| -> Vec<u64> {
        text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["position"].as_u64().unwrap()).collect()
    };
    let want = |f: &dyn Fn(&Expected) -> bool| -> Vec<u64> { expected.iter().filter(|e| f(e)).map(|e| e.0).collect() };
    let since = "2026-05-01T01:00:00.000000Z";
    let until = "2026-05-01T02:30:00.000000Z";
    let cases: Vec<(AuditFilter, Vec<u64>)> = vec![
        (AuditFilter { actor: Some("key:bob".into()), ..Default::default() }, want(&|e| e.2 == "key:bob")),
        (AuditFilter { tool: Some("beta".into()), ..Default::default() }, want(&|e| e.3 == "beta")),
        (
            AuditFilter { action: Some(ActionFilter::Exact("run.failed".into())), ..Default::default() },
            want(&|e| e.1 == "run.failed"),
        ),
        (
            AuditFilter { action: Some("tool.*".parse().unwrap()), ..Default::default() },
            want(&|e| e.1.starts_with("tool.")),
        ),
        (
            AuditFilter {
                since: Some(queries::parse_time(since).unwrap()),
                until: Some(queries::parse_time(until).unwrap()),
                ..Default::default()
            },
            want(&|e| e.4.as_str() >= since && e.4.as_str() < until),
        ),
        (
            AuditFilter {
                actor: Some("key:alice".into()),
                tool: Some("gamma".into()),
                action: Some("run.*".parse().unwrap()),
                since: Some(queries::parse_time(since).unwrap()),
                ..Default::default()
            },
            want(&|e| e.2 == "key:alice" && e.3 == "gamma" && e.1.starts_with("run.") && e.4.as_str() >= since),
        ),
        (AuditFilter { after: Some(expected[10].0), ..Default::default() }, want(&|e| e.0 > expected[10].0)),
        (AuditFilter { actor: Some("key:nobody".into()), ..Default::default() }, vec![]),
    ];
    for (filter, want) in cases {
        let got = positions(&export_text(store, filter.clone(), 333).await);
        assert!(!want.is_empty() || filter.actor.as_deref() == Some("key:nobody"), "{filter:?} selects something");
        assert_eq!(got, want, "{filter:?}");
    }
    assert!("run.exploded".parse::<ActionFilter>().is_err());
}

/// Every row of every table of every projection, as text, ordered by key.
async fn dump(store: &Store) -> Vec<(String, Vec<Vec<Option<String>>>)> {
    let mut out = Vec::new();
    let mut tx = store.begin_read().await.unwrap();
    for p in kiln_store::projections::all() {
        for t in p.tables() {
            let cols: Vec<String> = t.columns.iter().map(|c| format!("CAST({c} AS TEXT)")).collect();
            let keys: Vec<String> = t.key.iter().map(|c| format!("CAST({c} AS TEXT)")).collect();
            let sql = format!("SELECT {} FROM {} ORDER BY {}", cols.join(", "), t.name, keys.join(", "));
            out.push((t.name.to_owned(), tx.fetch_text_rows(&sql).await.unwrap()));
        }
    }
    tx.rollback().await.unwrap();
    out
}

async fn rebuilding_every_projection_gives_identical_read_models(db: TestDb) {
    use kiln_store::projection::{self, ProjectionRunner, RunnerOptions};
    let store = &db.store;
    // Live projections follow the log as it is written, in small batches that split runs.
    let live = ProjectionRunner::new(
        store.clone(),
        kiln_store::projections::all(),
        RunnerOptions { batch_size: 7, ..RunnerOptions::default() },
    );
    live.prepare().await.unwrap();
    publish(store, "alpha", 1, "1").await;
    publish(store, "beta", 1, "1").await;
    let parent = seed_run(store, Seed { tool: "alpha", actor: "key:a", ok: true, retries: 1, ..Seed::default() }).await;
    live.catch_up().await.unwrap();
    for i in 0..40 {
        let s = Seed {
            tool: if i % 2 == 0 { "alpha" } else { "beta" },
            actor: if i % 3 == 0 { "key:a" } else { "key:b" },
            arguments: secret_arguments(i),
            retries: (i % 3) as u32,
            ok: i % 4 != 0,
            parent: (i % 5 == 0).then_some(parent),
            replay_of: (i % 7 == 0).then_some(parent),
            ..Seed::default()
        };
        seed_run(store, s).await;
        if i % 6 == 0 {
            live.catch_up().await.unwrap();
            publish(store, "beta", 2 + i as u32 / 6, &format!("{i}")).await;
        }
    }
    live.catch_up().await.unwrap();
    let before = dump(store).await;
    let objects = schema_objects(store).await;
    assert!(before.iter().all(|(_, rows)| !rows.is_empty()), "every table has rows");
    // Twice: the second rebuild swaps out tables and indexes that the first one renamed, and
    // reads the log in pages of 7 events (read ahead of the writer, runs split across batches).
    for batch in [1_000, 7] {
        for p in kiln_store::projections::all() {
            let report = projection::verify(&live, p.as_ref(), batch).await.unwrap();
            assert!(report.ok(), "{}: {:?}", p.name(), report.differences);
            projection::rebuild(&live, p.as_ref(), batch, &|_, _| {}).await.unwrap();
        }
        assert_eq!(dump(store).await, before, "rebuilt read models are identical to the live ones");
        assert_eq!(schema_objects(store).await, objects, "the swap leaves the same tables and indexes, by name");
    }
    // The live runner carries on in the swapped-in tables.
    seed_run(store, Seed { tool: "beta", actor: "key:c", ok: false, retries: 2, ..Seed::default() }).await;
    live.catch_up().await.unwrap();
    for p in kiln_store::projections::all() {
        let report = projection::verify(&live, p.as_ref(), 1_000).await.unwrap();
        assert!(report.ok(), "{} after the swap: {:?}", p.name(), report.differences);
    }
    let by_c = RunFilter { actor: Some("key:c".into()), ..RunFilter::default() };
    let page = runs::list(store, &by_c, None, 10).await.unwrap();
    assert_eq!(page.runs.len(), 1, "the index-backed filters read the swapped-in table");
}

/// Every table and index of the database by name (renaming a scratch table must leave no
/// prefixed name behind, and rebuild every index the live table had).
async fn schema_objects(store: &Store) -> Vec<String> {
    let sql = match store.backend() {
        kiln_store::Backend::Sqlite => "SELECT type || ' ' || name || ' on ' || tbl_name FROM sqlite_master ORDER BY 1",
        _ => {
            "SELECT 'table ' || tablename FROM pg_tables WHERE schemaname = current_schema()
             UNION ALL SELECT 'index ' || indexname || ' on ' || tablename || ': ' || indexdef
             FROM pg_indexes WHERE schemaname = current_schema() ORDER BY 1"
        }
    };
    let mut tx = store.begin_read().await.unwrap();
    let rows = tx.fetch_text_rows(sql).await.unwrap();
    tx.rollback().await.unwrap();
    rows.into_iter().map(|r| r.into_iter().flatten().collect::<String>()).collect()
}

/// Row counts of the runs and audit read models, read in one transaction.
async fn counts(store: &Store) -> kiln_store::Result<Vec<Vec<Option<String>>>> {
    let mut tx = store.begin_read().await?;
    let sql = "SELECT CAST((SELECT COUNT(*) FROM runs) AS TEXT), CAST((SELECT COUNT(*) FROM audit_log) AS TEXT),
        CAST((SELECT COUNT(*) FROM audit_log WHERE actor = 'key:a') AS TEXT)";
    let rows = tx.fetch_text_rows(sql).await?;
    tx.rollback().await?;
    Ok(rows)
}

/// The swap renames tables and indexes under readers' feet: a reader must never fail on a table
/// that is being replaced, nor see it empty or half filled.
async fn readers_during_a_rebuild_see_the_whole_old_or_the_whole_new_read_model(db: TestDb) {
    use kiln_store::projection::{self, ProjectionRunner, RunnerOptions};
    let store = &db.store;
    let live = ProjectionRunner::new(store.clone(), kiln_store::projections::all(), RunnerOptions::default());
    live.prepare().await.unwrap();
    publish(store, "alpha", 1, "1").await;
    for i in 0..60 {
        let actor = if i % 2 == 0 { "key:a" } else { "key:b" };
        seed_run(store, Seed { tool: "alpha", actor, ok: i % 3 != 0, retries: 1, ..Seed::default() }).await;
    }
    live.catch_up().await.unwrap();
    let expected = counts(store).await.unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (store, done, expected) = (store.clone(), done.clone(), expected.clone());
        tokio::spawn(async move {
            let mut reads = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) || reads == 0 {
                assert_eq!(counts(&store).await.unwrap(), expected, "read {reads} during the rebuilds");
                reads += 1;
                tokio::task::yield_now().await;
            }
            reads
        })
    };
    for _ in 0..3 {
        for name in ["runs", "audit"] {
            let p = kiln_store::projections::by_name(name).unwrap();
            projection::rebuild(&live, p.as_ref(), 10, &|_, _| {}).await.unwrap();
        }
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let reads = reader.await.unwrap();
    assert!(reads > 0);
    assert_eq!(counts(store).await.unwrap(), expected);
}
