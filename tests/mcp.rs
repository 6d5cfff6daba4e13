//! The MCP API with real clients: the official Python SDK (`mcp`, installed pinned by
//! scripts/install-mcp-clients.sh) drives a real `kiln serve` (Streamable HTTP) or
//! `kiln mcp --stdio`, with the real sandbox and SQLite. The scripts live in tests/mcp/ and fail
//! loudly, naming the check that failed.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Server, kiln, project_deno};

/// The project's Python with the `mcp` SDK. Tests fail, never skip, without it.
fn python() -> PathBuf {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join(".kiln/tools/py/bin/python");
    assert!(py.is_file(), "{} is missing: run scripts/install-mcp-clients.sh", py.display());
    py
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp").join(name)
}

/// Runs a client script; panics with its whole output unless it succeeds.
fn run_client(name: &str, args: &[&str]) -> String {
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
fn the_tool_lifecycle_through_the_python_sdk_over_stdio() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/kiln.db", dir.path().display());
    let kiln = common::kiln_bin();
    let out = run_client("lifecycle.py", &["--stdio", kiln.to_str().unwrap(), &db]);
    assert!(out.contains(" passed, 0 failed"), "{out}");
}
