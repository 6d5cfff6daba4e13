//! Test support (feature `testing`): a fresh database per test on either backend, and a macro
//! that runs one test body against both. Used by the tests of every Kiln crate.
//!
//! PostgreSQL tests create their own database on the server named by `KILN_TEST_PG_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`) and drop it afterwards. If the server is
//! unreachable the test fails: it is never skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use sqlx::Connection;

use crate::{Store, StoreOptions};

pub fn pg_admin_url() -> String {
    std::env::var("KILN_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A PostgreSQL database that exists for one test; dropped (connections and all) with this value.
#[derive(Debug)]
pub struct PgDatabase {
    pub url: String,
    admin_url: String,
    name: String,
}

impl PgDatabase {
    pub async fn create() -> PgDatabase {
        let admin_url = pg_admin_url();
        let name = format!("kiln_t_{}", uuid::Uuid::now_v7().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin_url} is required for this test: {e}"));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.unwrap();
        let mut url = url::Url::parse(&admin_url).unwrap();
        url.set_path(&format!("/{name}"));
        PgDatabase { url: url.to_string(), admin_url, name }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
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

/// A migrated store on a database that exists only for one test.
#[derive(Debug)]
pub struct TestDb {
    pub store: Store,
    pub url: String,
    _keep: Keep,
}

#[derive(Debug)]
enum Keep {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Pg(#[allow(dead_code)] PgDatabase),
}

impl TestDb {
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("kiln.db").display());
        let store = Store::open_and_migrate(&StoreOptions::new(&url)).await.unwrap();
        TestDb { store, url, _keep: Keep::Dir(dir) }
    }

    pub async fn postgres() -> TestDb {
        let db = PgDatabase::create().await;
        let store = Store::open_and_migrate(&StoreOptions::new(&db.url)).await.unwrap();
        TestDb { store, url: db.url.clone(), _keep: Keep::Pg(db) }
    }

    /// Another, independent connection to the same database (as a second process would have).
    pub async fn reopen(&self) -> Store {
        Store::open(&StoreOptions::new(&self.url)).await.unwrap()
    }

    /// A fresh database on the same backend as this one.
    pub async fn another(&self) -> TestDb {
        match self.store.backend() {
            crate::Backend::Sqlite => Self::sqlite().await,
            crate::Backend::Postgres => Self::postgres().await,
        }
    }
}

/// Runs each listed `async fn name(db: TestDb)` against SQLite and against PostgreSQL, as
/// `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::testing::TestDb::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::testing::TestDb::postgres().await).await;
                }
            )*
        }
    };
}
