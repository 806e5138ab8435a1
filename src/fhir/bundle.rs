//! Construction of the Bundles the API returns: `searchset` pages with
//! `self`/`next` links, `history` pages, and the shared shape of
//! `response` elements in batch and transaction responses.

use serde_json::{Map, Value, json};

use super::format_instant;
use crate::store::{HistoryPage, SearchPage, StoredResource};

/// `base` is the absolute FHIR base (`http://host/fhir`) or empty for
/// relative links (nested searchsets inside a batch response).
pub fn full_url(base: &str, resource_type: &str, id: &str) -> String {
    if base.is_empty() {
        format!("{resource_type}/{id}")
    } else {
        format!("{base}/{resource_type}/{id}")
    }
}

/// A `searchset` Bundle for one page. `self_url` and `next_url` are
/// already absolute (or relative when `base` is empty).
pub fn searchset(
    base: &str,
    page: &SearchPage,
    self_url: &str,
    next_url: Option<&str>,
    outcome: Option<Value>,
) -> Value {
    let mut bundle = Map::new();
    bundle.insert("resourceType".into(), json!("Bundle"));
    bundle.insert("id".into(), json!(uuid::Uuid::new_v4().to_string()));
    bundle.insert(
        "meta".into(),
        json!({ "lastUpdated": format_instant(&chrono::Utc::now()) }),
    );
    bundle.insert("type".into(), json!("searchset"));
    if let Some(total) = page.total {
        bundle.insert("total".into(), json!(total));
    }
    let mut links = vec![json!({ "relation": "self", "url": self_url })];
    if let Some(next) = next_url {
        links.push(json!({ "relation": "next", "url": next }));
    }
    bundle.insert("link".into(), Value::Array(links));
    let mut entries: Vec<Value> = Vec::with_capacity(page.matches.len() + page.included.len() + 1);
    for stored in &page.matches {
        entries.push(search_entry(base, stored, "match"));
    }
    for stored in &page.included {
        entries.push(search_entry(base, stored, "include"));
    }
    if let Some(outcome) = outcome {
        entries.push(json!({ "resource": outcome, "search": { "mode": "outcome" } }));
    }
    if !entries.is_empty() {
        bundle.insert("entry".into(), Value::Array(entries));
    }
    Value::Object(bundle)
}

fn search_entry(base: &str, stored: &StoredResource, mode: &str) -> Value {
    json!({
        "fullUrl": full_url(base, &stored.resource_type, &stored.id),
        "resource": stored.resource,
        "search": { "mode": mode }
    })
}

/// A `history` Bundle for one page.
pub fn history(base: &str, page: &HistoryPage, self_url: &str, next_url: Option<&str>) -> Value {
    let entries: Vec<Value> = page
        .entries
        .iter()
        .map(|e| {
            let url = if e.method == crate::store::HistoryMethod::Create {
                e.resource_type.clone()
            } else {
                format!("{}/{}", e.resource_type, e.id)
            };
            let status = match e.method {
                crate::store::HistoryMethod::Create => "201 Created",
                crate::store::HistoryMethod::Update => "200 OK",
                crate::store::HistoryMethod::Delete => "204 No Content",
            };
            let mut entry = Map::new();
            entry.insert(
                "fullUrl".into(),
                json!(full_url(base, &e.resource_type, &e.id)),
            );
            if let Some(resource) = &e.resource {
                entry.insert("resource".into(), resource.clone());
            }
            entry.insert(
                "request".into(),
                json!({ "method": e.method.http_method(), "url": url }),
            );
            entry.insert(
                "response".into(),
                json!({
                    "status": status,
                    "etag": format!("W/\"{}\"", e.version_id),
                    "lastModified": format_instant(&e.last_updated)
                }),
            );
            Value::Object(entry)
        })
        .collect();
    let mut links = vec![json!({ "relation": "self", "url": self_url })];
    if let Some(next) = next_url {
        links.push(json!({ "relation": "next", "url": next }));
    }
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": { "lastUpdated": format_instant(&chrono::Utc::now()) },
        "type": "history",
        "link": links,
        "entry": entries
    });
    if let Some(total) = page.total {
        bundle["total"] = json!(total);
    }
    bundle
}

/// The `response` element of a batch/transaction entry for a write or read.
pub fn entry_response(status: &str, stored: Option<&StoredResource>) -> Value {
    let mut response = Map::new();
    response.insert("status".into(), json!(status));
    if let Some(stored) = stored {
        response.insert("location".into(), json!(stored.versioned_reference()));
        response.insert("etag".into(), json!(stored.etag()));
        response.insert(
            "lastModified".into(),
            json!(format_instant(&stored.last_updated)),
        );
    }
    Value::Object(response)
}

/// The HTTP status line text FHIR uses in `Bundle.entry.response.status`.
pub fn status_line(code: u16) -> String {
    let reason = http::StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    format!("{code} {reason}").trim_end().to_string()
}
