//! Run history, replay, audit export and time travel through the `kiln` binary, with real deno
//! and a real SQLite store: what a user debugging a failed run does.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Output;
use std::sync::Arc;

use common::{PgDb, Server, http_get, kiln, project_deno, stderr, stdout};
use kiln_proto::events::{RunRequested, RunSucceeded, ToolCreated, ToolDisabled, ToolVersionPublished};
use kiln_proto::{Actor, DomainEvent, EventMetadata, NewEvent, RunId, StreamId, ToolDefinition, ToolName};
use kiln_store::{EventStore, ExpectedVersion, Store, StoreOptions};
use kiln_worker::DenoSandbox;
use kiln_worker::replay;
use kiln_worker::runs::{RunEngine, RunRequest};
use kiln_worker::sandbox::{DenoBinary, SandboxConfig};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A store in a temp folder, and an engine on it with the project's deno.
struct Fixture {
    dir: tempfile::TempDir,
    url: String,
    store: Store,
    engine: RunEngine,
    _pg: Option<PgDb>,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("kiln.db").display());
    fixture_at(dir, url, None).await
}

async fn fixture_pg() -> Fixture {
    let pg = PgDb::create().await;
    fixture_at(tempfile::tempdir().unwrap(), pg.url.clone(), Some(pg)).await
}

async fn fixture_at(dir: tempfile::TempDir, url: String, pg: Option<PgDb>) -> Fixture {
    let store = Store::open_and_migrate(&StoreOptions::new(&url)).await.unwrap();
    let deno = DenoBinary::locate(Some(&project_deno()), None).unwrap();
    let sandbox = Arc::new(DenoSandbox::start(SandboxConfig::new(deno)).unwrap());
    let engine = RunEngine::new(store.clone(), sandbox, "test-worker");
    Fixture { dir, url, store, engine, _pg: pg }
}

impl Fixture {
    /// `kiln <args> --database-url <this store>`, run off the async threads.
    async fn kiln(&self, args: &[&str]) -> Output {
        let mut cmd = kiln(self.dir.path());
        cmd.args(args).args(["--database-url", &self.url]);
        tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap()
    }

    /// Like `kiln`, but the command must succeed; returns its stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.kiln(args).await;
        assert!(out.status.success(), "kiln {args:?} failed: {}\n{}", stderr(&out), stdout(&out));
        stdout(&out)
    }

    async fn json(&self, args: &[&str]) -> Value {
        let text = self.ok(args).await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("kiln {args:?} printed no JSON ({e}): {text}"))
    }

    async fn publish(&self, definition: Value, version: u32) {
        let d = ToolDefinition::parse(&definition).unwrap().definition;
        let mut events = Vec::new();
        if version == 1 {
            events.push(DomainEvent::from(ToolCreated { name: d.name.clone() }));
        }
        events.push(
            ToolVersionPublished { name: d.name.clone(), version, code_sha256: d.code_sha256(), definition: d.clone() }
                .into(),
        );
        let meta = EventMetadata::new(Actor::parse("key:dev").unwrap());
        let events = events.iter().map(|e| NewEvent::from_domain(e, meta.clone())).collect();
        self.store.append(&StreamId::tool(&d.name), ExpectedVersion::Any, events).await.unwrap();
    }

    /// Requests a run and executes it here to its end.
    async fn run(&self, tool: &str, arguments: Value) -> RunId {
        let request = RunRequest {
            tool: ToolName::parse(tool).unwrap(),
            version: None,
            arguments,
            idempotency_key: None,
            parent_run: None,
            replay_of: None,
            reuse_steps: false,
            actor: Actor::parse("key:agent").unwrap(),
            traceparent: None,
        };
        let run = self.engine.request(request).await.unwrap().run_id;
        replay::execute_here(&self.engine, run, CancellationToken::new()).await.unwrap();
        run
    }
}

fn weather(version: u32) -> Value {
    let code = if version == 1 {
        r#"(a) => { console.log("looking up", a.city); throw new Error("bug: forgot to handle " + a.city); }"#
    } else {
        r#"(a) => ({ forecast: "sunny in " + a.city })"#
    };
    json!({"name": "weather", "description": "forecast", "code": code, "retry": {"maxAttempts": 3, "initialDelayMs": 0}})
}

fn change<'a>(report: &'a Value, path: &str) -> &'a Value {
    report["changes"].as_array().unwrap().iter().find(|c| c["path"] == path).unwrap_or_else(|| {
        panic!("no change at {path} in {report:#}");
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_shows_every_attempt_and_a_fixed_version_replays_to_success() {
    let f = fixture().await;
    f.publish(weather(1), 1).await;
    let original = f.run("weather", json!({"city": "Oslo"})).await;
    let id = original.to_string();

    let shown = f.ok(&["runs", "show", &id]).await;
    for n in 1..=3 {
        assert!(shown.contains(&format!("attempt {n} started on test-worker")), "{shown}");
        assert!(shown.contains(&format!("attempt {n} failed: user_error: bug: forgot to handle Oslo")), "{shown}");
    }
    assert_eq!(shown.matches("retry in 0 ms").count(), 2, "{shown}");
    assert!(shown.contains("no retry: "), "{shown}");
    assert!(shown.contains("Error: bug: forgot to handle Oslo\n"), "the stack is shown: {shown}");
    assert!(shown.contains("failed after 3 attempt(s): user_error: bug: forgot to handle Oslo"), "{shown}");
    assert!(shown.contains("looking up Oslo"), "the attempts' logs are shown: {shown}");
    assert!(shown.contains("status     failed after 3 attempt(s)"), "{shown}");

    // The fix is published; replaying on the latest version succeeds and the diff says how.
    f.publish(weather(2), 2).await;
    let report = f.json(&["runs", "replay", &id, "--version", "latest", "--execute", "local", "--json"]).await;
    assert_eq!(report["original"]["status"], "failed");
    assert_eq!(
        (report["replay"]["status"].as_str(), report["replay"]["toolVersion"].as_u64()),
        (Some("succeeded"), Some(2))
    );
    assert_eq!(report["same"], false);
    assert_eq!(
        change(&report, "/status"),
        &json!({"kind": "changed", "path": "/status", "before": "failed", "after": "succeeded"})
    );
    assert_eq!(change(&report, "/output")["after"], json!({"forecast": "sunny in Oslo"}));
    assert_eq!(change(&report, "/error")["kind"], "removed");
    let fixed: RunId = report["replay"]["runId"].as_str().unwrap().parse().unwrap();

    // On the recorded version the bug is still there: the same outcome. (`--execute auto`, the
    // default: no worker is running, so the CLI executes it after a grace period.)
    let text = f.ok(&["runs", "replay", &id]).await;
    assert!(text.contains("version 1 -> 1, failed -> failed") && text.contains("same outcome"), "{text}");

    let detail = f.json(&["runs", "show", &id, "--json"]).await;
    assert_eq!(detail["replays"].as_array().unwrap().len(), 2);
    let replayed = f.json(&["runs", "show", &fixed.to_string(), "--json"]).await;
    assert_eq!(replayed["replayOf"], id);
    assert_eq!(replayed["arguments"], json!({"city": "Oslo"}));

    // Bulk: every failed run of the tool (the original and the failed replay) on the latest version.
    let failed = f.json(&["runs", "list", "--tool", "weather", "--status", "failed", "--json"]).await;
    assert_eq!(failed["runs"].as_array().unwrap().len(), 2);
    let bulk =
        f.json(&["runs", "replay", "--tool", "weather", "--version", "latest", "--execute", "local", "--json"]).await;
    let bulk = bulk.as_array().unwrap();
    assert_eq!(bulk.len(), 2);
    assert!(bulk.iter().all(|r| r["replay"]["status"] == "succeeded"), "{bulk:?}");

    // With a server running, its queue workers execute the replay and the CLI only waits.
    let server = Server::start(f.dir.path(), &["serve", "--listen", "127.0.0.1:0", "--database-url", &f.url]);
    let report = f.json(&["runs", "replay", &id, "--version", "latest", "--execute", "worker", "--json"]).await;
    assert_eq!(report["replay"]["status"], "succeeded", "{report:#}");
    let replayed = f.ok(&["runs", "show", report["replay"]["runId"].as_str().unwrap()]).await;
    assert!(!replayed.contains("started on cli-"), "a server worker ran it, not the CLI: {replayed}");
    assert!(server.terminate().success());

    // Mistakes are explained.
    let out = f.kiln(&["runs", "show", "nope"]).await;
    assert!(!out.status.success() && stderr(&out).contains("invalid run id \"nope\""), "{}", stderr(&out));
    let out = f.kiln(&["runs", "replay", &id, "--version", "newest"]).await;
    assert!(stderr(&out).contains("expected recorded, latest or a version number"), "{}", stderr(&out));
    let out = f.kiln(&["runs", "list", "--status", "finished"]).await;
    assert!(stderr(&out).contains("unknown run status \"finished\""), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_with_reuse_steps_does_not_repeat_recorded_side_effects() {
    let f = fixture().await;
    let effects = kiln_worker::testing::SideEffects::start().await;
    let port = effects.port;
    let charges = || effects.count("/charge");
    let tool = |version: u32| {
        let after = if version == 1 { r#"throw new Error("bug after charging")"# } else { "return { charged }" };
        json!({
            "name": "charge", "description": "charges a card once",
            "code": format!(r#"export default async function (args, ctx) {{
                const charged = await ctx.step("charge", async () => (await (await fetch("http://127.0.0.1:{port}/charge")).json()).count);
                {after};
            }}"#),
            "permissions": {"network": [format!("127.0.0.1:{port}")]},
            "retry": {"maxAttempts": 1},
        })
    };
    f.publish(tool(1), 1).await;
    let original = f.run("charge", json!({"order": 7})).await.to_string();
    assert_eq!(charges(), 1);
    f.publish(tool(2), 2).await;

    let report = f
        .json(&["runs", "replay", &original, "--version", "latest", "--reuse-steps", "--execute", "local", "--json"])
        .await;
    assert_eq!(report["replay"]["status"], "succeeded", "{report:#}");
    assert_eq!(change(&report, "/output")["after"], json!({"charged": 1}), "the recorded step result was reused");
    assert_eq!(charges(), 1, "the recorded step did not run again");
    let replay_id = report["replay"]["runId"].as_str().unwrap().to_owned();
    let shown = f.ok(&["runs", "show", &replay_id]).await;
    assert!(shown.contains(&format!("reusing steps of {original}")), "{shown}");

    let report =
        f.json(&["runs", "replay", &original, "--version", "latest", "--fresh", "--execute", "local", "--json"]).await;
    assert_eq!(change(&report, "/output")["after"], json!({"charged": 2}));
    assert_eq!(charges(), 2, "a fresh replay runs every step again");
}

/// Seeds tool history and runs whose arguments and outputs carry secrets; returns the log
/// position after the first version of `wx`, and the id of one run.
async fn seed_audit(store: &Store) -> (u64, RunId) {
    let meta = |actor: &str| EventMetadata::new(Actor::parse(actor).unwrap());
    let wx = ToolName::parse("wx").unwrap();
    let def = |code: &str| {
        ToolDefinition::parse(&json!({"name": "wx", "description": "d", "code": code})).unwrap().definition
    };
    let v = |n: u32, code: &str| {
        let d = def(code);
        DomainEvent::from(ToolVersionPublished {
            name: wx.clone(),
            version: n,
            code_sha256: d.code_sha256(),
            definition: d,
        })
    };
    let append = |stream: StreamId, events: Vec<NewEvent>| async move {
        store.append(&stream, ExpectedVersion::Any, events).await.unwrap().last_position.0
    };
    let first = append(
        StreamId::tool(&wx),
        vec![
            NewEvent::from_domain(&ToolCreated { name: wx.clone() }.into(), meta("key:alice")),
            NewEvent::from_domain(&v(1, "1"), meta("key:alice")),
        ],
    )
    .await;
    append(StreamId::tool(&wx), vec![NewEvent::from_domain(&v(2, "2"), meta("key:bob"))]).await;
    append(
        StreamId::tool(&wx),
        vec![NewEvent::from_domain(&ToolDisabled { name: wx.clone(), reason: None }.into(), meta("key:bob"))],
    )
    .await;
    let mut last = RunId::new();
    for i in 0..20 {
        let id = RunId::new();
        let requested = RunRequested {
            run_id: id,
            tool: wx.clone(),
            tool_version: 2,
            arguments: json!({"city": "Oslo", "apiKey": format!("sk-live-SECRET{i:04}abcdef"), "note": "Bearer tok_SECRETBEARER0123456789"}),
            idempotency_key: None,
            parent_run: None,
            replay_of: None,
            reuse_steps_from: None,
        };
        let done = RunSucceeded { attempt: 1, output: json!({"password": "hunter2-SECRET"}) };
        let actor = if i % 2 == 0 { "key:alice" } else { "key:carol" };
        append(
            StreamId::run(id),
            vec![
                NewEvent::from_domain(&requested.into(), meta(actor)),
                NewEvent::from_domain(&done.into(), meta("system:worker")),
            ],
        )
        .await;
        last = id;
    }
    (first, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_export_and_time_travel_from_the_cli_on_sqlite() {
    audit_export_and_time_travel_from_the_cli(fixture().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_export_and_time_travel_from_the_cli_on_postgres() {
    audit_export_and_time_travel_from_the_cli(fixture_pg().await).await;
}

async fn audit_export_and_time_travel_from_the_cli(f: Fixture) {
    let (first, _) = seed_audit(&f.store).await;
    let text = f.ok(&["audit", "export"]).await;
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4 + 20 * 2, "tool created, 2 versions, disabled, 20 runs requested and succeeded");
    assert!(!text.contains("SECRET"), "a secret leaked: {text}");
    assert!(lines.windows(2).all(|w| w[0]["position"].as_u64() < w[1]["position"].as_u64()));
    let actions = |text: &str| {
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["action"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        actions(&f.ok(&["audit", "export", "--action", "tool.*"]).await),
        ["tool.created", "tool.updated", "tool.updated", "tool.disabled"]
    );
    assert_eq!(
        f.ok(&["audit", "export", "--actor", "key:carol", "--action", "run.requested"]).await.lines().count(),
        10
    );
    assert_eq!(f.ok(&["audit", "export", "--tool", "wx", "--since", "2000-01-01"]).await, text);
    assert_eq!(f.ok(&["audit", "export", "--until", "2000-01-01"]).await, "");
    let out = f.kiln(&["audit", "export", "--action", "run.exploded"]).await;
    assert!(
        !out.status.success() && stderr(&out).contains("unknown audit action \"run.exploded\""),
        "{}",
        stderr(&out)
    );
    let out = f.kiln(&["audit", "export", "--since", "last tuesday"]).await;
    assert!(stderr(&out).contains("invalid time \"last tuesday\""), "{}", stderr(&out));

    // The catalog now, and as it was after the first version.
    let now = f.json(&["tools", "list", "--deleted", "--json"]).await;
    assert_eq!((now[0]["version"].as_u64(), now[0]["state"].as_str()), (Some(2), Some("disabled")));
    let then = f.json(&["tools", "list", "--at", &first.to_string(), "--json"]).await;
    assert_eq!(
        (then[0]["version"].as_u64(), then[0]["state"].as_str(), then[0]["changedBy"].as_str()),
        (Some(1), Some("enabled"), Some("key:alice"))
    );
    let text = f.ok(&["tools", "list", "--at", &first.to_string()]).await;
    assert!(text.contains(&format!("catalog as of log position {first}")) && text.contains("wx"), "{text}");
    assert_eq!(f.json(&["tools", "list", "--at", "2000-01-01", "--json"]).await, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_and_audit_over_http() {
    let f = fixture().await;
    let (_, run) = seed_audit(&f.store).await;
    let server = Server::start(f.dir.path(), &["serve", "--listen", "127.0.0.1:0", "--database-url", &f.url]);
    let addr = server.addr.clone();
    // The server's projections catch up in the background.
    let mut page = Value::Null;
    for _ in 0..200 {
        let (status, body) = http_get(&addr, "/v1/runs?limit=5").await;
        assert_eq!(status, 200, "{body}");
        page = serde_json::from_str(&body).unwrap();
        if page["runs"].as_array().is_some_and(|r| r.len() == 5) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(page["runs"][0]["runId"], run.to_string(), "newest first: {page}");
    let cursor = page["nextCursor"].as_str().unwrap();
    let (_, body) = http_get(&addr, &format!("/v1/runs?limit=50&cursor={cursor}&actor=key:alice")).await;
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["runs"].as_array().unwrap().len(), 8);

    let (status, body) = http_get(&addr, &format!("/v1/runs/{run}")).await;
    assert_eq!(status, 200, "{body}");
    let detail: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(detail["status"], "succeeded");
    let types: Vec<&str> = detail["timeline"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["run.requested", "run.succeeded"]);

    let (status, body) = http_get(&addr, "/v1/runs?status=finished").await;
    assert_eq!(status, 400);
    assert!(body.contains("unknown run status"), "{body}");
    let (status, _) = http_get(&addr, &format!("/v1/runs/{}", RunId::new())).await;
    assert_eq!(status, 404);
    let (status, body) = http_get(&addr, "/v1/runs?colour=red").await;
    assert_eq!(status, 400, "unknown parameters are refused: {body}");

    let mut export = String::new();
    for _ in 0..200 {
        let (status, body) = http_get_stream(&addr, "/v1/audit.jsonl").await;
        assert_eq!(status, 200, "{body}");
        export = body;
        if export.lines().count() == 44 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(export.lines().count(), 44);
    assert!(!export.contains("SECRET"));
    let (_, body) = http_get_stream(&addr, "/v1/audit.jsonl?action=tool.*&actor=key:bob").await;
    assert_eq!(body.lines().count(), 2, "{body}");
    let (status, body) = http_get(&addr, "/v1/audit.jsonl?action=nope").await;
    assert_eq!(status, 400, "{body}");
    assert!(server.terminate().success());
}

/// GET of a streamed (chunked) response: (status, decoded body).
async fn http_get_stream(addr: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, mut rest) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return (status, rest.to_owned());
    }
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return (status, body);
        }
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}
