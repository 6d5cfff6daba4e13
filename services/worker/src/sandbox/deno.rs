//! [`DenoSandbox`]: the [`Sandbox`] implementation on real `deno` processes. It turns an
//! invocation into a pool key, starts and loads a process on a cold path, runs the invocation,
//! and keeps a separate permission-less process for code checks.

use std::io;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::exchange::{Exchange, OnDeadline};
use super::permissions::{ProcessSpec, grant_network};
use super::pool::{Key, Pool, Slot};
use super::process::{DenoProcess, Launch};
use super::protocol::{InboundKind, Outbound};
use super::{
    CodeFormat, CodeInvalid, Invocation, InvocationOutput, InvocationStats, Sandbox, SandboxConfig, SandboxError,
    ToolVersion,
};

/// A checker process is replaced after this many checks: every check leaves modules in its
/// module map.
const CHECKS_PER_PROCESS: u64 = 200;
const CHECKER_MEMORY_MB: u32 = 256;

/// Counters and gauges of the process pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Live processes (busy + idle + starting).
    pub processes: usize,
    pub busy: usize,
    pub idle: usize,
    /// Processes started since the sandbox started.
    pub spawned: u64,
    /// Invocations served by an already warm process.
    pub warm_hits: u64,
    /// Idle processes stopped to make room for another tool.
    pub evicted: u64,
    /// Idle processes stopped after `idle_timeout`.
    pub idle_stopped: u64,
    /// Processes replaced after `recycle_after` invocations or memory growth.
    pub recycled: u64,
}

/// The Deno sandbox. Cheap to clone; clones share the pool.
#[derive(Debug, Clone)]
pub struct DenoSandbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: SandboxConfig,
    launch: Launch,
    pool: Pool,
    checker: Mutex<Option<DenoProcess>>,
    _dirs: Vec<tempfile::TempDir>,
}

impl DenoSandbox {
    /// Prepares the cache and working directories and the pool. Needs a tokio runtime.
    pub fn start(config: SandboxConfig) -> io::Result<Self> {
        let mut dirs = Vec::new();
        let deno_dir = match &config.deno_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                dir.clone()
            }
            None => {
                let dir = tempfile::Builder::new().prefix("kiln-deno-dir-").tempdir()?;
                let path = dir.path().to_path_buf();
                dirs.push(dir);
                path
            }
        };
        let workdir = tempfile::Builder::new().prefix("kiln-sandbox-cwd-").tempdir()?;
        let launch = Launch::new(
            config.deno.path().to_path_buf(),
            deno_dir,
            workdir.path().to_path_buf(),
            config.policy.clone(),
        );
        dirs.push(workdir);
        let pool = Pool::new(config.pool.clone());
        Ok(Self { inner: Arc::new(Inner { config, launch, pool, checker: Mutex::new(None), _dirs: dirs }) })
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.inner.config
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.inner.pool.stats()
    }

    /// Stops idle processes and refuses new invocations.
    pub fn shutdown(&self) {
        self.inner.pool.close();
    }

    /// `deno run` of an empty module with the sandbox's flags, for comparison in benchmarks.
    pub async fn measure_raw_start(&self) -> Result<std::time::Duration, SandboxError> {
        super::process::raw_deno_start(&self.inner.launch).await
    }

    fn spec(&self, tool: &ToolVersion) -> ProcessSpec {
        let net = grant_network(&tool.permissions.network, &self.inner.config.policy.network).granted;
        ProcessSpec { net, memory_mb: tool.limits.memory_mb }
    }

    fn frame_cap(&self, max_output_bytes: u64) -> usize {
        let logs = self.inner.config.max_log_bytes.saturating_mul(6);
        usize::try_from(max_output_bytes.max(logs)).unwrap_or(usize::MAX).saturating_add(64 << 10)
    }

    /// Starts a process for `inv.tool` and loads its code; module top-level logs go to `inv.events`.
    async fn start_process(&self, inv: &Invocation, spec: &ProcessSpec) -> Result<DenoProcess, SandboxError> {
        let config = &self.inner.config;
        let mut process = DenoProcess::spawn(&self.inner.launch, spec)?;
        let deadline = Instant::now() + config.load_timeout;
        let id = process.next_id();
        let tool = &inv.tool;
        let load = Outbound::Load {
            id,
            code: &tool.code,
            name: tool.name.as_str(),
            version: tool.version,
            max_log_bytes: config.max_log_bytes,
        };
        process.reader.max_frame = self.frame_cap(0);
        process.send(&load, deadline).await?;
        let timeout_ms = u64::try_from(config.load_timeout.as_millis()).unwrap_or(u64::MAX);
        let outcome = process
            .exchange(Exchange {
                id,
                deadline,
                on_deadline: OnDeadline::Kill(SandboxError::Timeout { timeout_ms }),
                cancel: Some(&inv.cancel),
                events: inv.events.as_ref(),
                host: None,
                log_limit: config.max_log_bytes,
            })
            .await?;
        match (outcome.frame.t, outcome.frame.error) {
            (InboundKind::Loaded, _) => {
                process.baseline_rss = process.rss_bytes();
                Ok(process)
            }
            (_, Some(mut error)) => match error.code_invalid.take() {
                Some(c) => Err(SandboxError::CodeInvalid(CodeInvalid::from_bridge(c, Some(&tool.code)))),
                None => Err(SandboxError::from_bridge(error)),
            },
            (t, None) => Err(SandboxError::Crash(format!("unexpected {t:?} reply to a load"))),
        }
    }

    async fn run(
        &self,
        process: &mut DenoProcess,
        inv: &Invocation,
    ) -> Result<(serde_json::Value, bool), SandboxError> {
        let config = &self.inner.config;
        let limits = inv.tool.limits;
        let deadline = Instant::now() + std::time::Duration::from_millis(limits.timeout_ms);
        let id = process.next_id();
        process.reader.max_frame = self.frame_cap(limits.max_output_bytes);
        let frame = Outbound::Invoke {
            id,
            args: &inv.args,
            run_id: inv.run_id,
            attempt: inv.attempt,
            max_log_bytes: config.max_log_bytes,
            max_output_bytes: limits.max_output_bytes,
        };
        process.send(&frame, deadline).await?;
        let outcome = process
            .exchange(Exchange {
                id,
                deadline,
                on_deadline: OnDeadline::Abort {
                    error: SandboxError::Timeout { timeout_ms: limits.timeout_ms },
                    grace: config.abort_grace,
                },
                cancel: Some(&inv.cancel),
                events: inv.events.as_ref(),
                host: inv.host.as_ref(),
                log_limit: config.max_log_bytes,
            })
            .await;
        process.invocations += 1;
        let outcome = outcome?;
        let frame = outcome.frame;
        match frame.t {
            InboundKind::Ok => Ok((frame.value, outcome.logs_truncated)),
            InboundKind::Err => Err(SandboxError::from_bridge(frame.error.unwrap_or_default())),
            t => Err(SandboxError::Crash(format!("unexpected {t:?} reply to an invocation"))),
        }
    }

    async fn check(&self, code: &str) -> Result<CodeFormat, SandboxError> {
        let config = &self.inner.config;
        let mut checker = self.inner.checker.lock().await;
        let reuse = checker.as_ref().is_some_and(|p| p.is_usable() && p.invocations < CHECKS_PER_PROCESS);
        let process = match checker.as_mut() {
            Some(p) if reuse => p,
            _ => {
                let spec = ProcessSpec { net: Vec::new(), memory_mb: CHECKER_MEMORY_MB };
                checker.insert(DenoProcess::spawn(&self.inner.launch, &spec)?)
            }
        };
        process.invocations += 1;
        let deadline = Instant::now() + config.check_timeout;
        let id = process.next_id();
        process.reader.max_frame = self.frame_cap(0);
        process.send(&Outbound::Check { id, code }, deadline).await?;
        let timeout_ms = u64::try_from(config.check_timeout.as_millis()).unwrap_or(u64::MAX);
        let outcome = process
            .exchange(Exchange {
                id,
                deadline,
                on_deadline: OnDeadline::Kill(SandboxError::Timeout { timeout_ms }),
                cancel: None,
                events: None,
                host: None,
                log_limit: 0,
            })
            .await?;
        let mut frame = outcome.frame;
        match (frame.format, frame.error.as_mut().and_then(|e| e.code_invalid.take())) {
            (_, Some(c)) => Err(SandboxError::CodeInvalid(CodeInvalid::from_bridge(c, Some(code)))),
            (Some(format), None) => Ok(format),
            (None, None) => Err(SandboxError::Crash("the code checker gave no answer".to_owned())),
        }
    }
}

#[async_trait]
impl Sandbox for DenoSandbox {
    async fn invoke(&self, inv: Invocation) -> Result<InvocationOutput, SandboxError> {
        let spec = self.spec(&inv.tool);
        let key = Key { tool: inv.tool.name.clone(), version: inv.tool.version, spec };
        let (mut lease, cold_start) = match self.inner.pool.acquire(&key, inv.nested, &inv.cancel).await? {
            Slot::Warm(lease) => (*lease, false),
            Slot::Cold(reservation) => (reservation.fill(self.start_process(&inv, &key.spec).await?), true),
        };
        let process = lease.process();
        let process_id = process.pid();
        let result = self.run(process, &inv).await;
        lease.release();
        let (value, logs_truncated) = result?;
        Ok(InvocationOutput { value, stats: InvocationStats { cold_start, process_id, logs_truncated } })
    }

    async fn check_code(&self, code: &str) -> Result<CodeFormat, SandboxError> {
        self.check(code).await
    }
}
