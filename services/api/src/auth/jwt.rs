//! JWT bearer tokens checked against a JWKS: signature (RSA, EC or EdDSA keys; the key's family
//! must match the token's `alg`, so a public key can never be used as an HMAC secret), `exp`/`nbf`,
//! issuer and audience. The actor is `jwt:<sub>`; scopes come from `scope` (space-separated, as
//! OAuth issues them) or `scp` (array); the hosts the caller's tools may reach from a configured
//! claim (default `kiln_hosts`; absent: none).
//!
//! The JWKS is read from a file, re-read whenever the file changes (rotate keys by replacing
//! it). Fetching it over HTTPS from the identity provider is left to whatever deploys Kiln
//! (a sidecar or cron writing the file), so this binary carries no TLS client.

use std::path::PathBuf;
use std::sync::RwLock;
use std::time::SystemTime;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation, decode, decode_header};
use kiln_proto::Actor;
use kiln_proto::tool::NetHost;
use serde::Deserialize;
use serde_json::Value;

use super::{HostGrant, Principal, Scope};

/// How tokens are checked (from `[auth.jwt]`).
#[derive(Debug, Clone, PartialEq)]
pub struct JwtSettings {
    pub jwks_file: PathBuf,
    pub issuer: String,
    pub audience: String,
    /// The claim listing the hosts the caller's tools may reach.
    pub hosts_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    #[error("cannot read the JWKS {path}: {message}")]
    Jwks { path: String, message: String },
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("no key {0:?} in the JWKS")]
    UnknownKey(String),
    #[error("token expired")]
    Expired,
    #[error("token refused: {0}")]
    Invalid(String),
    #[error("claim {claim}: {message}")]
    Claim { claim: &'static str, message: String },
}

impl JwtError {
    /// The `auth.denied` reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Expired => "expired_token",
            Self::Jwks { .. } => "jwks_unavailable",
            _ => "invalid_token",
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<Vec<String>>,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

/// Checks tokens against the configured JWKS file.
#[derive(Debug)]
pub struct JwtVerifier {
    settings: JwtSettings,
    /// The key set and the file's modification time it was read at.
    keys: RwLock<(Option<SystemTime>, JwkSet)>,
}

impl JwtVerifier {
    /// Reads the JWKS once, so a wrong path is a start-up error.
    pub fn new(settings: JwtSettings) -> Result<Self, JwtError> {
        let (mtime, keys) = read_jwks(&settings.jwks_file)?;
        Ok(Self { settings, keys: RwLock::new((mtime, keys)) })
    }

    fn reload_if_changed(&self) -> Result<(), JwtError> {
        let mtime = std::fs::metadata(&self.settings.jwks_file).and_then(|m| m.modified()).ok();
        let current = self.keys.read().unwrap_or_else(|e| e.into_inner()).0;
        if mtime != current {
            let fresh = read_jwks(&self.settings.jwks_file)?;
            *self.keys.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        }
        Ok(())
    }

    pub fn verify(&self, token: &str) -> Result<Principal, JwtError> {
        self.reload_if_changed()?;
        let header = decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
        let key = {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            let jwk = match &header.kid {
                Some(kid) => keys.1.find(kid).ok_or_else(|| JwtError::UnknownKey(kid.clone()))?,
                None if keys.1.keys.len() == 1 => &keys.1.keys[0],
                None => return Err(JwtError::UnknownKey("(no kid in the token)".to_owned())),
            };
            DecodingKey::from_jwk(jwk).map_err(|e| JwtError::Invalid(e.to_string()))?
        };
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.leeway = self.settings.leeway_secs;
        let data = decode::<Claims>(token, &key, &validation).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => JwtError::Expired,
            _ => JwtError::Invalid(e.to_string()),
        })?;
        let claims = data.claims;
        let actor = Actor::parse(format!("jwt:{}", claims.sub))
            .map_err(|e| JwtError::Claim { claim: "sub", message: e.to_string() })?;
        let names: Vec<String> = match (claims.scope, claims.scp) {
            (Some(s), _) => s.split_whitespace().map(str::to_owned).collect(),
            (None, Some(list)) => list,
            (None, None) => Vec::new(),
        };
        // Scopes Kiln does not know (other APIs' scopes in the same token) are ignored.
        let scopes = names.iter().filter_map(|s| s.parse::<Scope>().ok()).collect();
        let hosts = match claims.rest.get(&self.settings.hosts_claim) {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|h| {
                    h.as_str()
                        .and_then(|h| NetHost::parse(h).ok())
                        .ok_or_else(|| JwtError::Claim { claim: "hosts", message: format!("{h} is not a host") })
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(JwtError::Claim { claim: "hosts", message: format!("expected an array, got {other}") });
            }
        };
        Ok(Principal { actor, scopes, hosts: HostGrant::Only(hosts), credential: Some(format!("jwt:{}", claims.sub)) })
    }
}

fn read_jwks(path: &std::path::Path) -> Result<(Option<SystemTime>, JwkSet), JwtError> {
    let err = |message: String| JwtError::Jwks { path: path.display().to_string(), message };
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).map_err(|e| err(e.to_string()))?;
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let keys: JwkSet = serde_json::from_str(&text).map_err(|e| err(format!("not a JWK set: {e}")))?;
    if keys.keys.is_empty() {
        return Err(err("the set has no keys".to_owned()));
    }
    Ok((Some(mtime), keys))
}
