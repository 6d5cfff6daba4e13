//! Queue workers: apalis claims run jobs (SQLite `Jobs` or PostgreSQL `apalis.jobs`), keeps the
//! worker's heartbeat and re-enqueues the jobs of workers that stopped heartbeating; the run
//! engine does everything that makes a run a run (attempts, retries, fencing, cancellation).
//!
//! - **Wakeups.** A worker wakes when this process pushed a job (or, on PostgreSQL, any process:
//!   `NOTIFY kiln_queue`), 5 ms after that again (a wakeup that lands while a claim is in flight
//!   would otherwise be lost), and every `poll_interval` as a backstop.
//! - **Supervision.** apalis ends a worker at its first database error; the supervisor starts a
//!   new one under a fresh name (a name cannot be reused while its heartbeat is recent).
//! - **Drain.** On shutdown the worker stops claiming and in-flight runs get `drain_timeout` to
//!   finish; then their attempts are cut short and handed back to the queue.
//! - **Reconciler.** Runs that are neither ended nor queued (a job row lost to an operator, a
//!   failed re-queue) are queued again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::{BoxDynError, Data, PollSnapshot, PollStrategy, WorkerBuilder, WorkerBuilderExt};
use apalis_core::backend::ext::BackendExt;
use apalis_core::worker::context::WorkerContext;
use kiln_proto::envelope::now_micros;
use kiln_proto::job::RunJob;
use kiln_store::queue::QUEUE;
use kiln_store::{QueueOp, QueuePool, Store};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::runs::{AttemptOutcome, INLINE_RETRY_MAX, RunEngine};
use crate::sandbox::Sandbox;

/// How a worker process pulls and runs jobs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Runs executed at once.
    pub concurrency: usize,
    pub heartbeat_interval: Duration,
    /// A worker silent for this many heartbeats is presumed dead: its jobs are re-enqueued and
    /// its attempts count as lost. apalis compares whole seconds, so keep the product >= 3 s.
    pub missed_heartbeats: usize,
    /// Backstop poll when no wakeup arrives (other processes on SQLite, due retries).
    pub poll_interval: Duration,
    /// How long in-flight runs may take to finish after shutdown is asked for.
    pub drain_timeout: Duration,
    /// How often to look for runs that are neither ended nor queued.
    pub reconcile_interval: Duration,
    /// Names this process's workers: `<prefix>-<uuid>`.
    pub name_prefix: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 8,
            heartbeat_interval: Duration::from_secs(1),
            missed_heartbeats: 3,
            poll_interval: Duration::from_millis(500),
            drain_timeout: Duration::from_secs(30),
            reconcile_interval: Duration::from_secs(10),
            name_prefix: "kiln-worker".to_owned(),
        }
    }
}

impl WorkerConfig {
    /// Silence after which a worker is presumed dead.
    pub fn heartbeat_timeout(&self) -> Duration {
        self.heartbeat_interval * self.missed_heartbeats.max(1) as u32
    }
}

#[derive(Debug, thiserror::Error)]
#[error("worker {name}: {message}")]
pub struct WorkerError {
    pub name: String,
    pub message: String,
}

/// Runs queue workers until `shutdown` is cancelled and in-flight runs are drained (or handed
/// back). Restarts a worker that fails, under a new name, with backoff.
pub async fn run(store: Store, sandbox: Arc<dyn Sandbox>, config: WorkerConfig, shutdown: CancellationToken) {
    run_with_local(store, sandbox, config, LocalWorker::default(), shutdown).await;
}

/// [`run`], also taking runs handed over through `local` by engines of this process (see
/// [`RunEngine::with_local_worker`]).
pub async fn run_with_local(
    store: Store,
    sandbox: Arc<dyn Sandbox>,
    config: WorkerConfig,
    local: LocalWorker,
    shutdown: CancellationToken,
) {
    let reconciler = RunEngine::new(store.clone(), sandbox.clone(), format!("{}-reconciler", config.name_prefix));
    let reconciler = tokio::spawn(reconcile(reconciler, config.clone(), shutdown.clone()));
    let mut backoff = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        let name = format!("{}-{}", config.name_prefix, uuid::Uuid::now_v7());
        let engine = RunEngine::new(store.clone(), sandbox.clone(), name.clone())
            .with_heartbeat_timeout(config.heartbeat_timeout());
        tracing::info!(worker = %name, concurrency = config.concurrency, "worker started");
        match run_one(engine, &config, &local, shutdown.clone()).await {
            Ok(()) => {
                tracing::info!(worker = %name, "worker stopped");
                break;
            }
            Err(e) => {
                tracing::error!(error = %e, "worker failed; starting another in {backoff:?}");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    reconciler.abort();
}

/// Shared by a worker's handlers.
#[derive(Debug)]
struct Handler {
    engine: RunEngine,
    /// Cancelled when shutdown begins: jobs claimed from then on go straight back to the queue.
    draining: CancellationToken,
    /// Cancelled when the drain deadline passes: in-flight attempts stop and are handed back.
    abandon: CancellationToken,
    heartbeat_timeout: Duration,
    /// Handlers running now (watched by the drain).
    running: watch::Sender<usize>,
    /// Runs executing at once, whether claimed by apalis or handed over in-process.
    slots: Arc<Semaphore>,
}

async fn run_one(
    engine: RunEngine,
    config: &WorkerConfig,
    local: &LocalWorker,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let name = engine.worker_id().to_owned();
    let store = engine.store().clone();
    let handler = Arc::new(Handler {
        engine,
        draining: CancellationToken::new(),
        abandon: CancellationToken::new(),
        heartbeat_timeout: config.heartbeat_timeout(),
        running: watch::Sender::new(0),
        slots: Arc::new(Semaphore::new(config.concurrency.max(1))),
    });
    let handoffs = local.open(handler.clone(), shutdown.clone());
    let context = WorkerContext::new(&name);
    let strategy = Wakeups::new(store.queue_watch(), config.poll_interval);
    // The apalis worker keeps running (and driving its own database work, which on SQLite shares
    // Kiln's one writer connection) until the running handlers are done: stopping it earlier
    // would leave its in-flight statements unpolled, holding the writer.
    let stop = {
        let (context, shutdown, drain, handler, handoffs) =
            (context.clone(), shutdown.clone(), config.drain_timeout, handler.clone(), handoffs.clone());
        async move {
            shutdown.cancelled().await;
            tracing::info!(worker = %context.name(), ?drain, "draining: no new runs, waiting for running ones");
            handler.draining.cancel();
            handoffs.close().await;
            let mut running = handler.running.subscribe();
            if tokio::time::timeout(drain, running.wait_for(|n| *n == 0)).await.is_err() {
                tracing::warn!(worker = %context.name(), "drain deadline passed: handing back running runs");
                handler.abandon.cancel();
                let _ = running.wait_for(|n| *n == 0).await;
            }
            let _ = context.stop();
            std::future::pending::<()>().await;
        }
    };
    // The same worker on either backend: only the storage and its config type differ.
    macro_rules! run_worker {
        ($storage:ty, $config:ty, $pool:expr) => {{
            let settings = <$config>::default()
                .queue(QUEUE)
                .heartbeat_interval(config.heartbeat_interval)
                .missed_heartbeats(config.missed_heartbeats)
                .batch_size(config.concurrency.max(1));
            let backend = <$storage>::new($pool).with_config(settings).poll_with_strategy(strategy);
            let worker = WorkerBuilder::new(context.clone())
                .backend(backend)
                .concurrency(config.concurrency.max(1))
                .data(handler)
                .build(handle);
            run_until_stopped(worker.run(), stop).await
        }};
    }
    let result = match store.queue_pool() {
        QueuePool::Sqlite(pool) => run_worker!(apalis_sqlite::SqliteStorage<RunJob>, apalis_sqlite::Config, &pool),
        QueuePool::Postgres(pool) => {
            run_worker!(apalis_postgres::PostgresStorage<RunJob>, apalis_postgres::Config, &pool)
        }
    };
    // A worker that failed takes no more hand-offs: its job rows would name a dead worker.
    handoffs.close().await;
    result.map_err(|e| WorkerError { name, message: e.to_string() })
}

async fn run_until_stopped<E>(
    worker: impl Future<Output = Result<(), E>>,
    stop: impl Future<Output = ()>,
) -> Result<(), E> {
    tokio::select! {
        r = worker => r,
        () = stop => unreachable!("the stop future never completes"),
    }
}

/// One claimed job: execute the run until it ends, waits or is someone else's.
async fn handle(job: RunJob, handler: Data<Arc<Handler>>) -> Result<(), BoxDynError> {
    handler.process(job).await;
    Ok(())
}

impl Handler {
    /// A job apalis claimed: waits for a free slot, then runs it.
    async fn process(&self, job: RunJob) {
        self.running.send_modify(|n| *n += 1);
        let slot = tokio::select! {
            slot = self.slots.clone().acquire_owned() => slot.ok(),
            _ = self.draining.cancelled() => None,
        };
        match slot {
            Some(_slot) if !self.draining.is_cancelled() => self.execute(job, None).await,
            // Claimed after shutdown began: give it straight back (due in a second, so this
            // worker does not claim it again at once while it drains).
            _ => self.requeue(job, Duration::from_secs(1)).await,
        }
        self.running.send_modify(|n| *n -= 1);
        // A slot is free: look for work now. A claim made while every slot was busy may have
        // left jobs behind, and their wakeups are spent.
        self.engine.store().signal_queue();
    }

    /// A run handed over in-process, holding the slot it was given.
    async fn process_handoff(&self, handoff: Handoff) {
        let Handoff { job, slot: _slot, requested } = handoff;
        if self.draining.is_cancelled() {
            self.requeue(job, Duration::ZERO).await;
        } else {
            self.execute(job, Some(requested)).await;
        }
        self.running.send_modify(|n| *n -= 1);
    }

    /// Executes the run until it ends, waits or is someone else's. `requested`: its stream as
    /// the requesting engine wrote it, to start from without reading it back.
    async fn execute(&self, job: RunJob, mut requested: Option<kiln_proto::RecordedEvent>) {
        let run_id = job.run_id;
        loop {
            let known = requested.take().map(|e| vec![e]);
            let outcome = match self.engine.execute_from(run_id, known, self.abandon.clone()).await {
                Ok(outcome) => outcome,
                Err(e) => {
                    tracing::error!(run = %run_id, error = %e, "run could not be executed; re-queued");
                    return self.requeue(job, Duration::from_secs(1)).await;
                }
            };
            match outcome {
                // The end, a takeover and a hand-back each left the queue as it should be.
                AttemptOutcome::Finished(_) | AttemptOutcome::Fenced | AttemptOutcome::Abandoned => return,
                AttemptOutcome::RetryAt(at) => {
                    let wait = (at - now_micros()).to_std().unwrap_or_default();
                    if wait > INLINE_RETRY_MAX {
                        // Claimed early (the queue schedules in whole seconds) or a stray job.
                        return self.requeue_at(job, at).await;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.abandon.cancelled() => return self.requeue_at(job, at).await,
                    }
                }
                // A live worker holds it; look again when it would have been presumed dead.
                AttemptOutcome::Leased { .. } => return self.requeue(job, self.heartbeat_timeout).await,
            }
        }
    }

    async fn requeue(&self, job: RunJob, after: Duration) {
        let at = now_micros() + chrono::Duration::from_std(after).unwrap_or_default();
        self.requeue_at(job, at).await;
    }

    /// Replaces the run's job row with one due at `at` (the claimed row would otherwise be
    /// marked done when this handler returns).
    async fn requeue_at(&self, job: RunJob, at: chrono::DateTime<chrono::Utc>) {
        let run_id = job.run_id;
        let op = QueueOp::Push { job, not_before: Some(at) };
        if let Err(e) = self.engine.store().apply_queue(&[op]).await {
            tracing::error!(run = %run_id, error = %e, "could not re-queue run; the reconciler will");
        }
    }
}

/// Hands runs requested in this process straight to this process's worker: the request commits
/// the run's job row already claimed by that worker, and the worker starts it at once, with no
/// claim round trip through the database. Only while the worker has a free slot; otherwise the
/// job is queued as usual. If the process dies, the claimed row is re-enqueued by apalis (its
/// worker stopped heartbeating) and another worker takes the run over.
#[derive(Debug, Clone, Default)]
pub struct LocalWorker {
    open: Arc<std::sync::Mutex<Option<Desk>>>,
}

/// Where hand-offs go while a worker takes them.
#[derive(Debug, Clone)]
struct Desk {
    worker: String,
    slots: Arc<Semaphore>,
    runs: mpsc::UnboundedSender<Handoff>,
    running: watch::Sender<usize>,
}

/// A run handed over, with the execution slot reserved for it.
#[derive(Debug)]
struct Handoff {
    job: RunJob,
    slot: OwnedSemaphorePermit,
    requested: kiln_proto::RecordedEvent,
}

/// A free slot of the local worker, reserved before the run is requested.
#[derive(Debug)]
pub struct LocalSlot {
    desk: Desk,
    slot: OwnedSemaphorePermit,
}

impl LocalSlot {
    /// The worker the run's job row is claimed for.
    pub fn worker(&self) -> &str {
        &self.desk.worker
    }

    /// Gives the (committed) run to the worker.
    pub(crate) fn hand_off(self, job: RunJob, requested: kiln_proto::RecordedEvent) {
        let run_id = job.run_id;
        self.desk.running.send_modify(|n| *n += 1);
        if self.desk.runs.send(Handoff { job, slot: self.slot, requested }).is_err() {
            self.desk.running.send_modify(|n| *n -= 1);
            tracing::warn!(run = %run_id, worker = %self.desk.worker, "worker stopped before taking a run; it is re-queued when its heartbeat lapses");
        }
    }
}

impl LocalWorker {
    /// A free slot of the worker, if one is taking hand-offs and has a slot free now.
    pub fn try_slot(&self) -> Option<LocalSlot> {
        let desk = self.open.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        let slot = desk.slots.clone().try_acquire_owned().ok()?;
        Some(LocalSlot { desk, slot })
    }

    /// Starts taking hand-offs for `handler`'s worker once apalis has registered it (a claimed
    /// job row names a registered worker).
    fn open(&self, handler: Arc<Handler>, shutdown: CancellationToken) -> Arc<Handoffs> {
        let (runs, mut incoming) = mpsc::unbounded_channel::<Handoff>();
        let desk = Desk {
            worker: handler.engine.worker_id().to_owned(),
            slots: handler.slots.clone(),
            runs,
            running: handler.running.clone(),
        };
        let open = self.open.clone();
        let store = handler.engine.store().clone();
        let register = tokio::spawn(async move {
            while !shutdown.is_cancelled() {
                if let Ok(Some(_)) = store.worker_last_seen(&desk.worker).await {
                    *open.lock().unwrap_or_else(|e| e.into_inner()) = Some(desk);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let take = tokio::spawn(async move {
            while let Some(handoff) = incoming.recv().await {
                let handler = handler.clone();
                tokio::spawn(async move { handler.process_handoff(handoff).await });
            }
        });
        Arc::new(Handoffs {
            open: self.open.clone(),
            register: register.abort_handle(),
            take: tokio::sync::Mutex::new(Some(take)),
        })
    }
}

/// A worker's intake of hand-offs.
struct Handoffs {
    open: Arc<std::sync::Mutex<Option<Desk>>>,
    register: tokio::task::AbortHandle,
    take: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Handoffs {
    /// Takes no more hand-offs; returns once those already made have started (each counts as
    /// running until it is done). Idempotent.
    async fn close(&self) {
        self.register.abort();
        drop(self.open.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(take) = self.take.lock().await.take() {
            // Slots reserved just before closing are handed over (or dropped) within moments.
            let _ = tokio::time::timeout(Duration::from_secs(1), take).await;
        }
    }
}

/// Finds runs that are neither ended nor queued and queues them.
async fn reconcile(engine: RunEngine, config: WorkerConfig, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(config.reconcile_interval) => {}
        }
        match requeue_stranded(&engine, config.reconcile_interval).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(runs = n, "re-queued runs that were neither ended nor queued"),
            Err(e) => tracing::debug!(error = %e, "reconciler skipped a round"),
        }
    }
}

/// Queues every run that has been neither ended nor queued for `quiet_for`; how many it queued.
pub async fn requeue_stranded(engine: &RunEngine, quiet_for: Duration) -> Result<usize, crate::runs::ExecuteError> {
    let store = engine.store();
    let since = now_micros() - chrono::Duration::from_std(quiet_for).unwrap_or_default();
    let mut queued = 0;
    for run_id in store.stranded_runs(since, 500).await? {
        // The read model may lag: the stream and the queue decide.
        let Some(view) = engine.view(run_id).await? else { continue };
        if view.is_ended() || store.has_job(run_id).await? {
            continue;
        }
        let job = RunJob { run_id, attempt: view.attempts + 1, traceparent: None };
        store.apply_queue(&[QueueOp::push(job)]).await?;
        queued += 1;
    }
    Ok(queued)
}

/// Wakes the worker when a job was pushed, again shortly after (a push that commits while a
/// claim is in flight is missed by that claim), and every `interval`.
struct Wakeups {
    signal: Pin<Box<dyn Future<Output = Option<watch::Receiver<u64>>> + Send + Sync>>,
    recheck: Option<Pin<Box<tokio::time::Sleep>>>,
    interval: tokio::time::Interval,
}

impl std::fmt::Debug for Wakeups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wakeups").finish_non_exhaustive()
    }
}

const RECHECK: Duration = Duration::from_millis(5);

impl Wakeups {
    fn new(signal: watch::Receiver<u64>, interval: Duration) -> Self {
        let mut interval = tokio::time::interval(interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { signal: Box::pin(changed(signal)), recheck: None, interval }
    }
}

async fn changed(mut signal: watch::Receiver<u64>) -> Option<watch::Receiver<u64>> {
    signal.changed().await.ok().map(|()| signal)
}

impl PollStrategy for Wakeups {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        let mut woke = false;
        // Poll every source until it is pending, so each has the waker registered.
        while let Poll::Ready(signal) = self.signal.as_mut().poll(cx) {
            match signal {
                Some(signal) => {
                    self.signal = Box::pin(changed(signal));
                    self.recheck = Some(Box::pin(tokio::time::sleep(RECHECK)));
                    woke = true;
                }
                None => {
                    self.signal = Box::pin(std::future::pending());
                    break;
                }
            }
        }
        if let Some(recheck) = self.recheck.as_mut()
            && recheck.as_mut().poll(cx).is_ready()
        {
            self.recheck = None;
            woke = true;
        }
        while self.interval.poll_tick(cx).is_ready() {
            woke = true;
        }
        if woke { Poll::Ready(Some(())) } else { Poll::Pending }
    }

    // No `on_poll`: a task yielded after a wakeup may come from a claim made before the push
    // that woke it, so the recheck stays (measured: cancelling it there left the last jobs of a
    // burst waiting one or two poll intervals with two workers on PostgreSQL).
}
