//! A run's state, folded from its stream, and the retry rules. Pure: the worker folds a run's
//! events to decide what to do next (which attempt, which steps are already recorded, whether it
//! has ended) and at which stream version its next append must land (fencing: a worker whose view
//! is stale cannot record anything); the runs projection folds the same events.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::events::{
    DomainEvent, ErrorKind, RetryDecision, RunAttemptFailed, RunError, RunRequested, RunStepCompleted,
};
use crate::ids::StreamVersion;
use crate::tool::RetryPolicy;

/// Where a run is.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum RunStatus {
    /// Requested, no attempt started yet.
    Queued,
    /// An attempt is under way, held by a worker until its lease expires.
    Running {
        attempt: u32,
        worker_id: String,
        lease_expires_at: DateTime<Utc>,
    },
    /// An attempt failed; the next one may start at `next_attempt_at`.
    RetryScheduled {
        next_attempt: u32,
        next_attempt_at: DateTime<Utc>,
    },
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl RunStatus {
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled | Self::TimedOut)
    }

    /// The status's name as stored and filtered on: `queued`, `running`, `retry_scheduled`, ...
    pub fn name(&self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running { .. } => "running",
            Self::RetryScheduled { .. } => "retry_scheduled",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
        }
    }
}

/// Everything the log says about one run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunState {
    pub request: RunRequested,
    pub status: RunStatus,
    /// Attempts started so far.
    pub attempts: u32,
    /// Results of completed durable steps, by key, from every attempt.
    pub steps: BTreeMap<String, Value>,
    pub output: Option<Value>,
    pub error: Option<RunError>,
    /// The stream's version after the last event folded: the expected version of the next append.
    pub version: StreamVersion,
}

/// A run stream whose events do not follow the run's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("run stream at version {version}: {message}")]
pub struct InvalidRunStream {
    pub version: u64,
    pub message: String,
}

impl RunState {
    /// Folds a run's events, in stream order. `None` for an empty stream.
    pub fn fold<'a>(
        events: impl IntoIterator<Item = (StreamVersion, &'a DomainEvent)>,
    ) -> Result<Option<RunState>, InvalidRunStream> {
        let mut state: Option<RunState> = None;
        for (version, event) in events {
            match (&mut state, event) {
                (None, DomainEvent::RunRequested(r)) => {
                    state = Some(RunState {
                        request: r.clone(),
                        status: RunStatus::Queued,
                        attempts: 0,
                        steps: BTreeMap::new(),
                        output: None,
                        error: None,
                        version,
                    });
                }
                (None, other) => {
                    return Err(InvalidRunStream {
                        version: version.0,
                        message: format!("starts with {} instead of run.requested", other.event_type()),
                    });
                }
                (Some(s), e) => s.apply(version, e)?,
            }
        }
        Ok(state)
    }

    /// Applies the next event of the stream.
    pub fn apply(&mut self, version: StreamVersion, event: &DomainEvent) -> Result<(), InvalidRunStream> {
        let invalid = |message: String| Err(InvalidRunStream { version: version.0, message });
        if self.status.is_terminal() {
            return invalid(format!("{} after the run ended ({})", event.event_type(), self.status.name()));
        }
        match event {
            DomainEvent::RunRequested(_) => return invalid("a second run.requested".to_owned()),
            DomainEvent::RunAttemptStarted(a) => {
                if a.attempt != self.attempts + 1 {
                    return invalid(format!("attempt {} started after attempt {}", a.attempt, self.attempts));
                }
                self.attempts = a.attempt;
                self.status = RunStatus::Running {
                    attempt: a.attempt,
                    worker_id: a.worker_id.clone(),
                    lease_expires_at: a.lease_expires_at,
                };
            }
            DomainEvent::RunStepCompleted(RunStepCompleted { key, result, .. }) => {
                if self.steps.insert(key.clone(), result.clone()).is_some() {
                    return invalid(format!("step {key:?} completed twice"));
                }
            }
            DomainEvent::RunAttemptFailed(RunAttemptFailed { attempt, error, retry }) => {
                self.error = Some(error.clone());
                self.status = match retry {
                    RetryDecision::Retry { next_attempt_at, .. } => {
                        RunStatus::RetryScheduled { next_attempt: attempt + 1, next_attempt_at: *next_attempt_at }
                    }
                    // The terminal event follows.
                    RetryDecision::GiveUp { .. } => self.status.clone(),
                };
            }
            DomainEvent::RunSucceeded(s) => {
                self.output = Some(s.output.clone());
                self.error = None;
                self.status = RunStatus::Succeeded;
            }
            DomainEvent::RunFailed(f) => {
                self.error = Some(f.error.clone());
                self.status = RunStatus::Failed;
            }
            DomainEvent::RunLogs(_) => {}
            DomainEvent::RunCancelled(_) => self.status = RunStatus::Cancelled,
            DomainEvent::RunTimedOut(_) => self.status = RunStatus::TimedOut,
            other => return invalid(format!("{} in a run stream", other.event_type())),
        }
        self.version = version;
        Ok(())
    }
}

/// Whether an error of this kind is worth another attempt. Thrown errors, timeouts and crashes
/// (out-of-memory included: the next process may fit) are; errors that the same code and input
/// would repeat are not, nor errors the tool marked non-retryable (`ctx.fail`).
pub fn is_retryable(error: &RunError) -> bool {
    if error.non_retryable {
        return false;
    }
    match error.kind {
        ErrorKind::UserError | ErrorKind::Timeout | ErrorKind::SandboxCrash | ErrorKind::Oom => true,
        ErrorKind::CodeInvalid
        | ErrorKind::PermissionDenied
        | ErrorKind::InvalidArguments
        | ErrorKind::InvalidOutput
        | ErrorKind::Cancelled => false,
    }
}

impl RetryPolicy {
    /// The delay before attempt `failed + 1`, after attempt `failed` (1-based) failed:
    /// `initialDelayMs * backoffFactor^(failed-1)`, jittered by up to ±20 % (`unit` is a uniform
    /// random number in [0, 1)), never above `maxDelayMs`.
    pub fn backoff(&self, failed: u32, unit: f64) -> Duration {
        let exp = self.backoff_factor.powi(failed.saturating_sub(1).min(64) as i32);
        let base = (self.initial_delay_ms as f64 * exp).min(self.max_delay_ms as f64);
        let jittered = base * (0.8 + 0.4 * unit.clamp(0.0, 1.0));
        Duration::from_millis(jittered.min(self.max_delay_ms as f64).round() as u64)
    }

    /// What to do after attempt `failed` ended with `error`.
    pub fn decide(&self, failed: u32, error: &RunError, now: DateTime<Utc>, unit: f64) -> RetryDecision {
        if !is_retryable(error) {
            let why = if error.non_retryable { "the tool marked the error non-retryable" } else { "not retryable" };
            return RetryDecision::GiveUp { reason: format!("{} error: {why}", error.kind) };
        }
        if failed >= self.max_attempts {
            return RetryDecision::GiveUp { reason: format!("attempt {failed} of {} failed", self.max_attempts) };
        }
        let delay = self.backoff(failed, unit);
        let next_attempt_at = now + chrono::Duration::from_std(delay).unwrap_or_default();
        RetryDecision::Retry { delay_ms: delay.as_millis() as u64, next_attempt_at }
    }
}

#[cfg(test)]
mod tests;
