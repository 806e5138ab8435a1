//! RapidPro API v2 client.
//!
//! Owns every HTTP exchange with a RapidPro workspace
//! (`shared/reference/rapidpro-api.md`): the `/api/v2/<endpoint>.json`
//! URLs, `Authorization: Token <key>` (never logged; `Debug` hides it),
//! the shared per-scope budget ([`Throttle`]) taken before every attempt,
//! following cursor `next` links opaquely (as a
//! [`Stream`](futures::Stream) of items, or page by page), retries, and the
//! single mapping of RapidPro answers to [`RapidProError`].
//!
//! # Retries
//!
//! * **429** is retried for every request (RapidPro did not process it):
//!   the scope is paused in the shared throttle for `Retry-After` seconds
//!   (or the `Expected available in N seconds` of the body when the header
//!   is missing) so every task waits, then the request is sent again.
//!   A wait longer than `max_throttle_wait` is returned as
//!   [`RapidProError::Throttled`] instead.
//! * **Connection errors and 5xx** are retried with exponential backoff and
//!   jitter only for requests that can be repeated safely: GETs, updates by
//!   `?uuid=`/`?urn=` (contacts, and group renames; repeating one leaves the same state; `?urn=` upserts
//!   find the contact created by the first attempt), DELETEs (a 404 on a
//!   repeat after a 5xx or a lost answer means the first attempt deleted
//!   it, and counts as success),
//!   and contact actions other than `delete` (add, remove, block, unblock,
//!   interrupt and archive leave the same state when repeated).
//! * **Creates** (contacts, groups, fields, broadcasts, flow starts) and the
//!   `delete` contact action are **never re-sent** after a broken
//!   connection, a timeout or a 5xx: RapidPro has no idempotency key and
//!   may have done the work, so the error goes to the caller, who
//!   reconciles. Only a failure to connect at all (nothing was sent) is
//!   retried for them.
//! * **Timeouts** are not retried (a slow server would otherwise hold the
//!   caller for `timeout × retries`), as in the FHIR HTTP store.

use crate::outbound::{backoff_delay, error_chain};
use std::fmt;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::throttle::{Scope, Throttle};
use super::types::*;
use crate::config::{RapidProSettings, Secret};

/// Default first retry delay; doubled on each further retry.
const DEFAULT_BACKOFF: Duration = Duration::from_millis(250);
/// No single backoff sleep is longer than this.
/// Wait after a 429 that names no delay at all.
const UNNAMED_THROTTLE_WAIT: Duration = Duration::from_secs(5);
/// Longest error body text kept in an error.
const MAX_ERROR_TEXT: usize = 500;

/// One error of a 400 answer: `field` is the key of the body
/// (`non_field_errors` errors have none), `item` the list index or
/// dictionary key for errors such as `{"urns": {"0": ["…"]}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub item: Option<String>,
    pub message: String,
}

/// A 400 answer, parsed from any of RapidPro's body shapes
/// (`{"f": ["msg"]}`, `{"urns": {"0": ["msg"]}}`,
/// `{"non_field_errors": [...]}`, `{"detail": "..."}`, or plain text).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValidationErrors {
    /// `detail` (a query or lookup problem), or a body that is not JSON.
    pub detail: Option<String>,
    pub non_field_errors: Vec<String>,
    pub fields: Vec<FieldError>,
}

impl ValidationErrors {
    /// Parse a 400 body.
    pub fn from_body(body: &[u8]) -> Self {
        let mut errors = ValidationErrors::default();
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => {
                for (key, value) in map {
                    match key.as_str() {
                        "detail" => errors.detail = Some(text_of(&value)),
                        "non_field_errors" => errors.non_field_errors.extend(messages(&value)),
                        _ => match &value {
                            Value::Object(items) => {
                                for (item, value) in items {
                                    for message in messages(value) {
                                        errors.fields.push(FieldError {
                                            field: key.clone(),
                                            item: Some(item.clone()),
                                            message,
                                        });
                                    }
                                }
                            }
                            _ => {
                                for message in messages(&value) {
                                    errors.fields.push(FieldError {
                                        field: key.clone(),
                                        item: None,
                                        message,
                                    });
                                }
                            }
                        },
                    }
                }
            }
            Ok(Value::Array(list)) => errors
                .non_field_errors
                .extend(messages(&Value::Array(list))),
            _ => {
                let text = body_text(body);
                if !text.is_empty() {
                    errors.detail = Some(text);
                }
            }
        }
        errors
    }

    /// The messages about `field` (any item).
    pub fn for_field(&self, field: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|e| e.field == field)
            .map(|e| e.message.as_str())
            .collect()
    }

    /// Errors about single URNs: `(index in the sent list, message)`.
    pub fn urn_errors(&self) -> Vec<(usize, &str)> {
        self.fields
            .iter()
            .filter(|e| e.field == "urns")
            .filter_map(|e| {
                let index = e.item.as_deref()?.parse().ok()?;
                Some((index, e.message.as_str()))
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.detail.is_none() && self.non_field_errors.is_empty() && self.fields.is_empty()
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if let Some(detail) = &self.detail {
            parts.push(detail.clone());
        }
        parts.extend(self.non_field_errors.iter().cloned());
        for e in &self.fields {
            match &e.item {
                Some(item) => parts.push(format!("{}[{item}]: {}", e.field, e.message)),
                None => parts.push(format!("{}: {}", e.field, e.message)),
            }
        }
        if parts.is_empty() {
            f.write_str("no details")
        } else {
            f.write_str(&parts.join("; "))
        }
    }
}

fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `["a", "b"]`, `"a"`, or anything else as its JSON text.
fn messages(value: &Value) -> Vec<String> {
    match value {
        Value::Array(list) => list.iter().map(text_of).collect(),
        Value::Null => Vec::new(),
        other => vec![text_of(other)],
    }
}

/// A body as short, trimmed text (never panics on odd bytes).
fn body_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.chars().count() > MAX_ERROR_TEXT {
        let cut: String = text.chars().take(MAX_ERROR_TEXT).collect();
        format!("{cut}…")
    } else {
        text.to_string()
    }
}

/// `detail` of a JSON error body, or the body as text.
fn detail_of(body: &[u8]) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) if map.contains_key("detail") => text_of(&map["detail"]),
        _ => body_text(body),
    }
}

/// Everything that can go wrong talking to RapidPro. Messages may quote
/// URNs (`Invalid URN: tel:+…`): log them through
/// `crate::telemetry::redact_phones`. They never carry the token.
#[derive(Debug, thiserror::Error)]
pub enum RapidProError {
    /// 400: RapidPro rejected the request.
    #[error("RapidPro rejected the request: {0}")]
    Invalid(ValidationErrors),
    /// 401 or 403: bad or missing token, a role that cannot use tokens, no
    /// permission, or a system object.
    #[error("RapidPro refused the request ({status}): {detail}")]
    Forbidden { status: u16, detail: String },
    /// 404: no such object, or an invalid cursor.
    #[error("not found in RapidPro: {detail}")]
    NotFound { detail: String },
    /// 409: the workspace reached a limit.
    #[error("RapidPro conflict: {detail}")]
    Conflict { detail: String },
    /// 429 that was not (or no longer) retried.
    #[error("RapidPro throttled scope {scope}{}", match .retry_after { Some(d) => format!("; available again in {} s", d.as_secs()), None => String::new() })]
    Throttled {
        scope: Scope,
        retry_after: Option<Duration>,
    },
    /// 5xx (RapidPro answers a plain-text body for unhandled errors).
    #[error("RapidPro server error {status}: {message}")]
    Server { status: u16, message: String },
    /// Any other unsuccessful status (405, 413, ...).
    #[error("RapidPro answered {status}: {message}")]
    Unexpected { status: u16, message: String },
    /// No answer within the timeout. A write may still have been done.
    #[error("RapidPro did not answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The connection failed. A write may still have been done.
    #[error("cannot reach RapidPro: {0}")]
    Connection(String),
    /// A success status with a body that is not the expected JSON.
    #[error("RapidPro answered with an unusable body: {0}")]
    Decode(String),
    /// The client cannot be built or the request cannot be made
    /// (base URL, token, a `next` link elsewhere).
    #[error("RapidPro client configuration: {0}")]
    Config(String),
}

impl RapidProError {
    /// Worth trying again later (throttling, 5xx, timeout, connection).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RapidProError::Throttled { .. }
                | RapidProError::Server { .. }
                | RapidProError::Timeout(_)
                | RapidProError::Connection(_)
        )
    }

    /// The HTTP status RapidPro answered, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            RapidProError::Invalid(_) => Some(400),
            RapidProError::Forbidden { status, .. } => Some(*status),
            RapidProError::NotFound { .. } => Some(404),
            RapidProError::Conflict { .. } => Some(409),
            RapidProError::Throttled { .. } => Some(429),
            RapidProError::Server { status, .. } | RapidProError::Unexpected { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }
}

pub type RapidProResult<T> = Result<T, RapidProError>;

/// Timeouts and retry limits of a [`RapidProClient`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    pub timeout: Duration,
    pub max_retries: u32,
    /// First backoff delay, doubled on each further retry (plus jitter).
    pub backoff: Duration,
    /// Longest `Retry-After` waited out before retrying a 429.
    pub max_throttle_wait: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(30),
            max_retries: 3,
            backoff: DEFAULT_BACKOFF,
            max_throttle_wait: Duration::from_secs(120),
        }
    }
}

impl ClientOptions {
    pub fn from_settings(settings: &RapidProSettings) -> Self {
        ClientOptions {
            timeout: Duration::from_secs(settings.timeout_secs.max(1)),
            max_retries: settings.max_retries,
            backoff: DEFAULT_BACKOFF,
            max_throttle_wait: Duration::from_secs(settings.max_throttle_wait_secs),
        }
    }
}

/// Which contact an update or delete names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContactLookup {
    /// `?uuid=`.
    Uuid(String),
    /// `?urn=`; an update creates the contact when no one has the URN.
    Urn(String),
}

impl ContactLookup {
    fn pair(&self) -> (&'static str, String) {
        match self {
            ContactLookup::Uuid(uuid) => ("uuid", uuid.clone()),
            ContactLookup::Urn(urn) => ("urn", urn.clone()),
        }
    }
}

/// Whether a contact update created the contact (`?urn=` upsert, 201) or
/// changed an existing one (200).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpsertKind {
    Created,
    Updated,
}

/// Filters of `GET /contacts.json`. `before`/`after` are inclusive, on
/// `modified_on`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContactQuery {
    pub uuid: Option<String>,
    pub urn: Option<String>,
    /// Group name or UUID.
    pub group: Option<String>,
    /// Only deleted contacts.
    pub deleted: bool,
    pub after: Option<DateTime<Utc>>,
    pub before: Option<DateTime<Utc>>,
    /// Oldest first.
    pub reverse: bool,
}

impl ContactQuery {
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = Vec::new();
        push(&mut pairs, "uuid", &self.uuid);
        push(&mut pairs, "urn", &self.urn);
        push(&mut pairs, "group", &self.group);
        if self.deleted {
            pairs.push(("deleted", "true".into()));
        }
        push_time(&mut pairs, "after", &self.after);
        push_time(&mut pairs, "before", &self.before);
        if self.reverse {
            pairs.push(("reverse", "true".into()));
        }
        pairs
    }
}

/// Filters of `GET /messages.json`. `folder`, `contact` and `broadcast`
/// are exclusive (RapidPro answers 400). `before`/`after` on `created_on`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageQuery {
    pub uuid: Option<String>,
    pub folder: Option<MessageFolder>,
    /// Contact UUID.
    pub contact: Option<String>,
    /// Broadcast id (deprecated by RapidPro).
    pub broadcast: Option<i64>,
    pub after: Option<DateTime<Utc>>,
    pub before: Option<DateTime<Utc>>,
}

impl MessageQuery {
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = Vec::new();
        push(&mut pairs, "uuid", &self.uuid);
        if let Some(folder) = &self.folder {
            pairs.push(("folder", folder.as_str().to_string()));
        }
        push(&mut pairs, "contact", &self.contact);
        if let Some(broadcast) = self.broadcast {
            pairs.push(("broadcast", broadcast.to_string()));
        }
        push_time(&mut pairs, "after", &self.after);
        push_time(&mut pairs, "before", &self.before);
        pairs
    }
}

/// Filters of `GET /runs.json`. `flow` and `contact` are exclusive.
/// `before`/`after` on `modified_on`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunQuery {
    pub uuid: Option<String>,
    /// Flow UUID.
    pub flow: Option<String>,
    /// Contact UUID.
    pub contact: Option<String>,
    pub responded: bool,
    pub after: Option<DateTime<Utc>>,
    pub before: Option<DateTime<Utc>>,
    pub reverse: bool,
    /// `paths=false`: runs come without their `path`.
    pub without_paths: bool,
}

impl RunQuery {
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = Vec::new();
        push(&mut pairs, "uuid", &self.uuid);
        push(&mut pairs, "flow", &self.flow);
        push(&mut pairs, "contact", &self.contact);
        if self.responded {
            pairs.push(("responded", "true".into()));
        }
        push_time(&mut pairs, "after", &self.after);
        push_time(&mut pairs, "before", &self.before);
        if self.reverse {
            pairs.push(("reverse", "true".into()));
        }
        if self.without_paths {
            pairs.push(("paths", "false".into()));
        }
        pairs
    }
}

/// Filters of the lists with only `uuid` and a time window
/// (`flows`, `flow_starts`, `broadcasts`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimeQuery {
    pub uuid: Option<String>,
    pub after: Option<DateTime<Utc>>,
    pub before: Option<DateTime<Utc>>,
}

impl TimeQuery {
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = Vec::new();
        push(&mut pairs, "uuid", &self.uuid);
        push_time(&mut pairs, "after", &self.after);
        push_time(&mut pairs, "before", &self.before);
        pairs
    }
}

fn push(pairs: &mut Vec<(&'static str, String)>, key: &'static str, value: &Option<String>) {
    if let Some(value) = value {
        pairs.push((key, value.clone()));
    }
}

fn push_time(
    pairs: &mut Vec<(&'static str, String)>,
    key: &'static str,
    value: &Option<DateTime<Utc>>,
) {
    if let Some(value) = value {
        pairs.push((key, format_datetime(value)));
    }
}

/// Where a paged list goes next.
enum Cursor {
    Page(Url),
    /// The last `next` named the page it came with.
    Loop,
    End,
}

/// May this request be sent again after a connection error or a 5xx?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    Safe,
    Never,
}

/// A request, kept whole so that it can be sent again.
struct Call {
    method: Method,
    url: Url,
    scope: Scope,
    body: Option<bytes::Bytes>,
    repeat: Repeat,
}

/// A response read to the end.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: bytes::Bytes,
}

/// The RapidPro API v2 client of one workspace. Cheap to clone; clones
/// share the connection pool and the throttle.
#[derive(Clone)]
pub struct RapidProClient {
    http: reqwest::Client,
    /// `<base>/api/v2/`.
    api: Url,
    /// `Token <key>`, marked sensitive.
    authorization: HeaderValue,
    options: ClientOptions,
    throttle: Throttle,
}

impl fmt::Debug for RapidProClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RapidProClient")
            .field("api", &self.api.as_str())
            .field("token", &"***")
            .field("options", &self.options)
            .field("throttle", &self.throttle)
            .finish()
    }
}

impl RapidProClient {
    /// Build a client for the workspace at `base_url` (e.g.
    /// `https://textit.in`; a URL already ending in `/api/v2` is accepted
    /// too). Nothing is contacted.
    pub fn new(
        base_url: &Url,
        token: &Secret,
        options: ClientOptions,
        throttle: Throttle,
    ) -> RapidProResult<Self> {
        if !matches!(base_url.scheme(), "http" | "https") {
            return Err(RapidProError::Config(format!(
                "rapidpro.base_url must be an http or https URL, not {}",
                base_url.scheme()
            )));
        }
        if !base_url.username().is_empty() || base_url.password().is_some() {
            return Err(RapidProError::Config(
                "rapidpro.base_url must not carry credentials; set rapidpro.token".into(),
            ));
        }
        if base_url.query().is_some() || base_url.fragment().is_some() {
            return Err(RapidProError::Config(
                "rapidpro.base_url must not have a query or a fragment".into(),
            ));
        }
        if options.timeout.is_zero() {
            return Err(RapidProError::Config(
                "the RapidPro timeout must be positive".into(),
            ));
        }
        let key = token.expose().trim();
        if key.is_empty() {
            return Err(RapidProError::Config("rapidpro.token is empty".into()));
        }
        let mut authorization = HeaderValue::from_str(&format!("Token {key}")).map_err(|_| {
            RapidProError::Config(
                "rapidpro.token contains characters that cannot be sent in an HTTP header".into(),
            )
        })?;
        authorization.set_sensitive(true);

        let mut path = base_url.path().trim_end_matches('/').to_string();
        if let Some(stripped) = path.strip_suffix("/api/v2") {
            path = stripped.to_string();
        }
        let mut api = base_url.clone();
        api.set_path(&format!("{path}/api/v2/"));

        // rustls is built without a default provider; ring is the one we ship.
        crate::install_tls_provider();
        let http = reqwest::Client::builder()
            .timeout(options.timeout)
            .user_agent(concat!("mhero/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                RapidProError::Config(format!("cannot build the HTTP client: {}", error_chain(&e)))
            })?;
        Ok(RapidProClient {
            http,
            api,
            authorization,
            options,
            throttle,
        })
    }

    /// Build from `[rapidpro]` settings; `base_url` and `token` must be set.
    pub fn from_settings(settings: &RapidProSettings, throttle: Throttle) -> RapidProResult<Self> {
        let base_url = settings
            .base_url
            .as_ref()
            .ok_or_else(|| RapidProError::Config("rapidpro.base_url is not set".into()))?;
        let token = settings
            .token
            .as_ref()
            .ok_or_else(|| RapidProError::Config("rapidpro.token is not set".into()))?;
        Self::new(
            base_url,
            token,
            ClientOptions::from_settings(settings),
            throttle,
        )
    }

    /// The API root, `<base>/api/v2/`.
    pub fn api_url(&self) -> &Url {
        &self.api
    }

    /// The shared throttle.
    pub fn throttle(&self) -> &Throttle {
        &self.throttle
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    // ----- contacts ---------------------------------------------------------

    /// Every contact matching `query`, following `next` links.
    pub fn contacts(&self, query: &ContactQuery) -> BoxStream<'static, RapidProResult<Contact>> {
        self.list("contacts", &query.pairs(), Scope::Contacts)
    }

    /// One page of contacts: the first (`cursor` = `None`) or the one a
    /// previous page's `next` names.
    pub async fn contacts_page(
        &self,
        query: &ContactQuery,
        cursor: Option<&str>,
    ) -> RapidProResult<Page<Contact>> {
        let url = match cursor {
            Some(next) => self.cursor_url(next)?,
            None => self.endpoint("contacts", &query.pairs())?,
        };
        self.get_json(url, Scope::Contacts).await
    }

    /// Create a contact (201). Never re-sent after a timeout, connection
    /// error or 5xx: the caller must look the contact up before trying
    /// again (or use [`RapidProClient::update_contact`] with `?urn=`).
    pub async fn create_contact(&self, contact: &ContactWrite) -> RapidProResult<Contact> {
        self.create("contacts", Scope::Contacts, contact).await
    }

    /// Update the contact named by `lookup` (200). With
    /// [`ContactLookup::Urn`] RapidPro creates the contact when nobody has
    /// that URN (201, [`UpsertKind::Created`]); the body must not carry
    /// `urns` then (refused before sending, with RapidPro's 400 message).
    pub async fn update_contact(
        &self,
        lookup: &ContactLookup,
        contact: &ContactWrite,
    ) -> RapidProResult<(UpsertKind, Contact)> {
        if matches!(lookup, ContactLookup::Urn(_)) && contact.urns.is_some() {
            // RapidPro's own answer, without spending a request on it.
            return Err(RapidProError::Invalid(ValidationErrors {
                fields: vec![FieldError {
                    field: "urns".into(),
                    item: None,
                    message: "Field not allowed when using URN in URL".into(),
                }],
                ..ValidationErrors::default()
            }));
        }
        let url = self.endpoint("contacts", &[lookup.pair()])?;
        let reply = self
            .write(
                Method::POST,
                url,
                Scope::Contacts,
                Some(contact),
                Repeat::Safe,
            )
            .await?;
        let kind = if reply.status == StatusCode::CREATED {
            UpsertKind::Created
        } else {
            UpsertKind::Updated
        };
        Ok((kind, decode(&reply)?))
    }

    /// Delete (soft) the contact named by `lookup` (204).
    pub async fn delete_contact(&self, lookup: &ContactLookup) -> RapidProResult<()> {
        let url = self.endpoint("contacts", &[lookup.pair()])?;
        self.write::<()>(Method::DELETE, url, Scope::Contacts, None, Repeat::Safe)
            .await?;
        Ok(())
    }

    /// `POST /contact_actions.json` (204). Retried like an update, except
    /// the `delete` action.
    pub async fn contact_actions(&self, request: &ContactActionRequest) -> RapidProResult<()> {
        let url = self.endpoint("contact_actions", &[])?;
        let repeat = if request.action == ContactAction::Delete {
            Repeat::Never
        } else {
            Repeat::Safe
        };
        self.write(Method::POST, url, Scope::V2, Some(request), repeat)
            .await?;
        Ok(())
    }

    // ----- groups and fields ------------------------------------------------

    /// Every group (`name`: case-insensitive exact filter).
    pub fn groups(&self, name: Option<&str>) -> BoxStream<'static, RapidProResult<Group>> {
        let pairs: Vec<_> = name.map(|n| ("name", n.to_string())).into_iter().collect();
        self.list("groups", &pairs, Scope::V2)
    }

    /// Create a manual group (201). Not re-sent on failure.
    pub async fn create_group(&self, name: &str) -> RapidProResult<Group> {
        self.create(
            "groups",
            Scope::V2,
            &GroupWrite {
                name: name.to_string(),
            },
        )
        .await
    }

    /// Rename the group `uuid` (200). Retried like other updates by
    /// `?uuid=`: repeating a rename leaves the same state. A name RapidPro
    /// refuses (a duplicate, case-insensitively, or one breaking its name
    /// rules) is [`RapidProError::Invalid`]; a system group is
    /// [`RapidProError::Forbidden`] and a missing one
    /// [`RapidProError::NotFound`].
    pub async fn update_group(&self, uuid: &str, name: &str) -> RapidProResult<Group> {
        let url = self.endpoint("groups", &[("uuid", uuid.to_string())])?;
        let body = GroupWrite {
            name: name.to_string(),
        };
        let reply = self
            .write(Method::POST, url, Scope::V2, Some(&body), Repeat::Safe)
            .await?;
        decode(&reply)
    }

    /// Delete a group by UUID (204).
    pub async fn delete_group(&self, uuid: &str) -> RapidProResult<()> {
        let url = self.endpoint("groups", &[("uuid", uuid.to_string())])?;
        self.write::<()>(Method::DELETE, url, Scope::V2, None, Repeat::Safe)
            .await?;
        Ok(())
    }

    /// Every contact field (`key`: exact filter).
    pub fn fields(&self, key: Option<&str>) -> BoxStream<'static, RapidProResult<Field>> {
        let pairs: Vec<_> = key.map(|k| ("key", k.to_string())).into_iter().collect();
        self.list("fields", &pairs, Scope::V2)
    }

    /// Create a contact field (201); RapidPro derives the key from the
    /// name. Not re-sent on failure.
    pub async fn create_field(&self, field: &FieldWrite) -> RapidProResult<Field> {
        self.create("fields", Scope::V2, field).await
    }

    // ----- flows, starts, broadcasts, messages, runs -------------------------

    /// Every flow (`after`/`before` on `modified_on`).
    pub fn flows(&self, query: &TimeQuery) -> BoxStream<'static, RapidProResult<Flow>> {
        self.list("flows", &query.pairs(), Scope::V2)
    }

    /// The export (`{"version", "flows": [definition]}`) of one flow, without
    /// its dependencies: nodes, routers and cases, for typed results.
    pub async fn definitions(&self, flow_uuid: &str) -> RapidProResult<Value> {
        let url = self.endpoint(
            "definitions",
            &[
                ("flow", flow_uuid.to_string()),
                ("dependencies", "none".into()),
            ],
        )?;
        self.get_json(url, Scope::V2).await
    }

    /// Every flow start made by a user or the API.
    pub fn flow_starts(&self, query: &TimeQuery) -> BoxStream<'static, RapidProResult<FlowStart>> {
        self.list("flow_starts", &query.pairs(), Scope::V2)
    }

    /// Start a flow (201, status `pending`). Never re-sent: a repeat would
    /// start the flow twice.
    pub async fn create_flow_start(&self, start: &FlowStartWrite) -> RapidProResult<FlowStart> {
        self.create("flow_starts", Scope::V2, start).await
    }

    /// Every (non-scheduled) broadcast (`after`/`before` on `created_on`).
    pub fn broadcasts(&self, query: &TimeQuery) -> BoxStream<'static, RapidProResult<Broadcast>> {
        self.list("broadcasts", &query.pairs(), Scope::V2)
    }

    /// Send a broadcast (201, status `pending`). Never re-sent: a repeat
    /// would message everyone twice.
    pub async fn create_broadcast(&self, broadcast: &BroadcastWrite) -> RapidProResult<Broadcast> {
        self.create("broadcasts", Scope::V2, broadcast).await
    }

    /// Every message matching `query`.
    pub fn messages(&self, query: &MessageQuery) -> BoxStream<'static, RapidProResult<Message>> {
        self.list("messages", &query.pairs(), Scope::Messages)
    }

    /// Every run matching `query`.
    pub fn runs(&self, query: &RunQuery) -> BoxStream<'static, RapidProResult<Run>> {
        self.list("runs", &query.pairs(), Scope::Runs)
    }

    /// The token's workspace.
    pub async fn workspace(&self) -> RapidProResult<Workspace> {
        let url = self.endpoint("workspace", &[])?;
        self.get_json(url, Scope::V2).await
    }

    // ----- URLs ---------------------------------------------------------------

    /// `<api>/<name>.json?<pairs>`.
    fn endpoint(&self, name: &str, pairs: &[(&'static str, String)]) -> RapidProResult<Url> {
        let mut url = self
            .api
            .join(&format!("{name}.json"))
            .map_err(|e| RapidProError::Config(format!("cannot build the URL of {name}: {e}")))?;
        if !pairs.is_empty() {
            let mut query = url.query_pairs_mut();
            for (key, value) in pairs {
                query.append_pair(key, value);
            }
        }
        Ok(url)
    }

    /// A `next` link as a URL to send the token to: it must be under our
    /// API root. A link on another origin with the same `/api/v2/` path
    /// (a proxy advertising its internal name) is moved onto ours.
    fn cursor_url(&self, next: &str) -> RapidProResult<Url> {
        let invalid =
            || RapidProError::Config("RapidPro's next link is not under the configured API".into());
        let parsed = self.api.join(next).map_err(|_| invalid())?;
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(invalid());
        }
        if !parsed.path().starts_with(self.api.path()) {
            return Err(invalid());
        }
        if parsed.origin() == self.api.origin() {
            return Ok(parsed);
        }
        let mut rebased = self.api.clone();
        rebased.set_path(parsed.path());
        rebased.set_query(parsed.query());
        tracing::debug!("RapidPro's next link names another origin; following it on ours");
        Ok(rebased)
    }

    // ----- sending ------------------------------------------------------------

    /// Every item of every page, from `endpoint` on.
    fn list<T>(
        &self,
        name: &str,
        pairs: &[(&'static str, String)],
        scope: Scope,
    ) -> BoxStream<'static, RapidProResult<T>>
    where
        T: DeserializeOwned + Send + 'static,
    {
        let first = match self.endpoint(name, pairs) {
            Ok(url) => url,
            Err(e) => return stream::once(async move { Err(e) }).boxed(),
        };
        let client = self.clone();
        stream::try_unfold(Cursor::Page(first), move |cursor| {
            let client = client.clone();
            async move {
                let url = match cursor {
                    Cursor::Page(url) => url,
                    Cursor::End => return Ok(None),
                    Cursor::Loop => {
                        return Err(RapidProError::Decode(
                            "the next link names the page just read; paging stopped".into(),
                        ));
                    }
                };
                let page: Page<T> = client.get_json(url.clone(), scope).await?;
                let next = match page.next.as_deref() {
                    Some(link) if !link.is_empty() => {
                        let next = client.cursor_url(link)?;
                        if next == url {
                            Cursor::Loop
                        } else {
                            Cursor::Page(next)
                        }
                    }
                    _ => Cursor::End,
                };
                let items = stream::iter(page.results.into_iter().map(Ok));
                Ok(Some((items, next)))
            }
        })
        .try_flatten()
        .boxed()
    }

    async fn get_json<T: DeserializeOwned>(&self, url: Url, scope: Scope) -> RapidProResult<T> {
        let call = Call {
            method: Method::GET,
            url,
            scope,
            body: None,
            repeat: Repeat::Safe,
        };
        let reply = self.send(&call).await?;
        decode(&reply)
    }

    /// POST a new object to `endpoint` (201) and decode it. Never re-sent
    /// after a failure that may have been processed: the caller reconciles.
    async fn create<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        endpoint: &str,
        scope: Scope,
        body: &B,
    ) -> RapidProResult<T> {
        let url = self.endpoint(endpoint, &[])?;
        let reply = self
            .write(Method::POST, url, scope, Some(body), Repeat::Never)
            .await?;
        decode(&reply)
    }

    async fn write<B: Serialize + ?Sized>(
        &self,
        method: Method,
        url: Url,
        scope: Scope,
        body: Option<&B>,
        repeat: Repeat,
    ) -> RapidProResult<Reply> {
        let body = match body {
            Some(body) => Some(
                serde_json::to_vec(body)
                    .map_err(|e| RapidProError::Config(format!("cannot serialise the body: {e}")))?
                    .into(),
            ),
            None => None,
        };
        let call = Call {
            method,
            url,
            scope,
            body,
            repeat,
        };
        self.send(&call).await
    }

    /// Send `call` (retrying as the module docs say) and require a 2xx
    /// answer.
    async fn send(&self, call: &Call) -> RapidProResult<Reply> {
        let mut attempt: u32 = 0;
        // An earlier attempt may have been carried out (its answer was a
        // 5xx or was lost); a 429 was not processed.
        let mut maybe_done = false;
        loop {
            self.throttle.acquire(call.scope).await;
            let mut request = self
                .http
                .request(call.method.clone(), call.url.clone())
                .header(header::AUTHORIZATION, self.authorization.clone())
                .header(header::ACCEPT, HeaderValue::from_static("application/json"));
            if let Some(body) = &call.body {
                request = request
                    .header(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )
                    .body(body.clone());
            }
            let result = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    let headers = response.headers().clone();
                    response.bytes().await.map(|body| Reply {
                        status,
                        headers,
                        body,
                    })
                }
                Err(e) => Err(e),
            };
            let retries_left = attempt < self.options.max_retries;
            let may_repeat = call.repeat == Repeat::Safe && retries_left;
            match result {
                Ok(reply) if reply.status == StatusCode::TOO_MANY_REQUESTS => {
                    let named = throttle_delay(&reply);
                    let wait = named.unwrap_or(UNNAMED_THROTTLE_WAIT);
                    self.throttle
                        .pause_until(call.scope, tokio::time::Instant::now() + wait)
                        .await;
                    if !retries_left || wait > self.options.max_throttle_wait {
                        return Err(RapidProError::Throttled {
                            scope: call.scope,
                            retry_after: named,
                        });
                    }
                    tracing::warn!(
                        method = %call.method,
                        path = call.url.path(),
                        scope = call.scope.as_str(),
                        retry_in_ms = wait.as_millis() as u64,
                        attempt = attempt + 1,
                        "RapidPro throttled the request; the scope is paused, then it is retried"
                    );
                    // The next `acquire` waits for the pause to end.
                }
                Ok(reply) if reply.status.is_server_error() && may_repeat => {
                    let delay = backoff_delay(self.options.backoff, attempt);
                    tracing::warn!(
                        method = %call.method,
                        path = call.url.path(),
                        status = reply.status.as_u16(),
                        retry_in_ms = delay.as_millis() as u64,
                        attempt = attempt + 1,
                        "RapidPro answered a server error; retrying"
                    );
                    maybe_done = true;
                    tokio::time::sleep(delay).await;
                }
                Ok(reply)
                    if reply.status == StatusCode::NOT_FOUND
                        && call.method == Method::DELETE
                        && maybe_done =>
                {
                    // An earlier attempt deleted it before its answer was lost.
                    return Ok(Reply {
                        status: StatusCode::NO_CONTENT,
                        headers: reply.headers,
                        body: bytes::Bytes::new(),
                    });
                }
                Ok(reply) if reply.status.is_success() => return Ok(reply),
                Ok(reply) => return Err(map_error(&reply, call.scope)),
                Err(e) if e.is_builder() => {
                    return Err(RapidProError::Config(format!(
                        "cannot build the request: {}",
                        error_chain(&e)
                    )));
                }
                Err(e) if e.is_timeout() => {
                    return Err(RapidProError::Timeout(self.options.timeout));
                }
                Err(e) if e.is_connect() && retries_left => {
                    // No connection, so nothing was sent: safe for creates too.
                    let delay = backoff_delay(self.options.backoff, attempt);
                    tracing::warn!(
                        method = %call.method,
                        path = call.url.path(),
                        error = %crate::telemetry::redact_phones(&error_chain(&e)),
                        retry_in_ms = delay.as_millis() as u64,
                        attempt = attempt + 1,
                        "cannot connect to RapidPro; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(e) if may_repeat => {
                    let delay = backoff_delay(self.options.backoff, attempt);
                    tracing::warn!(
                        method = %call.method,
                        path = call.url.path(),
                        error = %crate::telemetry::redact_phones(&error_chain(&e)),
                        retry_in_ms = delay.as_millis() as u64,
                        attempt = attempt + 1,
                        "RapidPro not reachable; retrying"
                    );
                    maybe_done = true;
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(RapidProError::Connection(error_chain(&e))),
            }
            attempt += 1;
        }
    }
}

/// The one translation of an unsuccessful answer into a `RapidProError`.
fn map_error(reply: &Reply, scope: Scope) -> RapidProError {
    let status = reply.status.as_u16();
    match status {
        400 => RapidProError::Invalid(ValidationErrors::from_body(&reply.body)),
        401 | 403 => RapidProError::Forbidden {
            status,
            detail: detail_of(&reply.body),
        },
        404 => RapidProError::NotFound {
            detail: detail_of(&reply.body),
        },
        409 => RapidProError::Conflict {
            detail: detail_of(&reply.body),
        },
        429 => RapidProError::Throttled {
            scope,
            retry_after: throttle_delay(reply),
        },
        500..=599 => RapidProError::Server {
            status,
            message: detail_of(&reply.body),
        },
        _ => RapidProError::Unexpected {
            status,
            message: detail_of(&reply.body),
        },
    }
}

/// Decode a success body.
fn decode<T: DeserializeOwned>(reply: &Reply) -> RapidProResult<T> {
    serde_json::from_slice(&reply.body).map_err(|e| {
        RapidProError::Decode(format!(
            "HTTP {} with a body that is not the expected JSON ({e})",
            reply.status.as_u16()
        ))
    })
}

/// The delay a 429 names: `Retry-After` (seconds or an HTTP date), else
/// `Expected available in N seconds.` in the body's `detail`.
fn throttle_delay(reply: &Reply) -> Option<Duration> {
    if let Some(value) = reply
        .headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
    {
        let value = value.trim();
        if let Ok(seconds) = value.parse::<u64>() {
            return Some(Duration::from_secs(seconds));
        }
        if let Ok(when) = httpdate::parse_http_date(value) {
            return Some(
                when.duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO),
            );
        }
    }
    parse_throttle_detail(&detail_of(&reply.body))
}

/// `Request was throttled. Expected available in 12 seconds.` → 12 s
/// (DRF may also write a fraction or `1 second`).
pub fn parse_throttle_detail(detail: &str) -> Option<Duration> {
    let rest = detail.split("available in").nth(1)?;
    let number: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let seconds: f64 = number.parse().ok()?;
    if !seconds.is_finite() || seconds < 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(seconds.ceil()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(base: &str) -> RapidProClient {
        RapidProClient::new(
            &Url::parse(base).unwrap(),
            &Secret::new("0123456789abcdef0123456789abcdef01234567"),
            ClientOptions::default(),
            Throttle::default(),
        )
        .unwrap()
    }

    #[test]
    fn every_url_is_a_json_endpoint_under_api_v2() {
        for base in [
            "https://textit.in",
            "https://textit.in/",
            "https://textit.in/api/v2",
            "https://textit.in/api/v2/",
        ] {
            let c = client(base);
            assert_eq!(
                c.endpoint("contacts", &[]).unwrap().as_str(),
                "https://textit.in/api/v2/contacts.json"
            );
        }
        let c = client("https://example.org/rapidpro");
        let url = c
            .endpoint("contacts", &[("urn", "tel:+250788123123".into())])
            .unwrap();
        assert_eq!(
            url.as_str(),
            "https://example.org/rapidpro/api/v2/contacts.json?urn=tel%3A%2B250788123123"
        );
    }

    #[test]
    fn next_links_stay_under_the_api() {
        let c = client("https://textit.in");
        let same = c
            .cursor_url("https://textit.in/api/v2/runs.json?cursor=abc")
            .unwrap();
        assert_eq!(
            same.as_str(),
            "https://textit.in/api/v2/runs.json?cursor=abc"
        );
        let rebased = c
            .cursor_url("http://internal:8000/api/v2/runs.json?cursor=abc")
            .unwrap();
        assert_eq!(
            rebased.as_str(),
            "https://textit.in/api/v2/runs.json?cursor=abc"
        );
        assert!(c.cursor_url("https://evil.example/steal").is_err());
    }

    #[test]
    fn bad_configuration_is_refused() {
        let token = Secret::new("t");
        let bad = |base: &str, token: &Secret| {
            RapidProClient::new(
                &Url::parse(base).unwrap(),
                token,
                ClientOptions::default(),
                Throttle::default(),
            )
            .is_err()
        };
        assert!(bad("ftp://textit.in", &token));
        assert!(bad("https://u:p@textit.in", &token));
        assert!(bad("https://textit.in", &Secret::new("  ")));
        assert!(bad("https://textit.in", &Secret::new("a\nb")));
    }

    #[test]
    fn validation_bodies_in_every_shape() {
        let e = ValidationErrors::from_body(
            br#"{"language": ["Not a valid ISO639-3 language code."],
                 "urns": {"0": ["Invalid URN: 1234556789. Ensure phone numbers contain country codes."]},
                 "fields": {"string_field": ["Null characters are not allowed."]},
                 "non_field_errors": ["Must provide either urns, contacts or groups."]}"#,
        );
        assert_eq!(
            e.for_field("language"),
            ["Not a valid ISO639-3 language code."]
        );
        assert_eq!(e.urn_errors().len(), 1);
        assert_eq!(e.urn_errors()[0].0, 0);
        assert!(e.urn_errors()[0].1.starts_with("Invalid URN"));
        let field = e.fields.iter().find(|f| f.field == "fields").unwrap();
        assert_eq!(field.item.as_deref(), Some("string_field"));
        assert_eq!(e.non_field_errors.len(), 1);
        let text = e.to_string();
        assert!(text.contains("urns[0]: Invalid URN"), "{text}");

        let d =
            ValidationErrors::from_body(br#"{"detail": "Param 'uuid': xyz is not a valid UUID."}"#);
        assert_eq!(
            d.detail.as_deref(),
            Some("Param 'uuid': xyz is not a valid UUID.")
        );
        let plain = ValidationErrors::from_body(b"Bad Request\n");
        assert_eq!(plain.detail.as_deref(), Some("Bad Request"));
        assert!(ValidationErrors::from_body(b"").is_empty());
        let odd = ValidationErrors::from_body(&[0xff, 0xfe, b'x']);
        assert!(odd.detail.is_some());
    }

    #[test]
    fn throttle_details_name_the_wait() {
        assert_eq!(
            parse_throttle_detail("Request was throttled. Expected available in 1234 seconds."),
            Some(Duration::from_secs(1234))
        );
        assert_eq!(
            parse_throttle_detail("Request was throttled. Expected available in 1 second."),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            parse_throttle_detail("Request was throttled. Expected available in 2.5 seconds."),
            Some(Duration::from_secs(3))
        );
        assert_eq!(parse_throttle_detail("Request was throttled."), None);
    }

    #[test]
    fn debug_hides_the_token() {
        let c = client("https://textit.in");
        let debug = format!("{c:?}");
        assert!(!debug.contains("0123456789abcdef"), "{debug}");
        assert!(debug.contains("***"));
    }
}
