//! Webhooks out of the sandbox (reference §7): the flow editor's default
//! "Call Webhook" body for a run, goflow's resthook payload, the resthook
//! endpoints (`resthooks`, `resthook_subscribers`, `resthook_events`) and the
//! delivery rules (mailroom's headers, 15 s timeout, no retries, 410
//! unsubscribes). Slugs are created through the handle, as RapidPro only
//! creates them in the flow editor. Flow runs reach webhooks through the
//! engine, which queues them; [`send`] makes the request.

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::http::{Reply, Req, Row, paginate};
use super::state::{Inner, format_dt};

#[derive(Debug, Clone)]
pub struct Resthook {
    pub id: u64,
    pub slug: String,
    pub created_on: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct Subscriber {
    pub id: u64,
    pub resthook: String,
    pub target_url: String,
    pub created_on: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub id: u64,
    pub resthook: String,
    pub data: Value,
    pub created_on: DateTime<Utc>,
}

/// One webhook POST the sandbox made.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WebhookCall {
    pub url: String,
    pub payload: Value,
    /// The HTTP status, or None when the call failed (`error` says why).
    pub status: Option<u16>,
    pub error: Option<String>,
    pub time: String,
}

/// The editor's default call_webhook body (§7.1) for a run.
pub fn webhook_body(inner: &Inner, run_uuid: &str) -> Option<Value> {
    let run = inner.runs.iter().find(|r| r.uuid == run_uuid)?;
    let contact = inner.contacts.iter().find(|c| c.id == run.contact)?;
    let flow = inner.flows.iter().find(|f| f.uuid == run.flow)?;
    let results: Map<String, Value> = run
        .values
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                json!({"value": v["value"], "category": v["category"]}),
            )
        })
        .collect();
    Some(json!({
        "contact": {"uuid": contact.uuid, "name": contact.name.clone().unwrap_or_default(), "urn": contact.urns.first()},
        "flow": {"uuid": flow.uuid, "name": flow.name},
        "results": results,
    }))
}

/// goflow's resthook payload (§7.2), keys in goflow's alphabetical order.
pub fn resthook_payload(inner: &Inner, run_uuid: &str) -> Option<Value> {
    let run = inner.runs.iter().find(|r| r.uuid == run_uuid)?;
    let contact = inner.contacts.iter().find(|c| c.id == run.contact)?;
    let flow = inner.flows.iter().find(|f| f.uuid == run.flow)?;
    let path: Vec<Value> = run
        .path
        .iter()
        .map(|p| json!({"arrived_on": p["time"], "node_uuid": p["node"]}))
        .collect();
    let results: Map<String, Value> = run
        .values
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                json!({
                    "category": v["category"], "category_localized": v["category"],
                    "created_on": v["time"],
                    "input": run.inputs.get(k).cloned().unwrap_or_else(|| json!("")),
                    "name": v["name"],
                    "node_uuid": v["node"], "value": v["value"],
                }),
            )
        })
        .collect();
    Some(json!({
        "channel": null,
        "contact": {"language": contact.language, "name": contact.name.clone().unwrap_or_default(),
                    "urn": contact.urns.first(), "uuid": contact.uuid},
        "flow": {"name": flow.name, "revision": 1, "uuid": flow.uuid},
        "input": run.input.as_ref().map_or(Value::Null, |text| json!({"text": text, "type": "msg"})),
        "path": path,
        "results": results,
        "run": {"created_on": format_dt(&run.created_on), "uuid": run.uuid},
    }))
}

pub fn add_resthook(inner: &mut Inner, slug: &str) {
    if inner.resthooks.iter().any(|r| r.slug == slug) {
        return;
    }
    let now = inner.now();
    let hook = Resthook {
        id: inner.next_id(),
        slug: slug.to_string(),
        created_on: now,
    };
    inner.resthooks.push(hook);
}

pub fn list_resthooks(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let mut rows: Vec<Row> = inner
        .resthooks
        .iter()
        .map(|r| Row {
            key: r.created_on.timestamp_micros(),
            id: r.id,
            value: json!({"resthook": r.slug, "modified_on": format_dt(&r.created_on), "created_on": format_dt(&r.created_on)}),
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse((r.key, r.id)));
    Ok(paginate(req, rows, inner.settings.page_size, true))
}

fn subscriber_json(s: &Subscriber) -> Value {
    json!({"id": s.id, "resthook": s.resthook, "target_url": s.target_url, "created_on": format_dt(&s.created_on)})
}

pub fn list_subscribers(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let id = req.param("id");
    let slug = req.param("resthook");
    let mut rows: Vec<Row> = inner
        .subscribers
        .iter()
        .filter(|s| id.is_none_or(|i| s.id.to_string() == i))
        .filter(|s| slug.is_none_or(|r| s.resthook == r))
        .map(|s| Row {
            key: s.created_on.timestamp_micros(),
            id: s.id,
            value: subscriber_json(s),
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse((r.key, r.id)));
    Ok(paginate(req, rows, inner.settings.page_size, true))
}

pub fn subscribe(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let body = req.json_object()?;
    let mut errors = Map::new();
    let slug = match body.get("resthook") {
        Some(Value::String(s)) if inner.resthooks.iter().any(|r| &r.slug == s) => Some(s.clone()),
        Some(Value::String(s)) => {
            errors.insert(
                "resthook".into(),
                json!([format!("No resthook with slug: {s}")]),
            );
            None
        }
        None => {
            errors.insert("resthook".into(), json!(["This field is required."]));
            None
        }
        Some(_) => {
            errors.insert("resthook".into(), json!(["Not a valid string."]));
            None
        }
    };
    let target = match body.get("target_url") {
        Some(Value::String(s))
            if url::Url::parse(s)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some()) =>
        {
            Some(s.clone())
        }
        None => {
            errors.insert("target_url".into(), json!(["This field is required."]));
            None
        }
        Some(_) => {
            errors.insert("target_url".into(), json!(["Enter a valid URL."]));
            None
        }
    };
    if !errors.is_empty() {
        return Err(Reply::bad_request(Value::Object(errors)));
    }
    let (Some(slug), Some(target_url)) = (slug, target) else {
        return Err(Reply::server_error());
    };
    if inner
        .subscribers
        .iter()
        .any(|s| s.resthook == slug && s.target_url == target_url)
    {
        return Err(Reply::bad_request(
            json!({"non_field_errors": ["URL is already subscribed to this event."]}),
        ));
    }
    let now = inner.now();
    let sub = Subscriber {
        id: inner.next_id(),
        resthook: slug,
        target_url,
        created_on: now,
    };
    let json = subscriber_json(&sub);
    inner.subscribers.push(sub);
    Ok(Reply::json(StatusCode::CREATED, json))
}

pub fn unsubscribe(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let Some((_, id)) = req.lookup(&["id"])? else {
        return Err(Reply::bad_request(
            json!({"detail": "URL must contain one of the following parameters: id"}),
        ));
    };
    let before = inner.subscribers.len();
    inner.subscribers.retain(|s| s.id.to_string() != id);
    if inner.subscribers.len() == before {
        Err(Reply::not_found())
    } else {
        Ok(Reply::no_content())
    }
}

pub fn list_events(inner: &mut Inner, req: &Req) -> Result<Reply, Reply> {
    let mut rows: Vec<Row> = inner
        .events
        .iter()
        .map(|e| Row {
            key: e.created_on.timestamp_micros(),
            id: e.id,
            value: json!({"resthook": e.resthook, "data": e.data, "created_on": format_dt(&e.created_on)}),
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse((r.key, r.id)));
    Ok(paginate(req, rows, inner.settings.page_size, true))
}

/// POSTs `payload` as mailroom does: JSON, its default headers, 15 s
/// timeout, no retries.
pub async fn post(url: &str, payload: &Value) -> (Option<u16>, Option<String>) {
    let r = send("POST", url, &[], Some(&payload.to_string())).await;
    (r.status, r.error)
}

/// What a webhook answered.
pub struct Response {
    /// None when the call failed (`error` says why).
    pub status: Option<u16>,
    pub error: Option<String>,
    /// The body when it is JSON under 10,000 bytes (`@webhook.json`), else null.
    pub json: Value,
}

/// Sends one webhook request as mailroom does: the flow's headers over the
/// editor's defaults (`Accept`, and `Content-Type` with a body) and
/// mailroom's (`User-Agent`, `X-Mailroom-Mode`), 15 s timeout, no retries,
/// the response read up to 256 KiB.
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: Option<&str>,
) -> Response {
    let failed = |e: String| Response {
        status: None,
        error: Some(e),
        json: Value::Null,
    };
    crate::install_tls_provider();
    let client = match reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(15))
        .build()
    {
        Ok(c) => c,
        Err(e) => return failed(e.to_string()),
    };
    let Ok(method) = reqwest::Method::from_bytes(method.as_bytes()) else {
        return failed(format!("unsupported method {method:?}"));
    };
    use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
    let mut map = HeaderMap::new();
    let mut set = |name: &str, value: &str| {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            // The flow's headers replace the defaults of the same name.
            map.insert(n, v);
        }
    };
    set("Accept", "application/json");
    if body.is_some() {
        set("Content-Type", "application/json");
    }
    for (name, value) in headers.iter().take(10) {
        set(name, value);
    }
    set("User-Agent", "Mailroom/26.3");
    set("X-Mailroom-Mode", "normal");
    let mut request = client.request(method, url).headers(map);
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    match request.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let bytes = r.bytes().await.unwrap_or_default();
            let json = if bytes.len() < 10_000 {
                serde_json::from_slice(&bytes).unwrap_or(Value::Null)
            } else {
                Value::Null
            };
            Response {
                status: Some(status),
                error: None,
                json,
            }
        }
        Err(e) => failed(e.to_string()),
    }
}
