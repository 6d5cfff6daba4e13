//! `kiln bench mcp`: `tools/call` of a warm trivial tool through MCP over Streamable HTTP, end
//! to end (HTTP, MCP session, durable run through the queue and an in-process worker, sandbox,
//! result): round-trip latency of one client, then throughput of several concurrent clients.
//!
//! The client is a minimal HTTP/1.1 one on a kept-alive connection per session, so the figures
//! are the server's, not a client library's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use kiln_api::{AppState, LimitSettings};
use kiln_store::Store;
use kiln_worker::DenoSandbox;
use kiln_worker::queue::LocalWorker;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{BenchBackend, Scratch};
use crate::config::Config;

#[derive(Debug, Args)]
pub struct McpBench {
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: BenchBackend,
    /// Sequential calls for the latency figures.
    #[arg(long, default_value_t = 1_000)]
    calls: usize,
    /// Concurrent clients (one MCP session each) for the throughput figure.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Calls per client in the throughput run.
    #[arg(long, default_value_t = 250)]
    calls_per_client: usize,
    #[arg(long, env = "KILN_TEST_PG_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pg_url: String,
    /// Keep the per-actor limits on (set too high to refuse), to measure what checking them in
    /// the database costs each call.
    #[arg(long)]
    with_limits: bool,
}

pub async fn run(config: &Config, b: &McpBench) -> anyhow::Result<()> {
    let backend = if b.backend == BenchBackend::All { BenchBackend::Sqlite } else { b.backend };
    let scratch = Scratch::create(backend, &b.pg_url).await?;
    let store = Store::open_and_migrate(&kiln_store::StoreOptions::new(&scratch.url)).await?;
    let sandbox = Arc::new(DenoSandbox::start(config.sandbox_config()?)?);
    let shutdown = CancellationToken::new();
    let workers = b.clients.max(1) * 2;
    let local = LocalWorker::default();
    let worker = tokio::spawn(kiln_worker::queue::run_with_local(
        store.clone(),
        sandbox.clone(),
        config.worker_config(workers),
        local.clone(),
        shutdown.clone(),
    ));
    let mut api = config.api_config();
    api.listen = "127.0.0.1:0".parse()?;
    // The bench is one actor making thousands of calls: real limits would refuse it. Off, or on
    // but out of reach (`--with-limits`) to measure their cost.
    api.limits = if b.with_limits {
        LimitSettings { requests_per_second: 1e6, burst: 1_000_000, max_concurrent: 10_000, ..LimitSettings::default() }
    } else {
        LimitSettings { requests_per_second: 0.0, burst: 0, max_concurrent: 0, ..LimitSettings::default() }
    };
    let state =
        AppState { store: store.clone(), projections: None, sandbox: Some(sandbox.clone()), local_worker: Some(local) };
    let app = kiln_api::build(&api, state).await?;
    let addr = app.local_addr().to_string();
    let server = tokio::spawn(app.run(shutdown.clone()));

    let mut setup = Session::open(&addr).await?;
    let created = setup
        .call("tool_create", json!({"name": "bench_inc", "description": "n + 1", "code": "(args) => args.n + 1"}))
        .await?;
    if created["isError"] == json!(true) {
        bail!("cannot create the bench tool: {created}");
    }
    for n in 0..20 {
        setup.call("bench_inc", json!({"n": n})).await?;
    }

    let mut latencies = Vec::with_capacity(b.calls);
    for n in 0..b.calls {
        let start = Instant::now();
        let r = setup.call("bench_inc", json!({"n": n})).await?;
        latencies.push(start.elapsed());
        if r["structuredContent"]["result"] != json!(n + 1) {
            bail!("unexpected result for n={n}: {r}");
        }
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!("backend: {backend:?}, tool: (args) => args.n + 1, warm, through POST /mcp (SSE response)");
    println!(
        "1 client, {} sequential calls: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        b.calls,
        ms(pct(0.5)),
        ms(pct(0.9)),
        ms(pct(0.99)),
        ms(*latencies.last().unwrap_or(&Duration::ZERO))
    );

    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..b.clients {
        let addr = addr.clone();
        let calls = b.calls_per_client;
        tasks.push(tokio::spawn(async move {
            let mut s = Session::open(&addr).await?;
            for n in 0..calls {
                let r = s.call("bench_inc", json!({"n": n + c})).await?;
                if r["isError"] == json!(true) {
                    bail!("call failed: {r}");
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed();
    let total = b.clients * b.calls_per_client;
    println!(
        "{} concurrent clients, {total} calls: {:.0} calls/s ({:.2} s)",
        b.clients,
        total as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );

    shutdown.cancel();
    let _ = server.await;
    let _ = worker.await;
    sandbox.shutdown();
    store.close().await;
    scratch.drop_db().await
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One MCP session on one kept-alive HTTP/1.1 connection.
struct Session {
    conn: BufReader<TcpStream>,
    addr: String,
    session_id: String,
    next_id: u64,
}

impl Session {
    async fn open(addr: &str) -> anyhow::Result<Session> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let conn = BufReader::new(tcp);
        let mut s = Session { conn, addr: addr.to_owned(), session_id: String::new(), next_id: 1 };
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "kiln-bench", "version": "1"}}});
        let (headers, _) = s.post(&init).await?;
        s.session_id = headers
            .lines()
            .find_map(|l| l.strip_prefix("mcp-session-id: ").or_else(|| l.strip_prefix("Mcp-Session-Id: ")))
            .context("no Mcp-Session-Id in the initialize response")?
            .trim()
            .to_owned();
        s.post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await?;
        Ok(s)
    }

    async fn call(&mut self, tool: &str, arguments: Value) -> anyhow::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let req = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}});
        let (_, body) = self.post(&req).await?;
        // The body is JSON or SSE; the response is the message carrying our id.
        let message = body
            .lines()
            .map(|l| l.strip_prefix("data:").unwrap_or(l).trim())
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|m| m["id"] == json!(id))
            .with_context(|| format!("no response to request {id} in {body:?}"))?;
        if let Some(e) = message.get("error") {
            bail!("tools/call {tool} failed: {e}");
        }
        Ok(message["result"].clone())
    }

    /// Sends one POST and reads the whole response: (headers, body).
    async fn post(&mut self, body: &Value) -> anyhow::Result<(String, String)> {
        let body = body.to_string();
        let session = if self.session_id.is_empty() {
            String::new()
        } else {
            format!("Mcp-Session-Id: {}\r\nMcp-Protocol-Version: 2025-11-25\r\n", self.session_id)
        };
        let req = format!(
            "POST /mcp HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\n{session}Content-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        self.conn.get_mut().write_all(req.as_bytes()).await?;
        let mut headers = String::new();
        loop {
            let mut line = String::new();
            if self.conn.read_line(&mut line).await? == 0 {
                bail!("connection closed");
            }
            if line == "\r\n" {
                break;
            }
            headers.push_str(&line);
        }
        if !headers.starts_with("HTTP/1.1 2") {
            bail!("HTTP error: {headers}");
        }
        let lower = headers.to_ascii_lowercase();
        let mut out = Vec::new();
        if lower.contains("transfer-encoding: chunked") {
            loop {
                let mut size = String::new();
                self.conn.read_line(&mut size).await?;
                let n = usize::from_str_radix(size.trim(), 16).context("chunk size")?;
                let mut chunk = vec![0; n + 2];
                self.conn.read_exact(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(len) = lower.lines().find_map(|l| l.strip_prefix("content-length: ")) {
            let mut buf = vec![0; len.trim().parse()?];
            self.conn.read_exact(&mut buf).await?;
            out = buf;
        }
        Ok((headers, String::from_utf8_lossy(&out).into_owned()))
    }
}
