//! `kiln tools list [--at POSITION|TIME]`: the catalog now, or as it stood at a past point.

use std::process::ExitCode;

use kiln_store::queries::{self, tools};

use crate::cli::ToolsCommand;
use crate::commands::open_store;
use crate::config::Config;

pub async fn run(config: &Config, cmd: ToolsCommand) -> anyhow::Result<ExitCode> {
    let ToolsCommand::List { at, deleted, json } = cmd;
    let at: tools::At = match at.as_deref() {
        Some(s) => s.parse()?,
        None => tools::At::Position(u64::MAX),
    };
    let store = open_store(config).await?;
    store.migrate().await?;
    queries::catch_up(&store, &["tool_versions"]).await?;
    let entries = tools::catalog_at(&store, at, deleted).await;
    store.close().await;
    let entries = entries?;
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(ExitCode::SUCCESS);
    }
    match at {
        tools::At::Position(u64::MAX) => {}
        tools::At::Position(p) => println!("catalog as of log position {p}"),
        tools::At::Time(t) => println!("catalog as of {}", queries::stored_time(&t)),
    }
    if entries.is_empty() {
        println!("no tools");
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<28} {:>7} {:<9} {:<14} {:<20} {:>9}", "NAME", "VERSION", "STATE", "CODE", "CHANGED BY", "POSITION");
    for e in entries {
        let code = e.code_sha256.as_deref().map_or("-", |c| &c[..c.len().min(12)]).to_owned();
        println!("{:<28} {:>7} {:<9} {:<14} {:<20} {:>9}", e.name, e.version, e.state, code, e.changed_by, e.position);
    }
    Ok(ExitCode::SUCCESS)
}
