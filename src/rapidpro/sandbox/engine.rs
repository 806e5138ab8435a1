//! The sandbox's flow engine: a small interpreter of flow definitions
//! (spec 13) that stands in for goflow/mailroom well enough for surveys.
//!
//! It owns how a run walks its flow: entering nodes (appending to the run's
//! `path`), executing actions (`send_msg`, `set_run_result`,
//! `set_contact_field`, `set_contact_name`, `set_contact_language`,
//! `add_contact_groups`, `remove_contact_groups`, `call_webhook`,
//! `call_resthook`; `enter_flow` ends the run as `completed`; other actions
//! are skipped), evaluating `switch` routers (the router tests of
//! [`test_case`], a subset of goflow's), waiting for a message, resuming on
//! an inbound message or a delivered webhook, expiring and interrupting
//! runs, and substituting the simple `@` expressions of [`substitute`].
//!
//! Webhooks cannot be sent under the state's sync lock: a run reaching a
//! `call_webhook` or `call_resthook` action queues a [`PendingWebhook`] in
//! the state and pauses; `Sandbox::deliver_pending_webhooks` sends them
//! outside the lock and resumes the runs with [`resume_after_webhook`].
//!
//! Malformed definitions never panic: a missing node or exit ends the run as
//! `completed`, unknown actions are skipped, unknown router tests never match.

use chrono::{Datelike, NaiveDate};
use serde_json::{Value, json};

use super::broadcasts::Message;
use super::groups::field_key;
use super::state::{Field, Group, Inner, Status, format_dt};

/// How many nodes one walk may enter before the run fails (goflow stops
/// runaway loops the same way).
const MAX_STEPS: usize = 200;

/// Where a paused run will continue.
#[derive(Debug, Clone, PartialEq)]
pub enum Cursor {
    /// Waiting at this router node for a message.
    Msg { node: String },
    /// Waiting for a queued webhook; then the node's actions continue at
    /// `next_action`.
    Webhook { node: String, next_action: usize },
}

/// A webhook or resthook POST a run is waiting for.
#[derive(Debug, Clone)]
pub struct PendingWebhook {
    pub run_uuid: String,
    /// Where the result goes (`call_webhook`'s or `call_resthook`'s `result_name`).
    pub result_name: Option<String>,
    pub method: String,
    pub headers: Vec<(String, String)>,
    /// The body sent (None for GET/HEAD without a body).
    pub body: Option<String>,
    /// The JSON of the body, as recorded in `WebhookCall::payload`.
    pub payload: Value,
    /// `(subscriber id, url)`; the id is set for resthook subscribers (410 unsubscribes).
    pub targets: Vec<(Option<u64>, String)>,
}

/// What a delivery answered, as the engine sees it.
#[derive(Debug, Clone)]
pub struct WebhookOutcome {
    /// 0 when the call failed (connection, timeout).
    pub status: u16,
    pub json: Value,
    /// `METHOD url`, the result's input.
    pub input: String,
}

impl WebhookOutcome {
    /// 2xx: the result's category is `Success`, else `Failure`.
    pub fn success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

fn flow_def<'a>(inner: &'a Inner, flow: &str) -> Option<&'a Value> {
    inner
        .flows
        .iter()
        .find(|f| f.uuid == flow)
        .map(|f| &f.definition)
}

fn find_node(def: &Value, uuid: &str) -> Option<Value> {
    def["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["uuid"].as_str() == Some(uuid))
        .cloned()
}

fn run_index(inner: &Inner, run_uuid: &str) -> Option<usize> {
    inner
        .runs
        .iter()
        .position(|r| r.uuid == run_uuid && r.exit_type.is_none())
}

/// Ends a run (`completed|interrupted|expired|failed`).
pub fn end_run(inner: &mut Inner, ri: usize, exit_type: &str) {
    let now = inner.now();
    let run = &mut inner.runs[ri];
    run.exit_type = Some(exit_type.to_string());
    run.exited_on = Some(now);
    run.modified_on = now;
    run.cursor = None;
    run.expires_on = None;
}

/// Starts a freshly created run at its flow's first node.
pub fn start_run(inner: &mut Inner, ri: usize) {
    let flow = inner.runs[ri].flow.clone();
    let first = flow_def(inner, &flow)
        .and_then(|d| d["nodes"].get(0))
        .and_then(|n| n["uuid"].as_str())
        .map(str::to_string);
    match first {
        Some(node) => walk(inner, ri, Step::Enter(node, 0)),
        None => end_run(inner, ri, "completed"),
    }
}

/// An inbound message for a contact: resumes its run waiting for a message,
/// if any. Returns the flow UUID of the run that consumed the message.
pub fn resume_on_message(inner: &mut Inner, contact: u64, text: &str) -> Option<String> {
    let ri = inner.runs.iter().rposition(|r| {
        r.contact == contact
            && r.exit_type.is_none()
            && matches!(r.cursor, Some(Cursor::Msg { .. }))
    })?;
    let Some(Cursor::Msg { node }) = inner.runs[ri].cursor.clone() else {
        return None;
    };
    let now = inner.now();
    let run = &mut inner.runs[ri];
    run.cursor = None;
    run.expires_on = None;
    run.responded = true;
    run.input = Some(text.to_string());
    run.modified_on = now;
    let flow = run.flow.clone();
    walk(inner, ri, Step::Route(node));
    Some(flow)
}

/// A queued webhook was delivered: records its result and continues the run.
pub fn resume_after_webhook(inner: &mut Inner, pending: &PendingWebhook, outcome: &WebhookOutcome) {
    let Some(ri) = run_index(inner, &pending.run_uuid) else {
        return;
    };
    let Some(Cursor::Webhook { node, next_action }) = inner.runs[ri].cursor.clone() else {
        return;
    };
    let now = inner.now();
    let success = outcome.success();
    let run = &mut inner.runs[ri];
    run.cursor = None;
    run.webhook = Some(json!({"status": outcome.status, "json": outcome.json}));
    run.modified_on = now;
    if let Some(name) = pending.result_name.as_deref().filter(|n| !n.is_empty()) {
        let key = field_key(name);
        run.values.insert(
            key.clone(),
            json!({"name": name, "value": outcome.status.to_string(),
                   "category": if success { "Success" } else { "Failure" },
                   "node": node, "time": format_dt(&now)}),
        );
        run.inputs.insert(key, Value::String(outcome.input.clone()));
    }
    walk(inner, ri, Step::Enter(node, next_action));
}

/// Runs waiting for a message past their expiry become `expired`. Returns how many.
pub fn expire_runs(inner: &mut Inner) -> usize {
    let now = inner.now();
    let due: Vec<usize> = (0..inner.runs.len())
        .filter(|i| {
            let r = &inner.runs[*i];
            r.exit_type.is_none()
                && matches!(r.cursor, Some(Cursor::Msg { .. }))
                && r.expires_on.is_some_and(|t| t <= now)
        })
        .collect();
    for ri in &due {
        end_run(inner, *ri, "expired");
    }
    due.len()
}

/// Interrupts every unfinished run of a contact. Returns how many.
pub fn interrupt_contact(inner: &mut Inner, contact: u64) -> usize {
    let open: Vec<usize> = (0..inner.runs.len())
        .filter(|i| inner.runs[*i].contact == contact && inner.runs[*i].exit_type.is_none())
        .collect();
    for ri in &open {
        end_run(inner, *ri, "interrupted");
    }
    open.len()
}

enum Step {
    /// Enter a node and run its actions from this index (0 = a fresh arrival).
    Enter(String, usize),
    /// Evaluate a node's router (after its wait, if any).
    Route(String),
}

fn walk(inner: &mut Inner, ri: usize, first: Step) {
    let mut step = first;
    for _ in 0..MAX_STEPS {
        let flow = inner.runs[ri].flow.clone();
        let Some(def) = flow_def(inner, &flow).cloned() else {
            return end_run(inner, ri, "failed");
        };
        step = match step {
            Step::Enter(node_uuid, from) => {
                let Some(node) = find_node(&def, &node_uuid) else {
                    return end_run(inner, ri, "completed");
                };
                if from == 0 {
                    let now = inner.now();
                    let run = &mut inner.runs[ri];
                    run.path
                        .push(json!({"node": node_uuid, "time": format_dt(&now)}));
                    run.modified_on = now;
                }
                let actions = node["actions"].as_array().cloned().unwrap_or_default();
                for (i, action) in actions.iter().enumerate().skip(from) {
                    match execute(inner, ri, &def, &node_uuid, action) {
                        Flow::Continue => {}
                        Flow::Pause => {
                            inner.runs[ri].cursor = Some(Cursor::Webhook {
                                node: node_uuid,
                                next_action: i + 1,
                            });
                            return;
                        }
                        Flow::End => return end_run(inner, ri, "completed"),
                    }
                }
                if node["router"].is_object() {
                    let waits = node["router"]["wait"]["type"].as_str() == Some("msg");
                    if waits {
                        let minutes = inner
                            .flows
                            .iter()
                            .find(|f| f.uuid == flow)
                            .map_or(0, |f| f.expires);
                        let now = inner.now();
                        let run = &mut inner.runs[ri];
                        run.cursor = Some(Cursor::Msg { node: node_uuid });
                        run.expires_on =
                            (minutes > 0).then(|| now + chrono::Duration::minutes(minutes));
                        return;
                    }
                    Step::Route(node_uuid)
                } else {
                    match destination(&node, node["exits"][0]["uuid"].as_str()) {
                        Some(next) => Step::Enter(next, 0),
                        None => return end_run(inner, ri, "completed"),
                    }
                }
            }
            Step::Route(node_uuid) => {
                let Some(node) = find_node(&def, &node_uuid) else {
                    return end_run(inner, ri, "completed");
                };
                let exit = route(inner, ri, &node);
                match destination(&node, exit.as_deref()) {
                    Some(next) => Step::Enter(next, 0),
                    None => return end_run(inner, ri, "completed"),
                }
            }
        };
    }
    end_run(inner, ri, "failed");
}

/// The destination node of one of a node's exits.
fn destination(node: &Value, exit_uuid: Option<&str>) -> Option<String> {
    let exit_uuid = exit_uuid?;
    node["exits"]
        .as_array()?
        .iter()
        .find(|e| e["uuid"].as_str() == Some(exit_uuid))?["destination_uuid"]
        .as_str()
        .map(str::to_string)
}

enum Flow {
    Continue,
    Pause,
    End,
}

fn contact_index(inner: &Inner, ri: usize) -> Option<usize> {
    let id = inner.runs[ri].contact;
    inner.contacts.iter().position(|c| c.id == id)
}

fn execute(inner: &mut Inner, ri: usize, def: &Value, node: &str, action: &Value) -> Flow {
    let sub = |inner: &Inner, s: &str| substitute(inner, ri, s);
    match action["type"].as_str().unwrap_or_default() {
        "send_msg" => {
            let Some(ci) = contact_index(inner, ri) else {
                return Flow::Continue;
            };
            let c = &inner.contacts[ci];
            let localized = c.language.as_ref().and_then(|lang| {
                def["localization"][lang.as_str()][action["uuid"].as_str().unwrap_or_default()]
                    ["text"][0]
                    .as_str()
            });
            let template = localized.or(action["text"].as_str()).unwrap_or_default();
            let text = sub(inner, template);
            let c = &inner.contacts[ci];
            let urn = c.urns.first().cloned();
            let routable = c.status == Status::Active && !c.deleted && urn.is_some();
            let contact = c.id;
            let flow = inner.runs[ri].flow.clone();
            let now = inner.now();
            let message = Message {
                id: inner.next_id(),
                uuid: uuid::Uuid::new_v4().to_string(),
                contact,
                urn: if routable { urn } else { None },
                direction: "out",
                status: if routable { "queued" } else { "failed" },
                text,
                broadcast: None,
                flow: Some(flow),
                created_on: now,
                modified_on: now,
                sent_on: None,
            };
            inner.messages.push(message);
        }
        "set_run_result" => {
            let name = action["name"].as_str().unwrap_or_default();
            if !name.is_empty() {
                let value = sub(inner, action["value"].as_str().unwrap_or_default());
                let category = action["category"].as_str().unwrap_or_default().to_string();
                let now = inner.now();
                let key = field_key(name);
                let run = &mut inner.runs[ri];
                run.values.insert(
                    key.clone(),
                    json!({"name": name, "value": value, "category": category,
                           "node": node, "time": format_dt(&now)}),
                );
                run.inputs.remove(&key);
            }
        }
        "set_contact_field" => {
            let key = action["field"]["key"]
                .as_str()
                .filter(|k| !k.is_empty())
                .map(str::to_string)
                .or_else(|| action["field"]["name"].as_str().map(field_key));
            let (Some(key), Some(ci)) = (key, contact_index(inner, ri)) else {
                return Flow::Continue;
            };
            let value = sub(inner, action["value"].as_str().unwrap_or_default());
            if !inner.fields.iter().any(|f| f.key == key) {
                let now = inner.now();
                let field = Field {
                    id: inner.next_id(),
                    key: key.clone(),
                    name: action["field"]["name"].as_str().unwrap_or(&key).to_string(),
                    value_type: "text".into(),
                    created_on: now,
                };
                inner.fields.push(field);
            }
            let now = inner.now();
            let c = &mut inner.contacts[ci];
            if value.trim().is_empty() {
                c.fields.remove(&key);
            } else {
                c.fields.insert(key, value);
            }
            c.modified_on = now;
        }
        "set_contact_name" => {
            if let Some(ci) = contact_index(inner, ri) {
                let name = sub(inner, action["name"].as_str().unwrap_or_default());
                let now = inner.now();
                let c = &mut inner.contacts[ci];
                c.name = Some(name.trim().to_string()).filter(|n| !n.is_empty());
                c.modified_on = now;
            }
        }
        "set_contact_language" => {
            if let Some(ci) = contact_index(inner, ri) {
                let language = sub(inner, action["language"].as_str().unwrap_or_default());
                let now = inner.now();
                let c = &mut inner.contacts[ci];
                c.language = Some(language).filter(|l| l.len() == 3);
                c.modified_on = now;
            }
        }
        "add_contact_groups" | "remove_contact_groups" => {
            group_action(inner, ri, action);
        }
        "call_webhook" => {
            queue_webhook(inner, ri, action);
            return Flow::Pause;
        }
        "call_resthook" if queue_resthook(inner, ri, action) => return Flow::Pause,
        // Sub-flows are not run by the sandbox: the parent run completes.
        "enter_flow" => return Flow::End,
        _ => {}
    }
    Flow::Continue
}

fn group_action(inner: &mut Inner, ri: usize, action: &Value) {
    let Some(ci) = contact_index(inner, ri) else {
        return;
    };
    // Only active contacts are in groups (the API's rule too).
    if inner.contacts[ci].status != Status::Active {
        return;
    }
    let add = action["type"] == "add_contact_groups";
    if !add && action["all_groups"].as_bool() == Some(true) {
        let ids: Vec<u64> = inner
            .groups
            .iter()
            .filter(|g| g.query.is_none())
            .map(|g| g.id)
            .collect();
        inner.contacts[ci].groups.retain(|g| !ids.contains(g));
        return;
    }
    for g in action["groups"].as_array().into_iter().flatten() {
        let uuid = g["uuid"].as_str().unwrap_or_default();
        let name = g["name"].as_str().unwrap_or_default();
        let found = inner
            .groups
            .iter()
            .find(|x| !uuid.is_empty() && x.uuid == uuid)
            .or_else(|| (!name.is_empty()).then(|| inner.find_group(name)).flatten())
            .map(|x| (x.id, x.query.is_some()));
        let id = match found {
            // Smart groups are query-defined: never changed by hand.
            Some((_, true)) => continue,
            Some((id, false)) => id,
            None if add && !name.is_empty() => {
                // As an import would, create the group the flow names.
                let now = inner.now();
                let group = Group {
                    id: inner.next_id(),
                    uuid: if uuid.is_empty() {
                        uuid::Uuid::new_v4().to_string()
                    } else {
                        uuid.to_string()
                    },
                    name: name.to_string(),
                    query: None,
                    system: false,
                    created_on: now,
                };
                let id = group.id;
                inner.groups.push(group);
                id
            }
            None => continue,
        };
        let c = &mut inner.contacts[ci];
        if add && !c.groups.contains(&id) {
            c.groups.push(id);
        } else if !add {
            c.groups.retain(|x| *x != id);
        }
    }
}

fn queue_webhook(inner: &mut Inner, ri: usize, action: &Value) {
    let method = action["method"]
        .as_str()
        .filter(|m| !m.is_empty())
        .unwrap_or("GET")
        .to_ascii_uppercase();
    let url = match inner.webhook_url_override.clone() {
        Some(url) => url,
        None => substitute(inner, ri, action["url"].as_str().unwrap_or_default()),
    };
    let run_uuid = inner.runs[ri].uuid.clone();
    let default_body = super::webhooks::webhook_body(inner, &run_uuid).unwrap_or(Value::Null);
    let template = action["body"].as_str().unwrap_or_default();
    // The editor's default body is an `@(json(object(...)))` expression,
    // which this engine cannot evaluate: it sends the equivalent JSON. A
    // plain template is sent with its `@` expressions substituted.
    let (body, payload) = if template.trim().is_empty() {
        if matches!(method.as_str(), "GET" | "HEAD" | "DELETE") {
            (None, Value::Null)
        } else {
            (Some(default_body.to_string()), default_body)
        }
    } else if template.contains("@(") {
        (Some(default_body.to_string()), default_body)
    } else {
        let text = substitute(inner, ri, template);
        let payload = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
        (Some(text), payload)
    };
    let mut headers: Vec<(String, String)> = Vec::new();
    if let Some(h) = action["headers"].as_object() {
        for (k, v) in h {
            headers.push((
                k.clone(),
                substitute(inner, ri, v.as_str().unwrap_or_default()),
            ));
        }
    }
    inner.pending_webhooks.push(PendingWebhook {
        run_uuid,
        result_name: action["result_name"].as_str().map(str::to_string),
        method,
        headers,
        body,
        payload,
        targets: vec![(None, url)],
    });
}

/// Queues a resthook delivery; false when there is nothing to wait for
/// (unknown slug or no subscribers).
fn queue_resthook(inner: &mut Inner, ri: usize, action: &Value) -> bool {
    let slug = action["resthook"].as_str().unwrap_or_default().to_string();
    if !inner.resthooks.iter().any(|r| r.slug == slug) {
        return false;
    }
    let run_uuid = inner.runs[ri].uuid.clone();
    let Some(payload) = super::webhooks::resthook_payload(inner, &run_uuid) else {
        return false;
    };
    let now = inner.now();
    let id = inner.next_id();
    inner.events.push(super::webhooks::Event {
        id,
        resthook: slug.clone(),
        data: payload.clone(),
        created_on: now,
    });
    let targets: Vec<(Option<u64>, String)> = inner
        .subscribers
        .iter()
        .filter(|s| s.resthook == slug)
        .map(|s| (Some(s.id), s.target_url.clone()))
        .collect();
    if targets.is_empty() {
        return false;
    }
    inner.pending_webhooks.push(PendingWebhook {
        run_uuid,
        result_name: action["result_name"].as_str().map(str::to_string),
        method: "POST".into(),
        headers: Vec::new(),
        body: Some(payload.to_string()),
        payload,
        targets,
    });
    true
}

/// Evaluates a node's router, records its result, returns the exit to take.
fn route(inner: &mut Inner, ri: usize, node: &Value) -> Option<String> {
    let router = &node["router"];
    let categories = router["categories"].as_array().cloned().unwrap_or_default();
    let operand_template = router["operand"].as_str().unwrap_or("@input");
    let operand = substitute(inner, ri, operand_template);
    let operand_category = result_category(inner, ri, operand_template);
    let country = inner.settings.workspace.country.clone();
    let day_first = inner.settings.workspace.date_style != "month_first";
    let (category_uuid, value) = match router["type"].as_str() {
        Some("random") => {
            let n = categories.len().max(1);
            let pick = (super::http::random_fraction() * n as f64) as usize;
            (
                categories
                    .get(pick.min(n - 1))
                    .and_then(|c| c["uuid"].as_str())
                    .map(str::to_string),
                operand.clone(),
            )
        }
        _ => {
            let mut matched = None;
            for case in router["cases"].as_array().into_iter().flatten() {
                let args: Vec<String> = case["arguments"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| substitute(inner, ri, a.as_str().unwrap_or_default()))
                    .collect();
                let env = Env {
                    country: country.as_deref(),
                    day_first,
                    category: operand_category.as_deref(),
                };
                if let Some(m) = test_case(
                    case["type"].as_str().unwrap_or_default(),
                    &operand,
                    &args,
                    &env,
                ) {
                    matched = Some((case["category_uuid"].as_str().map(str::to_string), m));
                    break;
                }
            }
            matched.unwrap_or_else(|| {
                (
                    router["default_category_uuid"]
                        .as_str()
                        .map(str::to_string)
                        .or_else(|| {
                            categories
                                .iter()
                                .find(|c| c["name"] == "Other")
                                .and_then(|c| c["uuid"].as_str())
                                .map(str::to_string)
                        }),
                    operand.clone(),
                )
            })
        }
    };
    let category = categories
        .iter()
        .find(|c| category_uuid.is_some() && c["uuid"].as_str() == category_uuid.as_deref())?;
    let name = category["name"].as_str().unwrap_or_default().to_string();
    if let Some(result_name) = router["result_name"].as_str().filter(|n| !n.is_empty()) {
        let now = inner.now();
        let key = field_key(result_name);
        let node_uuid = node["uuid"].as_str().unwrap_or_default();
        let run = &mut inner.runs[ri];
        run.values.insert(
            key.clone(),
            json!({"name": result_name, "value": value, "category": name,
                   "node": node_uuid, "time": format_dt(&now)}),
        );
        run.inputs.insert(key, Value::String(operand));
        run.modified_on = now;
    }
    category["exit_uuid"].as_str().map(str::to_string)
}

/// The category of the result an operand names (`@results.x`,
/// `@run.results.x`, optionally `.value`/`.category`).
fn result_category(inner: &Inner, ri: usize, operand: &str) -> Option<String> {
    let path = operand.trim().strip_prefix('@')?;
    let path = path.strip_prefix("run.").unwrap_or(path);
    let rest = path.strip_prefix("results.")?;
    let key = rest.split('.').next()?;
    inner.runs[ri].values.get(key)?["category"]
        .as_str()
        .map(str::to_string)
}

/// What router tests need besides the text.
pub struct Env<'a> {
    /// ISO 3166 alpha-2, for `has_phone`.
    pub country: Option<&'a str>,
    /// Dates are read day first (`date_style: day_first`).
    pub day_first: bool,
    /// The category of the result the operand names (`has_category`).
    pub category: Option<&'a str>,
}

/// Words as goflow tokenizes them: runs of letters, digits and `_`.
fn words(text: &str) -> Vec<&str> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .collect()
}

/// Numbers in the text, in order (`42`, `-3`, `1.5`, `2,5`, `(42)`, `25yrs`).
fn numbers(text: &str) -> Vec<f64> {
    text.split_whitespace()
        .filter_map(|token| {
            let t = token.trim_matches(|c: char| {
                !(c.is_ascii_digit() || c == '-' || c == '+' || c == '.' || c == ',')
            });
            let t = t.trim_end_matches(['.', ',']);
            let t = t.trim_end_matches(|c: char| c.is_alphabetic());
            if t.is_empty() || !t.chars().any(|c| c.is_ascii_digit()) {
                return None;
            }
            let t = if t.contains(',') && !t.contains('.') && t.matches(',').count() == 1 {
                t.replace(',', ".")
            } else {
                t.replace(',', "")
            };
            t.parse::<f64>().ok().filter(|n| n.is_finite())
        })
        .collect()
}

fn format_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

fn parse_arg(args: &[String], i: usize) -> Option<f64> {
    args.get(i)?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite())
}

/// The first date in the text: ISO `yyyy-mm-dd`, or `d/m/y` (also `-` and
/// `.`) read day or month first; two-digit years are 20xx.
fn find_date(text: &str, day_first: bool) -> Option<NaiveDate> {
    for token in text.split_whitespace() {
        let token = token.trim_matches(|c: char| !c.is_ascii_digit());
        let token = token.split('T').next().unwrap_or(token);
        let parts: Vec<&str> = token.split(['-', '/', '.']).collect();
        if parts.len() != 3 || parts.iter().any(|p| p.is_empty() || p.len() > 4) {
            continue;
        }
        let nums: Option<Vec<i64>> = parts.iter().map(|p| p.parse::<i64>().ok()).collect();
        let Some(n) = nums else { continue };
        let (y, m, d) = if parts[0].len() == 4 {
            (n[0], n[1], n[2])
        } else if day_first {
            (n[2], n[1], n[0])
        } else {
            (n[2], n[0], n[1])
        };
        let y = if parts[0].len() != 4 && parts[2].len() <= 2 {
            2000 + y
        } else {
            y
        };
        let date = i32::try_from(y).ok().and_then(|y| {
            NaiveDate::from_ymd_opt(y, u32::try_from(m).ok()?, u32::try_from(d).ok()?)
        });
        if let Some(date) = date {
            return Some(date);
        }
    }
    None
}

fn find_phone(text: &str, country: Option<&str>) -> Option<String> {
    let country = country.and_then(|c| c.to_ascii_uppercase().parse().ok());
    let mut candidates: Vec<String> = Vec::new();
    let mut current = String::new();
    for c in text.chars().chain(std::iter::once('\n')) {
        let starts_or_continues = c.is_ascii_digit() || (c == '+' && current.trim().is_empty());
        let separator = !current.is_empty() && matches!(c, ' ' | '-' | '(' | ')' | '.');
        if starts_or_continues || separator {
            current.push(c);
        } else {
            if current.chars().filter(char::is_ascii_digit).count() >= 6 {
                candidates.push(current.trim().to_string());
            }
            current.clear();
            if c == '+' {
                current.push(c);
            }
        }
    }
    candidates.into_iter().find_map(|raw| {
        let number = phonenumber::parse(country, raw.trim_end_matches(['-', '(', '.'])).ok()?;
        phonenumber::is_valid(&number)
            .then(|| number.format().mode(phonenumber::Mode::E164).to_string())
    })
}

fn find_email(text: &str) -> Option<String> {
    text.split(|c: char| c.is_whitespace() || matches!(c, '<' | '>' | ',' | ';' | '(' | ')'))
        .map(|t| t.trim_matches(|c: char| matches!(c, '.' | ':' | '"' | '\'')))
        .find(|t| {
            let Some((local, domain)) = t.split_once('@') else {
                return false;
            };
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains('@')
        })
        .map(str::to_string)
}

/// One router test (a subset of goflow's): the match when it passes.
/// Unknown tests (and `has_pattern`: no regex engine here) never match.
pub fn test_case(kind: &str, text: &str, args: &[String], env: &Env<'_>) -> Option<String> {
    let arg0 = args.first().map(String::as_str).unwrap_or_default();
    let number_test = |pred: &dyn Fn(f64) -> bool| {
        numbers(text)
            .into_iter()
            .find(|n| pred(*n))
            .map(format_number)
    };
    match kind {
        "has_text" => Some(text.trim().to_string()).filter(|t| !t.is_empty()),
        "has_only_text" => (text == arg0).then(|| text.to_string()),
        "has_any_word" | "has_all_words" => {
            let tests: Vec<String> = words(arg0).iter().map(|w| w.to_lowercase()).collect();
            let input = words(text);
            let hits: Vec<&str> = input
                .iter()
                .copied()
                .filter(|w| tests.contains(&w.to_lowercase()))
                .collect();
            let pass = if kind == "has_any_word" {
                !hits.is_empty()
            } else {
                !tests.is_empty()
                    && tests
                        .iter()
                        .all(|t| input.iter().any(|w| w.to_lowercase() == *t))
            };
            pass.then(|| hits.join(" "))
        }
        "has_phrase" | "has_only_phrase" => {
            let tests: Vec<String> = words(arg0).iter().map(|w| w.to_lowercase()).collect();
            let input = words(text);
            if kind == "has_only_phrase" {
                let same = input.len() == tests.len()
                    && input
                        .iter()
                        .zip(&tests)
                        .all(|(w, t)| w.to_lowercase() == *t);
                return same.then(|| input.join(" "));
            }
            if tests.is_empty() {
                return Some(String::new());
            }
            input
                .windows(tests.len())
                .find(|win| win.iter().zip(&tests).all(|(w, t)| w.to_lowercase() == *t))
                .map(|win| win.join(" "))
        }
        "has_beginning" => {
            let t = text.trim();
            let b = arg0.trim();
            let prefix = t.get(..b.len())?;
            (!b.is_empty() && prefix.to_lowercase() == b.to_lowercase()).then(|| prefix.to_string())
        }
        "has_number" => number_test(&|_| true),
        "has_number_between" => {
            let (lo, hi) = (parse_arg(args, 0)?, parse_arg(args, 1)?);
            number_test(&|n| lo <= n && n <= hi)
        }
        "has_number_lt" => {
            let x = parse_arg(args, 0)?;
            number_test(&|n| n < x)
        }
        "has_number_lte" => {
            let x = parse_arg(args, 0)?;
            number_test(&|n| n <= x)
        }
        "has_number_gt" => {
            let x = parse_arg(args, 0)?;
            number_test(&|n| n > x)
        }
        "has_number_gte" => {
            let x = parse_arg(args, 0)?;
            number_test(&|n| n >= x)
        }
        "has_number_eq" => {
            let x = parse_arg(args, 0)?;
            number_test(&|n| n == x)
        }
        "has_date" | "has_date_lt" | "has_date_gt" | "has_date_eq" => {
            let date = find_date(text, env.day_first)?;
            let pass = match kind {
                "has_date" => true,
                _ => {
                    let bound = find_date(arg0, env.day_first)?;
                    match kind {
                        "has_date_lt" => date < bound,
                        "has_date_gt" => date > bound,
                        _ => date == bound,
                    }
                }
            };
            pass.then(|| format!("{:04}-{:02}-{:02}", date.year(), date.month(), date.day()))
        }
        "has_phone" => find_phone(text, args.first().map(String::as_str).or(env.country)),
        "has_email" => find_email(text),
        "has_category" => {
            let category = env.category?;
            args.iter()
                .any(|a| a.trim().eq_ignore_ascii_case(category))
                .then(|| category.to_string())
        }
        _ => None,
    }
}

/// A JSON value as text in a message (strings unquoted, null empty).
fn render(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn lookup(inner: &Inner, ri: usize, path: &[&str]) -> Option<String> {
    let run = &inner.runs[ri];
    let contact = inner.contacts.iter().find(|c| c.id == run.contact);
    let field = |key: &str| {
        contact
            .and_then(|c| c.fields.get(key).cloned())
            .unwrap_or_default()
    };
    let result = |key: &str, part: Option<&str>| -> Option<String> {
        let Some(r) = run.values.get(key) else {
            return Some(String::new());
        };
        match part {
            None | Some("value") => Some(render(&r["value"])),
            Some("category") | Some("category_localized") => Some(render(&r["category"])),
            Some("name") => Some(render(&r["name"])),
            Some("input") => Some(render(run.inputs.get(key).unwrap_or(&Value::Null))),
            _ => None,
        }
    };
    let name = contact.and_then(|c| c.name.clone()).unwrap_or_default();
    match path {
        ["contact"] | ["contact", "name"] => Some(name),
        ["contact", "first_name"] => Some(
            name.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string(),
        ),
        ["contact", "uuid"] => contact.map(|c| c.uuid.clone()),
        ["contact", "language"] => {
            Some(contact.and_then(|c| c.language.clone()).unwrap_or_default())
        }
        ["contact", "urn"] => Some(
            contact
                .and_then(|c| c.urns.first().cloned())
                .unwrap_or_default(),
        ),
        ["contact", "fields", key] | ["fields", key] => Some(field(key)),
        ["results", key] | ["run", "results", key] => result(key, None),
        ["results", key, part] | ["run", "results", key, part] => result(key, Some(part)),
        ["trigger", "params", rest @ ..] if !rest.is_empty() => {
            let mut v = &run.params;
            for p in rest {
                v = v.get(*p)?;
            }
            Some(render(v))
        }
        ["input"] | ["input", "text"] => Some(run.input.clone().unwrap_or_default()),
        ["webhook"] | ["webhook", "status"] => run
            .webhook
            .as_ref()
            .map(|w| render(&w["status"]))
            .or(Some(String::new())),
        ["webhook", "json", rest @ ..] => {
            let mut v = run.webhook.as_ref().map(|w| &w["json"])?;
            for p in rest {
                v = v.get(*p)?;
            }
            Some(render(v))
        }
        ["run", "uuid"] => Some(run.uuid.clone()),
        ["run", "flow", "uuid"] => Some(run.flow.clone()),
        ["run", "flow", "name"] => inner
            .flows
            .iter()
            .find(|f| f.uuid == run.flow)
            .map(|f| f.name.clone()),
        _ => None,
    }
}

/// Substitutes the simple `@` expressions of a template for run `ri`:
/// `@contact`, `@contact.name|first_name|uuid|language|urn`,
/// `@contact.fields.k`, `@fields.k`, `@results.k[.value|.category]`,
/// `@run.results.k[...]`, `@trigger.params.k[.k2...]`, `@input`,
/// `@webhook[.status]`, `@webhook.json.k`, `@run.uuid`, `@run.flow.name`;
/// `@@` is a literal `@`. Anything else (functions `@(...)`, other roots,
/// unknown members) is left as written.
pub fn substitute(inner: &Inner, ri: usize, template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let chars: Vec<char> = template.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c != '@' {
            out.push(c);
            i += 1;
            continue;
        }
        if chars.get(i + 1) == Some(&'@') {
            out.push('@');
            i += 2;
            continue;
        }
        let mut j = i + 1;
        while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_' || chars[j] == '.')
        {
            j += 1;
        }
        // A trailing period ends the sentence, not the expression.
        while j > i + 1 && chars[j - 1] == '.' {
            j -= 1;
        }
        let expr: String = chars[i + 1..j].iter().collect();
        let path: Vec<&str> = expr.split('.').collect();
        let previous_is_word = i > 0 && chars[i - 1].is_alphanumeric();
        match (!previous_is_word && !expr.is_empty())
            .then(|| lookup(inner, ri, &path))
            .flatten()
        {
            Some(v) => out.push_str(&v),
            None => {
                out.push('@');
                out.push_str(&expr);
            }
        }
        i = j;
    }
    out
}

/// Where a run waits, for `/_sandbox/state` (`waiting_for`).
pub fn cursor_json(cursor: &Option<Cursor>) -> Value {
    match cursor {
        None => Value::Null,
        Some(Cursor::Msg { node }) => json!({"waiting_for": "msg", "node": node}),
        Some(Cursor::Webhook { node, .. }) => json!({"waiting_for": "webhook", "node": node}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Env<'static> {
        Env {
            country: Some("RW"),
            day_first: true,
            category: None,
        }
    }

    fn t(kind: &str, text: &str, args: &[&str]) -> Option<String> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        test_case(kind, text, &args, &env())
    }

    #[test]
    fn word_tests_are_case_insensitive_and_split_on_punctuation() {
        assert_eq!(
            t("has_all_words", "the quick brown FOX", &["the fox"]).as_deref(),
            Some("the FOX")
        );
        assert_eq!(
            t("has_all_words", "the quick brown fox", &["red fox"]),
            None
        );
        assert_eq!(
            t("has_any_word", "The Quick Brown Fox", &["fox quick"]).as_deref(),
            Some("Quick Fox")
        );
        assert_eq!(
            t("has_any_word", "yes!", &["yes y"]).as_deref(),
            Some("yes")
        );
        assert_eq!(t("has_any_word", "nope", &["yes y"]), None);
        assert_eq!(
            t("has_phrase", "the quick brown fox", &["brown fox"]).as_deref(),
            Some("brown fox")
        );
        assert_eq!(t("has_phrase", "the Quick Brown fox", &["quick fox"]), None);
        assert_eq!(
            t("has_only_phrase", "Quick Brown", &["quick brown"]).as_deref(),
            Some("Quick Brown")
        );
        assert_eq!(
            t("has_only_phrase", "The Quick Brown", &["quick brown"]),
            None
        );
        assert_eq!(
            t("has_beginning", "The Quick Brown", &["the quick"]).as_deref(),
            Some("The Quick")
        );
        assert_eq!(
            t("has_beginning", "The Quick Brown", &["quick brown"]),
            None
        );
        assert_eq!(t("has_only_text", "foo", &["foo"]).as_deref(), Some("foo"));
        assert_eq!(t("has_only_text", "FOO", &["foo"]), None);
        assert_eq!(t("has_text", " \n", &[]), None);
        assert_eq!(t("has_text", " hi ", &[]).as_deref(), Some("hi"));
        assert_eq!(t("has_pattern", "buy cheese", &["buy (\\w+)"]), None);
    }

    #[test]
    fn number_tests_find_the_first_fitting_number() {
        assert_eq!(
            t("has_number", "the number is 42", &[]).as_deref(),
            Some("42")
        );
        assert_eq!(t("has_number", "forty two", &[]), None);
        assert_eq!(t("has_number", "I am 25yrs.", &[]).as_deref(), Some("25"));
        assert_eq!(t("has_number", "1,5 kg", &[]).as_deref(), Some("1.5"));
        assert_eq!(
            t("has_number_between", "the number is 42", &["40", "44"]).as_deref(),
            Some("42")
        );
        assert_eq!(
            t("has_number_between", "the number is 42", &["50", "60"]),
            None
        );
        assert_eq!(t("has_number_between", "42", &["foo", "60"]), None);
        assert_eq!(t("has_number_lt", "42", &["44"]).as_deref(), Some("42"));
        assert_eq!(t("has_number_lte", "42", &["42"]).as_deref(), Some("42"));
        assert_eq!(t("has_number_gt", "42", &["42"]), None);
        assert_eq!(t("has_number_gte", "42", &["42"]).as_deref(), Some("42"));
        assert_eq!(t("has_number_eq", "42.0", &["42"]).as_deref(), Some("42"));
    }

    #[test]
    fn dates_phones_emails_and_categories() {
        assert_eq!(
            t("has_date", "the date is 15/01/2017", &[]).as_deref(),
            Some("2017-01-15")
        );
        assert_eq!(
            t("has_date", "on 2024-03-01T10:00", &[]).as_deref(),
            Some("2024-03-01")
        );
        assert_eq!(t("has_date", "just a year 2017", &[]), None);
        assert_eq!(t("has_date", "31/02/2017", &[]), None);
        assert_eq!(
            t("has_date_lt", "15/01/2017", &["2017-06-01"]).as_deref(),
            Some("2017-01-15")
        );
        assert_eq!(t("has_date_gt", "15/01/2017", &["2017-06-01"]), None);
        assert_eq!(
            t("has_phone", "my number is 0788 123 123", &[]).as_deref(),
            Some("+250788123123")
        );
        assert_eq!(
            t("has_phone", "my number is +12067799294", &[]).as_deref(),
            Some("+12067799294")
        );
        assert_eq!(t("has_phone", "none of your business", &[]), None);
        assert_eq!(
            t("has_email", "my email is foo1@bar.com, please", &[]).as_deref(),
            Some("foo1@bar.com")
        );
        assert_eq!(
            t("has_email", "my email is <foo@bar2.com>", &[]).as_deref(),
            Some("foo@bar2.com")
        );
        assert_eq!(t("has_email", "not sharing", &[]), None);
        let with_category = Env {
            category: Some("Success"),
            ..env()
        };
        let args = vec!["Success".to_string()];
        assert_eq!(
            test_case("has_category", "200", &args, &with_category).as_deref(),
            Some("Success")
        );
        let args = vec!["Failure".to_string()];
        assert_eq!(
            test_case("has_category", "200", &args, &with_category),
            None
        );
        assert_eq!(t("has_category", "x", &["Success"]), None);
        assert_eq!(t("no_such_test", "x", &[]), None);
    }
}
