//! JWT bearer tokens checked against a JWKS: signature (RSA, EC or EdDSA keys; the key's family
//! must match the token's `alg`, so a public key can never be used as an HMAC secret), `exp`/`nbf`,
//! issuer and audience. The actor is `jwt:<sub>`; scopes come from `scope` (space-separated, as
//! OAuth issues them) or `scp` (array); the hosts the caller's tools may reach from a configured
//! claim (default `kiln_hosts`; absent: none).
//!
//! The keys come from a file or from the identity provider's URL over HTTPS ([`super::jwks`]).

use std::sync::Arc;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{DecodingKey, Validation, decode, decode_header};
use kiln_proto::Actor;
use kiln_proto::tool::NetHost;
use serde::Deserialize;
use serde_json::Value;

use super::jwks::{Jwks, JwksSource};
use super::{HostGrant, Principal, Scope};

/// How tokens are checked (from `[auth.jwt]`).
#[derive(Debug, Clone, PartialEq)]
pub struct JwtSettings {
    pub jwks: JwksSource,
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
    #[error("cannot get the JWKS {path}: {message}")]
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

/// Checks tokens against the configured JWKS.
#[derive(Debug)]
pub struct JwtVerifier {
    settings: JwtSettings,
    keys: Arc<Jwks>,
}

/// The key a token names (by `kid`, or the only key when it names none).
fn find<'a>(keys: &'a JwkSet, kid: Option<&str>) -> Option<&'a Jwk> {
    match kid {
        Some(kid) => keys.find(kid),
        None if keys.keys.len() == 1 => keys.keys.first(),
        None => None,
    }
}

impl JwtVerifier {
    /// A JWKS file is read now, so a wrong path is a start-up error; a URL is fetched in the
    /// background.
    pub fn new(settings: JwtSettings) -> Result<Self, JwtError> {
        let keys = Jwks::new(settings.jwks.clone())?;
        Ok(Self { settings, keys })
    }

    pub async fn verify(&self, token: &str) -> Result<Principal, JwtError> {
        let header = decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
        let kid = header.kid.as_deref();
        let mut keys = self.keys.current().await?;
        if find(&keys, kid).is_none() {
            // Perhaps the provider rotated its keys since the set was fetched.
            if let Some(fresh) = self.keys.refresh_for_unknown_kid().await? {
                keys = fresh;
            }
        }
        let jwk =
            find(&keys, kid).ok_or_else(|| JwtError::UnknownKey(kid.unwrap_or("(no kid in the token)").to_owned()))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| JwtError::Invalid(e.to_string()))?;
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
