//! The run engine against the real sandbox, on SQLite and PostgreSQL: requests, attempts,
//! retries, durable steps, fencing and lease expiry. Queueing is not involved: tests call
//! `execute` the way a queue worker would.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use kiln_proto::events::{RetryDecision, RunAttemptStarted, RunCancelled, ToolDisabled};
use kiln_proto::run::RunStatus;
use kiln_proto::{Actor, DomainEvent, EventMetadata, NewEvent, RunId, StreamId, StreamVersion, ToolName};
use kiln_store::testing::TestDb;
use kiln_store::{EventStore, ExpectedVersion};
use kiln_worker::runs::{AttemptOutcome, Cancelled, RequestError, RunEngine, RunRequest};
use kiln_worker::testing::{SideEffects, create_tool, events, request, types};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

kiln_store::backend_tests!(
    a_run_records_its_request_attempt_and_output,
    bad_requests_are_refused_and_record_nothing,
    an_idempotency_key_names_one_run_per_actor,
    retries_follow_the_policy_and_each_decision_is_recorded,
    non_retryable_errors_stop_at_once,
    completed_steps_do_not_run_again_on_retry,
    a_step_key_used_twice_is_an_error,
    a_stale_attempt_cannot_record_anything,
    an_expired_lease_is_taken_over,
    a_queued_run_can_be_cancelled_and_never_starts,
    a_running_run_is_stopped_by_cancellation,
    a_parent_waits_for_its_child_and_gets_its_output,
    a_child_failure_surfaces_in_the_parent,
    recursion_beyond_the_depth_limit_and_cycles_are_refused,
);

/// An engine on the tests' small sandbox (2 processes per tool): child runs must not wait for
/// processes their parents hold.
fn engine(db: &TestDb) -> RunEngine {
    RunEngine::new(db.store.clone(), Arc::new(common::sandbox()), "test-worker")
}

/// Executes until the run ends, waiting out scheduled retries as a queue would.
async fn run_to_end(engine: &RunEngine, run: RunId) -> RunStatus {
    for _ in 0..20 {
        match engine.execute(run, CancellationToken::new()).await.unwrap() {
            AttemptOutcome::Finished(status) => return status,
            AttemptOutcome::RetryAt(at) => {
                let wait = (at - kiln_proto::envelope::now_micros()).to_std().unwrap_or_default();
                tokio::time::sleep(wait).await;
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    panic!("run {run} did not end in 20 attempts");
}

async fn a_run_records_its_request_attempt_and_output(db: TestDb) {
    create_tool(&db.store, json!({"name": "multiply", "description": "x*y", "code": "(args) => args.x * args.y"}))
        .await;
    let engine = engine(&db);
    let requested = engine.request(request("multiply", json!({"x": 6, "y": 7}))).await.unwrap();
    assert_eq!((requested.tool_version, requested.existing), (1, false));
    assert_eq!(run_to_end(&engine, requested.run_id).await, RunStatus::Succeeded);
    let evs = events(&db.store, requested.run_id).await;
    assert_eq!(types(&evs), ["run.requested", "run.attempt_started", "run.succeeded"]);
    let DomainEvent::RunSucceeded(s) = &evs[2] else { unreachable!() };
    assert_eq!(s.output, json!({"result": 42}), "non-object results are wrapped");
    // Executing an ended run changes nothing.
    let again = engine.execute(requested.run_id, CancellationToken::new()).await.unwrap();
    assert_eq!(again, AttemptOutcome::Finished(RunStatus::Succeeded));
    assert_eq!(events(&db.store, requested.run_id).await.len(), 3);
    // Request metadata: the requester's actor, the worker's actor on what it recorded.
    let recorded = db.store.read_stream(&StreamId::run(requested.run_id), StreamVersion(0), 10).await.unwrap();
    assert_eq!(recorded[0].metadata.actor.as_str(), "key:tester");
    assert_eq!(recorded[1].metadata.actor.as_str(), "system:worker");
    assert_eq!(recorded[1].metadata.correlation_id, recorded[0].metadata.correlation_id);
}

async fn bad_requests_are_refused_and_record_nothing(db: TestDb) {
    let schema = json!({
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
        "required": ["city"]
    });
    create_tool(&db.store, json!({"name": "weather", "description": "d", "code": "return 1", "inputSchema": schema}))
        .await;
    let engine = engine(&db);
    let head = db.store.head().await.unwrap();
    let err = engine.request(request("weather", json!({"days": 0}))).await.unwrap_err();
    let RequestError::InvalidArguments(invalid) = &err else { panic!("{err}") };
    assert_eq!(invalid.violations.len(), 2, "{err}");
    let err = engine.request(request("nope", json!({}))).await.unwrap_err();
    assert_eq!(err.to_string(), "unknown tool \"nope\"");
    let mut r = request("weather", json!({"city": "Oslo"}));
    r.version = Some(7);
    assert_eq!(engine.request(r).await.unwrap_err().to_string(), "tool \"weather\" has no version 7 (latest is 1)");
    let name = ToolName::parse("weather").unwrap();
    let disabled = NewEvent::from_domain(
        &ToolDisabled { name: name.clone(), reason: None }.into(),
        EventMetadata::new(Actor::local()),
    );
    db.store.append(&StreamId::tool(&name), ExpectedVersion::Any, vec![disabled]).await.unwrap();
    let head_after_disable = db.store.head().await.unwrap();
    assert_eq!(head_after_disable.0, head.0 + 1);
    let err = engine.request(request("weather", json!({"city": "Oslo"}))).await.unwrap_err();
    assert_eq!(err.to_string(), "tool \"weather\" is disabled; enable it to run it");
    assert_eq!(db.store.head().await.unwrap(), head_after_disable, "refused requests record nothing");
}

async fn an_idempotency_key_names_one_run_per_actor(db: TestDb) {
    create_tool(&db.store, json!({"name": "add", "description": "d", "code": "(a) => a.x + 1"})).await;
    let engine = engine(&db);
    let keyed = |x: i64| RunRequest { idempotency_key: Some("order-17".into()), ..request("add", json!({"x": x})) };
    let first = engine.request(keyed(1)).await.unwrap();
    let second = engine.request(keyed(1)).await.unwrap();
    assert_eq!(second.run_id, first.run_id);
    assert!(second.existing && !first.existing);
    let err = engine.request(keyed(2)).await.unwrap_err();
    assert!(matches!(err, RequestError::KeyReused { run_id, .. } if run_id == first.run_id), "{err}");
    let other_actor = RunRequest { actor: Actor::parse("key:someone-else").unwrap(), ..keyed(1) };
    assert_ne!(engine.request(other_actor).await.unwrap().run_id, first.run_id);
    // Concurrent requests with one key make one run.
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (engine, r) = (
                engine.clone(),
                RunRequest { idempotency_key: Some("burst".into()), ..request("add", json!({"x": 5})) },
            );
            tokio::spawn(async move { engine.request(r).await.unwrap().run_id })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
}

async fn retries_follow_the_policy_and_each_decision_is_recorded(db: TestDb) {
    create_tool(
        &db.store,
        json!({
            "name": "flaky", "description": "d",
            "code": "(args, ctx) => { throw new Error('attempt ' + ctx.attempt + ' failed'); }",
            "retry": {"maxAttempts": 3, "initialDelayMs": 20, "backoffFactor": 2, "maxDelayMs": 1000}
        }),
    )
    .await;
    let engine = engine(&db);
    let run = engine.request(request("flaky", json!({}))).await.unwrap().run_id;
    assert_eq!(run_to_end(&engine, run).await, RunStatus::Failed);
    let evs = events(&db.store, run).await;
    assert_eq!(
        types(&evs),
        [
            "run.requested",
            "run.attempt_started",
            "run.attempt_failed",
            "run.attempt_started",
            "run.attempt_failed",
            "run.attempt_started",
            "run.attempt_failed",
            "run.failed",
        ]
    );
    let decisions: Vec<&RetryDecision> = evs
        .iter()
        .filter_map(|e| match e {
            DomainEvent::RunAttemptFailed(f) => Some(&f.retry),
            _ => None,
        })
        .collect();
    let delay = |d: &RetryDecision| match d {
        RetryDecision::Retry { delay_ms, .. } => *delay_ms,
        _ => panic!("{d:?}"),
    };
    assert!((16..=24).contains(&delay(decisions[0])), "first delay is 20 ms +-20%: {decisions:?}");
    assert!((32..=48).contains(&delay(decisions[1])), "second delay is 40 ms +-20%: {decisions:?}");
    assert_eq!(decisions[2], &RetryDecision::GiveUp { reason: "attempt 3 of 3 failed".into() });
    let DomainEvent::RunAttemptFailed(last) = &evs[6] else { unreachable!() };
    assert_eq!(last.error.message, "attempt 3 failed");
    // Attempts follow their schedule: each starts no earlier than its recorded time.
    let recorded = db.store.read_stream(&StreamId::run(run), StreamVersion(0), 100).await.unwrap();
    for (failed, next) in [(2usize, 3usize), (4, 5)] {
        let DomainEvent::RunAttemptFailed(f) = recorded[failed].decode().unwrap() else { unreachable!() };
        let RetryDecision::Retry { next_attempt_at, .. } = f.retry else { unreachable!() };
        assert!(recorded[next].occurred_at >= next_attempt_at);
    }
}

async fn non_retryable_errors_stop_at_once(db: TestDb) {
    let retry = json!({"maxAttempts": 5, "initialDelayMs": 0});
    create_tool(&db.store, json!({"name": "refuses", "description": "d", "code": "(a, ctx) => ctx.fail('bad input: no city')", "retry": retry})).await;
    create_tool(&db.store, json!({"name": "snoops", "description": "d", "code": "return Deno.readTextFileSync('/etc/passwd')", "retry": retry})).await;
    let engine = engine(&db);
    for (tool, kind, marked) in [("refuses", "user_error", true), ("snoops", "permission_denied", false)] {
        let run = engine.request(request(tool, json!({}))).await.unwrap().run_id;
        assert_eq!(run_to_end(&engine, run).await, RunStatus::Failed, "{tool}");
        let evs = events(&db.store, run).await;
        assert_eq!(types(&evs), ["run.requested", "run.attempt_started", "run.attempt_failed", "run.failed"], "{tool}");
        let DomainEvent::RunFailed(f) = &evs[3] else { unreachable!() };
        assert_eq!(f.error.kind.as_str(), kind, "{tool}");
        assert_eq!(f.error.non_retryable, marked, "{tool}: ctx.fail marks the error non-retryable");
    }
}

async fn completed_steps_do_not_run_again_on_retry(db: TestDb) {
    let effects = SideEffects::start().await;
    let port = effects.port;
    let code = format!(
        r#"
        export default async function (args, ctx) {{
          const a = await ctx.step("a", async () => (await (await fetch("http://127.0.0.1:{port}/a")).json()).count);
          if (ctx.attempt === 1) throw new Error("crash between steps");
          const b = await ctx.step("b", async () => (await (await fetch("http://127.0.0.1:{port}/b")).json()).count);
          return {{ a, b, attempt: ctx.attempt }};
        }}"#
    );
    create_tool(
        &db.store,
        json!({
            "name": "twostep", "description": "d", "code": code,
            "permissions": {"network": [format!("127.0.0.1:{port}")]},
            "retry": {"maxAttempts": 3, "initialDelayMs": 0}
        }),
    )
    .await;
    let engine = engine(&db);
    let run = engine.request(request("twostep", json!({}))).await.unwrap().run_id;
    assert_eq!(run_to_end(&engine, run).await, RunStatus::Succeeded);
    let evs = events(&db.store, run).await;
    let DomainEvent::RunSucceeded(s) = evs.last().unwrap() else { panic!("{:?}", types(&evs)) };
    assert_eq!(s.output, json!({"a": 1, "b": 1, "attempt": 2}));
    assert_eq!((effects.count("/a"), effects.count("/b")), (1, 1), "each step's side effect happened exactly once");
    assert_eq!(types(&evs).iter().filter(|t| **t == "run.step_completed").count(), 2);
}

async fn a_step_key_used_twice_is_an_error(db: TestDb) {
    create_tool(
        &db.store,
        json!({
            "name": "dupe", "description": "d",
            "code": "await ctx.step('k', () => 1); await ctx.step('k', () => 2); return 0;",
            "retry": {"maxAttempts": 1}
        }),
    )
    .await;
    let engine = engine(&db);
    let run = engine.request(request("dupe", json!({}))).await.unwrap().run_id;
    assert_eq!(run_to_end(&engine, run).await, RunStatus::Failed);
    let evs = events(&db.store, run).await;
    let DomainEvent::RunFailed(f) = evs.last().unwrap() else { unreachable!() };
    assert!(f.error.message.contains("step key \"k\" is used twice"), "{}", f.error.message);
}

async fn a_stale_attempt_cannot_record_anything(db: TestDb) {
    // A gate: the tool's step blocks on it until the test has moved the run on.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (arrived_tx, arrived_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let _ = conn.read(&mut buf).await;
        let _ = arrived_tx.send(());
        let _ = release_rx.await;
        let body = "{}";
        let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
        let _ = conn.write_all(resp.as_bytes()).await;
    });
    create_tool(&db.store, json!({
        "name": "slow", "description": "d",
        "code": format!("await ctx.step('wait', async () => (await fetch('http://127.0.0.1:{port}/')).status); return 1;"),
        "permissions": {"network": [format!("127.0.0.1:{port}")]}
    })).await;
    let engine = engine(&db);
    let run = engine.request(request("slow", json!({}))).await.unwrap().run_id;
    let executing = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.execute(run, CancellationToken::new()).await.unwrap() })
    };
    arrived_rx.await.unwrap();
    // Meanwhile the run moves on without this worker (here: someone cancels it).
    let cancel = NewEvent::from_domain(
        &RunCancelled { reason: Some("test".into()), cancelled_by: None }.into(),
        EventMetadata::new(Actor::local()),
    );
    db.store.append(&StreamId::run(run), ExpectedVersion::Exact(StreamVersion(2)), vec![cancel]).await.unwrap();
    release_tx.send(()).unwrap();
    assert_eq!(executing.await.unwrap(), AttemptOutcome::Fenced);
    let evs = events(&db.store, run).await;
    assert_eq!(
        types(&evs),
        ["run.requested", "run.attempt_started", "run.cancelled"],
        "the stale worker recorded nothing"
    );
}

async fn an_expired_lease_is_taken_over(db: TestDb) {
    create_tool(&db.store, json!({"name": "ok", "description": "d", "code": "return {done: true}"})).await;
    let engine = engine(&db);
    let run = engine.request(request("ok", json!({}))).await.unwrap().run_id;
    let past = kiln_proto::envelope::now_micros() - chrono::Duration::seconds(5);
    let future = kiln_proto::envelope::now_micros() + chrono::Duration::seconds(60);
    let start = |lease| {
        NewEvent::from_domain(
            &RunAttemptStarted { attempt: 1, worker_id: "dead-worker".into(), lease_expires_at: lease }.into(),
            EventMetadata::new(Actor::system("worker")),
        )
    };
    // A live lease held by another worker: hands off.
    let other = db.another().await;
    let live = RunEngine::new(other.store.clone(), Arc::new(common::sandbox()), "w");
    create_tool(&other.store, json!({"name": "ok", "description": "d", "code": "return {done: true}"})).await;
    let held = live.request(request("ok", json!({}))).await.unwrap().run_id;
    other
        .store
        .append(&StreamId::run(held), ExpectedVersion::Exact(StreamVersion(1)), vec![start(future)])
        .await
        .unwrap();
    assert_eq!(live.execute(held, CancellationToken::new()).await.unwrap(), AttemptOutcome::Leased { until: future });
    // An expired one: the dead worker's attempt is recorded as failed, and the run goes on.
    db.store.append(&StreamId::run(run), ExpectedVersion::Exact(StreamVersion(1)), vec![start(past)]).await.unwrap();
    assert_eq!(run_to_end(&engine, run).await, RunStatus::Succeeded);
    let evs = events(&db.store, run).await;
    assert_eq!(
        types(&evs),
        ["run.requested", "run.attempt_started", "run.attempt_failed", "run.attempt_started", "run.succeeded"]
    );
    let DomainEvent::RunAttemptFailed(f) = &evs[2] else { unreachable!() };
    assert_eq!(f.error.message, "worker dead-worker lost its lease on attempt 1");
    assert_eq!(f.error.kind.as_str(), "sandbox_crash");
}

async fn a_queued_run_can_be_cancelled_and_never_starts(db: TestDb) {
    create_tool(&db.store, json!({"name": "ok", "description": "d", "code": "return {}"})).await;
    let engine = engine(&db);
    let run = engine.request(request("ok", json!({}))).await.unwrap().run_id;
    let boss = Actor::parse("key:boss").unwrap();
    assert_eq!(engine.cancel(run, boss.clone(), Some("changed my mind".into())).await.unwrap(), Cancelled::Cancelled);
    assert_eq!(
        engine.execute(run, CancellationToken::new()).await.unwrap(),
        AttemptOutcome::Finished(RunStatus::Cancelled)
    );
    assert_eq!(engine.cancel(run, boss.clone(), None).await.unwrap(), Cancelled::AlreadyEnded(RunStatus::Cancelled));
    let recorded = db.store.read_stream(&StreamId::run(run), StreamVersion(0), 10).await.unwrap();
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[1].metadata.actor, boss, "the event records who cancelled");
    let DomainEvent::RunCancelled(c) = recorded[1].decode().unwrap() else { unreachable!() };
    assert_eq!((c.cancelled_by, c.reason.as_deref()), (Some(boss), Some("changed my mind")));
}

async fn a_running_run_is_stopped_by_cancellation(db: TestDb) {
    create_tool(
        &db.store,
        json!({
            "name": "sleeper", "description": "d",
            "code": "await new Promise((r) => setTimeout(r, 60000)); return {}",
            "limits": {"timeoutMs": 120000}
        }),
    )
    .await;
    let engine = engine(&db);
    let run = engine.request(request("sleeper", json!({}))).await.unwrap().run_id;
    let executing = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.execute(run, CancellationToken::new()).await.unwrap() })
    };
    // Wait for the attempt to be recorded as started: the run is now running.
    for _ in 0..500 {
        if events(&db.store, run).await.len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(engine.cancel(run, Actor::local(), None).await.unwrap(), Cancelled::Cancelled);
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(20), executing).await.expect("stopped promptly");
    assert_eq!(outcome.unwrap(), AttemptOutcome::Fenced);
    assert_eq!(types(&events(&db.store, run).await), ["run.requested", "run.attempt_started", "run.cancelled"]);
}

async fn a_parent_waits_for_its_child_and_gets_its_output(db: TestDb) {
    create_tool(&db.store, json!({"name": "double", "description": "d", "code": "(a) => a.x * 2"})).await;
    create_tool(
        &db.store,
        json!({
            "name": "parent", "description": "d",
            "code": "export default async (args, ctx) => ({ got: await ctx.tools.call('double', { x: args.x }) })"
        }),
    )
    .await;
    let engine = engine(&db);
    let run = engine.request(request("parent", json!({"x": 3}))).await.unwrap().run_id;
    assert_eq!(run_to_end(&engine, run).await, RunStatus::Succeeded);
    let evs = events(&db.store, run).await;
    let DomainEvent::RunSucceeded(s) = evs.last().unwrap() else { unreachable!() };
    assert_eq!(s.output, json!({"got": {"result": 6}}));
    let DomainEvent::RunStepCompleted(journal) = &evs[2] else { panic!("{:?}", types(&evs)) };
    assert_eq!(journal.key, "tools.call#1");
    let child: RunId = journal.result["runId"].as_str().unwrap().parse().unwrap();
    let DomainEvent::RunRequested(child_request) = &events(&db.store, child).await[0] else { unreachable!() };
    assert_eq!(child_request.parent_run, Some(run));
    assert_eq!(child_request.tool.as_str(), "double");
}

async fn a_child_failure_surfaces_in_the_parent(db: TestDb) {
    let once = json!({"maxAttempts": 1});
    create_tool(
        &db.store,
        json!({"name": "broken", "description": "d", "code": "throw new Error('no such city')", "retry": once}),
    )
    .await;
    create_tool(
        &db.store,
        json!({
            "name": "caller", "description": "d", "retry": once,
            "code": "return await ctx.tools.call('broken', {})"
        }),
    )
    .await;
    let engine = engine(&db);
    let run = engine.request(request("caller", json!({}))).await.unwrap().run_id;
    assert_eq!(run_to_end(&engine, run).await, RunStatus::Failed);
    let DomainEvent::RunFailed(f) = events(&db.store, run).await.last().cloned().unwrap() else { unreachable!() };
    assert!(f.error.message.contains("failed: no such city"), "{}", f.error.message);
}

async fn recursion_beyond_the_depth_limit_and_cycles_are_refused(db: TestDb) {
    let once = json!({"maxAttempts": 1});
    create_tool(&db.store, json!({
        "name": "recur", "description": "d", "retry": once,
        "code": "if (args.n === 0) return { depth: 0 }; const r = await ctx.tools.call('recur', { n: args.n - 1 }); return { depth: r.depth + 1 };"
    })).await;
    create_tool(
        &db.store,
        json!({
            "name": "forever", "description": "d", "retry": once,
            "code": "return await ctx.tools.call('forever', args)"
        }),
    )
    .await;
    let engine = engine(&db).with_max_depth(3);
    let shallow = engine.request(request("recur", json!({"n": 2}))).await.unwrap().run_id;
    assert_eq!(run_to_end(&engine, shallow).await, RunStatus::Succeeded);
    let DomainEvent::RunSucceeded(s) = events(&db.store, shallow).await.last().cloned().unwrap() else {
        unreachable!()
    };
    assert_eq!(s.output, json!({"depth": 2}));

    let deep = engine.request(request("recur", json!({"n": 5}))).await.unwrap().run_id;
    assert_eq!(run_to_end(&engine, deep).await, RunStatus::Failed);
    let DomainEvent::RunFailed(f) = events(&db.store, deep).await.last().cloned().unwrap() else { unreachable!() };
    assert!(f.error.message.contains("would nest runs 4 deep; the limit is 3"), "{}", f.error.message);

    let cycle = engine.request(request("forever", json!({"same": true}))).await.unwrap().run_id;
    assert_eq!(run_to_end(&engine, cycle).await, RunStatus::Failed);
    let DomainEvent::RunFailed(f) = events(&db.store, cycle).await.last().cloned().unwrap() else { unreachable!() };
    assert!(f.error.message.contains("a cycle that would never end"), "{}", f.error.message);
}
