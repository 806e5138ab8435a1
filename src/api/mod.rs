//! The HTTP API (axum): the FHIR REST facade under `/fhir`, the contact
//! search under `/api/contacts`, health and metrics, authentication, request ids and request metrics. Handlers
//! validate, call the store and shape FHIR responses; every error goes
//! through `error.rs`.

pub mod auth;
pub mod contacts;
pub mod emnutt;
pub mod fhir;
pub mod health;
pub mod metrics;
mod negotiation;
pub mod webhooks;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request};
use axum::middleware;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::config::Settings;
use crate::store::SharedStore;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: SharedStore,
    pub settings: Arc<Settings>,
    /// Absolute base of the FHIR API, e.g. `http://127.0.0.1:8080/fhir`.
    pub fhir_base: String,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Starts a contact sync pass now (set when RapidPro is configured).
    pub contact_sync: Option<crate::jobs::runner::Nudge>,
    /// Starts a dispatcher pass now (set when RapidPro is configured).
    pub dispatch: Option<crate::jobs::runner::Nudge>,
    /// Starts a flow sync pass now (set when RapidPro is configured).
    pub flow_sync: Option<crate::jobs::runner::Nudge>,
    /// Starts a scheduler pass now (set when RapidPro is configured).
    pub schedule: Option<crate::jobs::runner::Nudge>,
    /// The contact index (`/api/contacts`).
    pub index: crate::index::SharedIndex,
    /// How far behind the store the index is (`/health/ready`).
    pub index_health: crate::jobs::index_sync::IndexHealth,
    /// Starts an index follower pass now (after any write through the API).
    pub index_sync: crate::jobs::runner::Nudge,
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The whole application router.
pub fn router(state: AppState) -> Router {
    let max_body = state.settings.server.max_body_bytes;
    let fhir = fhir::routes(state.clone())
        .merge(fhir::routes_at(state.clone(), "/emNutt/fhir"))
        .layer(middleware::from_fn(negotiation::check_media_types))
        .layer(DefaultBodyLimit::max(max_body));
    let emnutt = emnutt::routes(state.clone()).layer(DefaultBodyLimit::max(max_body));
    let ops = health::routes(state.clone());
    let contacts = contacts::routes(state.clone()).layer(DefaultBodyLimit::max(max_body));
    let rapidpro = webhooks::routes(state.clone()).layer(DefaultBodyLimit::max(max_body));
    Router::new()
        .merge(fhir)
        .merge(emnutt)
        .merge(rapidpro)
        .merge(contacts)
        .merge(ops)
        .fallback(fhir::unknown_route)
        .layer(middleware::from_fn(crate::error::outcome_for_every_error))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(crate::error::panic_response))
        .layer(middleware::from_fn(metrics::track_requests))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
                    let request_id = request.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
                    tracing::info_span!("request", request_id = %request_id, method = %request.method(), path = %request.uri().path())
                })
                .on_response(DefaultOnResponse::new().level(Level::INFO)))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID)),
        )
}
