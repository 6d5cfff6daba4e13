//! Sandbox settings: where deno is, the server-wide policy every tool is intersected with, pool
//! sizing and the per-invocation caps that are not part of a tool's own `limits`.

use std::path::PathBuf;
use std::time::Duration;

use kiln_proto::tool::NetHost;

use super::DenoBinary;

#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub deno: DenoBinary,
    /// Deno's cache (`DENO_DIR`: transpiled code, npm/jsr packages). `None`: a private temporary
    /// directory removed when the sandbox is dropped.
    pub deno_dir: Option<PathBuf>,
    pub policy: SandboxPolicy,
    pub pool: PoolConfig,
    /// Logs and progress one invocation may emit, in bytes; the rest is dropped.
    pub max_log_bytes: u64,
    /// Time to start a process and load a tool's code (module top-level code included).
    pub load_timeout: Duration,
    /// After `ctx.signal` is aborted (cancel, timeout), how long the tool has to return before
    /// its process is killed. A tool that returns in time keeps its warm process.
    pub abort_grace: Duration,
    /// Limit for one `check_code`.
    pub check_timeout: Duration,
}

impl SandboxConfig {
    pub fn new(deno: DenoBinary) -> Self {
        Self {
            deno,
            deno_dir: None,
            policy: SandboxPolicy::default(),
            pool: PoolConfig::default(),
            max_log_bytes: 64 << 10,
            load_timeout: Duration::from_secs(30),
            abort_grace: Duration::from_millis(200),
            check_timeout: Duration::from_secs(10),
        }
    }
}

/// What the server allows any tool, whatever the tool declares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxPolicy {
    pub network: NetPolicy,
    /// `npm:` imports (downloaded by deno into `deno_dir`).
    pub allow_npm: bool,
    /// `jsr:` imports (fetched from jsr.io).
    pub allow_jsr: bool,
}

/// The server-wide network allow-list a tool's declared hosts are intersected with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NetPolicy {
    /// A tool gets exactly the hosts it declares.
    #[default]
    Unrestricted,
    /// A tool gets the hosts it declares that are within this list.
    AllowList(Vec<NetHost>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Live `deno` processes in total (busy or idle).
    pub max_processes: usize,
    /// Live processes serving one tool name (all versions).
    pub max_per_tool: usize,
    /// An idle process is stopped after this long unused.
    pub idle_timeout: Duration,
    /// A process is replaced after this many invocations.
    pub recycle_after: u64,
    /// A process is replaced when its resident memory has grown this much over what it used
    /// right after loading the tool.
    pub recycle_rss_growth_mb: u64,
    /// Resident memory is read every this many invocations (reading `/proc` is not free).
    pub rss_check_every: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_processes: 8,
            max_per_tool: 4,
            idle_timeout: Duration::from_secs(300),
            recycle_after: 10_000,
            recycle_rss_growth_mb: 256,
            rss_check_every: 16,
        }
    }
}
