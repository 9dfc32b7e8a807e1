//! The HTTP API: Segment-compatible ingestion, one-click unsubscribe,
//! health, metrics and admin endpoints. Handlers are thin; errors become
//! status codes in one place (`ApiError`).

mod admin;
mod ingest;
mod unsubscribe;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::config::Secret;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use crate::unsubscribe::Signer;

/// Largest request body (Segment allows 500 KB per batch).
pub const MAX_BODY_BYTES: usize = 512 * 1024;

/// What handlers share.
pub struct ApiState {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub signer: Signer,
    pub clock: Arc<dyn Clock>,
    pub write_key: Option<Secret>,
    pub admin_token: Option<Secret>,
    /// Woken when a run was requested (admin) so the run worker looks now.
    pub run_requested: Arc<Notify>,
    /// The scheduler's pulse, when a scheduler runs (`/readyz` checks it).
    pub heartbeat: Option<Arc<crate::heartbeat::Heartbeat>>,
}

/// Every way a request can fail, mapped to a status code in `into_response`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("not found")]
    NotFound,
    #[error("service unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Store(e) => {
                tracing::error!("Request failed on the database: {e}");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let message = match &self {
            Self::Store(_) => "internal error".to_owned(),
            other => other.to_string(),
        };
        let mut resp =
            (status, Json(json!({ "success": false, "error": message }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"engaged\""),
            );
        }
        resp
    }
}

/// Compares secrets in constant time.
pub(crate) fn secret_matches(expected: &Secret, given: &str) -> bool {
    expected.expose().as_bytes().ct_eq(given.as_bytes()).into()
}

/// The router with every endpoint.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/identify", post(ingest::identify))
        .route("/v1/track", post(ingest::track))
        .route("/v1/batch", post(ingest::batch))
        .route("/v1/import", post(ingest::batch))
        .route(
            "/unsubscribe/{token}",
            get(unsubscribe::show).post(unsubscribe::one_click),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/admin/escalations", get(admin::escalations))
        .route(
            "/admin/escalations/{id}/acknowledge",
            post(admin::acknowledge),
        )
        .route("/admin/escalations/{id}/resolve", post(admin::resolve))
        .route("/admin/runs", post(admin::trigger_run))
        .route(
            "/admin/suppressions",
            get(admin::suppressions).post(admin::suppress),
        )
        .route(
            "/admin/suppressions/{email}",
            axum::routing::delete(admin::unsuppress),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::decompression::RequestDecompressionLayer::new())
        .with_state(state)
}

async fn ready(State(state): State<Arc<ApiState>>) -> Result<&'static str, ApiError> {
    state
        .store
        .ping()
        .await
        .map_err(|e| ApiError::Unavailable(format!("database: {e}")))?;
    if let Some(stalled) = state
        .heartbeat
        .as_ref()
        .and_then(|h| h.readiness(std::time::Instant::now()).err())
    {
        return Err(ApiError::Unavailable(format!(
            "the scheduler has not ticked for {} s",
            stalled.as_secs()
        )));
    }
    Ok("ready\n")
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Result<impl IntoResponse, ApiError> {
    state
        .metrics
        .set_outbox(&state.store.outbox_counts().await?);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    Ok((headers, state.metrics.encode()))
}
