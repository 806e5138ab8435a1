//! The sandbox's router and the rules every `/api/v2/` request goes
//! through, in RapidPro's order: the fault knobs (latency, dropped
//! connections, hung requests, 500s), the
//! route and `.json` suffix, authentication (403 shapes), throttling (429),
//! the method (405), then the endpoint. Every API call is recorded. Also
//! the request/reply types the endpoints share and cursor pagination.

use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::Response;
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde_json::{Value, json};

use super::Sandbox;
use super::state::{CallRecord, Inner, format_dt};
use super::{actions, broadcasts, contacts, flows, groups, inspect, runs, webhooks};

pub fn router(sandbox: Sandbox) -> Router {
    Router::new()
        .route(
            "/_sandbox/calls",
            get(inspect::calls).delete(inspect::clear_calls),
        )
        .route("/_sandbox/state", get(inspect::state))
        .route("/_sandbox/webhooks", get(inspect::webhooks))
        .route("/_sandbox/reset", post(inspect::reset))
        .route(
            "/_sandbox/knobs",
            get(inspect::knobs).post(inspect::set_knobs),
        )
        .route("/_sandbox/contact_status", post(inspect::contact_status))
        .route("/_sandbox/tick", post(inspect::tick))
        .route("/_sandbox/inbound", post(inspect::inbound))
        .route("/_sandbox/interrupt", post(inspect::interrupt))
        .route("/_sandbox/clock", post(inspect::advance_clock))
        .route("/_sandbox/webhooks/deliver", post(inspect::deliver))
        .fallback(entry)
        .with_state(sandbox)
}

/// What an endpoint answers.
pub struct Reply {
    pub status: StatusCode,
    pub body: ReplyBody,
    pub headers: Vec<(header::HeaderName, String)>,
}

pub enum ReplyBody {
    Json(Value),
    Text(String),
    Empty,
}

impl Reply {
    pub fn json(status: StatusCode, body: Value) -> Self {
        Reply {
            status,
            body: ReplyBody::Json(body),
            headers: Vec::new(),
        }
    }
    pub fn ok(body: Value) -> Self {
        Reply::json(StatusCode::OK, body)
    }
    pub fn detail(status: StatusCode, detail: &str) -> Self {
        Reply::json(status, json!({ "detail": detail }))
    }
    pub fn bad_request(body: Value) -> Self {
        Reply::json(StatusCode::BAD_REQUEST, body)
    }
    pub fn not_found() -> Self {
        Reply::detail(StatusCode::NOT_FOUND, "Not found.")
    }
    pub fn no_content() -> Self {
        Reply {
            status: StatusCode::NO_CONTENT,
            body: ReplyBody::Empty,
            headers: Vec::new(),
        }
    }
    pub fn server_error() -> Self {
        Reply {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            body: ReplyBody::Text("Server Error. Site administrators have been notified.".into()),
            headers: Vec::new(),
        }
    }
}

/// A parsed API request.
pub struct Req {
    pub method: Method,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub body: Bytes,
    /// `http://host:port`, from the Host header.
    pub origin: String,
}

impl Req {
    /// The first value of a query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn flag(&self, name: &str) -> bool {
        self.param(name)
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
    }

    /// The body as a JSON object, or RapidPro's 400.
    pub fn json_object(&self) -> Result<serde_json::Map<String, Value>, Reply> {
        // DRF reads an empty body as an empty object.
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(serde_json::Map::new());
        }
        match serde_json::from_slice::<Value>(&self.body) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(Reply::bad_request(
                json!({"non_field_errors": ["Request body should be a single JSON object"]}),
            )),
            Err(e) => Err(Reply::bad_request(
                json!({"detail": format!("JSON parse error - {e}")}),
            )),
        }
    }

    /// The single lookup parameter among `allowed` (RapidPro's rule for
    /// POST/DELETE): `Ok(None)` when none is given.
    pub fn lookup(&self, allowed: &[&str]) -> Result<Option<(&'static str, String)>, Reply> {
        let mut found = Vec::new();
        for name in allowed {
            if let Some(v) = self.param(name) {
                found.push((*name, v.to_string()));
            }
        }
        if found.len() > 1 {
            let mut names: Vec<&str> = allowed.to_vec();
            names.sort_unstable();
            return Err(Reply::bad_request(json!({"detail": format!(
                "URL can only contain one of the following parameters: {}",
                names.join(", ")
            )})));
        }
        Ok(found.pop().map(|(k, v)| {
            let key: &'static str = match k {
                "uuid" => "uuid",
                "urn" => "urn",
                "key" => "key",
                _ => "id",
            };
            (key, v)
        }))
    }
}

#[derive(Clone, Copy)]
struct Endpoint {
    name: &'static str,
    scope: &'static str,
    methods: &'static [Method],
}

const ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        name: "contacts",
        scope: "v2.contacts",
        methods: &[Method::GET, Method::POST, Method::DELETE],
    },
    Endpoint {
        name: "contact_actions",
        scope: "v2",
        methods: &[Method::POST],
    },
    Endpoint {
        name: "groups",
        scope: "v2",
        methods: &[Method::GET, Method::POST, Method::DELETE],
    },
    Endpoint {
        name: "fields",
        scope: "v2",
        methods: &[Method::GET, Method::POST],
    },
    Endpoint {
        name: "broadcasts",
        scope: "v2",
        methods: &[Method::GET, Method::POST],
    },
    Endpoint {
        name: "messages",
        scope: "v2.messages",
        methods: &[Method::GET, Method::POST],
    },
    Endpoint {
        name: "flow_starts",
        scope: "v2",
        methods: &[Method::GET, Method::POST],
    },
    Endpoint {
        name: "runs",
        scope: "v2.runs",
        methods: &[Method::GET],
    },
    Endpoint {
        name: "resthooks",
        scope: "v2",
        methods: &[Method::GET],
    },
    Endpoint {
        name: "resthook_subscribers",
        scope: "v2",
        methods: &[Method::GET, Method::POST, Method::DELETE],
    },
    Endpoint {
        name: "resthook_events",
        scope: "v2",
        methods: &[Method::GET],
    },
    Endpoint {
        name: "archives",
        scope: "v2",
        methods: &[Method::GET],
    },
    Endpoint {
        name: "flows",
        scope: "v2",
        methods: &[Method::GET],
    },
    Endpoint {
        name: "definitions",
        scope: "v2",
        methods: &[Method::GET],
    },
    Endpoint {
        name: "workspace",
        scope: "v2",
        methods: &[Method::GET],
    },
];

pub(super) fn random_fraction() -> f64 {
    // 53 random bits from a v4 UUID: uniform in [0, 1).
    let bits = uuid::Uuid::new_v4().as_u128() >> 75;
    bits as f64 / (1u64 << 53) as f64
}

async fn entry(
    State(sandbox): State<Sandbox>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: Vec<(String, String)> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let req = Req {
        method,
        path: uri.path().to_string(),
        query,
        body,
        origin: format!("http://{host}"),
    };
    let (latency, error_rate, timeout_rate, drop_rate) = {
        let inner = sandbox.lock();
        (
            inner.latency,
            inner.error_rate,
            inner.timeout_rate,
            inner.drop_rate,
        )
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if drop_rate > 0.0 && random_fraction() < drop_rate {
        let mut inner = sandbox.lock();
        let time = inner.now();
        inner.calls.push(CallRecord {
            method: req.method.to_string(),
            path: req.path.clone(),
            query: uri.query().map(str::to_string),
            body: recorded_body(&req.body),
            status: 0,
            time: format_dt(&time),
        });
        return dropped_connection();
    }
    if timeout_rate > 0.0 && random_fraction() < timeout_rate {
        tokio::select! {
            () = tokio::time::sleep(super::TIMEOUT_HANG) => {}
            () = sandbox.stop.cancelled() => {
                return into_response(Reply::detail(StatusCode::SERVICE_UNAVAILABLE, "Shutting down."));
            }
        }
    }
    let mut inner = sandbox.lock();
    let time = inner.now();
    let reply = if error_rate > 0.0 && random_fraction() < error_rate {
        Reply::server_error()
    } else {
        handle(&mut inner, &req, &headers)
    };
    inner.calls.push(CallRecord {
        method: req.method.to_string(),
        path: req.path.clone(),
        query: uri.query().map(str::to_string),
        body: recorded_body(&req.body),
        status: reply.status.as_u16(),
        time: format_dt(&time),
    });
    // With auto_process, flows run as requests arrive; webhooks they reach
    // are sent in the background, as mailroom would, without holding up
    // this answer. Otherwise they wait for `deliver_pending_webhooks`.
    let deliver = inner.auto_process && !inner.pending_webhooks.is_empty();
    drop(inner);
    if deliver {
        let sandbox = sandbox.clone();
        tokio::spawn(async move {
            sandbox.deliver_pending_webhooks().await;
        });
    }
    into_response(reply)
}

fn recorded_body(body: &Bytes) -> Value {
    if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
    }
}

/// A response whose body fails at once: hyper closes the connection
/// without sending anything, so the client sees a connection error and
/// no status (`drop_rate`).
fn dropped_connection() -> Response {
    let failing = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("sandbox drop_rate"))
    });
    Response::new(Body::from_stream(failing))
}

fn into_response(reply: Reply) -> Response {
    let (content_type, body) = match reply.body {
        ReplyBody::Json(v) => ("application/json", Body::from(v.to_string())),
        ReplyBody::Text(t) => ("text/plain; charset=utf-8", Body::from(t)),
        ReplyBody::Empty => ("application/json", Body::empty()),
    };
    let mut response = Response::new(body);
    *response.status_mut() = reply.status;
    let h = response.headers_mut();
    if reply.status != StatusCode::NO_CONTENT {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    for (name, value) in reply.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    response
}

enum Auth {
    None,
    Ok,
}

/// DRF's TokenAuthentication then temba's Basic authentication.
fn authenticate(inner: &Inner, headers: &HeaderMap) -> Result<Auth, Reply> {
    let forbidden = |d: &str| Reply::detail(StatusCode::FORBIDDEN, d);
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(Auth::None);
    };
    let Ok(value) = value.to_str() else {
        return Err(forbidden(
            "Invalid token header. Token string should not contain invalid characters.",
        ));
    };
    let parts: Vec<&str> = value.split_whitespace().collect();
    let Some(keyword) = parts.first() else {
        return Ok(Auth::None);
    };
    let tokens = &inner.settings.tokens;
    if keyword.eq_ignore_ascii_case("token") {
        return match parts.len() {
            1 => Err(forbidden("Invalid token header. No credentials provided.")),
            2 if tokens.iter().any(|t| t == parts[1]) => Ok(Auth::Ok),
            2 => Err(forbidden("Invalid token")),
            _ => Err(forbidden(
                "Invalid token header. Token string should not contain spaces.",
            )),
        };
    }
    if keyword.eq_ignore_ascii_case("basic") {
        if parts.len() != 2 {
            return Err(forbidden("Invalid token or email"));
        }
        let decoded = B64
            .decode(parts[1])
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        let ok = decoded
            .as_deref()
            .and_then(|d| d.split_once(':'))
            .is_some_and(|(email, token)| {
                email.eq_ignore_ascii_case(&inner.settings.user_email)
                    && tokens.iter().any(|t| t == token)
            });
        return if ok {
            Ok(Auth::Ok)
        } else {
            Err(forbidden("Invalid token or email"))
        };
    }
    Ok(Auth::None)
}

/// DRF's sliding-window throttle: `Err` is the 429.
fn throttle(inner: &mut Inner, scope: &str) -> Result<(), Reply> {
    let Some(rate) = inner.rates.get(scope).copied() else {
        return Ok(());
    };
    let window = std::time::Duration::from_secs(rate.per_secs);
    let now = Instant::now();
    let history = inner.throttle_log.entry(scope.to_string()).or_default();
    while history
        .front()
        .is_some_and(|t| now.duration_since(*t) >= window)
    {
        history.pop_front();
    }
    let limit = rate.requests as usize;
    if history.len() < limit {
        history.push_back(now);
        return Ok(());
    }
    if history.len() > limit {
        // DRF's wait() is None when the history outgrew a lowered rate.
        return Err(Reply::detail(
            StatusCode::TOO_MANY_REQUESTS,
            "Request was throttled.",
        ));
    }
    let oldest = history.front().copied().unwrap_or(now);
    let wait = window.saturating_sub(now.duration_since(oldest));
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut reply = Reply::detail(
        StatusCode::TOO_MANY_REQUESTS,
        &format!("Request was throttled. Expected available in {secs} seconds."),
    );
    reply.headers.push((header::RETRY_AFTER, secs.to_string()));
    Err(reply)
}

fn handle(inner: &mut Inner, req: &Req, headers: &HeaderMap) -> Reply {
    let Some(rest) = req.path.strip_prefix("/api/v2/") else {
        return Reply::not_found();
    };
    let (name, json_suffix) = match rest.strip_suffix(".json") {
        Some(name) => (name, true),
        None => (rest.trim_end_matches('/'), false),
    };
    let Some(endpoint) = ENDPOINTS.iter().find(|e| e.name == name).copied() else {
        return Reply::not_found();
    };
    let auth = match authenticate(inner, headers) {
        Ok(auth) => auth,
        Err(reply) => return reply,
    };
    if !json_suffix {
        // The docs page: GET lists nothing, every other method is refused.
        return if req.method == Method::GET {
            Reply::ok(json!([]))
        } else {
            Reply::detail(
                StatusCode::FORBIDDEN,
                "You do not have permission to perform this action.",
            )
        };
    }
    if matches!(auth, Auth::None) {
        return Reply::detail(
            StatusCode::FORBIDDEN,
            "Authentication credentials were not provided.",
        );
    }
    // Every authenticated response names the workspace.
    let workspace = inner.settings.workspace.uuid.clone();
    let mut reply = authenticated(inner, req, endpoint);
    if inner.auto_process
        && reply.status == StatusCode::CREATED
        && matches!(endpoint.name, "broadcasts" | "flow_starts" | "messages")
    {
        inner.tick();
    }
    reply.headers.push((
        header::HeaderName::from_static("x-temba-workspace"),
        workspace,
    ));
    reply
}

fn authenticated(inner: &mut Inner, req: &Req, endpoint: Endpoint) -> Reply {
    if let Err(reply) = throttle(inner, endpoint.scope) {
        return reply;
    }
    if !endpoint.methods.contains(&req.method) {
        return Reply::detail(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("Method \"{}\" not allowed.", req.method),
        );
    }
    let result = match (endpoint.name, &req.method) {
        ("contacts", &Method::GET) => contacts::list(inner, req),
        ("contacts", &Method::POST) => contacts::write(inner, req),
        ("contacts", &Method::DELETE) => contacts::delete(inner, req),
        ("contact_actions", _) => actions::post(inner, req),
        ("groups", &Method::GET) => groups::list_groups(inner, req),
        ("groups", &Method::POST) => groups::write_group(inner, req),
        ("groups", &Method::DELETE) => groups::delete_group(inner, req),
        ("fields", &Method::GET) => groups::list_fields(inner, req),
        ("fields", &Method::POST) => groups::write_field(inner, req),
        ("flows", _) => flows::list(inner, req),
        ("definitions", _) => Ok(flows::definitions(inner, req)),
        // The sandbox never archives: limit/offset pagination with `count`.
        ("archives", _) => Ok(Reply::ok(
            json!({"count": 0, "next": null, "previous": null, "results": []}),
        )),
        ("broadcasts", &Method::GET) => broadcasts::list_broadcasts(inner, req),
        ("broadcasts", &Method::POST) => broadcasts::create(inner, req),
        ("messages", &Method::GET) => broadcasts::list_messages(inner, req),
        ("messages", &Method::POST) => broadcasts::send(inner, req),
        ("flow_starts", &Method::GET) => runs::list_starts(inner, req),
        ("flow_starts", &Method::POST) => runs::create_start(inner, req),
        ("runs", _) => runs::list_runs(inner, req),
        ("resthooks", _) => webhooks::list_resthooks(inner, req),
        ("resthook_subscribers", &Method::GET) => webhooks::list_subscribers(inner, req),
        ("resthook_subscribers", &Method::POST) => webhooks::subscribe(inner, req),
        ("resthook_subscribers", &Method::DELETE) => webhooks::unsubscribe(inner, req),
        ("resthook_events", _) => webhooks::list_events(inner, req),
        ("workspace", _) => Ok(groups::workspace(inner)),
        _ => Err(Reply::server_error()),
    };
    result.unwrap_or_else(|reply| reply)
}

/// Parses a `before`/`after` value as iso8601 does (naive means UTC).
pub fn parse_datetime(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc());
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// Applies inclusive `before`/`after` to a timestamp; an unparseable value
/// matches nothing (RapidPro returns an empty list, not an error).
pub fn in_range(req: &Req, t: &DateTime<Utc>) -> bool {
    if let Some(before) = req.param("before") {
        match parse_datetime(before) {
            Some(b) if *t <= b => {}
            _ => return false,
        }
    }
    if let Some(after) = req.param("after") {
        match parse_datetime(after) {
            Some(a) if *t >= a => {}
            _ => return false,
        }
    }
    true
}

/// One row of a cursor-paginated list: its sort position and its JSON.
pub struct Row {
    pub key: i64,
    pub id: u64,
    pub value: Value,
}

/// DRF cursor pagination over rows already filtered and sorted in display
/// order (`descending` says which way (key, id) runs). The cursor is opaque
/// base64 of `p=<key>_<id>` plus `&r=1` for a `previous` link.
pub fn paginate(req: &Req, rows: Vec<Row>, page_size: usize, descending: bool) -> Reply {
    let page_size = page_size.max(1);
    let before_pos = |row: &Row, pos: (i64, u64)| {
        if descending {
            (row.key, row.id) > pos
        } else {
            (row.key, row.id) < pos
        }
    };
    let (start, end) = match req.param("cursor") {
        None => (0, rows.len().min(page_size)),
        Some(cursor) => {
            let Some((pos, reverse)) = decode_cursor(cursor) else {
                return Reply::detail(StatusCode::NOT_FOUND, "Invalid cursor");
            };
            // Index of the first row at or after the position.
            let split = rows.iter().take_while(|r| before_pos(r, pos)).count();
            if reverse {
                (split.saturating_sub(page_size), split)
            } else {
                let first = if rows.get(split).is_some_and(|r| (r.key, r.id) == pos) {
                    split + 1
                } else {
                    split
                };
                (first, (first + page_size).min(rows.len()))
            }
        }
    };
    let next = if end < rows.len() && end > start {
        let last = &rows[end - 1];
        Some(page_url(req, &encode_cursor((last.key, last.id), false)))
    } else {
        None
    };
    let previous = if start > 0 && start < rows.len() {
        let first = &rows[start];
        Some(page_url(req, &encode_cursor((first.key, first.id), true)))
    } else {
        None
    };
    let results: Vec<Value> = rows
        .into_iter()
        .skip(start)
        .take(end.saturating_sub(start))
        .map(|r| r.value)
        .collect();
    Reply::ok(json!({"next": next, "previous": previous, "results": results}))
}

fn encode_cursor(pos: (i64, u64), reverse: bool) -> String {
    let raw = if reverse {
        format!("r=1&p={}_{}", pos.0, pos.1)
    } else {
        format!("p={}_{}", pos.0, pos.1)
    };
    B64.encode(raw)
}

fn decode_cursor(cursor: &str) -> Option<((i64, u64), bool)> {
    let raw = String::from_utf8(B64.decode(cursor).ok()?).ok()?;
    let mut reverse = false;
    let mut pos = None;
    for part in raw.split('&') {
        match part.split_once('=')? {
            ("r", "1") => reverse = true,
            ("p", p) => {
                let (k, id) = p.split_once('_')?;
                pos = Some((k.parse().ok()?, id.parse().ok()?));
            }
            _ => return None,
        }
    }
    Some((pos?, reverse))
}

fn page_url(req: &Req, cursor: &str) -> String {
    let mut ser = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in req.query.iter().filter(|(k, _)| k != "cursor") {
        ser.append_pair(k, v);
    }
    ser.append_pair("cursor", cursor);
    format!("{}{}?{}", req.origin, req.path, ser.finish())
}
