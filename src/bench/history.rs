//! `kiln bench history`: projection rebuild speed (events/s) and audit export speed (lines/s,
//! peak memory) over a log of realistic runs, per backend, on a fresh database.
//!
//! The log: a dozen tools with a few versions each, then runs by several actors: most succeed
//! after a few durable steps and a logs event, some fail after a retry, some are cancelled; their
//! arguments carry secrets for the audit to redact. Seeding is not measured (PostgreSQL seeds with
//! `synchronous_commit = off`, reset before measuring).

use std::time::Instant;

use clap::Args;
use futures::{StreamExt, TryStreamExt};
use kiln_proto::events::{
    ErrorKind, LogEntry, RetryDecision, RunAttemptFailed, RunAttemptStarted, RunCancelled, RunError, RunFailed,
    RunLogs, RunRequested, RunStepCompleted, RunSucceeded, ToolCreated, ToolVersionPublished,
};
use kiln_proto::{Actor, DomainEvent, EventMetadata, NewEvent, RunId, StreamId, ToolDefinition, ToolName};
use kiln_store::projection::{self, ProjectionRunner, RunnerOptions};
use kiln_store::queries::audit::{self, AuditFilter};
use kiln_store::{EventStore, ExpectedVersion, Store, StoreOptions, projections};
use serde_json::json;
use sqlx::Connection;

use super::{BenchBackend, Scratch};

#[derive(Debug, Args)]
pub struct HistoryBench {
    #[arg(long, value_enum, default_value = "all")]
    backend: BenchBackend,
    /// Events in the log (about).
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Events per batch of the live projections (the catch-up).
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// Events per batch of a rebuild (as `kiln projections rebuild` uses by default).
    #[arg(long, default_value_t = projection::REBUILD_BATCH)]
    rebuild_batch: usize,
    /// Only rebuild this projection (default: each in turn).
    #[arg(long)]
    projection: Option<String>,
    #[arg(long, env = "KILN_TEST_PG_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pg_url: String,
}

pub async fn run(b: &HistoryBench) -> anyhow::Result<()> {
    let backends = match b.backend {
        BenchBackend::Sqlite => vec![BenchBackend::Sqlite],
        BenchBackend::Postgres => vec![BenchBackend::Postgres],
        BenchBackend::All => vec![BenchBackend::Sqlite, BenchBackend::Postgres],
    };
    for backend in backends {
        let scratch = Scratch::create(backend, &b.pg_url).await?;
        let result = measure(backend, &scratch, b).await;
        scratch.drop_db().await?;
        result?;
    }
    Ok(())
}

async fn measure(backend: BenchBackend, scratch: &Scratch, b: &HistoryBench) -> anyhow::Result<()> {
    let label = if backend == BenchBackend::Postgres { "postgres" } else { "sqlite" };
    set_synchronous_commit(scratch, "off").await?;
    let store = Store::open_and_migrate(&StoreOptions::new(&scratch.url)).await?;
    let start = Instant::now();
    let head = seed(&store, b.events).await?;
    println!("{label}: seeded {head} events in {:.1} s (not measured)", start.elapsed().as_secs_f64());
    store.close().await;
    set_synchronous_commit(scratch, "on").await?;
    let store = Store::open_and_migrate(&StoreOptions::new(&scratch.url)).await?;

    let runner = ProjectionRunner::new(
        store.clone(),
        projections::all(),
        RunnerOptions { batch_size: b.batch, ..RunnerOptions::default() },
    );
    runner.prepare().await?;
    let start = Instant::now();
    runner.catch_up().await?;
    let all = start.elapsed().as_secs_f64();
    println!(
        "{label}: live catch-up of all {} projections from 0: {:.1} s = {:.0} events/s per projection",
        runner.projections().len(),
        all,
        head as f64 * runner.projections().len() as f64 / all
    );
    for p in projections::all() {
        if b.projection.as_deref().is_some_and(|only| only != p.name()) {
            continue;
        }
        let start = Instant::now();
        projection::rebuild(&runner, p.as_ref(), b.rebuild_batch, &|_, _| {}).await?;
        let secs = start.elapsed().as_secs_f64();
        println!("{label}: rebuild {:<14} {head} events in {secs:.2} s = {:.0} events/s", p.name(), head as f64 / secs);
    }

    for (what, filter) in [
        ("all lines", AuditFilter::default()),
        ("--actor key:bob", AuditFilter { actor: Some("key:bob".into()), ..AuditFilter::default() }),
    ] {
        let rss_before = memory_kb("VmRSS");
        // Resets the peak-RSS mark (Linux), so VmHWM afterwards is this export's peak.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let start = Instant::now();
        let mut lines = 0usize;
        let mut bytes = 0usize;
        let mut chunks = std::pin::pin!(audit::export(store.clone(), filter, audit::PAGE));
        while let Some(chunk) = chunks.try_next().await? {
            lines += chunk.matches('\n').count();
            bytes += chunk.len();
        }
        let secs = start.elapsed().as_secs_f64();
        let peak = memory_kb("VmHWM").zip(rss_before).map(|(peak, before)| peak.saturating_sub(before));
        println!(
            "{label}: audit export ({what}): {lines} lines, {:.1} MB in {secs:.2} s = {:.0} lines/s; peak RSS +{} above the {} before",
            bytes as f64 / 1e6,
            lines as f64 / secs,
            peak.map_or("?".to_owned(), |kb| format!("{:.1} MB", kb as f64 / 1024.0)),
            rss_before.map_or("?".to_owned(), |kb| format!("{:.0} MB", kb as f64 / 1024.0)),
        );
    }
    store.close().await;
    Ok(())
}

/// A field of /proc/self/status, in kB (Linux only).
fn memory_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// PostgreSQL: sets the scratch database's default `synchronous_commit` (new sessions).
async fn set_synchronous_commit(scratch: &Scratch, value: &str) -> anyhow::Result<()> {
    if let Some((admin_url, name)) = &scratch.pg {
        let mut admin = sqlx::PgConnection::connect(admin_url).await?;
        let sql = format!("ALTER DATABASE {name} SET synchronous_commit = {value}");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut admin).await?;
    }
    Ok(())
}

/// Seeds about `events` events; returns the head.
async fn seed(store: &Store, events: usize) -> anyhow::Result<u64> {
    let tools: Vec<ToolName> = (0..12).map(|i| ToolName::parse(format!("tool{i}"))).collect::<Result<_, _>>()?;
    for t in &tools {
        for v in 1..=3u32 {
            let d = ToolDefinition::parse(
                &json!({"name": t.as_str(), "description": "bench", "code": format!("() => {v}")}),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .definition;
            let mut evs = Vec::new();
            if v == 1 {
                evs.push(DomainEvent::from(ToolCreated { name: t.clone() }));
            }
            evs.push(
                ToolVersionPublished { name: t.clone(), version: v, code_sha256: d.code_sha256(), definition: d }
                    .into(),
            );
            let meta = EventMetadata::new(Actor::parse("key:admin")?);
            let evs = evs.iter().map(|e| NewEvent::from_domain(e, meta.clone())).collect();
            store.append(&StreamId::tool(t), ExpectedVersion::Any, evs).await?;
        }
    }
    let mut written = store.head().await?.0 as usize;
    let mut i = 0usize;
    let runs = std::iter::from_fn(move || {
        (written < events).then(|| {
            let run = one_run(&tools, i);
            written += run.1.len();
            i += 1;
            run
        })
    });
    futures::stream::iter(runs)
        .map(|(stream, evs)| {
            let store = store.clone();
            async move { store.append(&stream, ExpectedVersion::NoStream, evs).await }
        })
        .buffer_unordered(8)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(store.head().await?.0)
}

/// The `i`th run's stream: most succeed after a few steps, every eighth fails after a retry,
/// every thirteenth is cancelled while queued.
fn one_run(tools: &[ToolName], i: usize) -> (StreamId, Vec<NewEvent>) {
    const ACTORS: &[&str] = &["key:alice", "key:bob", "jwt:carol", "key:ci"];
    let id = RunId::new();
    let actor = Actor::parse(ACTORS[i % ACTORS.len()]).unwrap_or_else(|_| Actor::local());
    let worker = Actor::system("worker");
    let now = kiln_proto::envelope::now_micros();
    let mut evs: Vec<(Actor, DomainEvent)> = vec![(
        actor.clone(),
        RunRequested {
            run_id: id,
            tool: tools[i % tools.len()].clone(),
            tool_version: 1 + (i % 3) as u32,
            arguments: json!({"city": "Oslo", "n": i, "apiKey": "sk-bench-0123456789abcdef", "units": "metric"}),
            idempotency_key: None,
            parent_run: None,
            replay_of: None,
            reuse_steps_from: None,
        }
        .into(),
    )];
    let started = |attempt| RunAttemptStarted { attempt, worker_id: "bench".into(), lease_expires_at: now };
    let error = RunError {
        kind: ErrorKind::UserError,
        message: "upstream answered 503".into(),
        name: Some("Error".into()),
        stack: Some("Error: upstream answered 503\n    at tool.ts:3:11".into()),
        non_retryable: false,
    };
    if i % 13 == 5 {
        evs.push((actor, RunCancelled { reason: Some("changed my mind".into()), cancelled_by: None }.into()));
    } else if i % 8 == 3 {
        evs.push((worker.clone(), started(1).into()));
        let retry = RetryDecision::Retry { delay_ms: 1_000, next_attempt_at: now };
        evs.push((worker.clone(), RunAttemptFailed { attempt: 1, error: error.clone(), retry }.into()));
        evs.push((worker.clone(), started(2).into()));
        let give_up = RetryDecision::GiveUp { reason: "no attempts left".into() };
        evs.push((worker.clone(), RunAttemptFailed { attempt: 2, error: error.clone(), retry: give_up }.into()));
        evs.push((worker, RunFailed { attempts: 2, error }.into()));
    } else {
        evs.push((worker.clone(), started(1).into()));
        for s in 0..(3 + i % 5) {
            let result = json!({"temperature": 21, "step": s});
            evs.push((worker.clone(), RunStepCompleted { attempt: 1, key: format!("fetch-{s}"), result }.into()));
        }
        let entry = LogEntry { level: "info".into(), message: format!("fetched {i}"), at: now };
        evs.push((worker.clone(), RunLogs { attempt: 1, entries: vec![entry], truncated: false }.into()));
        evs.push((worker, RunSucceeded { attempt: 1, output: json!({"forecast": "sunny", "n": i}) }.into()));
    }
    let evs = evs.into_iter().map(|(a, e)| NewEvent::from_domain(&e, EventMetadata::new(a))).collect();
    (StreamId::run(id), evs)
}
