//! `/api/v2/groups.json` (list, create, rename, delete), `/api/v2/fields.json`
//! (list, create, update by `?key=`) and `/api/v2/workspace.json`, with the
//! name/key rules and limits of reference §5.3, §5.4 and §2.

use axum::http::StatusCode;
use serde_json::{Map, Value, json};

use super::contacts::{is_uuid, type_name};
use super::http::{Reply, Req, Row, paginate};
use super::state::{Field, Group, Inner};

/// Workspace limit on groups and on fields (RapidPro's defaults).
const LIMIT: usize = 250;

fn limit_reached() -> Reply {
    Reply::detail(
        StatusCode::CONFLICT,
        "Cannot create object because workspace has reached limit.",
    )
}

pub fn list_groups(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let uuid = req.param("uuid");
    let name = req.param("name");
    if uuid.is_some() && name.is_some() {
        return Err(Reply::bad_request(
            json!({"detail": "You may only specify one of the uuid, name parameters"}),
        ));
    }
    let manual_only = req.flag("manual_only");
    let mut rows: Vec<Row> = inner
        .groups
        .iter()
        .filter(|g| uuid.is_none_or(|u| g.uuid == u))
        .filter(|g| name.is_none_or(|n| g.name.to_lowercase() == n.to_lowercase()))
        .filter(|g| !manual_only || (g.query.is_none() && !g.system))
        .map(|g| Row {
            key: g.created_on.timestamp_micros(),
            id: g.id,
            value: inner.group_json(g),
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse((r.key, r.id)));
    Ok(paginate(req, rows, inner.settings.page_size, true))
}

/// RapidPro's name validator for groups (and other named objects).
fn validate_name(value: Option<&Value>, max: usize) -> Result<String, Value> {
    match value {
        None => Err(json!(["This field is required."])),
        Some(Value::Null) => Err(json!(["This field may not be null."])),
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err(json!(["This field may not be blank."]))
        }
        Some(Value::String(s)) => {
            if s.chars().count() > max {
                return Err(json!([format!(
                    "Ensure this field has no more than {max} characters."
                )]));
            }
            if s.trim() != s {
                return Err(json!(["Cannot begin or end with whitespace."]));
            }
            if let Some(c) = s.chars().find(|c| ['"', '\\', '\0'].contains(c)) {
                return Err(json!([format!("Cannot contain the character: {c}")]));
            }
            Ok(s.clone())
        }
        Some(other) => Err(json!([format!(
            "Not a valid string, got type \"{}\".",
            type_name(other)
        )])),
    }
}

pub fn write_group(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let lookup = req.lookup(&["uuid"])?;
    let body = req.json_object()?;
    let target = match &lookup {
        Some((_, u)) => {
            if !is_uuid(u) {
                return Err(Reply::bad_request(
                    json!({"detail": format!("Param 'uuid': {u} is not a valid UUID.")}),
                ));
            }
            let Some(i) = inner.groups.iter().position(|g| &g.uuid == u) else {
                return Err(Reply::not_found());
            };
            if inner.groups[i].system {
                return Err(Reply::detail(
                    StatusCode::FORBIDDEN,
                    "Cannot modify system object.",
                ));
            }
            Some(i)
        }
        None => None,
    };
    let name = validate_name(body.get("name"), 64)
        .map_err(|e| Reply::bad_request(json!({ "name": e })))?;
    let lower = name.to_lowercase();
    if inner
        .groups
        .iter()
        .enumerate()
        .any(|(i, g)| Some(i) != target && g.name.to_lowercase() == lower)
    {
        return Err(Reply::bad_request(
            json!({"name": ["This field must be unique."]}),
        ));
    }
    match target {
        Some(i) => {
            inner.groups[i].name = name;
            let json = inner.group_json(&inner.groups[i]);
            Ok(Reply::ok(json))
        }
        None => {
            if inner.groups.len() >= LIMIT {
                return Err(limit_reached());
            }
            let now = inner.now();
            let group = Group {
                id: inner.next_id(),
                uuid: uuid::Uuid::new_v4().to_string(),
                name,
                query: None,
                system: false,
                created_on: now,
            };
            let json = inner.group_json(&group);
            inner.groups.push(group);
            Ok(Reply::json(StatusCode::CREATED, json))
        }
    }
}

pub fn delete_group(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let Some((_, u)) = req.lookup(&["uuid"])? else {
        return Err(Reply::bad_request(
            json!({"detail": "URL must contain one of the following parameters: uuid"}),
        ));
    };
    if !is_uuid(&u) {
        return Err(Reply::bad_request(
            json!({"detail": format!("Param 'uuid': {u} is not a valid UUID.")}),
        ));
    }
    let Some(i) = inner.groups.iter().position(|g| g.uuid == u) else {
        return Err(Reply::not_found());
    };
    if inner.groups[i].system {
        return Err(Reply::detail(
            StatusCode::FORBIDDEN,
            "Cannot delete system object.",
        ));
    }
    let group = inner.groups.remove(i);
    for c in &mut inner.contacts {
        c.groups.retain(|g| *g != group.id);
    }
    Ok(Reply::no_content())
}

pub fn list_fields(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let key = req.param("key");
    let mut rows: Vec<Row> = inner
        .fields
        .iter()
        .filter(|f| key.is_none_or(|k| f.key == k))
        .map(|f| Row {
            key: f.created_on.timestamp_micros(),
            id: f.id,
            value: Inner::field_json(f),
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse((r.key, r.id)));
    Ok(paginate(req, rows, inner.settings.page_size, true))
}

const FIELD_TYPES: [&str; 6] = ["text", "number", "datetime", "state", "district", "ward"];
const RESERVED_KEYS: [&str; 6] = ["has", "is", "fields", "urns", "created_on", "last_seen_on"];

/// The key RapidPro generates from a field name.
pub fn field_key(name: &str) -> String {
    let mut key = String::new();
    let mut gap = false;
    for c in name.trim().to_lowercase().chars() {
        if c.is_ascii_alphanumeric() {
            if gap && !key.is_empty() {
                key.push('_');
            }
            gap = false;
            key.push(c);
        } else {
            gap = true;
        }
    }
    key
}

fn valid_key(key: &str) -> bool {
    key.len() <= 36
        && key.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !RESERVED_KEYS.contains(&key)
}

pub fn write_field(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let lookup = req.lookup(&["key"])?;
    let body = req.json_object()?;
    let target = match &lookup {
        Some((_, key)) => match inner.fields.iter().position(|f| &f.key == key) {
            Some(i) => Some(i),
            None => return Err(Reply::not_found()),
        },
        None => None,
    };
    let mut errors = Map::new();
    let name_value = body.get("name").or_else(|| body.get("label"));
    let type_value = body.get("type").or_else(|| body.get("value_type"));
    let mut name = None;
    if let Some(v) = name_value {
        match v {
            Value::String(s) if s.chars().count() > 36 => {
                errors.insert(
                    "name".into(),
                    json!(["Ensure this field has no more than 36 characters."]),
                );
            }
            Value::String(s)
                if s.is_empty()
                    || s.trim() != s
                    || !s
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ' ') =>
            {
                errors.insert(
                    "name".into(),
                    json!(["Can only contain letters, numbers and hypens."]),
                );
            }
            Value::String(s) => {
                let lower = s.to_lowercase();
                if inner
                    .fields
                    .iter()
                    .enumerate()
                    .any(|(i, f)| Some(i) != target && f.name.to_lowercase() == lower)
                {
                    errors.insert("name".into(), json!(["This field must be unique."]));
                } else {
                    name = Some(s.clone());
                }
            }
            Value::Null => {
                errors.insert("name".into(), json!(["This field may not be null."]));
            }
            other => {
                errors.insert(
                    "name".into(),
                    json!([format!(
                        "Not a valid string, got type \"{}\".",
                        type_name(other)
                    )]),
                );
            }
        }
    }
    let mut value_type = None;
    if let Some(v) = type_value {
        let t = match v.as_str() {
            Some("numeric") => Some("number"),
            Some(t) if FIELD_TYPES.contains(&t) => Some(t),
            _ => None,
        };
        match t {
            Some(t) => value_type = Some(t.to_string()),
            None => {
                let shown = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                errors.insert(
                    "type".into(),
                    json!([format!("\"{shown}\" is not a valid choice.")]),
                );
            }
        }
    }
    if !errors.is_empty() {
        return Err(Reply::bad_request(Value::Object(errors)));
    }
    match target {
        Some(i) => {
            let f = &mut inner.fields[i];
            if let Some(name) = name {
                f.name = name;
            }
            if let Some(t) = value_type {
                f.value_type = t;
            }
            Ok(Reply::ok(Inner::field_json(&inner.fields[i])))
        }
        None => {
            let Some(name) = name else {
                return Err(Reply::bad_request(
                    json!({"non_field_errors": ["Field 'name' is required."]}),
                ));
            };
            let Some(value_type) = value_type else {
                return Err(Reply::bad_request(
                    json!({"non_field_errors": ["Field 'type' is required."]}),
                ));
            };
            let key = field_key(&name);
            if !valid_key(&key) {
                return Err(Reply::bad_request(json!({"name": [format!(
                    "Generated key \"{key}\" is invalid or a reserved name."
                )]})));
            }
            if inner.fields.iter().any(|f| f.key == key) {
                return Err(Reply::bad_request(
                    json!({"name": ["This field must be unique."]}),
                ));
            }
            if inner.fields.len() >= LIMIT {
                return Err(limit_reached());
            }
            let now = inner.now();
            let field = Field {
                id: inner.next_id(),
                key,
                name,
                value_type,
                created_on: now,
            };
            let json = Inner::field_json(&field);
            inner.fields.push(field);
            Ok(Reply::json(StatusCode::CREATED, json))
        }
    }
}

pub fn workspace(inner: &Inner) -> Reply {
    let w = &inner.settings.workspace;
    Reply::ok(json!({
        "uuid": w.uuid,
        "name": w.name,
        "country": w.country,
        "languages": w.languages,
        "timezone": w.timezone,
        "date_style": w.date_style,
        "anon": false,
        "credits": {"used": -1, "remaining": -1},
        "primary_language": w.languages.first(),
    }))
}

#[cfg(test)]
mod tests {
    use super::field_key;

    #[test]
    fn keys_from_names() {
        assert_eq!(field_key("Nick name"), "nick_name");
        assert_eq!(field_key("Registered On"), "registered_on");
        assert_eq!(field_key("Facility - ID 2"), "facility_id_2");
    }
}
