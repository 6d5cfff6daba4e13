use chrono::TimeZone;
use serde_json::json;

use super::*;
use crate::events::{RunAttemptStarted, RunCancelled, RunSucceeded};
use crate::ids::RunId;
use crate::tool::ToolName;

fn t(s: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
}

fn requested() -> DomainEvent {
    RunRequested {
        run_id: RunId::new(),
        tool: ToolName::parse("add").unwrap(),
        tool_version: 1,
        arguments: json!({"a": 1}),
        idempotency_key: None,
        parent_run: None,
        replay_of: None,
        reuse_steps_from: None,
    }
    .into()
}

fn started(attempt: u32) -> DomainEvent {
    RunAttemptStarted { attempt, worker_id: "w1".into(), lease_expires_at: t(30) }.into()
}

fn error(kind: ErrorKind) -> RunError {
    RunError { kind, message: "boom".into(), name: None, stack: None, non_retryable: false }
}

fn fold(events: &[DomainEvent]) -> Result<Option<RunState>, InvalidRunStream> {
    RunState::fold(events.iter().enumerate().map(|(i, e)| (StreamVersion(i as u64 + 1), e)))
}

#[test]
fn a_run_goes_from_queued_through_attempts_to_its_outcome() {
    let policy = RetryPolicy::default();
    let failed = policy.decide(1, &error(ErrorKind::Timeout), t(0), 0.5);
    let events = vec![
        requested(),
        started(1),
        RunStepCompleted { attempt: 1, key: "fetch".into(), result: json!(42) }.into(),
        RunAttemptFailed { attempt: 1, error: error(ErrorKind::Timeout), retry: failed }.into(),
        started(2),
        RunSucceeded { attempt: 2, output: json!({"sum": 3}) }.into(),
    ];
    assert_eq!(fold(&events[..1]).unwrap().unwrap().status, RunStatus::Queued);
    let mid = fold(&events[..4]).unwrap().unwrap();
    assert!(matches!(mid.status, RunStatus::RetryScheduled { next_attempt: 2, .. }));
    assert_eq!(mid.steps["fetch"], json!(42));
    let end = fold(&events).unwrap().unwrap();
    assert_eq!(end.status, RunStatus::Succeeded);
    assert_eq!(end.attempts, 2);
    assert_eq!(end.output, Some(json!({"sum": 3})));
    assert_eq!(end.version, StreamVersion(6));
    assert!(fold(&[]).unwrap().is_none());
}

#[test]
fn streams_that_break_the_rules_are_refused_with_their_version() {
    let e = fold(&[started(1)]).unwrap_err();
    assert_eq!(e.to_string(), "run stream at version 1: starts with run.attempt_started instead of run.requested");
    let e = fold(&[requested(), started(2)]).unwrap_err();
    assert_eq!(e.version, 2);
    let step = || DomainEvent::from(RunStepCompleted { attempt: 1, key: "k".into(), result: json!(1) });
    let e = fold(&[requested(), started(1), step(), step()]).unwrap_err();
    assert!(e.message.contains("step \"k\" completed twice"));
    let cancelled = DomainEvent::from(RunCancelled { reason: None, cancelled_by: None });
    let e = fold(&[requested(), cancelled, started(1)]).unwrap_err();
    assert!(e.message.contains("after the run ended (cancelled)"), "{e}");
}

#[test]
fn retry_rules_follow_the_issue() {
    for kind in [ErrorKind::UserError, ErrorKind::Timeout, ErrorKind::SandboxCrash, ErrorKind::Oom] {
        assert!(is_retryable(&error(kind)), "{kind:?}");
    }
    for kind in [
        ErrorKind::CodeInvalid,
        ErrorKind::PermissionDenied,
        ErrorKind::InvalidArguments,
        ErrorKind::InvalidOutput,
        ErrorKind::Cancelled,
    ] {
        assert!(!is_retryable(&error(kind)), "{kind:?}");
    }
    let marked = RunError { non_retryable: true, ..error(ErrorKind::UserError) };
    assert!(!is_retryable(&marked));
    let policy = RetryPolicy { max_attempts: 3, ..RetryPolicy::default() };
    assert!(matches!(policy.decide(2, &error(ErrorKind::UserError), t(0), 0.0), RetryDecision::Retry { .. }));
    assert_eq!(
        policy.decide(3, &error(ErrorKind::UserError), t(0), 0.0),
        RetryDecision::GiveUp { reason: "attempt 3 of 3 failed".into() }
    );
    assert_eq!(
        policy.decide(1, &marked, t(0), 0.0),
        RetryDecision::GiveUp { reason: "user_error error: the tool marked the error non-retryable".into() }
    );
}

#[test]
fn backoff_grows_exponentially_with_bounded_jitter_and_a_cap() {
    let p = RetryPolicy { max_attempts: 10, initial_delay_ms: 100, backoff_factor: 2.0, max_delay_ms: 1_000 };
    assert_eq!(p.backoff(1, 0.5), Duration::from_millis(100));
    assert_eq!(p.backoff(2, 0.5), Duration::from_millis(200));
    assert_eq!(p.backoff(3, 0.5), Duration::from_millis(400));
    assert_eq!(p.backoff(3, 0.0), Duration::from_millis(320));
    assert_eq!(p.backoff(3, 0.999_999), Duration::from_millis(480));
    assert_eq!(p.backoff(9, 0.999_999), Duration::from_millis(1_000), "capped at maxDelayMs");
    let RetryDecision::Retry { delay_ms, next_attempt_at } = p.decide(2, &error(ErrorKind::Timeout), t(0), 0.5) else {
        panic!("should retry")
    };
    assert_eq!(delay_ms, 200);
    assert_eq!(next_attempt_at, t(0) + chrono::Duration::milliseconds(200));
}
