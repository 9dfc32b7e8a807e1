//! One-click unsubscribe (RFC 8058). The link in `List-Unsubscribe` is
//! `/unsubscribe/TOKEN`: a POST (what mail providers send, with body
//! `List-Unsubscribe=One-Click`) unsubscribes at once; a GET shows a small
//! page with a button that makes the same POST.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

use super::ApiState;

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title>\
         <meta name=\"viewport\" content=\"width=device-width\"></head>\
         <body style=\"font-family:sans-serif;max-width:32em;margin:3em auto\">\
         <h1>{title}</h1>{body}</body></html>"
    );
    (status, Html(html)).into_response()
}

fn invalid() -> Response {
    page(
        StatusCode::BAD_REQUEST,
        "This link is not valid",
        "<p>The unsubscribe link is incomplete or was changed. Please use the link from the email.</p>",
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn confirmation(state: &ApiState, token: &str) -> Response {
    let Some((_, email)) = state.signer.verify(token) else {
        return invalid();
    };
    page(
        StatusCode::OK,
        "Unsubscribe",
        &format!(
            "<p>Stop marketing email to <b>{}</b>?</p>\
             <form method=\"post\"><button type=\"submit\" name=\"List-Unsubscribe\" value=\"One-Click\">Unsubscribe</button></form>",
            escape(&email)
        ),
    )
}

pub(super) async fn show(
    State(state): State<Arc<ApiState>>,
    Path(token): Path<String>,
) -> Response {
    confirmation(&state, &token).await
}

pub(super) async fn one_click(
    State(state): State<Arc<ApiState>>,
    Path(token): Path<String>,
) -> Response {
    let Some((customer, email)) = state.signer.verify(&token) else {
        return invalid();
    };
    match state
        .store
        .suppress(&email, "unsubscribed", state.clock.now())
        .await
    {
        Ok(_) => {
            tracing::info!(customer, "A customer unsubscribed.");
            page(
                StatusCode::OK,
                "You are unsubscribed",
                &format!(
                    "<p><b>{}</b> will get no more marketing email from us.</p>",
                    escape(&email)
                ),
            )
        }
        Err(e) => {
            tracing::error!("Unsubscribe failed on the database: {e}");
            page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Please try again",
                "<p>We could not record this right now.</p>",
            )
        }
    }
}
