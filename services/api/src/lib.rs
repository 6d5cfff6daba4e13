//! Kiln's API service: MCP over Streamable HTTP at `/mcp` (and over stdio, see [`serve_stdio`]),
//! the protected-resource metadata document, and the health probes.
//!
//! `build` binds the listener and assembles the router; `App::run` serves until the shutdown
//! token is cancelled, then drains in-flight requests. Tests call the same two functions with a
//! listener on `127.0.0.1:0`. Run history and audit endpoints live in their own module.

pub mod auth;
pub mod catalog;
mod health;
pub mod history;
pub mod limits;
pub mod live;
pub mod mcp;
pub mod runs;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::get;
use axum::serve::ListenerExt;
use kiln_store::Store;
use kiln_store::projection::ProjectionRunner;
use kiln_worker::queue::LocalWorker;
use kiln_worker::runs::RunEngine;
use kiln_worker::{DenoSandbox, Sandbox};
use rmcp::ServiceExt;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use auth::http::AuthSettings;
pub use limits::LimitSettings;

use crate::auth::Principal;
use crate::auth::http::Gate;
use crate::catalog::Catalog;
use crate::live::LiveCatalog;
use crate::mcp::{KilnMcp, Services};

/// What the API needs to start.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub mcp: McpSettings,
    pub auth: AuthSettings,
    pub limits: LimitSettings,
}

impl ApiConfig {
    /// Defaults (loopback, no auth) on this address.
    pub fn on(listen: SocketAddr) -> Self {
        Self { listen, mcp: McpSettings::default(), auth: AuthSettings::default(), limits: LimitSettings::default() }
    }
}

/// The MCP endpoint's settings (from `[mcp]`).
#[derive(Debug, Clone)]
pub struct McpSettings {
    /// How long `tools/call` waits for a run before answering with a run handle.
    pub call_budget: Duration,
    /// Accepted `Host` headers (DNS rebinding protection); default: loopback names.
    pub allowed_hosts: Vec<String>,
    /// Accepted browser `Origin`s; a request with any other Origin is refused.
    pub allowed_origins: Vec<String>,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
}

impl Default for McpSettings {
    fn default() -> Self {
        Self {
            call_budget: Duration::from_secs(25),
            allowed_hosts: vec!["localhost".into(), "127.0.0.1".into(), "::1".into(), "[::1]".into()],
            allowed_origins: vec!["http://localhost:*".into(), "http://127.0.0.1:*".into(), "http://[::1]:*".into()],
            max_body_bytes: 4 << 20,
        }
    }
}

/// Shared state handed to every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Store,
    /// The projection runner of this process, for readiness details; None if it runs elsewhere.
    pub projections: Option<ProjectionRunner>,
    /// The tool sandbox of this process.
    pub sandbox: Option<Arc<DenoSandbox>>,
    /// This process's queue worker, if it has one: runs requested here are handed to it directly
    /// while it has a slot free.
    pub local_worker: Option<LocalWorker>,
}

/// A bound, ready-to-run API server.
#[derive(Debug)]
pub struct App {
    listener: TcpListener,
    router: Router,
    /// Stops the live catalog's subscription and MCP sessions when the server stops.
    background: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("server failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error("cannot load the tool catalog: {0}")]
    Catalog(#[source] kiln_store::StoreError),
    #[error("auth.jwt: {0}")]
    Auth(#[source] auth::jwt::JwtError),
    #[error("MCP over stdio failed: {0}")]
    Stdio(String),
}

/// The MCP services of this process: catalog, live catalog, run engine.
async fn services(state: &AppState, mcp: &McpSettings, shutdown: CancellationToken) -> Result<Arc<Services>, ApiError> {
    let sandbox: Option<Arc<dyn Sandbox>> = state.sandbox.clone().map(|s| s as Arc<dyn Sandbox>);
    let policy = state.sandbox.as_ref().map(|s| s.config().policy.clone()).unwrap_or_default();
    let engine = sandbox.clone().map(|s| {
        let engine = RunEngine::new(state.store.clone(), s, format!("api-{}", std::process::id()));
        match state.local_worker.clone() {
            Some(local) => engine.with_local_worker(local),
            None => engine,
        }
    });
    let live = LiveCatalog::start(state.store.clone(), shutdown).await.map_err(ApiError::Catalog)?;
    Ok(Arc::new(Services {
        store: state.store.clone(),
        catalog: Catalog::new(state.store.clone(), sandbox, policy),
        live,
        engine,
        call_budget: mcp.call_budget,
    }))
}

/// Binds the listener and builds the router.
pub async fn build(config: &ApiConfig, state: AppState) -> Result<App, ApiError> {
    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| ApiError::Bind { addr: config.listen, source })?;
    let background = CancellationToken::new();
    let services = services(&state, &config.mcp, background.clone()).await?;
    let mut http = StreamableHttpServerConfig::default()
        .with_cancellation_token(background.child_token())
        .with_allowed_hosts(config.mcp.allowed_hosts.clone())
        .with_allowed_origins(config.mcp.allowed_origins.clone())
        .enforce_origin_validation()
        .with_max_request_body_bytes(config.mcp.max_body_bytes);
    http.sse_keep_alive = Some(Duration::from_secs(15));
    let mcp = StreamableHttpService::new(
        move || Ok(KilnMcp::new(services.clone(), None)),
        Arc::new(LocalSessionManager::default()),
        http,
    );
    let gate = Arc::new(
        Gate::new(
            config.auth.clone(),
            state.store.clone(),
            limits::Limiter::new(config.limits, state.store.clone()),
            config.mcp.max_body_bytes,
        )
        .map_err(ApiError::Auth)?,
    );
    let metadata = Router::new()
        .route("/.well-known/oauth-protected-resource", get(resource_metadata))
        .route("/.well-known/oauth-protected-resource/mcp", get(resource_metadata))
        .with_state(gate.clone());
    // Run history and audit sit behind the same gate as MCP (scopes runs:read, audit:read).
    let history = history::routes().with_state(state.clone());
    let router = Router::new()
        .nest_service("/mcp", mcp)
        .merge(history)
        .layer(axum::middleware::from_fn_with_state(gate, auth::http::gate))
        .merge(metadata)
        .merge(health::routes().with_state(state));
    Ok(App { listener, router, background })
}

async fn resource_metadata(State(gate): State<Arc<Gate>>, headers: HeaderMap) -> axum::Json<serde_json::Value> {
    axum::Json(gate.resource_metadata(&headers))
}

impl App {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Serves until `shutdown` is cancelled, then lets in-flight requests finish.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ApiError> {
        let background = self.background.clone();
        let stop = shutdown.clone();
        let sessions = self.background.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            // Open SSE streams would keep graceful shutdown waiting forever.
            sessions.cancel();
        });
        // Responses are small SSE frames written one by one: without TCP_NODELAY, Nagle's
        // algorithm and the client's delayed ACK add ~40 ms to every call.
        let listener = self.listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        let served = axum::serve(listener, self.router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(ApiError::Serve);
        background.cancel();
        served
    }
}

/// Serves MCP on stdin/stdout as the local user until the client disconnects or `shutdown`.
pub async fn serve_stdio(state: AppState, mcp: &McpSettings, shutdown: CancellationToken) -> Result<(), ApiError> {
    let services = services(&state, mcp, shutdown.clone()).await?;
    let handler = KilnMcp::new(services, Some(Principal::local()));
    let running = handler
        .serve_with_ct(rmcp::transport::stdio(), shutdown.child_token())
        .await
        .map_err(|e| ApiError::Stdio(e.to_string()))?;
    let result = running.waiting().await.map_err(|e| ApiError::Stdio(e.to_string()));
    shutdown.cancel();
    result.map(|_| ())
}
