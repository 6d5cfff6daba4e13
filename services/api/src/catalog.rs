//! The tool catalog's write side: creating, updating, enabling, disabling and deleting tools by
//! appending `tool.*` events to each tool's stream, and reading a tool's full history from it.
//!
//! Every change reads the tool's stream, folds it ([`ToolState`]), checks the caller's
//! `expectedVersion` (the tool version the caller last saw) and appends at the stream version it
//! read, so two concurrent writers cannot both win. Definitions are validated by
//! [`ToolDefinition::parse`], code is parsed by the sandbox without running it, and declared
//! network hosts must lie within the creator's own grant. Listing is not here: see
//! [`crate::live`], which serves the catalog from the `tool_catalog` projection kept current by
//! the event subscription.

use std::sync::Arc;

use kiln_proto::events::{ToolCreated, ToolDeleted, ToolDisabled, ToolEnabled, ToolVersionPublished};
use kiln_proto::tool::NetHost;
use kiln_proto::tool_state::{Lifecycle, ToolState, VersionInfo};
use kiln_proto::{DomainEvent, EventMetadata, NewEvent, Position, StreamId, StreamVersion, ToolDefinition, ToolName};
use kiln_store::{EventStore, ExpectedVersion, Store, StoreError};
use kiln_worker::Sandbox;
use kiln_worker::sandbox::{CodeInvalid, SandboxError, SandboxPolicy, grant_network};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::auth::Principal;

/// Why a catalog change was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    #[error(transparent)]
    Invalid(#[from] kiln_proto::ValidationErrors),
    #[error("{0}")]
    CodeInvalid(CodeInvalid),
    #[error("cannot check the tool's code: {0}")]
    CodeCheck(String),
    #[error("unknown tool \"{0}\"")]
    NotFound(String),
    #[error("tool \"{0}\" already exists; change it with tool_update")]
    AlreadyExists(ToolName),
    #[error("tool \"{0}\" is deleted; create it again with tool_create")]
    Deleted(ToolName),
    #[error("tool \"{tool}\" has no version {version} (latest is {latest})")]
    UnknownVersion { tool: ToolName, version: u32, latest: u32 },
    #[error("version conflict on tool \"{tool}\": expected version {expected}, current is {current}")]
    Conflict { tool: ToolName, expected: u32, current: u32 },
    #[error(
        "permissions.network: {} beyond what {actor} may reach ({}); a tool cannot hold more authority than its creator",
        hosts.join(", "),
        if allowed.is_empty() { "no hosts".to_owned() } else { allowed.join(", ") }
    )]
    NetworkBeyondGrant { actor: String, hosts: Vec<String>, allowed: Vec<String> },
    #[error("invalid tool name: {0}")]
    InvalidName(String),
    #[error(transparent)]
    Store(StoreError),
    #[error("corrupt tool stream: {0}")]
    Corrupt(String),
}

impl CatalogError {
    /// A stable code for clients: `invalid_definition`, `conflict`, ...
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid_definition",
            Self::CodeInvalid(_) => "code_invalid",
            Self::CodeCheck(_) => "code_check_failed",
            Self::NotFound(_) => "not_found",
            Self::AlreadyExists(_) => "already_exists",
            Self::Deleted(_) => "deleted",
            Self::UnknownVersion { .. } => "unknown_version",
            Self::Conflict { .. } => "conflict",
            Self::NetworkBeyondGrant { .. } => "permission_denied",
            Self::InvalidName(_) => "invalid_name",
            Self::Store(_) | Self::Corrupt(_) => "internal",
        }
    }

    /// Details a client can act on (the fields at fault, both versions of a conflict...).
    pub fn details(&self) -> Value {
        match self {
            Self::Invalid(v) => serde_json::json!({ "errors": v.0 }),
            Self::CodeInvalid(c) => serde_json::to_value(c).unwrap_or(Value::Null),
            Self::Conflict { expected, current, .. } => {
                serde_json::json!({ "expectedVersion": expected, "currentVersion": current })
            }
            Self::NetworkBeyondGrant { hosts, allowed, .. } => {
                serde_json::json!({ "refusedHosts": hosts, "allowedHosts": allowed })
            }
            _ => Value::Null,
        }
    }
}

impl From<StoreError> for CatalogError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// A version published by create or update.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Published {
    pub name: ToolName,
    pub version: u32,
    pub code_sha256: String,
    pub warnings: Vec<String>,
    /// Where the change landed in the log (the live catalog shows it once it got there).
    #[serde(skip)]
    pub position: Position,
}

/// A lifecycle change (enable, disable, delete).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StateChanged {
    pub name: ToolName,
    pub state: Lifecycle,
    pub version: u32,
    /// False when the tool already was in that state: nothing was recorded.
    pub changed: bool,
    #[serde(skip)]
    pub position: Option<Position>,
}

/// Lifecycle changes a caller can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleChange {
    Enable,
    Disable,
    Delete,
}

/// The write side of the catalog, on one store and sandbox.
#[derive(Debug, Clone)]
pub struct Catalog {
    store: Store,
    /// Parses code on create/update; None: code is checked at the first run only.
    sandbox: Option<Arc<dyn Sandbox>>,
    /// The server's sandbox policy, to warn about declared hosts it will not grant.
    policy: SandboxPolicy,
}

/// Fields a `tool_update` may change.
pub const UPDATABLE_FIELDS: &[&str] =
    &["title", "description", "code", "inputSchema", "outputSchema", "permissions", "limits", "retry", "annotations"];

impl Catalog {
    pub fn new(store: Store, sandbox: Option<Arc<dyn Sandbox>>, policy: SandboxPolicy) -> Self {
        Self { store, sandbox, policy }
    }

    /// The tool's state as its stream says now; None if it never existed.
    pub async fn state(&self, name: &ToolName) -> Result<Option<ToolState>, CatalogError> {
        let events = read_stream(&self.store, &StreamId::tool(name)).await?;
        ToolState::fold(&events).map_err(|e| CatalogError::Corrupt(e.to_string()))
    }

    /// A tool that exists and is not deleted.
    pub async fn existing(&self, name: &str) -> Result<ToolState, CatalogError> {
        let name = parse_name(name)?;
        match self.state(&name).await? {
            None => Err(CatalogError::NotFound(name.to_string())),
            Some(s) if s.lifecycle == Lifecycle::Deleted => Err(CatalogError::Deleted(name)),
            Some(s) => Ok(s),
        }
    }

    /// Creates a tool (or re-creates a deleted one, keeping its history and version numbers).
    pub async fn create(&self, who: &Principal, input: &Value) -> Result<Published, CatalogError> {
        let parsed = ToolDefinition::parse(input)?;
        let definition = parsed.definition;
        let mut warnings = parsed.warnings;
        self.check(who, &definition, &mut warnings).await?;
        let stream = StreamId::tool(&definition.name);
        let existing = self.state(&definition.name).await?;
        let (expected, version) = match &existing {
            None => (ExpectedVersion::NoStream, 1),
            Some(s) if s.lifecycle == Lifecycle::Deleted => {
                (ExpectedVersion::Exact(s.stream_version), s.next_version())
            }
            Some(_) => return Err(CatalogError::AlreadyExists(definition.name)),
        };
        let code_sha256 = definition.code_sha256();
        let events = [
            DomainEvent::from(ToolCreated { name: definition.name.clone() }),
            ToolVersionPublished {
                name: definition.name.clone(),
                version,
                code_sha256: code_sha256.clone(),
                definition: definition.clone(),
            }
            .into(),
        ];
        let position = match self.append(who, &stream, expected, &events).await {
            Ok(p) => p,
            // Someone created it between our read and our append.
            Err(CatalogError::Store(StoreError::WrongExpectedVersion { .. })) => {
                return Err(CatalogError::AlreadyExists(definition.name));
            }
            Err(e) => return Err(e),
        };
        Ok(Published { name: definition.name, version, code_sha256, warnings, position })
    }

    /// Publishes a new version with `changes` applied to the current definition. A field set to
    /// `null` is removed (back to its default).
    pub async fn update(
        &self,
        who: &Principal,
        name: &str,
        expected_version: Option<u32>,
        changes: &Map<String, Value>,
    ) -> Result<Published, CatalogError> {
        let state = self.existing(name).await?;
        let current = current(&state)?;
        check_expected(&state, expected_version)?;
        let mut merged = match current.definition.to_value() {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        for (k, v) in changes {
            if v.is_null() {
                merged.remove(k);
            } else {
                merged.insert(k.clone(), v.clone());
            }
        }
        let parsed = ToolDefinition::parse(&Value::Object(merged))?;
        let definition = parsed.definition;
        let mut warnings = parsed.warnings;
        self.check(who, &definition, &mut warnings).await?;
        let version = state.next_version();
        let code_sha256 = definition.code_sha256();
        let event = DomainEvent::from(ToolVersionPublished {
            name: definition.name.clone(),
            version,
            code_sha256: code_sha256.clone(),
            definition: definition.clone(),
        });
        let position = self.append_at(who, &state, &[event]).await?;
        Ok(Published { name: definition.name, version, code_sha256, warnings, position })
    }

    /// Enables, disables or deletes a tool. Asking for the state it is in records nothing.
    pub async fn change(
        &self,
        who: &Principal,
        name: &str,
        expected_version: Option<u32>,
        change: LifecycleChange,
    ) -> Result<StateChanged, CatalogError> {
        let state = self.existing(name).await?;
        let version = current(&state)?.version;
        check_expected(&state, expected_version)?;
        let name = state.name.clone();
        let (target, event) = match change {
            LifecycleChange::Enable => (Lifecycle::Enabled, DomainEvent::from(ToolEnabled { name: name.clone() })),
            LifecycleChange::Disable => {
                (Lifecycle::Disabled, DomainEvent::from(ToolDisabled { name: name.clone(), reason: None }))
            }
            LifecycleChange::Delete => (Lifecycle::Deleted, DomainEvent::from(ToolDeleted { name: name.clone() })),
        };
        if state.lifecycle == target {
            return Ok(StateChanged { name, state: target, version, changed: false, position: None });
        }
        let position = self.append_at(who, &state, &[event]).await?;
        Ok(StateChanged { name, state: target, version, changed: true, position: Some(position) })
    }

    /// Validation beyond the definition itself: the creator's network grant, and the code.
    async fn check(
        &self,
        who: &Principal,
        definition: &ToolDefinition,
        warnings: &mut Vec<String>,
    ) -> Result<(), CatalogError> {
        let beyond: Vec<&NetHost> = definition.permissions.network.iter().filter(|h| !who.may_reach(h)).collect();
        if !beyond.is_empty() {
            return Err(CatalogError::NetworkBeyondGrant {
                actor: who.actor.to_string(),
                hosts: beyond.iter().map(|h| h.to_string()).collect(),
                allowed: who.allowed_hosts_display(),
            });
        }
        let refused = grant_network(&definition.permissions.network, &self.policy.network).refused;
        if !refused.is_empty() {
            let hosts: Vec<String> = refused.iter().map(|h| h.to_string()).collect();
            warnings.push(format!(
                "permissions.network: the server's sandbox policy does not allow {}; calls to them will fail",
                hosts.join(", ")
            ));
        }
        if let Some(sandbox) = &self.sandbox {
            match sandbox.check_code(&definition.code).await {
                Ok(_) => {}
                Err(SandboxError::CodeInvalid(c)) => return Err(CatalogError::CodeInvalid(c)),
                Err(other) => return Err(CatalogError::CodeCheck(other.to_string())),
            }
        }
        Ok(())
    }

    /// Appends at the version `state` was read at; a race becomes a conflict naming both versions.
    async fn append_at(
        &self,
        who: &Principal,
        state: &ToolState,
        events: &[DomainEvent],
    ) -> Result<Position, CatalogError> {
        let stream = StreamId::tool(&state.name);
        let expected = ExpectedVersion::Exact(state.stream_version);
        match self.append(who, &stream, expected, events).await {
            Err(CatalogError::Store(StoreError::WrongExpectedVersion { .. })) => {
                let seen = current(state)?.version;
                let now = self.state(&state.name).await?.and_then(|s| s.current().map(|v| v.version)).unwrap_or(0);
                Err(CatalogError::Conflict { tool: state.name.clone(), expected: seen, current: now })
            }
            other => other,
        }
    }

    async fn append(
        &self,
        who: &Principal,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[DomainEvent],
    ) -> Result<Position, CatalogError> {
        let metadata = EventMetadata::new(who.actor.clone());
        let events = events.iter().map(|e| NewEvent::from_domain(e, metadata.clone())).collect();
        Ok(self.store.append(stream, expected, events).await?.last_position)
    }
}

/// One version of a tool (the current one unless `version` is given).
pub fn version_of(state: &ToolState, version: Option<u32>) -> Result<&VersionInfo, CatalogError> {
    match version {
        None => current(state),
        Some(v) => state.versions.get(&v).ok_or_else(|| CatalogError::UnknownVersion {
            tool: state.name.clone(),
            version: v,
            latest: state.current().map_or(0, |c| c.version),
        }),
    }
}

fn current(state: &ToolState) -> Result<&VersionInfo, CatalogError> {
    state.current().ok_or_else(|| CatalogError::Corrupt(format!("tool \"{}\" has no published version", state.name)))
}

fn check_expected(state: &ToolState, expected: Option<u32>) -> Result<(), CatalogError> {
    let current = current(state)?.version;
    match expected {
        Some(e) if e != current => Err(CatalogError::Conflict { tool: state.name.clone(), expected: e, current }),
        _ => Ok(()),
    }
}

pub fn parse_name(name: &str) -> Result<ToolName, CatalogError> {
    ToolName::parse(name).map_err(|e| CatalogError::InvalidName(e.to_string()))
}

/// Every event of a stream.
async fn read_stream(store: &Store, stream: &StreamId) -> Result<Vec<kiln_proto::RecordedEvent>, StoreError> {
    let mut out: Vec<kiln_proto::RecordedEvent> = Vec::new();
    loop {
        let after = out.last().map_or(StreamVersion(0), |e| e.stream_version);
        let page = store.read_stream(stream, after, 1_000).await?;
        if page.is_empty() {
            return Ok(out);
        }
        out.extend(page);
    }
}
