//! Harness for tests of the `kiln` binary: run it as a user would, in its own folder.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub fn kiln_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

/// The project's own deno (scripts/install-deno.sh). Tests fail, never skip, without it.
pub fn project_deno() -> PathBuf {
    let deno = Path::new(env!("CARGO_MANIFEST_DIR")).join(".kiln/tools/bin/deno");
    assert!(deno.is_file(), "{} is missing: run scripts/install-deno.sh", deno.display());
    deno
}

/// A `kiln` command in `dir`, with no `KILN_*` variables inherited from the test's environment
/// except `KILN_DENO`, pointed at the project's deno.
pub fn kiln(dir: &Path) -> Command {
    let mut cmd = Command::new(kiln_bin());
    cmd.current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("KILN_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "warn").env("KILN_DENO", project_deno());
    cmd
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("kiln runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A running `kiln serve`, killed if the test ends without stopping it.
pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Server {
    /// Starts `kiln <args>` and waits for its "listening" line.
    pub fn start(dir: &Path, args: &[&str]) -> Server {
        Self::start_with(kiln(dir), args)
    }

    /// Starts a prepared `kiln` command (say with extra environment) with `args`.
    pub fn start_with(mut cmd: Command, args: &[&str]) -> Server {
        use std::io::BufRead;
        let mut child = cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let line = lines.next().expect("kiln printed nothing").expect("read stdout");
        let addr = line.strip_prefix("kiln listening on http://").unwrap_or_else(|| panic!("unexpected: {line}"));
        let addr = addr.to_owned();
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, addr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("kill");
        assert!(status.success());
        for _ in 0..200 {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("kiln did not stop within 10 s of SIGTERM");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The project's Python with the `mcp` SDK. Tests fail, never skip, without it.
pub fn python() -> PathBuf {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join(".kiln/tools/py/bin/python");
    assert!(py.is_file(), "{} is missing: run scripts/install-mcp-clients.sh", py.display());
    py
}

pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp").join(name)
}

/// Runs a client script; panics with its whole output unless it succeeds.
pub fn run_client(name: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(script(name))
        .args(args)
        .env("KILN_DENO", project_deno())
        .env("PYTHONUNBUFFERED", "1")
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{name} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}", out.status);
    stdout
}

/// A minimal HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status line");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

#[allow(unused_imports)]
pub use kiln_store::testing::PgDatabase as PgDb;

/// One MCP request over Streamable HTTP on its own connection: (response headers, body).
async fn mcp_post(addr: &str, session: Option<&str>, body: &serde_json::Value) -> (String, String) {
    let body = body.to_string();
    let session = session.map(|s| format!("Mcp-Session-Id: {s}\r\nMcp-Protocol-Version: 2025-11-25\r\n"));
    let req = format!(
        "POST /mcp HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\n{}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        session.unwrap_or_default(),
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (headers.to_owned(), body.to_owned())
}

/// Calls `tool` over MCP as a client does (initialize, initialized, `tools/call`); returns the
/// raw body of the call's response (which may never come if the server dies first).
pub async fn mcp_call(addr: &str, tool: &str, arguments: serde_json::Value) -> String {
    let init = serde_json::json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "kiln-test", "version": "1"}}});
    let (headers, _) = mcp_post(addr, None, &init).await;
    let session = headers
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("mcp-session-id")).map(|(_, v)| v))
        .unwrap_or_else(|| panic!("no session id in {headers}"))
        .trim()
        .to_owned();
    mcp_post(addr, Some(&session), &serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await;
    let call = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": tool, "arguments": arguments}});
    mcp_post(addr, Some(&session), &call).await.1
}
