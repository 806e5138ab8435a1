//! Flows: loading RapidPro flow exports (spec 13) into the sandbox and
//! `GET /api/v2/flows.json` (filters uuid, type, archived, before/after on
//! modified_on) in the read shape of reference §5.5. `runs` counts the
//! sandbox's runs (waiting ones as `waiting`; `active` is always 0). The
//! definition is kept for the engine (`engine`), which runs it.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::groups::field_key;
use super::http::{Reply, Req, Row, in_range, paginate};
use super::state::{Inner, format_dt};

#[derive(Debug, Clone)]
pub struct Flow {
    pub id: u64,
    pub uuid: String,
    pub name: String,
    /// API type: `message|voice|background|survey`.
    pub flow_type: String,
    pub archived: bool,
    /// Minutes.
    pub expires: i64,
    pub results: Vec<Value>,
    /// The flow as exported (nodes, localization), run by the engine.
    pub definition: Value,
    pub created_on: DateTime<Utc>,
    pub modified_on: DateTime<Utc>,
}

fn api_type(export_type: &str) -> &'static str {
    match export_type {
        "messaging_background" => "background",
        "voice" => "voice",
        "messaging_offline" => "survey",
        _ => "message",
    }
}

/// The `results` list: one entry per distinct result name, from routers.
fn results_of(flow: &Value) -> Vec<Value> {
    let mut results: Vec<(String, String, Vec<String>, Vec<String>)> = Vec::new();
    for node in flow["nodes"].as_array().into_iter().flatten() {
        let router = &node["router"];
        let Some(name) = router["result_name"].as_str().filter(|n| !n.is_empty()) else {
            continue;
        };
        let key = field_key(name);
        let node_uuid = node["uuid"].as_str().unwrap_or_default().to_string();
        let categories: Vec<String> = router["categories"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect();
        match results.iter_mut().find(|r| r.0 == key) {
            Some(r) => {
                for c in categories {
                    if !r.2.contains(&c) {
                        r.2.push(c);
                    }
                }
                r.3.push(node_uuid);
            }
            None => results.push((key, name.to_string(), categories, vec![node_uuid])),
        }
    }
    results
        .into_iter()
        .map(|(key, name, categories, node_uuids)| {
            json!({"key": key, "name": name, "categories": categories, "node_uuids": node_uuids})
        })
        .collect()
}

/// Loads every flow of an export (`{"version": "13...", "flows": [...]}`);
/// a flow already loaded (same UUID) is replaced. Legacy exports (before
/// spec 13, without flow UUIDs and nodes) are refused as a whole.
pub fn load_export(inner: &mut Inner, export: &Value) -> Result<Vec<String>, String> {
    let flows = export["flows"]
        .as_array()
        .ok_or("not a flow export: no \"flows\" list")?;
    for f in flows {
        if f["uuid"].as_str().is_none() || !f["nodes"].is_array() {
            return Err(format!(
                "flow {} is in a legacy format (export version {}); open and re-export it from a current RapidPro",
                f["name"], export["version"]
            ));
        }
    }
    let mut uuids = Vec::new();
    for f in flows {
        let uuid = f["uuid"].as_str().unwrap_or_default().to_string();
        let now = inner.now();
        let flow = Flow {
            id: inner.next_id(),
            uuid: uuid.clone(),
            name: f["name"].as_str().unwrap_or_default().to_string(),
            flow_type: api_type(f["type"].as_str().unwrap_or_default()).to_string(),
            archived: false,
            expires: f["expire_after_minutes"].as_i64().unwrap_or(0),
            results: results_of(f),
            definition: f.clone(),
            created_on: now,
            modified_on: now,
        };
        inner.flows.retain(|existing| existing.uuid != uuid);
        inner.flows.push(flow);
        uuids.push(uuid);
    }
    Ok(uuids)
}

/// Archives (or unarchives) a flow the way the UI does; its `modified_on`
/// moves. False when there is no such flow.
pub fn set_archived(inner: &mut Inner, uuid: &str, archived: bool) -> bool {
    let now = inner.now();
    match inner.flows.iter_mut().find(|f| f.uuid == uuid) {
        Some(flow) => {
            if flow.archived != archived {
                flow.archived = archived;
                flow.modified_on = now;
            }
            true
        }
        None => false,
    }
}

/// Deletes a flow the way the UI does: `flows.json` no longer lists it.
/// False when there is no such flow.
pub fn remove(inner: &mut Inner, uuid: &str) -> bool {
    let before = inner.flows.len();
    inner.flows.retain(|f| f.uuid != uuid);
    inner.flows.len() != before
}

pub fn flow_json(inner: &Inner, f: &Flow) -> Value {
    let count = |exit: Option<&str>| {
        inner
            .runs
            .iter()
            .filter(|r| r.flow == f.uuid && r.exit_type.as_deref() == exit)
            .count()
    };
    json!({
        "uuid": f.uuid,
        "name": f.name,
        "type": f.flow_type,
        "archived": f.archived,
        "labels": [],
        "expires": f.expires,
        "runs": {
            "active": 0,
            "waiting": count(None),
            "completed": count(Some("completed")),
            "interrupted": count(Some("interrupted")),
            "expired": count(Some("expired")),
            "failed": count(Some("failed")),
        },
        "results": f.results,
        "parent_refs": [],
        "created_on": format_dt(&f.created_on),
        "modified_on": format_dt(&f.modified_on),
    })
}

pub fn list(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let uuid = req.param("uuid");
    let flow_type = req.param("type");
    let archived = req
        .param("archived")
        .map(|a| matches!(a.to_ascii_lowercase().as_str(), "1" | "true"));
    let mut rows: Vec<Row> = inner
        .flows
        .iter()
        .filter(|f| uuid.is_none_or(|u| f.uuid == u))
        .filter(|f| flow_type.is_none_or(|t| f.flow_type == t))
        .filter(|f| archived.is_none_or(|a| f.archived == a))
        .filter(|f| in_range(req, &f.modified_on))
        .map(|f| Row {
            key: f.created_on.timestamp_micros(),
            id: f.id,
            value: flow_json(inner, f),
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse((r.key, r.id)));
    Ok(paginate(req, rows, inner.settings.page_size, true))
}

/// `GET /api/v2/definitions.json?flow=<uuid>`: the export of the named flow
/// (`dependencies` is ignored: flows are exported alone); an unknown uuid
/// gives an export without flows, as RapidPro does.
pub fn definitions(inner: &Inner, req: &Req) -> Reply {
    let uuid = req.param("flow");
    let flows: Vec<Value> = inner
        .flows
        .iter()
        .filter(|f| uuid.is_some_and(|u| f.uuid == u))
        .map(|f| f.definition.clone())
        .collect();
    Reply::ok(json!({"version": "13.0.0", "site": "https://app.rapidpro.io", "flows": flows}))
}
