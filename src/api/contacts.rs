//! The contact search API (docs/contact-index.md): `GET /api/contacts`
//! (documents and a total), `GET /api/contacts/stats?by=` (counts) and
//! `POST /api/contacts/audience` (the matches materialised as a FHIR
//! Group). Same API-key auth as `/fhir`; a bad filter is a 400 naming it
//! (through `error.rs`).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use serde_json::{Value, json};

use super::AppState;
use crate::error::ApiError;
use crate::index::{ContactQuery, IndexError, StatsBy};
use crate::store::StoreError;

/// Canonical URL of the extension recording an audience's query.
pub const AUDIENCE_QUERY_EXTENSION: &str =
    "http://mhero.org/fhir/StructureDefinition/mhero-audience-query";

pub fn routes(state: AppState) -> Router {
    Router::new()
        .route("/api/contacts", get(search))
        .route("/api/contacts/stats", get(stats))
        .route("/api/contacts/audience", post(audience))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            super::auth::require_api_key,
        ))
        .with_state(state)
}

fn pairs(raw: &Option<String>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(raw.as_deref().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn borrowed(pairs: &[(String, String)]) -> impl Iterator<Item = (&str, &str)> {
    pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
}

/// A `location` or `group` filter must name a resource the store has: a
/// mistyped id would otherwise match no one, silently.
async fn check_references(state: &AppState, query: &ContactQuery) -> Result<(), ApiError> {
    for (parameter, resource_type, id) in [
        ("location", "Location", &query.location),
        ("group", "Group", &query.group),
    ] {
        let Some(id) = id else { continue };
        match state.store.read(resource_type, id).await {
            Ok(_) => {}
            Err(StoreError::NotFound { .. } | StoreError::Gone { .. }) => {
                return Err(IndexError::BadQuery {
                    parameter: parameter.into(),
                    reason: format!("there is no {resource_type} with id {id:?}"),
                }
                .into());
            }
            Err(StoreError::Invalid(reason)) => {
                return Err(IndexError::BadQuery {
                    parameter: parameter.into(),
                    reason,
                }
                .into());
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn search(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let pairs = pairs(&raw);
    let query = ContactQuery::from_pairs(borrowed(&pairs), true, &[])?;
    check_references(&state, &query).await?;
    let page = state.index.search(&query).await?;
    Ok(Json(json!({
        "total": page.total,
        "page": query.page + 1,
        "page_size": query.page_size,
        "contacts": page.contacts,
    })))
}

async fn stats(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let pairs = pairs(&raw);
    let by = match pairs.iter().find(|(k, _)| k == "by") {
        Some((_, value)) => StatsBy::parse(value)?,
        None => {
            return Err(IndexError::BadQuery {
                parameter: "by".into(),
                reason: "is required: cadre, region, district, gender or status".into(),
            }
            .into());
        }
    };
    let query = ContactQuery::from_pairs(borrowed(&pairs), false, &["by"])?;
    check_references(&state, &query).await?;
    let counts = state.index.stats(&query, by).await?;
    let total = state
        .index
        .search(&ContactQuery {
            page_size: 1,
            ..query
        })
        .await?
        .total;
    Ok(Json(json!({
        "by": pairs.iter().find(|(k, _)| k == "by").map(|(_, v)| v),
        "total": total,
        "counts": counts,
    })))
}

/// `POST /api/contacts/audience` with a JSON object of the same filters
/// and an optional `name`: creates a Group of every current match (one
/// snapshot of the index), with the filters in the `mhero-audience-query`
/// extension. A Group can be a CommunicationRequest recipient, and the
/// group sync makes it a RapidPro group. No match: 422, nothing written.
async fn audience(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body.map_err(|e| ApiError::BadRequest(format!("cannot read the body: {e}")))?;
    let body: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))?;
    let Some(object) = body.as_object() else {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object of contact filters, e.g. {\"cadre\": \"nurse\", \"location\": \"BRB\", \"name\": \"Nurses in Bong\"}".into(),
        ));
    };
    let mut pairs = Vec::new();
    for (name, value) in object {
        let text = match value {
            Value::String(s) => s.clone(),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
            _ => {
                return Err(IndexError::BadQuery {
                    parameter: name.clone(),
                    reason: "must be a string or a boolean".into(),
                }
                .into());
            }
        };
        pairs.push((name.clone(), text));
    }
    let query = ContactQuery::from_pairs(borrowed(&pairs), false, &["name"])?;
    check_references(&state, &query).await?;
    let members = state.index.references(&query).await?;
    if members.is_empty() {
        return Err(StoreError::Unprocessable(
            "no one matches these filters; no audience was created".into(),
        )
        .into());
    }
    let filters = query.filters_query_string();
    let name = object
        .get("name")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| {
            if filters.is_empty() {
                "Audience: everyone".to_string()
            } else {
                format!("Audience: {filters}")
            }
        });
    let all_practitioners = members.iter().all(|m| m.starts_with("Practitioner/"));
    let group = json!({
        "resourceType": "Group",
        "extension": [{ "url": AUDIENCE_QUERY_EXTENSION, "valueString": filters }],
        "type": if all_practitioners { "practitioner" } else { "person" },
        "actual": true,
        "name": name,
        "quantity": members.len(),
        "member": members
            .iter()
            .map(|m| json!({ "entity": { "reference": m } }))
            .collect::<Vec<_>>(),
    });
    let stored = state.store.create(group, None).await?.stored;
    state.index_sync.nudge();
    if let Some(nudge) = &state.contact_sync {
        nudge.nudge();
    }
    let location = format!("{}/{}", state.fhir_base, stored.versioned_reference());
    let mut response = (
        StatusCode::CREATED,
        serde_json::to_vec(&stored.resource).unwrap_or_default(),
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::fhir::FHIR_JSON),
    );
    if let Ok(value) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, value);
    }
    Ok(response)
}
