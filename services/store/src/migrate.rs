//! Schema migrations, embedded in the binary: `migrations/sqlite` and `migrations/postgres` at the
//! repository root. The event log's schema is migrated; read models are not (projections own
//! their tables and rebuild them when their version changes).

use std::borrow::Cow;

use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};

use crate::Backend;

const SQLITE: &[(i64, &str, &str)] = &[
    (1, "event log", include_str!("../../../migrations/sqlite/0001_event_log.sql")),
    (2, "api keys", include_str!("../../../migrations/sqlite/0002_api_keys.sql")),
    (3, "actor limits", include_str!("../../../migrations/sqlite/0003_actor_limits.sql")),
];

const POSTGRES: &[(i64, &str, &str)] = &[
    (1, "event log", include_str!("../../../migrations/postgres/0001_event_log.sql")),
    (2, "api keys", include_str!("../../../migrations/postgres/0002_api_keys.sql")),
    (3, "actor limits", include_str!("../../../migrations/postgres/0003_actor_limits.sql")),
];

/// The migrator for one backend.
pub fn migrator(backend: Backend) -> Migrator {
    let files = match backend {
        Backend::Sqlite => SQLITE,
        Backend::Postgres => POSTGRES,
    };
    let migrations = files
        .iter()
        .map(|&(version, description, sql)| {
            Migration::new(version, Cow::Borrowed(description), MigrationType::Simple, sql.into_sql_str(), false)
        })
        .collect();
    Migrator::with_migrations(migrations)
}

/// The newest schema version this binary knows.
pub fn latest_version(backend: Backend) -> i64 {
    migrator(backend).iter().map(|m| m.version).max().unwrap_or(0)
}
