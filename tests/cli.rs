//! The `kiln` binary, run as a user runs it.

#![allow(clippy::unwrap_used)]

mod common;

use common::{PgDb, Server, http_get, kiln, run, stderr, stdout};
use kiln_proto::events::{ToolCreated, ToolVersionPublished};
use kiln_proto::{Actor, DomainEvent, EventMetadata, NewEvent, StreamId, ToolDefinition};
use kiln_store::{EventStore, ExpectedVersion, Store, StoreOptions};
use serde_json::{Value, json};

#[tokio::test]
async fn serve_on_sqlite_creates_the_store_serves_health_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["serve", "--listen", "127.0.0.1:0"]);
    let (status, body) = http_get(&server.addr, "/livez").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    let (status, body) = http_get(&server.addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["backend"], "sqlite");
    assert_eq!(body["projections"]["tool_catalog"]["position"], 0);
    assert!(body["sandbox"]["deno"].as_str().unwrap().starts_with("2.9."), "{body}");
    assert!(dir.path().join(".kiln/kiln.db").is_file(), "the default store is ./.kiln/kiln.db");
    let status = server.terminate();
    assert!(status.success(), "SIGTERM must stop kiln cleanly, got {status}");
}

#[tokio::test]
async fn serve_on_postgres_migrates_and_reports_ready() {
    let db = PgDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["serve", "--listen", "127.0.0.1:0", "--database-url", &db.url]);
    let (status, body) = http_get(&server.addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["backend"], "postgres");
    assert!(server.terminate().success());
    assert!(!dir.path().join(".kiln").exists(), "no SQLite file when PostgreSQL is used");
}

#[test]
fn config_layers_defaults_file_env_then_flags_and_hides_secrets() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        "listen = \"127.0.0.1:1111\"\n[log]\nlevel = \"debug\"\n[store]\nmax_connections = 3\nbusy_timeout_ms = 42\n",
    )
    .unwrap();
    let out = run(kiln(dir.path())
        .args(["config", "--listen", "127.0.0.1:3333"])
        .env("KILN_LISTEN", "127.0.0.1:2222")
        .env("KILN_STORE__MAX_CONNECTIONS", "4")
        .env("KILN_DATABASE_URL", "postgres://kiln:hunter2@db.internal:5432/kiln")
        .env("KILN_TEST_PG_URL", "not config: ignored"));
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: toml::Value = toml::from_str(&stdout(&out)).unwrap();
    assert_eq!(shown["listen"].as_str(), Some("127.0.0.1:3333"), "flags beat env and file");
    assert_eq!(shown["store"]["max_connections"].as_integer(), Some(4), "env beats file");
    assert_eq!(shown["store"]["busy_timeout_ms"].as_integer(), Some(42), "file beats defaults");
    assert_eq!(shown["log"]["level"].as_str(), Some("debug"));
    assert_eq!(shown["log"]["format"].as_str(), Some("text"), "defaults fill the rest");
    assert_eq!(shown["database_url"].as_str(), Some("postgres://kiln:********@db.internal:5432/kiln"));
    assert!(!stdout(&out).contains("hunter2"));
}

#[test]
fn invalid_config_is_refused_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(kiln(dir.path()).args(["serve", "--listen", "0.0.0.0:8788"]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("listen: 0.0.0.0:8788 is not a loopback address"), "{}", stderr(&out));

    std::fs::write(dir.path().join("kiln.toml"), "[store]\nmax_conections = 3\n").unwrap();
    let out = run(kiln(dir.path()).arg("config"));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown field: found `max_conections`"), "{}", stderr(&out));
    std::fs::remove_file(dir.path().join("kiln.toml")).unwrap();

    let out = run(kiln(dir.path()).args(["migrate", "--database-url", "mysql://localhost/x"]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unsupported database URL"), "{}", stderr(&out));

    let out = run(kiln(dir.path()).args(["config", "--config", "missing.toml"]));
    assert!(stderr(&out).contains("config file missing.toml does not exist"), "{}", stderr(&out));
}

#[test]
fn serve_refuses_to_start_without_the_pinned_deno() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(kiln(dir.path()).args(["serve", "--listen", "127.0.0.1:0"]).env("KILN_DENO", "/nowhere/deno"));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("deno not found: looked at /nowhere/deno"), "{}", stderr(&out));

    let fake = dir.path().join("deno");
    std::fs::write(&fake, "#!/bin/sh\necho 'deno 1.46.3 (stable, release, x86_64-unknown-linux-gnu)'\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = run(kiln(dir.path()).args(["serve", "--listen", "127.0.0.1:0"]).env("KILN_DENO", &fake));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is version 1.46.3, Kiln needs 2.9.x"), "{}", stderr(&out));
    assert!(!dir.path().join(".kiln").exists(), "nothing is created when start-up fails");
}

#[test]
fn migrate_creates_the_schema_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let out = run(kiln(dir.path()).args(["migrate", "--database-url", &url]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "sqlite schema at version 3 (was 0)");
    let out = run(kiln(dir.path()).args(["migrate", "--database-url", &url]));
    assert_eq!(stdout(&out).trim(), "sqlite schema at version 3 (was 3)");
}

fn tool_events(name: &str) -> Vec<NewEvent> {
    let d = ToolDefinition::parse(&json!({"name": name, "description": "d", "code": "return 1"})).unwrap().definition;
    let meta = EventMetadata::new(Actor::local());
    [
        DomainEvent::from(ToolCreated { name: d.name.clone() }),
        DomainEvent::from(ToolVersionPublished {
            name: d.name.clone(),
            version: 1,
            code_sha256: d.code_sha256(),
            definition: d,
        }),
    ]
    .iter()
    .map(|e| NewEvent::from_domain(e, meta.clone()))
    .collect()
}

#[tokio::test]
async fn projections_rebuild_and_verify_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let store = Store::open_and_migrate(&StoreOptions::new(&url)).await.unwrap();
    for n in ["alpha", "beta", "gamma"] {
        let s = StreamId::parse(format!("tool-{n}")).unwrap();
        store.append(&s, ExpectedVersion::NoStream, tool_events(n)).await.unwrap();
    }
    store.close().await;

    let out = run(kiln(dir.path()).args(["projections", "rebuild", "--all", "--database-url", &url]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("rebuilt tool_catalog up to position 6"), "{}", stdout(&out));
    let out = run(kiln(dir.path()).args(["projections", "verify", "--database-url", &url]));
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains("tool_catalog: ok (3 rows at position 6)"), "{}", stdout(&out));
    let out = run(kiln(dir.path()).args(["projections", "status", "--database-url", &url]));
    assert!(stdout(&out).contains("lag 0"), "{}", stdout(&out));

    // Tamper with the read model: verify must notice and fail.
    let store = Store::open(&StoreOptions::new(&url)).await.unwrap();
    let mut tx = store.begin_write().await.unwrap();
    tx.execute_raw("UPDATE tool_catalog SET current_version = 7 WHERE name = 'beta'").await.unwrap();
    tx.commit().await.unwrap();
    store.close().await;
    let out = run(kiln(dir.path()).args(["projections", "verify", "tool_catalog", "--database-url", &url]));
    assert!(!out.status.success());
    assert!(stdout(&out).contains("tool_catalog: DIFFERS"), "{}", stdout(&out));

    let out = run(kiln(dir.path()).args(["projections", "rebuild", "nope", "--database-url", &url]));
    assert!(stderr(&out).contains("unknown projection \"nope\""), "{}", stderr(&out));
}
