//! The FHIR R4 REST routes under `/fhir`: metadata, create, read, vread,
//! update (plain and conditional), delete, search (GET and `POST
//! _search`), history, batch/transaction at the base, and the operation
//! `CommunicationRequest/{id}/$cancel`. The same handlers serve both store
//! backends.

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::Value;

use super::AppState;
use crate::error::ApiError;
use crate::fhir::resource_types::{ensure_supported, validate_resource};
use crate::fhir::{FHIR_JSON, bundle, capability, format_instant, operation_outcome};
use crate::store::{
    HistoryRequest, SearchRequest, StoredResource, WriteKind, WriteOutcome, parse_etag,
};

pub fn routes(state: AppState) -> Router {
    routes_at(state, "/fhir")
}

/// The FHIR REST routes mounted at `prefix` (`/fhir`, and `/emNutt/fhir`
/// for emNutt's clients). Links in answers always use the `/fhir` base.
pub fn routes_at(state: AppState, prefix: &str) -> Router {
    let at = |path: &str| format!("{prefix}{path}");
    let protected = Router::new()
        .route(&at(""), post(transaction_or_batch))
        .route(&at("/"), post(transaction_or_batch))
        .route(&at("/_history"), get(system_history))
        .route(
            &at("/{resource_type}"),
            get(search_type).post(create).put(conditional_update),
        )
        .route(&at("/{resource_type}/_search"), post(search_post))
        .route(&at("/{resource_type}/_history"), get(type_history))
        .route(
            &at("/{resource_type}/{id}"),
            get(read).put(update).delete(delete),
        )
        .route(&at("/{resource_type}/{id}/_history"), get(instance_history))
        .route(&at("/CommunicationRequest/{id}/$cancel"), post(cancel))
        .route(
            &at("/{resource_type}/{id}/_history/{version_id}"),
            get(vread),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), nudge_jobs))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            super::auth::require_api_key,
        ));
    Router::new()
        .route(&at("/metadata"), get(metadata))
        .merge(protected)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// A successful write starts an index follower pass now instead of at the
/// next interval; a write of a person (or a Bundle, which may hold people)
/// starts a contact sync pass; a CommunicationRequest (or a Bundle) starts
/// a dispatcher pass.
async fn nudge_jobs(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let is_write = matches!(
        *request.method(),
        axum::http::Method::POST | axum::http::Method::PUT | axum::http::Method::DELETE
    );
    let path = request.uri().path();
    let segment = path
        .strip_prefix("/emNutt/fhir")
        .or_else(|| path.strip_prefix("/fhir"))
        .unwrap_or(path)
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("")
        .to_string();
    let response = next.run(request).await;
    if !is_write || !response.status().is_success() {
        return response;
    }
    let is_bundle = segment.is_empty();
    state.index_sync.nudge();
    if (is_bundle || crate::pipeline::contact::PERSON_TYPES.contains(&segment.as_str()))
        && let Some(nudge) = &state.contact_sync
    {
        nudge.nudge();
    }
    if is_bundle || segment == "CommunicationRequest" {
        for nudge in [&state.dispatch, &state.schedule].into_iter().flatten() {
            nudge.nudge();
        }
    }
    response
}

pub async fn unknown_route(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

// ---- request helpers ----------------------------------------------------

fn body_bytes(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::BadRequest(format!("the request body could not be read: {rejection}"))
        }
    })
}

fn json_body(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Value, ApiError> {
    let bytes = body_bytes(body, limit)?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest(
            "the request has no body; send a FHIR resource as application/fhir+json".into(),
        ));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn if_match(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get(header::IF_MATCH) {
        None => Ok(None),
        Some(value) => {
            let text = value
                .to_str()
                .map_err(|_| ApiError::BadRequest("If-Match is not valid text".into()))?;
            parse_etag(text).map(Some).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "If-Match '{text}' carries no version (use W/\"n\")"
                ))
            })
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Return {
    Minimal,
    Representation,
    OperationOutcome,
}

fn prefer_return(headers: &HeaderMap) -> Return {
    let prefer = header_str(headers, "prefer").unwrap_or("");
    for part in prefer.split([',', ';']) {
        match part.trim().replace(' ', "").as_str() {
            "return=minimal" => return Return::Minimal,
            "return=OperationOutcome" => return Return::OperationOutcome,
            "return=representation" => return Return::Representation,
            _ => {}
        }
    }
    Return::Representation
}

fn lenient(headers: &HeaderMap) -> bool {
    header_str(headers, "prefer").is_some_and(|p| p.replace(' ', "").contains("handling=lenient"))
}

pub(crate) fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

/// `path?params[&_cursor=cursor]`: the self and next links of a page.
fn page_link(path: &str, params: &[(String, String)], cursor: Option<&str>) -> String {
    let mut serializer = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        serializer.append_pair(k, v);
    }
    if let Some(cursor) = cursor {
        serializer.append_pair("_cursor", cursor);
    }
    let query = serializer.finish();
    if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    }
}

// ---- response helpers ---------------------------------------------------

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, serde_json::to_vec(body).unwrap_or_default()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

fn version_headers(response: &mut Response, stored: &StoredResource) {
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&stored.etag()) {
        headers.insert(header::ETAG, v);
    }
    let modified = httpdate::fmt_http_date(std::time::SystemTime::from(stored.last_updated));
    if let Ok(v) = HeaderValue::from_str(&modified) {
        headers.insert(header::LAST_MODIFIED, v);
    }
}

fn resource_response(status: StatusCode, stored: &StoredResource) -> Response {
    let mut response = json_response(status, &stored.resource);
    version_headers(&mut response, stored);
    response
}

fn write_response(state: &AppState, outcome: &WriteOutcome, headers: &HeaderMap) -> Response {
    let status = match outcome.kind {
        WriteKind::Created => StatusCode::CREATED,
        WriteKind::Updated | WriteKind::Unchanged => StatusCode::OK,
    };
    let stored = &outcome.stored;
    let mut response = match prefer_return(headers) {
        Return::Representation => json_response(status, &stored.resource),
        Return::Minimal => status.into_response(),
        Return::OperationOutcome => {
            let verb = match outcome.kind {
                WriteKind::Created => "created",
                WriteKind::Updated => "updated",
                WriteKind::Unchanged => "unchanged (an equal version exists)",
            };
            json_response(
                status,
                &operation_outcome(
                    "information",
                    "informational",
                    &format!("{} {verb}", stored.versioned_reference()),
                ),
            )
        }
    };
    version_headers(&mut response, stored);
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{}/{}",
        state.fhir_base,
        stored.versioned_reference()
    )) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

// ---- handlers -----------------------------------------------------------

async fn metadata(State(state): State<AppState>) -> Response {
    json_response(
        StatusCode::OK,
        &capability::capability_statement(&state.fhir_base),
    )
}

async fn create(
    State(state): State<AppState>,
    Path(resource_type): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    ensure_supported(&resource_type)?;
    let resource = json_body(body, state.settings.server.max_body_bytes)?;
    validate_resource(&resource, Some(&resource_type))?;
    let if_none_exist = header_str(&headers, "if-none-exist").map(str::to_string);
    let outcome = state
        .store
        .create(resource, if_none_exist.as_deref())
        .await?;
    Ok(write_response(&state, &outcome, &headers))
}

async fn update(
    State(state): State<AppState>,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    ensure_supported(&resource_type)?;
    let mut resource = json_body(body, state.settings.server.max_body_bytes)?;
    validate_resource(&resource, Some(&resource_type))?;
    match resource.get("id").and_then(Value::as_str) {
        Some(body_id) if body_id != id => {
            return Err(ApiError::BadRequest(format!(
                "the id '{body_id}' in the body does not match '{id}' in the URL"
            )));
        }
        Some(_) => {}
        None => resource["id"] = Value::String(id.clone()),
    }
    let outcome = state
        .store
        .update(
            &resource_type,
            &id,
            resource,
            if_match(&headers)?.as_deref(),
        )
        .await?;
    Ok(write_response(&state, &outcome, &headers))
}

async fn conditional_update(
    State(state): State<AppState>,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    ensure_supported(&resource_type)?;
    let query = query.filter(|q| !q.is_empty()).ok_or_else(|| {
        ApiError::MethodNotAllowed(format!("PUT /fhir/{resource_type} needs an id (PUT /fhir/{resource_type}/[id]) or a search query (conditional update)"))
    })?;
    let resource = json_body(body, state.settings.server.max_body_bytes)?;
    validate_resource(&resource, Some(&resource_type))?;
    let outcome = state
        .store
        .conditional_update(
            &resource_type,
            &query,
            resource,
            if_match(&headers)?.as_deref(),
        )
        .await?;
    Ok(write_response(&state, &outcome, &headers))
}

async fn read(
    State(state): State<AppState>,
    Path((resource_type, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let stored = state.store.read(&resource_type, &id).await?;
    Ok(resource_response(StatusCode::OK, &stored))
}

/// `POST CommunicationRequest/{id}/$cancel`: the request `revoked` (and a
/// schedule's unsent firings with it); 409 if it is already completed.
async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let stored = crate::jobs::schedule::cancel_request(state.store.as_ref(), &id).await?;
    Ok(resource_response(StatusCode::OK, &stored))
}

async fn vread(
    State(state): State<AppState>,
    Path((resource_type, id, version_id)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let stored = state.store.vread(&resource_type, &id, &version_id).await?;
    Ok(resource_response(StatusCode::OK, &stored))
}

async fn delete(
    State(state): State<AppState>,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let deleted = state
        .store
        .delete(&resource_type, &id, if_match(&headers)?.as_deref())
        .await?;
    if prefer_return(&headers) == Return::Minimal {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let message = match &deleted {
        Some(version) => format!("{resource_type}/{id} deleted (version {version})"),
        None => {
            format!("{resource_type}/{id} did not exist or was already deleted; nothing changed")
        }
    };
    let mut response = json_response(
        StatusCode::OK,
        &operation_outcome("information", "informational", &message),
    );
    if let Some(version) = deleted
        && let Ok(v) = HeaderValue::from_str(&format!("W/\"{version}\""))
    {
        response.headers_mut().insert(header::ETAG, v);
    }
    Ok(response)
}

pub(crate) async fn run_search(
    state: &AppState,
    resource_type: String,
    mut params: Vec<(String, String)>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    ensure_supported(&resource_type)?;
    let cursor = params
        .iter()
        .position(|(k, _)| k == "_cursor")
        .map(|i| params.remove(i).1);
    params.retain(|(k, _)| k != "_cursor");
    let request = SearchRequest {
        resource_type: resource_type.clone(),
        params: params.clone(),
        cursor: cursor.clone(),
        lenient: lenient(headers),
    };
    let page = state.store.search(request).await?;
    let path = format!("{}/{resource_type}", state.fhir_base);
    let link = |cursor: Option<&str>| page_link(&path, &params, cursor);
    let self_url = link(cursor.as_deref());
    let next_url = page.next_cursor.as_deref().map(|c| link(Some(c)));
    let outcome = (!page.ignored_params.is_empty()).then(|| {
        operation_outcome(
            "warning",
            "not-supported",
            &format!(
                "ignored search parameters: {}",
                page.ignored_params.join(", ")
            ),
        )
    });
    let body = bundle::searchset(
        &state.fhir_base,
        &page,
        &self_url,
        next_url.as_deref(),
        outcome,
    );
    Ok(json_response(StatusCode::OK, &body))
}

async fn search_type(
    State(state): State<AppState>,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    run_search(
        &state,
        resource_type,
        query_pairs(query.as_deref()),
        &headers,
    )
    .await
}

async fn search_post(
    State(state): State<AppState>,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body, state.settings.server.max_body_bytes)?;
    let mut params = query_pairs(query.as_deref());
    let form = std::str::from_utf8(&body)
        .map_err(|_| ApiError::BadRequest("the _search body is not UTF-8 form data".into()))?;
    params.extend(query_pairs(Some(form)));
    run_search(&state, resource_type, params, &headers).await
}

async fn history(
    state: &AppState,
    resource_type: Option<String>,
    id: Option<String>,
    query: Option<&str>,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(query);
    let mut request = HistoryRequest {
        resource_type: resource_type.clone(),
        id: id.clone(),
        ..Default::default()
    };
    for (key, value) in &pairs {
        match key.as_str() {
            "_since" => {
                let since = chrono::DateTime::parse_from_rfc3339(value).map_err(|_| {
                    ApiError::BadRequest(format!(
                        "_since={value} is not a FHIR instant (e.g. 2024-01-01T00:00:00Z)"
                    ))
                })?;
                request.since = Some(since.with_timezone(&chrono::Utc));
            }
            "_count" => {
                let n: usize = value.parse().map_err(|_| {
                    ApiError::BadRequest(format!(
                        "_count must be a non-negative integer, not '{value}'"
                    ))
                })?;
                request.count = Some(n);
            }
            "_cursor" => request.cursor = Some(value.clone()),
            "_format" | "_pretty" => {}
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown history parameter '{other}' (supported: _since, _count)"
                )));
            }
        }
    }
    let page = state.store.history(request).await?;
    let path = match (&resource_type, &id) {
        (Some(t), Some(i)) => format!("{}/{t}/{i}/_history", state.fhir_base),
        (Some(t), None) => format!("{}/{t}/_history", state.fhir_base),
        _ => format!("{}/_history", state.fhir_base),
    };
    let cursor = pairs
        .iter()
        .find(|(k, _)| k == "_cursor")
        .map(|(_, v)| v.clone());
    let base_pairs: Vec<(String, String)> =
        pairs.into_iter().filter(|(k, _)| k != "_cursor").collect();
    let link = |cursor: Option<&str>| page_link(&path, &base_pairs, cursor);
    let self_url = link(cursor.as_deref());
    let next_url = page.next_cursor.as_deref().map(|c| link(Some(c)));
    Ok(json_response(
        StatusCode::OK,
        &bundle::history(&state.fhir_base, &page, &self_url, next_url.as_deref()),
    ))
}

async fn system_history(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    history(&state, None, None, query.as_deref()).await
}

async fn type_history(
    State(state): State<AppState>,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    ensure_supported(&resource_type)?;
    history(&state, Some(resource_type), None, query.as_deref()).await
}

async fn instance_history(
    State(state): State<AppState>,
    Path((resource_type, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    ensure_supported(&resource_type)?;
    // 404 for an id that never existed; a deleted resource still has history.
    match state.store.read(&resource_type, &id).await {
        Ok(_) | Err(crate::store::StoreError::Gone { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    history(&state, Some(resource_type), Some(id), query.as_deref()).await
}

async fn transaction_or_batch(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bundle = json_body(body, state.settings.server.max_body_bytes)?;
    let mut response = state.store.process_bundle(bundle).await?;
    if let Some(object) = response.as_object_mut() {
        object.entry("meta").or_insert_with(
            || serde_json::json!({ "lastUpdated": format_instant(&chrono::Utc::now()) }),
        );
    }
    Ok(json_response(StatusCode::OK, &response))
}
