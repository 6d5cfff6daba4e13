//! Queue workers (apalis) in this process, on SQLite and PostgreSQL, with the real sandbox:
//! requested runs are claimed and executed, retries are re-queued with their due time,
//! cancellation stops queued and running runs (also from another engine, as from another
//! process), drain hands back what it cannot finish, and stranded runs are re-queued.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use kiln_proto::events::RetryDecision;
use kiln_proto::{Actor, DomainEvent, RunId};
use kiln_store::projection::{ProjectionRunner, RunnerOptions};
use kiln_store::testing::TestDb;
use kiln_store::{EventStore, QueueOp, Store, projections};
use kiln_worker::queue::{LocalWorker, WorkerConfig, requeue_stranded};
use kiln_worker::runs::{Cancelled, RunEngine, RunUpdate, RunView};
use kiln_worker::testing::{SideEffects, create_tool, events, request, terminal_count, types};
use serde_json::json;
use tokio_util::sync::CancellationToken;

kiln_store::backend_tests!(
    requested_runs_are_executed_by_the_worker,
    watchers_see_logs_progress_and_the_end,
    a_retry_due_later_is_queued_with_its_due_time,
    a_queued_run_is_cancelled_and_its_job_removed,
    a_running_run_is_stopped_by_a_cancel_from_another_process,
    drain_finishes_short_runs_and_hands_back_long_ones,
    a_stranded_run_is_queued_again,
    runs_requested_here_go_straight_to_this_process_worker_while_it_has_slots,
    a_draining_worker_hands_back_runs_handed_to_it,
);

fn config() -> WorkerConfig {
    WorkerConfig {
        concurrency: 4,
        poll_interval: Duration::from_millis(200),
        drain_timeout: Duration::from_secs(10),
        ..WorkerConfig::default()
    }
}

/// Workers in the background until the returned token is cancelled.
fn start_workers(store: &Store, config: WorkerConfig) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    // RUST_LOG=kiln_worker=debug shows the workers' decisions when a test fails.
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).try_init();
    let shutdown = CancellationToken::new();
    let sandbox = Arc::new(common::sandbox());
    let handle = tokio::spawn(kiln_worker::queue::run(store.clone(), sandbox, config, shutdown.clone()));
    (shutdown, handle)
}

/// Workers in the background that also take runs handed over through `local`.
fn start_local_workers(
    store: &Store,
    config: WorkerConfig,
    local: &LocalWorker,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).try_init();
    let shutdown = CancellationToken::new();
    let sandbox = Arc::new(common::sandbox());
    let run = kiln_worker::queue::run_with_local(store.clone(), sandbox, config, local.clone(), shutdown.clone());
    (shutdown, tokio::spawn(run))
}

/// An engine that requests and watches, like the API (no sandbox use).
fn client(store: &Store) -> RunEngine {
    RunEngine::new(store.clone(), Arc::new(common::sandbox()), "api")
}

async fn wait_end(engine: &RunEngine, run: RunId) -> RunView {
    let mut watch = engine.watch(run).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match watch.next().await {
                Some(RunUpdate::Ended(view)) => return *view,
                Some(_) => {}
                None => panic!("watch ended without the run's end"),
            }
        }
    });
    ended.await.unwrap_or_else(|_| panic!("run {run} did not end within 60 s"))
}

async fn requested_runs_are_executed_by_the_worker(db: TestDb) {
    create_tool(&db.store, json!({"name": "double", "description": "2x", "code": "(a) => ({ y: a.x * 2 })"})).await;
    let (shutdown, workers) = start_workers(&db.store, config());
    let api = client(&db.store);
    let mut runs = vec![];
    for x in 0..20 {
        runs.push(api.request(request("double", json!({"x": x}))).await.unwrap().run_id);
    }
    for (x, run) in runs.iter().enumerate() {
        let view = wait_end(&api, *run).await;
        assert_eq!((view.status, view.output), ("succeeded", Some(json!({"y": x * 2}))));
        let evs = events(&db.store, *run).await;
        assert_eq!(types(&evs), ["run.requested", "run.attempt_started", "run.succeeded"]);
    }
    assert!(db.store.queue_depth().await.unwrap().is_empty(), "ended runs leave no job rows");
    shutdown.cancel();
    workers.await.unwrap();
}

async fn watchers_see_logs_progress_and_the_end(db: TestDb) {
    let code = "export default async (a, ctx) => { ctx.log('info', 'starting'); ctx.progress(1, 2, 'half'); \
                await new Promise(r => setTimeout(r, 300)); ctx.log('warn', 'done soon'); return { ok: true }; }";
    create_tool(&db.store, json!({"name": "chatty", "description": "logs", "code": code})).await;
    let api = client(&db.store);
    let run = api.request(request("chatty", json!({}))).await.unwrap().run_id;
    let mut watch = api.watch(run).await.unwrap();
    let (shutdown, workers) = start_workers(&db.store, config());
    let mut seen = vec![];
    let view = loop {
        match tokio::time::timeout(Duration::from_secs(60), watch.next()).await.unwrap().unwrap() {
            RunUpdate::Ended(view) => break view,
            other => seen.push(other),
        }
    };
    assert_eq!(view.status, "succeeded");
    assert_eq!(
        seen,
        [
            RunUpdate::Log { attempt: 1, level: "info".into(), message: "starting".into() },
            RunUpdate::Progress { progress: 1.0, total: Some(2.0), message: Some("half".into()) },
            RunUpdate::Log { attempt: 1, level: "warn".into(), message: "done soon".into() },
        ]
    );
    let evs = events(&db.store, run).await;
    assert_eq!(types(&evs), ["run.requested", "run.attempt_started", "run.logs", "run.succeeded"]);
    let DomainEvent::RunLogs(logs) = &evs[2] else { unreachable!() };
    assert_eq!(logs.entries.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(), ["starting", "done soon"]);
    assert!(watch.next().await.is_none(), "nothing follows the end");
    shutdown.cancel();
    workers.await.unwrap();
}

async fn a_retry_due_later_is_queued_with_its_due_time(db: TestDb) {
    // Attempt 1 fails; the retry is 2.5 s out, beyond what a worker waits for in place.
    let code = "export default async (a, ctx) => { if (ctx.attempt === 1) throw new Error('flaky'); return { attempt: ctx.attempt }; }";
    let retry = json!({"maxAttempts": 3, "initialDelayMs": 2500, "backoffFactor": 1, "maxDelayMs": 2500});
    create_tool(&db.store, json!({"name": "flaky", "description": "d", "code": code, "retry": retry})).await;
    let (shutdown, workers) = start_workers(&db.store, config());
    let api = client(&db.store);
    let run = api.request(request("flaky", json!({}))).await.unwrap().run_id;
    let view = wait_end(&api, run).await;
    assert_eq!(view.output, Some(json!({"attempt": 2})));
    let evs = events(&db.store, run).await;
    assert_eq!(
        types(&evs),
        ["run.requested", "run.attempt_started", "run.attempt_failed", "run.attempt_started", "run.succeeded"]
    );
    let DomainEvent::RunAttemptFailed(failed) = &evs[2] else { unreachable!() };
    let RetryDecision::Retry { next_attempt_at, delay_ms } = failed.retry.clone() else { panic!("{failed:?}") };
    assert!((2000..=3000).contains(&delay_ms), "jittered 2.5 s: {delay_ms}");
    let DomainEvent::RunAttemptStarted(second) = &evs[3] else { unreachable!() };
    let started = db.store.read_stream(&kiln_proto::StreamId::run(run), kiln_proto::StreamVersion(3), 1).await;
    assert!(started.unwrap()[0].occurred_at >= next_attempt_at, "attempt 2 started no earlier than it was due");
    assert_eq!(second.attempt, 2);
    shutdown.cancel();
    workers.await.unwrap();
}

async fn a_queued_run_is_cancelled_and_its_job_removed(db: TestDb) {
    create_tool(&db.store, json!({"name": "noop", "description": "d", "code": "() => 1"})).await;
    let api = client(&db.store);
    let run = api.request(request("noop", json!({}))).await.unwrap().run_id;
    assert!(db.store.has_job(run).await.unwrap());
    let who = Actor::parse("key:operator").unwrap();
    assert_eq!(api.cancel(run, who.clone(), Some("not needed".into())).await.unwrap(), Cancelled::Cancelled);
    assert!(!db.store.has_job(run).await.unwrap(), "the cancel removed the queued job");
    let (shutdown, workers) = start_workers(&db.store, config());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let evs = events(&db.store, run).await;
    assert_eq!(types(&evs), ["run.requested", "run.cancelled"], "never started");
    let DomainEvent::RunCancelled(c) = &evs[1] else { unreachable!() };
    assert_eq!(c.cancelled_by.as_ref(), Some(&who));
    shutdown.cancel();
    workers.await.unwrap();
}

async fn a_running_run_is_stopped_by_a_cancel_from_another_process(db: TestDb) {
    let effects = SideEffects::start().await;
    let code = format!(
        "export default async (a, ctx) => {{ await fetch('http://{}/gate'); return {{ finished: true }}; }}",
        effects.host()
    );
    let permissions = json!({"network": [effects.host()]});
    create_tool(&db.store, json!({"name": "held", "description": "d", "code": code, "permissions": permissions})).await;
    let (shutdown, workers) = start_workers(&db.store, config());
    let api = client(&db.store);
    let run = api.request(request("held", json!({}))).await.unwrap().run_id;
    common::eventually("the tool reached the gate", || effects.count("/gate") == 1).await;
    // `api` is not the worker's engine: the worker learns of the cancel from the log alone.
    assert_eq!(api.cancel(run, Actor::local(), None).await.unwrap(), Cancelled::Cancelled);
    let view = wait_end(&api, run).await;
    assert_eq!(view.status, "cancelled");
    tokio::time::sleep(Duration::from_millis(300)).await;
    effects.open_gate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let evs = events(&db.store, run).await;
    assert_eq!(types(&evs), ["run.requested", "run.attempt_started", "run.cancelled"]);
    assert_eq!(terminal_count(&evs), 1);
    shutdown.cancel();
    workers.await.unwrap();
}

async fn drain_finishes_short_runs_and_hands_back_long_ones(db: TestDb) {
    let effects = SideEffects::start().await;
    let code = format!(
        "export default async (a, ctx) => {{ if (a.hold && ctx.attempt === 1) await fetch('http://{}/gate'); \
         else await new Promise(r => setTimeout(r, 500)); return {{ attempt: ctx.attempt }}; }}",
        effects.host()
    );
    let permissions = json!({"network": [effects.host()]});
    create_tool(&db.store, json!({"name": "slow", "description": "d", "code": code, "permissions": permissions})).await;
    let api = client(&db.store);
    let held = api.request(request("slow", json!({"hold": true}))).await.unwrap().run_id;
    let short = api.request(request("slow", json!({"hold": false}))).await.unwrap().run_id;
    let drain = WorkerConfig { drain_timeout: Duration::from_secs(5), ..config() };
    let (shutdown, workers) = start_workers(&db.store, drain);
    common::eventually("the held run reached the gate", || effects.count("/gate") == 1).await;
    shutdown.cancel();
    workers.await.unwrap();
    assert_eq!(api.view(short).await.unwrap().unwrap().status, "succeeded", "finished within the drain");
    let evs = events(&db.store, held).await;
    assert_eq!(types(&evs), ["run.requested", "run.attempt_started", "run.attempt_failed"], "handed back");
    let DomainEvent::RunAttemptFailed(f) = &evs[2] else { unreachable!() };
    assert!(f.error.message.contains("shut down"), "{}", f.error.message);
    assert!(db.store.has_job(held).await.unwrap(), "back in the queue");
    let (shutdown, workers) = start_workers(&db.store, config());
    let view = wait_end(&api, held).await;
    assert_eq!((view.status, view.output), ("succeeded", Some(json!({"attempt": 2}))));
    shutdown.cancel();
    workers.await.unwrap();
}

async fn a_stranded_run_is_queued_again(db: TestDb) {
    create_tool(&db.store, json!({"name": "noop", "description": "d", "code": "() => ({ ok: 1 })"})).await;
    let api = client(&db.store);
    let run = api.request(request("noop", json!({}))).await.unwrap().run_id;
    // An operator (or a bug) removed the job row: the run is requested but in no queue.
    db.store.apply_queue(&[QueueOp::Remove(run)]).await.unwrap();
    let runner = ProjectionRunner::new(db.store.clone(), projections::all(), RunnerOptions::default());
    runner.prepare().await.unwrap();
    runner.catch_up().await.unwrap();
    assert_eq!(requeue_stranded(&api, Duration::ZERO).await.unwrap(), 1);
    assert_eq!(requeue_stranded(&api, Duration::ZERO).await.unwrap(), 0, "queued once");
    let (shutdown, workers) = start_workers(&db.store, config());
    assert_eq!(wait_end(&api, run).await.status, "succeeded");
    shutdown.cancel();
    workers.await.unwrap();
}

/// The worker each attempt of the run started on.
async fn attempt_workers(store: &Store, run: RunId) -> Vec<String> {
    let evs = events(store, run).await;
    evs.iter()
        .filter_map(|e| match e {
            DomainEvent::RunAttemptStarted(s) => Some(s.worker_id.clone()),
            _ => None,
        })
        .collect()
}

async fn runs_requested_here_go_straight_to_this_process_worker_while_it_has_slots(db: TestDb) {
    let effects = SideEffects::start().await;
    let code = format!(
        "export default async (a, ctx) => {{ await fetch(`http://{}/gate/${{a.n}}`); return {{ n: a.n }}; }}",
        effects.host()
    );
    let permissions = json!({"network": [effects.host()]});
    create_tool(&db.store, json!({"name": "gated", "description": "d", "code": code, "permissions": permissions}))
        .await;
    let local = LocalWorker::default();
    let (shutdown, workers) = start_local_workers(&db.store, WorkerConfig { concurrency: 2, ..config() }, &local);
    common::eventually("the worker takes hand-offs", || local.try_slot().is_some()).await;
    let worker = local.try_slot().unwrap().worker().to_owned();
    let api = client(&db.store).with_local_worker(local.clone());
    let mut runs = vec![];
    for n in 0..4 {
        let run = api.request(request("gated", json!({"n": n}))).await.unwrap().run_id;
        if n < 2 {
            // Committed already claimed by the worker, which starts it without a claim (a
            // queued run's row is claimed by the same worker a moment later, so only the
            // handed-over ones can be told apart here).
            let job = db.store.job_of(run).await.unwrap().unwrap();
            assert_eq!(job, ("Running".to_owned(), Some(worker.clone())), "run {n} handed over");
        }
        runs.push(run);
    }
    let at_gate = || (0..4).map(|n| effects.count(&format!("/gate/{n}"))).sum::<u32>();
    common::eventually("the two handed-over runs reached the gate", || at_gate() == 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(at_gate(), 2, "the queued runs wait for a slot: 2 slots, 2 running");
    assert_eq!((effects.count("/gate/0"), effects.count("/gate/1")), (1, 1));
    effects.open_gate();
    for (n, run) in runs.iter().enumerate() {
        let view = wait_end(&api, *run).await;
        assert_eq!((view.status, view.output), ("succeeded", Some(json!({"n": n}))));
        assert_eq!(attempt_workers(&db.store, *run).await, std::slice::from_ref(&worker));
        assert_eq!(terminal_count(&events(&db.store, *run).await), 1);
    }
    assert!(db.store.queue_depth().await.unwrap().is_empty(), "ended runs leave no job rows");
    shutdown.cancel();
    workers.await.unwrap();
    assert!(local.try_slot().is_none(), "a stopped worker takes no hand-offs");
    let after = api.request(request("gated", json!({"n": 9}))).await.unwrap().run_id;
    assert_eq!(db.store.job_of(after).await.unwrap().unwrap().0, "Pending", "queued for any worker");
}

async fn a_draining_worker_hands_back_runs_handed_to_it(db: TestDb) {
    let effects = SideEffects::start().await;
    let code = format!(
        "export default async (a, ctx) => {{ if (ctx.attempt === 1) await fetch('http://{}/gate'); \
         return {{ attempt: ctx.attempt }}; }}",
        effects.host()
    );
    let permissions = json!({"network": [effects.host()]});
    create_tool(&db.store, json!({"name": "held", "description": "d", "code": code, "permissions": permissions})).await;
    let local = LocalWorker::default();
    let drain = WorkerConfig { drain_timeout: Duration::from_millis(500), ..config() };
    let (shutdown, workers) = start_local_workers(&db.store, drain, &local);
    common::eventually("the worker takes hand-offs", || local.try_slot().is_some()).await;
    let api = client(&db.store).with_local_worker(local.clone());
    let run = api.request(request("held", json!({}))).await.unwrap().run_id;
    assert_eq!(db.store.job_of(run).await.unwrap().unwrap().0, "Running", "handed over");
    common::eventually("the run reached the gate", || effects.count("/gate") == 1).await;
    shutdown.cancel();
    workers.await.unwrap();
    let evs = events(&db.store, run).await;
    assert_eq!(types(&evs), ["run.requested", "run.attempt_started", "run.attempt_failed"], "handed back");
    assert_eq!(db.store.job_of(run).await.unwrap().unwrap().0, "Pending", "back in the queue, for any worker");
    let (shutdown, workers) = start_workers(&db.store, config());
    let view = wait_end(&api, run).await;
    assert_eq!((view.status, view.output), ("succeeded", Some(json!({"attempt": 2}))));
    shutdown.cancel();
    workers.await.unwrap();
}
