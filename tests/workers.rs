//! Worker processes as users run them: `kiln worker` on PostgreSQL and `kiln serve` on SQLite,
//! killed with SIGKILL, paused with SIGSTOP, several at once. The test process plays the API:
//! it creates tools and requests runs in the same database, and counts the tools' side effects
//! with a loopback HTTP server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_proto::{DomainEvent, RunId};
use kiln_store::testing::TestDb;
use kiln_store::{EventStore, Store};
use kiln_worker::runs::{RunEngine, RunView};
use kiln_worker::testing::{SideEffects, client, create_tool, events, request, terminal_count, types};
use serde_json::json;

/// A `kiln worker` process, killed when dropped.
struct WorkerProc {
    child: Child,
}

impl WorkerProc {
    fn start(dir: &Path, database_url: &str, concurrency: usize) -> WorkerProc {
        use std::io::BufRead;
        let mut child = common::kiln(dir)
            .args(["worker", "--database-url", database_url, "--concurrency", &concurrency.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn kiln worker");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.next().expect("kiln worker printed nothing").unwrap();
        assert!(line.starts_with("kiln worker running"), "unexpected: {line}");
        std::thread::spawn(move || for _ in lines {});
        WorkerProc { child }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill {signal}");
    }

    fn kill(mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls the run's stream until it ends (works whichever process appends).
async fn wait_end(engine: &RunEngine, run: RunId, within: Duration) -> RunView {
    let deadline = Instant::now() + within;
    loop {
        if let Some(view) = engine.view(run).await.unwrap()
            && view.is_ended()
        {
            return view;
        }
        assert!(Instant::now() < deadline, "run {run} did not end within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "never happened within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The worker that started each attempt of a run.
async fn attempt_workers(store: &Store, run: RunId) -> Vec<String> {
    events(store, run)
        .await
        .iter()
        .filter_map(|e| match e {
            DomainEvent::RunAttemptStarted(a) => Some(a.worker_id.clone()),
            _ => None,
        })
        .collect()
}

/// Steps 1 and 2 ran, the worker is killed before step 3; another worker finishes the run and
/// neither step runs twice.
async fn assert_finished_by_another_worker(store: &Store, effects: &SideEffects, run: RunId, view: &RunView) {
    assert_eq!(view.status, "succeeded", "{:?}", view.error);
    assert_eq!(view.output, Some(json!({"s1": 1, "s2": 1, "s3": 1, "attempt": 2})));
    assert_eq!((effects.count("/s1"), effects.count("/s2"), effects.count("/s3")), (1, 1, 1), "each step once");
    let evs = events(store, run).await;
    assert_eq!(terminal_count(&evs), 1, "{:?}", types(&evs));
    assert_eq!(
        types(&evs),
        [
            "run.requested",
            "run.attempt_started",
            "run.step_completed",
            "run.step_completed",
            "run.attempt_failed",
            "run.attempt_started",
            "run.step_completed",
            "run.succeeded"
        ]
    );
    let DomainEvent::RunAttemptFailed(lost) = &evs[4] else { unreachable!() };
    assert!(lost.error.message.contains("lost its lease"), "{}", lost.error.message);
    let workers = attempt_workers(store, run).await;
    assert_ne!(workers[0], workers[1], "attempt 2 ran on another worker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_process_is_finished_by_another_and_steps_run_once() {
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let effects = SideEffects::start().await;
    create_tool(&db.store, effects.three_step_tool("three")).await;
    let first = WorkerProc::start(dir.path(), &db.url, 2);
    let api = client(&db.store);
    let run = api.request(request("three", json!({}))).await.unwrap().run_id;
    eventually("steps 1 and 2 ran and the tool waits at the gate", Duration::from_secs(30), || {
        effects.count("/gate") == 1
    })
    .await;
    first.kill();
    let _second = WorkerProc::start(dir.path(), &db.url, 2);
    let view = wait_end(&api, run, Duration::from_secs(60)).await;
    assert_finished_by_another_worker(&db.store, &effects, run, &view).await;
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_serve_on_sqlite_killed_and_restarted_finishes_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/kiln.db", dir.path().display());
    let store = Store::open_and_migrate(&kiln_store::StoreOptions::new(&url)).await.unwrap();
    let effects = SideEffects::start().await;
    create_tool(&store, effects.three_step_tool("three")).await;
    let serve = |dir: &Path| common::Server::start(dir, &["serve", "--database-url", &url, "--listen", "127.0.0.1:0"]);
    let server = serve(dir.path());
    let api = client(&store);
    let run = api.request(request("three", json!({}))).await.unwrap().run_id;
    eventually("steps 1 and 2 ran and the tool waits at the gate", Duration::from_secs(30), || {
        effects.count("/gate") == 1
    })
    .await;
    drop(server); // SIGKILL
    let _restarted = serve(dir.path());
    let view = wait_end(&api, run, Duration::from_secs(60)).await;
    assert_finished_by_another_worker(&store, &effects, run, &view).await;
    store.close().await;
}

/// The run is requested through the server's own MCP endpoint, so the server hands it straight to
/// its in-process worker (its job row committed already claimed, no queue claim): killed
/// mid-run, the claim must still be recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_serve_killed_during_a_run_it_took_over_mcp_finishes_it_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/kiln.db", dir.path().display());
    let store = Store::open_and_migrate(&kiln_store::StoreOptions::new(&url)).await.unwrap();
    let effects = SideEffects::start().await;
    create_tool(&store, effects.three_step_tool("three")).await;
    let serve = |dir: &Path| common::Server::start(dir, &["serve", "--database-url", &url, "--listen", "127.0.0.1:0"]);
    let server = serve(dir.path());
    let addr = server.addr.clone();
    let call = tokio::spawn(async move { common::mcp_call(&addr, "three", json!({})).await });
    eventually("steps 1 and 2 ran and the tool waits at the gate", Duration::from_secs(30), || {
        effects.count("/gate") == 1
    })
    .await;
    let log = store.read_all(kiln_proto::Position(0), 1_000).await.unwrap();
    let requested: Vec<_> = log.iter().filter(|e| e.event_type == "run.requested").collect();
    assert_eq!(requested.len(), 1);
    let run: RunId = requested[0].stream_id.as_str().strip_prefix("run-").unwrap().parse().unwrap();
    let workers = attempt_workers(&store, run).await;
    let (status, claimed_by) = store.job_of(run).await.unwrap().expect("a job row");
    assert_eq!((status.as_str(), claimed_by.as_ref()), ("Running", Some(&workers[0])), "handed to serve's worker");
    let sandboxes = children_named(server.pid(), "deno");
    assert!(!sandboxes.is_empty(), "the run executes in a deno child of the server");
    drop(server); // SIGKILL
    call.abort();
    eventually("the killed server's deno processes exit too", Duration::from_secs(10), || {
        sandboxes.iter().all(|pid| !alive(*pid))
    })
    .await;
    let _restarted = serve(dir.path());
    let api = client(&store);
    let view = wait_end(&api, run, Duration::from_secs(60)).await;
    assert_finished_by_another_worker(&store, &effects, run, &view).await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_zombie_worker_cannot_record_an_outcome() {
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let effects = SideEffects::start().await;
    create_tool(&db.store, effects.three_step_tool("three")).await;
    let zombie = WorkerProc::start(dir.path(), &db.url, 2);
    let api = client(&db.store);
    let run = api.request(request("three", json!({}))).await.unwrap().run_id;
    eventually("the tool waits at the gate", Duration::from_secs(30), || effects.count("/gate") == 1).await;
    zombie.signal("-STOP");
    let _rescuer = WorkerProc::start(dir.path(), &db.url, 2);
    let view = wait_end(&api, run, Duration::from_secs(60)).await;
    assert_finished_by_another_worker(&db.store, &effects, run, &view).await;
    let before = events(&db.store, run).await;
    // The zombie wakes up, its tool passes the gate and would record step 3 and the result.
    effects.open_gate();
    zombie.signal("-CONT");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = events(&db.store, run).await;
    assert_eq!(after, before, "the zombie recorded nothing");
    assert_eq!(effects.count("/s3"), 1, "the zombie was stopped before step 3's side effect, or fenced after it");
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_on_one_postgres_both_take_work() {
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let code = "export default async (a) => { await new Promise(r => setTimeout(r, 30)); return { i: a.i }; }";
    create_tool(&db.store, json!({"name": "nap", "description": "d", "code": code})).await;
    let _one = WorkerProc::start(dir.path(), &db.url, 2);
    let _two = WorkerProc::start(dir.path(), &db.url, 2);
    let api = client(&db.store);
    let mut runs = vec![];
    for i in 0..120 {
        runs.push(api.request(request("nap", json!({"i": i}))).await.unwrap().run_id);
    }
    let mut by_process: HashMap<String, usize> = HashMap::new();
    for run in runs {
        assert_eq!(wait_end(&api, run, Duration::from_secs(120)).await.status, "succeeded");
        let worker = attempt_workers(&db.store, run).await.remove(0);
        // Worker names are `kiln-<host>-<pid>-<uuid>`: count by process.
        let process = worker.rsplit_once('-').map(|(p, _)| p.to_owned()).unwrap_or_default();
        *by_process.entry(process).or_default() += 1;
    }
    assert_eq!(by_process.len(), 2, "both processes ran runs: {by_process:?}");
    assert!(by_process.values().all(|n| *n >= 10), "both took a real share: {by_process:?}");
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_runs_with_random_worker_kills_each_end_exactly_once() {
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let code = "export default async (a, ctx) => { \
                  const x = await ctx.step('first', async () => { await new Promise(r => setTimeout(r, 60)); return a.i; }); \
                  await new Promise(r => setTimeout(r, 60)); \
                  return { i: x }; }";
    let retry = json!({"maxAttempts": 10, "initialDelayMs": 10});
    create_tool(&db.store, json!({"name": "work", "description": "d", "code": code, "retry": retry})).await;
    let workers: Vec<WorkerProc> = (0..3).map(|_| WorkerProc::start(dir.path(), &db.url, 4)).collect();
    // Kill a worker every ~0.5 s, replacing it, while the runs are requested and executed.
    let stop = tokio_util::sync::CancellationToken::new();
    let killer = {
        let (stop, url, dir) = (stop.clone(), db.url.clone(), dir.path().to_owned());
        tokio::task::spawn_blocking(move || {
            let mut workers = workers;
            let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
            let mut kills = 0;
            while !stop.is_cancelled() {
                std::thread::sleep(Duration::from_millis(500));
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let victim = (seed % workers.len() as u64) as usize;
                workers.remove(victim).kill();
                kills += 1;
                workers.push(WorkerProc::start(&dir, &url, 4));
            }
            kills
        })
    };
    let api = client(&db.store);
    let mut runs = vec![];
    for i in 0..500 {
        runs.push(api.request(request("work", json!({"i": i}))).await.unwrap().run_id);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while open_runs(&api, &runs).await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    let kills = killer.await.unwrap();
    // The last replacement workers finish whatever the last kills left.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let open = open_runs(&api, &runs).await;
        if open == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{open} runs did not end");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut outputs = BTreeSet::new();
    for run in &runs {
        let evs = events(&db.store, *run).await;
        assert_eq!(terminal_count(&evs), 1, "run {run}: {:?}", types(&evs));
        let DomainEvent::RunSucceeded(s) = evs.last().unwrap() else { panic!("run {run}: {:?}", types(&evs)) };
        outputs.insert(s.output["i"].as_i64().unwrap());
    }
    assert_eq!(outputs.len(), 500, "every run produced its own output");
    assert!(kills >= 3, "workers were killed while runs were in flight ({kills} kills)");
    drop(db);
}

/// How many of `runs` have not ended.
async fn open_runs(api: &RunEngine, runs: &[RunId]) -> usize {
    let mut open = 0;
    for run in runs {
        if !api.view(*run).await.unwrap().is_some_and(|v| v.is_ended()) {
            open += 1;
        }
    }
    open
}

/// The pids of `parent`'s child processes whose command is `name`.
fn children_named(parent: u32, name: &str) -> Vec<u32> {
    let mut found = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // pid (comm) state ppid ...
        let Some((comm, rest)) =
            stat.split_once(") ").map(|(head, rest)| (head.rsplit('(').next().unwrap_or(""), rest))
        else {
            continue;
        };
        let ppid = rest.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok());
        if comm == name && ppid == Some(parent) {
            found.push(pid);
        }
    }
    found
}

/// Whether the process runs (a zombie waiting to be reaped counts as gone).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}
