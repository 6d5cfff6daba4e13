//! The MCP API with real clients: the official Python SDK (`mcp`, installed pinned by
//! scripts/install-mcp-clients.sh) drives a real `kiln serve` (Streamable HTTP) or
//! `kiln mcp --stdio`, with the real sandbox and SQLite. The scripts live in tests/mcp/ and fail
//! loudly, naming the check that failed.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{Server, kiln, run_client, script};

fn serve(dir: &Path, env: &[(&str, &str)]) -> Server {
    let mut cmd = kiln(dir);
    cmd.env("KILN_DATABASE_URL", format!("sqlite://{}/kiln.db", dir.display()));
    for (k, v) in env {
        cmd.env(k, v);
    }
    Server::start_with(cmd, &["serve", "--listen", "127.0.0.1:0"])
}

#[test]
fn the_tool_lifecycle_through_the_python_sdk_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[]);
    let out = run_client("lifecycle.py", &[&format!("http://{}/mcp", server.addr)]);
    assert!(out.contains(" passed, 0 failed"), "{out}");
    server.terminate();
}

#[test]
fn the_seed_documents_example_tools_run_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[]);
    let out = run_client("seeds.py", &[&format!("http://{}/mcp", server.addr)]);
    assert!(out.contains(" passed, 0 failed"), "{out}");
    server.terminate();
}

#[test]
fn the_tool_lifecycle_through_the_python_sdk_over_stdio() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/kiln.db", dir.path().display());
    let kiln = common::kiln_bin();
    let out = run_client("lifecycle.py", &["--stdio", kiln.to_str().unwrap(), &db]);
    assert!(out.contains(" passed, 0 failed"), "{out}");
}

/// Creates an API key with `kiln keys create`; returns its secret.
fn create_key(dir: &Path, db: &str, name: &str, scopes: &str, hosts: &[&str]) -> String {
    let mut cmd = kiln(dir);
    cmd.env("KILN_DATABASE_URL", db).args(["keys", "create", "--name", name, "--scopes", scopes]);
    for h in hosts {
        cmd.args(["--allow-host", h]);
    }
    let out = common::run(&mut cmd);
    assert!(out.status.success(), "keys create failed: {}", common::stderr(&out));
    let secret = common::stdout(&out).trim().to_owned();
    assert!(secret.starts_with("kiln_"), "{secret}");
    secret
}

#[test]
fn auth_scopes_host_grants_and_transport_guards() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/kiln.db", dir.path().display());
    let admin = create_key(dir.path(), &db, "admin", "admin", &["allowed.example.com"]);
    let reader = create_key(dir.path(), &db, "reader", "tools:read", &[]);
    let narrow = create_key(dir.path(), &db, "narrow", "tools:read,tools:write,tools:run", &["allowed.example.com"]);
    let replayer = create_key(dir.path(), &db, "replayer", "tools:read,tools:run,runs:read", &[]);

    let list = common::run(kiln(dir.path()).env("KILN_DATABASE_URL", &db).args(["keys", "list", "--json"]));
    let listed = common::stdout(&list);
    assert!(listed.contains("\"narrow\"") && !listed.contains(&narrow[21..]), "secrets never listed: {listed}");

    let server = serve(dir.path(), &[("KILN_AUTH__REQUIRED", "true")]);
    let out = run_client("security.py", &[&format!("http://{}/mcp", server.addr), &admin, &reader, &narrow, &replayer]);
    assert!(out.contains(" passed, 0 failed"), "{out}");
    server.terminate();

    // Every refusal was recorded (up to the per-second budget) as auth.denied with its reason.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let denials = rt.block_on(async {
        use kiln_store::EventStore;
        let store = kiln_store::Store::open(&kiln_store::StoreOptions::new(&db)).await.unwrap();
        let stream = kiln_proto::StreamId::parse("auth-denied").unwrap();
        let events = store.read_stream(&stream, kiln_proto::StreamVersion(0), 100).await.unwrap();
        events.iter().map(|e| (e.event_type.clone(), e.payload_value())).collect::<Vec<_>>()
    });
    let reasons: Vec<&str> = denials.iter().map(|(_, p)| p["reason"].as_str().unwrap()).collect();
    assert!(denials.iter().all(|(t, _)| t == "auth.denied"), "{denials:?}");
    for reason in ["missing_token", "invalid_token", "insufficient_scope"] {
        assert!(reasons.contains(&reason), "no {reason} denial in {reasons:?}");
    }
    // Which scope denials are recorded depends on the per-second budget (security.py is refused
    // tools:write, tools:run and runs:read over MCP, audit:read over HTTP); each names the scope
    // it lacked and what was asked.
    let scopes = ["tools:read", "tools:write", "tools:run", "runs:read", "audit:read", "admin"];
    for (_, denial) in denials.iter().filter(|(_, p)| p["reason"] == "insufficient_scope") {
        let scope = denial["requiredScope"].as_str().unwrap_or_default();
        assert!(scopes.contains(&scope), "{denial}");
        assert!(denial["method"].as_str().is_some_and(|m| !m.is_empty()), "{denial}");
    }
}

#[test]
fn jwt_bearer_tokens_checked_against_a_jwks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    run_client("jwt_auth.py", &["keygen", d]);
    let jwks = format!("{d}/jwks.json");
    let server = serve(
        dir.path(),
        &[
            ("KILN_AUTH__REQUIRED", "true"),
            ("KILN_AUTH__JWT__JWKS_FILE", &jwks),
            ("KILN_AUTH__JWT__ISSUER", "https://idp.test"),
            ("KILN_AUTH__JWT__AUDIENCE", "kiln"),
        ],
    );
    let out = run_client("jwt_auth.py", &["check", &format!("http://{}/mcp", server.addr), d]);
    assert!(out.contains(" passed, 0 failed"), "{out}");
    server.terminate();
}

/// The scenarios the issue names; each must pass (never be in the baseline).
const REQUIRED_SCENARIOS: &[&str] = &[
    "server-initialize",
    "ping",
    "tools-list",
    "dns-rebinding-protection",
    "tools-call-simple-text",
    "tools-call-image",
    "tools-call-audio",
    "tools-call-embedded-resource",
    "tools-call-mixed-content",
    "tools-call-error",
    "tools-call-with-logging",
    "tools-call-with-progress",
];

#[test]
fn the_mcp_conformance_suite_passes_except_its_baseline() {
    let node_bin = Path::new(env!("CARGO_MANIFEST_DIR")).join(".kiln/tools/node/node_modules/.bin");
    assert!(node_bin.join("conformance").is_file(), "conformance suite missing: run scripts/install-mcp-clients.sh");
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[]);
    let url = format!("http://{}/mcp", server.addr);
    run_client("conformance_fixtures.py", &[&url]);

    // The suite's CLI runs on the pinned Node 22 (first on PATH), not the machine's node.
    let path = format!("{}:{}", node_bin.display(), std::env::var("PATH").unwrap_or_default());
    let baseline = script("conformance-baseline.yml");
    let out = Command::new(node_bin.join("conformance"))
        .args(["server", "--url", &url, "--expected-failures", baseline.to_str().unwrap()])
        .env("PATH", path)
        .current_dir(dir.path())
        .output()
        .expect("conformance runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "conformance regressed ({}):\n{stdout}\n{stderr}", out.status);
    for scenario in REQUIRED_SCENARIOS {
        let line = stdout.lines().find(|l| l.contains(&format!(" {scenario}: "))).unwrap_or_default();
        assert!(line.starts_with('✓') && line.contains(" 0 failed"), "{scenario} did not pass: {line:?}\n{stdout}");
    }
    let total = stdout.lines().find(|l| l.starts_with("Total: ")).unwrap_or_default();
    println!("conformance: {total}");
    server.terminate();
}

#[tokio::test]
async fn catalog_changes_reach_the_sessions_of_another_replica() {
    let db = common::PgDb::create().await;
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = Server::start(dir_a.path(), &["serve", "--listen", "127.0.0.1:0", "--database-url", &db.url]);
    let b = Server::start(dir_b.path(), &["api", "--listen", "127.0.0.1:0", "--database-url", &db.url]);
    let out = run_client("cross_replica.py", &[&format!("http://{}/mcp", a.addr), &format!("http://{}/mcp", b.addr)]);
    assert!(out.contains(" passed, 0 failed"), "{out}");
    b.terminate();
    a.terminate();
}

/// A raw `initialize` POST to /mcp: (status, headers).
async fn post_initialize(addr: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#;
    let req = format!(
        "POST /mcp HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    // An accepted initialize answers on an SSE stream that stays open: the head is enough.
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await.unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status line");
    (status, text.split_once("\r\n\r\n").map(|(h, _)| h.to_owned()).unwrap_or_default())
}

#[tokio::test]
async fn an_actor_over_its_rate_is_told_when_to_retry() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[("KILN_LIMITS__REQUESTS_PER_SECOND", "0.01"), ("KILN_LIMITS__BURST", "2")]);
    assert_eq!(post_initialize(&server.addr).await.0, 200);
    assert_eq!(post_initialize(&server.addr).await.0, 200);
    let (status, headers) = post_initialize(&server.addr).await;
    assert_eq!(status, 429, "{headers}");
    let retry = headers
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("retry-after: ").map(|v| v.trim().parse::<u64>().unwrap()))
        .unwrap_or_else(|| panic!("no Retry-After in {headers}"));
    assert!((1..=100).contains(&retry), "retry after {retry} s");
    server.terminate();
}

/// Two API replicas on one PostgreSQL database share one actor's budget: its burst is spent
/// across both, and the replica that did not see the earlier requests refuses too.
#[tokio::test]
async fn two_replicas_share_an_actors_rate_budget() {
    let db = common::PgDb::create().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let limits = [("KILN_LIMITS__REQUESTS_PER_SECOND", "0.01"), ("KILN_LIMITS__BURST", "3")];
    let start = |dir: &Path, command: &str| {
        let mut cmd = kiln(dir);
        cmd.envs(limits);
        Server::start_with(cmd, &[command, "--listen", "127.0.0.1:0", "--database-url", &db.url])
    };
    let a = start(dir_a.path(), "serve");
    let b = start(dir_b.path(), "api");
    let mut statuses = Vec::new();
    for addr in [&a.addr, &b.addr, &a.addr, &b.addr, &a.addr] {
        statuses.push(post_initialize(addr).await);
    }
    let codes: Vec<u16> = statuses.iter().map(|(s, _)| *s).collect();
    assert_eq!(codes, [200, 200, 200, 429, 429], "a burst of 3 for both replicas together");
    let retry = statuses[3]
        .1
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("retry-after: ").map(|v| v.trim().parse::<u64>().unwrap()))
        .unwrap_or_else(|| panic!("no Retry-After in {}", statuses[3].1));
    assert!((1..=100).contains(&retry), "retry after {retry} s");
    b.terminate();
    a.terminate();
}

/// MCP tasks: a client that declares the tasks extension gets a task backed by the run when the
/// call outlives the budget; one that does not keeps getting the run handle; `tasks/cancel`
/// cancels the run with the caller recorded.
#[test]
fn calls_past_the_budget_become_tasks_for_task_aware_clients() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/kiln.db", dir.path().display());
    let server = serve(dir.path(), &[("KILN_MCP__CALL_BUDGET_MS", "300")]);
    let out = run_client("tasks.py", &[&format!("http://{}/mcp", server.addr)]);
    assert!(out.contains(" passed, 0 failed"), "{out}");
    server.terminate();

    let run_id = out.lines().find_map(|l| l.strip_prefix("cancelled-run: ")).expect("the cancelled run's id");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let events = rt.block_on(async {
        use kiln_store::EventStore;
        let store = kiln_store::Store::open(&kiln_store::StoreOptions::new(&db)).await.unwrap();
        let stream = kiln_proto::StreamId::run(run_id.parse().unwrap());
        let events = store.read_stream(&stream, kiln_proto::StreamVersion(0), 100).await.unwrap();
        events.iter().map(|e| (e.event_type.clone(), e.payload_value())).collect::<Vec<_>>()
    });
    let cancelled = events.iter().find(|(t, _)| t == "run.cancelled").unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(cancelled.1["cancelledBy"], "local", "{cancelled:?}");
    assert_eq!(cancelled.1["reason"], "tasks/cancel", "{cancelled:?}");
}
