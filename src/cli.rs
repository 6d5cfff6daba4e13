//! Command-line interface: the commands and their flags, and dispatch.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, FlagOverrides};
use crate::{bench, commands, telemetry};

#[derive(Debug, Parser)]
#[command(name = "kiln", version, about = "Durable runtime for agent-written tools")]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalFlags,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalFlags {
    /// Config file (default: ./kiln.toml if present).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Database: sqlite://PATH (default ./.kiln/kiln.db) or postgres://...
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run everything in one process: API, projections and a queue worker.
    Serve(ServeFlags),
    /// Run an API replica: HTTP API and projections.
    Api(ServeFlags),
    /// Run a queue worker: claims runs and executes them in the Deno sandbox.
    Worker(WorkerFlags),
    /// Create or upgrade the database schema.
    Migrate,
    /// Inspect, rebuild and verify read models.
    #[command(subcommand)]
    Projections(ProjectionsCommand),
    /// Print the effective configuration (secrets hidden).
    Config(ServeFlags),
    /// Serve MCP to a local client over stdin/stdout (for Claude Desktop, Claude Code, VS Code).
    Mcp(McpFlags),
    /// Create, list and revoke API keys for the MCP API.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Measure performance and print the figures.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Debug, Args)]
pub struct ServeFlags {
    /// Address to listen on (default 127.0.0.1:8788).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
pub struct McpFlags {
    /// Use stdin/stdout (the only transport of this command; HTTP is `kiln serve`).
    #[arg(long, required = true)]
    pub stdio: bool,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; prints its secret once.
    Create {
        /// The key's name; its actor is `key:<name>`.
        #[arg(long)]
        name: String,
        /// Scopes, comma-separated: tools:read, tools:write, tools:run, runs:read, audit:read, admin.
        #[arg(long, required = true, value_name = "SCOPES")]
        scopes: Vec<String>,
        /// Hosts (host or host:port) tools created with this key may reach; repeat or comma-separate.
        #[arg(long = "allow-host", value_name = "HOST")]
        allow_hosts: Vec<String>,
    },
    /// List keys (never their secrets).
    List {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id or name.
    Revoke {
        /// The key's id or name.
        key: String,
    },
}

#[derive(Debug, Args)]
pub struct WorkerFlags {
    /// Runs executed at once (default: worker.concurrency, 8).
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
}

#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Show each projection's position and lag behind the log.
    Status,
    /// Rebuild read models from the whole log, then swap them in atomically.
    Rebuild {
        /// The projection to rebuild.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Rebuild every projection.
        #[arg(long)]
        all: bool,
    },
    /// Rebuild into scratch tables and compare with the live read models.
    Verify {
        /// Only this projection (default: all).
        name: Option<String>,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let listen = match &cli.command {
        Command::Serve(f) | Command::Api(f) | Command::Config(f) => f.listen,
        _ => None,
    };
    let flags = FlagOverrides { database_url: cli.global.database_url.clone(), listen };
    let config = Config::load(cli.global.config.as_deref(), &flags)?;
    if let Command::Config(_) = cli.command {
        print!("{}", config.to_redacted_toml()?);
        return Ok(ExitCode::SUCCESS);
    }
    telemetry::init(&config.log);
    match cli.command {
        Command::Serve(_) => commands::serve::run(&config, commands::serve::Role::All).await,
        Command::Api(_) => commands::serve::run(&config, commands::serve::Role::Api).await,
        Command::Worker(flags) => commands::worker::run(&config, flags.concurrency).await,
        Command::Migrate => commands::migrate(&config).await,
        Command::Projections(cmd) => commands::projections::run(&config, cmd).await,
        Command::Mcp(_) => commands::mcp::run(&config).await,
        Command::Keys(cmd) => commands::keys::run(&config, cmd).await,
        Command::Bench(cmd) => bench::run(&config, cmd).await,
        Command::Config(_) => Ok(ExitCode::SUCCESS),
    }
}
