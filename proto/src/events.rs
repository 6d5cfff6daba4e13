//! Domain events: one variant per fact, past tense, each with a stable type name and a schema
//! version. A published event's meaning never changes; a new meaning is a new event type (or a
//! new schema version that this module still decodes).
//!
//! Tool streams (`tool-<name>`) record a tool's life: created, each version published, enabled,
//! disabled, deleted. Run streams (`run-<id>`) record one invocation: requested, each attempt,
//! each completed durable step, each failure with its retry decision, and exactly one outcome.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::envelope::Actor;
use crate::ids::{Position, RunId};
use crate::tool::{ToolDefinition, ToolName};

/// The tool now exists. Always appended together with its first `ToolVersionPublished`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolCreated {
    pub name: ToolName,
}

/// A new immutable version of a tool's definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolVersionPublished {
    pub name: ToolName,
    pub version: u32,
    pub code_sha256: String,
    pub definition: ToolDefinition,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolEnabled {
    pub name: ToolName,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolDisabled {
    pub name: ToolName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The tool is gone from the catalog; its stream (and so its history) stays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolDeleted {
    pub name: ToolName,
}

/// A run was asked for: the exact tool version and validated arguments it will use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRequested {
    pub run_id: RunId,
    pub tool: ToolName,
    pub tool_version: u32,
    pub arguments: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_run: Option<RunId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<RunId>,
    /// Durable steps are answered from this run's recorded results (a replay that only re-runs
    /// the changed logic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reuse_steps_from: Option<RunId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunAttemptStarted {
    pub attempt: u32,
    pub worker_id: String,
    pub lease_expires_at: DateTime<Utc>,
}

/// A durable step finished; its recorded result is returned instead of re-running it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunStepCompleted {
    pub attempt: u32,
    pub key: String,
    pub result: Value,
}

/// How an invocation failed. Retryability is the run layer's decision, recorded beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    UserError,
    Timeout,
    Oom,
    PermissionDenied,
    InvalidOutput,
    InvalidArguments,
    SandboxCrash,
    CodeInvalid,
    Cancelled,
}

impl ErrorKind {
    /// The kind's name on the wire: `user_error`, `timeout`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UserError => "user_error",
            Self::Timeout => "timeout",
            Self::Oom => "oom",
            Self::PermissionDenied => "permission_denied",
            Self::InvalidOutput => "invalid_output",
            Self::InvalidArguments => "invalid_arguments",
            Self::SandboxCrash => "sandbox_crash",
            Self::CodeInvalid => "code_invalid",
            Self::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error from tool code or the sandbox, as recorded in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunError {
    pub kind: ErrorKind,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<String>,
    /// The tool asked not to be retried (`ctx.fail`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub non_retryable: bool,
}

/// What the run layer decided after a failed attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "decision")]
pub enum RetryDecision {
    Retry { delay_ms: u64, next_attempt_at: DateTime<Utc> },
    GiveUp { reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunAttemptFailed {
    pub attempt: u32,
    pub error: RunError,
    pub retry: RetryDecision,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunSucceeded {
    pub attempt: u32,
    /// Always a JSON object: other values are wrapped as `{"result": value}`.
    pub output: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunFailed {
    pub attempts: u32,
    pub error: RunError,
}

/// The actor who cancelled is the event's actor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunCancelled {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_by: Option<Actor>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunTimedOut {
    pub attempts: u32,
    pub timeout_ms: u64,
}

/// A request to the API was refused by authentication or authorization (401/403), recorded on
/// the `auth-denied` stream so audit shows who tried what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthDenied {
    /// `missing_token`, `invalid_token`, `revoked_key`, `expired_token`, `insufficient_scope`...
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_scope: Option<String>,
    /// The actor name or API key id, when the credential was recognised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// The HTTP method, or the MCP method when the refusal is about one (`tools/call`).
    pub method: String,
    pub path: String,
}

/// What an attempt logged (`ctx.log`, `console.*`), recorded with the attempt's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunLogs {
    pub attempt: u32,
    pub entries: Vec<LogEntry>,
    /// The attempt logged more than its log budget; later lines were dropped.
    #[serde(default)]
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogEntry {
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    pub message: String,
    pub at: DateTime<Utc>,
}

/// An event in the log that cannot be turned into a domain event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("unknown event type {event_type:?}{}", at(*position))]
    UnknownType { event_type: String, position: Option<Position> },
    #[error("unsupported schema version {schema_version} of {event_type:?}{}", at(*position))]
    UnsupportedVersion { event_type: String, schema_version: u16, position: Option<Position> },
    #[error("malformed {event_type:?} payload{}: {message}", at(*position))]
    Malformed { event_type: String, message: String, position: Option<Position> },
}

fn at(p: Option<Position>) -> String {
    p.map(|p| format!(" at position {p}")).unwrap_or_default()
}

impl DecodeError {
    /// The same error, naming where in the log it was found.
    pub fn at(mut self, p: Position) -> Self {
        match &mut self {
            Self::UnknownType { position, .. }
            | Self::UnsupportedVersion { position, .. }
            | Self::Malformed { position, .. } => *position = Some(p),
        }
        self
    }

    pub fn position(&self) -> Option<Position> {
        match self {
            Self::UnknownType { position, .. }
            | Self::UnsupportedVersion { position, .. }
            | Self::Malformed { position, .. } => *position,
        }
    }
}

fn decode_payload<T: DeserializeOwned>(event_type: &str, payload: &str) -> Result<T, DecodeError> {
    serde_json::from_str(payload).map_err(|e| DecodeError::Malformed {
        event_type: event_type.to_owned(),
        message: e.to_string(),
        position: None,
    })
}

macro_rules! domain_events {
    ($($variant:ident = $name:literal, v = $version:literal);* $(;)?) => {
        /// Every fact Kiln records. The type name and schema version are stored beside the payload.
        #[derive(Debug, Clone, PartialEq)]
        #[non_exhaustive]
        pub enum DomainEvent {
            $($variant($variant),)*
        }

        impl DomainEvent {
            /// Every event type name, for documentation and audit filters.
            pub const TYPES: &'static [&'static str] = &[$($name),*];

            pub fn event_type(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => $name,)*
                }
            }

            pub fn schema_version(&self) -> u16 {
                match self {
                    $(Self::$variant(_) => $version,)*
                }
            }

            pub fn to_payload(&self) -> Value {
                let value = match self {
                    $(Self::$variant(e) => serde_json::to_value(e),)*
                };
                value.unwrap_or(Value::Null)
            }

            /// Decodes a payload (JSON text) of the given type and schema version.
            pub fn decode(event_type: &str, schema_version: u16, payload: &str) -> Result<Self, DecodeError> {
                match event_type {
                    $($name => {
                        if schema_version != $version {
                            return Err(DecodeError::UnsupportedVersion {
                                event_type: event_type.to_owned(),
                                schema_version,
                                position: None,
                            });
                        }
                        decode_payload(event_type, payload).map(Self::$variant)
                    })*
                    _ => Err(DecodeError::UnknownType { event_type: event_type.to_owned(), position: None }),
                }
            }
        }

        $(impl From<$variant> for DomainEvent {
            fn from(e: $variant) -> Self {
                Self::$variant(e)
            }
        })*
    };
}

domain_events! {
    ToolCreated = "tool.created", v = 1;
    ToolVersionPublished = "tool.version_published", v = 1;
    ToolEnabled = "tool.enabled", v = 1;
    ToolDisabled = "tool.disabled", v = 1;
    ToolDeleted = "tool.deleted", v = 1;
    RunRequested = "run.requested", v = 1;
    RunAttemptStarted = "run.attempt_started", v = 1;
    RunStepCompleted = "run.step_completed", v = 1;
    RunAttemptFailed = "run.attempt_failed", v = 1;
    RunSucceeded = "run.succeeded", v = 1;
    RunFailed = "run.failed", v = 1;
    RunCancelled = "run.cancelled", v = 1;
    RunTimedOut = "run.timed_out", v = 1;
    AuthDenied = "auth.denied", v = 1;
    RunLogs = "run.logs", v = 1;
}

impl DomainEvent {
    /// Whether this event ends a run: a run stream has exactly one of these.
    pub fn is_run_terminal(&self) -> bool {
        matches!(self, Self::RunSucceeded(_) | Self::RunFailed(_) | Self::RunCancelled(_) | Self::RunTimedOut(_))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn round_trip_through_type_name_and_payload() {
        let e = DomainEvent::from(RunAttemptFailed {
            attempt: 2,
            error: RunError {
                kind: ErrorKind::Timeout,
                message: "timed out after 100 ms".into(),
                name: None,
                stack: None,
                non_retryable: false,
            },
            retry: RetryDecision::Retry { delay_ms: 400, next_attempt_at: crate::envelope::now_micros() },
        });
        assert_eq!(e.event_type(), "run.attempt_failed");
        let payload = e.to_payload();
        assert_eq!(payload["error"]["kind"], json!("timeout"));
        assert_eq!(payload["retry"]["decision"], json!("retry"));
        assert_eq!(DomainEvent::decode(e.event_type(), 1, &payload.to_string()).unwrap(), e);
        for kind in [ErrorKind::UserError, ErrorKind::PermissionDenied, ErrorKind::Oom] {
            assert_eq!(serde_json::to_value(kind).unwrap(), json!(kind.as_str()));
        }
    }

    #[test]
    fn unknown_types_and_bad_payloads_are_errors_naming_the_position() {
        let err = DomainEvent::decode("tool.exploded", 1, &json!({}).to_string()).unwrap_err().at(Position(7));
        assert_eq!(err.to_string(), "unknown event type \"tool.exploded\" at position 7");
        let err = DomainEvent::decode("tool.created", 1, &json!({"name": 3}).to_string()).unwrap_err().at(Position(9));
        assert!(err.to_string().starts_with("malformed \"tool.created\" payload at position 9: "), "{err}");
        let err = DomainEvent::decode("tool.created", 2, &json!({"name": "x"}).to_string()).unwrap_err();
        assert!(matches!(err, DecodeError::UnsupportedVersion { schema_version: 2, .. }));
    }

    #[test]
    fn type_names_are_unique() {
        let mut names = DomainEvent::TYPES.to_vec();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DomainEvent::TYPES.len());
    }
}
