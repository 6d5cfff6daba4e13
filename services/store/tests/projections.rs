//! The projection framework and the tool catalog, against SQLite and PostgreSQL alike.

#![allow(clippy::unwrap_used)]

mod common;

use common::{TestDb, create_tool, domain, event, tool_definition};
use kiln_proto::events::{ToolDeleted, ToolDisabled, ToolEnabled, ToolVersionPublished};
use kiln_proto::{NewEvent, Position, StreamId, ToolName};
use kiln_store::projection::{self, Projection, ProjectionRunner, RunnerOptions, WriteTx};
use kiln_store::projections::ToolCatalog;
use kiln_store::{EventStore, ExpectedVersion, Store, StoreError};

kiln_store::backend_tests!(
    catalog_follows_a_tools_life,
    crash_between_handlers_and_checkpoint_then_resume_equals_clean_rebuild,
    rebuild_equals_live_after_10000_events,
    unknown_and_malformed_events_stop_the_projection_at_their_position,
    verify_reports_a_tampered_read_model,
    two_runners_apply_each_event_once,
    version_change_rebuilds_the_projection,
    runs_read_model_follows_attempts_and_outcomes,
);

fn run_events(run: kiln_proto::RunId, fail_first: bool, outcome_ok: bool) -> Vec<NewEvent> {
    use kiln_proto::events::*;
    let err =
        || RunError { kind: ErrorKind::Timeout, message: "slow".into(), name: None, stack: None, non_retryable: false };
    let now = kiln_proto::envelope::now_micros();
    let mut events = vec![
        domain(RunRequested {
            run_id: run,
            tool: name("add"),
            tool_version: 1,
            arguments: serde_json::json!({"a": 1}),
            idempotency_key: Some("k1".into()),
            parent_run: None,
            replay_of: None,
            reuse_steps_from: None,
        }),
        domain(RunAttemptStarted { attempt: 1, worker_id: "w".into(), lease_expires_at: now }),
    ];
    if fail_first {
        events.push(domain(RunAttemptFailed {
            attempt: 1,
            error: err(),
            retry: RetryDecision::Retry { delay_ms: 10, next_attempt_at: now },
        }));
        events.push(domain(RunAttemptStarted { attempt: 2, worker_id: "w".into(), lease_expires_at: now }));
    }
    let attempt = if fail_first { 2 } else { 1 };
    if outcome_ok {
        events.push(domain(RunSucceeded { attempt, output: serde_json::json!({"sum": 3}) }));
    } else {
        events.push(domain(RunAttemptFailed {
            attempt,
            error: err(),
            retry: RetryDecision::GiveUp { reason: "done".into() },
        }));
        events.push(domain(RunFailed { attempts: attempt, error: err() }));
    }
    events
}

async fn runs_read_model_follows_attempts_and_outcomes(db: TestDb) {
    let r = ProjectionRunner::new(db.store.clone(), kiln_store::projections::all(), RunnerOptions::default());
    r.prepare().await.unwrap();
    let (ok, bad) = (kiln_proto::RunId::new(), kiln_proto::RunId::new());
    let ok_events = run_events(ok, true, true);
    // Only the request and the first attempt: the run is in flight.
    append(&db.store, &format!("run-{ok}"), ok_events[..2].to_vec()).await;
    r.catch_up().await.unwrap();
    let row = |store: Store, id: kiln_proto::RunId| async move {
        let mut tx = store.begin_read().await.unwrap();
        let rows = tx
            .fetch_text_rows(&format!(
                "SELECT status, CAST(attempts AS TEXT), output, error, idempotency_key FROM runs WHERE run_id = '{id}'"
            ))
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        rows.into_iter().next().unwrap()
    };
    assert_eq!(row(db.store.clone(), ok).await[..2], [Some("running".into()), Some("1".into())]);
    append(&db.store, &format!("run-{ok}"), ok_events[2..].to_vec()).await;
    append(&db.store, &format!("run-{bad}"), run_events(bad, false, false)).await;
    r.catch_up().await.unwrap();
    let done = row(db.store.clone(), ok).await;
    assert_eq!(done[..3], [Some("succeeded".into()), Some("2".into()), Some(r#"{"sum":3}"#.into())]);
    assert_eq!(done[4].as_deref(), Some("k1"));
    let failed = row(db.store.clone(), bad).await;
    assert_eq!(failed[0].as_deref(), Some("failed"));
    assert!(failed[3].as_deref().unwrap().contains(r#""kind":"timeout""#));
    for p in kiln_store::projections::all() {
        let report = projection::verify(&r, p.as_ref(), 2).await.unwrap();
        assert!(report.ok(), "{}: {:?}", p.name(), report.differences);
    }
}

fn runner(store: &Store, options: RunnerOptions) -> ProjectionRunner {
    ProjectionRunner::new(store.clone(), vec![std::sync::Arc::new(ToolCatalog)], options)
}

async fn append(store: &Store, stream: &str, events: Vec<NewEvent>) {
    store.append(&StreamId::parse(stream).unwrap(), ExpectedVersion::Any, events).await.unwrap();
}

/// Rows of the live catalog as text, ordered by name.
async fn catalog_rows(store: &Store) -> Vec<Vec<Option<String>>> {
    let mut tx = store.begin_read().await.unwrap();
    let rows = tx
        .fetch_text_rows(
            "SELECT name, state, CAST(current_version AS TEXT), code_sha256, created_by, updated_by FROM tool_catalog ORDER BY name",
        )
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    rows
}

fn name(n: &str) -> ToolName {
    ToolName::parse(n).unwrap()
}

/// Events for `n` tools, each created, updated and toggled: about 6 events per tool.
fn many_tool_events(tools: usize) -> Vec<(String, Vec<NewEvent>)> {
    (0..tools)
        .map(|i| {
            let n = format!("tool{i}");
            let mut events = create_tool(&n, "return 1");
            let d = tool_definition(&n, &format!("return {i}"));
            events.push(domain(ToolVersionPublished {
                name: name(&n),
                version: 2,
                code_sha256: d.code_sha256(),
                definition: d,
            }));
            events.push(domain(ToolDisabled { name: name(&n), reason: None }));
            if i % 3 != 0 {
                events.push(domain(ToolEnabled { name: name(&n) }));
            }
            if i % 5 == 0 {
                events.push(domain(ToolDeleted { name: name(&n) }));
            }
            (format!("tool-{n}"), events)
        })
        .collect()
}

async fn catalog_follows_a_tools_life(db: TestDb) {
    let r = runner(&db.store, RunnerOptions::default());
    r.prepare().await.unwrap();
    append(&db.store, "tool-weather", create_tool("weather", "return 1")).await;
    r.catch_up().await.unwrap();
    let sha1 = tool_definition("weather", "return 1").code_sha256();
    let row = |state: &str, v: &str, sha: &str| {
        vec![vec![
            Some("weather".into()),
            Some(state.into()),
            Some(v.into()),
            Some(sha.into()),
            Some("key:test".into()),
            Some("key:test".into()),
        ]]
    };
    assert_eq!(catalog_rows(&db.store).await, row("enabled", "1", &sha1));

    let d2 = tool_definition("weather", "return 2");
    let sha2 = d2.code_sha256();
    append(
        &db.store,
        "tool-weather",
        vec![domain(ToolVersionPublished {
            name: name("weather"),
            version: 2,
            code_sha256: sha2.clone(),
            definition: d2,
        })],
    )
    .await;
    append(
        &db.store,
        "tool-weather",
        vec![domain(ToolDisabled { name: name("weather"), reason: Some("flaky".into()) })],
    )
    .await;
    r.catch_up().await.unwrap();
    assert_eq!(catalog_rows(&db.store).await, row("disabled", "2", &sha2));

    append(&db.store, "tool-weather", vec![domain(ToolEnabled { name: name("weather") })]).await;
    append(&db.store, "tool-weather", vec![domain(ToolDeleted { name: name("weather") })]).await;
    r.catch_up().await.unwrap();
    assert_eq!(catalog_rows(&db.store).await, row("deleted", "2", &sha2));
    assert_eq!(r.status()["tool_catalog"].position, 6);
}

async fn crash_between_handlers_and_checkpoint_then_resume_equals_clean_rebuild(db: TestDb) {
    for (stream, events) in many_tool_events(40) {
        append(&db.store, &stream, events).await;
    }
    let head = db.store.head().await.unwrap();
    let crash_at = Position(head.0 / 2);
    let crashing = runner(&db.store, RunnerOptions { batch_size: 7, fail_before_checkpoint_at: Some(crash_at) });
    crashing.prepare().await.unwrap();
    let err = crashing.catch_up().await.unwrap_err();
    assert!(err.to_string().contains(&format!("at position {}", crash_at.0)), "{err}");
    let stopped_at = crashing.status()["tool_catalog"].position;
    assert!(stopped_at < crash_at.0, "the failed batch must not be checkpointed");

    // Resume with a runner that does not crash: it continues from the checkpoint.
    let resumed = runner(&db.store, RunnerOptions { batch_size: 7, ..RunnerOptions::default() });
    resumed.catch_up().await.unwrap();
    let live = catalog_rows(&db.store).await;
    let report = projection::verify(&resumed, &ToolCatalog, 100).await.unwrap();
    assert!(report.ok(), "resumed read model differs from a clean rebuild: {:?}", report.differences);
    assert_eq!(report.position, head.0);
    assert_eq!(live.len(), 40);
}

async fn rebuild_equals_live_after_10000_events(db: TestDb) {
    let mut total = 0;
    let mut i = 0;
    while total < 10_000 {
        let batch: Vec<NewEvent> = many_tool_events(50)
            .into_iter()
            .enumerate()
            .flat_map(|(k, (_, events))| {
                // Give each generation of tools distinct names.
                events.into_iter().map(move |mut e| {
                    rename(&mut e, &format!("g{i}x{k}"));
                    e
                })
            })
            .collect();
        for chunk in batch.chunks(500) {
            total += chunk.len();
            append(&db.store, "tool-bulk", chunk.to_vec()).await;
        }
        i += 1;
    }
    let live = runner(&db.store, RunnerOptions { batch_size: 333, ..RunnerOptions::default() });
    live.prepare().await.unwrap();
    live.catch_up().await.unwrap();
    let before = full_dump(&db.store).await;
    let report = projection::verify(&live, &ToolCatalog, 1000).await.unwrap();
    assert!(report.ok(), "{:?}", report.differences);
    assert_eq!(report.position, total as u64);

    let progress = std::sync::Mutex::new(Vec::new());
    let at = projection::rebuild(&live, &ToolCatalog, 1000, &|done, head| progress.lock().unwrap().push((done, head)))
        .await
        .unwrap();
    assert_eq!(at.0, total as u64);
    assert_eq!(full_dump(&db.store).await, before, "rebuilt read model must be identical to the live one");
    let progress = progress.into_inner().unwrap();
    assert!(progress.len() >= 10 && progress.windows(2).all(|w| w[0].0 <= w[1].0), "progress is reported per batch");
}

/// Renames the tool an event is about (payload `name` and the definition's name).
fn rename(e: &mut NewEvent, suffix: &str) {
    if let Some(n) = e.payload.get("name").and_then(|n| n.as_str()).map(|n| format!("{n}{suffix}")) {
        e.payload["name"] = n.clone().into();
        if e.payload.get("definition").is_some() {
            e.payload["definition"]["name"] = n.into();
        }
    }
}

async fn full_dump(store: &Store) -> Vec<Vec<Option<String>>> {
    let mut tx = store.begin_read().await.unwrap();
    let cols: Vec<String> = ToolCatalog.tables()[0].columns.iter().map(|c| format!("CAST({c} AS TEXT)")).collect();
    let rows =
        tx.fetch_text_rows(&format!("SELECT {} FROM tool_catalog ORDER BY name", cols.join(", "))).await.unwrap();
    tx.rollback().await.unwrap();
    rows
}

async fn unknown_and_malformed_events_stop_the_projection_at_their_position(db: TestDb) {
    let r = runner(&db.store, RunnerOptions::default());
    r.prepare().await.unwrap();
    append(&db.store, "tool-a", create_tool("a", "return 1")).await;
    append(&db.store, "tool-b", vec![event("tool.exploded", 1)]).await;
    append(&db.store, "tool-c", create_tool("c", "return 1")).await;
    let err = r.catch_up().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "projection \"tool_catalog\" failed at position 3: unknown event type \"tool.exploded\" at position 3"
    );
    assert!(matches!(err, StoreError::Projection { position: 3, .. }));
    let status = &r.status()["tool_catalog"];
    assert!(status.error.as_deref().unwrap().contains("tool.exploded"));
    // Not skipped: the catalog stops before the bad event, and tool c is not applied.
    assert_eq!(catalog_rows(&db.store).await.len(), 1);
    assert_eq!(r.catch_up().await.unwrap_err().to_string(), err.to_string(), "it stays stopped");

    // A known type with a malformed payload is reported the same way.
    let db2 = db.another().await;
    let r2 = runner(&db2.store, RunnerOptions::default());
    r2.prepare().await.unwrap();
    let mut bad = event("tool.created", 1);
    bad.payload = serde_json::json!({"name": 42});
    append(&db2.store, "tool-x", vec![bad]).await;
    let err = r2.catch_up().await.unwrap_err();
    assert!(
        err.to_string().starts_with(
            "projection \"tool_catalog\" failed at position 1: malformed \"tool.created\" payload at position 1"
        ),
        "{err}"
    );
}

async fn verify_reports_a_tampered_read_model(db: TestDb) {
    let r = runner(&db.store, RunnerOptions::default());
    r.prepare().await.unwrap();
    append(&db.store, "tool-a", create_tool("a", "return 1")).await;
    append(&db.store, "tool-b", create_tool("b", "return 1")).await;
    r.catch_up().await.unwrap();
    assert!(projection::verify(&r, &ToolCatalog, 10).await.unwrap().ok());

    let mut tx = db.store.begin_write().await.unwrap();
    tx.execute_raw("UPDATE tool_catalog SET state = 'disabled' WHERE name = 'a'").await.unwrap();
    tx.execute_raw("DELETE FROM tool_catalog WHERE name = 'b'").await.unwrap();
    tx.commit().await.unwrap();
    let report = projection::verify(&r, &ToolCatalog, 10).await.unwrap();
    assert_eq!(report.differences.len(), 2, "{:?}", report.differences);
    assert!(matches!(&report.differences[0], projection::Difference::Changed { .. }));
    assert!(matches!(&report.differences[1], projection::Difference::MissingInLive { .. }));
    // No scratch tables are left behind.
    assert_eq!(scratch_tables(&db.store).await, 0);
}

async fn scratch_tables(store: &Store) -> i64 {
    let sql = match store.backend() {
        kiln_store::Backend::Sqlite => "SELECT COUNT(*) FROM sqlite_master WHERE name LIKE 'kiln_scratch_%'",
        kiln_store::Backend::Postgres => "SELECT COUNT(*) FROM pg_tables WHERE tablename LIKE 'kiln_scratch_%'",
    };
    let mut tx = store.begin_read().await.unwrap();
    let n = tx.fetch_int(&projection::Stmt::new(sql), &[]).await.unwrap().unwrap();
    tx.rollback().await.unwrap();
    n
}

/// Two runners (as two replicas would) over the same database apply each event exactly once.
async fn two_runners_apply_each_event_once(db: TestDb) {
    let other = db.reopen().await;
    let a = runner(&db.store, RunnerOptions { batch_size: 5, ..RunnerOptions::default() });
    let b = runner(&other, RunnerOptions { batch_size: 3, ..RunnerOptions::default() });
    a.prepare().await.unwrap();
    b.prepare().await.unwrap();
    for (stream, events) in many_tool_events(30) {
        append(&db.store, &stream, events).await;
    }
    let (ra, rb) = tokio::join!(a.catch_up(), b.catch_up());
    ra.unwrap();
    rb.unwrap();
    let report = projection::verify(&a, &ToolCatalog, 100).await.unwrap();
    assert!(report.ok(), "{:?}", report.differences);
}

#[derive(Debug)]
struct CatalogV2;

#[async_trait::async_trait]
impl Projection for CatalogV2 {
    fn name(&self) -> &'static str {
        "tool_catalog"
    }
    fn version(&self) -> u32 {
        2
    }
    fn tables(&self) -> &'static [projection::TableSpec] {
        ToolCatalog.tables()
    }
    async fn apply(
        &self,
        tx: &mut WriteTx,
        prefix: &str,
        e: &kiln_proto::RecordedEvent,
        d: &kiln_proto::DomainEvent,
    ) -> kiln_store::Result<()> {
        ToolCatalog.apply(tx, prefix, e, d).await
    }
}

async fn version_change_rebuilds_the_projection(db: TestDb) {
    let v1 = runner(&db.store, RunnerOptions::default());
    v1.prepare().await.unwrap();
    append(&db.store, "tool-a", create_tool("a", "return 1")).await;
    v1.catch_up().await.unwrap();
    let before = full_dump(&db.store).await;
    let v2 = ProjectionRunner::new(db.store.clone(), vec![std::sync::Arc::new(CatalogV2)], RunnerOptions::default());
    v2.prepare().await.unwrap();
    assert!(catalog_rows(&db.store).await.is_empty(), "a new version starts from an empty read model");
    v2.catch_up().await.unwrap();
    assert_eq!(full_dump(&db.store).await, before);
}
