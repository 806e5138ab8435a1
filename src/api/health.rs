//! Operations routes: `GET /health/live` (the process answers),
//! `GET /health/ready` (every configured backend answers; 503 naming the
//! one that does not) and `GET /metrics` (Prometheus text). A key is
//! required only with `auth.protect_metrics = true`.

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

async fn ready(State(state): State<AppState>) -> Response {
    match state.store.check().await {
        Ok(status) => Json(json!({
            "status": "ready",
            "backends": [{ "name": status.name, "status": "ok", "detail": status.detail }]
        }))
        .into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "not ready",
                "backends": [{ "name": format!("fhir ({})", state.store.backend_name()), "status": "failing", "detail": error.to_string() }]
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
