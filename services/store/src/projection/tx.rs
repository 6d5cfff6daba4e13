//! A write transaction on either backend, with portable statements.

use sqlx::{Postgres, Row, Sqlite, Transaction};

use crate::Result;

/// A transaction for read models and checkpoints.
#[derive(Debug)]
pub enum WriteTx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

/// A bind value both backends understand, typed so PostgreSQL can infer NULLs.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Text(Option<String>),
    Int(Option<i64>),
}

impl From<&str> for SqlValue {
    fn from(s: &str) -> Self {
        Self::Text(Some(s.to_owned()))
    }
}

impl From<String> for SqlValue {
    fn from(s: String) -> Self {
        Self::Text(Some(s))
    }
}

impl From<Option<String>> for SqlValue {
    fn from(s: Option<String>) -> Self {
        Self::Text(s)
    }
}

impl From<Option<i64>> for SqlValue {
    fn from(i: Option<i64>) -> Self {
        Self::Int(i)
    }
}

impl From<i64> for SqlValue {
    fn from(i: i64) -> Self {
        Self::Int(Some(i))
    }
}

/// A statement prepared for both dialects: `$n` placeholders for PostgreSQL, `?n` for SQLite.
#[derive(Debug, Clone)]
pub struct Stmt {
    postgres: String,
    sqlite: String,
}

impl Stmt {
    pub fn new(sql: impl Into<String>) -> Self {
        let postgres = sql.into();
        let sqlite = sqlite_placeholders(&postgres);
        Self { postgres, sqlite }
    }
}

/// `$n` placeholders as SQLite wants them: anonymous `?` when they appear exactly as `$1, $2, ...`
/// in order (each once), `?n` otherwise. Numbered ones cost SQLite a scan of every name per bind
/// (sqlx asks each parameter's name), which made a multi-row INSERT of thousands of values
/// quadratic: half of a projection rebuild's time.
fn sqlite_placeholders(sql: &str) -> String {
    let numbered = sql.replace('$', "?");
    let mut out = String::with_capacity(sql.len());
    let mut expected = 1u64;
    let mut rest = sql;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let digits = rest[i + 1..].bytes().take_while(u8::is_ascii_digit).count();
        if rest[i + 1..i + 1 + digits].parse::<u64>() != Ok(expected) {
            return numbered;
        }
        out.push('?');
        expected += 1;
        rest = &rest[i + 1 + digits..];
    }
    out.push_str(rest);
    out
}

macro_rules! bind_all {
    ($query:expr, $args:expr) => {{
        let mut q = $query;
        for a in $args {
            q = match a {
                SqlValue::Text(v) => q.bind(v.clone()),
                SqlValue::Int(v) => q.bind(*v),
            };
        }
        q
    }};
}

impl WriteTx {
    /// Runs a statement; returns the number of rows affected.
    pub async fn execute(&mut self, stmt: &Stmt, args: &[SqlValue]) -> Result<u64> {
        Ok(match self {
            Self::Sqlite(tx) => {
                let q = sqlx::query(sqlx::AssertSqlSafe(stmt.sqlite.as_str()));
                bind_all!(q, args).execute(&mut **tx).await?.rows_affected()
            }
            Self::Postgres(tx) => {
                let q = sqlx::query(sqlx::AssertSqlSafe(stmt.postgres.as_str()));
                bind_all!(q, args).execute(&mut **tx).await?.rows_affected()
            }
        })
    }

    /// Runs DDL or any statement without binds.
    pub async fn execute_raw(&mut self, sql: &str) -> Result<()> {
        match self {
            Self::Sqlite(tx) => {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut **tx).await?;
            }
            Self::Postgres(tx) => {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut **tx).await?;
            }
        }
        Ok(())
    }

    /// The first column of the first row, as an integer.
    pub async fn fetch_int(&mut self, stmt: &Stmt, args: &[SqlValue]) -> Result<Option<i64>> {
        Ok(match self {
            Self::Sqlite(tx) => {
                let q = sqlx::query(sqlx::AssertSqlSafe(stmt.sqlite.as_str()));
                bind_all!(q, args).fetch_optional(&mut **tx).await?.map(|r| r.try_get::<i64, _>(0)).transpose()?
            }
            Self::Postgres(tx) => {
                let q = sqlx::query(sqlx::AssertSqlSafe(stmt.postgres.as_str()));
                bind_all!(q, args).fetch_optional(&mut **tx).await?.map(|r| r.try_get::<i64, _>(0)).transpose()?
            }
        })
    }

    /// Every row of a query with binds, each column read as text (cast non-text columns in the
    /// SQL): for reading read models on either backend.
    pub async fn fetch_rows(&mut self, stmt: &Stmt, args: &[SqlValue]) -> Result<Vec<Vec<Option<String>>>> {
        fn collect<R: Row>(rows: Vec<R>) -> Result<Vec<Vec<Option<String>>>>
        where
            for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
            usize: sqlx::ColumnIndex<R>,
        {
            rows.iter()
                .map(|r| (0..r.len()).map(|i| r.try_get::<Option<String>, _>(i).map_err(Into::into)).collect())
                .collect()
        }
        match self {
            Self::Sqlite(tx) => {
                let q = sqlx::query(sqlx::AssertSqlSafe(stmt.sqlite.as_str()));
                collect(bind_all!(q, args).fetch_all(&mut **tx).await?)
            }
            Self::Postgres(tx) => {
                let q = sqlx::query(sqlx::AssertSqlSafe(stmt.postgres.as_str()));
                collect(bind_all!(q, args).fetch_all(&mut **tx).await?)
            }
        }
    }

    /// Every row, every column cast to text: for comparing read models.
    pub async fn fetch_text_rows(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        fn collect<R: Row>(rows: Vec<R>) -> Result<Vec<Vec<Option<String>>>>
        where
            for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
            usize: sqlx::ColumnIndex<R>,
        {
            rows.iter()
                .map(|r| (0..r.len()).map(|i| r.try_get::<Option<String>, _>(i).map_err(Into::into)).collect())
                .collect()
        }
        match self {
            Self::Sqlite(tx) => collect(sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&mut **tx).await?),
            Self::Postgres(tx) => collect(sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&mut **tx).await?),
        }
    }

    pub async fn commit(self) -> Result<()> {
        match self {
            Self::Sqlite(tx) => tx.commit().await?,
            Self::Postgres(tx) => tx.commit().await?,
        }
        Ok(())
    }

    pub async fn rollback(self) -> Result<()> {
        match self {
            Self::Sqlite(tx) => tx.rollback().await?,
            Self::Postgres(tx) => tx.rollback().await?,
        }
        Ok(())
    }

    /// `FOR UPDATE` where the backend has row locks (SQLite's writer lock already serialises).
    pub fn for_update(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "",
            Self::Postgres(_) => " FOR UPDATE",
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sequential_placeholders_become_anonymous_on_sqlite() {
        use super::sqlite_placeholders as s;
        assert_eq!(s("INSERT INTO t VALUES ($1, $2), ($3, $4)"), "INSERT INTO t VALUES (?, ?), (?, ?)");
        assert_eq!(s("SELECT 1"), "SELECT 1");
        assert_eq!(s("UPDATE t SET a = $2 WHERE b = $1"), "UPDATE t SET a = ?2 WHERE b = ?1");
        assert_eq!(s("SELECT $1 WHERE x = $1"), "SELECT ?1 WHERE x = ?1");
        assert_eq!(s("SELECT $10"), "SELECT ?10");
    }
}
