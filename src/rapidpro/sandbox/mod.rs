//! The RapidPro API v2 sandbox: in-memory state behind the same HTTP contract.
//!
//! This module owns the sandbox's settings ([`SandboxSettings`]), the shared
//! handle on its state ([`Sandbox`]) and the in-process server
//! ([`SandboxServer`]). The contract it imitates is
//! `shared/reference/rapidpro-api.md` (section 9 is its checklist).
//!
//! Layout:
//! - `state`: the in-memory workspace (contacts, groups, fields), the call
//!   log, the knobs and the clock.
//! - `http`: the router, the cross-cutting rules (`.json` suffix, auth,
//!   throttling, error injection, call recording) and cursor pagination.
//! - `urn`: URN normalisation and validation.
//! - `engine`: the flow interpreter (runs walk their flow definitions,
//!   send messages, wait for replies, call webhooks, expire).
//! - `contacts`, `groups` (groups, fields, workspace), `actions`
//!   (contact_actions), `flows` (flow exports, flows), `broadcasts`
//!   (broadcasts, messages, their processing and inbound messages), `runs`
//!   (flow starts, runs, their processing), `webhooks` (call_webhook and
//!   resthook payloads, resthook endpoints, delivery): the endpoints.
//! - `inspect`: the `/_sandbox/*` inspection and control API.

mod actions;
mod broadcasts;
mod contacts;
mod engine;
mod flows;
mod groups;
mod http;
mod inspect;
mod runs;
mod state;
mod urn;
mod webhooks;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use state::{CallRecord, TickReport};
pub use urn::normalize_urn;
pub use webhooks::WebhookCall;

/// The throttle scopes RapidPro uses.
pub const SCOPES: [&str; 4] = ["v2", "v2.contacts", "v2.messages", "v2.runs"];

/// A throttle rate: `requests` per `per_secs` seconds (DRF's "3600/hour").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    pub requests: u32,
    pub per_secs: u64,
}

impl Rate {
    pub const fn per_hour(requests: u32) -> Self {
        Rate {
            requests,
            per_secs: 3600,
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per_secs {
            1 => "second".to_string(),
            60 => "minute".to_string(),
            3600 => "hour".to_string(),
            86400 => "day".to_string(),
            n => format!("{n}s"),
        };
        write!(f, "{}/{}", self.requests, unit)
    }
}

impl FromStr for Rate {
    type Err = String;
    /// DRF syntax: `<n>/<s|m|h|d...>` (only the first letter of the period counts).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (n, period) = s
            .split_once('/')
            .ok_or_else(|| format!("rate {s:?} is not of the form N/period"))?;
        let requests: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("rate {s:?}: {n:?} is not a number"))?;
        let period = period.trim();
        let per_secs = if let Some(secs) = period.strip_suffix('s').and_then(|p| p.parse().ok()) {
            secs
        } else {
            match period.chars().next() {
                Some('s') => 1,
                Some('m') => 60,
                Some('h') => 3600,
                Some('d') => 86400,
                _ => return Err(format!("rate {s:?}: unknown period {period:?}")),
            }
        };
        if per_secs == 0 {
            return Err(format!("rate {s:?}: the period must be positive"));
        }
        Ok(Rate { requests, per_secs })
    }
}

/// The workspace the sandbox pretends to be (`GET workspace.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkspaceSettings {
    pub uuid: String,
    pub name: String,
    /// ISO 3166 alpha-2; local phone numbers are read in this country.
    pub country: Option<String>,
    pub languages: Vec<String>,
    pub timezone: String,
    pub date_style: String,
}

impl Default for WorkspaceSettings {
    fn default() -> Self {
        WorkspaceSettings {
            uuid: "6a44ca78-a4c2-4862-a7d3-2932f9b3a7c3".into(),
            name: "mHero Sandbox".into(),
            country: Some("RW".into()),
            languages: vec!["eng".into(), "fra".into()],
            timezone: "Africa/Kigali".into(),
            date_style: "day_first".into(),
        }
    }
}

/// Everything the sandbox can be configured with.
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    /// Where `SandboxServer::start` listens (port 0 picks a free port).
    pub listen: SocketAddr,
    /// API tokens; every one belongs to the single workspace.
    pub tokens: Vec<String>,
    /// The token owner's email (for `Authorization: Basic email:token`).
    pub user_email: String,
    pub workspace: WorkspaceSettings,
    /// Throttle rate per scope (`v2`, `v2.contacts`, `v2.messages`, `v2.runs`).
    pub throttle: BTreeMap<String, Rate>,
    /// Items per page (RapidPro: 250, fixed).
    pub page_size: usize,
    /// Added to every API request.
    pub latency: Duration,
    /// Fraction (0.0..=1.0) of API requests answered 500 with a plain-text body.
    pub error_rate: f64,
    /// Fraction (0.0..=1.0) of API requests that hang for
    /// [`TIMEOUT_HANG`] (or until shutdown) before being handled.
    pub timeout_rate: f64,
    /// Fraction (0.0..=1.0) of API requests whose connection is closed
    /// without any HTTP response (the request is not handled).
    pub drop_rate: f64,
    /// When set, every flow `call_webhook` action POSTs here instead of its URL.
    pub webhook_url_override: Option<String>,
    /// Process broadcasts, flow starts and single messages as soon as they
    /// are created, instead of waiting for [`Sandbox::tick`] (RapidPro does it
    /// asynchronously; off by default so tests can observe `pending`).
    pub auto_process: bool,
}

/// How long a request picked by the `timeout_rate` knob hangs: far longer
/// than any client timeout.
pub const TIMEOUT_HANG: Duration = Duration::from_secs(120);

/// The default token the sandbox accepts.
pub const DEFAULT_TOKEN: &str = "sandbox-token";

impl Default for SandboxSettings {
    fn default() -> Self {
        SandboxSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tokens: vec![DEFAULT_TOKEN.to_string()],
            user_email: "sandbox@example.com".into(),
            workspace: WorkspaceSettings::default(),
            throttle: SCOPES
                .iter()
                .map(|s| (s.to_string(), Rate::per_hour(3600)))
                .collect(),
            page_size: 250,
            latency: Duration::ZERO,
            error_rate: 0.0,
            timeout_rate: 0.0,
            drop_rate: 0.0,
            webhook_url_override: None,
            auto_process: false,
        }
    }
}

impl SandboxSettings {
    /// Sets the same rate for every scope.
    pub fn with_throttle_rate(mut self, rate: Rate) -> Self {
        for scope in SCOPES {
            self.throttle.insert(scope.to_string(), rate);
        }
        self
    }
}

/// The runtime knobs, readable and settable while the sandbox runs
/// (`GET/POST /_sandbox/knobs`, [`Sandbox::knobs`], [`Sandbox::set_knobs`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Knobs {
    pub latency_ms: u64,
    pub error_rate: f64,
    pub timeout_rate: f64,
    pub drop_rate: f64,
    pub webhook_url_override: Option<String>,
    pub auto_process: bool,
    /// Scope -> rate in DRF syntax, e.g. `{"v2.contacts": "5/hour"}`.
    pub throttle: BTreeMap<String, String>,
}

/// A partial update of the knobs (absent members stay as they are).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KnobsUpdate {
    pub latency_ms: Option<u64>,
    /// Each rate must be within 0.0..=1.0.
    pub error_rate: Option<f64>,
    pub timeout_rate: Option<f64>,
    pub drop_rate: Option<f64>,
    /// An http(s) URL; `""` removes the override.
    pub webhook_url_override: Option<String>,
    pub auto_process: Option<bool>,
    /// Scope -> rate; the scope `"*"` sets every scope.
    pub throttle: Option<BTreeMap<String, String>>,
}

/// A cheap, cloneable handle on one sandbox's state.
#[derive(Clone)]
pub struct Sandbox {
    shared: Arc<Mutex<state::Inner>>,
    /// Cancelled when the server stops: ends requests hung by `timeout_rate`.
    pub(crate) stop: CancellationToken,
}

impl Sandbox {
    pub fn new(settings: SandboxSettings) -> Self {
        Sandbox {
            shared: Arc::new(Mutex::new(state::Inner::new(settings))),
            stop: CancellationToken::new(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, state::Inner> {
        // A poisoned lock only means another request panicked mid-way; the
        // state is still usable for a test double.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The axum router: `/api/v2/*` and `/_sandbox/*`.
    pub fn router(&self) -> axum::Router {
        http::router(self.clone())
    }

    /// Every API call received so far, oldest first.
    pub fn calls(&self) -> Vec<CallRecord> {
        self.lock().calls.clone()
    }

    /// Loads the flows of a RapidPro flow export (spec 13) for `GET flows.json`;
    /// returns their UUIDs. Legacy exports are refused.
    pub fn load_flow_export(&self, export: &Value) -> Result<Vec<String>, String> {
        flows::load_export(&mut self.lock(), export)
    }

    /// Archives or unarchives a flow (the UI can, the API cannot). False
    /// when there is no such flow.
    pub fn set_flow_archived(&self, uuid: &str, archived: bool) -> bool {
        flows::set_archived(&mut self.lock(), uuid, archived)
    }

    /// Deletes a flow (the UI can, the API cannot). False when there is no
    /// such flow.
    pub fn remove_flow(&self, uuid: &str) -> bool {
        flows::remove(&mut self.lock(), uuid)
    }

    /// Does what mailroom does after broadcast POSTs: every `pending`
    /// broadcast gets one outgoing message per recipient and becomes
    /// `completed` (`POST /_sandbox/tick`). Returns how many were processed.
    pub fn process_broadcasts(&self) -> usize {
        broadcasts::process_pending(&mut self.lock())
    }

    /// Processes pending broadcasts and flow starts (their runs walk their
    /// flows), sends queued messages and expires runs waiting past their
    /// flow's expiry, in that order. Webhooks the runs reach are queued:
    /// send them with [`Sandbox::deliver_pending_webhooks`] (the HTTP
    /// `POST /_sandbox/tick` does both).
    pub fn tick(&self) -> TickReport {
        self.lock().tick()
    }

    /// Does what courier does: queued outgoing messages (from
    /// `POST messages.json`) become `sent`. Returns how many.
    pub fn send_queued_messages(&self) -> usize {
        broadcasts::send_queued(&mut self.lock())
    }

    /// Does what mailroom does after flow start POSTs: every `pending` start
    /// gets one run per recipient, which the engine walks until it waits,
    /// ends or reaches a webhook, and becomes `completed` (`failed` for an
    /// archived flow). Returns how many starts were processed.
    pub fn process_flow_starts(&self) -> usize {
        runs::process_pending(&mut self.lock())
    }

    /// Completes a waiting run with results `(result name, value, category)`,
    /// as if the contact had answered. False when no such waiting run exists.
    pub fn complete_run(&self, run_uuid: &str, results: &[(&str, &str, &str)]) -> bool {
        runs::complete_run(&mut self.lock(), run_uuid, results)
    }

    /// Creates a resthook slug (RapidPro creates them in the flow editor).
    pub fn add_resthook(&self, slug: &str) {
        webhooks::add_resthook(&mut self.lock(), slug);
    }

    /// Emulates a flow's "Call Webhook" action for a run: POSTs the editor's
    /// default body (reference §7.1) to `url` with mailroom's headers, once.
    pub async fn call_webhook(&self, run_uuid: &str, url: &str) -> Result<WebhookCall, String> {
        let payload = webhooks::webhook_body(&self.lock(), run_uuid)
            .ok_or_else(|| format!("no run {run_uuid}"))?;
        Ok(self.deliver(url, payload).await)
    }

    /// Emulates a "Call Resthook" action for a run: records a resthook event
    /// and POSTs goflow's payload (reference §7.2) to every subscriber; a
    /// subscriber answering 410 is unsubscribed. Returns the calls made.
    pub async fn fire_resthook(
        &self,
        run_uuid: &str,
        slug: &str,
    ) -> Result<Vec<WebhookCall>, String> {
        let (payload, targets) = {
            let mut inner = self.lock();
            if !inner.resthooks.iter().any(|r| r.slug == slug) {
                return Err(format!("no resthook {slug:?}"));
            }
            let payload = webhooks::resthook_payload(&inner, run_uuid)
                .ok_or_else(|| format!("no run {run_uuid}"))?;
            let now = inner.now();
            let id = inner.next_id();
            inner.events.push(webhooks::Event {
                id,
                resthook: slug.to_string(),
                data: payload.clone(),
                created_on: now,
            });
            let targets: Vec<(u64, String)> = inner
                .subscribers
                .iter()
                .filter(|s| s.resthook == slug)
                .map(|s| (s.id, s.target_url.clone()))
                .collect();
            (payload, targets)
        };
        let mut calls = Vec::new();
        for (id, url) in targets {
            let call = self.deliver(&url, payload.clone()).await;
            if call.status == Some(410) {
                self.lock().subscribers.retain(|s| s.id != id);
            }
            calls.push(call);
        }
        Ok(calls)
    }

    async fn deliver(&self, url: &str, payload: Value) -> WebhookCall {
        let time = state::format_dt(&self.lock().now());
        let (status, error) = webhooks::post(url, &payload).await;
        let call = WebhookCall {
            url: url.to_string(),
            payload,
            status,
            error,
            time,
        };
        self.lock().webhook_calls.push(call.clone());
        call
    }

    /// Every webhook and resthook POST the sandbox made, oldest first.
    pub fn webhook_calls(&self) -> Vec<WebhookCall> {
        self.lock().webhook_calls.clone()
    }

    /// Simulates an inbound message from `urn` (creating the contact when
    /// unknown; a stopped contact becomes active). A run of the contact
    /// waiting for a message consumes it and goes on; webhooks it reaches
    /// are queued for [`Sandbox::deliver_pending_webhooks`]. Returns the
    /// contact UUID.
    pub fn receive_message(&self, urn: &str, text: &str) -> Result<String, String> {
        broadcasts::receive(&mut self.lock(), urn, text)
    }

    /// How many webhook deliveries runs are waiting for.
    pub fn pending_webhooks(&self) -> usize {
        self.lock().pending_webhooks.len()
    }

    /// Sends the webhooks and resthooks runs queued (outside the state's
    /// lock), records each call, gives each run its result (`@webhook`, and
    /// `result_name` with category `Success` for 2xx, else `Failure`) and lets
    /// it go on; repeats while the runs queue more. Returns the calls made.
    pub async fn deliver_pending_webhooks(&self) -> Vec<WebhookCall> {
        let mut calls = Vec::new();
        // Bounded: a flow looping on webhooks cannot keep this busy forever.
        for _ in 0..100 {
            let batch = std::mem::take(&mut self.lock().pending_webhooks);
            if batch.is_empty() {
                break;
            }
            for pending in batch {
                let mut outcome: Option<engine::WebhookOutcome> = None;
                for (subscriber, url) in &pending.targets {
                    let time = state::format_dt(&self.lock().now());
                    let response = webhooks::send(
                        &pending.method,
                        url,
                        &pending.headers,
                        pending.body.as_deref(),
                    )
                    .await;
                    let call = WebhookCall {
                        url: url.clone(),
                        payload: pending.payload.clone(),
                        status: response.status,
                        error: response.error.clone(),
                        time,
                    };
                    let mut inner = self.lock();
                    inner.webhook_calls.push(call.clone());
                    if let (Some(id), Some(410)) = (subscriber, response.status) {
                        inner.subscribers.retain(|s| s.id != *id);
                    }
                    drop(inner);
                    calls.push(call);
                    let status = response.status.unwrap_or(0);
                    // A resthook's result prefers a failure (goflow's rule):
                    // the first failure sticks, else the last success counts.
                    let sticks = outcome.as_ref().is_some_and(|o| !o.success());
                    if !sticks {
                        outcome = Some(engine::WebhookOutcome {
                            status,
                            json: response.json,
                            input: format!("{} {url}", pending.method),
                        });
                    }
                }
                let outcome = outcome.unwrap_or(engine::WebhookOutcome {
                    status: 0,
                    json: Value::Null,
                    input: String::new(),
                });
                engine::resume_after_webhook(&mut self.lock(), &pending, &outcome);
            }
        }
        calls
    }

    /// Moves the sandbox's clock forward: timestamps and run expiry follow
    /// it (the next [`Sandbox::tick`] expires runs whose time has come).
    pub fn advance_clock(&self, by: Duration) {
        let by = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        self.lock().advance_clock(by);
    }

    /// Expires now every run that has waited for a message longer than
    /// `older_than` (regardless of its flow's expiry). Returns how many.
    pub fn expire_waiting_runs(&self, older_than: Duration) -> usize {
        let older_than = chrono::Duration::from_std(older_than).unwrap_or(chrono::Duration::MAX);
        let mut inner = self.lock();
        let now = inner.now();
        for r in inner.runs.iter_mut().filter(|r| {
            r.exit_type.is_none()
                && matches!(r.cursor, Some(engine::Cursor::Msg { .. }))
                && r.modified_on + older_than <= now
        }) {
            r.expires_on = Some(now);
        }
        engine::expire_runs(&mut inner)
    }

    /// Interrupts every unfinished run of a contact, as the UI or a newer
    /// flow would (`POST /_sandbox/interrupt`). Returns how many runs.
    pub fn interrupt_contact(&self, contact_uuid: &str) -> usize {
        let mut inner = self.lock();
        match inner.contacts.iter().find(|c| c.uuid == contact_uuid) {
            Some(c) => {
                let id = c.id;
                engine::interrupt_contact(&mut inner, id)
            }
            None => 0,
        }
    }

    /// Forgets the recorded calls.
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// Contacts (including deleted ones, marked `"deleted": true`), groups,
    /// fields, flows, broadcasts and messages as JSON, in the API's read
    /// shapes (`/_sandbox/state`).
    pub fn state(&self) -> Value {
        self.lock().state_json()
    }

    /// Empties the workspace, the call log and the throttle history; knobs
    /// and loaded flows are kept.
    pub fn reset(&self) {
        self.lock().reset();
    }

    pub fn knobs(&self) -> Knobs {
        self.lock().knobs()
    }

    pub fn set_knobs(&self, update: KnobsUpdate) -> Result<Knobs, String> {
        let mut inner = self.lock();
        inner.apply_knobs(update)?;
        Ok(inner.knobs())
    }

    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Clamped to 0.0..=1.0.
    pub fn set_error_rate(&self, rate: f64) {
        self.lock().error_rate = if rate.is_nan() {
            0.0
        } else {
            rate.clamp(0.0, 1.0)
        };
    }

    /// Sets one scope's rate (`"*"` for every scope). The request history is kept,
    /// so lowering a rate can throttle at once (RapidPro's no-`Retry-After` case).
    pub fn set_throttle_rate(&self, scope: &str, rate: Rate) {
        self.lock().set_rate(scope, rate);
    }

    /// Sets a contact's status (`active|blocked|stopped|archived`) the way
    /// the UI or an inbound STOP would; the API itself cannot stop or archive.
    /// Non-active statuses empty the contact's groups. False when the contact
    /// does not exist (or is deleted) or the status is unknown.
    pub fn set_contact_status(&self, contact_uuid: &str, status: &str) -> bool {
        match state::Status::parse(status) {
            Some(s) => self.lock().set_status(contact_uuid, s),
            None => false,
        }
    }

    /// Forgets the throttle history of every scope.
    pub fn clear_throttle(&self) {
        self.lock().throttle_log.clear();
    }
}

/// The sandbox served over HTTP in this process.
pub struct SandboxServer {
    sandbox: Sandbox,
    address: SocketAddr,
    base_url: String,
    token: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl SandboxServer {
    /// Binds `settings.listen` (port 0 picks a free port) and serves in a
    /// background task until [`SandboxServer::shutdown`] or the token is cancelled.
    pub async fn start(settings: SandboxSettings) -> std::io::Result<Self> {
        let listener = TcpListener::bind(settings.listen).await?;
        let address = listener.local_addr()?;
        let token = settings
            .tokens
            .first()
            .cloned()
            .unwrap_or_else(|| DEFAULT_TOKEN.to_string());
        let sandbox = Sandbox::new(settings);
        let shutdown = sandbox.stop.clone();
        let router = sandbox.router();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        });
        Ok(SandboxServer {
            sandbox,
            address,
            base_url: format!("http://{address}"),
            token,
            shutdown,
            task,
        })
    }

    /// `http://host:port` (the API is under `/api/v2/`).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `http://host:port/api/v2/<endpoint>.json`.
    pub fn api_url(&self, endpoint: &str) -> String {
        format!("{}/api/v2/{endpoint}.json", self.base_url)
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The first configured token.
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// Cancelling this token stops the server.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the server stops (after the shutdown token is cancelled).
    pub async fn wait(mut self) -> std::io::Result<()> {
        (&mut self.task).await.map_err(std::io::Error::other)?
    }

    /// Stops the server and waits for it.
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

impl Drop for SandboxServer {
    /// A server dropped without [`SandboxServer::shutdown`] stops serving too.
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
