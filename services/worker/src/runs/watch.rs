//! Watching a run: its logs and progress as they happen, then its end. Works across processes:
//! the end comes from the log (any process's append moves the head), logs and progress from
//! the store's run feed.

use chrono::{DateTime, Utc};
use kiln_proto::events::RunError;
use kiln_proto::run::RunStatus;
use kiln_proto::{Actor, Position, RunId, StreamId, ToolName};
use kiln_store::EventStore;
use kiln_store::queue::RunFeedMessage;
use serde::Serialize;
use serde_json::Value;
use std::sync::{Arc, OnceLock};

use futures::StreamExt;
use tokio::sync::broadcast;

use super::{ExecuteError, RunEngine};

/// A run as its stream says it is now.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunView {
    pub run_id: RunId,
    pub tool: ToolName,
    pub tool_version: u32,
    /// `queued`, `running`, `retry_scheduled`, `succeeded`, `failed`, `cancelled`, `timed_out`.
    pub status: &'static str,
    #[serde(skip)]
    pub state: RunStatus,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<RunError>,
    pub arguments: Value,
    pub actor: Actor,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_run: Option<RunId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<RunId>,
    pub requested_at: DateTime<Utc>,
    /// When the last event was recorded (the end, for an ended run).
    pub updated_at: DateTime<Utc>,
}

impl RunView {
    pub fn is_ended(&self) -> bool {
        self.state.is_terminal()
    }
}

/// Something that happened to a watched run.
#[derive(Debug, Clone, PartialEq)]
pub enum RunUpdate {
    Log {
        attempt: u32,
        level: String,
        message: String,
    },
    Progress {
        progress: f64,
        total: Option<f64>,
        message: Option<String>,
    },
    /// The run ended; nothing follows.
    Ended(Box<RunView>),
}

/// Updates about one run; see [`RunEngine::watch`].
#[derive(Debug)]
pub struct RunWatch {
    engine: RunEngine,
    run_id: RunId,
    feed: Option<broadcast::Receiver<RunFeedMessage>>,
    endings: broadcast::Receiver<RunId>,
    /// Look at the run's stream before waiting (first call, or after missing endings).
    check: bool,
    ended: bool,
}

/// Runs that ended, as one subscription to the log sees them; shared by every watcher of an
/// engine, so waiting costs nothing per watcher while other runs come and go.
pub(super) type Endings = Arc<OnceLock<broadcast::Sender<RunId>>>;

const TERMINAL: &[&str] = &["run.succeeded", "run.failed", "run.cancelled", "run.timed_out"];

impl RunEngine {
    /// The run as its stream says it is now; None if there is no such run.
    pub async fn view(&self, run_id: RunId) -> Result<Option<RunView>, ExecuteError> {
        let (events, state) = match self.load_run(run_id).await {
            Ok(loaded) => loaded,
            Err(ExecuteError::UnknownRun(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let (Some(first), Some(last)) = (events.first(), events.last()) else { return Ok(None) };
        Ok(Some(RunView {
            run_id,
            tool: state.request.tool.clone(),
            tool_version: state.request.tool_version,
            status: state.status.name(),
            attempts: state.attempts,
            output: state.output.clone(),
            error: state.error.clone(),
            arguments: state.request.arguments.clone(),
            actor: first.metadata.actor.clone(),
            parent_run: state.request.parent_run,
            replay_of: state.request.replay_of,
            requested_at: first.occurred_at,
            updated_at: last.occurred_at,
            state: state.status,
        }))
    }

    /// Watches a run from now on: its live logs and progress, then its end (at once if it has
    /// already ended).
    pub async fn watch(&self, run_id: RunId) -> Result<RunWatch, ExecuteError> {
        // Subscribe before looking, so nothing between the look and the wait is missed.
        let feed = Some(self.store.run_feed());
        let endings = self.endings();
        if self.store.stream_version(&StreamId::run(run_id)).await?.is_none() {
            return Err(ExecuteError::UnknownRun(run_id));
        }
        Ok(RunWatch { engine: self.clone(), run_id, feed, endings, check: true, ended: false })
    }

    fn endings(&self) -> broadcast::Receiver<RunId> {
        self.endings
            .get_or_init(|| {
                let (tx, _) = broadcast::channel(4096);
                // From a head known now: an ending after any watcher's first look is seen.
                let from = *self.store.head_watch().borrow();
                tokio::spawn(follow_endings(self.store.clone(), from, tx.clone()));
                tx
            })
            .subscribe()
    }
}

async fn follow_endings(store: kiln_store::Store, from: Position, tx: broadcast::Sender<RunId>) {
    let mut events = store.subscribe(from);
    while let Some(event) = events.next().await {
        match event {
            Ok(e) if e.stream_id.category() == "run" && TERMINAL.contains(&e.event_type.as_str()) => {
                if let Some(Ok(run_id)) = e.stream_id.as_str().strip_prefix("run-").map(str::parse) {
                    let _ = tx.send(run_id);
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "run watch subscription failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
}

impl RunWatch {
    pub fn run_id(&self) -> RunId {
        self.run_id
    }

    /// The next update; None after the run ended (or if the store closed).
    pub async fn next(&mut self) -> Option<RunUpdate> {
        if self.ended {
            return None;
        }
        loop {
            if std::mem::take(&mut self.check)
                && let Some(view) = self.engine.view(self.run_id).await.ok().flatten().filter(RunView::is_ended)
            {
                self.ended = true;
                return Some(RunUpdate::Ended(Box::new(view)));
            }
            let feed = async {
                match self.feed.as_mut() {
                    Some(feed) => feed.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Logs first: they were published before the end was appended.
                biased;
                message = feed => match message {
                    Ok(m) if m.run_id == self.run_id => {
                        if let Some(update) = parse_feed(&m.body) {
                            return Some(update);
                        }
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => self.feed = None,
                },
                ended = self.endings.recv() => match ended {
                    Ok(id) => self.check = id == self.run_id,
                    Err(broadcast::error::RecvError::Lagged(_)) => self.check = true,
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            }
        }
    }
}

fn parse_feed(body: &str) -> Option<RunUpdate> {
    let v: Value = serde_json::from_str(body).ok()?;
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    match v.get("type")?.as_str()? {
        "log" => Some(RunUpdate::Log {
            attempt: v.get("attempt").and_then(Value::as_u64).unwrap_or(0) as u32,
            level: text("level").unwrap_or_else(|| "info".to_owned()),
            message: text("message").unwrap_or_default(),
        }),
        "progress" => Some(RunUpdate::Progress {
            progress: v.get("progress").and_then(Value::as_f64)?,
            total: v.get("total").and_then(Value::as_f64),
            message: text("message"),
        }),
        _ => None,
    }
}
