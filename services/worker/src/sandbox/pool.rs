//! The pool of warm processes: which process serves an invocation, how many may exist, and when
//! one is retired. A process is bound to one key (tool, version, permission set) for life and
//! serves one invocation at a time. The pool never starts processes itself: `acquire` hands out a
//! warm [`Lease`] or a [`Reservation`] (a counted slot the caller fills with a new process).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kiln_proto::tool::ToolName;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::config::PoolConfig;
use super::permissions::ProcessSpec;
use super::process::DenoProcess;
use super::{PoolStats, SandboxError};

/// How long a caller of a tool without processes waits before it may evict idle processes that
/// others are waiting for.
const STARVATION: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub tool: ToolName,
    pub version: u32,
    pub spec: ProcessSpec,
}

#[derive(Debug)]
struct Idle {
    process: DenoProcess,
    key: Key,
    since: Instant,
}

#[derive(Debug, Default)]
struct State {
    /// Idle processes per key, most recently used last.
    idle: HashMap<Key, Vec<Idle>>,
    total: usize,
    busy: usize,
    per_tool: HashMap<ToolName, usize>,
    /// Callers waiting in `acquire`, per key.
    waiting: HashMap<Key, usize>,
    stats: PoolStats,
    closed: bool,
}

impl State {
    fn add(&mut self, tool: &ToolName) {
        self.total += 1;
        self.busy += 1;
        *self.per_tool.entry(tool.clone()).or_default() += 1;
    }

    fn remove(&mut self, tool: &ToolName, busy: bool) {
        self.total -= 1;
        if busy {
            self.busy -= 1;
        }
        if let Some(n) = self.per_tool.get_mut(tool) {
            *n -= 1;
            if *n == 0 {
                self.per_tool.remove(tool);
            }
        }
    }

    /// Takes the least recently used idle process matching `pick`, uncounting it. Processes of
    /// keys that have waiters are spared unless `starving`: evicting them would only make their
    /// waiters start a new process, and round-robin demand would thrash the pool.
    fn evict_oldest(&mut self, pick: impl Fn(&Key) -> bool, starving: bool) -> Option<DenoProcess> {
        let waiting = &self.waiting;
        let key = self
            .idle
            .iter()
            .filter(|(k, list)| pick(k) && !list.is_empty() && (starving || !waiting.contains_key(*k)))
            .min_by_key(|(_, list)| list[0].since)
            .map(|(k, _)| k.clone())?;
        let list = self.idle.get_mut(&key)?;
        let victim = list.remove(0);
        if list.is_empty() {
            self.idle.remove(&key);
        }
        self.remove(&victim.key.tool, false);
        self.stats.evicted += 1;
        Some(victim.process)
    }
}

#[derive(Debug)]
struct Shared {
    config: PoolConfig,
    state: Mutex<State>,
    /// Woken whenever a process goes idle or away, so waiters re-check the limits.
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Pool {
    shared: Arc<Shared>,
}

#[derive(Debug)]
pub(crate) enum Slot {
    Warm(Box<Lease>),
    Cold(Reservation),
}

impl Pool {
    /// A pool whose idle processes are reaped by a background task that ends with the pool.
    pub fn new(config: PoolConfig) -> Self {
        let period = (config.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(30));
        let shared = Arc::new(Shared { config, state: Mutex::new(State::default()), changed: Notify::new() });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                let expired = reap(&shared);
                drop(shared);
                drop(expired); // killed outside the lock
            }
        });
        Self { shared }
    }

    /// A warm process for `key`, or a reservation to start one, waiting while limits are reached
    /// (a `nested` invocation, whose caller holds a process while it waits, never waits).
    pub async fn acquire(&self, key: &Key, nested: bool, cancel: &CancellationToken) -> Result<Slot, SandboxError> {
        let config = &self.shared.config;
        let mut starving_at = Instant::now() + STARVATION;
        let mut waiter = Waiter { shared: &self.shared, key, registered: false };
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            let now = Instant::now();
            let victim = {
                let mut st = self.shared.lock();
                // A tool that has a process will be served by it; only a tool that has had none
                // for a while may take processes others are waiting for.
                if st.per_tool.contains_key(&key.tool) {
                    starving_at = now + STARVATION;
                }
                let starving = now >= starving_at;
                if st.closed {
                    return Err(SandboxError::Crash("the sandbox has been shut down".to_owned()));
                }
                if let Some(idle) = st.idle.get_mut(key).and_then(Vec::pop) {
                    waiter.done(&mut st);
                    st.busy += 1;
                    st.stats.warm_hits += 1;
                    let lease =
                        Lease { process: Some(idle.process), key: key.clone(), shared: Arc::clone(&self.shared) };
                    return Ok(Slot::Warm(Box::new(lease)));
                }
                let for_tool = st.per_tool.get(&key.tool).copied().unwrap_or(0);
                let victim = if for_tool >= config.max_per_tool {
                    // Room for this tool only by retiring an idle process of another of its versions.
                    st.evict_oldest(|k| k.tool == key.tool, starving)
                } else if st.total >= config.max_processes {
                    st.evict_oldest(|_| true, starving)
                } else {
                    None
                };
                let room = nested
                    || (st.per_tool.get(&key.tool).copied().unwrap_or(0) < config.max_per_tool
                        && st.total < config.max_processes);
                if room {
                    waiter.done(&mut st);
                    st.add(&key.tool);
                    st.stats.spawned += 1;
                    Some((victim, Reservation { key: key.clone(), shared: Arc::clone(&self.shared), armed: true }))
                } else {
                    waiter.register(&mut st);
                    // Registered under the state lock: every later change notifies after taking
                    // the lock, so no wake-up can fall between this check and the wait.
                    changed.as_mut().enable();
                    None
                }
            };
            if let Some((victim, reservation)) = victim {
                drop(victim);
                return Ok(Slot::Cold(reservation));
            }
            tokio::select! {
                () = &mut changed => {}
                () = sleep_until(starving_at), if now < starving_at => {}
                () = cancel.cancelled() => return Err(SandboxError::Cancelled),
            }
        }
    }

    pub fn stats(&self) -> PoolStats {
        let st = self.shared.lock();
        PoolStats { processes: st.total, busy: st.busy, idle: st.idle.values().map(Vec::len).sum(), ..st.stats }
    }

    /// Stops idle processes and refuses new work; busy ones stop when their invocation ends.
    pub fn close(&self) {
        let drained: Vec<Idle> = {
            let mut st = self.shared.lock();
            st.closed = true;
            let all: Vec<Idle> = st.idle.drain().flat_map(|(_, list)| list).collect();
            for idle in &all {
                st.remove(&idle.key.tool, false);
            }
            all
        };
        drop(drained);
        self.shared.changed.notify_waiters();
    }
}

/// Counts a caller in `State::waiting` while it waits; uncounts it however `acquire` ends.
struct Waiter<'a> {
    shared: &'a Shared,
    key: &'a Key,
    registered: bool,
}

impl Waiter<'_> {
    fn register(&mut self, st: &mut State) {
        if !self.registered {
            self.registered = true;
            *st.waiting.entry(self.key.clone()).or_default() += 1;
        }
    }

    fn done(&mut self, st: &mut State) {
        if std::mem::take(&mut self.registered)
            && let Some(n) = st.waiting.get_mut(self.key)
        {
            *n -= 1;
            if *n == 0 {
                st.waiting.remove(self.key);
            }
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.registered {
            let shared = self.shared;
            self.done(&mut shared.lock());
        }
    }
}

fn reap(shared: &Shared) -> Vec<Idle> {
    let timeout = shared.config.idle_timeout;
    let mut st = shared.lock();
    let mut expired = Vec::new();
    for list in st.idle.values_mut() {
        let keep = list.iter().position(|i| i.since.elapsed() < timeout).unwrap_or(list.len());
        expired.extend(list.drain(..keep));
    }
    st.idle.retain(|_, list| !list.is_empty());
    for idle in &expired {
        st.remove(&idle.key.tool, false);
        st.stats.idle_stopped += 1;
    }
    drop(st);
    if !expired.is_empty() {
        shared.changed.notify_waiters();
    }
    expired
}

/// A counted slot for a process that is being started. Dropping it unfilled frees the slot.
#[derive(Debug)]
pub(crate) struct Reservation {
    key: Key,
    shared: Arc<Shared>,
    armed: bool,
}

impl Reservation {
    pub fn fill(mut self, process: DenoProcess) -> Lease {
        self.armed = false;
        Lease { process: Some(process), key: self.key.clone(), shared: Arc::clone(&self.shared) }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.armed {
            self.shared.lock().remove(&self.key.tool, true);
            self.shared.changed.notify_waiters();
        }
    }
}

/// Exclusive use of one process. [`Lease::release`] returns it to the pool; dropping the lease
/// without releasing it (an invocation abandoned mid-flight) kills the process.
#[derive(Debug)]
pub(crate) struct Lease {
    process: Option<DenoProcess>,
    key: Key,
    shared: Arc<Shared>,
}

impl Lease {
    pub fn process(&mut self) -> &mut DenoProcess {
        self.process.as_mut().unwrap_or_else(|| unreachable!("a lease holds its process until dropped"))
    }

    /// Back to the idle list if it is healthy and not due for recycling.
    pub fn release(mut self) {
        let Some(mut process) = self.process.take() else { return };
        let config = &self.shared.config;
        let worn = process.invocations >= config.recycle_after || grew_too_much(&mut process, config);
        let mut st = self.shared.lock();
        if process.is_usable() && !worn && !st.closed {
            st.busy -= 1;
            st.idle.entry(self.key.clone()).or_default().push(Idle {
                process,
                key: self.key.clone(),
                since: Instant::now(),
            });
        } else {
            st.remove(&self.key.tool, true);
            if worn {
                st.stats.recycled += 1;
            }
            drop(st);
            drop(process);
        }
        self.shared.changed.notify_waiters();
    }
}

fn grew_too_much(process: &mut DenoProcess, config: &PoolConfig) -> bool {
    if config.rss_check_every == 0 || !process.invocations.is_multiple_of(config.rss_check_every) {
        return false;
    }
    match (process.rss_bytes(), process.baseline_rss) {
        (Some(now), Some(base)) => now.saturating_sub(base) > config.recycle_rss_growth_mb << 20,
        _ => false,
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(process) = self.process.take() {
            self.shared.lock().remove(&self.key.tool, true);
            drop(process);
            self.shared.changed.notify_waiters();
        }
    }
}
