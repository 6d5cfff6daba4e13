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
    /// Run history: list runs, show one with every event, replay past runs.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Export the audit log as JSON lines.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The tool catalog, now or as it was.
    #[command(subcommand)]
    Tools(ToolsCommand),
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// List runs, newest first.
    List(RunsListFlags),
    /// One run: summary, arguments, outcome, children, and a timeline of every event.
    Show {
        /// The run's id.
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a past run again with its original arguments and show what changed.
    Replay(RunsReplayFlags),
}

#[derive(Debug, Args)]
pub struct RunsListFlags {
    #[arg(long)]
    pub tool: Option<String>,
    /// queued, running, retry_scheduled, succeeded, failed, cancelled or timed_out.
    #[arg(long)]
    pub status: Option<String>,
    #[arg(long)]
    pub actor: Option<String>,
    /// Requested at or after (RFC 3339 or YYYY-MM-DD).
    #[arg(long)]
    pub since: Option<String>,
    /// Requested before (RFC 3339 or YYYY-MM-DD).
    #[arg(long)]
    pub until: Option<String>,
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Continue after a previous page (its printed cursor).
    #[arg(long)]
    pub cursor: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunsReplayFlags {
    /// The run to replay. Without it, replays every run of --tool with --status (default
    /// failed) requested in --since/--until.
    #[arg(required_unless_present = "tool")]
    pub id: Option<String>,
    /// recorded (the original's), latest, or a version number.
    #[arg(long, default_value = "recorded")]
    pub version: String,
    /// Answer durable steps from the original's recorded results (no repeated side effects).
    #[arg(long, conflicts_with = "fresh")]
    pub reuse_steps: bool,
    /// Run every step again (the default).
    #[arg(long)]
    pub fresh: bool,
    /// Bulk replay: the tool whose runs to replay.
    #[arg(long, conflicts_with = "id")]
    pub tool: Option<String>,
    /// Bulk replay: runs with this status.
    #[arg(long, default_value = "failed", requires = "tool")]
    pub status: String,
    #[arg(long, requires = "tool")]
    pub since: Option<String>,
    #[arg(long, requires = "tool")]
    pub until: Option<String>,
    /// Who executes the new runs: `worker` (wait for the queue's workers, e.g. a running
    /// `kiln serve`), `local` (this process), or `auto`: a worker if one starts the run within
    /// two seconds, else this process.
    #[arg(long, value_enum, default_value = "auto")]
    pub execute: Executor,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Executor {
    Auto,
    Local,
    Worker,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Write the audit log to stdout, one JSON object per line, in log order.
    Export(AuditExportFlags),
}

#[derive(Debug, Args)]
pub struct AuditExportFlags {
    /// At or after (RFC 3339 or YYYY-MM-DD).
    #[arg(long)]
    pub since: Option<String>,
    /// Before (RFC 3339 or YYYY-MM-DD).
    #[arg(long)]
    pub until: Option<String>,
    #[arg(long)]
    pub actor: Option<String>,
    /// A tool: its changes and its runs.
    #[arg(long)]
    pub tool: Option<String>,
    /// An action (run.failed) or a kind of action (run.*).
    #[arg(long)]
    pub action: Option<String>,
    /// Only lines after this log position (to resume an export).
    #[arg(long)]
    pub after: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum ToolsCommand {
    /// List the catalog, or the catalog as it was at a log position or time.
    List {
        /// A log position (e.g. 1200) or a time (RFC 3339 or YYYY-MM-DD).
        #[arg(long)]
        at: Option<String>,
        /// Include deleted tools.
        #[arg(long)]
        deleted: bool,
        #[arg(long)]
        json: bool,
    },
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
        Command::Runs(cmd) => commands::runs::run(&config, cmd).await,
        Command::Audit(AuditCommand::Export(flags)) => commands::audit::export(&config, flags).await,
        Command::Tools(cmd) => commands::tools::run(&config, cmd).await,
        Command::Config(_) => Ok(ExitCode::SUCCESS),
    }
}
