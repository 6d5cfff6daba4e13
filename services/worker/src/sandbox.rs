//! The execution layer for tool code: a [`Sandbox`] runs one invocation of one tool version and
//! says how it ended. [`DenoSandbox`] is the implementation: a pool of warm `deno` processes, each
//! bound to one tool version and permission set, talking to an embedded bridge script over
//! stdin/stdout.
//!
//! This module owns containment (permissions, limits, process lifecycle) and the classification
//! of failures into [`kiln_proto::events::ErrorKind`]. It does not decide retries, validate
//! arguments against schemas, or record anything: that is the run layer's business. See
//! `docs/sandbox.md` for the protocol, the accepted code formats and the JSON conversion rules.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use kiln_proto::RunId;
use kiln_proto::tool::{Limits, Permissions, ToolDefinition, ToolName};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub mod bench;
mod binary;
mod config;
mod deno;
mod error;
mod exchange;
mod permissions;
mod pool;
mod process;
mod protocol;

pub use binary::{DenoBinary, DenoLookupError, REQUIRED_DENO_VERSION};
pub use config::{NetPolicy, PoolConfig, SandboxConfig, SandboxPolicy};
pub use deno::{DenoSandbox, PoolStats};
pub use error::{CodeInvalid, Permission, SandboxError, SourcePosition, ToolError};
pub use permissions::{NetGrants, grant_network};

/// Runs tool code, contained. Implementations must be safe to share between tasks.
#[async_trait]
pub trait Sandbox: Send + Sync + fmt::Debug {
    /// Runs one invocation to its end. Every failure is a [`SandboxError`] whose
    /// [`kind`](SandboxError::kind) is the recorded [`ErrorKind`](kiln_proto::events::ErrorKind).
    async fn invoke(&self, invocation: Invocation) -> Result<InvocationOutput, SandboxError>;

    /// Checks that `code` parses as one of the accepted formats (and that its static imports
    /// are allowed), without running any of it. For validating a tool on create and update:
    /// `Err(SandboxError::CodeInvalid(_))` carries the line and column; any other error means
    /// the check itself could not be made.
    async fn check_code(&self, code: &str) -> Result<CodeFormat, SandboxError>;
}

/// One immutable version of a tool, as the sandbox runs it. `(name, version)` must identify the
/// code: warm processes are reused by that key.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolVersion {
    pub name: ToolName,
    pub version: u32,
    pub code: Arc<str>,
    pub permissions: Permissions,
    pub limits: Limits,
}

impl ToolVersion {
    pub fn new(definition: &ToolDefinition, version: u32) -> Self {
        Self {
            name: definition.name.clone(),
            version,
            code: Arc::from(definition.code.as_str()),
            permissions: definition.permissions.clone(),
            limits: definition.limits,
        }
    }
}

/// How the tool's code was read. See `docs/sandbox.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeFormat {
    /// An ES module with `export default async function (args, ctx) { ... }`.
    Module,
    /// A single expression: a function called as `f(args, ctx)`, or any other value.
    Expression,
    /// A function body run as `async function (args, context, ctx) { <code> }`, `context === args`.
    Body,
}

/// Answers the calls tool code makes back into the worker (`ctx.step`, `ctx.tools.call`). The
/// method names and parameters are documented in `docs/sandbox.md`. Tool code is hostile: every
/// call must be validated here.
#[async_trait]
pub trait HostCalls: Send + Sync + fmt::Debug {
    /// The result is returned to the tool; an `Err` is thrown in the tool as an `Error`.
    async fn call(&self, method: &str, params: Value) -> Result<Value, String>;
}

/// What a running tool reports besides its result. Logs and progress share one per-invocation
/// byte budget ([`SandboxConfig::max_log_bytes`]).
#[derive(Debug, Clone, PartialEq)]
pub enum SandboxEvent {
    Log {
        level: LogLevel,
        message: String,
    },
    Progress {
        done: f64,
        total: Option<f64>,
        message: Option<String>,
    },
    /// The budget ran out; later logs and progress of this invocation were dropped.
    LogsTruncated {
        limit_bytes: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// One call of one tool version.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub tool: Arc<ToolVersion>,
    pub args: Value,
    pub run_id: RunId,
    pub attempt: u32,
    /// Answers `ctx.step` / `ctx.tools.call`; without it those calls throw in the tool.
    pub host: Option<Arc<dyn HostCalls>>,
    /// Receives logs and progress as they happen.
    pub events: Option<mpsc::UnboundedSender<SandboxEvent>>,
    /// Cancelling aborts `ctx.signal`; the process is killed if the tool has not returned
    /// within [`SandboxConfig::abort_grace`].
    pub cancel: CancellationToken,
    /// Called from another invocation that holds its process while it waits for this one (a
    /// child run). It may start a process beyond the pool's limits, which would otherwise
    /// deadlock when parents hold every slot; the run layer's depth limit bounds the excess.
    pub nested: bool,
}

impl Invocation {
    pub fn new(tool: Arc<ToolVersion>, args: Value) -> Self {
        Self {
            tool,
            args,
            run_id: RunId::new(),
            attempt: 1,
            host: None,
            events: None,
            cancel: CancellationToken::new(),
            nested: false,
        }
    }
}

/// A successful invocation: the tool's result as JSON, exactly as returned (the run layer wraps
/// non-objects).
#[derive(Debug, Clone, PartialEq)]
pub struct InvocationOutput {
    pub value: Value,
    pub stats: InvocationStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvocationStats {
    /// A new process was started (and the code loaded) for this invocation.
    pub cold_start: bool,
    /// The `deno` process that ran it.
    pub process_id: u32,
    pub logs_truncated: bool,
}
