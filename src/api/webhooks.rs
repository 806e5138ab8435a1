//! `POST /rapidpro/webhook`: flow results pushed by RapidPro (the flow
//! editor's Call Webhook body, its legacy form, or a resthook payload;
//! docs/flow-results.md).
//!
//! Authenticated by `auth.webhook_token` (`Authorization: Token <t>` or
//! `?token=<t>`, constant-time; 401 otherwise; 503 when no token is set).
//! Every body is stored as a `Basic` event *before* the answer
//! (`pipeline::webhook_event`); the same event twice is one resource and is
//! recorded once. An understood event with a run uuid is recorded at once
//! as the run's QuestionnaireResponse (200); one without a run uuid is kept
//! `deferred` for the run poll (202); if recording fails the event stays
//! `received` and the run poll retries it (202). A body that cannot be
//! understood is kept as `rejected` with the reason and answered 400.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chrono::Utc;
use serde_json::{Value, json};

use super::AppState;
use super::auth::key_matches;
use crate::error::ApiError;
use crate::pipeline::flow_results::RunRecord;
use crate::pipeline::webhook_event::{self, BatchWriter, State as EventState};
use crate::store::StoreError;

#[derive(Clone)]
struct WebhookState {
    app: AppState,
    /// The group-commit writer, started by the first event (inside the
    /// runtime that serves it), so building the router needs no runtime.
    writer: Arc<OnceLock<BatchWriter>>,
}

/// The webhook route.
pub fn routes(state: AppState) -> Router {
    Router::new()
        .route("/rapidpro/webhook", post(receive))
        .with_state(WebhookState {
            app: state,
            writer: Arc::default(),
        })
}

/// The token a request presents: `Authorization: Token <t>` (RapidPro's
/// own scheme; `Bearer` is accepted too) or `?token=<t>`.
fn presented_token(headers: &HeaderMap, query: &HashMap<String, String>) -> Option<String> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        && let Some((scheme, token)) = value.trim().split_once(' ')
        && (scheme.eq_ignore_ascii_case("token") || scheme.eq_ignore_ascii_case("bearer"))
    {
        return Some(token.trim().to_string());
    }
    query.get("token").cloned()
}

fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Result<(), ApiError> {
    let Some(expected) = &state.settings.auth.webhook_token else {
        return Err(ApiError::ServiceUnavailable(
            "the RapidPro webhook is disabled: set auth.webhook_token (MHERO__AUTH__WEBHOOK_TOKEN)"
                .into(),
        ));
    };
    match presented_token(headers, query) {
        Some(token) if key_matches(std::slice::from_ref(expected), &token) => Ok(()),
        Some(_) => Err(ApiError::Unauthorized("the webhook token is not valid".into())),
        None => Err(ApiError::Unauthorized(
            "authentication required: send Authorization: Token <webhook token> or ?token=<webhook token>".into(),
        )),
    }
}

async fn receive(
    State(state): State<WebhookState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let writer = state
        .writer
        .get_or_init(|| BatchWriter::spawn(state.app.store.clone()));
    match handle(&state.app, writer, &headers, &query, &body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn handle(
    state: &AppState,
    writer: &BatchWriter,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: &Bytes,
) -> Result<Response, ApiError> {
    authenticate(state, headers, query)?;
    let received = Utc::now();
    let raw = String::from_utf8_lossy(body);
    let understood = serde_json::from_slice::<Value>(body)
        .map_err(|e| format!("the body is not valid JSON: {e}"))
        .and_then(|json| RunRecord::from_webhook(&json, received).map(|r| (json, r)));
    let (key, initial, reason) = match &understood {
        Ok((json, record)) => (
            webhook_event::event_key(json, record),
            if record.run_uuid.is_some() {
                EventState::Received
            } else {
                EventState::Deferred
            },
            None,
        ),
        Err(reason) => (
            webhook_event::raw_key(body),
            EventState::Rejected,
            Some(reason.as_str()),
        ),
    };
    let store = state.store.as_ref();
    let id = webhook_event::event_id(&key);
    let existing = match store.read("Basic", &id).await {
        Ok(existing) => Some(existing),
        Err(StoreError::NotFound { .. }) | Err(StoreError::Gone { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let (current, duplicate) = match (existing, &understood) {
        (Some(existing), _) => (
            webhook_event::state_of(&existing.resource).unwrap_or(initial),
            true,
        ),
        (None, Ok((_, record))) if initial == EventState::Received => (
            webhook_event::store_and_record(store, Some(writer), &key, &raw, received, record)
                .await?,
            false,
        ),
        (None, _) => {
            let event = webhook_event::event_resource(&key, &raw, received, initial, reason);
            store.update("Basic", &id, event, None).await?;
            (initial, false)
        }
    };
    if let Some(reason) = reason {
        tracing::warn!(event = %id, "RapidPro webhook body refused: {}", crate::telemetry::redact_phones(reason));
        return Err(ApiError::BadRequest(format!(
            "{reason} (kept as Basic/{id} for inspection)"
        )));
    }
    let status = if current == EventState::Processed || duplicate {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((
        status,
        axum::Json(json!({
            "event": format!("Basic/{id}"),
            "state": current.code(),
            "duplicate": duplicate,
        })),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_the_header_or_the_query() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Token abc".parse().unwrap());
        assert_eq!(
            presented_token(&headers, &HashMap::new()).as_deref(),
            Some("abc")
        );
        let query = HashMap::from([("token".to_string(), "xyz".to_string())]);
        assert_eq!(
            presented_token(&HeaderMap::new(), &query).as_deref(),
            Some("xyz")
        );
        assert_eq!(presented_token(&HeaderMap::new(), &HashMap::new()), None);
    }
}
