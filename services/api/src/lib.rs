//! Kiln's API service: the HTTP surface (health now; MCP over Streamable HTTP as it lands).
//!
//! `build` binds the listener and assembles the router; `App::run` serves until the shutdown
//! token is cancelled, then drains in-flight requests. Tests call the same two functions with a
//! listener on `127.0.0.1:0`.

mod health;
pub mod history;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use kiln_store::Store;
use kiln_store::projection::ProjectionRunner;
use kiln_worker::DenoSandbox;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the API needs to start.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
}

/// Shared state handed to every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Store,
    /// The projection runner of this process, for readiness details; None if it runs elsewhere.
    pub projections: Option<ProjectionRunner>,
    /// The tool sandbox of this process.
    pub sandbox: Option<Arc<DenoSandbox>>,
}

/// A bound, ready-to-run API server.
#[derive(Debug)]
pub struct App {
    listener: TcpListener,
    router: Router,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Binds the listener and builds the router.
pub async fn build(config: &ApiConfig, state: AppState) -> Result<App, ApiError> {
    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| ApiError::Bind { addr: config.listen, source })?;
    let router = Router::new().merge(health::routes()).merge(history::routes()).with_state(state);
    Ok(App { listener, router })
}

impl App {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Serves until `shutdown` is cancelled, then lets in-flight requests finish.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ApiError> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(ApiError::Serve)
    }
}
