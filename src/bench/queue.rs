//! `kiln bench runs --queue`: durable runs end to end. Requests go through the queue to workers
//! (SQLite: one worker in this process, as in `kiln serve`; PostgreSQL: `--workers` separate
//! `kiln worker` processes), and each run counts as done when its result is recorded and seen by
//! a watcher, as the API sees it.

use std::io::BufRead;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kiln_proto::{Actor, ToolName};
use kiln_store::{Backend, Store};
use kiln_worker::DenoSandbox;
use kiln_worker::queue::LocalWorker;
use kiln_worker::runs::{RunEngine, RunRequest, RunUpdate};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::RunsBench;
use crate::config::Config;

pub(super) async fn run(
    config: &Config,
    b: &RunsBench,
    store: Store,
    url: &str,
    sandbox: Arc<DenoSandbox>,
    tool: ToolName,
) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mut processes = Vec::new();
    let mut api = RunEngine::new(store.clone(), sandbox.clone(), "bench-api");
    let workers = match store.backend() {
        Backend::Sqlite => {
            anyhow::ensure!(b.workers == 1, "SQLite runs one worker, in this process (--workers 1)");
            let worker = config.worker_config(b.worker_concurrency);
            let local = LocalWorker::default();
            if !b.no_handoff {
                api = api.with_local_worker(local.clone());
            }
            let (store, sandbox, shutdown) = (store.clone(), sandbox.clone(), shutdown.clone());
            tokio::spawn(kiln_worker::queue::run_with_local(store, sandbox, worker, local, shutdown));
            let how = if b.no_handoff { "every run claimed from the queue" } else { "runs handed over in-process" };
            format!("1 in-process worker, {} slots, {how}", b.worker_concurrency)
        }
        Backend::Postgres => {
            for _ in 0..b.workers {
                processes.push(WorkerProcess::start(url, b.worker_concurrency)?);
            }
            format!("{} `kiln worker` processes, {} slots each", b.workers, b.worker_concurrency)
        }
    };
    let one = |i: usize| {
        let (api, tool) = (api.clone(), tool.clone());
        async move {
            let start = Instant::now();
            let request = RunRequest {
                tool,
                version: None,
                arguments: json!({"a": i, "b": 1}),
                idempotency_key: None,
                parent_run: None,
                replay_of: None,
                reuse_steps: false,
                actor: Actor::local(),
                traceparent: None,
            };
            let run = api.request(request).await?.run_id;
            let mut watch = api.watch(run).await?;
            loop {
                match tokio::time::timeout(Duration::from_secs(60), watch.next()).await {
                    Ok(Some(RunUpdate::Ended(view))) if view.status == "succeeded" => {
                        return anyhow::Ok(start.elapsed());
                    }
                    Ok(Some(RunUpdate::Ended(view))) => {
                        anyhow::bail!("run {run} ended {}: {:?}", view.status, view.error)
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => anyhow::bail!("the watch of run {run} ended early"),
                    Err(_) => anyhow::bail!("run {run} did not end within 60 s"),
                }
            }
        }
    };
    for i in 0..100 {
        one(i).await?;
    }
    let mut closed = Vec::with_capacity(300);
    for i in 0..300 {
        closed.push(one(i).await?);
    }
    let start = Instant::now();
    let mut open: Vec<Duration> =
        futures::stream::iter(0..b.runs).map(one).buffer_unordered(b.concurrency.max(1)).try_collect().await?;
    let elapsed = start.elapsed();
    let (c50, c99) = percentiles(&mut closed);
    let (o50, o99) = percentiles(&mut open);
    println!(
        "queued runs ({}, {workers}, tool {}): one at a time p50 {:.2} ms, p99 {:.2} ms | {} runs, {} in flight: {:.2} s = {:.0} runs/s, p50 {:.2} ms, p99 {:.2} ms",
        store.backend(),
        if b.tool_ms == 0 { "trivial".to_owned() } else { format!("waits {} ms", b.tool_ms) },
        ms(c50),
        ms(c99),
        b.runs,
        b.concurrency,
        elapsed.as_secs_f64(),
        b.runs as f64 / elapsed.as_secs_f64(),
        ms(o50),
        ms(o99),
    );
    shutdown.cancel();
    drop(processes);
    Ok(())
}

fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let at = |q: usize| samples[(samples.len() * q / 100).min(samples.len() - 1)];
    (at(50), at(99))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A `kiln worker` child process, killed when dropped.
struct WorkerProcess(Child);

impl WorkerProcess {
    fn start(url: &str, concurrency: usize) -> anyhow::Result<WorkerProcess> {
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(["worker", "--database-url", url, "--concurrency", &concurrency.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut lines = std::io::BufReader::new(stdout).lines();
        match lines.next() {
            Some(Ok(line)) if line.starts_with("kiln worker running") => {}
            other => anyhow::bail!("kiln worker did not start: {other:?}"),
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(WorkerProcess(child))
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
