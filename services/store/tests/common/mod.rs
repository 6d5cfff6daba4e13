//! Test harness: a fresh database per test on either backend, and event builders.
//!
//! PostgreSQL tests create their own database on the server named by `KILN_TEST_PG_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`) and drop it afterwards. If the server is
//! unreachable the test fails: it is never skipped.

#![allow(dead_code, clippy::unwrap_used)]

use kiln_proto::events::{ToolCreated, ToolVersionPublished};
use kiln_proto::{Actor, DomainEvent, EventMetadata, NewEvent, ToolDefinition, ToolName};
use kiln_store::{Store, StoreOptions};
use serde_json::json;
use sqlx::Connection;

pub fn pg_admin_url() -> String {
    std::env::var("KILN_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A store on a database that exists only for one test.
pub struct TestDb {
    pub store: Store,
    pub url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    PgDatabase { admin_url: String, name: String },
}

impl TestDb {
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("kiln.db").display());
        let store = Store::open_and_migrate(&StoreOptions::new(&url)).await.unwrap();
        TestDb { store, url, cleanup: Cleanup::Dir(dir) }
    }

    pub async fn postgres() -> TestDb {
        let admin_url = pg_admin_url();
        let name = format!("kiln_t_{}", uuid::Uuid::now_v7().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin_url} is required for this test: {e}"));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.unwrap();
        let mut url = url::Url::parse(&admin_url).unwrap();
        url.set_path(&format!("/{name}"));
        let url = url.to_string();
        let store = Store::open_and_migrate(&StoreOptions::new(&url)).await.unwrap();
        TestDb { store, url, cleanup: Cleanup::PgDatabase { admin_url, name } }
    }

    /// Another, independent connection to the same database (as a second process would have).
    pub async fn reopen(&self) -> Store {
        Store::open(&StoreOptions::new(&self.url)).await.unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Cleanup::PgDatabase { admin_url, name } = &self.cleanup {
            let (admin_url, name) = (admin_url.clone(), name.clone());
            // Drop runs outside async context: use a private runtime on its own thread.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                        let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut admin).await;
                    }
                });
            })
            .join();
        }
    }
}

/// Runs each listed async test function against SQLite and against PostgreSQL.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::common::TestDb::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::common::TestDb::postgres().await).await;
                }
            )*
        }
    };
}

pub fn actor() -> Actor {
    Actor::parse("key:test").unwrap()
}

/// A generic event with a small payload.
pub fn event(kind: &str, n: u64) -> NewEvent {
    let e = DomainEvent::from(ToolCreated { name: ToolName::parse(format!("t{n}")).unwrap() });
    let mut e = NewEvent::from_domain(&e, EventMetadata::new(actor()));
    e.event_type = kind.to_owned();
    e.payload = json!({"n": n, "kind": kind});
    e
}

pub fn tool_definition(name: &str, code: &str) -> ToolDefinition {
    ToolDefinition::parse(&json!({"name": name, "description": format!("tool {name}"), "code": code}))
        .unwrap()
        .definition
}

pub fn domain(e: impl Into<DomainEvent>) -> NewEvent {
    NewEvent::from_domain(&e.into(), EventMetadata::new(actor()))
}

/// The events that create a tool with its first version.
pub fn create_tool(name: &str, code: &str) -> Vec<NewEvent> {
    let d = tool_definition(name, code);
    vec![
        domain(ToolCreated { name: d.name.clone() }),
        domain(ToolVersionPublished { name: d.name.clone(), version: 1, code_sha256: d.code_sha256(), definition: d }),
    ]
}
