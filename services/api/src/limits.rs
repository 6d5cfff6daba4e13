//! Per-actor request limits: a rate (token bucket) and a number of requests in flight, kept in
//! the database ([`kiln_store::limits`]) so that every API replica on one database shares each
//! actor's budget. A refusal says when to retry. A slot is held until the response is done, and
//! counts at most `slot_lease` if its replica dies before giving it back.

use std::time::Duration;

use kiln_proto::Actor;
use kiln_store::Store;
use kiln_store::limits::{self, Admission, Limits};

/// Limits for each actor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitSettings {
    /// Sustained requests per second (0: unlimited).
    pub requests_per_second: f64,
    /// Requests allowed at once above the sustained rate.
    pub burst: u32,
    /// Requests of one actor in flight at once (0: unlimited).
    pub max_concurrent: u32,
    /// How long a request's slot counts if its replica dies without giving it back; longer than
    /// any request (the call budget) so live requests are never uncounted.
    pub slot_lease: Duration,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self { requests_per_second: 100.0, burst: 200, max_concurrent: 32, slot_lease: Duration::from_secs(300) }
    }
}

impl LimitSettings {
    fn unlimited(&self) -> bool {
        self.requests_per_second <= 0.0 && self.max_concurrent == 0
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refused {
    Rate { retry_after: Duration },
    Concurrency { limit: u32 },
}

/// The limiter of this process; its state is in the database.
#[derive(Debug, Clone)]
pub struct Limiter {
    settings: LimitSettings,
    store: Store,
}

/// Holds one of an actor's concurrent slots until dropped.
#[derive(Debug)]
pub struct Permit {
    store: Store,
    slot: Option<String>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(slot) = self.slot.take() else { return };
        let store = self.store.clone();
        // A slot not given back (no runtime at shutdown, a database error) expires with its lease.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = limits::release(&store, &slot).await {
                    tracing::warn!(error = %e, "cannot give a request slot back; it frees itself when its lease expires");
                }
            });
        }
    }
}

impl Limiter {
    pub fn new(settings: LimitSettings, store: Store) -> Self {
        Self { settings, store }
    }

    /// Takes a token and a concurrency slot for `actor`, or says why not. If the database cannot
    /// answer the request is let through (and the error logged): the limits protect the server,
    /// and a request that cannot reach the database fails on its own anyway.
    pub async fn admit(&self, actor: &Actor) -> Result<Permit, Refused> {
        let s = self.settings;
        if s.unlimited() {
            return Ok(Permit { store: self.store.clone(), slot: None });
        }
        let l = Limits {
            requests_per_second: s.requests_per_second,
            burst: s.burst,
            max_concurrent: s.max_concurrent,
            slot_lease: s.slot_lease,
        };
        match limits::admit(&self.store, actor.as_str(), &l).await {
            Ok(Admission::Admitted { slot }) => Ok(Permit { store: self.store.clone(), slot: Some(slot) }),
            Ok(Admission::Rate { retry_after }) => Err(Refused::Rate { retry_after }),
            Ok(Admission::Concurrency { limit }) => Err(Refused::Concurrency { limit }),
            Err(e) => {
                tracing::error!(error = %e, actor = %actor, "cannot check request limits; letting the request through");
                Ok(Permit { store: self.store.clone(), slot: None })
            }
        }
    }
}
