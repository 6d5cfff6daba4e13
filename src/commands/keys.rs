//! `kiln keys create|list|revoke`: API keys for the MCP API. The secret is printed once, at
//! creation; the database keeps only its hash.

use std::process::ExitCode;

use anyhow::Context;
use kiln_api::auth::Scope;
use kiln_api::auth::keys::ApiKeys;
use kiln_proto::tool::NetHost;

use crate::cli::KeysCommand;
use crate::commands::open_store;
use crate::config::Config;

pub async fn run(config: &Config, cmd: KeysCommand) -> anyhow::Result<ExitCode> {
    let store = open_store(config).await?;
    store.migrate().await?;
    let keys = ApiKeys::new(store.clone());
    let result = match cmd {
        KeysCommand::Create { name, scopes, allow_hosts } => {
            let scopes = scopes
                .iter()
                .flat_map(|s| s.split(','))
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse::<Scope>())
                .collect::<Result<Vec<_>, _>>()
                .context("--scopes")?;
            let hosts = allow_hosts
                .iter()
                .flat_map(|s| s.split(','))
                .filter(|s| !s.trim().is_empty())
                .map(|h| NetHost::parse(h.trim()).with_context(|| format!("--allow-host {h:?}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let (info, secret) = keys.create(&name, scopes, hosts).await?;
            eprintln!("created key {} for actor key:{} (shown once; store it now)", info.id, info.name);
            println!("{secret}");
            Ok(())
        }
        KeysCommand::List { json } => {
            let list = keys.list().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<17} {:<20} {:<40} {:<30} STATE", "ID", "NAME", "SCOPES", "HOSTS");
                for k in list {
                    let scopes: Vec<&str> = k.scopes.iter().map(|s| s.as_str()).collect();
                    let hosts: Vec<String> = k.allowed_hosts.iter().map(ToString::to_string).collect();
                    let state = k.revoked_at.as_deref().map_or("active".to_owned(), |at| format!("revoked {at}"));
                    println!("{:<17} {:<20} {:<40} {:<30} {state}", k.id, k.name, scopes.join(","), hosts.join(","));
                }
            }
            Ok(())
        }
        KeysCommand::Revoke { key } => {
            let k = keys.revoke(&key).await?;
            println!("revoked key {} ({})", k.id, k.name);
            Ok(())
        }
    };
    store.close().await;
    result.map(|()| ExitCode::SUCCESS)
}
