//! Liveness and readiness probes. `/livez` answers while the process serves; `/readyz` only when
//! the store answers with the schema this binary expects, and reports projection progress.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::AppState;

pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/livez", get(livez)).route("/readyz", get(readyz))
}

async fn livez() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let projections = state.projections.as_ref().map(|p| json!(p.status())).unwrap_or(Value::Null);
    let sandbox = state.sandbox.as_ref().map_or(Value::Null, |s| {
        let stats = s.pool_stats();
        json!({
            "deno": s.config().deno.version(),
            "processes": stats.processes,
            "busy": stats.busy,
            "idle": stats.idle,
        })
    });
    match state.store.ready().await {
        Ok(true) => (
            StatusCode::OK,
            Json(json!({
                "status": "ready",
                "backend": state.store.backend(),
                "projections": projections,
                "sandbox": sandbox,
            })),
        ),
        Ok(false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"status": "not ready", "reason": "database schema is not migrated to this version; run `kiln migrate`"}),
            ),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "reason": format!("store unavailable: {e}")})),
        ),
    }
}
