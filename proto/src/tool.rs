//! The tool definition: what an agent submits to create or update a tool, validated into a type
//! that cannot be invalid. Field names are camelCase on the wire, as in MCP.
//!
//! Validation collects every problem it finds, each naming its field (`limits.timeoutMs: ...`),
//! so an agent can fix all of them in one round trip. Whether the code parses is the sandbox's
//! business (it needs the real runtime); this module checks everything else.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

mod net;

pub use net::NetHost;

/// A tool's name, following MCP's tool-name rules: 1-64 characters of `A-Za-z0-9._-`, starting
/// with a letter. Case-sensitive.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ToolName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid tool name {0:?}: use 1-64 characters of A-Z a-z 0-9 . _ - starting with a letter")]
pub struct InvalidToolName(pub String);

impl ToolName {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: impl Into<String>) -> Result<Self, InvalidToolName> {
        let s = s.into();
        let valid = s.len() <= Self::MAX_LEN
            && s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if valid { Ok(Self(s)) } else { Err(InvalidToolName(s)) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ToolName {
    type Error = InvalidToolName;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<ToolName> for String {
    fn from(n: ToolName) -> String {
        n.0
    }
}

impl fmt::Display for ToolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a tool may reach. Everything not listed is denied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Permissions {
    /// Hosts (optionally with a port) the tool may connect to; sorted, deduplicated.
    #[serde(default)]
    pub network: Vec<NetHost>,
}

/// Resource limits for one invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    pub timeout_ms: u64,
    pub memory_mb: u32,
    pub max_output_bytes: u64,
}

impl Limits {
    pub const TIMEOUT_MS: Bound = Bound { min: 1, max: 900_000, default: 30_000 };
    pub const MEMORY_MB: Bound = Bound { min: 16, max: 4_096, default: 128 };
    pub const MAX_OUTPUT_BYTES: Bound = Bound { min: 1, max: 16 << 20, default: 1 << 20 };
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout_ms: Self::TIMEOUT_MS.default,
            memory_mb: Self::MEMORY_MB.default as u32,
            max_output_bytes: Self::MAX_OUTPUT_BYTES.default,
        }
    }
}

/// How failed attempts are retried: exponential backoff with jitter, capped.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Attempts in total, including the first.
    pub max_attempts: u32,
    pub initial_delay_ms: u64,
    pub backoff_factor: f64,
    pub max_delay_ms: u64,
}

impl RetryPolicy {
    pub const MAX_ATTEMPTS: Bound = Bound { min: 1, max: 20, default: 3 };
    pub const INITIAL_DELAY_MS: Bound = Bound { min: 0, max: 3_600_000, default: 1_000 };
    pub const MAX_DELAY_MS: Bound = Bound { min: 0, max: 86_400_000, default: 60_000 };
    pub const BACKOFF_FACTOR: (f64, f64, f64) = (1.0, 10.0, 2.0);
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: Self::MAX_ATTEMPTS.default as u32,
            initial_delay_ms: Self::INITIAL_DELAY_MS.default,
            backoff_factor: Self::BACKOFF_FACTOR.2,
            max_delay_ms: Self::MAX_DELAY_MS.default,
        }
    }
}

/// Inclusive bounds and default of an integer setting.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub min: u64,
    pub max: u64,
    pub default: u64,
}

/// MCP tool annotations: hints for clients, never trusted for security.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToolAnnotations {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_only_hint: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destructive_hint: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotent_hint: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_world_hint: Option<bool>,
}

/// A validated tool definition: one immutable version of a tool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolDefinition {
    pub name: ToolName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub description: String,
    pub code: String,
    pub input_schema: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<Map<String, Value>>,
    #[serde(default)]
    pub permissions: Permissions,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub retry: RetryPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<ToolAnnotations>,
}

/// A definition that passed validation, with the non-fatal remarks made while normalising it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedTool {
    pub definition: ToolDefinition,
    pub warnings: Vec<String>,
}

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// Every problem found in a tool definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid tool definition: ")?;
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", e.field, e.message)?;
        }
        Ok(())
    }
}

impl ValidationErrors {
    /// The errors for one field, for tests and for clients that highlight fields.
    pub fn for_field(&self, field: &str) -> Vec<&FieldError> {
        self.0.iter().filter(|e| e.field == field).collect()
    }
}

/// Everything an agent may send; all optional so validation can name each missing field.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ToolDefinitionInput {
    name: Option<String>,
    title: Option<String>,
    description: Option<String>,
    code: Option<String>,
    input_schema: Option<Value>,
    output_schema: Option<Value>,
    permissions: Option<PermissionsInput>,
    limits: Option<LimitsInput>,
    retry: Option<RetryInput>,
    annotations: Option<ToolAnnotations>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PermissionsInput {
    #[serde(default)]
    network: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LimitsInput {
    timeout_ms: Option<u64>,
    memory_mb: Option<u64>,
    max_output_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RetryInput {
    max_attempts: Option<u64>,
    initial_delay_ms: Option<u64>,
    backoff_factor: Option<f64>,
    max_delay_ms: Option<u64>,
}

impl ToolDefinition {
    pub const MAX_CODE_BYTES: usize = 1 << 20;
    pub const MAX_DESCRIPTION_CHARS: usize = 10_000;
    pub const MAX_TITLE_CHARS: usize = 200;
    pub const MAX_SCHEMA_BYTES: usize = 64 << 10;

    /// Validates a definition as an agent sent it (JSON, camelCase) and fills in defaults.
    pub fn parse(value: &Value) -> Result<ParsedTool, ValidationErrors> {
        let input: ToolDefinitionInput = serde_path_to_error::deserialize(value).map_err(|e| {
            let field = match e.path().to_string() {
                p if p == "." => "definition".to_owned(),
                p => p,
            };
            ValidationErrors(vec![FieldError { field, message: e.inner().to_string() }])
        })?;
        Validator::default().run(input)
    }

    /// Hex SHA-256 of the code: identifies a code version in history and audit.
    pub fn code_sha256(&self) -> String {
        hex::encode(Sha256::digest(self.code.as_bytes()))
    }

    /// This definition as the JSON an agent would send to recreate it.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

#[derive(Default)]
struct Validator {
    errors: Vec<FieldError>,
    warnings: Vec<String>,
}

impl Validator {
    fn error(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError { field: field.to_owned(), message: message.into() });
    }

    fn run(mut self, input: ToolDefinitionInput) -> Result<ParsedTool, ValidationErrors> {
        let name = match input.name {
            None => {
                self.error("name", "required");
                None
            }
            Some(n) => ToolName::parse(n)
                .map_err(|e| self.error("name", e.to_string().replacen("invalid tool name ", "", 1)))
                .ok(),
        };
        let title = input.title.filter(|t| {
            let ok = t.chars().count() <= ToolDefinition::MAX_TITLE_CHARS;
            if !ok {
                self.error("title", format!("at most {} characters", ToolDefinition::MAX_TITLE_CHARS));
            }
            ok
        });
        let description = self.text("description", input.description, ToolDefinition::MAX_DESCRIPTION_CHARS);
        let code = self.code(input.code);
        let input_schema =
            self.schema("inputSchema", input.input_schema.or_else(|| Some(serde_json::json!({"type": "object"}))));
        let output_schema = input.output_schema.and_then(|s| self.schema("outputSchema", Some(s)));
        let permissions = self.permissions(input.permissions);
        let limits = self.limits(input.limits.unwrap_or_default());
        let retry = self.retry(input.retry.unwrap_or_default());

        match (name, description, code, input_schema) {
            (Some(name), Some(description), Some(code), Some(input_schema)) if self.errors.is_empty() => {
                Ok(ParsedTool {
                    definition: ToolDefinition {
                        name,
                        title,
                        description,
                        code,
                        input_schema,
                        output_schema,
                        permissions,
                        limits,
                        retry,
                        annotations: input.annotations,
                    },
                    warnings: self.warnings,
                })
            }
            _ => Err(ValidationErrors(self.errors)),
        }
    }

    fn text(&mut self, field: &str, value: Option<String>, max_chars: usize) -> Option<String> {
        match value {
            None => self.error(field, "required"),
            Some(v) if v.trim().is_empty() => self.error(field, "must not be empty"),
            Some(v) if v.chars().count() > max_chars => self.error(field, format!("at most {max_chars} characters")),
            Some(v) => return Some(v),
        }
        None
    }

    fn code(&mut self, code: Option<String>) -> Option<String> {
        match code {
            None => self.error("code", "required"),
            Some(c) if c.trim().is_empty() => self.error("code", "must not be empty"),
            Some(c) if c.len() > ToolDefinition::MAX_CODE_BYTES => self.error(
                "code",
                format!("{} bytes is over the limit of {} bytes", c.len(), ToolDefinition::MAX_CODE_BYTES),
            ),
            Some(c) => return Some(c),
        }
        None
    }

    /// A schema must be a JSON object, a valid JSON Schema, compile (no remote `$ref`), and
    /// describe an object, as MCP requires of input and output schemas.
    fn schema(&mut self, field: &str, schema: Option<Value>) -> Option<Map<String, Value>> {
        let Some(Value::Object(mut map)) = schema else {
            self.error(field, "must be a JSON Schema object");
            return None;
        };
        match map.get("type") {
            None => {
                map.insert("type".to_owned(), Value::String("object".to_owned()));
                self.warnings.push(format!("{field} had no \"type\"; set to \"object\""));
            }
            Some(Value::String(t)) if t == "object" => {}
            Some(other) => {
                self.error(field, format!("\"type\" must be \"object\" (MCP requires it), got {other}"));
                return None;
            }
        }
        let value = Value::Object(map);
        let size = value.to_string().len();
        if size > ToolDefinition::MAX_SCHEMA_BYTES {
            self.error(field, format!("{size} bytes is over the limit of {} bytes", ToolDefinition::MAX_SCHEMA_BYTES));
            return None;
        }
        if let Err(e) = jsonschema::meta::validate(&value) {
            let at = e.instance_path().to_string();
            let at = if at.is_empty() { String::new() } else { format!(" at {at}") };
            self.error(field, format!("not a valid JSON Schema{at}: {e}"));
            return None;
        }
        if let Err(e) = jsonschema::validator_for(&value) {
            self.error(field, format!("JSON Schema does not compile: {e}"));
            return None;
        }
        match value {
            Value::Object(map) => Some(map),
            _ => None,
        }
    }

    fn permissions(&mut self, input: Option<PermissionsInput>) -> Permissions {
        let mut network = Vec::new();
        for (i, host) in input.map(|p| p.network).unwrap_or_default().into_iter().enumerate() {
            match NetHost::parse(&host) {
                Ok(h) => network.push(h),
                Err(e) => self.error(&format!("permissions.network[{i}]"), e.to_string()),
            }
        }
        network.sort();
        network.dedup();
        Permissions { network }
    }

    fn bounded(&mut self, field: &str, value: Option<u64>, bound: Bound) -> u64 {
        match value {
            None => bound.default,
            Some(v) if (bound.min..=bound.max).contains(&v) => v,
            Some(v) => {
                self.error(field, format!("must be between {} and {} (got {v})", bound.min, bound.max));
                bound.default
            }
        }
    }

    fn limits(&mut self, input: LimitsInput) -> Limits {
        Limits {
            timeout_ms: self.bounded("limits.timeoutMs", input.timeout_ms, Limits::TIMEOUT_MS),
            memory_mb: self.bounded("limits.memoryMb", input.memory_mb, Limits::MEMORY_MB) as u32,
            max_output_bytes: self.bounded("limits.maxOutputBytes", input.max_output_bytes, Limits::MAX_OUTPUT_BYTES),
        }
    }

    fn retry(&mut self, input: RetryInput) -> RetryPolicy {
        let (min_f, max_f, default_f) = RetryPolicy::BACKOFF_FACTOR;
        let backoff_factor = match input.backoff_factor {
            None => default_f,
            Some(f) if f.is_finite() && (min_f..=max_f).contains(&f) => f,
            Some(f) => {
                self.error("retry.backoffFactor", format!("must be between {min_f} and {max_f} (got {f})"));
                default_f
            }
        };
        let policy = RetryPolicy {
            max_attempts: self.bounded("retry.maxAttempts", input.max_attempts, RetryPolicy::MAX_ATTEMPTS) as u32,
            initial_delay_ms: self.bounded(
                "retry.initialDelayMs",
                input.initial_delay_ms,
                RetryPolicy::INITIAL_DELAY_MS,
            ),
            backoff_factor,
            max_delay_ms: self.bounded("retry.maxDelayMs", input.max_delay_ms, RetryPolicy::MAX_DELAY_MS),
        };
        if policy.max_delay_ms < policy.initial_delay_ms {
            self.error(
                "retry.maxDelayMs",
                format!("must be at least retry.initialDelayMs ({})", policy.initial_delay_ms),
            );
        }
        policy
    }
}

#[cfg(test)]
mod tests;
