//! `kiln mcp --stdio`: MCP over stdin/stdout for local clients (Claude Desktop, Claude Code, VS
//! Code launch it as a child process). Same store, sandbox and catalog as `kiln serve`; the caller
//! is the local user. Logs go to stderr: stdout carries only MCP messages.

use std::process::ExitCode;
use std::sync::Arc;

use kiln_api::AppState;
use kiln_store::projection::{ProjectionRunner, RunnerOptions};
use kiln_store::projections;
use kiln_worker::DenoSandbox;
use kiln_worker::queue::LocalWorker;
use tokio_util::sync::CancellationToken;

use crate::commands::open_store;
use crate::config::Config;

pub async fn run(config: &Config) -> anyhow::Result<ExitCode> {
    let sandbox = Arc::new(DenoSandbox::start(config.sandbox_config()?)?);
    let store = open_store(config).await?;
    store.migrate().await?;
    let runner = ProjectionRunner::new(
        store.clone(),
        projections::all(),
        RunnerOptions { batch_size: config.projections.batch_size, ..RunnerOptions::default() },
    );
    runner.prepare().await?;
    let shutdown = CancellationToken::new();
    let projections = tokio::spawn(runner.clone().run(shutdown.clone()));
    // Runs are executed by a queue worker in this process, as in `kiln serve`.
    let local = LocalWorker::default();
    let worker = (config.worker.concurrency > 0).then(|| {
        let worker = config.worker_config(config.worker.concurrency);
        let (store, sandbox, local, shutdown) = (store.clone(), sandbox.clone(), local.clone(), shutdown.clone());
        tokio::spawn(kiln_worker::queue::run_with_local(store, sandbox, worker, local, shutdown))
    });
    let state = AppState {
        store: store.clone(),
        projections: Some(runner),
        sandbox: Some(sandbox.clone()),
        local_worker: worker.is_some().then_some(local),
    };
    tracing::info!("kiln MCP on stdio");
    let served = kiln_api::serve_stdio(state, &config.api_config().mcp, shutdown.clone()).await;
    shutdown.cancel();
    if let Some(worker) = worker {
        let _ = worker.await;
    }
    let _ = projections.await;
    sandbox.shutdown();
    store.close().await;
    served?;
    Ok(ExitCode::SUCCESS)
}
