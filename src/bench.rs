//! `kiln bench`: measurements that print their figures. Numbers go in docs/benchmarks.md.
//!
//! `kiln bench store` measures, per backend, on a fresh database: single-event commits from one
//! writer and from 8 concurrent writers, batched appends, and replay (`read_all` of the whole log
//! in pages, every payload parsed).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use futures::{StreamExt, TryStreamExt};
use kiln_proto::{Actor, EventMetadata, NewEvent, Position, StreamId};
use kiln_store::{EventStore, ExpectedVersion, Store, StoreOptions};
use kiln_worker::sandbox::bench::BenchOptions;
use serde_json::json;
use sqlx::Connection;

use crate::config::Config;

mod history;
mod mcp;
mod queue;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Event store: append (single and batched) and replay throughput.
    Store(StoreBench),
    /// Tool sandbox: warm round trip, cold start, throughput, raw `deno run` start.
    Sandbox(SandboxBench),
    /// Durable runs: request -> recorded result, through the queue and workers (`--queue`) or
    /// the run engine alone.
    Runs(RunsBench),
    /// History: projection rebuild (events/s) and audit export (lines/s, peak memory).
    History(history::HistoryBench),
    /// MCP: tools/call round trip of a warm trivial tool over Streamable HTTP, and throughput.
    Mcp(mcp::McpBench),
}

#[derive(Debug, Args)]
pub struct RunsBench {
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: BenchBackend,
    /// Runs to execute.
    #[arg(long, default_value_t = 2_000)]
    runs: usize,
    /// Runs in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Through the queue and workers, end to end (default: the run engine alone, in this process).
    #[arg(long)]
    queue: bool,
    /// With --queue on PostgreSQL: `kiln worker` processes to start.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// With --queue on SQLite: every run goes through a queue claim, as runs requested by
    /// another process do (default: runs are handed to the in-process worker, as `kiln serve`
    /// does while the worker has a slot free).
    #[arg(long)]
    no_handoff: bool,
    /// The tool waits this long before answering (an I/O-bound tool, such as one calling an
    /// API): the workers' slots, not the database, then bound throughput. 0: trivial tool.
    #[arg(long, default_value_t = 0)]
    tool_ms: u64,
    /// With --queue: each worker's slots (runs at once).
    #[arg(long, default_value_t = 8)]
    worker_concurrency: usize,
    #[arg(long, env = "KILN_TEST_PG_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pg_url: String,
}

#[derive(Debug, Args)]
pub struct SandboxBench {
    /// Sequential warm invocations.
    #[arg(long, default_value_t = 5_000)]
    warm: usize,
    /// New tool versions started.
    #[arg(long, default_value_t = 30)]
    cold: usize,
    /// Invocations for the throughput figure.
    #[arg(long, default_value_t = 20_000)]
    throughput: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchBackend {
    Sqlite,
    Postgres,
    All,
}

#[derive(Debug, Args)]
pub struct StoreBench {
    #[arg(long, value_enum, default_value = "all")]
    backend: BenchBackend,
    /// Events appended in batches (and then replayed).
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Events per batched append.
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// Single-event commits.
    #[arg(long, default_value_t = 3_000)]
    single: usize,
    /// PostgreSQL server to create the scratch database on.
    #[arg(long, env = "KILN_TEST_PG_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pg_url: String,
}

pub async fn run(config: &Config, cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Sandbox(b) => {
            let mut opts = BenchOptions::new(config.sandbox_config()?.deno);
            opts.warm_iterations = b.warm;
            opts.cold_iterations = b.cold;
            opts.throughput_invocations = b.throughput;
            print!("{}", kiln_worker::sandbox::bench::run(opts).await?);
        }
        BenchCommand::Runs(b) => runs_bench(config, &b).await?,
        BenchCommand::History(b) => history::run(&b).await?,
        BenchCommand::Mcp(b) => mcp::run(config, &b).await?,
        BenchCommand::Store(b) => {
            let backends = match b.backend {
                BenchBackend::Sqlite => vec![BenchBackend::Sqlite],
                BenchBackend::Postgres => vec![BenchBackend::Postgres],
                BenchBackend::All => vec![BenchBackend::Sqlite, BenchBackend::Postgres],
            };
            println!("{:<10} {:<34} {:>12} {:>14}", "backend", "measure", "events", "events/s");
            for backend in backends {
                store_bench(backend, &b).await?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn payload_event(n: usize) -> NewEvent {
    let metadata = EventMetadata::new(Actor::system("bench"));
    let mut e = NewEvent::from_domain(
        &kiln_proto::events::ToolEnabled {
            name: kiln_proto::ToolName::parse("bench").unwrap_or_else(|_| unreachable!()),
        }
        .into(),
        metadata,
    );
    e.payload =
        json!({"runId": n, "tool": "bench", "attempt": 1, "output": {"value": n, "note": "a typical small payload"}});
    e
}

fn report(backend: &str, measure: &str, events: usize, elapsed: Duration) {
    let rate = events as f64 / elapsed.as_secs_f64();
    println!("{backend:<10} {measure:<34} {events:>12} {rate:>14.0}");
}

async fn store_bench(backend: BenchBackend, b: &StoreBench) -> anyhow::Result<()> {
    let scratch = Scratch::create(backend, &b.pg_url).await?;
    let label = if backend == BenchBackend::Postgres { "postgres" } else { "sqlite" };
    let result = async {
        let store = Store::open_and_migrate(&StoreOptions::new(&scratch.url)).await?;
        measure(&store, label, b).await?;
        store.close().await;
        anyhow::Ok(())
    }
    .await;
    scratch.drop_db().await?;
    result
}

async fn measure(store: &Store, label: &str, b: &StoreBench) -> anyhow::Result<()> {
    // Single-event commits, one writer.
    let stream = StreamId::parse("run-single")?;
    let start = Instant::now();
    for i in 0..b.single {
        store.append(&stream, ExpectedVersion::Any, vec![payload_event(i)]).await?;
    }
    report(label, "append 1/commit, 1 writer", b.single, start.elapsed());

    // Single-event commits, 8 writers on their own streams.
    let start = Instant::now();
    let per = b.single / 8;
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let stream = StreamId::parse(format!("run-w{w}"))?;
                for i in 0..per {
                    store.append(&stream, ExpectedVersion::Any, vec![payload_event(i)]).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    report(label, "append 1/commit, 8 writers", per * 8, start.elapsed());

    // Batched appends.
    let batches: Vec<Vec<NewEvent>> =
        (0..b.events).map(payload_event).collect::<Vec<_>>().chunks(b.batch).map(|c| c.to_vec()).collect();
    let start = Instant::now();
    for (i, batch) in batches.into_iter().enumerate() {
        let stream = StreamId::parse(format!("run-batch{}", i % 64))?;
        store.append(&stream, ExpectedVersion::Any, batch).await?;
    }
    report(label, &format!("append {}/commit", b.batch), b.events, start.elapsed());

    // Replay: the whole log in pages, as projections read it (one page at a time, and with pages
    // read ahead while the previous one is consumed).
    let head = store.head().await?;
    let start = Instant::now();
    let mut at = Position::START;
    let mut n = 0usize;
    while at < head {
        let page = store.read_all(at, 5_000).await?;
        let Some(last) = page.last() else { break };
        at = last.position;
        n += page.len();
    }
    report(label, "read_all loop, 5000/page", n, start.elapsed());
    let start = Instant::now();
    let mut pages = std::pin::pin!(kiln_store::replay(store, Position::START, head, 5_000));
    let mut n = 0usize;
    while let Some(page) = pages.try_next().await? {
        n += page.len();
    }
    report(label, "replay, 5000/page, 2 in flight", n, start.elapsed());
    Ok(())
}

/// A scratch database for one benchmark: a SQLite file in a temp folder or a new PostgreSQL
/// database, dropped afterwards.
struct Scratch {
    url: String,
    pg: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Scratch {
    async fn create(backend: BenchBackend, pg_url: &str) -> anyhow::Result<Scratch> {
        let dir = tempfile::tempdir()?;
        if backend == BenchBackend::Postgres {
            let name = format!("kiln_bench_{}", uuid::Uuid::now_v7().simple());
            let mut admin = sqlx::PgConnection::connect(pg_url).await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await?;
            let mut url = url::Url::parse(pg_url)?;
            url.set_path(&format!("/{name}"));
            return Ok(Scratch { url: url.to_string(), pg: Some((pg_url.to_owned(), name)), _dir: dir });
        }
        Ok(Scratch { url: format!("sqlite://{}", dir.path().join("bench.db").display()), pg: None, _dir: dir })
    }

    async fn drop_db(self) -> anyhow::Result<()> {
        if let Some((admin_url, name)) = self.pg {
            let mut admin = sqlx::PgConnection::connect(&admin_url).await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                .execute(&mut admin)
                .await?;
        }
        Ok(())
    }
}

async fn runs_bench(config: &Config, b: &RunsBench) -> anyhow::Result<()> {
    use kiln_proto::events::{ToolCreated, ToolVersionPublished};
    use kiln_worker::runs::{AttemptOutcome, RunEngine, RunRequest};

    let scratch = Scratch::create(b.backend, &b.pg_url).await?;
    let store = Store::open_and_migrate(&StoreOptions::new(&scratch.url)).await?;
    let sandbox = std::sync::Arc::new(kiln_worker::DenoSandbox::start(config.sandbox_config()?)?);
    let engine = RunEngine::new(store.clone(), sandbox.clone(), "bench");
    let code = match b.tool_ms {
        0 => "(a) => ({ sum: a.a + a.b })".to_owned(),
        ms => format!("async (a) => {{ await new Promise((r) => setTimeout(r, {ms})); return {{ sum: a.a + a.b }}; }}"),
    };
    let d = kiln_proto::ToolDefinition::parse(&json!({"name": "add", "description": "a+b", "code": code}))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .definition;
    let meta = EventMetadata::new(Actor::local());
    let events = [
        kiln_proto::DomainEvent::from(ToolCreated { name: d.name.clone() }),
        ToolVersionPublished { name: d.name.clone(), version: 1, code_sha256: d.code_sha256(), definition: d.clone() }
            .into(),
    ];
    let events = events.iter().map(|e| NewEvent::from_domain(e, meta.clone())).collect();
    store.append(&StreamId::tool(&d.name), ExpectedVersion::NoStream, events).await?;
    if b.queue {
        queue::run(config, b, store.clone(), &scratch.url, sandbox.clone(), d.name.clone()).await?;
        sandbox.shutdown();
        store.close().await;
        return scratch.drop_db().await;
    }

    let one = |i: usize| {
        let engine = engine.clone();
        let name = d.name.clone();
        async move {
            let start = Instant::now();
            let request = RunRequest {
                tool: name,
                version: None,
                arguments: json!({"a": i, "b": 1}),
                idempotency_key: None,
                parent_run: None,
                replay_of: None,
                reuse_steps: false,
                actor: Actor::local(),
                traceparent: None,
            };
            let run = engine.request(request).await?.run_id;
            match engine.execute(run, tokio_util::sync::CancellationToken::new()).await? {
                AttemptOutcome::Finished(_) => anyhow::Ok(start.elapsed()),
                other => anyhow::bail!("run {run} did not finish: {other:?}"),
            }
        }
    };
    // Warm up the sandbox and the caches.
    for i in 0..50 {
        one(i).await?;
    }
    let start = Instant::now();
    let mut latencies: Vec<Duration> =
        futures::stream::iter(0..b.runs).map(one).buffer_unordered(b.concurrency.max(1)).try_collect().await?;
    let elapsed = start.elapsed();
    latencies.sort();
    let at = |q: usize| latencies[(latencies.len() * q / 100).min(latencies.len() - 1)];
    println!(
        "runs ({:?}, {} in flight): {} runs in {:.2} s = {:.0} runs/s; request -> recorded result p50 {:.2} ms, p99 {:.2} ms",
        b.backend,
        b.concurrency,
        b.runs,
        elapsed.as_secs_f64(),
        b.runs as f64 / elapsed.as_secs_f64(),
        at(50).as_secs_f64() * 1e3,
        at(99).as_secs_f64() * 1e3,
    );
    sandbox.shutdown();
    store.close().await;
    scratch.drop_db().await
}
