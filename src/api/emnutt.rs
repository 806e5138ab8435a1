//! emNutt-compatible routes, so that iHRIS (and anything else written for
//! emNutt) works unchanged against the connector (reference `emnutt.md`
//! §2.1, §2.2 and §2.5). Same API-key auth as `/fhir`; errors are
//! OperationOutcomes (emNutt answered plain text or crashed).
//!
//! - `POST /emNutt/fhir/CommunicationRequest`: validated and stored like
//!   `POST /fhir/CommunicationRequest`; answers `{"status":"Processing",
//!   "reqID":…}`. The `parentReqId` tag becomes the `groupIdentifier`.
//! - `GET /emNutt/fhir/getProgress?requestIDs=<json>`: progress derived from
//!   FHIR (the request and its outbox), in the shape iHRIS's widget reads;
//!   `clearProgress` has nothing to clear and answers 200.
//! - `POST /emNutt/fhir/cancelMessageSchedule`: `$cancel` for each named
//!   request (schedule parents stop firing; unsent firings are revoked).
//! - `PUT /emNutt/optout` and `/emNutt/undoOptout`: set or remove the
//!   opt-out tag.
//! - `GET|POST /emNutt/fhir/...`: the FHIR API itself (mounted by
//!   [`super::fhir::routes_at`]), not an open proxy to another server.
//! - `GET /sync/<job>`: starts a pass of the matching job.

use std::collections::HashMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::{Value, json};

use super::AppState;
use crate::error::ApiError;
use crate::pipeline::contact::with_opt_out;
use crate::pipeline::outbox::{self, DispatchState};
use crate::pipeline::request::{Delivery, MessageRequest};
use crate::store::{StoreError, escape_search_value, modify_resource, search_all};

/// The tag system iHRIS uses to group the chunks of one submission.
pub const PARENT_REQUEST_TAG: &str = "parentReqId";
/// Where the `parentReqId` goes: `CommunicationRequest.groupIdentifier`.
pub const PARENT_REQUEST_SYSTEM: &str = "http://mhero.org/fhir/identifier/parent-request";

pub fn routes(state: AppState) -> Router {
    Router::new()
        .route(
            "/emNutt/fhir/CommunicationRequest",
            post(create_request).get(search_requests),
        )
        .route("/emNutt/fhir/getProgress", get(get_progress))
        .route("/emNutt/fhir/clearProgress", get(clear_progress))
        .route("/emNutt/fhir/cancelMessageSchedule", post(cancel_schedules))
        .route("/emNutt/optout", put(opt_out))
        .route("/emNutt/undoOptout", put(undo_opt_out))
        .route("/sync/{job}", get(sync_trigger))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            super::auth::require_api_key,
        ))
        .with_state(state)
}

fn json_reply(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, serde_json::to_vec(body).unwrap_or_default()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn json_body(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Value, ApiError> {
    let bytes = body.map_err(|e| ApiError::BadRequest(format!("cannot read the body: {e}")))?;
    if bytes.len() > limit {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))
}

/// iHRIS's submission: stored as a CommunicationRequest (with the same
/// checks as `/fhir`), then dispatched by the job.
async fn create_request(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mut request = json_body(body, state.settings.server.max_body_bytes)?;
    if request.get("resourceType").and_then(Value::as_str) != Some("CommunicationRequest") {
        return Err(ApiError::BadRequest(
            "the body must be a CommunicationRequest".into(),
        ));
    }
    // emNutt gave every submission a fresh id; so do we (the store does).
    if let Some(object) = request.as_object_mut() {
        object.remove("id");
        if !object.contains_key("status") {
            object.insert("status".into(), json!("active"));
        }
    }
    let parent = take_parent_tag(&mut request);
    if let Some(parent) = parent {
        request["groupIdentifier"] = json!({ "system": PARENT_REQUEST_SYSTEM, "value": parent });
    }
    let outcome = state.store.create(request, None).await?;
    if let Some(nudge) = &state.dispatch {
        nudge.nudge();
    }
    Ok(json_reply(
        StatusCode::OK,
        &json!({ "status": "Processing", "reqID": outcome.stored.id }),
    ))
}

/// `GET /emNutt/fhir/CommunicationRequest?...`: the FHIR search.
async fn search_requests(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    super::fhir::run_search(
        &state,
        "CommunicationRequest".to_string(),
        super::fhir::query_pairs(query.as_deref()),
        &headers,
    )
    .await
}

/// Removes the `parentReqId` tag and returns its code.
fn take_parent_tag(request: &mut Value) -> Option<String> {
    let tags = request.pointer_mut("/meta/tag")?.as_array_mut()?;
    let position = tags
        .iter()
        .position(|t| t.get("system").and_then(Value::as_str) == Some(PARENT_REQUEST_TAG))?;
    let tag = tags.remove(position);
    if tags.is_empty()
        && let Some(meta) = request.get_mut("meta").and_then(Value::as_object_mut)
    {
        meta.remove("tag");
        if meta.is_empty() {
            request.as_object_mut().map(|r| r.remove("meta"));
        }
    }
    tag.get("code").and_then(Value::as_str).map(str::to_string)
}

#[derive(serde::Deserialize)]
struct ProgressQuery {
    #[serde(rename = "requestIDs")]
    request_ids: Option<String>,
}

/// `{"childrenReqIDs": [...], "parentReqId": "..."}`.
fn requested_ids(query: &ProgressQuery) -> Result<Vec<String>, ApiError> {
    let raw = query.request_ids.as_deref().ok_or_else(|| {
        ApiError::BadRequest(
            "requestIDs is missing: give {\"childrenReqIDs\": [...]} as JSON".into(),
        )
    })?;
    let parsed: Value = serde_json::from_str(raw)
        .map_err(|e| ApiError::BadRequest(format!("requestIDs is not valid JSON: {e}")))?;
    let children = parsed
        .get("childrenReqIDs")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::BadRequest("requestIDs has no childrenReqIDs list".into()))?;
    children
        .iter()
        .map(|c| {
            c.as_str()
                .map(|s| s.trim_start_matches("CommunicationRequest/").to_string())
                .ok_or_else(|| ApiError::BadRequest("childrenReqIDs must hold strings".into()))
        })
        .collect()
}

async fn get_progress(
    State(state): State<AppState>,
    Query(query): Query<ProgressQuery>,
) -> Result<Response, ApiError> {
    let ids = requested_ids(&query)?;
    let mut answers = Vec::with_capacity(ids.len());
    for id in ids {
        answers.push(progress(&state, &id).await?);
    }
    Ok(json_reply(StatusCode::OK, &Value::Array(answers)))
}

async fn clear_progress(Query(query): Query<ProgressQuery>) -> Result<Response, ApiError> {
    // Progress is derived from FHIR on every call: nothing is kept to clear.
    requested_ids(&query)?;
    Ok(StatusCode::OK.into_response())
}

/// iHRIS's progress JSON for one request, or `null` if unknown.
async fn progress(state: &AppState, id: &str) -> Result<Value, ApiError> {
    let request = match state.store.read("CommunicationRequest", id).await {
        Ok(stored) => stored.resource,
        Err(StoreError::NotFound { .. }) | Err(StoreError::Gone { .. }) => return Ok(Value::Null),
        Err(other) => return Err(other.into()),
    };
    let entries = search_all(
        state.store.as_ref(),
        "Communication",
        vec![
            (
                "based-on".into(),
                format!("CommunicationRequest/{}", escape_search_value(id)),
            ),
            ("_count".into(), "1000".into()),
        ],
    )
    .await?;
    let parsed = MessageRequest::parse(&request).ok();
    let dispatch = DispatchState::read(&request);
    let status = request["status"].as_str().unwrap_or("");
    let done = matches!(status, "completed" | "revoked")
        || matches!(
            dispatch.phase.as_str(),
            "dispatched" | "cancelled" | "refused"
        );
    let total = if entries.is_empty() {
        request["recipient"].as_array().map_or(0, Vec::len)
    } else {
        entries.len()
    };
    let processed = entries
        .iter()
        .filter(|e| e.resource["status"] != "preparation")
        .count();
    // One counter per message text / flow, as emNutt keyed them.
    let mut send_status: serde_json::Map<String, Value> = serde_json::Map::new();
    for delivery in parsed.iter().flat_map(|p| p.deliveries.iter()) {
        let key = delivery.key();
        let label = match delivery {
            Delivery::Message(text) => text.base().to_string(),
            Delivery::Flow { uuid, .. } => uuid.clone(),
        };
        let (mut success, mut failed, mut ignored) = (0, 0, 0);
        let mut descriptions = serde_json::Map::new();
        for entry in entries
            .iter()
            .filter(|e| outbox::delivery_key(&e.resource).as_deref() == Some(key.as_str()))
        {
            let reason = entry.resource["statusReason"]["text"]
                .as_str()
                .unwrap_or("");
            match entry.resource["status"].as_str().unwrap_or("") {
                "in-progress" | "completed" => success += 1,
                "not-done" if reason.starts_with("opted out") => ignored += 1,
                "not-done" | "stopped" | "entered-in-error" => failed += 1,
                _ => continue,
            }
            if !reason.is_empty() {
                let who = entry.resource["recipient"][0]["display"]
                    .as_str()
                    .or_else(|| entry.resource["recipient"][0]["reference"].as_str())
                    .unwrap_or("?");
                descriptions.insert(who.to_string(), json!(reason));
            }
        }
        send_status.insert(
            label,
            json!({ "success": success, "failed": failed, "ignored": ignored, "descriptions": descriptions }),
        );
    }
    let percent = if total == 0 {
        if done { 100.0 } else { 0.0 }
    } else {
        (processed as f64 * 100.0 / total as f64 * 10.0).round() / 10.0
    };
    let kind = match parsed.as_ref().map(|p| p.deliveries.as_slice()) {
        Some([Delivery::Message(_)]) => "Sending Message",
        Some(_) => "Starting workflow",
        None => "Preparing Data",
    };
    Ok(json!({
        "id": id,
        "totalRecords": total,
        "processedRecords": processed,
        "step": if entries.is_empty() { 1 } else { 2 },
        "totalSteps": 2,
        "status": if done { "done" } else if entries.is_empty() { "Preparing Data" } else { kind },
        "error": if dispatch.phase == "refused" { json!(dispatch.notes.join("; ")) } else { Value::Null },
        "percent": percent,
        "sendStatus": { id: send_status },
    }))
}

/// `{"schedules": ["CommunicationRequest/<id>" | "<id>", ...]}`: each is
/// cancelled like `$cancel`. Answers emNutt's `{"status":"Processing",
/// "reqID"}` (iHRIS polls `getProgress` with that id, which then reports the
/// revoked request as done) plus one result per schedule; 404 or 409 if
/// any could not be cancelled (the others still are).
async fn cancel_schedules(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(body, state.settings.server.max_body_bytes)?;
    let schedules = body
        .get("schedules")
        .and_then(Value::as_array)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            ApiError::BadRequest("the body needs a non-empty \"schedules\" list".into())
        })?;
    let mut ids = Vec::with_capacity(schedules.len());
    for (index, schedule) in schedules.iter().enumerate() {
        let id = schedule
            .as_str()
            .map(|s| s.trim_start_matches("CommunicationRequest/"))
            .filter(|id| crate::fhir::resource_types::is_valid_id(id))
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "schedules[{index}] must be \"CommunicationRequest/<id>\" or \"<id>\""
                ))
            })?;
        ids.push(id.to_string());
    }
    let mut results = Vec::with_capacity(ids.len());
    let mut worst = StatusCode::OK;
    for id in &ids {
        match crate::jobs::schedule::cancel_request(state.store.as_ref(), id).await {
            Ok(stored) => results.push(json!({ "id": id, "status": stored.resource["status"] })),
            Err(error) => {
                let error = ApiError::from(error);
                let (status, outcome) = error.status_and_outcome();
                if status.is_server_error() {
                    return Err(error);
                }
                worst = worst.max(status);
                results.push(json!({ "id": id, "error": outcome }));
            }
        }
    }
    if let Some(nudge) = &state.dispatch {
        nudge.nudge();
    }
    Ok(json_reply(
        worst,
        &json!({ "status": "Processing", "reqID": ids[0], "results": results }),
    ))
}

#[derive(serde::Deserialize, Default)]
struct OptOutQuery {
    globalid: Option<String>,
    entitytype: Option<String>,
}

async fn opt_out(
    state: State<AppState>,
    query: Query<OptOutQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    set_opt_out(state, query, body, true).await
}

async fn undo_opt_out(
    state: State<AppState>,
    query: Query<OptOutQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    set_opt_out(state, query, body, false).await
}

/// Sets or removes the opt-out tag on each named person; answers one
/// batch-style entry per person (200, or 404 for an unknown one).
async fn set_opt_out(
    State(state): State<AppState>,
    Query(query): Query<OptOutQuery>,
    body: Result<Bytes, BytesRejection>,
    opted_out: bool,
) -> Result<Response, ApiError> {
    let mut people: Vec<(String, String)> = Vec::new();
    if let (Some(id), Some(kind)) = (&query.globalid, &query.entitytype) {
        people.push((kind.clone(), id.clone()));
    }
    let bytes = body.map_err(|e| ApiError::BadRequest(format!("cannot read the body: {e}")))?;
    if !bytes.iter().all(u8::is_ascii_whitespace) {
        let list: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))?;
        let list = list.as_array().ok_or_else(|| {
            ApiError::BadRequest("the body must be a list of {\"entitytype\", \"globalid\"}".into())
        })?;
        for (index, item) in list.iter().enumerate() {
            match (
                item.get("entitytype").and_then(Value::as_str),
                item.get("globalid").and_then(Value::as_str),
            ) {
                (Some(kind), Some(id)) => people.push((kind.to_string(), id.to_string())),
                _ => {
                    return Err(ApiError::BadRequest(format!(
                        "item {index} needs entitytype and globalid"
                    )));
                }
            }
        }
    }
    if people.is_empty() {
        return Err(ApiError::BadRequest(
            "name the people: ?globalid=&entitytype= or a body [{\"entitytype\", \"globalid\"}]"
                .into(),
        ));
    }
    for (kind, _) in &people {
        if !crate::pipeline::contact::PERSON_TYPES.contains(&kind.as_str()) {
            return Err(ApiError::BadRequest(format!(
                "entitytype '{kind}' is not one of {}",
                crate::pipeline::contact::PERSON_TYPES.join(", ")
            )));
        }
    }
    let mut entries = Vec::with_capacity(people.len());
    let mut all_found = true;
    for (kind, id) in &people {
        let result = modify_resource(state.store.as_ref(), kind, id, |current| {
            with_opt_out(current, opted_out)
        })
        .await;
        entries.push(match result {
            Ok(_) => json!({ "response": { "status": "200 OK", "location": format!("{kind}/{id}") } }),
            Err(error @ (StoreError::NotFound { .. } | StoreError::Gone { .. })) => {
                all_found = false;
                let (status, outcome) = crate::error::status_and_outcome(&error);
                json!({ "response": { "status": format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or("")), "outcome": outcome } })
            }
            Err(other) => return Err(other.into()),
        });
    }
    if let Some(nudge) = &state.contact_sync {
        nudge.nudge();
    }
    let status = if all_found {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    };
    Ok(json_reply(status, &Value::Array(entries)))
}

/// emNutt's `/sync/*` triggers: start a pass of the job now.
async fn sync_trigger(
    State(state): State<AppState>,
    Path(job): Path<String>,
) -> Result<Response, ApiError> {
    let nudges: HashMap<&str, Option<&crate::jobs::runner::Nudge>> = HashMap::from([
        ("syncContacts", state.contact_sync.as_ref()),
        ("syncContactsGroups", state.contact_sync.as_ref()),
        ("checkCommunicationRequest", state.dispatch.as_ref()),
        ("syncWorkflows", state.flow_sync.as_ref()),
    ]);
    match nudges.get(job.as_str()) {
        Some(Some(nudge)) => {
            nudge.nudge();
            Ok(json_reply(
                StatusCode::ACCEPTED,
                &json!({ "status": "started", "job": job }),
            ))
        }
        Some(None) => Err(ApiError::ServiceUnavailable(
            "RapidPro is not configured (rapidpro.base_url, rapidpro.token): the job is not running".into(),
        )),
        None => Err(ApiError::NotFound(format!(
            "no sync job '{job}'; known: {}",
            {
                let mut names: Vec<&str> = nudges.keys().copied().collect();
                names.sort();
                names.join(", ")
            }
        ))),
    }
}
