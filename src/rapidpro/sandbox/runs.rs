//! Flow starts and runs: `POST/GET /api/v2/flow_starts.json` (validation
//! of reference §5.6; created `pending`), their processing step
//! ([`process_pending`]: one waiting run per recipient, exclusions, archived
//! flows fail, messaging flows interrupt other waiting runs; each new run is
//! handed to the flow engine, `engine`, which walks its definition),
//! completing a run with results ([`complete_run`], a shortcut standing in
//! for the contact's replies) and `GET /api/v2/runs.json` (§5.9).

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::broadcasts::{Recipients, new_contact, parse_recipients};
use super::contacts::is_uuid;
use super::groups::field_key;
use super::http::{Reply, Req, Row, in_range, paginate};
use super::state::{Inner, Status, format_dt};

#[derive(Debug, Clone)]
pub struct FlowStart {
    pub id: u64,
    pub uuid: String,
    pub flow: String,
    pub status: String,
    pub total: i64,
    pub started: i64,
    pub urns: Vec<String>,
    pub contacts: Vec<u64>,
    pub groups: Vec<u64>,
    pub params: Value,
    pub restart_participants: bool,
    pub exclude_active: bool,
    pub created_on: DateTime<Utc>,
    pub modified_on: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct Run {
    pub id: u64,
    pub uuid: String,
    pub flow: String,
    pub contact: u64,
    pub start: Option<String>,
    pub responded: bool,
    pub path: Vec<Value>,
    pub values: Map<String, Value>,
    pub created_on: DateTime<Utc>,
    pub modified_on: DateTime<Utc>,
    pub exited_on: Option<DateTime<Utc>>,
    /// None while waiting; `completed|interrupted|expired|failed`.
    pub exit_type: Option<String>,
    /// The start's `params` (`@trigger.params`).
    pub params: Value,
    /// Where the engine continues (None once ended, or for a run the
    /// engine left waiting without a wait, e.g. a flow without nodes).
    pub cursor: Option<super::engine::Cursor>,
    /// When a run waiting for a message expires (flow's `expire_after_minutes`).
    pub expires_on: Option<DateTime<Utc>>,
    /// The last message text the run consumed (`@input`).
    pub input: Option<String>,
    /// The last webhook's `{"status", "json"}` (`@webhook`).
    pub webhook: Option<Value>,
    /// Result key -> the operand it was read from (the resthook's `input`).
    pub inputs: Map<String, Value>,
}

fn boolean(
    body: &Map<String, Value>,
    key: &str,
    default: bool,
    errors: &mut Map<String, Value>,
) -> bool {
    match body.get(key) {
        None => default,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) if ["true", "1", "yes"].contains(&s.to_lowercase().as_str()) => true,
        Some(Value::String(s)) if ["false", "0", "no"].contains(&s.to_lowercase().as_str()) => {
            false
        }
        Some(Value::Number(n)) if n.as_u64() == Some(1) => true,
        Some(Value::Number(n)) if n.as_u64() == Some(0) => false,
        Some(_) => {
            errors.insert(key.into(), json!(["Must be a valid boolean."]));
            default
        }
    }
}

pub fn create_start(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let body = req.json_object()?;
    let mut errors = Map::new();
    let country = inner.settings.workspace.country.clone();
    let mut flow = None;
    match body.get("flow") {
        None => {
            errors.insert("flow".into(), json!(["This field is required."]));
        }
        Some(Value::Null) => {
            errors.insert("flow".into(), json!(["This field may not be null."]));
        }
        Some(v) => {
            let key = v.as_str().map_or_else(|| v.to_string(), str::to_string);
            if inner.flows.iter().any(|f| f.uuid == key) {
                flow = Some(key);
            } else {
                errors.insert("flow".into(), json!([format!("No such object: {key}")]));
            }
        }
    }
    let Recipients {
        urns,
        contacts,
        groups,
    } = parse_recipients(inner, &body, country.as_deref(), &mut errors);
    let restart_participants = boolean(&body, "restart_participants", true, &mut errors);
    let exclude_active = boolean(&body, "exclude_active", false, &mut errors);
    let params_key = if body.contains_key("params") {
        "params"
    } else {
        "extra"
    };
    let params = match body.get(params_key) {
        None | Some(Value::Null) => json!({}),
        Some(Value::Object(o)) => {
            let v = Value::Object(o.clone());
            if v.to_string().len() > 10_000 {
                errors.insert(
                    params_key.into(),
                    json!(["Cannot exceed 10,000 characters encoded."]),
                );
            }
            v
        }
        Some(_) => {
            errors.insert(params_key.into(), json!(["Must be a valid JSON object"]));
            json!({})
        }
    };
    if !errors.is_empty() {
        return Err(Reply::bad_request(Value::Object(errors)));
    }
    if urns.is_empty() && contacts.is_empty() && groups.is_empty() {
        return Err(Reply::bad_request(
            json!({"non_field_errors": ["Must specify at least one group, contact or URN"]}),
        ));
    }
    let now = inner.now();
    let start = FlowStart {
        id: inner.next_id(),
        uuid: uuid::Uuid::new_v4().to_string(),
        flow: flow.unwrap_or_default(),
        status: "pending".into(),
        total: -1,
        started: 0,
        urns,
        contacts,
        groups,
        params,
        restart_participants,
        exclude_active,
        created_on: now,
        modified_on: now,
    };
    let json = start_json(inner, &start);
    inner.flow_starts.push(start);
    Ok(Reply::json(StatusCode::CREATED, json))
}

pub fn flow_ref(inner: &Inner, uuid: &str) -> Value {
    inner
        .flows
        .iter()
        .find(|f| f.uuid == uuid)
        .map_or(Value::Null, |f| json!({"uuid": f.uuid, "name": f.name}))
}

pub fn start_json(inner: &Inner, s: &FlowStart) -> Value {
    let contacts: Vec<Value> = s
        .contacts
        .iter()
        .filter_map(|id| inner.contacts.iter().find(|c| c.id == *id))
        .map(|c| json!({"uuid": c.uuid, "name": c.name}))
        .collect();
    let groups: Vec<Value> = s
        .groups
        .iter()
        .filter_map(|id| inner.group_by_id(*id))
        .map(|g| json!({"uuid": g.uuid, "name": g.name}))
        .collect();
    json!({
        "uuid": s.uuid,
        "flow": flow_ref(inner, &s.flow),
        "status": s.status,
        "progress": {"total": s.total, "started": s.started},
        "groups": groups,
        "contacts": contacts,
        "params": s.params,
        "created_on": format_dt(&s.created_on),
        "modified_on": format_dt(&s.modified_on),
        "id": s.id,
        "extra": s.params,
        "restart_participants": s.restart_participants,
        "exclude_active": s.exclude_active,
    })
}

pub fn list_starts(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let uuid = req.param("uuid");
    let reverse = req.flag("reverse");
    let mut rows: Vec<Row> = inner
        .flow_starts
        .iter()
        .filter(|s| uuid.is_none_or(|u| s.uuid == u))
        .filter(|s| in_range(req, &s.modified_on))
        .map(|s| Row {
            key: s.modified_on.timestamp_micros(),
            id: s.id,
            value: start_json(inner, s),
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse((r.key, r.id)));
    if reverse {
        rows.reverse();
    }
    Ok(paginate(req, rows, inner.settings.page_size, !reverse))
}

/// What mailroom does after flow start POSTs: every `pending` start gets one
/// waiting run per recipient and becomes `completed` (or `failed` for an
/// archived flow). Returns the number of starts processed.
pub fn process_pending(inner: &mut Inner) -> usize {
    let pending: Vec<usize> = (0..inner.flow_starts.len())
        .filter(|i| inner.flow_starts[*i].status == "pending")
        .collect();
    for si in &pending {
        let s = inner.flow_starts[*si].clone();
        let flow = inner.flows.iter().find(|f| f.uuid == s.flow).cloned();
        let Some(flow) = flow.filter(|f| !f.archived) else {
            let now = inner.now();
            let st = &mut inner.flow_starts[*si];
            st.status = "failed".into();
            st.modified_on = now;
            continue;
        };
        let mut recipients: Vec<usize> = Vec::new();
        for urn in &s.urns {
            let i = match inner.contact_by_urn(urn) {
                Some(i) => i,
                None => new_contact(inner, urn.clone()),
            };
            if !recipients.contains(&i) {
                recipients.push(i);
            }
        }
        for id in &s.contacts {
            if let Some(i) = inner
                .contacts
                .iter()
                .position(|c| c.id == *id && !c.deleted)
                && !recipients.contains(&i)
            {
                recipients.push(i);
            }
        }
        let exclusions = !s.restart_participants || s.exclude_active;
        if !s.groups.is_empty() || exclusions {
            // Group members and anything with exclusions: active contacts only.
            recipients.retain(|i| inner.contacts[*i].status == Status::Active);
            for (i, c) in inner.contacts.iter().enumerate() {
                if !c.deleted
                    && c.status == Status::Active
                    && c.groups.iter().any(|g| s.groups.contains(g))
                    && !recipients.contains(&i)
                {
                    recipients.push(i);
                }
            }
        }
        recipients.retain(|i| {
            let id = inner.contacts[*i].id;
            let in_this_flow = inner
                .runs
                .iter()
                .any(|r| r.contact == id && r.flow == s.flow);
            let in_any_flow = inner
                .runs
                .iter()
                .any(|r| r.contact == id && r.exit_type.is_none());
            let excluded =
                (!s.restart_participants && in_this_flow) || (s.exclude_active && in_any_flow);
            !excluded
        });
        for i in &recipients {
            let contact = inner.contacts[*i].id;
            if flow.flow_type == "message" {
                super::engine::interrupt_contact(inner, contact);
            }
            let now = inner.now();
            let run = Run {
                id: inner.next_id(),
                uuid: uuid::Uuid::new_v4().to_string(),
                flow: s.flow.clone(),
                contact,
                start: Some(s.uuid.clone()),
                responded: false,
                path: Vec::new(),
                values: Map::new(),
                created_on: now,
                modified_on: now,
                exited_on: None,
                exit_type: None,
                params: s.params.clone(),
                cursor: None,
                expires_on: None,
                input: None,
                webhook: None,
                inputs: Map::new(),
            };
            inner.runs.push(run);
            let ri = inner.runs.len() - 1;
            super::engine::start_run(inner, ri);
        }
        let n = i64::try_from(recipients.len()).unwrap_or(i64::MAX);
        let now = inner.now();
        let st = &mut inner.flow_starts[*si];
        st.status = "completed".into();
        st.total = n;
        st.started = n;
        st.modified_on = now;
    }
    pending.len()
}

/// Completes a waiting run with results `(result name, value, category)`, as
/// if the contact had answered. False when there is no such waiting run.
pub fn complete_run(inner: &mut Inner, run_uuid: &str, results: &[(&str, &str, &str)]) -> bool {
    let Some(ri) = inner
        .runs
        .iter()
        .position(|r| r.uuid == run_uuid && r.exit_type.is_none())
    else {
        return false;
    };
    let flow_results = inner
        .flows
        .iter()
        .find(|f| f.uuid == inner.runs[ri].flow)
        .map(|f| f.results.clone())
        .unwrap_or_default();
    let now = inner.now();
    let contact = inner.runs[ri].contact;
    let run = &mut inner.runs[ri];
    for (name, value, category) in results {
        let key = field_key(name);
        let node = flow_results
            .iter()
            .find(|r| r["key"] == key.as_str())
            .and_then(|r| r["node_uuids"].get(0).cloned())
            .unwrap_or(Value::Null);
        if let Some(n) = node.as_str() {
            run.path.push(json!({"node": n, "time": format_dt(&now)}));
        }
        run.values.insert(
            key,
            json!({"name": name, "value": value, "category": category, "node": node, "time": format_dt(&now)}),
        );
    }
    run.responded = run.responded || !results.is_empty();
    run.cursor = None;
    run.expires_on = None;
    run.exit_type = Some("completed".into());
    run.exited_on = Some(now);
    run.modified_on = now;
    if let Some(c) = inner.contacts.iter_mut().find(|c| c.id == contact) {
        c.last_seen_on = Some(now);
    }
    true
}

pub fn run_json(inner: &Inner, r: &Run, paths: bool) -> Value {
    let contact = inner
        .contacts
        .iter()
        .find(|c| c.id == r.contact)
        .map_or(Value::Null, |c| {
            let urn = c.urns.first();
            json!({
                "uuid": c.uuid,
                "name": c.name,
                "urn": urn,
                "urn_display": urn.and_then(|u| u.split_once(':')).map(|(_, p)| p),
            })
        });
    json!({
        "uuid": r.uuid,
        "id": r.id,
        "flow": flow_ref(inner, &r.flow),
        "contact": contact,
        "start": r.start.as_ref().map(|u| json!({"uuid": u})),
        "responded": r.responded,
        "path": if paths { Value::Array(r.path.clone()) } else { Value::Null },
        "values": r.values,
        "created_on": format_dt(&r.created_on),
        "modified_on": format_dt(&r.modified_on),
        "exited_on": r.exited_on.as_ref().map(format_dt),
        "exit_type": r.exit_type,
    })
}

/// The contact's current flow (`flow` in the contact read shape).
pub fn current_flow(inner: &Inner, contact: u64) -> Value {
    inner
        .runs
        .iter()
        .rev()
        .find(|r| r.contact == contact && r.exit_type.is_none())
        .map_or(Value::Null, |r| flow_ref(inner, &r.flow))
}

pub fn list_runs(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    if req.param("flow").is_some() && req.param("contact").is_some() {
        return Err(Reply::bad_request(
            json!({"detail": "You may only specify one of the contact, flow parameters"}),
        ));
    }
    let empty = |inner: &Inner| Ok(paginate(req, Vec::new(), inner.settings.page_size, true));
    let flow = req.param("flow");
    if let Some(f) = flow {
        if !is_uuid(f) {
            return Err(Reply::bad_request(
                json!({"detail": format!("Param 'flow': {f} is not a valid UUID.")}),
            ));
        }
        if !inner.flows.iter().any(|x| x.uuid == f) {
            return empty(inner);
        }
    }
    let contact = match req.param("contact") {
        Some(u) => match inner.contacts.iter().find(|c| c.uuid == u) {
            Some(c) => Some(c.id),
            None => return empty(inner),
        },
        None => None,
    };
    let uuid = req.param("uuid");
    let id = req.param("id");
    let responded = req.param("responded").map(|_| req.flag("responded"));
    let paths = req
        .param("paths")
        .is_none_or(|p| !matches!(p.to_lowercase().as_str(), "false" | "0" | "no"));
    let reverse = req.flag("reverse");
    let mut rows: Vec<Row> = inner
        .runs
        .iter()
        .filter(|r| uuid.is_none_or(|u| r.uuid == u))
        .filter(|r| id.is_none_or(|i| r.id.to_string() == i))
        .filter(|r| flow.is_none_or(|f| r.flow == f))
        .filter(|r| contact.is_none_or(|c| r.contact == c))
        .filter(|r| responded.is_none_or(|x| r.responded == x))
        .filter(|r| in_range(req, &r.modified_on))
        .map(|r| Row {
            key: r.modified_on.timestamp_micros(),
            id: r.id,
            value: run_json(inner, r, paths),
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse((r.key, r.id)));
    if reverse {
        rows.reverse();
    }
    Ok(paginate(req, rows, inner.settings.page_size, !reverse))
}
