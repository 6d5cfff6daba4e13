//! The audit line: what `kiln audit export` and `GET /v1/audit.jsonl` print for each auditable
//! event, one JSON object per line, and the redaction rules applied to everything user-supplied
//! in it. Pure functions; the audit projection stores their output, the exporters stream it.
//!
//! The schema is versioned (`"v": 1`) and documented in docs/history.md. A change of meaning is a
//! new version; adding an optional field is not. Events are mapped by their type name and raw
//! payload, so types defined elsewhere (`auth.denied` from the API) are audited without a Rust
//! variant here, and a type this module does not know is simply not audited.

use std::borrow::Cow;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::envelope::RecordedEvent;

/// The schema version written in every line's `v`.
pub const SCHEMA_VERSION: u32 = 1;

/// What replaces a redacted value or word.
pub const REDACTED: &str = "[REDACTED]";

/// Event types that produce an audit line, and the action each is written as.
pub const AUDITED: &[(&str, &str)] = &[
    ("tool.created", "tool.created"),
    ("tool.version_published", "tool.updated"),
    ("tool.enabled", "tool.enabled"),
    ("tool.disabled", "tool.disabled"),
    ("tool.deleted", "tool.deleted"),
    ("run.requested", "run.requested"),
    ("run.succeeded", "run.succeeded"),
    ("run.failed", "run.failed"),
    ("run.cancelled", "run.cancelled"),
    ("run.timed_out", "run.timed_out"),
    ("auth.denied", "auth.denied"),
];

/// The action an event type is audited as; None if it is not audited.
pub fn action_of(event_type: &str) -> Option<&'static str> {
    AUDITED.iter().find(|(t, _)| *t == event_type).map(|(_, a)| *a)
}

/// One audit line (schema version 1). Field order is the order written.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditLine {
    pub v: u32,
    /// The event's global position: unique, gapless across the log, the export's order.
    pub position: u64,
    /// When it happened: RFC 3339 UTC with microseconds.
    pub time: String,
    pub actor: String,
    pub action: &'static str,
    /// `success`, `failure`, `accepted` (a run was requested), `cancelled` or `denied`.
    pub outcome: &'static str,
    pub target: Target,
    /// The code's SHA-256 for a published tool version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code_sha256: Option<String>,
    pub event_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Action-specific facts, redacted.
    #[serde(skip_serializing_if = "Value::is_null")]
    pub details: Value,
}

/// What the action was done to.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// `tool`, `run` or `endpoint`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The tool's name, the run's id, or `METHOD /path`.
    pub id: String,
    /// The tool a run used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// The tool version published, or the one a run used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// The tool (and version) of a run, which outcome events do not carry themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunTool {
    pub tool: String,
    pub version: u64,
}

impl AuditLine {
    /// The line for an event, or None if its type is not audited. `run` is the run's tool when
    /// the event is a run outcome (the caller remembers it from `run.requested`).
    pub fn from_event(e: &RecordedEvent, run: Option<&RunTool>) -> Option<AuditLine> {
        let action = action_of(&e.event_type)?;
        let p: Value = serde_json::from_str(e.payload.get()).unwrap_or(Value::Null);
        let s = |k: &str| p.get(k).and_then(Value::as_str).map(str::to_owned);
        let n = |k: &str| p.get(k).and_then(Value::as_u64);
        let run_id = || e.stream_id.as_str().strip_prefix("run-").unwrap_or(e.stream_id.as_str()).to_owned();
        let tool_target =
            |version: Option<u64>| Target { kind: "tool", id: s("name").unwrap_or_default(), tool: None, version };
        let run_target =
            || Target { kind: "run", id: run_id(), tool: run.map(|r| r.tool.clone()), version: run.map(|r| r.version) };
        let mut code_sha256 = None;
        let (outcome, target, details) = match e.event_type.as_str() {
            "tool.version_published" => {
                code_sha256 = s("codeSha256");
                ("success", tool_target(n("version")), Value::Null)
            }
            "tool.disabled" => ("success", tool_target(None), pick(&p, &["reason"])),
            "tool.created" | "tool.enabled" | "tool.deleted" => ("success", tool_target(None), Value::Null),
            "run.requested" => {
                let target = Target { kind: "run", id: run_id(), tool: s("tool"), version: n("toolVersion") };
                ("accepted", target, pick(&p, &["arguments", "idempotencyKey", "parentRun", "replayOf"]))
            }
            "run.succeeded" => ("success", run_target(), pick(&p, &["attempt", "output"])),
            "run.failed" => {
                let mut d = pick(&p, &["attempts"]);
                if let (Some(m), Some(err)) = (d.as_object_mut(), p.get("error")) {
                    m.insert("error".to_owned(), pick(err, &["kind", "name", "message"]));
                }
                ("failure", run_target(), d)
            }
            "run.timed_out" => ("failure", run_target(), pick(&p, &["attempts", "timeoutMs"])),
            "run.cancelled" => ("cancelled", run_target(), pick(&p, &["reason", "cancelledBy"])),
            "auth.denied" => {
                let id = format!("{} {}", s("method").unwrap_or_default(), s("path").unwrap_or_default());
                let target = Target { kind: "endpoint", id, tool: None, version: None };
                ("denied", target, pick(&p, &["reason", "requiredScope", "credential"]))
            }
            _ => return None,
        };
        let mut details = details;
        redact(&mut details);
        Some(AuditLine {
            v: SCHEMA_VERSION,
            position: e.position.0,
            time: e.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            actor: e.metadata.actor.as_str().to_owned(),
            action,
            outcome,
            target,
            code_sha256,
            event_id: e.event_id.to_string(),
            correlation_id: e.metadata.correlation_id.map(|c| c.to_string()),
            traceparent: e.metadata.traceparent.as_ref().map(|t| t.as_str().to_owned()),
            details,
        })
    }

    /// The line as written: compact JSON without a trailing newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The listed fields of an object that are present, as an object (Null if none are).
fn pick(v: &Value, keys: &[&str]) -> Value {
    let m: Map<String, Value> =
        keys.iter().filter_map(|k| v.get(*k).filter(|x| !x.is_null()).map(|x| ((*k).to_owned(), x.clone()))).collect();
    if m.is_empty() { Value::Null } else { Value::Object(m) }
}

/// Redacts a JSON value in place: every value under a sensitive key (see `is_sensitive_key`)
/// becomes `"[REDACTED]"`, and every string has its secret-looking words replaced
/// (see `redact_text`).
pub fn redact(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if is_sensitive_key(k) && !x.is_null() {
                    *x = Value::String(REDACTED.to_owned());
                } else {
                    redact(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact),
        Value::String(s) => {
            if let Cow::Owned(r) = redact_text(s) {
                *s = r;
            }
        }
        _ => {}
    }
}

/// Whether a key names a secret: compared without case, `-` or `_`, it contains `secret`,
/// `password`, `passwd`, `authorization`, `apikey`, `privatekey`, `accesskey`, `cookie` or
/// `credential`, or ends with `token` (so `access_token` is sensitive and `max_tokens` is not).
pub fn is_sensitive_key(key: &str) -> bool {
    let k: String = key.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect();
    const CONTAINS: &[&str] =
        &["secret", "password", "passwd", "authorization", "apikey", "privatekey", "accesskey", "cookie", "credential"];
    CONTAINS.iter().any(|w| k.contains(w)) || k.ends_with("token") || k == "auth" || k == "pwd"
}

/// Replaces the secret-looking words of a text with `[REDACTED]`: the word after `Bearer`,
/// `Basic` or `token`, the password of a `scheme://user:password@host` URL, and any word that
/// looks like a key (see `looks_like_key`). Returns the text unchanged (borrowed) if nothing was.
pub fn redact_text(text: &str) -> Cow<'_, str> {
    if !text.bytes().any(|b| b.is_ascii_alphanumeric()) || text.len() < 8 {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let mut after_scheme = false;
    let mut rest = text;
    while !rest.is_empty() {
        let ws = rest.find(|c: char| !c.is_whitespace()).unwrap_or(rest.len());
        out.push_str(&rest[..ws]);
        rest = &rest[ws..];
        if rest.is_empty() {
            break;
        }
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let word = &rest[..end];
        rest = &rest[end..];
        let (lead, core, trail) = trim_punctuation(word);
        let secret = !core.is_empty() && (after_scheme || looks_like_key(core));
        if secret {
            out.push_str(lead);
            out.push_str(REDACTED);
            out.push_str(trail);
            changed = true;
        } else if let Some(r) = redact_url_password(word) {
            out.push_str(&r);
            changed = true;
        } else {
            out.push_str(word);
        }
        let lower = core.to_ascii_lowercase();
        after_scheme = matches!(lower.as_str(), "bearer" | "basic" | "token");
    }
    if changed { Cow::Owned(out) } else { Cow::Borrowed(text) }
}

/// Splits quotes, brackets and trailing punctuation off a word.
fn trim_punctuation(word: &str) -> (&str, &str, &str) {
    let edge = |c: char| matches!(c, '"' | '\'' | '`' | '(' | ')' | '[' | ']' | '{' | '}' | '<' | '>' | ',' | ';');
    let start = word.find(|c: char| !edge(c)).unwrap_or(word.len());
    let core_and_trail = &word[start..];
    let trail_start = core_and_trail.trim_end_matches(|c: char| edge(c) || c == '.' || c == ':').len();
    (&word[..start], &core_and_trail[..trail_start], &core_and_trail[trail_start..])
}

/// Whether a word looks like a credential: a known key prefix (`sk-`, `ghp_`, `github_pat_`,
/// `xoxb-`, `glpat-`, `AKIA`, `AIza`), a JWT (`eyJ...` in three dot-separated parts), or a long
/// opaque token: at least 24 characters of `[A-Za-z0-9+/=_.-]` mixing letters and digits, not a
/// path and not a UUID.
pub fn looks_like_key(word: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "sk-",
        "sk_live_",
        "sk_test_",
        "rk_live_",
        "pk_live_",
        "ghp_",
        "gho_",
        "ghu_",
        "ghs_",
        "ghr_",
        "github_pat_",
        "xoxb-",
        "xoxp-",
        "xoxa-",
        "xoxs-",
        "glpat-",
        "AKIA",
        "ASIA",
        "AIza",
    ];
    if word.len() >= 12 && PREFIXES.iter().any(|p| word.starts_with(p)) {
        return true;
    }
    if word.starts_with("eyJ") && word.split('.').count() == 3 && word.len() >= 20 {
        return true;
    }
    if word.len() < 24 || word.starts_with('/') || word.starts_with('.') || word.contains("//") {
        return false;
    }
    let charset = word.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=_.-".contains(&b));
    let digits = word.bytes().any(|b| b.is_ascii_digit());
    let letters = word.bytes().any(|b| b.is_ascii_alphabetic());
    charset && digits && letters && !is_uuid(word)
}

fn is_uuid(w: &str) -> bool {
    w.len() == 36
        && w.bytes()
            .enumerate()
            .all(|(i, b)| if matches!(i, 8 | 13 | 18 | 23) { b == b'-' } else { b.is_ascii_hexdigit() })
}

/// `scheme://user:password@host...` with the password redacted.
fn redact_url_password(word: &str) -> Option<String> {
    let scheme_end = word.find("://")? + 3;
    let rest = &word[scheme_end..];
    let at = rest.find('@')?;
    let colon = rest[..at].find(':')?;
    if rest[..at].contains('/') {
        return None;
    }
    Some(format!("{}{}:{REDACTED}{}", &word[..scheme_end], &rest[..colon], &rest[at..]))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn sensitive_keys_are_redacted_at_any_depth() {
        let mut v = json!({
            "city": "Paris",
            "apiKey": "abc",
            "headers": {"Authorization": "Basic dXNlcjpwYXNz", "X-Api-Key": "k", "accept": "json"},
            "db": [{"password": "hunter2"}, {"client_secret": {"nested": 1}}],
            "access_token": "t",
            "max_tokens": 100,
            "refresh_token": null,
        });
        redact(&mut v);
        assert_eq!(
            v,
            json!({
                "city": "Paris",
                "apiKey": REDACTED,
                "headers": {"Authorization": REDACTED, "X-Api-Key": REDACTED, "accept": "json"},
                "db": [{"password": REDACTED}, {"client_secret": REDACTED}],
                "access_token": REDACTED,
                "max_tokens": 100,
                "refresh_token": null,
            })
        );
    }

    #[test]
    fn secret_looking_words_are_redacted_in_text() {
        let cases = [
            ("Bearer abc.def", "Bearer [REDACTED]"),
            ("call failed: Authorization: Bearer xyz123 (401)", "call failed: Authorization: Bearer [REDACTED] (401)"),
            ("key sk-proj-0123456789abcdef here", "key [REDACTED] here"),
            ("\"ghp_aBcDeF0123456789aBcDeF0123456789\",", "\"[REDACTED]\","),
            ("aws AKIAIOSFODNN7EXAMPLE.", "aws [REDACTED]."),
            ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig", "jwt [REDACTED]"),
            ("postgres://app:s3cret@db:5432/x", "postgres://app:[REDACTED]@db:5432/x"),
            ("opaque wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "opaque [REDACTED]"),
        ];
        for (input, want) in cases {
            assert_eq!(redact_text(input), want, "{input}");
        }
    }

    #[test]
    fn ordinary_text_ids_and_paths_are_kept() {
        for text in [
            "San Francisco",
            "run 0190a3c5-1f2e-7abc-8def-0123456789ab failed",
            "at file:///tmp/kiln/tools/weather/v3/mod.ts:12:7",
            "at /home/user/project/src/some_module_name_1.ts:3:9",
            "timed out after 100 ms",
            "a_plain_identifier_without_digits_at_all",
        ] {
            assert!(matches!(redact_text(text), Cow::Borrowed(_)), "{text} was changed to {}", redact_text(text));
        }
    }

    fn event(event_type: &str, stream: &str, payload: Value) -> RecordedEvent {
        RecordedEvent {
            position: crate::Position(7),
            stream_id: crate::StreamId::parse(stream).unwrap(),
            stream_version: crate::StreamVersion(1),
            event_id: crate::EventId::new(),
            event_type: event_type.to_owned(),
            schema_version: 1,
            occurred_at: chrono::DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            metadata: crate::EventMetadata::new(crate::Actor::parse("key:ci").unwrap()),
            payload: serde_json::value::to_raw_value(&payload).unwrap(),
        }
    }

    #[test]
    fn lines_carry_action_target_outcome_and_redacted_details() {
        let run = "run-0190a3c5-1f2e-7abc-8def-0123456789ab";
        let e = event(
            "run.requested",
            run,
            json!({"runId": "x", "tool": "weather", "toolVersion": 3, "arguments": {"city": "Oslo", "token": "t0k"}}),
        );
        let line = AuditLine::from_event(&e, None).unwrap();
        let text = line.to_json();
        assert!(text.starts_with(r#"{"v":1,"position":7,"time":"2023-11-14T22:13:20.123456Z","actor":"key:ci","action":"run.requested","outcome":"accepted","target":{"type":"run","id":"0190a3c5-1f2e-7abc-8def-0123456789ab","tool":"weather","version":3}"#), "{text}");
        assert_eq!(line.details, json!({"arguments": {"city": "Oslo", "token": REDACTED}}));

        let rt = RunTool { tool: "weather".into(), version: 3 };
        let e = event(
            "run.failed",
            run,
            json!({"attempts": 2, "error": {"kind": "user_error", "message": "bad key sk-live-0123456789abcdef", "stack": "Error: at x"}}),
        );
        let line = AuditLine::from_event(&e, Some(&rt)).unwrap();
        assert_eq!((line.action, line.outcome), ("run.failed", "failure"));
        assert_eq!(line.target.tool.as_deref(), Some("weather"));
        assert_eq!(
            line.details,
            json!({"attempts": 2, "error": {"kind": "user_error", "message": "bad key [REDACTED]"}})
        );

        let e = event(
            "tool.version_published",
            "tool-weather",
            json!({"name": "weather", "version": 2, "codeSha256": "ab12", "definition": {}}),
        );
        let line = AuditLine::from_event(&e, None).unwrap();
        assert_eq!(
            (line.action, line.code_sha256.as_deref(), line.target.version),
            ("tool.updated", Some("ab12"), Some(2))
        );

        let e = event(
            "auth.denied",
            "auth-denials",
            json!({"reason": "missing scope", "requiredScope": "tools:write", "credential": "key:ci", "method": "POST", "path": "/mcp"}),
        );
        let line = AuditLine::from_event(&e, None).unwrap();
        assert_eq!((line.outcome, line.target.id.as_str()), ("denied", "POST /mcp"));

        assert!(AuditLine::from_event(&event("run.attempt_started", run, json!({})), None).is_none());
        assert!(AuditLine::from_event(&event("run.logs", run, json!({})), None).is_none());
    }
}
