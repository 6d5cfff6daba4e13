//! The HTTP gate in front of `/mcp` and the history endpoints (`/v1/runs`, `/v1/audit.jsonl`): body size, authentication, per-MCP-method scopes, per-actor
//! limits. Refusals follow the MCP authorization spec: 401 with `WWW-Authenticate` pointing at
//! the protected-resource metadata document, 403 with `error="insufficient_scope"`; 413 for an
//! oversized body; 429 with `Retry-After`. Every 401/403 is recorded as an `auth.denied` event.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use kiln_proto::events::AuthDenied;
use kiln_proto::{Actor, DomainEvent, EventMetadata, NewEvent, StreamId};
use kiln_store::{EventStore, ExpectedVersion, Store};
use serde_json::{Value, json};

use super::jwt::{JwtError, JwtSettings, JwtVerifier};
use super::keys::{ApiKeys, Rejected, is_api_key};
use super::{Principal, Scope};
use crate::limits::{Limiter, Refused};
use crate::mcp::schemas;

/// Authentication settings (from `[auth]`).
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    /// Require an API key or a JWT on every MCP request.
    pub required: bool,
    /// The URL clients use for this resource (`https://kiln.example.com/mcp`); default: derived
    /// from the request's Host.
    pub resource_url: Option<String>,
    /// Authorization servers named in the protected-resource metadata.
    pub authorization_servers: Vec<String>,
    /// Accept JWT bearer tokens checked against this JWKS (besides API keys).
    pub jwt: Option<JwtSettings>,
}

/// Shared state of the gate.
#[derive(Debug)]
pub struct Gate {
    pub settings: AuthSettings,
    pub keys: ApiKeys,
    pub jwt: Option<JwtVerifier>,
    pub limiter: Limiter,
    pub max_body_bytes: usize,
    pub store: Store,
    /// Denials recorded in the last second, so a flood of bad requests cannot flood the log.
    denial_budget: Mutex<(Instant, u32)>,
}

/// Why a request could not be authenticated.
#[derive(Debug)]
struct Denied {
    /// The `auth.denied` reason.
    reason: &'static str,
    /// The API key id named by a revoked key.
    credential: Option<String>,
    /// The credential could not be checked at all (the JWKS is unavailable): 503, not 401.
    unavailable: bool,
    /// What was wrong, for the response.
    why: Option<String>,
}

impl Denied {
    fn new(reason: &'static str, credential: Option<String>) -> Self {
        Self { reason, credential, unavailable: false, why: None }
    }
}

/// Denial events recorded per second at most; the rest are only logged.
const DENIALS_PER_SECOND: u32 = 20;

impl Gate {
    /// Fails if a configured JWKS cannot be read.
    pub fn new(
        settings: AuthSettings,
        store: Store,
        limiter: Limiter,
        max_body_bytes: usize,
    ) -> Result<Self, super::jwt::JwtError> {
        let jwt = settings.jwt.clone().map(JwtVerifier::new).transpose()?;
        Ok(Self {
            settings,
            jwt,
            keys: ApiKeys::new(store.clone()),
            limiter,
            max_body_bytes,
            store,
            denial_budget: Mutex::new((Instant::now(), 0)),
        })
    }

    fn metadata_url(&self, headers: &HeaderMap) -> String {
        let resource = self.resource_url(headers);
        match resource.split_once("://") {
            Some((scheme, rest)) => {
                let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
                format!("{scheme}://{host}/.well-known/oauth-protected-resource/{path}")
                    .trim_end_matches('/')
                    .to_owned()
            }
            None => resource,
        }
    }

    pub fn resource_url(&self, headers: &HeaderMap) -> String {
        self.settings.resource_url.clone().unwrap_or_else(|| {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
            format!("http://{host}/mcp")
        })
    }

    /// The protected-resource metadata document (RFC 9728) for this server.
    pub fn resource_metadata(&self, headers: &HeaderMap) -> Value {
        json!({
            "resource": self.resource_url(headers),
            "authorization_servers": self.settings.authorization_servers,
            "scopes_supported": Scope::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "bearer_methods_supported": ["header"],
            "resource_name": "Kiln",
        })
    }

    async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, Denied> {
        if !self.settings.required {
            return Ok(Principal::local());
        }
        let Some(value) = headers.get(header::AUTHORIZATION) else { return Err(Denied::new("missing_token", None)) };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or(Denied::new("invalid_token", None))?;
        if is_api_key(token) {
            return match self.keys.verify(token).await {
                Ok(Ok(key)) => Ok(key.principal()),
                Ok(Err(Rejected::Revoked)) => Err(Denied::new("revoked_key", token.get(5..21).map(str::to_owned))),
                Ok(Err(_)) => Err(Denied::new("invalid_token", None)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot check an API key");
                    Err(Denied::new("invalid_token", None))
                }
            };
        }
        match &self.jwt {
            Some(jwt) => jwt.verify(token).await.map_err(|e| {
                tracing::info!(error = %e, "JWT refused");
                let (unavailable, why) = (matches!(e, JwtError::Jwks { .. }), Some(e.to_string()));
                Denied { reason: e.reason(), credential: None, unavailable, why }
            }),
            None => Err(Denied::new("invalid_token", None)),
        }
    }

    fn record_denial(&self, actor: Option<&Actor>, denied: AuthDenied) {
        {
            let mut budget = self.denial_budget.lock().unwrap_or_else(|e| e.into_inner());
            if budget.0.elapsed().as_secs() >= 1 {
                *budget = (Instant::now(), 0);
            }
            budget.1 += 1;
            if budget.1 > DENIALS_PER_SECOND {
                tracing::warn!(reason = %denied.reason, "auth denied (not recorded: too many denials this second)");
                return;
            }
        }
        tracing::info!(reason = %denied.reason, method = %denied.method, "auth denied");
        let actor = actor.cloned().unwrap_or_else(|| Actor::system("anonymous"));
        let event = NewEvent::from_domain(&DomainEvent::from(denied), EventMetadata::new(actor));
        let store = self.store.clone();
        tokio::spawn(async move {
            let stream = StreamId::parse("auth-denied").unwrap_or_else(|_| unreachable!("a valid stream id"));
            if let Err(e) = store.append(&stream, ExpectedVersion::Any, vec![event]).await {
                tracing::warn!(error = %e, "cannot record an auth.denied event");
            }
        });
    }
}

/// The scopes a JSON-RPC body needs: for each request in it (a batch needs them all).
fn required_scopes(body: &Value) -> Vec<(String, Scope)> {
    let messages = match body {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    let mut out = Vec::new();
    for m in messages {
        let Some(method) = m.get("method").and_then(Value::as_str) else { continue };
        let scopes: &[Scope] = match method {
            "tools/list" | "subscriptions/listen" => &[Scope::ToolsRead],
            "tools/call" => {
                let tool = m.pointer("/params/name").and_then(Value::as_str).unwrap_or_default();
                if schemas::is_meta(tool) {
                    crate::mcp::meta_scope(tool).unwrap_or_default()
                } else {
                    &[Scope::ToolsRun]
                }
            }
            m if m.starts_with("tasks/") => &[Scope::ToolsRun],
            _ => &[],
        };
        out.extend(scopes.iter().map(|s| (method.to_owned(), *s)));
    }
    out
}

/// The scope an HTTP endpoint outside MCP needs (run history and audit).
fn path_scope(path: &str) -> Option<Scope> {
    if path.starts_with("/v1/audit") {
        Some(Scope::AuditRead)
    } else if path.starts_with("/v1/runs") {
        Some(Scope::RunsRead)
    } else {
        None
    }
}

fn json_error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({"error": message}))).into_response()
}

/// The middleware.
pub async fn gate(State(gate): State<Arc<Gate>>, request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let bytes = if parts.method == Method::POST {
        match axum::body::to_bytes(body, gate.max_body_bytes).await {
            Ok(b) => b,
            Err(_) => {
                return json_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("request body is larger than the limit of {} bytes", gate.max_body_bytes),
                );
            }
        }
    } else {
        Bytes::new()
    };

    let principal = match gate.authenticate(&parts.headers).await {
        Ok(p) => p,
        Err(Denied { reason, credential, unavailable, why }) => {
            gate.record_denial(
                None,
                AuthDenied {
                    reason: reason.to_owned(),
                    required_scope: None,
                    credential,
                    method: parts.method.to_string(),
                    path: path.clone(),
                },
            );
            let why = why.unwrap_or_else(|| reason.to_owned());
            if unavailable {
                // Not the caller's fault: the keys to check its token cannot be had right now.
                let mut r = json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("cannot check the bearer token now ({why}); retry later"),
                );
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(5));
                return r;
            }
            let mut challenge = format!("Bearer resource_metadata=\"{}\"", gate.metadata_url(&parts.headers));
            if reason != "missing_token" {
                challenge.push_str(", error=\"invalid_token\"");
            }
            let mut r = json_error(StatusCode::UNAUTHORIZED, &format!("authentication required ({why})"));
            if let Ok(v) = HeaderValue::from_str(&challenge) {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            return r;
        }
    };

    let needed = match path_scope(&path) {
        Some(scope) => vec![(format!("{} {path}", parts.method), scope)],
        None => serde_json::from_slice::<Value>(&bytes).map(|body| required_scopes(&body)).unwrap_or_default(),
    };
    if let Some((method, scope)) = needed.into_iter().find(|(_, s)| !principal.has(*s)) {
        gate.record_denial(
            Some(&principal.actor),
            AuthDenied {
                reason: "insufficient_scope".to_owned(),
                required_scope: Some(scope.to_string()),
                credential: principal.credential.clone().or_else(|| Some(principal.actor.to_string())),
                method: method.clone(),
                path: path.clone(),
            },
        );
        let challenge = format!(
            "Bearer error=\"insufficient_scope\", scope=\"{scope}\", resource_metadata=\"{}\"",
            gate.metadata_url(&parts.headers)
        );
        let mut r = json_error(
            StatusCode::FORBIDDEN,
            &format!("{} lacks the scope {scope} needed for {method}", principal.actor),
        );
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        return r;
    }

    // Long-lived GET streams and session deletes are not counted against the limits.
    let permit = if parts.method == Method::POST {
        match gate.limiter.admit(&principal.actor).await {
            Ok(p) => Some(p),
            Err(Refused::Rate { retry_after }) => {
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                let mut r = json_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    &format!("rate limit for {} exceeded; retry after {secs} s", principal.actor),
                );
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
                return r;
            }
            Err(Refused::Concurrency { limit }) => {
                let mut r = json_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    &format!("{} already has {limit} requests in flight; retry when one finishes", principal.actor),
                );
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
                return r;
            }
        }
    } else {
        None
    };

    parts.extensions.insert(principal);
    let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    match permit {
        None => response,
        // The slot is held until the response body (an SSE stream for tool calls) is done.
        Some(permit) => {
            let (parts, body) = response.into_parts();
            let stream = body.into_data_stream().map(move |chunk| {
                let _held = &permit;
                chunk
            });
            Response::from_parts(parts, Body::from_stream(stream))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_endpoints_need_their_scopes() {
        assert_eq!(path_scope("/v1/audit.jsonl"), Some(Scope::AuditRead));
        assert_eq!(path_scope("/v1/runs/0192"), Some(Scope::RunsRead));
        assert_eq!(path_scope("/mcp"), None);
    }

    #[test]
    fn scopes_follow_the_method_and_the_tool() {
        let s = |v: Value| required_scopes(&v).into_iter().map(|(_, s)| s).collect::<Vec<_>>();
        assert_eq!(s(json!({"method": "initialize"})), vec![]);
        assert_eq!(s(json!({"method": "tools/list"})), vec![Scope::ToolsRead]);
        assert_eq!(s(json!({"method": "tools/call", "params": {"name": "tool_create"}})), vec![Scope::ToolsWrite]);
        assert_eq!(s(json!({"method": "tools/call", "params": {"name": "weather"}})), vec![Scope::ToolsRun]);
        assert_eq!(
            s(json!({"method": "tools/call", "params": {"name": "run_replay"}})),
            vec![Scope::ToolsRun, Scope::RunsRead]
        );
        assert_eq!(
            s(json!([{"method": "tools/list"}, {"method": "tools/call", "params": {"name": "run_get"}}])),
            vec![Scope::ToolsRead, Scope::RunsRead]
        );
    }
}
