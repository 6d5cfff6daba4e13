//! One `deno` process running the bridge: spawning it with its permission flags, writing frames,
//! killing it, and telling from its exit and stderr why it died. What a process does during one
//! load, invocation or check is in `exchange`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};

use super::SandboxError;
use super::config::SandboxPolicy;
use super::permissions::{ProcessSpec, deno_run_args};
use super::protocol::{BRIDGE_JS, FrameReader, Outbound, base64};

/// Keep this much of a process's stderr, for telling an OOM from a crash and for crash reports.
const STDERR_TAIL: usize = 16 << 10;

/// Environment variables passed through to deno when it may download packages (proxies, TLS
/// trust, registry mirrors). Tool code cannot read them: `--deny-env`.
const DOWNLOAD_ENV: &[&str] = &[
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "no_proxy",
    "DENO_TLS_CA_STORE",
    "DENO_CERT",
    "NPM_CONFIG_REGISTRY",
];

/// How every process of one sandbox is started.
#[derive(Debug)]
pub(crate) struct Launch {
    pub deno: PathBuf,
    pub deno_dir: PathBuf,
    /// An empty directory, the processes' working directory.
    pub workdir: PathBuf,
    pub policy: SandboxPolicy,
    bridge_url: String,
}

impl Launch {
    pub fn new(deno: PathBuf, deno_dir: PathBuf, workdir: PathBuf, policy: SandboxPolicy) -> Self {
        let bridge_url = format!("data:application/javascript;base64,{}", base64(BRIDGE_JS.as_bytes()));
        Self { deno, deno_dir, workdir, policy, bridge_url }
    }
}

#[derive(Debug)]
pub(crate) struct DenoProcess {
    child: Child,
    pid: u32,
    stdin: ChildStdin,
    pub reader: FrameReader<ChildStdout>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_task: Option<JoinHandle<()>>,
    out: Vec<u8>,
    next_id: u64,
    pub memory_mb: u32,
    /// Invocations served, for recycling.
    pub invocations: u64,
    /// Resident memory right after the tool loaded; growth past it triggers recycling.
    pub baseline_rss: Option<u64>,
    dead: bool,
}

impl DenoProcess {
    pub fn spawn(launch: &Launch, spec: &ProcessSpec) -> Result<Self, SandboxError> {
        let mut cmd = Command::new(&launch.deno);
        cmd.args(deno_run_args(spec, &launch.policy))
            .arg(&launch.bridge_url)
            .env_clear()
            .env("DENO_DIR", &launch.deno_dir)
            .env("NO_COLOR", "1")
            .env("DENO_NO_UPDATE_CHECK", "1")
            .env("DENO_NO_PROMPT", "1")
            .current_dir(&launch.workdir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if launch.policy.allow_npm || launch.policy.allow_jsr {
            for name in DOWNLOAD_ENV {
                if let Some(v) = std::env::var_os(name) {
                    cmd.env(name, v);
                }
            }
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| SandboxError::Crash(format!("could not start deno at {}: {e}", launch.deno.display())))?;
        let missing = || SandboxError::Crash("deno started without stdio pipes".to_owned());
        let pid = child.id().ok_or_else(missing)?;
        let stdin = child.stdin.take().ok_or_else(missing)?;
        let stdout = child.stdout.take().ok_or_else(missing)?;
        let mut stderr_pipe = child.stderr.take().ok_or_else(missing)?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let tail = Arc::clone(&stderr);
        // Drained continuously so a tool printing to stderr can never block on a full pipe.
        let stderr_task = tokio::spawn(async move {
            let mut chunk = vec![0u8; 8 << 10];
            while let Ok(n @ 1..) = stderr_pipe.read(&mut chunk).await {
                let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                t.extend_from_slice(&chunk[..n]);
                if t.len() > 2 * STDERR_TAIL {
                    let cut = t.len() - STDERR_TAIL;
                    t.drain(..cut);
                }
            }
        });
        Ok(Self {
            child,
            pid,
            stdin,
            reader: FrameReader::new(stdout),
            stderr,
            stderr_task: Some(stderr_task),
            out: Vec::with_capacity(1024),
            next_id: 0,
            memory_mb: spec.memory_mb,
            invocations: 0,
            baseline_rss: None,
            dead: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Whether the process may serve another invocation.
    pub fn is_usable(&self) -> bool {
        !self.dead
    }

    /// Writes one frame, giving up (and killing the process) at `deadline`: a tool spinning in a
    /// loop stops reading stdin, and a large frame must not block the host forever.
    pub async fn send(&mut self, frame: &Outbound<'_>, deadline: Instant) -> Result<(), SandboxError> {
        self.out.clear();
        serde_json::to_writer(&mut self.out, frame)
            .map_err(|e| SandboxError::Crash(format!("could not encode a message for the sandbox: {e}")))?;
        self.out.push(b'\n');
        match timeout_at(deadline, self.stdin.write_all(&self.out)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(self.exit_error().await),
            Err(_) => {
                self.kill();
                Err(SandboxError::Crash("the sandbox process stopped reading its input".to_owned()))
            }
        }
    }

    /// SIGKILL; the process is reaped when dropped.
    pub fn kill(&mut self) {
        self.dead = true;
        let _ = self.child.start_kill();
    }

    /// Why the process ended (call after its stdout closed): out of memory or a crash.
    pub async fn exit_error(&mut self) -> SandboxError {
        self.dead = true;
        let status = match timeout(Duration::from_secs(2), self.child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            _ => {
                let _ = self.child.start_kill();
                "no exit status".to_owned()
            }
        };
        if let Some(task) = self.stderr_task.take() {
            let _ = timeout(Duration::from_secs(1), task).await;
        }
        let tail = String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
        if tail.contains("out of memory") || tail.contains("Reached heap limit") {
            return SandboxError::Oom { memory_mb: self.memory_mb };
        }
        let last: Vec<&str> = tail.lines().filter(|l| !l.trim().is_empty()).rev().take(5).collect();
        let last: Vec<&str> = last.into_iter().rev().collect();
        SandboxError::Crash(format!("deno exited unexpectedly ({status}): {}", last.join(" | ")))
    }

    /// Resident set size from `/proc`, where there is one.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().strip_suffix("kB")?.trim();
        kb.parse::<u64>().ok().map(|kb| kb * 1024)
    }
}

/// `deno run` with an empty module and the same flags: the floor under a cold start.
pub(crate) async fn raw_deno_start(launch: &Launch) -> Result<Duration, SandboxError> {
    let spec = ProcessSpec { net: Vec::new(), memory_mb: 128 };
    let args: Vec<OsString> = deno_run_args(&spec, &launch.policy);
    let started = std::time::Instant::now();
    let status = Command::new(&launch.deno)
        .args(args)
        .arg("data:application/javascript,export{}")
        .env_clear()
        .env("DENO_DIR", &launch.deno_dir)
        .env("NO_COLOR", "1")
        .env("DENO_NO_UPDATE_CHECK", "1")
        .current_dir(&launch.workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|e| SandboxError::Crash(format!("could not start deno: {e}")))?;
    if !status.success() {
        return Err(SandboxError::Crash(format!("`deno run` of an empty module exited with {status}")));
    }
    Ok(started.elapsed())
}
