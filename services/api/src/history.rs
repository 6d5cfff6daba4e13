//! Run history and audit over HTTP, for dashboards and log shippers:
//!
//! - `GET /v1/runs?tool=&status=&actor=&since=&until=&cursor=&limit=`: a page of runs, newest
//!   first, with `nextCursor` to continue;
//! - `GET /v1/runs/{id}`: one run with its arguments, children, replays and timeline;
//! - `GET /v1/audit.jsonl?since=&until=&actor=&tool=&action=&after=`: the audit log as JSON
//!   lines (schema in docs/history.md), streamed page by page; needs scope `audit:read`.
//!
//! Authentication and scopes (`runs:read`, `audit:read`) are checked by the API's gate in
//! front of these routes (`auth::http`). Everything is read from the read models this process's projection runner keeps current
//! (and, for a run's timeline, from the log itself). Bad filters are 400 with a message saying
//! what was wrong.

use std::str::FromStr;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use kiln_proto::{RunId, ToolName};
use kiln_store::queries::{self, QueryError, audit, runs};
use serde::Deserialize;
use serde_json::json;

use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/runs", get(list_runs))
        .route("/v1/runs/{id}", get(get_run))
        .route("/v1/audit.jsonl", get(export_audit))
}

#[derive(Debug)]
enum HistoryError {
    BadRequest(String),
    NotFound(String),
    Internal(String),
}

impl From<QueryError> for HistoryError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::Invalid(m) => Self::BadRequest(m),
            other => {
                tracing::error!(error = %other, "history query failed");
                Self::Internal(other.to_string())
            }
        }
    }
}

impl IntoResponse for HistoryError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            Self::NotFound(m) => (StatusCode::NOT_FOUND, m),
            Self::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, m),
        };
        (status, Json(json!({"error": message}))).into_response()
    }
}

fn bad(e: impl std::fmt::Display) -> HistoryError {
    HistoryError::BadRequest(e.to_string())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    tool: Option<String>,
    status: Option<String>,
    actor: Option<String>,
    since: Option<String>,
    until: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

async fn list_runs(
    State(state): State<AppState>,
    Query(q): Query<RunsQuery>,
) -> Result<Json<runs::RunPage>, HistoryError> {
    let filter = runs::RunFilter {
        tool: q.tool.map(ToolName::parse).transpose().map_err(bad)?,
        status: q.status.as_deref().map(str::parse).transpose()?,
        actor: q.actor,
        since: q.since.as_deref().map(queries::parse_time).transpose()?,
        until: q.until.as_deref().map(queries::parse_time).transpose()?,
        ..runs::RunFilter::default()
    };
    let page = runs::list(&state.store, &filter, q.cursor.as_deref(), q.limit.unwrap_or(50)).await?;
    Ok(Json(page))
}

async fn get_run(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, HistoryError> {
    let id = RunId::from_str(&id).map_err(|_| bad(format!("invalid run id {id:?}: expected a UUID")))?;
    let detail = runs::get(&state.store, id).await?.ok_or_else(|| HistoryError::NotFound(format!("no run {id}")))?;
    let timeline = runs::timeline(&state.store, id).await?;
    let mut body = serde_json::to_value(&detail).map_err(|e| HistoryError::Internal(e.to_string()))?;
    body["timeline"] = serde_json::to_value(&timeline).map_err(|e| HistoryError::Internal(e.to_string()))?;
    Ok(Json(body).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    since: Option<String>,
    until: Option<String>,
    actor: Option<String>,
    tool: Option<String>,
    action: Option<String>,
    after: Option<u64>,
}

async fn export_audit(State(state): State<AppState>, Query(q): Query<AuditQuery>) -> Result<Response, HistoryError> {
    let filter = audit::AuditFilter {
        since: q.since.as_deref().map(queries::parse_time).transpose()?,
        until: q.until.as_deref().map(queries::parse_time).transpose()?,
        actor: q.actor,
        tool: q.tool,
        action: q.action.as_deref().map(str::parse).transpose()?,
        after: q.after,
    };
    let lines = audit::export(state.store.clone(), filter, audit::PAGE);
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(lines)).into_response())
}
