//! How an invocation can fail, and how each failure maps to the recorded
//! [`ErrorKind`]/[`RunError`]. Classification of what the bridge reports lives here too, so the
//! rules (which thrown errors are permission failures, which are the tool's own) are in one place.

use std::fmt;

use kiln_proto::events::{ErrorKind, RunError};
use serde::Serialize;

use super::protocol::{BridgeCodeInvalid, BridgeError};

/// A failed invocation or code check.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// Tool code threw (or rejected with) this.
    #[error("{0}")]
    User(ToolError),
    #[error("the tool did not finish within {timeout_ms} ms; its process was stopped")]
    Timeout { timeout_ms: u64 },
    #[error("the tool ran out of memory (limit {memory_mb} MB, limits.memoryMb); its process was stopped")]
    Oom { memory_mb: u32 },
    #[error("permission denied: the tool needs {permission} access, which Kiln does not grant: {message}")]
    PermissionDenied { permission: Permission, message: String, stack: Option<String> },
    #[error("invalid output: {0}")]
    InvalidOutput(String),
    #[error("the sandbox process failed: {0}")]
    Crash(String),
    #[error("{0}")]
    CodeInvalid(CodeInvalid),
    #[error("the invocation was cancelled")]
    Cancelled,
}

impl SandboxError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::User(_) => ErrorKind::UserError,
            Self::Timeout { .. } => ErrorKind::Timeout,
            Self::Oom { .. } => ErrorKind::Oom,
            Self::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            Self::InvalidOutput(_) => ErrorKind::InvalidOutput,
            Self::Crash(_) => ErrorKind::SandboxCrash,
            Self::CodeInvalid(_) => ErrorKind::CodeInvalid,
            Self::Cancelled => ErrorKind::Cancelled,
        }
    }

    /// The error as recorded in a run's log. `non_retryable` is left for the run layer.
    pub fn to_run_error(&self) -> RunError {
        let (name, stack) = match self {
            Self::User(e) => (e.name.clone(), e.stack.clone()),
            Self::PermissionDenied { stack, .. } => (Some("NotCapable".to_owned()), stack.clone()),
            _ => (None, None),
        };
        let message = match self {
            Self::User(e) => e.message.clone(),
            other => other.to_string(),
        };
        RunError { kind: self.kind(), message, name, stack, non_retryable: false }
    }

    /// Classifies what the bridge reported for a thrown value.
    pub(crate) fn from_bridge(e: BridgeError) -> Self {
        if let Some(reason) = e.invalid_output {
            return Self::InvalidOutput(reason);
        }
        if let Some(c) = e.code_invalid {
            return Self::CodeInvalid(CodeInvalid::from_bridge(c, None));
        }
        let message = e.message.unwrap_or_default();
        if let Some(denied) = e.permission {
            return Self::PermissionDenied { permission: Permission::from_message(&denied), message, stack: e.stack };
        }
        if e.non_error {
            return Self::User(ToolError {
                name: None,
                message: format!("the tool threw a non-Error value: {message}"),
                stack: None,
            });
        }
        Self::User(ToolError { name: e.name, message, stack: e.stack })
    }
}

/// An error thrown by tool code. `stack` refers to the tool's code as `tool.ts:<line>:<column>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ToolError {
    pub name: Option<String>,
    pub message: String,
    pub stack: Option<String>,
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Which capability a tool tried to use without being granted it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Permission {
    Read,
    Write,
    Net,
    Env,
    Run,
    Ffi,
    Sys,
    Import,
    /// Spawning a `Worker`.
    Worker,
    /// `localStorage` or the Cache API.
    Storage,
    Other(String),
}

impl Permission {
    /// Reads Deno's `Requires <name> access to ...` message (and the bridge's own, same shape).
    pub fn from_message(message: &str) -> Self {
        let name = message
            .split_once("Requires ")
            .and_then(|(_, rest)| rest.split_once(" access"))
            .map_or("", |(name, _)| name.trim());
        match name {
            "read" => Self::Read,
            "write" => Self::Write,
            "net" => Self::Net,
            "env" => Self::Env,
            "run" => Self::Run,
            "ffi" => Self::Ffi,
            "sys" => Self::Sys,
            "import" => Self::Import,
            "worker" => Self::Worker,
            "storage" => Self::Storage,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Net => "net",
            Self::Env => "env",
            Self::Run => "run",
            Self::Ffi => "ffi",
            Self::Sys => "sys",
            Self::Import => "import",
            Self::Worker => "worker",
            Self::Storage => "storage",
            Self::Other(o) => o,
        })
    }
}

/// 1-based line and column in the tool's own code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SourcePosition {
    pub line: u32,
    pub column: u32,
}

/// Tool code that cannot be loaded: it does not parse, has no default export, or imports what
/// the server does not allow. Syntax errors always carry a position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CodeInvalid {
    pub message: String,
    pub position: Option<SourcePosition>,
    /// The offending line with a caret under the column, when there is a position.
    pub excerpt: Option<String>,
}

impl CodeInvalid {
    pub(crate) fn from_bridge(c: BridgeCodeInvalid, code: Option<&str>) -> Self {
        let position = match (c.line, c.column) {
            (Some(line), Some(column)) => Some(SourcePosition { line, column }),
            _ => None,
        };
        let excerpt = position.zip(code).and_then(|(p, code)| excerpt(code, p));
        Self { message: c.message, position, excerpt }
    }
}

fn excerpt(code: &str, p: SourcePosition) -> Option<String> {
    let line = code.lines().nth(usize::try_from(p.line).ok()?.checked_sub(1)?)?;
    let gutter = p.line.to_string();
    let pad = " ".repeat(gutter.len());
    let caret = " ".repeat(usize::try_from(p.column).unwrap_or(1).saturating_sub(1));
    Some(format!("{gutter} | {line}\n{pad} | {caret}^"))
}

impl fmt::Display for CodeInvalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some(p) => write!(f, "invalid tool code at line {}, column {}: {}", p.line, p.column, self.message)?,
            None => write!(f, "invalid tool code: {}", self.message)?,
        }
        if let Some(excerpt) = &self.excerpt {
            write!(f, "\n{excerpt}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_is_read_from_deno_messages() {
        let p = |m| Permission::from_message(m);
        assert_eq!(
            p(r#"Requires read access to "/etc/passwd", run again with the --allow-read flag"#),
            Permission::Read
        );
        assert_eq!(
            p(r#"Requires net access to "example.com:443", run again with the --allow-net flag"#),
            Permission::Net
        );
        assert_eq!(p("Requires worker access: Kiln tools cannot spawn Workers"), Permission::Worker);
        assert_eq!(p("something else"), Permission::Other(String::new()));
    }

    #[test]
    fn code_invalid_shows_the_line_and_a_caret() {
        let c = CodeInvalid::from_bridge(
            BridgeCodeInvalid { message: "Expression expected".into(), line: Some(2), column: Some(11) },
            Some("const a = 1;\nconst b = ;\n"),
        );
        assert_eq!(
            c.to_string(),
            "invalid tool code at line 2, column 11: Expression expected\n2 | const b = ;\n  |           ^"
        );
    }

    #[test]
    fn kinds_map_to_run_errors() {
        let e = SandboxError::User(ToolError { name: Some("TypeError".into()), message: "x".into(), stack: None });
        let r = e.to_run_error();
        assert_eq!((r.kind, r.message.as_str(), r.name.as_deref()), (ErrorKind::UserError, "x", Some("TypeError")));
        assert_eq!(SandboxError::Oom { memory_mb: 64 }.to_run_error().kind, ErrorKind::Oom);
        assert_eq!(SandboxError::Crash("gone".into()).kind(), ErrorKind::SandboxCrash);
    }
}
