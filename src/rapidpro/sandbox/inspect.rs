//! The inspection and control API under `/_sandbox/` (a path RapidPro does
//! not use; no authentication, no throttling, not recorded):
//! `GET/DELETE calls` (the API call log), `GET webhooks` (webhook POSTs made),
//! `GET state`, `POST reset`, `GET/POST knobs`, `POST contact_status`,
//! `POST inbound` (an inbound message, which may resume a run), `POST tick`
//! (process pending broadcasts and flow starts, send queued messages,
//! expire runs), `POST webhooks/deliver` (send the webhooks runs wait for;
//! `inbound` and `tick` do it too), `POST interrupt` (a contact's runs) and
//! `POST clock` (advance the sandbox's clock).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{KnobsUpdate, Sandbox};

pub async fn calls(State(sandbox): State<Sandbox>) -> Json<Value> {
    Json(json!({ "calls": sandbox.calls() }))
}

pub async fn clear_calls(State(sandbox): State<Sandbox>) -> StatusCode {
    sandbox.clear_calls();
    StatusCode::NO_CONTENT
}

pub async fn webhooks(State(sandbox): State<Sandbox>) -> Json<Value> {
    Json(json!({ "calls": sandbox.webhook_calls() }))
}

pub async fn state(State(sandbox): State<Sandbox>) -> Json<Value> {
    Json(sandbox.state())
}

pub async fn reset(State(sandbox): State<Sandbox>) -> StatusCode {
    sandbox.reset();
    StatusCode::NO_CONTENT
}

pub async fn knobs(State(sandbox): State<Sandbox>) -> Json<Value> {
    Json(json!(sandbox.knobs()))
}

pub async fn set_knobs(State(sandbox): State<Sandbox>, body: axum::body::Bytes) -> Response {
    let update: KnobsUpdate = match serde_json::from_slice(&body) {
        Ok(u) => u,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"detail": e.to_string()})),
            )
                .into_response();
        }
    };
    match sandbox.set_knobs(update) {
        Ok(knobs) => Json(json!(knobs)).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, Json(json!({ "detail": e }))).into_response(),
    }
}

/// `POST /_sandbox/contact_status` `{"contact": "<uuid>", "status": "stopped"}`.
pub async fn contact_status(State(sandbox): State<Sandbox>, body: axum::body::Bytes) -> Response {
    let parsed: Option<(String, String)> =
        serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
            Some((
                v.get("contact")?.as_str()?.to_string(),
                v.get("status")?.as_str()?.to_string(),
            ))
        });
    match parsed {
        Some((contact, status)) if sandbox.set_contact_status(&contact, &status) => {
            StatusCode::NO_CONTENT.into_response()
        }
        _ => (
            StatusCode::BAD_REQUEST,
            Json(json!({"detail": "expected {\"contact\": <uuid of a live contact>, \"status\": active|blocked|stopped|archived}"})),
        )
            .into_response(),
    }
}

/// `POST /_sandbox/tick`: processes pending broadcasts and flow starts and
/// sends queued messages; `{"broadcasts": n, "flow_starts": m, "messages": k}`.
pub async fn tick(State(sandbox): State<Sandbox>) -> Json<Value> {
    let report = sandbox.tick();
    let webhooks = sandbox.deliver_pending_webhooks().await.len();
    let mut body = json!(report);
    body["webhooks"] = json!(webhooks);
    Json(body)
}

/// `POST /_sandbox/webhooks/deliver`: sends the webhooks runs are waiting
/// for; `{"calls": [...]}`.
pub async fn deliver(State(sandbox): State<Sandbox>) -> Json<Value> {
    Json(json!({ "calls": sandbox.deliver_pending_webhooks().await }))
}

/// `POST /_sandbox/interrupt` `{"contact": "<uuid>"}`: interrupts the
/// contact's unfinished runs; `{"interrupted": n}`.
pub async fn interrupt(State(sandbox): State<Sandbox>, body: axum::body::Bytes) -> Response {
    let contact = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| Some(v.get("contact")?.as_str()?.to_string()));
    match contact {
        Some(c) => Json(json!({ "interrupted": sandbox.interrupt_contact(&c) })).into_response(),
        None => (
            StatusCode::BAD_REQUEST,
            Json(json!({"detail": "expected {\"contact\": <uuid>}"})),
        )
            .into_response(),
    }
}

/// `POST /_sandbox/clock` `{"advance_secs": n}`: moves the sandbox's clock
/// forward (run expiry happens at the next tick); `{"advanced_secs": n}`.
pub async fn advance_clock(State(sandbox): State<Sandbox>, body: axum::body::Bytes) -> Response {
    let secs = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("advance_secs")?.as_u64());
    match secs {
        Some(s) => {
            sandbox.advance_clock(std::time::Duration::from_secs(s));
            Json(json!({ "advanced_secs": s })).into_response()
        }
        None => (
            StatusCode::BAD_REQUEST,
            Json(json!({"detail": "expected {\"advance_secs\": <non-negative integer>}"})),
        )
            .into_response(),
    }
}

/// `POST /_sandbox/inbound` `{"urn": "tel:+250...", "text": "STOP"}`: an
/// inbound message; `{"contact": "<uuid>"}`.
pub async fn inbound(State(sandbox): State<Sandbox>, body: axum::body::Bytes) -> Response {
    let parsed: Option<(String, String)> =
        serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
            Some((
                v.get("urn")?.as_str()?.to_string(),
                v.get("text")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            ))
        });
    let Some((urn, text)) = parsed else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"detail": "expected {\"urn\": <urn>, \"text\": <text>}"})),
        )
            .into_response();
    };
    match sandbox.receive_message(&urn, &text) {
        Ok(contact) => {
            let webhooks = sandbox.deliver_pending_webhooks().await.len();
            Json(json!({ "contact": contact, "webhooks": webhooks })).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, Json(json!({ "detail": e }))).into_response(),
    }
}
