//! Harness for the sandbox tests: the real deno (found like the server finds it), a sandbox per
//! test, tool versions, and a loopback HTTP server for network tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_proto::tool::{Limits, NetHost, Permissions, ToolName};
use kiln_worker::sandbox::{
    DenoBinary, DenoSandbox, Invocation, InvocationOutput, PoolConfig, Sandbox, SandboxConfig, SandboxError,
    SandboxEvent, ToolVersion,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// The project's deno. Fails loudly (never skips) when it is not installed.
pub fn deno() -> DenoBinary {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let explicit = std::env::var_os("KILN_DENO").map(PathBuf::from);
    DenoBinary::locate(explicit.as_deref(), Some(&root))
        .unwrap_or_else(|e| panic!("the sandbox tests need the real deno: {e}\nrun scripts/install-deno.sh"))
}

pub fn config() -> SandboxConfig {
    let mut config = SandboxConfig::new(deno());
    config.pool = PoolConfig { max_processes: 4, max_per_tool: 2, ..PoolConfig::default() };
    config
}

pub fn sandbox() -> DenoSandbox {
    sandbox_with(|_| {})
}

pub fn sandbox_with(f: impl FnOnce(&mut SandboxConfig)) -> DenoSandbox {
    let mut config = config();
    f(&mut config);
    DenoSandbox::start(config).expect("start the sandbox")
}

pub fn tool(name: &str, version: u32, code: &str) -> Arc<ToolVersion> {
    tool_with(name, version, code, |_| {})
}

pub fn tool_with(name: &str, version: u32, code: &str, f: impl FnOnce(&mut ToolVersion)) -> Arc<ToolVersion> {
    let mut t = ToolVersion {
        name: ToolName::parse(name).expect("valid tool name"),
        version,
        code: Arc::from(code),
        permissions: Permissions::default(),
        limits: Limits { timeout_ms: 10_000, memory_mb: 128, max_output_bytes: 1 << 20 },
    };
    f(&mut t);
    Arc::new(t)
}

pub fn hosts(list: &[&str]) -> Vec<NetHost> {
    list.iter().map(|h| NetHost::parse(h).expect("valid host")).collect()
}

pub async fn invoke(sb: &DenoSandbox, tool: &Arc<ToolVersion>, args: Value) -> Result<InvocationOutput, SandboxError> {
    sb.invoke(Invocation::new(Arc::clone(tool), args)).await
}

pub async fn run(sb: &DenoSandbox, tool: &Arc<ToolVersion>, args: Value) -> Result<Value, SandboxError> {
    invoke(sb, tool, args).await.map(|o| o.value)
}

/// Runs and collects the events the invocation emitted.
pub async fn run_with_events(
    sb: &DenoSandbox,
    inv: Invocation,
) -> (Result<InvocationOutput, SandboxError>, Vec<SandboxEvent>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let inv = Invocation { events: Some(tx), ..inv };
    let result = sb.invoke(inv).await;
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    (result, events)
}

/// Asserts the sandbox still serves a normal invocation (after something hostile).
pub async fn assert_healthy(sb: &DenoSandbox) {
    let t = tool("healthcheck", 1, "(args) => ({ sum: args.a + args.b })");
    let value = run(sb, &t, serde_json::json!({ "a": 2, "b": 3 })).await.expect("a normal invocation still works");
    assert_eq!(value, serde_json::json!({ "sum": 5 }));
    let stats = sb.pool_stats();
    assert!(stats.processes <= sb.config().pool.max_processes, "{stats:?}");
}

/// A loopback HTTP/1.1 server answering every request with `body` as JSON; returns its port.
pub async fn json_server(body: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let port = listener.local_addr().expect("local addr").port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(response.as_bytes()).await;
            });
        }
    });
    port
}

/// Polls `f` until it holds; for state that changes in the background (idle reaping).
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never happened: {what}");
}
