//! API keys: created by `kiln keys create`, shown once, stored as a SHA-256 of the secret in
//! `kiln_api_keys` with the key's actor name, scopes and allowed network hosts.
//!
//! A key reads `kiln_<id>_<secret>`: the id (16 hex) finds the row, the secret (64 hex, 256
//! random bits) is hashed and compared in constant time. Verified keys are cached for
//! [`CACHE_TTL`], so a revocation takes effect within that time on every replica.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use kiln_proto::Actor;
use kiln_proto::tool::NetHost;
use kiln_store::projection::{SqlValue, Stmt};
use kiln_store::{Store, StoreError};
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{HostGrant, Principal, Scope};

/// How long a verified (or revoked) key is remembered before the database is asked again.
pub const CACHE_TTL: Duration = Duration::from_secs(5);

/// One API key as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    pub allowed_hosts: Vec<NetHost>,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

impl KeyInfo {
    /// The principal this key authenticates.
    pub fn principal(&self) -> Principal {
        Principal {
            actor: Actor::parse(format!("key:{}", self.name)).unwrap_or_else(|_| Actor::system("invalid-key-name")),
            scopes: self.scopes.clone(),
            hosts: HostGrant::Only(self.allowed_hosts.clone()),
            credential: Some(self.id.clone()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("invalid key name {0:?}: use 1-64 characters of A-Z a-z 0-9 . _ -")]
    InvalidName(String),
    #[error("a key needs at least one scope")]
    NoScopes,
    #[error("no key with id or name {0:?}")]
    NotFound(String),
    #[error("key {0:?} is already revoked")]
    AlreadyRevoked(String),
    #[error("the key table is malformed: {0}")]
    Malformed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a presented key was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    Malformed,
    Unknown,
    Revoked,
}

/// A key (with its stored hash) or its absence, and when the database said so.
type Cached = (Option<(KeyInfo, String)>, Instant);

/// The key table, with a short verification cache.
#[derive(Debug, Clone)]
pub struct ApiKeys {
    store: Store,
    /// id -> (key or None if unknown, when it was read).
    cache: Arc<Mutex<HashMap<String, Cached>>>,
}

impl ApiKeys {
    pub fn new(store: Store) -> Self {
        Self { store, cache: Arc::default() }
    }

    /// Creates a key; returns it and the full secret token, which is never shown again.
    pub async fn create(
        &self,
        name: &str,
        scopes: Vec<Scope>,
        allowed_hosts: Vec<NetHost>,
    ) -> Result<(KeyInfo, String), KeyError> {
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid_name {
            return Err(KeyError::InvalidName(name.to_owned()));
        }
        if scopes.is_empty() {
            return Err(KeyError::NoScopes);
        }
        let mut id = [0u8; 8];
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut id);
        rand::rng().fill_bytes(&mut secret);
        let (id, secret) = (hex::encode(id), hex::encode(secret));
        let info = KeyInfo {
            id: id.clone(),
            name: name.to_owned(),
            scopes,
            allowed_hosts,
            created_at: Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
            revoked_at: None,
        };
        let mut tx = self.store.begin_write().await?;
        tx.execute(
            &Stmt::new(
                "INSERT INTO kiln_api_keys (key_id, name, secret_sha256, scopes, allowed_hosts, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            ),
            &[
                SqlValue::from(id.as_str()),
                name.into(),
                hash(&secret).into(),
                serde_json::to_string(&info.scopes).unwrap_or_default().into(),
                serde_json::to_string(&info.allowed_hosts).unwrap_or_default().into(),
                info.created_at.clone().into(),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok((info, format!("kiln_{id}_{secret}")))
    }

    /// Every key, newest first, revoked ones included.
    pub async fn list(&self) -> Result<Vec<KeyInfo>, KeyError> {
        Ok(self.select("").await?.into_iter().map(|(k, _)| k).collect())
    }

    /// Revokes a key by id or name.
    pub async fn revoke(&self, id_or_name: &str) -> Result<KeyInfo, KeyError> {
        let keys = self.list().await?;
        let key = keys
            .iter()
            .find(|k| k.id == id_or_name)
            .or_else(|| keys.iter().find(|k| k.name == id_or_name && k.revoked_at.is_none()))
            .ok_or_else(|| KeyError::NotFound(id_or_name.to_owned()))?;
        if key.revoked_at.is_some() {
            return Err(KeyError::AlreadyRevoked(key.id.clone()));
        }
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
        let mut tx = self.store.begin_write().await?;
        tx.execute(
            &Stmt::new("UPDATE kiln_api_keys SET revoked_at = $2 WHERE key_id = $1"),
            &[key.id.as_str().into(), now.as_str().into()],
        )
        .await?;
        tx.commit().await?;
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).remove(&key.id);
        Ok(KeyInfo { revoked_at: Some(now), ..key.clone() })
    }

    /// Checks a presented token. `Ok(Err(_))` is a refusal; `Err` means the check could not run.
    pub async fn verify(&self, token: &str) -> Result<Result<KeyInfo, Rejected>, KeyError> {
        let Some((id, secret)) = parse_token(token) else { return Ok(Err(Rejected::Malformed)) };
        let cached = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.get(id).filter(|(_, at)| at.elapsed() < CACHE_TTL).map(|(k, _)| k.clone())
        };
        let found = match cached {
            Some(k) => k,
            None => {
                let k = self.select(id).await?.into_iter().next();
                let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                if cache.len() > 10_000 {
                    cache.clear();
                }
                cache.insert(id.to_owned(), (k.clone(), Instant::now()));
                k
            }
        };
        let Some((key, stored_hash)) = found else { return Ok(Err(Rejected::Unknown)) };
        if !constant_time_eq(hash(secret).as_bytes(), stored_hash.as_bytes()) {
            return Ok(Err(Rejected::Unknown));
        }
        if key.revoked_at.is_some() {
            return Ok(Err(Rejected::Revoked));
        }
        Ok(Ok(key))
    }

    /// Keys with their stored hashes; `id` (validated hex) narrows to one.
    async fn select(&self, id: &str) -> Result<Vec<(KeyInfo, String)>, KeyError> {
        // The store offers text rows for raw SQL only; `id` is 16 hex digits (checked by
        // `parse_token`), so inlining it is safe.
        debug_assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        let filter = if id.is_empty() { String::new() } else { format!(" WHERE key_id = '{id}'") };
        let sql = format!(
            "SELECT key_id, name, secret_sha256, scopes, allowed_hosts, created_at, revoked_at FROM kiln_api_keys{filter}
             ORDER BY created_at DESC"
        );
        let mut tx = self.store.begin_read().await?;
        let rows = tx.fetch_text_rows(&sql).await?;
        tx.rollback().await?;
        rows.into_iter().map(row_to_key).collect()
    }
}

fn row_to_key(row: Vec<Option<String>>) -> Result<(KeyInfo, String), KeyError> {
    let col = |i: usize| row.get(i).cloned().flatten();
    let text = |i: usize| col(i).ok_or_else(|| KeyError::Malformed(format!("column {i} is NULL")));
    let scopes: Vec<Scope> = serde_json::from_str(&text(3)?).map_err(|e| KeyError::Malformed(e.to_string()))?;
    let hosts: Vec<NetHost> = serde_json::from_str(&text(4)?).map_err(|e| KeyError::Malformed(e.to_string()))?;
    let info = KeyInfo {
        id: text(0)?,
        name: text(1)?,
        scopes,
        allowed_hosts: hosts,
        created_at: text(5)?,
        revoked_at: col(6),
    };
    Ok((info, text(2)?))
}

/// `kiln_<16 hex>_<64 hex>` -> (id, secret).
fn parse_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("kiln_")?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (hex(id, 16) && hex(secret, 64)).then_some((id, secret))
}

/// Whether a bearer token looks like a Kiln API key (rather than a JWT).
pub fn is_api_key(token: &str) -> bool {
    token.starts_with("kiln_")
}

fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_parsed_strictly() {
        let id = "0123456789abcdef";
        let secret = "a".repeat(64);
        assert_eq!(parse_token(&format!("kiln_{id}_{secret}")), Some((id, secret.as_str())));
        assert!(parse_token(&format!("kiln_{id}'_{secret}")).is_none());
        assert!(parse_token(&format!("kiln_{}_{secret}", "G".repeat(16))).is_none());
        assert!(parse_token("kiln_x").is_none());
        assert!(constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd"));
    }
}
