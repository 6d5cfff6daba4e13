//! Per-actor request limits kept in the database, so every API replica on it shares one budget
//! per actor (and, on SQLite, every process sharing the file). The rate is a GCRA token bucket
//! (one row per actor holding its theoretical arrival time); concurrency is a counter on the same
//! row plus one leased slot row per request in flight, so a replica that dies without releasing
//! its slots loses them when their lease expires.
//!
//! Cost: admitting a request is one statement on PostgreSQL (a row upsert on the actor's bucket
//! row, which also serialises that actor's admissions, and the slot insert, in one CTE), one
//! short write transaction on SQLite; releasing is one statement on both. Refusals do one more
//! read (to say when to retry) and, for concurrency, sweep the actor's expired slots once. Time is
//! the database's clock, so replicas with skewed clocks still agree.
//! The policy (what the numbers are, what a refusal looks like over HTTP) is the API's.

use std::time::Duration;

// Every SQL string formatted here holds only the constants below, never a value: values are bound.
use sqlx::AssertSqlSafe;

use crate::{Result, Store};

/// One actor's limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Sustained requests per second (0: unlimited).
    pub requests_per_second: f64,
    /// Requests allowed at once above the sustained rate.
    pub burst: u32,
    /// Requests in flight at once (0: unlimited).
    pub max_concurrent: u32,
    /// How long a slot counts if it is never released (its replica died).
    pub slot_lease: Duration,
}

/// The database's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// Admitted; release `slot` when the request is done.
    Admitted { slot: String },
    /// Over the rate: the next request fits after this long.
    Rate { retry_after: Duration },
    /// `limit` requests are in flight already.
    Concurrency { limit: u32 },
}

impl Limits {
    /// Seconds between two requests at the sustained rate (GCRA's emission interval).
    fn interval(&self) -> f64 {
        if self.requests_per_second > 0.0 { 1.0 / self.requests_per_second } else { 0.0 }
    }

    /// How far ahead of now the theoretical arrival time may run: `burst` intervals.
    fn tolerance(&self) -> f64 {
        self.interval() * f64::from(self.burst.max(1))
    }
}

const PG_NOW: &str = "EXTRACT(EPOCH FROM clock_timestamp())::float8";
const SQLITE_NOW: &str = "((julianday('now') - 2440587.5) * 86400.0)";

/// Takes a token and a slot for `actor`, or says why not.
pub async fn admit(store: &Store, actor: &str, limits: &Limits) -> Result<Admission> {
    let first = try_admit(store, actor, limits).await?;
    if matches!(first, Admission::Concurrency { .. }) && sweep(store, actor).await? > 0 {
        return try_admit(store, actor, limits).await;
    }
    Ok(first)
}

async fn try_admit(store: &Store, actor: &str, limits: &Limits) -> Result<Admission> {
    let slot = uuid::Uuid::now_v7().to_string();
    let (interval, tolerance) = (limits.interval(), limits.tolerance());
    let max = i64::from(limits.max_concurrent);
    let lease = limits.slot_lease.as_secs_f64();
    // Admitted when the bucket row's conditional upsert went through; the slot row is inserted
    // only then. `EXCLUDED.tat - interval` is now.
    let upsert = |now: &str, greatest: &str| {
        format!(
            "INSERT INTO kiln_actor_limits AS l (actor, tat, in_flight) VALUES ($1, {now} + $2, 1)
             ON CONFLICT (actor) DO UPDATE
               SET tat = {greatest}(l.tat, EXCLUDED.tat - $2) + $2, in_flight = l.in_flight + 1
               WHERE {greatest}(l.tat, EXCLUDED.tat - $2) + $2 - (EXCLUDED.tat - $2) <= $3
                 AND ($4 = 0 OR l.in_flight < $4)
             RETURNING actor"
        )
    };
    let admitted = match store {
        Store::Postgres(s) => {
            let sql = format!(
                "WITH admitted AS ({}),
                 slot AS (INSERT INTO kiln_actor_slots (slot_id, actor, expires_at)
                          SELECT $5, actor, {PG_NOW} + $6 FROM admitted RETURNING slot_id)
                 SELECT count(*) FROM slot",
                upsert(PG_NOW, "GREATEST")
            );
            let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(actor)
                .bind(interval)
                .bind(tolerance)
                .bind(max)
                .bind(&slot)
                .bind(lease)
                .fetch_one(s.pool())
                .await?;
            n > 0
        }
        Store::Sqlite(s) => {
            let mut tx = s.writer().begin_with("BEGIN IMMEDIATE").await?;
            let row = sqlx::query(AssertSqlSafe(sqlite(&upsert(SQLITE_NOW, "max"))))
                .bind(actor)
                .bind(interval)
                .bind(tolerance)
                .bind(max)
                .fetch_optional(&mut *tx)
                .await?;
            if row.is_some() {
                let sql = format!(
                    "INSERT INTO kiln_actor_slots (slot_id, actor, expires_at) VALUES (?1, ?2, {SQLITE_NOW} + ?3)"
                );
                sqlx::query(AssertSqlSafe(sql)).bind(&slot).bind(actor).bind(lease).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            row.is_some()
        }
    };
    if admitted {
        return Ok(Admission::Admitted { slot });
    }
    // Refused: say why from the row as it is now.
    let now = match store {
        Store::Postgres(_) => PG_NOW,
        Store::Sqlite(_) => SQLITE_NOW,
    };
    let sql = format!("SELECT tat - {now}, CAST(in_flight AS BIGINT) FROM kiln_actor_limits WHERE actor = $1");
    let row: Option<(f64, i64)> = match store {
        Store::Postgres(s) => sqlx::query_as(AssertSqlSafe(sql)).bind(actor).fetch_optional(s.pool()).await?,
        Store::Sqlite(s) => sqlx::query_as(AssertSqlSafe(sqlite(&sql))).bind(actor).fetch_optional(s.reader()).await?,
    };
    let (ahead, in_flight) = row.unwrap_or((0.0, 0));
    if max > 0 && in_flight >= max {
        return Ok(Admission::Concurrency { limit: limits.max_concurrent });
    }
    let wait = (ahead + interval - tolerance).max(0.0);
    Ok(Admission::Rate { retry_after: Duration::from_secs_f64(wait) })
}

/// Gives a slot back (a slot already swept is not counted twice).
pub async fn release(store: &Store, slot: &str) -> Result<()> {
    match store {
        Store::Postgres(s) => {
            sqlx::query(
                "WITH gone AS (DELETE FROM kiln_actor_slots WHERE slot_id = $1 RETURNING actor)
                 UPDATE kiln_actor_limits l SET in_flight = GREATEST(l.in_flight - 1, 0)
                 FROM gone WHERE l.actor = gone.actor",
            )
            .bind(slot)
            .execute(s.pool())
            .await?;
        }
        Store::Sqlite(s) => {
            let mut tx = s.writer().begin_with("BEGIN IMMEDIATE").await?;
            let actor: Option<String> =
                sqlx::query_scalar("DELETE FROM kiln_actor_slots WHERE slot_id = ?1 RETURNING actor")
                    .bind(slot)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(actor) = actor {
                sqlx::query("UPDATE kiln_actor_limits SET in_flight = max(in_flight - 1, 0) WHERE actor = ?1")
                    .bind(actor)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        }
    }
    Ok(())
}

/// Frees `actor`'s slots whose lease has expired; returns how many.
pub async fn sweep(store: &Store, actor: &str) -> Result<u64> {
    let freed = match store {
        Store::Postgres(s) => {
            let sql = format!(
                "WITH gone AS (DELETE FROM kiln_actor_slots WHERE actor = $1 AND expires_at < {PG_NOW} RETURNING 1),
                 n AS (SELECT count(*) AS c FROM gone),
                 upd AS (UPDATE kiln_actor_limits l SET in_flight = GREATEST(l.in_flight - n.c, 0)
                         FROM n WHERE l.actor = $1 AND n.c > 0 RETURNING 1)
                 SELECT c FROM n"
            );
            sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql)).bind(actor).fetch_one(s.pool()).await?
        }
        Store::Sqlite(s) => {
            let mut tx = s.writer().begin_with("BEGIN IMMEDIATE").await?;
            let sql = format!("DELETE FROM kiln_actor_slots WHERE actor = ?1 AND expires_at < {SQLITE_NOW}");
            let n = sqlx::query(AssertSqlSafe(sql)).bind(actor).execute(&mut *tx).await?.rows_affected() as i64;
            if n > 0 {
                sqlx::query("UPDATE kiln_actor_limits SET in_flight = max(in_flight - ?2, 0) WHERE actor = ?1")
                    .bind(actor)
                    .bind(n)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            n
        }
    };
    Ok(u64::try_from(freed).unwrap_or(0))
}

/// PostgreSQL's `$n` placeholders as SQLite's `?n`.
fn sqlite(sql: &str) -> String {
    sql.replace('$', "?")
}
