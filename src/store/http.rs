//! `HttpFhirStore`: the `FhirStore` contract over FHIR R4 REST (HAPI FHIR
//! or any R4 server).
//!
//! Owns everything about talking to a remote FHIR server: building the
//! requests (`application/fhir+json`, `If-None-Exist`, `If-Match`,
//! `Prefer`), authentication (Basic or bearer, never logged), timeouts,
//! retries with exponential backoff and jitter for idempotent requests
//! only, following the server's own `next` links as opaque paging cursors,
//! turning responses into `StoredResource`s and history entries, and the
//! single mapping of HTTP statuses and OperationOutcomes to `StoreError`
//! (`HttpFhirStore::map_error`).

use crate::outbound::{backoff_delay, error_chain};
use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};

use super::*;
use crate::config::HttpFhirSettings;
use crate::fhir::format_instant;
use crate::fhir::resource_types::{
    ensure_supported, ensure_valid_id, is_valid_id, json_kind, looks_like_type_name,
    validate_resource,
};

/// The media type sent in `Accept` and `Content-Type`.
const FHIR_JSON: &str = "application/fhir+json";
/// Default first retry delay; doubled on each further retry.
const DEFAULT_BACKOFF: Duration = Duration::from_millis(100);
/// No single backoff sleep is longer than this.
/// A server's `Retry-After` is honoured up to this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// The `FhirStore` backed by a remote FHIR R4 server.
#[derive(Clone)]
pub struct HttpFhirStore {
    client: reqwest::Client,
    /// The base URL as configured, without trailing slash.
    base: String,
    base_url: Url,
    /// `Authorization` value, marked sensitive.
    authorization: Option<HeaderValue>,
    auth_kind: &'static str,
    timeout: Duration,
    max_retries: u32,
    backoff: Duration,
}

impl fmt::Debug for HttpFhirStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpFhirStore")
            .field("base", &self.base)
            .field("auth", &self.auth_kind)
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("backoff", &self.backoff)
            .finish()
    }
}

/// A request, kept whole so that it can be sent again.
struct Call {
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Option<bytes::Bytes>,
}

/// A response read to the end.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: bytes::Bytes,
}

impl Reply {
    /// The body as JSON, if it is JSON.
    fn json(&self) -> Option<Value> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        serde_json::from_slice(&self.body).ok()
    }

    fn header(&self, name: HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn etag_version(&self) -> Option<String> {
        self.header(header::ETAG).and_then(parse_etag)
    }
}

/// What a request was about, for error messages and the status mapping.
struct Target<'a> {
    /// `Type/id` when the request names one resource.
    instance: Option<(&'a str, &'a str)>,
    /// How to name the target in a message (`Patient/1`, `Patient?identifier=x`).
    label: String,
    /// The version id sent in `If-Match`.
    if_match: Option<String>,
    /// A conditional create or update (`If-None-Exist`, `PUT [type]?query`):
    /// a 412 without `If-Match` means the condition matched several.
    conditional: bool,
}

impl<'a> Target<'a> {
    fn instance(resource_type: &'a str, id: &'a str, if_match: Option<String>) -> Self {
        Target {
            instance: Some((resource_type, id)),
            label: format!("{resource_type}/{id}"),
            if_match,
            conditional: false,
        }
    }

    fn other(label: impl Into<String>) -> Self {
        Target {
            instance: None,
            label: label.into(),
            if_match: None,
            conditional: false,
        }
    }

    fn conditional(label: impl Into<String>) -> Self {
        Target {
            conditional: true,
            ..Target::other(label)
        }
    }
}

impl HttpFhirStore {
    /// Build the client. Fails when the base URL is missing or unusable or a
    /// credential cannot be sent in a header; nothing is contacted.
    pub fn new(settings: &HttpFhirSettings) -> StoreResult<Self> {
        let base_url = settings.base_url.clone().ok_or_else(|| {
            StoreError::Invalid("fhir.http.base_url is required for the http FHIR backend".into())
        })?;
        if !matches!(base_url.scheme(), "http" | "https") {
            return Err(StoreError::Invalid(format!(
                "fhir.http.base_url must be an http or https URL, not {}",
                base_url.scheme()
            )));
        }
        if !base_url.username().is_empty() || base_url.password().is_some() {
            return Err(StoreError::Invalid(
                "fhir.http.base_url must not carry credentials; set fhir.http.username and \
                 fhir.http.password (or fhir.http.bearer_token) instead"
                    .into(),
            ));
        }
        if base_url.query().is_some() || base_url.fragment().is_some() {
            return Err(StoreError::Invalid(
                "fhir.http.base_url must not have a query or a fragment".into(),
            ));
        }
        if settings.timeout_secs == 0 {
            return Err(StoreError::Invalid(
                "fhir.http.timeout_secs must be at least 1".into(),
            ));
        }
        let base = base_url.as_str().trim_end_matches('/').to_string();

        let (authorization, auth_kind) = match (&settings.bearer_token, &settings.username) {
            (Some(token), _) => {
                let value = sensitive_header(&format!("Bearer {}", token.expose()))
                    .ok_or_else(|| {
                        StoreError::Invalid(
                            "fhir.http.bearer_token contains characters that cannot be sent in an HTTP header"
                                .into(),
                        )
                    })?;
                (Some(value), "bearer")
            }
            (None, Some(username)) => {
                let password = settings.password.as_ref().map(|p| p.expose()).unwrap_or("");
                let encoded = base64::engine::general_purpose::STANDARD
                    .encode(format!("{username}:{password}"));
                let value = sensitive_header(&format!("Basic {encoded}")).ok_or_else(|| {
                    StoreError::Invalid(
                        "fhir.http.username cannot be sent in an HTTP header".into(),
                    )
                })?;
                (Some(value), "basic")
            }
            (None, None) => (None, "none"),
        };

        let timeout = Duration::from_secs(settings.timeout_secs);
        // rustls is built without a default provider; ring is the one we ship.
        crate::install_tls_provider();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("mhero/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                StoreError::Internal(format!("cannot build the HTTP client: {}", error_chain(&e)))
            })?;

        Ok(HttpFhirStore {
            client,
            base,
            base_url,
            authorization,
            auth_kind,
            timeout,
            max_retries: settings.max_retries,
            backoff: DEFAULT_BACKOFF,
        })
    }

    /// Set the first retry delay (doubled on each further retry). Tests use
    /// a tiny one.
    pub fn with_backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// The configured base URL, without trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn backend_label(&self) -> String {
        format!("fhir (http {})", self.base)
    }

    // ----- URLs -----------------------------------------------------------

    fn url(&self, path: &str) -> StoreResult<Url> {
        let text = if path.is_empty() {
            self.base.clone()
        } else {
            format!("{}/{}", self.base, path)
        };
        Url::parse(&text)
            .map_err(|e| StoreError::Invalid(format!("cannot build a URL for {path}: {e}")))
    }

    /// `url` starts with the configured base (at a path or query boundary).
    fn owns(&self, url: &str) -> bool {
        url.strip_prefix(self.base.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
    }

    /// The URL of a paging cursor: a `next` link on the configured server.
    fn cursor_url(&self, cursor: &str) -> StoreResult<Url> {
        let invalid = || StoreError::Invalid("invalid paging cursor".into());
        if !self.owns(cursor) {
            return Err(invalid());
        }
        let url = Url::parse(cursor).map_err(|_| invalid())?;
        if url.origin() != self.base_url.origin()
            || !url.username().is_empty()
            || url.password().is_some()
        {
            return Err(invalid());
        }
        Ok(url)
    }

    /// The server's `next` link as a cursor. A link on another host with our
    /// base path (HAPI behind a proxy or in a container network often
    /// advertises `localhost`) is moved onto the configured base.
    fn next_cursor(&self, bundle: &Value) -> Option<String> {
        let link = bundle
            .get("link")?
            .as_array()?
            .iter()
            .find(|l| l.get("relation").and_then(Value::as_str) == Some("next"))?
            .get("url")?
            .as_str()?;
        if self.owns(link) {
            return Some(link.to_string());
        }
        let parsed = match Url::parse(link) {
            Ok(url) => url,
            Err(_) => match self.base_url.join(link) {
                Ok(url) => url,
                Err(_) => return Some(link.to_string()),
            },
        };
        let base_path = self.base_url.path().trim_end_matches('/');
        let rebased = parsed
            .path()
            .strip_prefix(base_path)
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))
            .map(|rest| {
                let mut url = format!("{}{}", self.base, rest);
                if let Some(query) = parsed.query() {
                    url.push('?');
                    url.push_str(query);
                }
                url
            });
        match rebased {
            Some(url) => Some(url),
            None => {
                tracing::warn!(
                    base = %self.base,
                    "the FHIR server's next link is outside the configured base URL; it cannot be followed"
                );
                Some(link.to_string())
            }
        }
    }

    // ----- sending ----------------------------------------------------------

    fn call(&self, method: Method, url: Url) -> Call {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(FHIR_JSON));
        Call {
            method,
            url,
            headers,
            body: None,
        }
    }

    fn with_body(mut call: Call, body: &Value) -> StoreResult<Call> {
        let bytes = serde_json::to_vec(body)
            .map_err(|e| StoreError::Internal(format!("cannot serialise the body: {e}")))?;
        call.headers
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
        call.body = Some(bytes.into());
        Ok(call)
    }

    fn header_value(name: &str, value: &str) -> StoreResult<HeaderValue> {
        HeaderValue::from_str(value).map_err(|_| {
            StoreError::Invalid(format!(
                "{name} contains characters that cannot be sent in an HTTP header"
            ))
        })
    }

    fn set_if_match(call: &mut Call, if_match: Option<&str>) -> StoreResult<Option<String>> {
        let Some(raw) = if_match else { return Ok(None) };
        let version = parse_etag(raw).ok_or_else(|| {
            StoreError::Invalid(format!("If-Match '{raw}' does not name a version"))
        })?;
        let value = Self::header_value("If-Match", &format!("W/\"{version}\""))?;
        call.headers.insert(header::IF_MATCH, value);
        Ok(Some(version))
    }

    /// Send `call`, retrying idempotent methods (GET, PUT, DELETE) on
    /// connection failures, 429 and 502/503/504, at most `max_retries`
    /// times. Timeouts are not retried (a slow server would otherwise hold
    /// the caller for `timeout x retries`). POST is never retried.
    async fn send(&self, call: &Call) -> StoreResult<Reply> {
        let idempotent = matches!(call.method, Method::GET | Method::PUT | Method::DELETE);
        let mut attempt: u32 = 0;
        loop {
            let mut request = self
                .client
                .request(call.method.clone(), call.url.clone())
                .headers(call.headers.clone());
            if let Some(auth) = &self.authorization {
                request = request.header(header::AUTHORIZATION, auth.clone());
            }
            if let Some(body) = &call.body {
                request = request.body(body.clone());
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
            let may_retry = idempotent && attempt < self.max_retries;
            match result {
                Ok(reply) if may_retry && is_transient(reply.status) => {
                    let delay =
                        retry_after(&reply).unwrap_or_else(|| backoff_delay(self.backoff, attempt));
                    tracing::warn!(
                        method = %call.method,
                        path = call.url.path(),
                        status = reply.status.as_u16(),
                        retry_in_ms = delay.as_millis() as u64,
                        attempt = attempt + 1,
                        "FHIR server answered a transient error; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
                Ok(reply) => return Ok(reply),
                Err(e) if e.is_builder() => {
                    return Err(StoreError::Internal(format!(
                        "cannot build the request: {}",
                        error_chain(&e)
                    )));
                }
                Err(e) if may_retry && !e.is_timeout() => {
                    let delay = backoff_delay(self.backoff, attempt);
                    tracing::warn!(
                        method = %call.method,
                        path = call.url.path(),
                        error = %crate::telemetry::redact_phones(&error_chain(&e)),
                        retry_in_ms = delay.as_millis() as u64,
                        attempt = attempt + 1,
                        "FHIR server not reachable; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(self.unavailable(&e)),
            }
            attempt += 1;
        }
    }

    fn unavailable(&self, error: &reqwest::Error) -> StoreError {
        let reason = if error.is_timeout() {
            format!("no answer within {} s", self.timeout.as_secs())
        } else if error.is_connect() {
            format!("cannot connect: {}", error_chain(error))
        } else {
            format!("request failed: {}", error_chain(error))
        };
        StoreError::Unavailable {
            backend: self.backend_label(),
            reason,
        }
    }

    /// The one translation of an unsuccessful response into a `StoreError`.
    fn map_error(&self, reply: &Reply, target: &Target<'_>) -> StoreError {
        let body = reply.json();
        let outcome = body
            .filter(|b| b.get("resourceType").and_then(Value::as_str) == Some("OperationOutcome"));
        let diagnostics = outcome.as_ref().and_then(first_issue_text);
        let message =
            diagnostics
                .clone()
                .unwrap_or_else(|| match reply.status.canonical_reason() {
                    Some(reason) => format!("{} {reason}", reply.status.as_u16()),
                    None => format!("HTTP {}", reply.status.as_u16()),
                });
        match (reply.status.as_u16(), target.instance) {
            (400, _) => StoreError::Invalid(message),
            (404, Some((resource_type, id))) => StoreError::not_found(resource_type, id),
            (410, Some((resource_type, id))) => StoreError::Gone {
                resource_type: resource_type.to_string(),
                id: id.to_string(),
                version_id: reply.etag_version().unwrap_or_else(|| "unknown".into()),
            },
            // R4 answers a stale If-Match with 412, STU3-era servers (HAPI
            // among them) with 409.
            (409, _) if target.if_match.is_some() => self.version_conflict(reply, target),
            (409, _) => StoreError::Conflict(message),
            (412, _) => {
                let lower = message.to_lowercase();
                let code = outcome
                    .as_ref()
                    .and_then(|o| o.pointer("/issue/0/code"))
                    .and_then(Value::as_str);
                let names_several = code == Some("multiple-matches")
                    || lower.contains("multiple")
                    || lower.contains("more than one")
                    // HAPI: "... because this search matched 2 resources"
                    || lower.contains("search matched");
                if names_several || (target.conditional && target.if_match.is_none()) {
                    StoreError::MultipleMatches(message)
                } else {
                    self.version_conflict(reply, target)
                }
            }
            (422, _) => StoreError::Unprocessable(message),
            (status, _) => StoreError::Remote {
                status,
                message,
                outcome,
            },
        }
    }

    fn version_conflict(&self, reply: &Reply, target: &Target<'_>) -> StoreError {
        StoreError::VersionConflict {
            reference: target.label.clone(),
            expected: target.if_match.clone().unwrap_or_else(|| "none".into()),
            current: reply.etag_version().unwrap_or_else(|| "unknown".into()),
        }
    }

    /// A success status with a body we cannot use.
    fn bad_reply(&self, reply: &Reply, what: &str) -> StoreError {
        StoreError::Remote {
            status: 502,
            message: format!(
                "{} answered HTTP {} with {what}",
                self.backend_label(),
                reply.status.as_u16()
            ),
            outcome: None,
        }
    }

    /// Send and require a 2xx answer.
    async fn exchange(&self, call: &Call, target: &Target<'_>) -> StoreResult<Reply> {
        let reply = self.send(call).await?;
        if reply.status.is_success() {
            Ok(reply)
        } else {
            Err(self.map_error(&reply, target))
        }
    }

    /// The resource in a write's answer, or read back from `Location`
    /// when the server sent an OperationOutcome or nothing.
    async fn written_resource(
        &self,
        reply: &Reply,
        resource_type: &str,
        fallback_id: Option<&str>,
    ) -> StoreResult<StoredResource> {
        if let Some(body) = reply.json()
            && body.get("resourceType").and_then(Value::as_str) == Some(resource_type)
            && body.get("id").and_then(Value::as_str).is_some()
        {
            return stored_from(body, Some(&reply.headers))
                .map_err(|what| self.bad_reply(reply, &what));
        }
        let location = reply
            .header(header::LOCATION)
            .or_else(|| reply.header(header::CONTENT_LOCATION))
            .and_then(parse_location);
        match location {
            Some((t, id, Some(version))) if t == resource_type => {
                self.vread(resource_type, &id, &version).await
            }
            Some((t, id, None)) if t == resource_type => self.read(resource_type, &id).await,
            _ => match fallback_id {
                Some(id) => self.read(resource_type, id).await,
                None => {
                    Err(self.bad_reply(reply, "neither the resource nor a usable Location header"))
                }
            },
        }
    }

    async fn put(
        &self,
        url: Url,
        resource_type: &str,
        target: Target<'_>,
        fallback_id: Option<&str>,
        resource: &Value,
        if_match: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        let mut call = Self::with_body(self.call(Method::PUT, url), resource)?;
        call.headers.insert(
            HeaderName::from_static("prefer"),
            HeaderValue::from_static("return=representation"),
        );
        let sent_version = Self::set_if_match(&mut call, if_match)?;
        let target = Target {
            if_match: sent_version.clone(),
            ..target
        };
        let reply = self.exchange(&call, &target).await?;
        let stored = self
            .written_resource(&reply, resource_type, fallback_id)
            .await?;
        let kind = if reply.status == StatusCode::CREATED {
            WriteKind::Created
        } else if sent_version.as_deref() == Some(stored.version_id.as_str()) {
            WriteKind::Unchanged
        } else {
            WriteKind::Updated
        };
        Ok(WriteOutcome { kind, stored })
    }

    /// GET a Bundle (search or history page).
    async fn get_bundle(&self, url: Url, target: &Target<'_>, lenient: bool) -> StoreResult<Value> {
        let mut call = self.call(Method::GET, url);
        if lenient {
            call.headers.insert(
                HeaderName::from_static("prefer"),
                HeaderValue::from_static("handling=lenient"),
            );
        }
        let reply = self.exchange(&call, target).await?;
        match reply.json() {
            Some(bundle)
                if bundle.get("resourceType").and_then(Value::as_str) == Some("Bundle") =>
            {
                Ok(bundle)
            }
            Some(_) => Err(self.bad_reply(&reply, "something other than a Bundle")),
            None => Err(self.bad_reply(&reply, "a body that is not JSON")),
        }
    }
}

#[async_trait]
impl FhirStore for HttpFhirStore {
    fn backend_name(&self) -> &'static str {
        "http"
    }

    async fn create(
        &self,
        resource: Value,
        if_none_exist: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        let resource_type = validate_resource(&resource, None)?;
        let mut call = Self::with_body(
            self.call(Method::POST, self.url(&resource_type)?),
            &resource,
        )?;
        call.headers.insert(
            HeaderName::from_static("prefer"),
            HeaderValue::from_static("return=representation"),
        );
        if let Some(query) = if_none_exist {
            let query = query.trim_start_matches('?');
            call.headers.insert(
                HeaderName::from_static("if-none-exist"),
                Self::header_value("If-None-Exist", query)?,
            );
        }
        let target = match if_none_exist {
            Some(query) => Target::conditional(format!("{resource_type}?{query}")),
            None => Target::other(resource_type.clone()),
        };
        let reply = self.exchange(&call, &target).await?;
        let stored = self.written_resource(&reply, &resource_type, None).await?;
        let kind = if reply.status == StatusCode::OK {
            WriteKind::Unchanged
        } else {
            WriteKind::Created
        };
        Ok(WriteOutcome { kind, stored })
    }

    async fn update(
        &self,
        resource_type: &str,
        id: &str,
        mut resource: Value,
        if_match: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        validate_resource(&resource, Some(resource_type))?;
        ensure_valid_id(id)?;
        match resource.get("id").and_then(Value::as_str) {
            Some(body_id) if body_id != id => {
                return Err(StoreError::Invalid(format!(
                    "the id '{body_id}' in the body does not match '{id}' in the URL"
                )));
            }
            Some(_) => {}
            // FHIR requires the id in an update's body; the embedded store
            // does not, so supply it.
            None => resource["id"] = json!(id),
        }
        let url = self.url(&format!("{resource_type}/{id}"))?;
        let target = Target::instance(resource_type, id, None);
        self.put(url, resource_type, target, Some(id), &resource, if_match)
            .await
    }

    async fn conditional_update(
        &self,
        resource_type: &str,
        query: &str,
        resource: Value,
        if_match: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        validate_resource(&resource, Some(resource_type))?;
        let query = query.trim_start_matches('?');
        if query.is_empty() {
            return Err(StoreError::Invalid(
                "a conditional update needs search parameters".into(),
            ));
        }
        let url = self.url(&format!("{resource_type}?{query}"))?;
        let target = Target::conditional(format!("{resource_type}?{query}"));
        let fallback_id = resource.get("id").and_then(Value::as_str);
        self.put(url, resource_type, target, fallback_id, &resource, if_match)
            .await
    }

    async fn read(&self, resource_type: &str, id: &str) -> StoreResult<StoredResource> {
        ensure_supported(resource_type)?;
        if !is_valid_id(id) {
            return Err(StoreError::not_found(resource_type, id));
        }
        let call = self.call(Method::GET, self.url(&format!("{resource_type}/{id}"))?);
        let reply = self
            .exchange(&call, &Target::instance(resource_type, id, None))
            .await?;
        read_reply(self, &reply, resource_type)
    }

    async fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version_id: &str,
    ) -> StoreResult<StoredResource> {
        ensure_supported(resource_type)?;
        if !is_valid_id(id) || !is_valid_id(version_id) {
            return Err(StoreError::not_found(
                resource_type,
                &format!("{id}/_history/{version_id}"),
            ));
        }
        let call = self.call(
            Method::GET,
            self.url(&format!("{resource_type}/{id}/_history/{version_id}"))?,
        );
        let reply = self
            .exchange(&call, &Target::instance(resource_type, id, None))
            .await?;
        read_reply(self, &reply, resource_type)
    }

    async fn delete(
        &self,
        resource_type: &str,
        id: &str,
        if_match: Option<&str>,
    ) -> StoreResult<Option<String>> {
        ensure_supported(resource_type)?;
        if !is_valid_id(id) {
            return Ok(None);
        }
        let mut call = self.call(Method::DELETE, self.url(&format!("{resource_type}/{id}"))?);
        let sent = Self::set_if_match(&mut call, if_match)?;
        let reply = self.send(&call).await?;
        match reply.status.as_u16() {
            200 | 202 | 204 => Ok(Some(
                reply.etag_version().unwrap_or_else(|| "unknown".into()),
            )),
            // Nothing to delete, or already deleted: not an error.
            404 | 410 => Ok(None),
            _ => Err(self.map_error(&reply, &Target::instance(resource_type, id, sent))),
        }
    }

    async fn search(&self, request: SearchRequest) -> StoreResult<SearchPage> {
        ensure_supported(&request.resource_type)?;
        let url = match &request.cursor {
            Some(cursor) => self.cursor_url(cursor)?,
            None => {
                let mut url = self.url(&request.resource_type)?;
                {
                    let mut pairs = url.query_pairs_mut();
                    // We always read JSON, whatever `_format` asked for.
                    for (name, value) in request.params.iter().filter(|(n, _)| n != "_format") {
                        pairs.append_pair(name, value);
                    }
                }
                if url.query() == Some("") {
                    url.set_query(None);
                }
                url
            }
        };
        let target = Target::other(format!("search of {}", request.resource_type));
        let bundle = self.get_bundle(url, &target, request.lenient).await?;

        let mut page = SearchPage {
            total: bundle.get("total").and_then(Value::as_u64),
            next_cursor: self.next_cursor(&bundle),
            ..SearchPage::default()
        };
        for (index, entry) in entries(&bundle).iter().enumerate() {
            let mode = entry
                .get("search")
                .and_then(|s| s.get("mode"))
                .and_then(Value::as_str);
            let Some(resource) = entry.get("resource") else {
                continue;
            };
            let resource_type = resource.get("resourceType").and_then(Value::as_str);
            if mode == Some("outcome")
                || (mode.is_none() && resource_type == Some("OperationOutcome"))
            {
                continue;
            }
            let stored =
                stored_from(resource.clone(), None).map_err(|what| StoreError::Remote {
                    status: 502,
                    message: format!(
                        "{}: search result entry {index}: {what}",
                        self.backend_label()
                    ),
                    outcome: None,
                })?;
            if mode == Some("include") {
                page.included.push(stored);
            } else {
                page.matches.push(stored);
            }
        }
        Ok(page)
    }

    async fn history(&self, request: HistoryRequest) -> StoreResult<HistoryPage> {
        let url = match &request.cursor {
            Some(cursor) => self.cursor_url(cursor)?,
            None => {
                let path = match (&request.resource_type, &request.id) {
                    (None, None) => "_history".to_string(),
                    (Some(t), None) => {
                        ensure_supported(t)?;
                        format!("{t}/_history")
                    }
                    (Some(t), Some(id)) => {
                        ensure_supported(t)?;
                        ensure_valid_id(id)?;
                        format!("{t}/{id}/_history")
                    }
                    (None, Some(_)) => {
                        return Err(StoreError::Invalid(
                            "the history of an id needs its resource type".into(),
                        ));
                    }
                };
                let mut url = self.url(&path)?;
                if request.since.is_some() || request.count.is_some() {
                    let mut pairs = url.query_pairs_mut();
                    if let Some(since) = &request.since {
                        pairs.append_pair("_since", &format_instant(since));
                    }
                    if let Some(count) = request.count {
                        pairs.append_pair("_count", &count.to_string());
                    }
                }
                url
            }
        };
        let target = match (&request.resource_type, &request.id) {
            (Some(t), Some(id)) => Target::instance(t, id, None),
            (Some(t), None) => Target::other(format!("history of {t}")),
            _ => Target::other("system history"),
        };
        let bundle = self.get_bundle(url, &target, false).await?;
        let mut page = HistoryPage {
            total: bundle.get("total").and_then(Value::as_u64),
            next_cursor: self.next_cursor(&bundle),
            entries: Vec::new(),
        };
        for (index, entry) in entries(&bundle).iter().enumerate() {
            let history_entry = history_entry(entry).map_err(|what| StoreError::Remote {
                status: 502,
                message: format!("{}: history entry {index}: {what}", self.backend_label()),
                outcome: None,
            })?;
            page.entries.push(history_entry);
        }
        Ok(page)
    }

    async fn process_bundle(&self, bundle: Value) -> StoreResult<Value> {
        let kind = check_bundle(&bundle)?;
        let call = Self::with_body(self.call(Method::POST, self.url("")?), &bundle)?;
        let reply = self
            .exchange(&call, &Target::other(format!("{kind} Bundle")))
            .await?;
        match reply.json() {
            Some(answer)
                if answer.get("resourceType").and_then(Value::as_str) == Some("Bundle") =>
            {
                Ok(answer)
            }
            Some(_) => Err(self.bad_reply(&reply, "something other than a Bundle")),
            None => Err(self.bad_reply(&reply, "a body that is not JSON")),
        }
    }

    async fn check(&self) -> StoreResult<BackendStatus> {
        let unavailable = |reason: String| StoreError::Unavailable {
            backend: self.backend_label(),
            reason,
        };
        let call = self.call(Method::GET, self.url("metadata")?);
        let reply = match self.send(&call).await {
            Ok(reply) => reply,
            Err(StoreError::Unavailable { reason, .. }) => return Err(unavailable(reason)),
            Err(other) => return Err(unavailable(other.to_string())),
        };
        if !reply.status.is_success() {
            let error = self.map_error(&reply, &Target::other("metadata"));
            return Err(unavailable(format!(
                "GET metadata answered HTTP {}: {error}",
                reply.status.as_u16()
            )));
        }
        let Some(statement) = reply.json() else {
            return Err(unavailable("GET metadata did not answer JSON".into()));
        };
        match statement.get("resourceType").and_then(Value::as_str) {
            Some("CapabilityStatement") => {}
            other => {
                return Err(unavailable(format!(
                    "GET metadata answered {} instead of a CapabilityStatement",
                    other.unwrap_or("something without a resourceType")
                )));
            }
        }
        let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("unknown").to_string();
        let software = statement.get("software");
        let name = text(software.and_then(|s| s.get("name")));
        let version = text(software.and_then(|s| s.get("version")));
        let fhir_version = text(statement.get("fhirVersion"));
        let mut detail = format!("{}: {name} {version}, FHIR {fhir_version}", self.base);
        if !fhir_version.starts_with("4.0") {
            detail.push_str(" (this connector speaks FHIR R4, 4.0.x)");
        }
        Ok(BackendStatus {
            name: self.backend_label(),
            detail,
        })
    }
}

// ----- helpers ---------------------------------------------------------------

fn sensitive_header(value: &str) -> Option<HeaderValue> {
    let mut header = HeaderValue::from_str(value).ok()?;
    header.set_sensitive(true);
    Some(header)
}

fn is_transient(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 502 | 503 | 504)
}

/// `Retry-After` in seconds or as an HTTP date, capped.
fn retry_after(reply: &Reply) -> Option<Duration> {
    let value = reply.header(header::RETRY_AFTER)?.trim();
    let delay = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let when = httpdate::parse_http_date(value).ok()?;
            when.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        }
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// The first issue's diagnostics, or its details text.
fn first_issue_text(outcome: &Value) -> Option<String> {
    let issue = outcome.get("issue")?.as_array()?.first()?;
    issue
        .get("diagnostics")
        .and_then(Value::as_str)
        .or_else(|| {
            issue
                .get("details")
                .and_then(|d| d.get("text"))
                .and_then(Value::as_str)
        })
        .filter(|s| !s.trim().is_empty())
        .map(str::to_string)
}

fn entries(bundle: &Value) -> &[Value] {
    bundle
        .get("entry")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn parse_instant(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// `[...]/Type/id[/_history/vid]` (absolute or relative, query ignored)
/// into its parts.
fn parse_location(location: &str) -> Option<(String, String, Option<String>)> {
    let path = location.split(['?', '#']).next().unwrap_or("");
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let n = segments.len();
    if n >= 4 && segments[n - 2] == "_history" {
        let (t, id, vid) = (segments[n - 4], segments[n - 3], segments[n - 1]);
        if looks_like_type_name(t) && is_valid_id(id) && is_valid_id(vid) {
            return Some((t.to_string(), id.to_string(), Some(vid.to_string())));
        }
    }
    if n >= 2 {
        let (t, id) = (segments[n - 2], segments[n - 1]);
        if looks_like_type_name(t) && is_valid_id(id) {
            return Some((t.to_string(), id.to_string(), None));
        }
    }
    None
}

/// A `StoredResource` from a resource as the server returned it. Version
/// and time fall back to the `ETag` and `Last-Modified` headers (then to
/// "now") and are written into `meta` so the resource carries them.
fn stored_from(mut resource: Value, headers: Option<&HeaderMap>) -> Result<StoredResource, String> {
    let object = resource
        .as_object_mut()
        .ok_or_else(|| "the resource is not a JSON object".to_string())?;
    let resource_type = object
        .get("resourceType")
        .and_then(Value::as_str)
        .ok_or_else(|| "the resource has no resourceType".to_string())?
        .to_string();
    let id = object
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("the {resource_type} has no id"))?
        .to_string();
    let header = |name: HeaderName| {
        headers
            .and_then(|h| h.get(name))
            .and_then(|v| v.to_str().ok())
    };
    if !object.get("meta").is_some_and(Value::is_object) {
        object.insert("meta".into(), json!({}));
    }
    let meta = object
        .get_mut("meta")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| "meta is not an object".to_string())?;

    let version_id = match meta.get("versionId").and_then(Value::as_str) {
        Some(v) => v.to_string(),
        None => {
            let v = header(header::ETAG)
                .and_then(parse_etag)
                .or_else(|| {
                    header(header::LOCATION)
                        .and_then(parse_location)
                        .and_then(|l| l.2)
                })
                .unwrap_or_else(|| "unknown".into());
            meta.insert("versionId".into(), json!(v));
            v
        }
    };
    let last_updated = match meta
        .get("lastUpdated")
        .and_then(Value::as_str)
        .and_then(parse_instant)
    {
        Some(t) => t,
        None => {
            let t = header(header::LAST_MODIFIED)
                .and_then(|v| httpdate::parse_http_date(v).ok())
                .map(DateTime::<Utc>::from)
                .unwrap_or_else(Utc::now);
            meta.insert("lastUpdated".into(), json!(format_instant(&t)));
            t
        }
    };
    Ok(StoredResource {
        resource,
        resource_type,
        id,
        version_id,
        last_updated,
    })
}

fn read_reply(
    store: &HttpFhirStore,
    reply: &Reply,
    resource_type: &str,
) -> StoreResult<StoredResource> {
    let Some(body) = reply.json() else {
        return Err(store.bad_reply(reply, "a body that is not JSON"));
    };
    let found = body
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("");
    if found != resource_type {
        return Err(store.bad_reply(
            reply,
            &format!(
                "a {} instead of a {resource_type}",
                if found.is_empty() {
                    "body without resourceType"
                } else {
                    found
                }
            ),
        ));
    }
    stored_from(body, Some(&reply.headers)).map_err(|what| store.bad_reply(reply, &what))
}

/// One history Bundle entry.
fn history_entry(entry: &Value) -> Result<HistoryEntry, String> {
    let request = entry.get("request");
    let response = entry.get("response");
    let resource = entry.get("resource").filter(|r| r.is_object()).cloned();
    let method = match request
        .and_then(|r| r.get("method"))
        .and_then(Value::as_str)
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        Some("POST") => HistoryMethod::Create,
        Some("PUT") | Some("PATCH") => HistoryMethod::Update,
        Some("DELETE") => HistoryMethod::Delete,
        _ => match &resource {
            None => HistoryMethod::Delete,
            Some(r) if r.pointer("/meta/versionId").and_then(Value::as_str) == Some("1") => {
                HistoryMethod::Create
            }
            Some(_) => HistoryMethod::Update,
        },
    };
    let resource = if method == HistoryMethod::Delete {
        None
    } else {
        resource
    };
    let from_urls = [
        request.and_then(|r| r.get("url")),
        entry.get("fullUrl"),
        response.and_then(|r| r.get("location")),
    ]
    .into_iter()
    .flatten()
    .filter_map(Value::as_str)
    .find_map(parse_location);

    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    let (resource_type, id) = match &resource {
        Some(r) => (text(r.get("resourceType")), text(r.get("id"))),
        None => (None, None),
    };
    let resource_type = resource_type
        .or_else(|| from_urls.as_ref().map(|l| l.0.clone()))
        .ok_or_else(|| "no resource type".to_string())?;
    let id = id
        .or_else(|| from_urls.as_ref().map(|l| l.1.clone()))
        .ok_or_else(|| "no resource id".to_string())?;
    let version_id = resource
        .as_ref()
        .and_then(|r| text(r.pointer("/meta/versionId")))
        .or_else(|| text(response.and_then(|r| r.get("etag"))).and_then(|e| parse_etag(&e)))
        .or_else(|| from_urls.as_ref().and_then(|l| l.2.clone()))
        .unwrap_or_else(|| "unknown".into());
    let last_updated = resource
        .as_ref()
        .and_then(|r| r.pointer("/meta/lastUpdated"))
        .or_else(|| response.and_then(|r| r.get("lastModified")))
        .and_then(Value::as_str)
        .and_then(parse_instant)
        .unwrap_or_else(Utc::now);
    Ok(HistoryEntry {
        method,
        resource_type,
        id,
        version_id,
        last_updated,
        resource,
    })
}

/// The Bundle's type (`batch` or `transaction`), after the checks the
/// embedded store makes. Transaction entries' resources are validated here
/// (a transaction fails whole); batch entries are left to the server, which
/// answers per entry.
fn check_bundle(bundle: &Value) -> StoreResult<&str> {
    if !bundle.is_object() {
        return Err(StoreError::Invalid(format!(
            "the body must be a Bundle (a JSON object), not {}",
            json_kind(bundle)
        )));
    }
    match bundle.get("resourceType").and_then(Value::as_str) {
        Some("Bundle") => {}
        Some(other) => {
            return Err(StoreError::Invalid(format!(
                "POST to the base expects a Bundle, not {other}"
            )));
        }
        None => return Err(StoreError::Invalid("the body has no resourceType".into())),
    }
    let kind = bundle.get("type").and_then(Value::as_str).unwrap_or("");
    if kind != "batch" && kind != "transaction" {
        return Err(StoreError::Invalid(format!(
            "Bundle.type must be batch or transaction, not '{kind}'"
        )));
    }
    let entries = match bundle.get("entry") {
        None => &[][..],
        Some(Value::Array(entries)) => entries.as_slice(),
        Some(other) => {
            return Err(StoreError::Invalid(format!(
                "Bundle.entry must be an array, not {}",
                json_kind(other)
            )));
        }
    };
    if kind == "transaction" {
        for (index, entry) in entries.iter().enumerate() {
            if let Some(resource) = entry.get("resource")
                && let Err(error) = validate_resource(resource, None)
            {
                let request = entry.get("request");
                let field = |name: &str| {
                    request
                        .and_then(|r| r.get(name))
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string()
                };
                return Err(StoreError::TransactionEntry {
                    index,
                    what: format!("{} {}", field("method"), field("url")),
                    source: Box::new(error),
                });
            }
        }
    }
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_absolute_relative_and_versioned() {
        assert_eq!(
            parse_location("https://h/fhir/Patient/152752/_history/1"),
            Some(("Patient".into(), "152752".into(), Some("1".into())))
        );
        assert_eq!(
            parse_location("Patient/abc"),
            Some(("Patient".into(), "abc".into(), None))
        );
        assert_eq!(parse_location("https://h/"), None);
        assert_eq!(parse_location(""), None);
    }

    #[test]
    fn history_entry_for_a_delete_takes_type_id_and_version_from_urls() {
        let entry = json!({
            "fullUrl": "http://h/fhir/Patient/7",
            "request": {"method": "DELETE", "url": "Patient/7"},
            "response": {"status": "204", "etag": "W/\"3\"", "lastModified": "2024-01-02T03:04:05.000Z"}
        });
        let e = history_entry(&entry).unwrap();
        assert_eq!(e.method, HistoryMethod::Delete);
        assert_eq!(
            (
                e.resource_type.as_str(),
                e.id.as_str(),
                e.version_id.as_str()
            ),
            ("Patient", "7", "3")
        );
        assert!(e.resource.is_none());
        assert_eq!(format_instant(&e.last_updated), "2024-01-02T03:04:05.000Z");
    }

    #[test]
    fn stored_from_falls_back_to_headers_and_fills_meta() {
        let mut headers = HeaderMap::new();
        headers.insert(header::ETAG, HeaderValue::from_static("W/\"4\""));
        headers.insert(
            header::LAST_MODIFIED,
            HeaderValue::from_static("Tue, 02 Jan 2024 03:04:05 GMT"),
        );
        let s = stored_from(
            json!({"resourceType": "Patient", "id": "p"}),
            Some(&headers),
        )
        .unwrap();
        assert_eq!(s.version_id, "4");
        assert_eq!(s.resource["meta"]["versionId"], "4");
        assert_eq!(
            s.resource["meta"]["lastUpdated"],
            "2024-01-02T03:04:05.000Z"
        );
        assert!(stored_from(json!({"resourceType": "Patient"}), None).is_err());
        assert!(stored_from(json!([1]), None).is_err());
    }
}
