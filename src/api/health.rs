//! Operations routes: `GET /health/live` (the process answers),
//! `GET /health/ready` (every configured backend answers; 503 naming the
//! one that does not; the contact index's lag behind the store, which is
//! reported but does not make the connector unready: it is derived data,
//! and writes and sending do not wait for it) and `GET /metrics`
//! (Prometheus text). A key is required only with
//! `auth.protect_metrics = true`.

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;

pub fn routes(state: AppState) -> Router {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), protect))
        .with_state(state)
}

async fn protect(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.settings.auth.protect_metrics
        && let Err(error) = super::auth::check(&state, &request)
    {
        return error.into_response();
    }
    next.run(request).await
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// The index follower is "behind" when its last successful pass started
/// longer ago than this many follow intervals.
const BEHIND_AFTER_INTERVALS: u64 = 3;

/// The contact index's entry: `ok`, `behind` or `failing`, with
/// `lag_seconds` = time since the last successful follower pass started
/// (every store change before it is searchable).
async fn index_status(state: &AppState) -> serde_json::Value {
    let health = state.index_health.snapshot();
    let name = format!("index ({})", state.index.backend_name());
    let documents = state.index.count().await;
    let lag = health
        .current_as_of
        .map(|at| (chrono::Utc::now() - at).num_seconds().max(0));
    let allowed =
        (state.settings.index.follow_interval_secs.max(1) * BEHIND_AFTER_INTERVALS) as i64;
    let status = match (&health.last_error, lag, &documents) {
        (_, _, Err(_)) | (Some(_), _, _) => "failing",
        (None, Some(lag), _) if lag <= allowed => "ok",
        _ => "behind",
    };
    let detail = match (&documents, &health.last_error, lag) {
        (Err(e), _, _) => e.to_string(),
        (_, Some(error), _) => format!("the last update failed: {error}"),
        (Ok(n), None, Some(lag)) => format!("{n} people; current as of {lag} s ago"),
        (Ok(n), None, None) => format!("{n} people; not yet followed to the store"),
    };
    json!({ "name": name, "status": status, "detail": detail, "lag_seconds": lag })
}

async fn ready(State(state): State<AppState>) -> Response {
    let index = index_status(&state).await;
    match state.store.check().await {
        Ok(status) => Json(json!({
            "status": "ready",
            "backends": [{ "name": status.name, "status": "ok", "detail": status.detail }, index]
        }))
        .into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "not ready",
                "backends": [{ "name": format!("fhir ({})", state.store.backend_name()), "status": "failing", "detail": error.to_string() }, index]
            })),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
