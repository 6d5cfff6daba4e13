//! `kiln serve` / `kiln api`: open and migrate the store, follow the log with the projections,
//! serve HTTP, and stop cleanly on Ctrl-C or SIGTERM.

use std::process::ExitCode;
use std::sync::Arc;

use kiln_api::AppState;
use kiln_store::projection::{ProjectionRunner, RunnerOptions};
use kiln_store::projections;
use kiln_worker::DenoSandbox;
use kiln_worker::queue::LocalWorker;
use tokio_util::sync::CancellationToken;

use crate::commands::open_store;
use crate::config::{Config, redact_url};

/// What this process runs besides the API and projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `kiln serve`: a queue worker too (unless `worker.concurrency` is 0).
    All,
    /// `kiln api`: workers run elsewhere.
    Api,
}

pub async fn run(config: &Config, role: Role) -> anyhow::Result<ExitCode> {
    // Checked first: a missing or wrong deno is a start-up error, not a failure at the first run.
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
    let worker_here = role == Role::All && config.worker.concurrency > 0;
    let local = LocalWorker::default();
    let state = AppState {
        store: store.clone(),
        projections: Some(runner.clone()),
        sandbox: Some(sandbox.clone()),
        local_worker: worker_here.then(|| local.clone()),
    };
    let app = kiln_api::build(&config.api_config(), state).await?;
    let addr = app.local_addr();
    let deno = &sandbox.config().deno;
    tracing::info!(%addr, database = %redact_url(&config.database_url), deno = %deno.path().display(), "kiln serving");
    println!("kiln listening on http://{addr}");

    let projections = tokio::spawn(runner.run(shutdown.clone()));
    let worker = worker_here.then(|| {
        let worker = config.worker_config(config.worker.concurrency);
        let (store, sandbox, shutdown) = (store.clone(), sandbox.clone(), shutdown.clone());
        tokio::spawn(kiln_worker::queue::run_with_local(store, sandbox, worker, local, shutdown))
    });
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    let served = app.run(shutdown.clone()).await;
    shutdown.cancel();
    if let Some(worker) = worker {
        let _ = worker.await;
    }
    let _ = projections.await;
    sandbox.shutdown();
    store.close().await;
    served?;
    tracing::info!("kiln stopped");
    Ok(ExitCode::SUCCESS)
}

/// Cancels `shutdown` on the first Ctrl-C or SIGTERM.
pub(crate) async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops kiln");
            let _ = ctrl_c.await;
            shutdown.cancel();
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
    shutdown.cancel();
}
