//! The commands that act on a store: serving, migrating, projections, history and audit.

pub mod audit;
pub mod keys;
pub mod mcp;
pub mod projections;
pub mod runs;
pub mod serve;
pub mod tools;
pub mod worker;

use std::process::ExitCode;

use kiln_store::Store;

use crate::config::{Config, redact_url};

/// Opens the configured store, naming it in the error if that fails.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    Store::open(&config.store_options())
        .await
        .map_err(|e| anyhow::anyhow!("cannot open store {}: {e}", redact_url(&config.database_url)))
}

pub async fn migrate(config: &Config) -> anyhow::Result<ExitCode> {
    let store = open_store(config).await?;
    let before = store.schema_version().await?;
    store.migrate().await?;
    let after = store.schema_version().await?;
    println!("{} schema at version {after} (was {before})", store.backend());
    store.close().await;
    Ok(ExitCode::SUCCESS)
}
