//! The `FhirStore` abstraction: the single source of truth of the connector.
//!
//! Owns the trait every backend implements, the values that cross it
//! (`StoredResource`, `WriteOutcome`, search and history pages) and the
//! store layer's error type, `StoreError`. Backends: [`sqlite::SqliteStore`]
//! (embedded, the default) and [`http::HttpFhirStore`] (HAPI or any FHIR R4
//! server). Both are checked by the same contract suite in
//! `tests/store_contract.rs`.

pub mod http;
pub mod metered;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::config::{FhirBackendKind, FhirSettings};

/// One version of a resource as the store holds it. `resource` carries
/// `id`, `meta.versionId` and `meta.lastUpdated` set by the store.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResource {
    pub resource: Value,
    pub resource_type: String,
    pub id: String,
    pub version_id: String,
    pub last_updated: DateTime<Utc>,
}

impl StoredResource {
    /// `Type/id`
    pub fn reference(&self) -> String {
        format!("{}/{}", self.resource_type, self.id)
    }

    /// `Type/id/_history/vid`, the form used in `Location` headers.
    pub fn versioned_reference(&self) -> String {
        format!(
            "{}/{}/_history/{}",
            self.resource_type, self.id, self.version_id
        )
    }

    /// The weak ETag of this version: `W/"vid"`.
    pub fn etag(&self) -> String {
        format!("W/\"{}\"", self.version_id)
    }
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// A new resource (HTTP 201).
    Created,
    /// A new version of an existing resource (HTTP 200).
    Updated,
    /// Nothing new was written: a conditional create matched an existing
    /// resource, or an update carried the same content (HTTP 200).
    Unchanged,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WriteOutcome {
    pub kind: WriteKind,
    pub stored: StoredResource,
}

/// A type-level search: the raw parameters as the client sent them plus the
/// opaque cursor of a page after the first.
#[derive(Debug, Clone, Default)]
pub struct SearchRequest {
    pub resource_type: String,
    pub params: Vec<(String, String)>,
    pub cursor: Option<String>,
    /// `Prefer: handling=lenient`: unknown parameters are ignored instead of
    /// rejected, and an oversize `_count` is clamped.
    pub lenient: bool,
}

/// How a resource appears in a searchset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchMode {
    Match,
    Include,
}

#[derive(Debug, Clone, Default)]
pub struct SearchPage {
    /// Number of matches over all pages (`None` when `_total=none`).
    pub total: Option<u64>,
    pub matches: Vec<StoredResource>,
    pub included: Vec<StoredResource>,
    /// Opaque position of the next page, if there is one.
    pub next_cursor: Option<String>,
    /// Parameters the store ignored (lenient handling), for an OperationOutcome.
    pub ignored_params: Vec<String>,
}

/// Which history to list: a system, a type, or one resource.
#[derive(Debug, Clone, Default)]
pub struct HistoryRequest {
    pub resource_type: Option<String>,
    pub id: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub count: Option<usize>,
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryMethod {
    Create,
    Update,
    Delete,
}

impl HistoryMethod {
    pub fn http_method(self) -> &'static str {
        match self {
            HistoryMethod::Create => "POST",
            HistoryMethod::Update => "PUT",
            HistoryMethod::Delete => "DELETE",
        }
    }
}

#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub method: HistoryMethod,
    pub resource_type: String,
    pub id: String,
    pub version_id: String,
    pub last_updated: DateTime<Utc>,
    /// Absent for a delete.
    pub resource: Option<Value>,
}

#[derive(Debug, Clone, Default)]
pub struct HistoryPage {
    pub total: Option<u64>,
    pub entries: Vec<HistoryEntry>,
    pub next_cursor: Option<String>,
}

/// Result of `mhero check` / `GET /health/ready` for one backend.
#[derive(Debug, Clone)]
pub struct BackendStatus {
    pub name: String,
    pub detail: String,
}

/// Errors of the store layer. `error.rs` maps each to an HTTP status and an
/// OperationOutcome; nothing else does.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request or resource is malformed (400).
    #[error("{0}")]
    Invalid(String),
    /// A resource type this server does not store (404).
    #[error(
        "resource type '{0}' is not supported by this server; supported types: {list}",
        list = crate::fhir::resource_types::SUPPORTED.join(", ")
    )]
    UnsupportedType(String),
    /// A search parameter that is not declared for the type (400).
    #[error("unknown search parameter '{name}' for {resource_type}; known parameters: {known}")]
    UnknownSearchParameter {
        resource_type: String,
        name: String,
        known: String,
    },
    #[error("{resource_type}/{id} is not known")]
    NotFound { resource_type: String, id: String },
    #[error("{resource_type}/{id} has been deleted (version {version_id})")]
    Gone {
        resource_type: String,
        id: String,
        version_id: String,
    },
    /// `If-Match` did not match the current version (412).
    #[error(
        "version conflict on {reference}: If-Match expected version {expected}, current is {current}"
    )]
    VersionConflict {
        reference: String,
        expected: String,
        current: String,
    },
    /// A conditional operation matched more than one resource (412).
    #[error("{0}")]
    MultipleMatches(String),
    /// A state conflict, e.g. the same resource twice in a transaction (409).
    #[error("{0}")]
    Conflict(String),
    /// A valid request the server will not carry out (422).
    #[error("{0}")]
    Unprocessable(String),
    /// An entry of a transaction Bundle failed; nothing was written.
    #[error("transaction failed at entry {index} ({what}): {source}; nothing was written")]
    TransactionEntry {
        index: usize,
        what: String,
        #[source]
        source: Box<StoreError>,
    },
    /// The backend cannot be reached or is not usable now (503).
    #[error("{backend} is unavailable: {reason}")]
    Unavailable { backend: String, reason: String },
    /// A remote FHIR server answered with an error we pass on.
    #[error("remote FHIR server answered {status}: {message}")]
    Remote {
        status: u16,
        message: String,
        outcome: Option<Value>,
    },
    /// A defect or an unexpected backend failure (500).
    #[error("internal store error: {0}")]
    Internal(String),
}

impl StoreError {
    pub fn not_found(resource_type: &str, id: &str) -> Self {
        StoreError::NotFound {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The FHIR R4 store contract. All methods take and return FHIR JSON as
/// received (unknown elements survive); the store sets `id`,
/// `meta.versionId` and `meta.lastUpdated`.
#[async_trait]
pub trait FhirStore: Send + Sync + 'static {
    /// Short name for logs, metrics and health: `embedded` or `http`.
    fn backend_name(&self) -> &'static str;

    /// Create with a server-assigned id. With `if_none_exist` (a search query
    /// string such as `identifier=urn:x|1`): one match returns it unchanged,
    /// several matches fail with `MultipleMatches`.
    async fn create(
        &self,
        resource: Value,
        if_none_exist: Option<&str>,
    ) -> StoreResult<WriteOutcome>;

    /// Update (or create with the client's id). `if_match` is a version id.
    async fn update(
        &self,
        resource_type: &str,
        id: &str,
        resource: Value,
        if_match: Option<&str>,
    ) -> StoreResult<WriteOutcome>;

    /// Update the single resource matching `query`; none = create.
    async fn conditional_update(
        &self,
        resource_type: &str,
        query: &str,
        resource: Value,
        if_match: Option<&str>,
    ) -> StoreResult<WriteOutcome>;

    async fn read(&self, resource_type: &str, id: &str) -> StoreResult<StoredResource>;

    async fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version_id: &str,
    ) -> StoreResult<StoredResource>;

    /// Delete; returns the version id of the delete, or `None` if there was
    /// nothing to delete (deleting twice is not an error).
    async fn delete(
        &self,
        resource_type: &str,
        id: &str,
        if_match: Option<&str>,
    ) -> StoreResult<Option<String>>;

    async fn search(&self, request: SearchRequest) -> StoreResult<SearchPage>;

    async fn history(&self, request: HistoryRequest) -> StoreResult<HistoryPage>;

    /// Process a `batch` or `transaction` Bundle and return the
    /// `batch-response` / `transaction-response` Bundle. A failed transaction
    /// is an error (`TransactionEntry`) and writes nothing.
    async fn process_bundle(&self, bundle: Value) -> StoreResult<Value>;

    /// Reach the backend and describe it (for `check` and `/health/ready`).
    async fn check(&self) -> StoreResult<BackendStatus>;
}

pub type SharedStore = Arc<dyn FhirStore>;

/// Build the store chosen by `fhir.backend`.
pub async fn open_store(settings: &FhirSettings) -> StoreResult<SharedStore> {
    match settings.backend {
        FhirBackendKind::Embedded => {
            let store = sqlite::SqliteStore::open(&settings.embedded.path).await?;
            Ok(Arc::new(store))
        }
        FhirBackendKind::Http => {
            let store = http::HttpFhirStore::new(&settings.http)?;
            Ok(Arc::new(store))
        }
    }
}

/// Read-modify-write with optimistic concurrency: read the resource, let
/// `change` return the new version (or `None` for "nothing to do"), write
/// it with `If-Match`, and on a version conflict read again and retry.
/// Returns the written version, or `None` when nothing needed writing.
pub async fn modify_resource<F>(
    store: &dyn FhirStore,
    resource_type: &str,
    id: &str,
    mut change: F,
) -> StoreResult<Option<StoredResource>>
where
    F: FnMut(&Value) -> Option<Value> + Send,
{
    const MAX_ATTEMPTS: usize = 8;
    for _ in 0..MAX_ATTEMPTS {
        let current = store.read(resource_type, id).await?;
        let Some(updated) = change(&current.resource) else {
            return Ok(None);
        };
        match store
            .update(resource_type, id, updated, Some(&current.version_id))
            .await
        {
            Ok(outcome) if outcome.kind == WriteKind::Unchanged => return Ok(None),
            Ok(outcome) => return Ok(Some(outcome.stored)),
            Err(StoreError::VersionConflict { .. }) => continue,
            Err(other) => return Err(other),
        }
    }
    Err(StoreError::Conflict(format!(
        "{resource_type}/{id} kept changing while it was being updated; gave up after {MAX_ATTEMPTS} attempts"
    )))
}

/// Parse an `If-Match` / ETag value (`W/"3"`, `"3"` or `3`) into a version id.
///
/// ```
/// assert_eq!(mhero::store::parse_etag("W/\"3\"").as_deref(), Some("3"));
/// ```
pub fn parse_etag(value: &str) -> Option<String> {
    let v = value.trim();
    let v = v.strip_prefix("W/").unwrap_or(v);
    let v = v.trim_matches('"').trim();
    if v.is_empty() {
        None
    } else {
        Some(v.to_string())
    }
}

/// Every match of a search, following the pages (`included` resources are
/// dropped; no total is counted). For bounded result sets: callers chunk
/// their `_id` lists.
pub async fn search_all(
    store: &dyn FhirStore,
    resource_type: &str,
    mut params: Vec<(String, String)>,
) -> StoreResult<Vec<StoredResource>> {
    if !params.iter().any(|(name, _)| name == "_total") {
        params.push(("_total".to_string(), "none".to_string()));
    }
    let mut all = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .search(SearchRequest {
                resource_type: resource_type.to_string(),
                params: params.clone(),
                cursor,
                lenient: false,
            })
            .await?;
        all.extend(page.matches);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(all),
        }
    }
}

/// A value escaped for a comma-separated OR list of a search parameter.
pub fn escape_search_value(value: &str) -> String {
    value.replace('\\', "\\\\").replace(',', "\\,")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_forms_parse_to_the_version() {
        assert_eq!(parse_etag("W/\"3\"").as_deref(), Some("3"));
        assert_eq!(parse_etag("\"12\"").as_deref(), Some("12"));
        assert_eq!(parse_etag("7").as_deref(), Some("7"));
        assert_eq!(parse_etag("W/\"\""), None);
    }
}
