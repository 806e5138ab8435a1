//! Broadcasts and messages: `POST/GET /api/v2/broadcasts.json` (validation
//! of reference §5.7; created `pending`), the explicit processing step that
//! RapidPro's mailroom does asynchronously ([`process_pending`]: one message
//! per recipient, auto-created contacts for unknown URNs, active-only groups,
//! failed messages for non-active or unroutable contacts), inbound messages
//! ([`receive`], which resumes a waiting run), `GET /api/v2/messages.json` and the single-message
//! `POST /api/v2/messages.json` (§5.8; `queued` until processed, then `sent`).

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::contacts::{find_live_contact, resolve_groups, type_name};
use super::http::{Reply, Req, Row, in_range, paginate};
use super::state::{Contact, Inner, Status, format_dt};
use super::urn::normalize_urn;

#[derive(Debug, Clone)]
pub struct Broadcast {
    pub id: u64,
    pub uuid: String,
    /// `pending|queued|started|completed|failed|interrupted`.
    pub status: String,
    pub total: i64,
    pub started: i64,
    pub urns: Vec<String>,
    /// Contact ids.
    pub contacts: Vec<u64>,
    pub groups: Vec<u64>,
    pub text: Map<String, Value>,
    pub quick_replies: Map<String, Value>,
    pub base_language: String,
    pub created_on: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct Message {
    pub id: u64,
    pub uuid: String,
    pub contact: u64,
    pub urn: Option<String>,
    /// `in|out`.
    pub direction: &'static str,
    /// `queued|handled|wired|sent|delivered|read|errored|failed`.
    pub status: &'static str,
    pub text: String,
    pub broadcast: Option<u64>,
    /// The flow UUID of an outgoing flow message or of an inbound message
    /// a run consumed.
    pub flow: Option<String>,
    pub created_on: DateTime<Utc>,
    pub modified_on: DateTime<Utc>,
    pub sent_on: Option<DateTime<Utc>>,
}

/// The recipients of a broadcast or a flow start (`urns`, `contacts`,
/// `groups`), validated as RapidPro does; problems go into `errors`.
pub(super) struct Recipients {
    pub urns: Vec<String>,
    pub contacts: Vec<u64>,
    pub groups: Vec<u64>,
}

pub(super) fn parse_recipients(
    inner: &Inner,
    body: &Map<String, Value>,
    country: Option<&str>,
    errors: &mut Map<String, Value>,
) -> Recipients {
    let mut urns = Vec::new();
    if let Some(v) = body.get("urns") {
        if let Some(e) = list_error(v) {
            errors.insert("urns".into(), e);
        } else {
            let mut item_errors = Map::new();
            for (i, item) in v.as_array().into_iter().flatten().enumerate() {
                match item.as_str().map(|s| normalize_urn(s, country)) {
                    Some(Ok(u)) if !urns.contains(&u) => urns.push(u),
                    Some(Ok(_)) => {}
                    Some(Err(msg)) => {
                        item_errors.insert(i.to_string(), json!([msg]));
                    }
                    None => {
                        item_errors.insert(i.to_string(), json!(["Not a valid string."]));
                    }
                }
            }
            if !item_errors.is_empty() {
                errors.insert("urns".into(), Value::Object(item_errors));
            }
        }
    }
    let mut contacts = Vec::new();
    if let Some(v) = body.get("contacts") {
        if let Some(e) = list_error(v) {
            errors.insert("contacts".into(), e);
        } else {
            for item in v.as_array().into_iter().flatten() {
                let key = item
                    .as_str()
                    .map_or_else(|| item.to_string(), str::to_string);
                match find_live_contact(inner, &key) {
                    Some(i) => contacts.push(inner.contacts[i].id),
                    None => {
                        errors.insert("contacts".into(), json!([format!("No such object: {key}")]));
                        break;
                    }
                }
            }
        }
    }
    let mut groups = Vec::new();
    if let Some(v) = body.get("groups") {
        // Smart groups are allowed in broadcasts; the sandbox only has manual ones.
        match resolve_groups(inner, v) {
            Ok(ids) => groups = ids,
            Err(e) => {
                errors.insert("groups".into(), e);
            }
        }
    }
    Recipients {
        urns,
        contacts,
        groups,
    }
}

fn list_error(value: &Value) -> Option<Value> {
    match value {
        Value::Array(items) if items.len() > 100 => {
            Some(json!(["Ensure this field has no more than 100 elements."]))
        }
        Value::Array(_) => None,
        other => Some(json!([format!(
            "Expected a list of items but got type \"{}\".",
            type_name(other)
        )])),
    }
}

fn valid_text(s: &str) -> Result<(), &'static str> {
    if s.trim().is_empty() {
        Err("This field may not be blank.")
    } else if s.chars().count() > 4096 {
        Err("Ensure this field has no more than 4096 characters.")
    } else {
        Ok(())
    }
}

fn is_language_code(k: &str) -> bool {
    k.len() == 3 && k.chars().all(|c| c.is_ascii_lowercase())
}

pub fn create(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let body = req.json_object()?;
    let mut errors = Map::new();
    let country = inner.settings.workspace.country.clone();
    let first_language = inner
        .settings
        .workspace
        .languages
        .first()
        .cloned()
        .unwrap_or_else(|| "eng".to_string());

    let Recipients {
        urns,
        contacts,
        groups,
    } = parse_recipients(inner, &body, country.as_deref(), &mut errors);
    let mut text = Map::new();
    match body.get("text") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => match valid_text(s) {
            Ok(()) => {
                text.insert(first_language.clone(), Value::String(s.clone()));
            }
            Err(msg) => {
                errors.insert("text".into(), json!([msg]));
            }
        },
        Some(Value::Object(map)) if map.is_empty() => {
            errors.insert("text".into(), json!(["This dictionary may not be empty."]));
        }
        Some(Value::Object(map)) if map.len() > 50 => {
            errors.insert(
                "text".into(),
                json!(["Ensure this field has no more than 50 elements."]),
            );
        }
        Some(Value::Object(map)) => {
            for (lang, value) in map {
                let problem = if !is_language_code(lang) {
                    Some("Not an allowed ISO 639-3 language code.")
                } else {
                    match value.as_str() {
                        Some(s) => valid_text(s).err(),
                        None => Some("Not a valid string."),
                    }
                };
                if let Some(msg) = problem {
                    errors.insert("text".into(), json!([msg]));
                    break;
                }
                text.insert(lang.clone(), value.clone());
            }
        }
        Some(other) => {
            errors.insert(
                "text".into(),
                json!([format!(
                    "Must be a string or a dictionary, got type \"{}\".",
                    type_name(other)
                )]),
            );
        }
    }
    if let Some(v) = body.get("attachments")
        && v.as_array().is_none_or(|a| !a.is_empty())
        && v.as_object().is_none_or(|o| !o.is_empty())
    {
        // Media uploads are not simulated, so no attachment can exist.
        let first = v.as_array().and_then(|a| a.first()).map_or_else(
            || v.to_string(),
            |x| x.as_str().unwrap_or_default().to_string(),
        );
        errors.insert(
            "attachments".into(),
            json!([format!("No such object: {first}")]),
        );
    }
    let mut quick_replies = Map::new();
    match body.get("quick_replies") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) if items.len() > 10 => {
            errors.insert(
                "quick_replies".into(),
                json!(["Ensure this field has no more than 10 elements."]),
            );
        }
        Some(Value::Array(items)) => {
            quick_replies.insert(first_language.clone(), Value::Array(items.clone()));
        }
        Some(Value::Object(map)) => quick_replies = map.clone(),
        Some(other) => {
            errors.insert(
                "quick_replies".into(),
                json!([format!(
                    "Expected a list of items but got type \"{}\".",
                    type_name(other)
                )]),
            );
        }
    }
    let base_language = match body.get("base_language") {
        Some(Value::String(b)) => Some(b.clone()),
        _ => None,
    };
    if !errors.is_empty() {
        return Err(Reply::bad_request(Value::Object(errors)));
    }
    if text.is_empty() {
        return Err(Reply::bad_request(
            json!({"non_field_errors": ["Must provide either text or attachments."]}),
        ));
    }
    if urns.is_empty() && contacts.is_empty() && groups.is_empty() {
        return Err(Reply::bad_request(
            json!({"non_field_errors": ["Must provide either urns, contacts or groups."]}),
        ));
    }
    let base_language = match base_language {
        Some(b) if !text.contains_key(&b) => {
            return Err(Reply::bad_request(
                json!({"non_field_errors": ["No text translation provided in base language."]}),
            ));
        }
        Some(b) => b,
        None => text.keys().next().cloned().unwrap_or(first_language),
    };
    let now = inner.now();
    let broadcast = Broadcast {
        id: inner.next_id(),
        uuid: uuid::Uuid::new_v4().to_string(),
        status: "pending".into(),
        total: -1,
        started: 0,
        urns,
        contacts,
        groups,
        text,
        quick_replies,
        base_language,
        created_on: now,
    };
    let json = broadcast_json(inner, &broadcast);
    inner.broadcasts.push(broadcast);
    Ok(Reply::json(StatusCode::CREATED, json))
}

pub fn broadcast_json(inner: &Inner, b: &Broadcast) -> Value {
    let contacts: Vec<Value> = b
        .contacts
        .iter()
        .filter_map(|id| inner.contacts.iter().find(|c| c.id == *id))
        .map(|c| json!({"uuid": c.uuid, "name": c.name}))
        .collect();
    let groups: Vec<Value> = b
        .groups
        .iter()
        .filter_map(|id| inner.group_by_id(*id))
        .map(|g| json!({"uuid": g.uuid, "name": g.name}))
        .collect();
    let attachments: Map<String, Value> = b.text.keys().map(|k| (k.clone(), json!([]))).collect();
    let mut quick_replies: Map<String, Value> =
        b.text.keys().map(|k| (k.clone(), json!([]))).collect();
    for (lang, items) in &b.quick_replies {
        let items: Vec<Value> = items
            .as_array()
            .into_iter()
            .flatten()
            .map(|q| match q {
                Value::String(s) => json!({"type": "text", "text": s}),
                other => other.clone(),
            })
            .collect();
        quick_replies.insert(lang.clone(), Value::Array(items));
    }
    json!({
        "uuid": b.uuid,
        "id": b.id,
        "status": b.status,
        "progress": {"total": b.total, "started": b.started},
        "urns": b.urns,
        "contacts": contacts,
        "groups": groups,
        "text": b.text,
        "attachments": attachments,
        "quick_replies": quick_replies,
        "base_language": b.base_language,
        "created_on": format_dt(&b.created_on),
    })
}

pub fn list_broadcasts(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let uuid = req.param("uuid");
    let id = req.param("id");
    let mut rows: Vec<Row> = inner
        .broadcasts
        .iter()
        .filter(|b| uuid.is_none_or(|u| b.uuid == u))
        .filter(|b| id.is_none_or(|i| b.id.to_string() == i))
        .filter(|b| in_range(req, &b.created_on))
        .map(|b| Row {
            key: b.created_on.timestamp_micros(),
            id: b.id,
            value: broadcast_json(inner, b),
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse((r.key, r.id)));
    Ok(paginate(req, rows, inner.settings.page_size, true))
}

/// A new active contact with just this URN (auto-created recipients).
pub fn new_contact(inner: &mut Inner, urn: String) -> usize {
    let now = inner.now();
    let contact = Contact {
        id: inner.next_id(),
        uuid: uuid::Uuid::new_v4().to_string(),
        name: None,
        language: None,
        status: Status::Active,
        urns: vec![urn],
        groups: Vec::new(),
        fields: Default::default(),
        notes: Vec::new(),
        created_on: now,
        modified_on: now,
        last_seen_on: None,
        deleted: false,
    };
    inner.contacts.push(contact);
    inner.contacts.len() - 1
}

/// What mailroom does after a broadcast POST: resolves the recipients and
/// creates one outgoing message each; the broadcast becomes `completed`.
/// Returns the number of broadcasts processed.
pub fn process_pending(inner: &mut Inner) -> usize {
    let pending: Vec<usize> = (0..inner.broadcasts.len())
        .filter(|i| inner.broadcasts[*i].status == "pending")
        .collect();
    for bi in &pending {
        let b = inner.broadcasts[*bi].clone();
        let mut recipients: Vec<usize> = Vec::new();
        let add = |i: usize, recipients: &mut Vec<usize>| {
            if !recipients.contains(&i) {
                recipients.push(i);
            }
        };
        for urn in &b.urns {
            let i = match inner.contact_by_urn(urn) {
                Some(i) => i,
                None => new_contact(inner, urn.clone()),
            };
            add(i, &mut recipients);
        }
        for id in &b.contacts {
            if let Some(i) = inner
                .contacts
                .iter()
                .position(|c| c.id == *id && !c.deleted)
            {
                add(i, &mut recipients);
            }
        }
        if !b.groups.is_empty() {
            // With groups, everyone goes through the active-only query.
            recipients.retain(|i| inner.contacts[*i].status == Status::Active);
            for (i, c) in inner.contacts.iter().enumerate() {
                if !c.deleted
                    && c.status == Status::Active
                    && c.groups.iter().any(|g| b.groups.contains(g))
                    && !recipients.contains(&i)
                {
                    recipients.push(i);
                }
            }
        }
        for i in &recipients {
            let c = &inner.contacts[*i];
            let template = c
                .language
                .as_ref()
                .and_then(|l| b.text.get(l))
                .or_else(|| b.text.get(&b.base_language))
                .and_then(Value::as_str)
                .unwrap_or_default();
            let name = c.name.clone().unwrap_or_default();
            let first_name = name
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            let text = template
                .replace("@contact.first_name", &first_name)
                .replace("@contact.name", &name);
            let urn = c.urns.first().cloned();
            let contact = c.id;
            let active = c.status == Status::Active;
            let now = inner.now();
            let status = if active && urn.is_some() {
                "sent"
            } else {
                "failed"
            };
            let message = Message {
                id: inner.next_id(),
                uuid: uuid::Uuid::new_v4().to_string(),
                contact,
                urn,
                direction: "out",
                status,
                text,
                broadcast: Some(b.id),
                flow: None,
                created_on: now,
                modified_on: now,
                sent_on: (status == "sent").then_some(now),
            };
            inner.messages.push(message);
        }
        let n = i64::try_from(recipients.len()).unwrap_or(i64::MAX);
        let bc = &mut inner.broadcasts[*bi];
        bc.status = "completed".into();
        bc.total = n;
        bc.started = n;
    }
    pending.len()
}

/// An inbound message from `urn` (the contact is created when unknown).
/// A stopped contact becomes active again, as in mailroom; a blocked
/// contact's message is ignored (not stored). A run of the contact waiting
/// for a message consumes it (the message gets the run's `flow`) and goes
/// on. Returns the contact UUID.
pub fn receive(inner: &mut Inner, urn: &str, text: &str) -> Result<String, String> {
    let urn = normalize_urn(urn, inner.settings.workspace.country.as_deref())?;
    let i = match inner.contact_by_urn(&urn) {
        Some(i) => i,
        None => new_contact(inner, urn.clone()),
    };
    let now = inner.now();
    let c = &mut inner.contacts[i];
    let uuid = c.uuid.clone();
    if c.status == Status::Blocked {
        return Ok(uuid);
    }
    if c.status == Status::Stopped {
        c.status = Status::Active;
    }
    c.last_seen_on = Some(now);
    c.modified_on = now;
    let contact = c.id;
    let message = Message {
        id: inner.next_id(),
        uuid: uuid::Uuid::new_v4().to_string(),
        contact,
        urn: Some(urn),
        direction: "in",
        status: "handled",
        text: text.to_string(),
        broadcast: None,
        flow: None,
        created_on: now,
        modified_on: now,
        sent_on: None,
    };
    inner.messages.push(message);
    let mi = inner.messages.len() - 1;
    if let Some(flow) = super::engine::resume_on_message(inner, contact, text) {
        inner.messages[mi].flow = Some(flow);
    }
    Ok(uuid)
}

pub fn message_json(inner: &Inner, m: &Message) -> Value {
    let contact = inner
        .contacts
        .iter()
        .find(|c| c.id == m.contact)
        .map_or(Value::Null, |c| json!({"uuid": c.uuid, "name": c.name}));
    let channel = m.urn.as_ref().map_or(
        Value::Null,
        |_| json!({"uuid": SANDBOX_CHANNEL, "name": "Sandbox"}),
    );
    json!({
        "uuid": m.uuid,
        "id": m.id,
        "contact": contact,
        "urn": m.urn,
        "channel": channel,
        "direction": m.direction,
        "type": "text",
        "status": m.status,
        "archived": false,
        "visibility": "visible",
        "text": m.text,
        "labels": [],
        "flow": m.flow.as_deref().map_or(Value::Null, |f| super::runs::flow_ref(inner, f)),
        "attachments": [],
        "quick_replies": [],
        "created_on": format_dt(&m.created_on),
        "sent_on": m.sent_on.as_ref().map(format_dt),
        "modified_on": format_dt(&m.modified_on),
        "media": null,
        "broadcast": m.broadcast,
    })
}

const SANDBOX_CHANNEL: &str = "9a8b001e-a913-486c-80f4-1356e23f582e";

fn in_folder(m: &Message, folder: &str) -> bool {
    match folder {
        "inbox" => m.direction == "in" && m.flow.is_none(),
        "flows" => m.direction == "in" && m.flow.is_some(),
        "archived" => false,
        "outbox" => m.direction == "out" && matches!(m.status, "queued" | "errored"),
        "sent" => {
            m.direction == "out" && matches!(m.status, "wired" | "sent" | "delivered" | "read")
        }
        "failed" => m.direction == "out" && m.status == "failed",
        _ => false,
    }
}

pub fn list_messages(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let exclusive = ["contact", "folder", "label", "broadcast"];
    if exclusive.iter().filter(|p| req.param(p).is_some()).count() > 1 {
        return Err(Reply::bad_request(json!({"detail":
            "You may only specify one of the contact, folder, label, broadcast parameters"})));
    }
    let uuid = req.param("uuid");
    let id = req.param("id");
    let broadcast = req.param("broadcast");
    let folder = req.param("folder").map(str::to_lowercase);
    let contact = match req.param("contact") {
        Some(u) => match inner.contacts.iter().find(|c| c.uuid == u) {
            Some(c) => Some(c.id),
            None => return Ok(paginate(req, Vec::new(), inner.settings.page_size, true)),
        },
        None => None,
    };
    if req.param("label").is_some() {
        return Ok(paginate(req, Vec::new(), inner.settings.page_size, true));
    }
    let by_sent_on = folder.as_deref() == Some("sent");
    let mut rows: Vec<Row> = inner
        .messages
        .iter()
        .filter(|m| uuid.is_none_or(|u| m.uuid == u))
        .filter(|m| id.is_none_or(|i| m.id.to_string() == i))
        .filter(|m| {
            broadcast.is_none_or(|b| m.broadcast.map(|x| x.to_string()).as_deref() == Some(b))
        })
        .filter(|m| contact.is_none_or(|c| m.contact == c))
        .filter(|m| folder.as_deref().is_none_or(|f| in_folder(m, f)))
        .filter(|m| in_range(req, &m.created_on))
        .map(|m| Row {
            key: if by_sent_on {
                m.sent_on.unwrap_or(m.created_on).timestamp_micros()
            } else {
                m.created_on.timestamp_micros()
            },
            id: m.id,
            value: message_json(inner, m),
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse((r.key, r.id)));
    Ok(paginate(req, rows, inner.settings.page_size, true))
}

/// `POST messages.json`: one message to one existing contact.
pub fn send(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let body = req.json_object()?;
    let mut errors = Map::new();
    let mut contact = None;
    match body.get("contact") {
        None => {
            errors.insert("contact".into(), json!(["This field is required."]));
        }
        Some(Value::Null) => {
            errors.insert("contact".into(), json!(["This field may not be null."]));
        }
        Some(v) => {
            let key = v.as_str().map_or_else(|| v.to_string(), str::to_string);
            match find_live_contact(inner, &key) {
                Some(i) => contact = Some(i),
                None => {
                    errors.insert("contact".into(), json!([format!("No such object: {key}")]));
                }
            }
        }
    }
    let text = match body.get("text") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() > 4096 => {
            errors.insert(
                "text".into(),
                json!(["Ensure this field has no more than 4096 characters."]),
            );
            None
        }
        Some(Value::String(s)) => Some(s.clone()).filter(|s| !s.is_empty()),
        Some(_) => {
            errors.insert("text".into(), json!(["Not a valid string."]));
            None
        }
    };
    match body.get("attachments") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(Value::Array(a)) if a.len() > 10 => {
            errors.insert(
                "attachments".into(),
                json!(["Ensure this field has no more than 10 elements."]),
            );
        }
        Some(v) => {
            // Media uploads are not simulated, so no attachment can exist.
            let first = v.as_array().and_then(|a| a.first()).map_or_else(
                || v.to_string(),
                |x| x.as_str().unwrap_or_default().to_string(),
            );
            errors.insert(
                "attachments".into(),
                json!([format!("No such object: {first}")]),
            );
        }
    }
    if let Some(Value::Array(q)) = body.get("quick_replies")
        && q.len() > 10
    {
        errors.insert(
            "quick_replies".into(),
            json!(["Ensure this field has no more than 10 elements."]),
        );
    }
    if !errors.is_empty() {
        return Err(Reply::bad_request(Value::Object(errors)));
    }
    let Some(text) = text else {
        return Err(Reply::bad_request(
            json!({"non_field_errors": ["Must provide either text or attachments."]}),
        ));
    };
    let Some(i) = contact else {
        return Err(Reply::server_error());
    };
    let c = &inner.contacts[i];
    let routable = c.status == Status::Active && !c.urns.is_empty();
    let urn = if routable {
        c.urns.first().cloned()
    } else {
        None
    };
    let contact = c.id;
    let now = inner.now();
    let message = Message {
        id: inner.next_id(),
        uuid: uuid::Uuid::new_v4().to_string(),
        contact,
        urn,
        direction: "out",
        status: if routable { "queued" } else { "failed" },
        text,
        broadcast: None,
        flow: None,
        created_on: now,
        modified_on: now,
        sent_on: None,
    };
    let json = message_json(inner, &message);
    inner.messages.push(message);
    Ok(Reply::json(StatusCode::CREATED, json))
}

/// What courier does: queued outgoing messages become `sent`. Returns how many.
pub fn send_queued(inner: &mut Inner) -> usize {
    let queued: Vec<usize> = (0..inner.messages.len())
        .filter(|i| inner.messages[*i].direction == "out" && inner.messages[*i].status == "queued")
        .collect();
    for i in &queued {
        let now = inner.now();
        let m = &mut inner.messages[*i];
        m.status = "sent";
        m.sent_on = Some(now);
        m.modified_on = now;
    }
    queued.len()
}
