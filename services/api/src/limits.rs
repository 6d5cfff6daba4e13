//! Per-actor request limits: a token bucket for the rate and a counter for concurrent requests.
//! Both are kept in this process's memory, so with several replicas each enforces them on its
//! own share of the traffic (see docs/mcp.md). A refusal says when to retry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_proto::Actor;

/// Limits for each actor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitSettings {
    /// Sustained requests per second (0: unlimited).
    pub requests_per_second: f64,
    /// Requests allowed at once above the sustained rate.
    pub burst: u32,
    /// Requests of one actor in flight at once (0: unlimited).
    pub max_concurrent: u32,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self { requests_per_second: 100.0, burst: 200, max_concurrent: 32 }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refused {
    Rate { retry_after: Duration },
    Concurrency { limit: u32 },
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    in_flight: u32,
}

/// The limiter, shared by every request of this process.
#[derive(Debug, Clone)]
pub struct Limiter {
    settings: LimitSettings,
    buckets: Arc<Mutex<HashMap<Actor, Bucket>>>,
}

/// Holds one of an actor's concurrent slots until dropped.
#[derive(Debug)]
pub struct Permit {
    limiter: Limiter,
    actor: Actor,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut buckets = self.limiter.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = buckets.get_mut(&self.actor) {
            b.in_flight = b.in_flight.saturating_sub(1);
        }
    }
}

impl Limiter {
    pub fn new(settings: LimitSettings) -> Self {
        Self { settings, buckets: Arc::default() }
    }

    /// Takes a token and a concurrency slot for `actor`, or says why not.
    pub fn admit(&self, actor: &Actor) -> Result<Permit, Refused> {
        let s = self.settings;
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > 100_000 {
            buckets.retain(|_, b| b.in_flight > 0);
        }
        let b = buckets.entry(actor.clone()).or_insert(Bucket { tokens: f64::from(s.burst), at: now, in_flight: 0 });
        if s.max_concurrent > 0 && b.in_flight >= s.max_concurrent {
            return Err(Refused::Concurrency { limit: s.max_concurrent });
        }
        if s.requests_per_second > 0.0 {
            let refill = now.duration_since(b.at).as_secs_f64() * s.requests_per_second;
            b.tokens = (b.tokens + refill).min(f64::from(s.burst.max(1)));
            b.at = now;
            if b.tokens < 1.0 {
                let wait = (1.0 - b.tokens) / s.requests_per_second;
                return Err(Refused::Rate { retry_after: Duration::from_secs_f64(wait) });
            }
            b.tokens -= 1.0;
        }
        b.in_flight += 1;
        Ok(Permit { limiter: self.clone(), actor: actor.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_burst_is_spent_then_refused_with_a_retry_time() {
        let l = Limiter::new(LimitSettings { requests_per_second: 1.0, burst: 2, max_concurrent: 0 });
        let a = Actor::local();
        let _p1 = l.admit(&a).unwrap();
        let _p2 = l.admit(&a).unwrap();
        match l.admit(&a) {
            Err(Refused::Rate { retry_after }) => assert!(retry_after <= Duration::from_secs(1)),
            other => panic!("expected a rate refusal, got {other:?}"),
        }
        // Another actor has its own bucket.
        assert!(l.admit(&Actor::parse("key:other").unwrap()).is_ok());
    }

    #[test]
    fn concurrency_slots_come_back_when_permits_drop() {
        let l = Limiter::new(LimitSettings { requests_per_second: 0.0, burst: 0, max_concurrent: 1 });
        let a = Actor::local();
        let p = l.admit(&a).unwrap();
        assert_eq!(l.admit(&a).unwrap_err(), Refused::Concurrency { limit: 1 });
        drop(p);
        assert!(l.admit(&a).is_ok());
    }
}
