//! The sandbox benchmark behind `kiln bench sandbox` and `examples/sandbox_bench.rs`: warm round
//! trip, cold start of a new tool version, pool throughput, and raw `deno run` start time measured
//! in the same run for comparison.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_proto::tool::{Limits, Permissions, ToolName};
use serde_json::json;

use super::{DenoBinary, DenoSandbox, Invocation, PoolConfig, Sandbox, SandboxConfig, SandboxError, ToolVersion};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub deno: DenoBinary,
    /// Sequential invocations of a warm trivial tool.
    pub warm_iterations: usize,
    /// New tool versions started, each to its first result.
    pub cold_iterations: usize,
    /// Invocations for the throughput figure.
    pub throughput_invocations: usize,
    /// Concurrent callers for the throughput figure.
    pub throughput_callers: usize,
    /// Processes the pool may use for the throughput figure (the "2 cores").
    pub throughput_processes: usize,
}

impl BenchOptions {
    pub fn new(deno: DenoBinary) -> Self {
        Self {
            deno,
            warm_iterations: 5_000,
            cold_iterations: 30,
            throughput_invocations: 20_000,
            throughput_callers: 8,
            throughput_processes: 2,
        }
    }
}

/// Latency percentiles of one measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub p50: Duration,
    pub p99: Duration,
    pub min: Duration,
    pub samples: usize,
}

impl Latency {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let n = samples.len().max(1);
        let at = |q: usize| samples.get((n * q / 100).min(n - 1)).copied().unwrap_or_default();
        Self { p50: at(50), p99: at(99), min: samples.first().copied().unwrap_or_default(), samples: samples.len() }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    pub deno_version: String,
    pub cores: usize,
    /// Host -> deno -> host for a trivial tool on a warm process.
    pub warm: Latency,
    /// A new tool version to its first result (spawn, load, invoke).
    pub cold: Latency,
    /// `deno run` of an empty module with the same flags, to process exit.
    pub raw_deno_run: Latency,
    pub throughput_per_sec: f64,
    pub throughput_processes: usize,
    pub throughput_callers: usize,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = |d: Duration| format!("{:.0} us", d.as_secs_f64() * 1e6);
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        writeln!(f, "sandbox benchmark (deno {}, {} cores)", self.deno_version, self.cores)?;
        writeln!(
            f,
            "  warm round trip        p50 {:>9}  p99 {:>9}  min {:>9}  (n={})",
            us(self.warm.p50),
            us(self.warm.p99),
            us(self.warm.min),
            self.warm.samples
        )?;
        writeln!(
            f,
            "  cold start to result   p50 {:>9}  p99 {:>9}  min {:>9}  (n={})",
            ms(self.cold.p50),
            ms(self.cold.p99),
            ms(self.cold.min),
            self.cold.samples
        )?;
        writeln!(
            f,
            "  raw `deno run` start   p50 {:>9}  p99 {:>9}  min {:>9}  (n={})",
            ms(self.raw_deno_run.p50),
            ms(self.raw_deno_run.p99),
            ms(self.raw_deno_run.min),
            self.raw_deno_run.samples
        )?;
        write!(
            f,
            "  throughput             {:.0} invocations/s ({} processes, {} concurrent callers)",
            self.throughput_per_sec, self.throughput_processes, self.throughput_callers
        )
    }
}

fn trivial(version: u32) -> Arc<ToolVersion> {
    Arc::new(ToolVersion {
        name: ToolName::parse("bench").unwrap_or_else(|_| unreachable!("a valid literal name")),
        version,
        code: Arc::from("(args) => ({ n: args.n + 1 })"),
        permissions: Permissions::default(),
        limits: Limits::default(),
    })
}

fn sandbox(opts: &BenchOptions, processes: usize) -> Result<DenoSandbox, SandboxError> {
    let mut config = SandboxConfig::new(opts.deno.clone());
    config.pool =
        PoolConfig { max_processes: processes.max(2), max_per_tool: processes.max(1), ..PoolConfig::default() };
    DenoSandbox::start(config).map_err(|e| SandboxError::Crash(format!("could not start the sandbox: {e}")))
}

async fn call(sb: &DenoSandbox, tool: &Arc<ToolVersion>, n: u64) -> Result<(), SandboxError> {
    let out = sb.invoke(Invocation::new(Arc::clone(tool), json!({ "n": n }))).await?;
    match out.value.get("n").and_then(serde_json::Value::as_u64) {
        Some(m) if m == n + 1 => Ok(()),
        _ => Err(SandboxError::Crash(format!("benchmark tool returned {}", out.value))),
    }
}

/// Runs every measurement once and returns the figures.
pub async fn run(opts: BenchOptions) -> Result<BenchReport, SandboxError> {
    let sb = sandbox(&opts, 2)?;

    let mut raw = Vec::with_capacity(opts.cold_iterations);
    for _ in 0..opts.cold_iterations {
        raw.push(sb.measure_raw_start().await?);
    }

    let mut cold = Vec::with_capacity(opts.cold_iterations);
    for i in 0..opts.cold_iterations {
        let tool = trivial(1_000 + u32::try_from(i).unwrap_or(u32::MAX - 1_000));
        let started = Instant::now();
        call(&sb, &tool, 1).await?;
        cold.push(started.elapsed());
    }

    let tool = trivial(1);
    for n in 0..200 {
        call(&sb, &tool, n).await?;
    }
    let mut warm = Vec::with_capacity(opts.warm_iterations);
    for n in 0..opts.warm_iterations as u64 {
        let started = Instant::now();
        call(&sb, &tool, n).await?;
        warm.push(started.elapsed());
    }
    sb.shutdown();

    let sb = sandbox(&opts, opts.throughput_processes)?;
    let tool = trivial(1);
    for n in 0..opts.throughput_processes as u64 * 50 {
        call(&sb, &tool, n).await?;
    }
    let per_caller = opts.throughput_invocations / opts.throughput_callers.max(1);
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..opts.throughput_callers.max(1) {
        let (sb, tool) = (sb.clone(), Arc::clone(&tool));
        callers.spawn(async move {
            for n in 0..per_caller as u64 {
                call(&sb, &tool, n).await?;
            }
            Ok::<_, SandboxError>(())
        });
    }
    while let Some(done) = callers.join_next().await {
        done.map_err(|e| SandboxError::Crash(format!("benchmark caller failed: {e}")))??;
    }
    let elapsed = started.elapsed();
    sb.shutdown();

    Ok(BenchReport {
        deno_version: opts.deno.version().to_owned(),
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        warm: Latency::of(warm),
        cold: Latency::of(cold),
        raw_deno_run: Latency::of(raw),
        throughput_per_sec: (per_caller * opts.throughput_callers.max(1)) as f64 / elapsed.as_secs_f64(),
        throughput_processes: opts.throughput_processes,
        throughput_callers: opts.throughput_callers.max(1),
    })
}
