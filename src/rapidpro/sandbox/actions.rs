//! `POST /api/v2/contact_actions.json`: add, remove, block, unblock,
//! interrupt, archive_messages/archive and delete over at most 100 contacts,
//! with the validation messages and status effects of reference §5.2.

use serde_json::{Map, Value, json};

use super::contacts::{find_live_contact, soft_delete, type_name};
use super::http::{Reply, Req};
use super::state::{Inner, Status};

const ACTIONS: [&str; 8] = [
    "add",
    "remove",
    "block",
    "unblock",
    "interrupt",
    "archive_messages",
    "delete",
    "archive",
];

pub fn post(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let body = req.json_object()?;
    let mut errors = Map::new();
    let mut contacts: Vec<usize> = Vec::new();
    match body.get("contacts") {
        None => {
            errors.insert("contacts".into(), json!(["This field is required."]));
        }
        Some(Value::Array(items)) if items.is_empty() => {
            errors.insert("contacts".into(), json!(["Contacts can't be empty."]));
        }
        Some(Value::Array(items)) if items.len() > 100 => {
            errors.insert(
                "contacts".into(),
                json!(["Ensure this field has no more than 100 elements."]),
            );
        }
        Some(Value::Array(items)) => {
            for item in items {
                let key = match item {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => {
                        errors.insert("contacts".into(), json!(["Must be a string or integer"]));
                        break;
                    }
                };
                match find_live_contact(inner, &key) {
                    Some(i) => {
                        if !contacts.contains(&i) {
                            contacts.push(i);
                        }
                    }
                    None => {
                        errors.insert("contacts".into(), json!([format!("No such object: {key}")]));
                        break;
                    }
                }
            }
        }
        Some(other) => {
            errors.insert(
                "contacts".into(),
                json!([format!(
                    "Expected a list of items but got type \"{}\".",
                    type_name(other)
                )]),
            );
        }
    }
    let action = match body.get("action") {
        None => {
            errors.insert("action".into(), json!(["This field is required."]));
            None
        }
        Some(Value::String(a)) if ACTIONS.contains(&a.as_str()) => Some(a.clone()),
        Some(other) => {
            let shown = other
                .as_str()
                .map_or_else(|| other.to_string(), str::to_string);
            errors.insert(
                "action".into(),
                json!([format!("\"{shown}\" is not a valid choice.")]),
            );
            None
        }
    };
    let mut group = None;
    match body.get("group") {
        None => {}
        Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {
            errors.insert("group".into(), json!(["This field may not be null."]));
        }
        Some(Value::String(s)) => match inner.find_group(s) {
            Some(g) if g.query.is_some() => {
                errors.insert(
                    "group".into(),
                    json!([format!("Contact group must not be query based: {s}")]),
                );
            }
            Some(g) => group = Some(g.id),
            None => {
                errors.insert("group".into(), json!([format!("No such object: {s}")]));
            }
        },
        Some(_) => {
            errors.insert("group".into(), json!(["Must be a string or integer"]));
        }
    }
    if !errors.is_empty() {
        return Err(Reply::bad_request(Value::Object(errors)));
    }
    let action = action.unwrap_or_default();
    let needs_group = action == "add" || action == "remove";
    let group_given = body.get("group").is_some_and(|g| !g.is_null());
    if needs_group && !group_given {
        return Err(Reply::bad_request(json!({"non_field_errors": [format!(
            "For action \"{action}\" you should also specify a group"
        )]})));
    }
    if !needs_group && group_given {
        return Err(Reply::bad_request(json!({"non_field_errors": [format!(
            "For action \"{action}\" you should not specify a group"
        )]})));
    }
    if action == "add" {
        let inactive: Vec<String> = contacts
            .iter()
            .filter(|i| inner.contacts[**i].status != Status::Active)
            .map(|i| inner.contacts[*i].uuid.clone())
            .collect();
        if !inactive.is_empty() {
            return Err(Reply::bad_request(json!({"non_field_errors": [format!(
                "Non-active contacts cannot be added to groups: {}",
                inactive.join(", ")
            )]})));
        }
    }
    for i in contacts {
        match action.as_str() {
            "delete" => {
                soft_delete(inner, i);
                continue;
            }
            // Archiving applies to the contacts' incoming messages, which the
            // sandbox does not keep yet; interrupt ends flows, which it has no
            // sessions of. Neither modifies the contact.
            "archive" | "archive_messages" | "interrupt" => continue,
            _ => {}
        }
        let now = inner.now();
        let c = &mut inner.contacts[i];
        match (action.as_str(), group) {
            ("add", Some(g)) if !c.groups.contains(&g) => c.groups.push(g),
            ("remove", Some(g)) => c.groups.retain(|x| *x != g),
            ("block", _) => {
                c.status = Status::Blocked;
                c.groups.clear();
            }
            ("unblock", _) => c.status = Status::Active,
            _ => {}
        }
        c.modified_on = now;
    }
    Ok(Reply::no_content())
}
