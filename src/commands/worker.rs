//! `kiln worker`: a queue worker process. It claims run jobs from the store's queue and
//! executes them in its own Deno sandbox; add processes (on PostgreSQL) to scale out. SIGTERM
//! drains it: no new runs, running ones get `worker.drain_timeout_ms` to finish, then are handed
//! back to the queue.

use std::process::ExitCode;
use std::sync::Arc;

use kiln_worker::DenoSandbox;
use tokio_util::sync::CancellationToken;

use crate::commands::open_store;
use crate::commands::serve::cancel_on_signal;
use crate::config::{Config, redact_url};

pub async fn run(config: &Config, concurrency: Option<usize>) -> anyhow::Result<ExitCode> {
    let sandbox = Arc::new(DenoSandbox::start(config.sandbox_config()?)?);
    let store = open_store(config).await?;
    store.migrate().await?;
    let concurrency = concurrency.unwrap_or(config.worker.concurrency);
    if concurrency == 0 {
        anyhow::bail!("worker.concurrency: a worker process needs at least 1");
    }
    let worker = config.worker_config(concurrency);
    tracing::info!(database = %redact_url(&config.database_url), concurrency, "kiln worker running");
    println!("kiln worker running ({concurrency} at once)");
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    kiln_worker::queue::run(store.clone(), sandbox.clone(), worker, shutdown).await;
    sandbox.shutdown();
    store.close().await;
    tracing::info!("kiln worker stopped");
    Ok(ExitCode::SUCCESS)
}
