//! The live catalog: every tool's current definition and state, in memory, as of the log.
//!
//! It starts from the `tool_catalog` projection (rows and checkpoint read in one snapshot), then
//! follows the event subscription from that checkpoint and applies `tool.*` events itself. Every
//! applied change is broadcast, which is what sends `notifications/tools/list_changed` to every
//! session of this replica; another replica's change reaches it through the same log. A writer
//! waits with [`LiveCatalog::wait_for`] until its own change is applied, so a client that lists
//! right after creating a tool sees it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use kiln_proto::tool_state::Lifecycle;
use kiln_proto::{DomainEvent, Position, ToolDefinition, ToolName};
use kiln_store::projection::Stmt;
use kiln_store::{EventStore, Store, StoreError};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

/// One tool as listed.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveTool {
    pub lifecycle: Lifecycle,
    pub version: u32,
    pub code_sha256: String,
    pub definition: Option<Arc<ToolDefinition>>,
    pub created_by: String,
    pub updated_by: String,
    pub updated_at: String,
}

/// The catalog as of [`LiveCatalog::applied`].
#[derive(Debug, Clone)]
pub struct LiveCatalog {
    tools: Arc<RwLock<BTreeMap<ToolName, LiveTool>>>,
    applied: watch::Sender<Position>,
    /// Fires after each applied batch that changed a tool.
    changes: broadcast::Sender<Position>,
}

impl LiveCatalog {
    /// Loads the projection and starts following the log until `shutdown`.
    pub async fn start(store: Store, shutdown: CancellationToken) -> Result<LiveCatalog, StoreError> {
        let (tools, from) = load(&store).await?;
        let catalog = LiveCatalog {
            tools: Arc::new(RwLock::new(tools)),
            applied: watch::Sender::new(from),
            changes: broadcast::Sender::new(64),
        };
        let follower = catalog.clone();
        tokio::spawn(async move { follower.follow(store, from, shutdown).await });
        Ok(catalog)
    }

    /// Every tool (deleted ones included), by name.
    pub fn snapshot(&self) -> BTreeMap<ToolName, LiveTool> {
        self.tools.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn get(&self, name: &str) -> Option<LiveTool> {
        let name = ToolName::parse(name).ok()?;
        self.tools.read().unwrap_or_else(|e| e.into_inner()).get(&name).cloned()
    }

    /// A receiver woken after every change to the catalog.
    pub fn subscribe(&self) -> broadcast::Receiver<Position> {
        self.changes.subscribe()
    }

    /// The last log position applied.
    pub fn applied(&self) -> Position {
        *self.applied.borrow()
    }

    /// Waits (bounded) until the catalog has applied `position`.
    pub async fn wait_for(&self, position: Position) {
        let mut rx = self.applied.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|p| *p >= position)).await;
    }

    async fn follow(self, store: Store, from: Position, shutdown: CancellationToken) {
        let mut after = from;
        loop {
            let mut events = store.subscribe(after);
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    next = events.next() => next,
                };
                match next {
                    Some(Ok(e)) => {
                        after = e.position;
                        // Kiln's own hidden tools (code_eval) change nothing anyone lists.
                        let hidden = e.stream_id.as_str().starts_with("tool-kiln.");
                        let changed = e.stream_id.category() == "tool" && self.apply(&e) && !hidden;
                        self.applied.send_replace(e.position);
                        if changed {
                            let _ = self.changes.send(e.position);
                        }
                    }
                    Some(Err(err)) => {
                        tracing::warn!(error = %err, "live catalog: reading the log failed; retrying");
                        break;
                    }
                    None => return,
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Applies one tool event; whether it changed the catalog.
    fn apply(&self, e: &kiln_proto::RecordedEvent) -> bool {
        let decoded = match e.decode() {
            Ok(d) => d,
            Err(err) => {
                tracing::warn!(error = %err, "live catalog: skipping an event it cannot decode");
                return false;
            }
        };
        let actor = e.metadata.actor.to_string();
        let at = e.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let mut tools = self.tools.write().unwrap_or_else(|e| e.into_inner());
        let set_state = |tools: &mut BTreeMap<ToolName, LiveTool>, name: &ToolName, l: Lifecycle| {
            if let Some(t) = tools.get_mut(name) {
                t.lifecycle = l;
                t.updated_by.clone_from(&actor);
                t.updated_at.clone_from(&at);
            }
        };
        match decoded {
            DomainEvent::ToolCreated(c) => {
                let entry = tools.entry(c.name).or_insert_with(|| LiveTool {
                    lifecycle: Lifecycle::Enabled,
                    version: 0,
                    code_sha256: String::new(),
                    definition: None,
                    created_by: actor.clone(),
                    updated_by: actor.clone(),
                    updated_at: at.clone(),
                });
                entry.lifecycle = Lifecycle::Enabled;
                entry.created_by.clone_from(&actor);
            }
            DomainEvent::ToolVersionPublished(v) => {
                if let Some(t) = tools.get_mut(&v.name) {
                    t.version = v.version;
                    t.code_sha256 = v.code_sha256;
                    t.definition = Some(Arc::new(v.definition));
                    t.updated_by.clone_from(&actor);
                    t.updated_at.clone_from(&at);
                }
            }
            DomainEvent::ToolEnabled(x) => set_state(&mut tools, &x.name, Lifecycle::Enabled),
            DomainEvent::ToolDisabled(x) => set_state(&mut tools, &x.name, Lifecycle::Disabled),
            DomainEvent::ToolDeleted(x) => set_state(&mut tools, &x.name, Lifecycle::Deleted),
            _ => return false,
        }
        true
    }
}

/// The projection's rows and the position they reflect, read in one snapshot.
async fn load(store: &Store) -> Result<(BTreeMap<ToolName, LiveTool>, Position), StoreError> {
    let mut tx = store.begin_read().await?;
    let checkpoint = tx
        .fetch_int(
            &Stmt::new("SELECT position FROM kiln_projection_checkpoints WHERE name = $1"),
            &["tool_catalog".into()],
        )
        .await?;
    let Some(checkpoint) = checkpoint else {
        // No projection yet (a fresh database): the log is read from the start.
        tx.rollback().await?;
        return Ok((BTreeMap::new(), Position::START));
    };
    let rows = tx
        .fetch_text_rows(
            "SELECT name, state, CAST(current_version AS TEXT), code_sha256, definition, created_by, updated_by, updated_at
             FROM tool_catalog",
        )
        .await?;
    tx.rollback().await?;
    let mut tools = BTreeMap::new();
    for row in rows {
        let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let Ok(name) = ToolName::parse(col(0)) else { continue };
        let lifecycle = match col(1).as_str() {
            "disabled" => Lifecycle::Disabled,
            "deleted" => Lifecycle::Deleted,
            _ => Lifecycle::Enabled,
        };
        let definition = serde_json::from_str::<ToolDefinition>(&col(4)).ok().map(Arc::new);
        tools.insert(
            name,
            LiveTool {
                lifecycle,
                version: col(2).parse().unwrap_or(0),
                code_sha256: col(3),
                definition,
                created_by: col(5),
                updated_by: col(6),
                updated_at: col(7),
            },
        );
    }
    Ok((tools, Position(checkpoint as u64)))
}
