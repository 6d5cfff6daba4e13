//! Who is calling and what they may do. A request is authenticated into a [`Principal`]: its
//! actor (recorded in every event it causes), its scopes, and the network hosts it may grant to
//! the tools it creates. Without authentication configured (a loopback server) every request is
//! the `local` actor with every scope and no host restriction beyond the sandbox policy.
//!
//! Credentials: API keys ([`keys`], stored hashed in the database) and JWT bearer tokens checked
//! against a JWKS ([`jwt`]). The HTTP gate ([`http`]) maps each MCP request to the scope it
//! needs and answers 401/403 as the MCP authorization spec describes.

pub mod http;
pub mod jwks;
pub mod jwt;
pub mod keys;

use std::fmt;
use std::str::FromStr;

use kiln_proto::Actor;
use kiln_proto::tool::NetHost;
use serde::{Deserialize, Serialize};

/// A permission an API key or token carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scope {
    #[serde(rename = "tools:read")]
    ToolsRead,
    #[serde(rename = "tools:write")]
    ToolsWrite,
    #[serde(rename = "tools:run")]
    ToolsRun,
    #[serde(rename = "runs:read")]
    RunsRead,
    #[serde(rename = "audit:read")]
    AuditRead,
    /// Every scope.
    #[serde(rename = "admin")]
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 6] =
        [Scope::ToolsRead, Scope::ToolsWrite, Scope::ToolsRun, Scope::RunsRead, Scope::AuditRead, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ToolsRead => "tools:read",
            Self::ToolsWrite => "tools:write",
            Self::ToolsRun => "tools:run",
            Self::RunsRead => "runs:read",
            Self::AuditRead => "audit:read",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {0:?}: use tools:read, tools:write, tools:run, runs:read, audit:read or admin")]
pub struct UnknownScope(pub String);

impl FromStr for Scope {
    type Err = UnknownScope;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s).ok_or_else(|| UnknownScope(s.to_owned()))
    }
}

/// Which hosts a principal may let its tools reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostGrant {
    /// No restriction beyond the server's sandbox policy (the local user).
    Any,
    /// Only these (`host` covers every port of it).
    Only(Vec<NetHost>),
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub actor: Actor,
    pub scopes: Vec<Scope>,
    pub hosts: HostGrant,
    /// The API key id or token subject that authenticated it (for audit); None for `local`.
    pub credential: Option<String>,
}

impl Principal {
    /// The loopback user of a server without authentication: everything is allowed.
    pub fn local() -> Self {
        Self { actor: Actor::local(), scopes: vec![Scope::Admin], hosts: HostGrant::Any, credential: None }
    }

    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.iter().any(|s| *s == scope || *s == Scope::Admin)
    }

    /// Whether a tool created by this principal may declare `host`.
    pub fn may_reach(&self, host: &NetHost) -> bool {
        match &self.hosts {
            HostGrant::Any => true,
            HostGrant::Only(allowed) => allowed.iter().any(|a| host.is_within(a)),
        }
    }

    pub fn allowed_hosts_display(&self) -> Vec<String> {
        match &self.hosts {
            HostGrant::Any => vec!["*".to_owned()],
            HostGrant::Only(h) => h.iter().map(ToString::to_string).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_implies_every_scope_and_hosts_are_checked_by_port() {
        let p = Principal {
            actor: Actor::parse("key:ci").unwrap(),
            scopes: vec![Scope::ToolsRead],
            hosts: HostGrant::Only(vec![NetHost::parse("api.example.com").unwrap()]),
            credential: None,
        };
        assert!(p.has(Scope::ToolsRead) && !p.has(Scope::ToolsWrite));
        assert!(p.may_reach(&NetHost::parse("api.example.com:443").unwrap()));
        assert!(!p.may_reach(&NetHost::parse("evil.example.com").unwrap()));
        assert!(Principal::local().has(Scope::AuditRead));
        assert_eq!("runs:read".parse::<Scope>().unwrap(), Scope::RunsRead);
        assert!("tools:*".parse::<Scope>().is_err());
    }
}
