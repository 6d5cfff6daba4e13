//! One request/response exchange with a bridge (a load, an invocation or a code check): reading
//! frames until the final one while forwarding logs and progress, answering host calls, and
//! enforcing the deadline and cancellation from the host side.
//!
//! At the deadline (or on cancel) an invocation gets an `abort` frame, which aborts `ctx.signal`;
//! if the tool returns within the grace period the process stays warm, otherwise it is killed.
//! Loads and checks are simply killed at their deadline.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::process::DenoProcess;
use super::protocol::{Inbound, InboundKind, Item, Outbound, ReadError};
use super::{HostCalls, LogLevel, SandboxError, SandboxEvent};

/// What to do when the deadline passes.
#[derive(Debug)]
pub(crate) enum OnDeadline {
    /// Abort `ctx.signal`, wait the grace period, then kill; fail with this error either way.
    Abort { error: SandboxError, grace: Duration },
    /// Kill at once and fail with this error.
    Kill(SandboxError),
}

#[derive(Debug)]
pub(crate) struct Exchange<'a> {
    pub id: u64,
    pub deadline: Instant,
    pub on_deadline: OnDeadline,
    pub cancel: Option<&'a CancellationToken>,
    pub events: Option<&'a mpsc::UnboundedSender<SandboxEvent>>,
    pub host: Option<&'a Arc<dyn HostCalls>>,
    pub log_limit: u64,
}

#[derive(Debug)]
pub(crate) struct Outcome {
    pub frame: Box<Inbound>,
    pub logs_truncated: bool,
}

/// Forwards logs and progress within the byte budget; the host-side backstop to the bridge's cap.
struct LogSink<'a> {
    events: Option<&'a mpsc::UnboundedSender<SandboxEvent>>,
    left: u64,
    limit: u64,
    truncated: bool,
}

impl LogSink<'_> {
    fn emit(&self, event: SandboxEvent) {
        if let Some(tx) = self.events {
            let _ = tx.send(event);
        }
    }

    fn truncate(&mut self) {
        if !self.truncated {
            self.truncated = true;
            self.left = 0;
            self.emit(SandboxEvent::LogsTruncated { limit_bytes: self.limit });
        }
    }

    fn log(&mut self, level: LogLevel, mut message: String, cut_by_bridge: bool) {
        if self.truncated {
            return;
        }
        let len = message.len() as u64;
        if len > self.left {
            let mut end = usize::try_from(self.left).unwrap_or(usize::MAX).min(message.len());
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            self.emit(SandboxEvent::Log { level, message });
            self.truncate();
            return;
        }
        self.left -= len;
        self.emit(SandboxEvent::Log { level, message });
        if cut_by_bridge {
            self.truncate();
        }
    }

    fn progress(&mut self, done: f64, total: Option<f64>, message: Option<String>) {
        let cost = 32 + message.as_ref().map_or(0, |m| m.len() as u64);
        if self.truncated || cost > self.left {
            self.truncate();
            return;
        }
        self.left -= cost;
        self.emit(SandboxEvent::Progress { done, total, message });
    }
}

impl DenoProcess {
    /// Aborts `ctx.signal` of invocation `id`; the process is killed if the tool has not returned
    /// by the returned instant. Fails with `error` (process killed) if the abort cannot be sent.
    async fn ask_to_stop(
        &mut self,
        id: u64,
        reason: &'static str,
        grace: Duration,
        error: SandboxError,
    ) -> Result<(Instant, SandboxError), SandboxError> {
        let until = Instant::now() + grace;
        match self.send(&Outbound::Abort { id, reason }, until).await {
            Ok(()) => Ok((until, error)),
            Err(_) => {
                self.kill();
                Err(error)
            }
        }
    }

    /// Reads frames for exchange `x.id` until its final frame. Frames of other ids (stragglers of
    /// an earlier, aborted exchange) are ignored.
    pub(crate) async fn exchange(&mut self, x: Exchange<'_>) -> Result<Outcome, SandboxError> {
        let mut logs = LogSink { events: x.events, left: x.log_limit, limit: x.log_limit, truncated: false };
        let mut calls: JoinSet<(u64, Result<Value, String>)> = JoinSet::new();
        let mut call_ids = HashMap::new();
        let mut on_deadline = Some(x.on_deadline);
        // Set once the tool was asked to stop: (kill at, error to report).
        let mut stopping: Option<(Instant, SandboxError)> = None;
        loop {
            let wake = stopping.as_ref().map_or(x.deadline, |s| s.0);
            let cancelled = async {
                match x.cancel {
                    Some(c) => c.cancelled().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                item = self.reader.next() => match item {
                    Ok(Some(Item::Frame(f))) if f.id == x.id => match f.t {
                        InboundKind::Log => {
                            logs.log(f.level.unwrap_or(LogLevel::Info), f.msg.unwrap_or_default(), f.truncated);
                        }
                        InboundKind::Progress => logs.progress(f.done.unwrap_or(0.0), f.total, f.message),
                        InboundKind::Call => {
                            let cid = f.cid.unwrap_or(0);
                            let method = f.method.unwrap_or_default();
                            match x.host {
                                Some(host) => {
                                    let host = Arc::clone(host);
                                    let params = f.params;
                                    let handle = calls.spawn(async move { (cid, host.call(&method, params).await) });
                                    call_ids.insert(handle.id(), cid);
                                }
                                None => {
                                    let error = format!(
                                        "{method}: host calls are not available here (ctx.step and ctx.tools.call need a durable run)"
                                    );
                                    self.send(&Outbound::Reply { cid, value: None, error: Some(error) }, wake).await?;
                                }
                            }
                        }
                        _ if f.is_final() => {
                            if let Some((_, error)) = stopping {
                                return Err(error);
                            }
                            return Ok(Outcome { frame: f, logs_truncated: logs.truncated });
                        }
                        _ => {}
                    },
                    Ok(Some(Item::Frame(_))) => {}
                    Ok(Some(Item::Stray(line))) => logs.log(LogLevel::Info, line, false),
                    Ok(None) => {
                        let died = self.exit_error().await;
                        return Err(stopping.map_or(died, |(_, error)| error));
                    }
                    Err(ReadError::TooLarge { limit }) => {
                        self.kill();
                        return Err(SandboxError::InvalidOutput(format!(
                            "the tool sent more than {limit} bytes in one message; its process was stopped"
                        )));
                    }
                    Err(e) => {
                        self.kill();
                        return Err(SandboxError::Crash(e.to_string()));
                    }
                },
                Some(joined) = calls.join_next_with_id(), if !calls.is_empty() => {
                    let (cid, result) = match joined {
                        Ok((_, done)) => done,
                        Err(e) => (call_ids.get(&e.id()).copied().unwrap_or(0), Err(format!("host call failed: {e}"))),
                    };
                    let reply = match result {
                        Ok(value) => Outbound::Reply { cid, value: Some(value), error: None },
                        Err(error) => Outbound::Reply { cid, value: None, error: Some(error) },
                    };
                    self.send(&reply, wake).await?;
                }
                () = sleep_until(wake) => {
                    if let Some((_, error)) = stopping.take() {
                        self.kill();
                        return Err(error);
                    }
                    match on_deadline.take() {
                        Some(OnDeadline::Abort { error, grace }) => {
                            stopping = Some(self.ask_to_stop(x.id, "timeout", grace, error).await?);
                        }
                        Some(OnDeadline::Kill(error)) => {
                            self.kill();
                            return Err(error);
                        }
                        None => {
                            self.kill();
                            return Err(SandboxError::Crash("deadline handling ran twice".to_owned()));
                        }
                    }
                }
                () = cancelled, if stopping.is_none() => match &on_deadline {
                    Some(OnDeadline::Abort { grace, .. }) => {
                        stopping = Some(self.ask_to_stop(x.id, "cancelled", *grace, SandboxError::Cancelled).await?);
                    }
                    _ => {
                        self.kill();
                        return Err(SandboxError::Cancelled);
                    }
                },
            }
        }
    }
}
