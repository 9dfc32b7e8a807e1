//! Webhook calls: a JSON POST; 2xx is delivered, 4xx (but 408/429) is
//! permanent, everything else is retried.

use serde_json::json;

use super::smtp::SendError;
use crate::config::WebhookConfig;
use crate::plan::WebhookPayload;
use crate::store::OutboxItem;

pub(super) async fn post(
    client: &reqwest::Client,
    hook: &WebhookConfig,
    item: &OutboxItem,
    p: &WebhookPayload,
) -> Result<String, SendError> {
    let body = json!({
        "webhook": p.name,
        "rule": p.rule,
        "customer_id": p.customer_id,
        "payload": p.payload,
        "idempotency_key": item.dedup_key,
    });
    let mut req = client
        .post(hook.url.expose())
        .header("Idempotency-Key", crate::plan::short_hash(&item.dedup_key))
        .json(&body);
    for (k, v) in &hook.headers {
        req = req.header(k.as_str(), v.expose());
    }
    let resp = req.send().await.map_err(|e| SendError {
        permanent: false,
        message: format!("webhook {:?}: {}", p.name, without_url(&e)),
    })?;
    let status = resp.status();
    if status.is_success() {
        return Ok(format!("HTTP {status}"));
    }
    let permanent = status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429;
    let text: String = resp
        .text()
        .await
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    Err(SendError {
        permanent,
        message: format!("webhook {:?} answered HTTP {status}: {text}", p.name),
    })
}

/// reqwest errors print the URL, which may carry a token; drop it.
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), "<webhook url>");
    }
    s
}
