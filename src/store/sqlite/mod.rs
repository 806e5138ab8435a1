//! `SqliteStore`: the embedded FHIR R4 store (the default backend).
//!
//! One SQLite database in WAL mode. Writes are serialized through a single
//! writer connection (so `If-Match` checks and version increments can
//! never race); reads use a small pool of read-only connections and run
//! beside the writer. All SQLite work happens on blocking threads.

mod bundle;
mod rows;
mod schema;
pub mod search;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use serde_json::Value;

use super::{
    BackendStatus, FhirStore, HistoryEntry, HistoryMethod, HistoryPage, HistoryRequest, SearchPage,
    SearchRequest, StoreError, StoreResult, StoredResource, WriteKind, WriteOutcome,
};
use crate::fhir::resource_types::{ensure_supported, ensure_valid_id, validate_resource};

const DEFAULT_HISTORY_COUNT: usize = 50;
const MAX_READERS: usize = 8;

pub struct SqliteStore {
    path: PathBuf,
    writer: Arc<Mutex<Connection>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    /// At most `MAX_READERS` reads at once: a read waits for a pooled
    /// connection rather than opening (and then closing) one more, which
    /// under many concurrent requests cost more than the reads themselves.
    read_permits: Arc<tokio::sync::Semaphore>,
}

fn unavailable(reason: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable {
        backend: "embedded FHIR store".into(),
        reason: reason.to_string(),
    }
}

fn configure(conn: &Connection) -> StoreResult<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "cache_size", -32_000)?;
    Ok(())
}

impl SqliteStore {
    /// Open (or create) the database at `path`, creating parent directories.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        let path = path.to_path_buf();
        let opened_path = path.clone();
        let writer = tokio::task::spawn_blocking(move || -> StoreResult<Connection> {
            if let Some(parent) = opened_path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .map_err(|e| unavailable(format!("cannot create {}: {e}", parent.display())))?;
            }
            let conn = Connection::open(&opened_path)
                .map_err(|e| unavailable(format!("cannot open {}: {e}", opened_path.display())))?;
            let mode: String =
                conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(unavailable(format!(
                    "{} cannot use WAL journaling (got {mode})",
                    opened_path.display()
                )));
            }
            configure(&conn)?;
            let found: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
            if found > schema::SCHEMA_VERSION {
                return Err(unavailable(format!(
                    "{} was written by a newer mhero (schema {found}; this one knows {})",
                    opened_path.display(),
                    schema::SCHEMA_VERSION
                )));
            }
            conn.execute_batch(schema::SCHEMA)?;
            conn.pragma_update(None, "user_version", schema::SCHEMA_VERSION)?;
            Ok(conn)
        })
        .await
        .map_err(|e| StoreError::Internal(e.to_string()))??;
        Ok(SqliteStore {
            path,
            writer: Arc::new(Mutex::new(writer)),
            readers: Arc::new(Mutex::new(Vec::new())),
            read_permits: Arc::new(tokio::sync::Semaphore::new(MAX_READERS)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `work` on the writer connection inside an IMMEDIATE transaction;
    /// commit on success, roll back on error.
    async fn write<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let writer = Arc::clone(&self.writer);
        tokio::task::spawn_blocking(move || {
            let mut conn = writer
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let value = work(&tx)?;
            tx.commit()?;
            Ok(value)
        })
        .await
        .map_err(|e| StoreError::Internal(format!("store task failed: {e}")))?
    }

    /// Run `work` on the writer connection without a wrapping transaction.
    async fn with_writer<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        let writer = Arc::clone(&self.writer);
        tokio::task::spawn_blocking(move || {
            let mut conn = writer
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            work(&mut conn)
        })
        .await
        .map_err(|e| StoreError::Internal(format!("store task failed: {e}")))?
    }

    /// Run `work` on a pooled read-only connection.
    async fn read_with<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let readers = Arc::clone(&self.readers);
        let path = self.path.clone();
        let permit = Arc::clone(&self.read_permits)
            .acquire_owned()
            .await
            .map_err(|e| StoreError::Internal(format!("store reads closed: {e}")))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let pooled = readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match pooled {
                Some(conn) => conn,
                None => {
                    let conn = Connection::open_with_flags(
                        &path,
                        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )
                    .map_err(|e| unavailable(format!("cannot open {}: {e}", path.display())))?;
                    configure(&conn)?;
                    conn
                }
            };
            // A read sees one consistent snapshot.
            let result = (|| {
                conn.execute_batch("BEGIN")?;
                let value = work(&conn);
                conn.execute_batch("COMMIT")?;
                value
            })();
            if result.is_ok() || conn.is_autocommit() {
                let mut pool = readers.lock().unwrap_or_else(|p| p.into_inner());
                if pool.len() < MAX_READERS {
                    pool.push(conn);
                }
            }
            result
        })
        .await
        .map_err(|e| StoreError::Internal(format!("store task failed: {e}")))?
    }
}

fn history_entries(conn: &Connection, request: &HistoryRequest) -> StoreResult<HistoryPage> {
    use rusqlite::types::Value as SqlValue;
    let mut conditions = vec!["1 = 1".to_string()];
    let mut binds: Vec<SqlValue> = Vec::new();
    if let Some(t) = &request.resource_type {
        conditions.push("res_type = ?".into());
        binds.push(SqlValue::Text(t.clone()));
    }
    if let Some(id) = &request.id {
        conditions.push("res_id = ?".into());
        binds.push(SqlValue::Text(id.clone()));
    }
    if let Some(since) = &request.since {
        conditions.push("last_updated_ms >= ?".into());
        binds.push(SqlValue::Integer(since.timestamp_millis()));
    }
    let where_sql = conditions.join(" AND ");
    let total: i64 = conn
        .prepare(&format!("SELECT count(*) FROM versions WHERE {where_sql}"))?
        .query_row(rusqlite::params_from_iter(binds.iter()), |r| r.get(0))?;
    let mut page_where = where_sql;
    if let Some(cursor) = &request.cursor {
        let seq: i64 = cursor
            .strip_prefix("h.")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                StoreError::Invalid(format!(
                    "invalid paging cursor '{cursor}'; start again from the first page"
                ))
            })?;
        page_where.push_str(" AND seq < ?");
        binds.push(SqlValue::Integer(seq));
    }
    let count = request
        .count
        .unwrap_or(DEFAULT_HISTORY_COUNT)
        .min(search::MAX_COUNT);
    let sql = format!(
        "SELECT seq, res_type, res_id, version, last_updated_ms, method, body FROM versions WHERE {page_where} ORDER BY seq DESC LIMIT {}",
        count + 1
    );
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(binds.iter()))?;
    let mut entries = Vec::new();
    let mut last_seq = None;
    let mut has_more = false;
    while let Some(row) = rows.next()? {
        if entries.len() == count {
            has_more = true;
            break;
        }
        let seq: i64 = row.get(0)?;
        let method: String = row.get(5)?;
        let body: Option<String> = row.get(6)?;
        let version: i64 = row.get(3)?;
        entries.push(HistoryEntry {
            method: match method.as_str() {
                "create" => HistoryMethod::Create,
                "delete" => HistoryMethod::Delete,
                _ => HistoryMethod::Update,
            },
            resource_type: row.get(1)?,
            id: row.get(2)?,
            version_id: version.to_string(),
            last_updated: rows::millis_to_instant(row.get(4)?),
            resource: body
                .map(|b| serde_json::from_str(&b))
                .transpose()
                .map_err(|e| StoreError::Internal(format!("stored JSON is unreadable: {e}")))?,
        });
        last_seq = Some(seq);
    }
    Ok(HistoryPage {
        total: Some(total as u64),
        entries,
        next_cursor: if has_more {
            last_seq.map(|s| format!("h.{s}"))
        } else {
            None
        },
    })
}

#[async_trait]
impl FhirStore for SqliteStore {
    fn backend_name(&self) -> &'static str {
        "embedded"
    }

    async fn create(
        &self,
        resource: Value,
        if_none_exist: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        let resource_type = validate_resource(&resource, None)?;
        let if_none_exist = if_none_exist.map(str::to_string);
        self.write(move |conn| {
            if let Some(query) = &if_none_exist
                && let Some(id) = search::resolve_single(conn, &resource_type, query)?
            {
                return Ok(WriteOutcome {
                    kind: WriteKind::Unchanged,
                    stored: rows::read(conn, &resource_type, &id)?,
                });
            }
            let id = uuid::Uuid::new_v4().to_string();
            rows::put(conn, &resource_type, &id, resource, None)
        })
        .await
    }

    async fn update(
        &self,
        resource_type: &str,
        id: &str,
        resource: Value,
        if_match: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        validate_resource(&resource, Some(resource_type))?;
        ensure_valid_id(id)?;
        if let Some(body_id) = resource.get("id").and_then(Value::as_str)
            && body_id != id
        {
            return Err(StoreError::Invalid(format!(
                "the id '{body_id}' in the body does not match '{id}' in the URL"
            )));
        }
        let (resource_type, id, if_match) = (
            resource_type.to_string(),
            id.to_string(),
            if_match.map(str::to_string),
        );
        self.write(move |conn| rows::put(conn, &resource_type, &id, resource, if_match.as_deref()))
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
        let (resource_type, query, if_match) = (
            resource_type.to_string(),
            query.to_string(),
            if_match.map(str::to_string),
        );
        self.write(move |conn| {
            let id = search::conditional_update_target(conn, &resource_type, &query, &resource)?;
            rows::put(conn, &resource_type, &id, resource, if_match.as_deref())
        })
        .await
    }

    async fn read(&self, resource_type: &str, id: &str) -> StoreResult<StoredResource> {
        ensure_supported(resource_type)?;
        let (resource_type, id) = (resource_type.to_string(), id.to_string());
        self.read_with(move |conn| rows::read(conn, &resource_type, &id))
            .await
    }

    async fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version_id: &str,
    ) -> StoreResult<StoredResource> {
        ensure_supported(resource_type)?;
        let (resource_type, id, version_id) = (
            resource_type.to_string(),
            id.to_string(),
            version_id.to_string(),
        );
        self.read_with(move |conn| rows::vread(conn, &resource_type, &id, &version_id))
            .await
    }

    async fn delete(
        &self,
        resource_type: &str,
        id: &str,
        if_match: Option<&str>,
    ) -> StoreResult<Option<String>> {
        ensure_supported(resource_type)?;
        let (resource_type, id, if_match) = (
            resource_type.to_string(),
            id.to_string(),
            if_match.map(str::to_string),
        );
        self.write(move |conn| rows::delete(conn, &resource_type, &id, if_match.as_deref()))
            .await
    }

    async fn search(&self, request: SearchRequest) -> StoreResult<SearchPage> {
        ensure_supported(&request.resource_type)?;
        let plan = search::plan(&request.resource_type, &request.params, request.lenient)?;
        self.read_with(move |conn| search::execute(conn, &plan, request.cursor.as_deref()))
            .await
    }

    async fn history(&self, request: HistoryRequest) -> StoreResult<HistoryPage> {
        if let Some(t) = &request.resource_type {
            ensure_supported(t)?;
        }
        self.read_with(move |conn| history_entries(conn, &request))
            .await
    }

    async fn process_bundle(&self, bundle: Value) -> StoreResult<Value> {
        let (kind, entries) = bundle::bundle_parts(&bundle)?;
        if kind == "transaction" {
            self.write(move |conn| bundle::transaction(conn, &entries))
                .await
        } else {
            self.with_writer(move |conn| bundle::batch(conn, &entries))
                .await
        }
    }

    async fn check(&self) -> StoreResult<BackendStatus> {
        let path = self.path.display().to_string();
        let count = self
            .read_with(|conn| {
                let n: Option<i64> = conn
                    .query_row(
                        "SELECT count(*) FROM resources WHERE deleted = 0",
                        params![],
                        |r| r.get(0),
                    )
                    .optional()?;
                Ok(n.unwrap_or(0))
            })
            .await?;
        Ok(BackendStatus {
            name: "fhir (embedded SQLite)".into(),
            detail: format!("{path}: {count} resources"),
        })
    }
}
