//! `batch` and `transaction` Bundles in the embedded store.
//!
//! A transaction runs in one SQLite transaction: identities are resolved
//! first (server ids for creates, conditional creates/updates/deletes,
//! `urn:uuid:` fullUrls), references inside the resources are rewritten,
//! then entries run in the FHIR order DELETE, POST, PUT, GET. Any failure
//! rolls everything back and names the entry. A batch runs each entry on
//! its own; failures become entry responses with an OperationOutcome.

use std::collections::{HashMap, HashSet};

use rusqlite::Connection;
use serde_json::{Value, json};

use super::{rows, search};
use crate::fhir::bundle::{entry_response, searchset, status_line};
use crate::fhir::resource_types::{
    ensure_supported, ensure_valid_id, json_kind, validate_resource,
};
use crate::store::{SearchPage, StoreError, StoreResult, WriteKind};

/// What one entry asks for.
#[derive(Debug, Clone)]
enum Operation {
    /// `assigned_id` is set when a transaction has already chosen the new id.
    Create {
        resource_type: String,
        resource: Value,
        if_none_exist: Option<String>,
        assigned_id: Option<String>,
    },
    Update {
        resource_type: String,
        id: String,
        resource: Value,
        if_match: Option<String>,
    },
    ConditionalUpdate {
        resource_type: String,
        query: String,
        resource: Value,
        if_match: Option<String>,
    },
    Delete {
        resource_type: String,
        id: String,
        if_match: Option<String>,
    },
    ConditionalDelete {
        resource_type: String,
        query: String,
    },
    Read {
        resource_type: String,
        id: String,
    },
    VRead {
        resource_type: String,
        id: String,
        version_id: String,
    },
    Search {
        resource_type: String,
        query: String,
    },
}

impl Operation {
    /// FHIR transaction processing order.
    fn phase(&self) -> u8 {
        match self {
            Operation::Delete { .. } | Operation::ConditionalDelete { .. } => 0,
            Operation::Create { .. } => 1,
            Operation::Update { .. } | Operation::ConditionalUpdate { .. } => 2,
            _ => 3,
        }
    }
}

/// Strip a base URL: keep the path from the first segment that names a type.
fn relative_url(url: &str) -> &str {
    let url = url.trim();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return url.trim_start_matches('/');
    }
    let (path, _) = url.split_once('?').unwrap_or((url, ""));
    let mut offset = 0;
    for segment in path.split('/') {
        if crate::fhir::resource_types::looks_like_type_name(segment) {
            return &url[offset..];
        }
        offset += segment.len() + 1;
    }
    url
}

fn parse_entry(entry: &Value) -> StoreResult<Operation> {
    let request = entry
        .get("request")
        .ok_or_else(|| StoreError::Invalid("the entry has no request".into()))?;
    let method = request
        .get("method")
        .and_then(Value::as_str)
        .ok_or_else(|| StoreError::Invalid("request.method is missing".into()))?;
    let url = request
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| StoreError::Invalid("request.url is missing".into()))?;
    let header = |name: &str| {
        request
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let url = relative_url(url);
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (url, None),
    };
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if let Some(op) = segments.iter().find(|s| s.starts_with('$')) {
        return Err(StoreError::Unprocessable(format!(
            "the operation {op} is not supported in a Bundle"
        )));
    }
    let resource_type = segments.first().copied().ok_or_else(|| {
        StoreError::Invalid(format!("request.url '{url}' names no resource type"))
    })?;
    ensure_supported(resource_type)?;
    let type_name = resource_type;
    let body = || -> StoreResult<Value> {
        let resource = entry
            .get("resource")
            .cloned()
            .ok_or_else(|| StoreError::Invalid(format!("{method} {url} has no resource")))?;
        validate_resource(&resource, Some(type_name))?;
        Ok(resource)
    };
    let resource_type = resource_type.to_string();
    let if_match = header("ifMatch").and_then(|v| crate::store::parse_etag(&v));
    match (method, segments.len(), query) {
        ("POST", 1, None) => Ok(Operation::Create {
            resource_type,
            resource: body()?,
            if_none_exist: header("ifNoneExist"),
            assigned_id: None,
        }),
        ("PUT", 2, None) => {
            let id = segments[1].to_string();
            ensure_valid_id(&id)?;
            let resource = body()?;
            if let Some(body_id) = resource.get("id").and_then(Value::as_str)
                && body_id != id
            {
                return Err(StoreError::Invalid(format!(
                    "the resource id '{body_id}' does not match '{id}' in request.url"
                )));
            }
            Ok(Operation::Update {
                resource_type,
                id,
                resource,
                if_match,
            })
        }
        ("PUT", 1, Some(query)) => Ok(Operation::ConditionalUpdate {
            resource_type,
            query,
            resource: body()?,
            if_match,
        }),
        ("DELETE", 2, None) => Ok(Operation::Delete {
            resource_type,
            id: segments[1].to_string(),
            if_match,
        }),
        ("DELETE", 1, Some(query)) => Ok(Operation::ConditionalDelete {
            resource_type,
            query,
        }),
        ("GET", 2, _) => Ok(Operation::Read {
            resource_type,
            id: segments[1].to_string(),
        }),
        ("GET", 4, _) if segments[2] == "_history" => Ok(Operation::VRead {
            resource_type,
            id: segments[1].to_string(),
            version_id: segments[3].to_string(),
        }),
        ("GET", 1, query) => Ok(Operation::Search {
            resource_type,
            query: query.unwrap_or_default(),
        }),
        _ => Err(StoreError::Invalid(format!(
            "{method} {url} is not a supported Bundle request"
        ))),
    }
}

/// Check the Bundle's shape and return its type and entries.
pub fn bundle_parts(bundle: &Value) -> StoreResult<(&str, Vec<Value>)> {
    if !bundle.is_object() {
        return Err(StoreError::Invalid(format!(
            "the body must be a Bundle (a JSON object), not {}",
            json_kind(bundle)
        )));
    }
    match bundle.get("resourceType").and_then(Value::as_str) {
        Some("Bundle") => {}
        Some(other) => {
            return Err(StoreError::Invalid(format!(
                "POST to the base expects a Bundle, not {other}"
            )));
        }
        None => return Err(StoreError::Invalid("the body has no resourceType".into())),
    }
    let kind = bundle.get("type").and_then(Value::as_str).unwrap_or("");
    if kind != "batch" && kind != "transaction" {
        return Err(StoreError::Invalid(format!(
            "Bundle.type must be batch or transaction, not '{kind}'"
        )));
    }
    let entries = match bundle.get("entry") {
        None => Vec::new(),
        Some(Value::Array(entries)) => entries.clone(),
        Some(other) => {
            return Err(StoreError::Invalid(format!(
                "Bundle.entry must be an array, not {}",
                json_kind(other)
            )));
        }
    };
    Ok((kind, entries))
}

fn describe(entry: &Value) -> String {
    let request = entry.get("request");
    let method = request
        .and_then(|r| r.get("method"))
        .and_then(Value::as_str)
        .unwrap_or("?");
    let url = request
        .and_then(|r| r.get("url"))
        .and_then(Value::as_str)
        .unwrap_or("?");
    match entry.get("fullUrl").and_then(Value::as_str) {
        Some(full) => format!("{method} {url}, fullUrl {full}"),
        None => format!("{method} {url}"),
    }
}

/// Rewrite `reference` values through `map`; resolve conditional references.
fn rewrite_references(
    conn: &Connection,
    value: &mut Value,
    map: &HashMap<String, String>,
) -> StoreResult<()> {
    match value {
        Value::Object(object) => {
            if let Some(Value::String(reference)) = object.get_mut("reference") {
                if let Some(target) = map.get(reference.as_str()) {
                    *reference = target.clone();
                } else if reference.starts_with("urn:uuid:") || reference.starts_with("urn:oid:") {
                    return Err(StoreError::Invalid(format!(
                        "reference {reference} does not match the fullUrl of any entry in the transaction"
                    )));
                } else if let Some((resource_type, query)) = reference.split_once('?')
                    && !resource_type.contains('/')
                {
                    ensure_supported(resource_type)?;
                    match search::resolve_single(conn, resource_type, query)? {
                        Some(id) => *reference = format!("{resource_type}/{id}"),
                        None => {
                            return Err(StoreError::Invalid(format!(
                                "conditional reference {reference} matches no resource"
                            )));
                        }
                    }
                }
            }
            for child in object.values_mut() {
                rewrite_references(conn, child, map)?;
            }
        }
        Value::Array(items) => {
            for item in items {
                rewrite_references(conn, item, map)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn write_status(kind: WriteKind) -> &'static str {
    match kind {
        WriteKind::Created => "201 Created",
        WriteKind::Updated | WriteKind::Unchanged => "200 OK",
    }
}

/// Run one resolved operation; returns the entry (response and maybe resource).
fn run(conn: &Connection, op: Operation) -> StoreResult<Value> {
    match op {
        Operation::Create {
            resource_type,
            resource,
            if_none_exist,
            assigned_id,
        } => {
            if let Some(query) = if_none_exist
                && let Some(id) = search::resolve_single(conn, &resource_type, &query)?
            {
                let stored = rows::read(conn, &resource_type, &id)?;
                return Ok(json!({ "response": entry_response("200 OK", Some(&stored)) }));
            }
            let id = assigned_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let outcome = rows::put(conn, &resource_type, &id, resource, None)?;
            Ok(
                json!({ "response": entry_response(write_status(outcome.kind), Some(&outcome.stored)) }),
            )
        }
        Operation::Update {
            resource_type,
            id,
            resource,
            if_match,
        } => {
            let outcome = rows::put(conn, &resource_type, &id, resource, if_match.as_deref())?;
            Ok(
                json!({ "response": entry_response(write_status(outcome.kind), Some(&outcome.stored)) }),
            )
        }
        Operation::ConditionalUpdate {
            resource_type,
            query,
            resource,
            if_match,
        } => {
            let id = search::conditional_update_target(conn, &resource_type, &query, &resource)?;
            let outcome = rows::put(conn, &resource_type, &id, resource, if_match.as_deref())?;
            Ok(
                json!({ "response": entry_response(write_status(outcome.kind), Some(&outcome.stored)) }),
            )
        }
        Operation::Delete {
            resource_type,
            id,
            if_match,
        } => {
            rows::delete(conn, &resource_type, &id, if_match.as_deref())?;
            Ok(json!({ "response": entry_response("204 No Content", None) }))
        }
        Operation::ConditionalDelete {
            resource_type,
            query,
        } => {
            if let Some(id) = search::resolve_single(conn, &resource_type, &query)? {
                rows::delete(conn, &resource_type, &id, None)?;
            }
            Ok(json!({ "response": entry_response("204 No Content", None) }))
        }
        Operation::Read { resource_type, id } => {
            let stored = rows::read(conn, &resource_type, &id)?;
            Ok(
                json!({ "resource": stored.resource, "response": entry_response("200 OK", Some(&stored)) }),
            )
        }
        Operation::VRead {
            resource_type,
            id,
            version_id,
        } => {
            let stored = rows::vread(conn, &resource_type, &id, &version_id)?;
            Ok(
                json!({ "resource": stored.resource, "response": entry_response("200 OK", Some(&stored)) }),
            )
        }
        Operation::Search {
            resource_type,
            query,
        } => {
            let params = search::parse_query(&query);
            let plan = search::plan(&resource_type, &params, false)?;
            let page: SearchPage = search::execute(conn, &plan, None)?;
            let bundle = searchset("", &page, &format!("{resource_type}?{query}"), None, None);
            Ok(json!({ "resource": bundle, "response": { "status": "200 OK" } }))
        }
    }
}

/// A transaction on `conn`, which the caller wraps in BEGIN/COMMIT.
pub fn transaction(conn: &Connection, entries: &[Value]) -> StoreResult<Value> {
    let fail = |index: usize, error: StoreError| StoreError::TransactionEntry {
        index,
        what: describe(&entries[index]),
        source: Box::new(error),
    };
    let mut operations = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        operations.push(parse_entry(entry).map_err(|e| fail(index, e))?);
    }

    // Identities: fullUrl -> Type/id, conditional operations resolved now.
    let mut map: HashMap<String, String> = HashMap::new();
    let mut written: HashSet<String> = HashSet::new();
    for (index, op) in operations.iter_mut().enumerate() {
        let full_url = entries[index]
            .get("fullUrl")
            .and_then(Value::as_str)
            .map(str::to_string);
        let identity = match op {
            Operation::Create {
                resource_type,
                if_none_exist,
                assigned_id,
                ..
            } => {
                let existing = match if_none_exist.as_deref() {
                    Some(query) => search::resolve_single(conn, resource_type, query)
                        .map_err(|e| fail(index, e))?,
                    None => None,
                };
                let is_new = existing.is_none();
                let id = existing.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
                if is_new {
                    *assigned_id = Some(id.clone());
                    *if_none_exist = None;
                }
                format!("{resource_type}/{id}")
            }
            Operation::Update {
                resource_type, id, ..
            } => format!("{resource_type}/{id}"),
            Operation::ConditionalUpdate {
                resource_type,
                query,
                resource,
                if_match,
            } => {
                let id = search::conditional_update_target(conn, resource_type, query, resource)
                    .map_err(|e| fail(index, e))?;
                resource["id"] = json!(id);
                let resolved = Operation::Update {
                    resource_type: resource_type.clone(),
                    id: id.clone(),
                    resource: resource.clone(),
                    if_match: if_match.clone(),
                };
                let identity = format!("{resource_type}/{id}");
                *op = resolved;
                identity
            }
            Operation::Delete {
                resource_type, id, ..
            } => format!("{resource_type}/{id}"),
            Operation::ConditionalDelete {
                resource_type,
                query,
            } => match search::resolve_single(conn, resource_type, query)
                .map_err(|e| fail(index, e))?
            {
                Some(id) => {
                    let identity = format!("{resource_type}/{id}");
                    *op = Operation::Delete {
                        resource_type: resource_type.clone(),
                        id,
                        if_match: None,
                    };
                    identity
                }
                None => continue,
            },
            _ => continue,
        };
        if !written.insert(identity.clone()) {
            return Err(fail(
                index,
                StoreError::Conflict(format!(
                    "{identity} is written by more than one entry of the transaction"
                )),
            ));
        }
        if let Some(full_url) = full_url {
            map.insert(full_url, identity);
        }
    }

    // References inside the resources.
    for (index, op) in operations.iter_mut().enumerate() {
        if let Operation::Create { resource, .. } | Operation::Update { resource, .. } = op {
            rewrite_references(conn, resource, &map).map_err(|e| fail(index, e))?;
        }
    }

    let mut order: Vec<usize> = (0..operations.len()).collect();
    order.sort_by_key(|&i| operations[i].phase());
    let mut responses: Vec<Value> = vec![Value::Null; operations.len()];
    for index in order {
        let op = operations[index].clone();
        let mut entry = run(conn, op).map_err(|e| fail(index, e))?;
        if let Some(full_url) = entries[index].get("fullUrl") {
            entry["fullUrl"] = full_url.clone();
        }
        responses[index] = entry;
    }
    Ok(json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "transaction-response",
        "entry": responses
    }))
}

/// A batch: every entry on its own, each in its own SQLite transaction.
pub fn batch(conn: &mut Connection, entries: &[Value]) -> StoreResult<Value> {
    let mut responses = Vec::with_capacity(entries.len());
    for entry in entries {
        let result = parse_entry(entry).and_then(|op| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let response = run(&tx, op)?;
            tx.commit()?;
            Ok(response)
        });
        responses.push(match result {
            Ok(response) => response,
            Err(error) => {
                let (status, outcome) = crate::error::status_and_outcome(&error);
                json!({ "response": { "status": status_line(status.as_u16()), "outcome": outcome } })
            }
        });
    }
    Ok(json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "batch-response",
        "entry": responses
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_request_urls_become_relative() {
        assert_eq!(
            relative_url("http://example.org/fhir/Patient/123"),
            "Patient/123"
        );
        assert_eq!(relative_url("/Patient?name=x"), "Patient?name=x");
        assert_eq!(relative_url("Patient"), "Patient");
    }

    #[test]
    fn operations_in_bundles_are_refused_with_their_name() {
        let entry = json!({"request": {"method": "POST", "url": "ValueSet/$lookup"}, "resource": {"resourceType": "Parameters"}});
        let err = parse_entry(&entry).unwrap_err();
        assert!(err.to_string().contains("$lookup"), "{err}");
    }
}
