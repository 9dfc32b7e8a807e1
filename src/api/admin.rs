//! Admin endpoints behind `Authorization: Bearer <http.admin_token>`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiState, secret_matches};

/// The schedule name under which admin-triggered runs are recorded.
pub const MANUAL_SCHEDULE: &str = "manual";

fn authorize(state: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.admin_token else {
        return Err(ApiError::Unauthorized(
            "the admin API is disabled: set http.admin_token",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::Unauthorized("missing bearer token"))?;
    if secret_matches(expected, given.trim()) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized("invalid bearer token"))
    }
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    #[serde(default)]
    all: bool,
}

pub(super) async fn escalations(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let list = state.store.escalations(!q.all).await?;
    Ok(Json(json!(list)))
}

pub(super) async fn acknowledge(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    if state
        .store
        .acknowledge_escalation(id, state.clock.now())
        .await?
    {
        Ok(Json(json!({ "id": id, "status": "acknowledged" })))
    } else {
        Err(ApiError::NotFound)
    }
}

pub(super) async fn resolve(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    if state
        .store
        .resolve_escalation(id, state.clock.now())
        .await?
    {
        Ok(Json(json!({ "id": id, "status": "resolved" })))
    } else {
        Err(ApiError::NotFound)
    }
}

#[derive(Deserialize)]
pub(super) struct SuppressBody {
    email: String,
    #[serde(default = "complained")]
    reason: String,
}

fn complained() -> String {
    "complained".into()
}

pub(super) async fn suppressions(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    Ok(Json(json!(state.store.suppressions().await?)))
}

/// Suppresses an address (e.g. a complaint from a provider's feedback loop).
pub(super) async fn suppress(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Json(body): Json<SuppressBody>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let email = crate::domain::Email::parse(&body.email)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let added = state
        .store
        .suppress(email.as_str(), &body.reason, state.clock.now())
        .await?;
    Ok(Json(
        json!({ "email": email, "suppressed": true, "new": added }),
    ))
}

pub(super) async fn unsuppress(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(email): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    if state.store.unsuppress(&email).await? {
        Ok(Json(json!({ "email": email, "suppressed": false })))
    } else {
        Err(ApiError::NotFound)
    }
}

/// Queues an evaluation run now (recorded in the schedule ledger as `manual`).
pub(super) async fn trigger_run(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    authorize(&state, &headers)?;
    // The ledger keys firings by (schedule, time): a second request in the
    // same millisecond is queued a millisecond later, not merged into the first.
    let mut at = state.clock.now();
    while !state
        .store
        .record_firing(
            MANUAL_SCHEDULE,
            at,
            "pending",
            Some("requested over the admin API"),
            at,
        )
        .await?
    {
        at += chrono::Duration::milliseconds(1);
    }
    state.run_requested.notify_one();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "queued": true, "at": at })),
    ))
}
