//! Segment HTTP Tracking API: `/v1/identify`, `/v1/track`, `/v1/batch`.
//! HTTP Basic auth with the write key as user name (or a `writeKey` body
//! field). Answers like Segment: `{"success": true}`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use base64::Engine as _;
use serde_json::{Value, json};

use super::{ApiError, ApiState, secret_matches};
use crate::ingest::segment::{Message, parse_message};
use crate::metrics::Metrics;

/// Most messages accepted in one batch.
const MAX_BATCH: usize = 2_000;

fn authorize(state: &ApiState, headers: &HeaderMap, body: &Value) -> Result<(), ApiError> {
    let Some(expected) = &state.write_key else {
        return Err(ApiError::Unauthorized(
            "ingestion is disabled: set http.write_key",
        ));
    };
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok())
        .map(|userpass| userpass.split(':').next().unwrap_or_default().to_owned());
    let from_body = body
        .get("writeKey")
        .and_then(Value::as_str)
        .map(str::to_owned);
    match from_header.or(from_body) {
        Some(key) if secret_matches(expected, &key) => Ok(()),
        Some(_) => Err(ApiError::Unauthorized("invalid write key")),
        None => Err(ApiError::Unauthorized(
            "missing write key (HTTP Basic user name or writeKey)",
        )),
    }
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))
}

/// Stores parsed messages: one customer upsert and one event insert.
async fn apply(state: &ApiState, messages: Vec<Message>) -> Result<(), ApiError> {
    let mut patches = Vec::new();
    let mut events = Vec::new();
    for m in messages {
        match m {
            Message::Identify { patch, warnings } => {
                for w in warnings {
                    tracing::warn!(customer = %patch.id, "identify: {w}");
                }
                state
                    .metrics
                    .ingested
                    .get_or_create(&Metrics::kind("identify"))
                    .inc();
                patches.push(patch);
            }
            Message::Track(e) => {
                state
                    .metrics
                    .ingested
                    .get_or_create(&Metrics::kind("track"))
                    .inc();
                events.push(e);
            }
            Message::Ignored(kind) => {
                state
                    .metrics
                    .ingested
                    .get_or_create(&Metrics::kind(&kind))
                    .inc();
            }
        }
    }
    if !patches.is_empty() {
        state.store.upsert_customers(&patches).await?;
    }
    if !events.is_empty() {
        state.store.insert_events(&events).await?;
    }
    Ok(())
}

async fn single(
    state: &ApiState,
    headers: &HeaderMap,
    body: &Bytes,
    kind: &str,
) -> Result<Json<Value>, ApiError> {
    let mut v = parse_body(body)?;
    authorize(state, headers, &v)?;
    if let Value::Object(m) = &mut v {
        m.entry("type")
            .or_insert_with(|| Value::String(kind.to_owned()));
    }
    let message = parse_message(&v, state.clock.now()).map_err(|e| {
        state.metrics.ingest_rejected.inc();
        ApiError::BadRequest(e)
    })?;
    apply(state, vec![message]).await?;
    Ok(Json(json!({ "success": true })))
}

pub(super) async fn identify(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    single(&state, &headers, &body, "identify").await
}

pub(super) async fn track(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    single(&state, &headers, &body, "track").await
}

/// `/v1/batch`: the good messages are kept; the answer lists the rejected
/// ones by index with the reason.
pub(super) async fn batch(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let v = parse_body(&body)?;
    authorize(&state, &headers, &v)?;
    let items = v
        .get("batch")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::BadRequest("missing \"batch\" array".into()))?;
    if items.len() > MAX_BATCH {
        return Err(ApiError::BadRequest(format!(
            "a batch holds at most {MAX_BATCH} messages"
        )));
    }
    let now = state.clock.now();
    let mut messages = Vec::with_capacity(items.len());
    let mut rejected = Vec::new();
    for (index, item) in items.iter().enumerate() {
        match parse_message(item, now) {
            Ok(m) => messages.push(m),
            Err(error) => {
                state.metrics.ingest_rejected.inc();
                rejected.push(json!({
                    "index": index,
                    "messageId": item.get("messageId"),
                    "error": error,
                }));
            }
        }
    }
    apply(&state, messages).await?;
    if rejected.is_empty() {
        Ok(Json(json!({ "success": true })))
    } else {
        Ok(Json(json!({ "success": true, "rejected": rejected })))
    }
}
