//! `/api/v2/contacts.json`: list (filters uuid, urn, group, deleted,
//! before/after, reverse), create, update by `?uuid=` / upsert by `?urn=`,
//! soft delete; the DRF validation rules and 400 shapes of reference §5.1.

use std::collections::HashMap;

use axum::http::StatusCode;
use serde_json::{Map, Value, json};

use super::http::{Reply, Req, Row, in_range, paginate};
use super::state::{Contact, Inner, Note, Status};
use super::urn::normalize_urn;

pub fn is_uuid(s: &str) -> bool {
    uuid::Uuid::try_parse(s).is_ok()
}

pub fn list(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let uuid = req.param("uuid");
    if let Some(u) = uuid
        && !is_uuid(u)
    {
        return Err(Reply::bad_request(
            json!({"detail": format!("Param 'uuid': {u} is not a valid UUID.")}),
        ));
    }
    let urn = match req.param("urn") {
        Some(raw) => Some(
            normalize_urn(raw, inner.settings.workspace.country.as_deref()).map_err(|_| {
                Reply::bad_request(json!({"detail": format!("Invalid URN: {raw}")}))
            })?,
        ),
        None => None,
    };
    let group = match req.param("group") {
        Some(g) => match inner.find_group(g) {
            Some(group) => Some(group.id),
            None => return Ok(paginate(req, Vec::new(), inner.settings.page_size, true)),
        },
        None => None,
    };
    let deleted = req.flag("deleted");
    let reverse = req.flag("reverse");
    let expand_urns = req.flag("expand_urns");
    let mut rows: Vec<Row> = inner
        .contacts
        .iter()
        .filter(|c| c.deleted == deleted)
        .filter(|c| uuid.is_none_or(|u| c.uuid == u))
        .filter(|c| urn.as_ref().is_none_or(|u| c.urns.contains(u)))
        .filter(|c| group.is_none_or(|g| c.groups.contains(&g)))
        .filter(|c| in_range(req, &c.modified_on))
        .map(|c| Row {
            key: c.modified_on.timestamp_micros(),
            id: c.id,
            value: {
                let mut v = inner.contact_json(c);
                if expand_urns {
                    expand(&mut v);
                }
                v
            },
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse((r.key, r.id)));
    if reverse {
        rows.reverse();
    }
    Ok(paginate(req, rows, inner.settings.page_size, !reverse))
}

/// `expand_urns=true`: URN strings become objects (the sandbox's one channel
/// routes every URN).
fn expand(contact: &mut Value) {
    let Some(urns) = contact.get_mut("urns").and_then(Value::as_array_mut) else {
        return;
    };
    for urn in urns.iter_mut() {
        let text = urn.as_str().unwrap_or_default().to_string();
        let (scheme, path) = text.split_once(':').unwrap_or(("", &text));
        *urn = json!({
            "channel": {"uuid": "9a8b001e-a913-486c-80f4-1356e23f582e", "name": "Sandbox"},
            "scheme": scheme,
            "path": path,
            "display": null,
        });
    }
}

/// The validated body of a contact write.
#[derive(Default)]
struct ContactWrite {
    name: Option<Option<String>>,
    language: Option<Option<String>>,
    urns: Option<Vec<String>>,
    groups: Option<Vec<u64>>,
    fields: Option<Vec<(String, Option<String>)>>,
    note: Option<String>,
}

fn too_many(n: usize) -> Value {
    json!([format!("Ensure this field has no more than {n} elements.")])
}

/// Validates a list of group references (UUIDs or names) for `contacts` and
/// `contact_actions`: every error is `"No such object: X"` or a smart-group error.
pub fn resolve_groups(inner: &Inner, value: &Value) -> Result<Vec<u64>, Value> {
    let Value::Array(items) = value else {
        return Err(json!([format!(
            "Expected a list of items but got type \"{}\".",
            type_name(value)
        )]));
    };
    if items.len() > 100 {
        return Err(too_many(100));
    }
    let mut ids = Vec::new();
    for item in items {
        let key = match item {
            Value::String(s) => s.clone(),
            Value::Object(o) => match o.get("uuid").and_then(Value::as_str) {
                Some(u) => u.to_string(),
                None => return Err(json!(["Must be a string or integer"])),
            },
            Value::Number(n) => n.to_string(),
            _ => return Err(json!(["Must be a string or integer"])),
        };
        let Some(group) = inner.find_group(&key) else {
            return Err(json!([format!("No such object: {key}")]));
        };
        if group.query.is_some() {
            return Err(json!([format!(
                "Contact group must not be query based: {key}"
            )]));
        }
        if !ids.contains(&group.id) {
            ids.push(group.id);
        }
    }
    Ok(ids)
}

pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

fn valid_language(s: &str) -> Result<(), &'static str> {
    match s.chars().count() {
        0..=2 => Err("Ensure this field has at least 3 characters."),
        3 if s.chars().all(|c| c.is_ascii_lowercase()) && !("qaa"..="qtz").contains(&s) => Ok(()),
        3 => Err("Not a valid ISO639-3 language code."),
        _ => Err("Ensure this field has no more than 3 characters."),
    }
}

fn normalize_field_value(value_type: &str, raw: &str) -> Option<String> {
    match value_type {
        "number" => raw
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(|_| raw.trim().to_string()),
        "datetime" => super::http::parse_datetime(raw.trim()).map(|_| raw.trim().to_string()),
        _ => Some(raw.chars().take(640).collect()),
    }
}

fn parse_write(
    inner: &Inner,
    body: &Map<String, Value>,
    urn_in_url: bool,
) -> Result<ContactWrite, Reply> {
    let mut errors = Map::new();
    let mut w = ContactWrite::default();
    let country = inner.settings.workspace.country.clone();
    if let Some(v) = body.get("name") {
        match v {
            Value::Null => w.name = Some(None),
            Value::String(s) if s.chars().count() > 64 => {
                errors.insert(
                    "name".into(),
                    json!(["Ensure this field has no more than 64 characters."]),
                );
            }
            Value::String(s) if s.contains('\0') => {
                errors.insert("name".into(), json!(["Null characters are not allowed."]));
            }
            Value::String(s) => w.name = Some(Some(s.trim().to_string()).filter(|s| !s.is_empty())),
            _ => {
                errors.insert("name".into(), json!(["Not a valid string."]));
            }
        }
    }
    if let Some(v) = body.get("language") {
        match v {
            Value::Null => w.language = Some(None),
            Value::String(s) => match valid_language(s) {
                Ok(()) => w.language = Some(Some(s.clone())),
                Err(msg) => {
                    errors.insert("language".into(), json!([msg]));
                }
            },
            _ => {
                errors.insert("language".into(), json!(["Not a valid string."]));
            }
        }
    }
    if let Some(v) = body.get("urns") {
        if urn_in_url {
            errors.insert(
                "urns".into(),
                json!(["Field not allowed when using URN in URL"]),
            );
        } else {
            match v {
                Value::Array(items) if items.len() > 100 => {
                    errors.insert("urns".into(), too_many(100));
                }
                Value::Array(items) => {
                    let mut item_errors = Map::new();
                    let mut urns = Vec::new();
                    for (i, item) in items.iter().enumerate() {
                        let result = match item {
                            Value::String(s) => normalize_urn(s, country.as_deref()),
                            _ => Err("Not a valid string.".to_string()),
                        };
                        match result {
                            Ok(u) if !urns.contains(&u) => urns.push(u),
                            Ok(_) => {}
                            Err(msg) => {
                                item_errors.insert(i.to_string(), json!([msg]));
                            }
                        }
                    }
                    if item_errors.is_empty() {
                        w.urns = Some(urns);
                    } else {
                        errors.insert("urns".into(), Value::Object(item_errors));
                    }
                }
                Value::Null => {
                    errors.insert("urns".into(), json!(["This field may not be null."]));
                }
                other => {
                    errors.insert(
                        "urns".into(),
                        json!([format!(
                            "Expected a list of items but got type \"{}\".",
                            type_name(other)
                        )]),
                    );
                }
            }
        }
    }
    if let Some(v) = body.get("groups") {
        if v.is_null() {
            errors.insert("groups".into(), json!(["This field may not be null."]));
        } else {
            match resolve_groups(inner, v) {
                Ok(ids) => w.groups = Some(ids),
                Err(e) => {
                    errors.insert("groups".into(), e);
                }
            }
        }
    }
    if let Some(v) = body.get("fields") {
        match v {
            Value::Object(map) if map.len() > 100 => {
                errors.insert("fields".into(), too_many(100));
            }
            Value::Object(map) => {
                let mut values = Vec::new();
                let mut value_errors = Map::new();
                let mut unknown = None;
                for (key, value) in map {
                    let Some(field) = inner.fields.iter().find(|f| &f.key == key) else {
                        unknown.get_or_insert_with(|| key.clone());
                        continue;
                    };
                    let raw = match value {
                        Value::Null => None,
                        Value::String(s) => Some(s.clone()),
                        Value::Number(n) => Some(n.to_string()),
                        Value::Bool(b) => Some(b.to_string()),
                        _ => {
                            value_errors.insert(key.clone(), json!(["Not a valid string."]));
                            continue;
                        }
                    };
                    if raw.as_deref().is_some_and(|s| s.contains('\0')) {
                        value_errors
                            .insert(key.clone(), json!(["Null characters are not allowed."]));
                        continue;
                    }
                    let stored = raw
                        .filter(|s| !s.is_empty())
                        .and_then(|s| normalize_field_value(&field.value_type, &s));
                    values.push((key.clone(), stored));
                }
                if let Some(key) = unknown {
                    errors.insert(
                        "fields".into(),
                        json!([format!("Invalid contact field key: {key}")]),
                    );
                } else if !value_errors.is_empty() {
                    errors.insert("fields".into(), Value::Object(value_errors));
                } else {
                    w.fields = Some(values);
                }
            }
            other => {
                errors.insert(
                    "fields".into(),
                    json!([format!(
                        "Expected a dictionary of items but got type \"{}\".",
                        type_name(other)
                    )]),
                );
            }
        }
    }
    if let Some(v) = body.get("note") {
        match v {
            Value::String(s) if s.chars().count() > 10_000 => {
                errors.insert(
                    "note".into(),
                    json!(["Ensure this field has no more than 10000 characters."]),
                );
            }
            Value::String(s) => w.note = Some(s.clone()),
            _ => {
                errors.insert("note".into(), json!(["Not a valid string."]));
            }
        }
    }
    if errors.is_empty() {
        Ok(w)
    } else {
        Err(Reply::bad_request(Value::Object(errors)))
    }
}

pub fn write(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let lookup = req.lookup(&["urn", "uuid"])?;
    let body = req.json_object()?;
    let country = inner.settings.workspace.country.clone();
    let (index, lookup_urn) = match &lookup {
        None => (None, None),
        Some(("uuid", u)) => {
            if !is_uuid(u) {
                return Err(Reply::bad_request(
                    json!({"detail": format!("Param 'uuid': {u} is not a valid UUID.")}),
                ));
            }
            match inner.contact_by_uuid(u) {
                Some(i) => (Some(i), None),
                None => return Err(Reply::not_found()),
            }
        }
        Some((_, raw)) => {
            let urn = normalize_urn(raw, country.as_deref()).map_err(|_| {
                Reply::bad_request(json!({"detail": format!("Invalid URN: {raw}")}))
            })?;
            (inner.contact_by_urn(&urn), Some(urn))
        }
    };
    let w = parse_write(inner, &body, lookup_urn.is_some())?;
    match index {
        Some(i) => update(inner, i, w),
        None => create(inner, w, lookup_urn),
    }
}

fn create(inner: &mut Inner, w: ContactWrite, lookup_urn: Option<String>) -> Result<Reply, Reply> {
    let urns = match lookup_urn {
        Some(u) => vec![u],
        None => w.urns.unwrap_or_default(),
    };
    if let Some(i) = urns.iter().position(|u| inner.contact_by_urn(u).is_some()) {
        let mut errors = Map::new();
        errors.insert(i.to_string(), json!(["URN is in use by another contact."]));
        return Err(Reply::bad_request(json!({ "urns": errors })));
    }
    let now = inner.now();
    let id = inner.next_id();
    let contact = Contact {
        id,
        uuid: uuid::Uuid::new_v4().to_string(),
        name: w.name.flatten(),
        language: w.language.flatten(),
        status: Status::Active,
        urns,
        groups: w.groups.unwrap_or_default(),
        fields: w
            .fields
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect::<HashMap<_, _>>(),
        notes: Vec::new(),
        created_on: now,
        modified_on: now,
        last_seen_on: None,
        deleted: false,
    };
    let json = inner.contact_json(&contact);
    inner.contacts.push(contact);
    Ok(Reply::json(StatusCode::CREATED, json))
}

fn update(inner: &mut Inner, i: usize, w: ContactWrite) -> Result<Reply, Reply> {
    if inner.contacts[i].deleted {
        return Err(Reply::bad_request(
            json!({"non_field_errors": ["Deleted contacts can't be modified."]}),
        ));
    }
    if w.groups.as_ref().is_some_and(|g| !g.is_empty())
        && inner.contacts[i].status != Status::Active
    {
        return Err(Reply::bad_request(
            json!({"groups": ["Non-active contacts can't be added to groups"]}),
        ));
    }
    // On update a URN owned by someone else is silently dropped.
    let urns = w.urns.map(|urns| {
        urns.into_iter()
            .filter(|u| inner.contact_by_urn(u).is_none_or(|owner| owner == i))
            .collect::<Vec<_>>()
    });
    let now = inner.now();
    let c = &mut inner.contacts[i];
    if let Some(name) = w.name {
        c.name = name;
    }
    if let Some(language) = w.language {
        c.language = language;
    }
    if let Some(urns) = urns {
        c.urns = urns;
    }
    if let Some(groups) = w.groups {
        c.groups = groups;
    }
    for (key, value) in w.fields.unwrap_or_default() {
        match value {
            Some(v) => c.fields.insert(key, v),
            None => c.fields.remove(&key),
        };
    }
    if let Some(text) = w.note {
        c.notes.push(Note {
            text,
            created_on: now,
        });
        if c.notes.len() > 5 {
            let excess = c.notes.len() - 5;
            c.notes.drain(..excess);
        }
    }
    c.modified_on = now;
    let json = inner.contact_json(&inner.contacts[i]);
    Ok(Reply::ok(json))
}

/// Soft delete: the URNs are freed, the contact shows under `deleted=true`.
pub fn soft_delete(inner: &mut Inner, i: usize) {
    let now = inner.now();
    let c = &mut inner.contacts[i];
    c.deleted = true;
    c.urns.clear();
    c.groups.clear();
    c.fields.clear();
    c.notes.clear();
    c.name = None;
    c.language = None;
    c.modified_on = now;
}

pub fn delete(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let Some((kind, value)) = req.lookup(&["urn", "uuid"])? else {
        return Err(Reply::bad_request(
            json!({"detail": "URL must contain one of the following parameters: urn, uuid"}),
        ));
    };
    let index = if kind == "uuid" {
        if !is_uuid(&value) {
            return Err(Reply::bad_request(
                json!({"detail": format!("Param 'uuid': {value} is not a valid UUID.")}),
            ));
        }
        inner.contact_by_uuid(&value)
    } else {
        normalize_urn(&value, inner.settings.workspace.country.as_deref())
            .ok()
            .and_then(|u| inner.contact_by_urn(&u))
    };
    match index {
        Some(i) if !inner.contacts[i].deleted => {
            soft_delete(inner, i);
            Ok(Reply::no_content())
        }
        _ => Err(Reply::not_found()),
    }
}

/// Finds a live contact by UUID or URN (the `contacts` lookup of
/// contact_actions, broadcasts...): URNs are normalised without a country.
pub fn find_live_contact(inner: &Inner, key: &str) -> Option<usize> {
    if is_uuid(key) {
        return inner
            .contact_by_uuid(key)
            .filter(|i| !inner.contacts[*i].deleted);
    }
    normalize_urn(key, None)
        .ok()
        .and_then(|u| inner.contact_by_urn(&u))
}
