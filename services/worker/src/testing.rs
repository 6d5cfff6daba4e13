//! Test support for Kiln's crates (feature `testing`): tools written straight to the log, run
//! requests, a run's events, and a loopback HTTP server that counts side effects and can hold
//! a tool at a gate (to crash or pause a worker at a known point).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kiln_proto::events::{ToolCreated, ToolVersionPublished};
use kiln_proto::{
    Actor, DomainEvent, EventMetadata, NewEvent, RunId, StreamId, StreamVersion, ToolDefinition, ToolName,
};
use kiln_store::{EventStore, ExpectedVersion, Store};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::runs::RunRequest;

/// Creates a tool (version 1) from a definition document, as the API would.
pub async fn create_tool(store: &Store, definition: Value) -> ToolDefinition {
    let d = ToolDefinition::parse(&definition).expect("valid definition").definition;
    let meta = EventMetadata::new(Actor::local());
    let events = [
        DomainEvent::from(ToolCreated { name: d.name.clone() }),
        ToolVersionPublished { name: d.name.clone(), version: 1, code_sha256: d.code_sha256(), definition: d.clone() }
            .into(),
    ];
    let events = events.iter().map(|e| NewEvent::from_domain(e, meta.clone())).collect();
    store.append(&StreamId::tool(&d.name), ExpectedVersion::NoStream, events).await.expect("tool created");
    d
}

/// A request for the tool's current version, by `key:tester`.
pub fn request(tool: &str, arguments: Value) -> RunRequest {
    RunRequest {
        tool: ToolName::parse(tool).expect("tool name"),
        version: None,
        arguments,
        idempotency_key: None,
        parent_run: None,
        replay_of: None,
        reuse_steps: false,
        actor: Actor::parse("key:tester").expect("actor"),
        traceparent: None,
    }
}

/// Every event of a run, decoded.
pub async fn events(store: &Store, run: RunId) -> Vec<DomainEvent> {
    let recorded = store.read_stream(&StreamId::run(run), StreamVersion(0), 10_000).await.expect("read run");
    recorded.iter().map(|e| e.decode().expect("decodes")).collect()
}

pub fn types(events: &[DomainEvent]) -> Vec<&'static str> {
    events.iter().map(DomainEvent::event_type).collect()
}

/// How many events of a run end it (a run must have exactly one).
pub fn terminal_count(events: &[DomainEvent]) -> usize {
    events.iter().filter(|e| e.is_run_terminal()).count()
}

/// A loopback HTTP server counting requests per path. `GET /gate` (counted too) holds its
/// first caller until [`SideEffects::open_gate`]; later callers pass at once. So does each
/// `GET /gate/<name>`, on its own count.
#[derive(Debug, Clone)]
pub struct SideEffects {
    pub port: u16,
    counts: Arc<Mutex<HashMap<String, u32>>>,
    gate: watch::Sender<bool>,
}

impl SideEffects {
    pub async fn start() -> SideEffects {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let port = listener.local_addr().expect("addr").port();
        let me = SideEffects { port, counts: Arc::default(), gate: watch::Sender::new(false) };
        let server = me.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let server = server.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = conn.read(&mut buf).await.unwrap_or(0);
                    let head = String::from_utf8_lossy(&buf[..n]).to_string();
                    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    let count = {
                        let mut m = server.counts.lock().unwrap();
                        let e = m.entry(path.clone()).or_insert(0);
                        *e += 1;
                        *e
                    };
                    if (path == "/gate" || path.starts_with("/gate/")) && count == 1 {
                        let mut open = server.gate.subscribe();
                        let _ = open.wait_for(|o| *o).await;
                    }
                    let body = format!("{{\"count\":{count}}}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(resp.as_bytes()).await;
                });
            }
        });
        me
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn count(&self, path: &str) -> u32 {
        self.counts.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    pub fn open_gate(&self) {
        self.gate.send_replace(true);
    }

    /// A tool whose three steps each call this server (`/s1`, `/s2`, `/s3`) and that stops at
    /// the gate between steps 2 and 3.
    pub fn three_step_tool(&self, name: &str) -> Value {
        let base = format!("http://{}", self.host());
        let code = format!(
            r#"export default async function (args, ctx) {{
  const hit = async (p) => (await (await fetch("{base}" + p)).json()).count;
  const s1 = await ctx.step("s1", () => hit("/s1"));
  const s2 = await ctx.step("s2", () => hit("/s2"));
  await hit("/gate");
  const s3 = await ctx.step("s3", () => hit("/s3"));
  return {{ s1, s2, s3, attempt: ctx.attempt }};
}}"#
        );
        serde_json::json!({
            "name": name, "description": "three steps with a gate before the third", "code": code,
            "permissions": {"network": [self.host()]},
            "retry": {"maxAttempts": 5, "initialDelayMs": 10},
            "limits": {"timeoutMs": 120000}
        })
    }
}

/// A sandbox for engines that only request, watch and cancel (an API's view): it runs nothing.
#[derive(Debug)]
pub struct NoSandbox;

#[async_trait::async_trait]
impl crate::sandbox::Sandbox for NoSandbox {
    async fn invoke(
        &self,
        _: crate::sandbox::Invocation,
    ) -> Result<crate::sandbox::InvocationOutput, crate::sandbox::SandboxError> {
        Err(crate::sandbox::SandboxError::Crash("this engine runs no tools".to_owned()))
    }

    async fn check_code(&self, _: &str) -> Result<crate::sandbox::CodeFormat, crate::sandbox::SandboxError> {
        Err(crate::sandbox::SandboxError::Crash("this engine checks no code".to_owned()))
    }
}

/// An engine that requests, watches and cancels runs, as the API does.
pub fn client(store: &Store) -> crate::runs::RunEngine {
    crate::runs::RunEngine::new(store.clone(), Arc::new(NoSandbox), "client")
}
