//! Reading and writing single resources inside a SQLite connection or
//! transaction: versions, delete markers, `If-Match`, and index rows.
//! Every function here runs on a connection the caller owns; the async
//! wrappers and locking live in `mod.rs`.

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value, json};

use super::schema::INDEX_TABLES;
use crate::fhir::extract::{IndexValue, extract};
use crate::fhir::format_instant;
use crate::fhir::search_params::params_for;
use crate::store::{StoreError, StoreResult, StoredResource, WriteKind, WriteOutcome};

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        match error.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy) | Some(rusqlite::ErrorCode::DatabaseLocked) => {
                StoreError::Unavailable {
                    backend: "embedded FHIR store".into(),
                    reason: error.to_string(),
                }
            }
            Some(rusqlite::ErrorCode::CannotOpen)
            | Some(rusqlite::ErrorCode::ReadOnly)
            | Some(rusqlite::ErrorCode::DiskFull) => StoreError::Unavailable {
                backend: "embedded FHIR store".into(),
                reason: error.to_string(),
            },
            _ => StoreError::Internal(error.to_string()),
        }
    }
}

pub fn millis_to_instant(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn parse_body(body: &str) -> StoreResult<Value> {
    serde_json::from_str(body)
        .map_err(|e| StoreError::Internal(format!("stored JSON is unreadable: {e}")))
}

/// The current row of a resource.
pub struct CurrentRow {
    pub rid: i64,
    pub version: i64,
    pub last_updated_ms: i64,
    pub deleted: bool,
    pub body: Option<String>,
}

pub fn current_row(
    conn: &Connection,
    resource_type: &str,
    id: &str,
) -> StoreResult<Option<CurrentRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT rid, version, last_updated_ms, deleted, body FROM resources WHERE res_type = ?1 AND res_id = ?2",
    )?;
    Ok(stmt
        .query_row(params![resource_type, id], |row| {
            Ok(CurrentRow {
                rid: row.get(0)?,
                version: row.get(1)?,
                last_updated_ms: row.get(2)?,
                deleted: row.get::<_, i64>(3)? != 0,
                body: row.get(4)?,
            })
        })
        .optional()?)
}

pub fn stored_from_parts(
    resource_type: &str,
    id: &str,
    version: i64,
    last_updated_ms: i64,
    body: &str,
) -> StoreResult<StoredResource> {
    Ok(StoredResource {
        resource: parse_body(body)?,
        resource_type: resource_type.to_string(),
        id: id.to_string(),
        version_id: version.to_string(),
        last_updated: millis_to_instant(last_updated_ms),
    })
}

pub fn read(conn: &Connection, resource_type: &str, id: &str) -> StoreResult<StoredResource> {
    match current_row(conn, resource_type, id)? {
        None => Err(StoreError::not_found(resource_type, id)),
        Some(row) if row.deleted => Err(StoreError::Gone {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            version_id: row.version.to_string(),
        }),
        Some(row) => stored_from_parts(
            resource_type,
            id,
            row.version,
            row.last_updated_ms,
            row.body.as_deref().unwrap_or("{}"),
        ),
    }
}

pub fn vread(
    conn: &Connection,
    resource_type: &str,
    id: &str,
    version_id: &str,
) -> StoreResult<StoredResource> {
    let version: i64 = version_id.parse().map_err(|_| {
        StoreError::not_found(resource_type, &format!("{id}/_history/{version_id}"))
    })?;
    let mut stmt = conn.prepare_cached(
        "SELECT v.last_updated_ms, v.body FROM versions v JOIN resources r ON r.rid = v.rid
         WHERE r.res_type = ?1 AND r.res_id = ?2 AND v.version = ?3",
    )?;
    let row: Option<(i64, Option<String>)> = stmt
        .query_row(params![resource_type, id, version], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    match row {
        None => Err(StoreError::not_found(
            resource_type,
            &format!("{id}/_history/{version_id}"),
        )),
        Some((_, None)) => Err(StoreError::Gone {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            version_id: version_id.to_string(),
        }),
        Some((ms, Some(body))) => stored_from_parts(resource_type, id, version, ms, &body),
    }
}

/// The resource without the store-managed `meta` elements, to tell a real
/// change from a repeated write.
fn content_of(resource: &Value) -> Value {
    let mut copy = resource.clone();
    if let Some(meta) = copy.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            copy.as_object_mut().map(|o| o.remove("meta"));
        }
    }
    copy
}

fn check_if_match(
    reference: &str,
    if_match: Option<&str>,
    current: Option<&CurrentRow>,
) -> StoreResult<()> {
    let Some(expected) = if_match else {
        return Ok(());
    };
    let current_version = match current {
        Some(row) if !row.deleted => row.version.to_string(),
        Some(_) => "deleted".to_string(),
        None => "none (the resource does not exist)".to_string(),
    };
    if current_version != expected {
        return Err(StoreError::VersionConflict {
            reference: reference.to_string(),
            expected: expected.to_string(),
            current: current_version,
        });
    }
    Ok(())
}

fn now_ms(previous_ms: Option<i64>) -> i64 {
    // lastUpdated never goes backwards for one resource, even if the clock does.
    let now = Utc::now().timestamp_millis();
    match previous_ms {
        Some(prev) if prev >= now => prev + 1,
        _ => now,
    }
}

/// Write `resource` as the next version of `resource_type/id` (creating it
/// if needed). The caller has validated the body.
pub fn put(
    conn: &Connection,
    resource_type: &str,
    id: &str,
    mut resource: Value,
    if_match: Option<&str>,
) -> StoreResult<WriteOutcome> {
    let reference = format!("{resource_type}/{id}");
    let current = current_row(conn, resource_type, id)?;
    check_if_match(&reference, if_match, current.as_ref())?;
    resource["id"] = json!(id);

    if let Some(row) = &current
        && !row.deleted
        && let Some(body) = &row.body
    {
        let existing = parse_body(body)?;
        if content_of(&existing) == content_of(&resource) {
            return Ok(WriteOutcome {
                kind: WriteKind::Unchanged,
                stored: stored_from_parts(
                    resource_type,
                    id,
                    row.version,
                    row.last_updated_ms,
                    body,
                )?,
            });
        }
    }

    let version = current.as_ref().map(|r| r.version + 1).unwrap_or(1);
    let ms = now_ms(current.as_ref().map(|r| r.last_updated_ms));
    let last_updated = millis_to_instant(ms);
    set_meta(&mut resource, version, &last_updated);
    let body = serde_json::to_string(&resource).map_err(|e| StoreError::Internal(e.to_string()))?;
    let sort_name = sort_name_of(&resource, resource_type);

    let (rid, kind) = match &current {
        Some(row) => {
            conn.prepare_cached(
                "UPDATE resources SET version = ?2, last_updated_ms = ?3, deleted = 0, sort_name = ?4, body = ?5 WHERE rid = ?1",
            )?
            .execute(params![row.rid, version, ms, sort_name, body])?;
            delete_index_rows(conn, row.rid)?;
            (
                row.rid,
                if row.deleted {
                    WriteKind::Created
                } else {
                    WriteKind::Updated
                },
            )
        }
        None => {
            conn.prepare_cached(
                "INSERT INTO resources (res_type, res_id, version, last_updated_ms, deleted, sort_name, body)
                 VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6)",
            )?
            .execute(params![resource_type, id, version, ms, sort_name, body])?;
            (conn.last_insert_rowid(), WriteKind::Created)
        }
    };
    let method = if kind == WriteKind::Created {
        "create"
    } else {
        "update"
    };
    conn.prepare_cached(
        "INSERT INTO versions (rid, res_type, res_id, version, last_updated_ms, method, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![rid, resource_type, id, version, ms, method, body])?;
    insert_index_rows(conn, rid, resource_type, &resource)?;

    Ok(WriteOutcome {
        kind,
        stored: StoredResource {
            resource,
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            version_id: version.to_string(),
            last_updated,
        },
    })
}

/// Mark a resource deleted (a new version without a body). Returns the
/// delete's version id, or `None` if there was nothing to delete.
pub fn delete(
    conn: &Connection,
    resource_type: &str,
    id: &str,
    if_match: Option<&str>,
) -> StoreResult<Option<String>> {
    let current = current_row(conn, resource_type, id)?;
    check_if_match(&format!("{resource_type}/{id}"), if_match, current.as_ref())?;
    let Some(row) = current.filter(|r| !r.deleted) else {
        return Ok(None);
    };
    let version = row.version + 1;
    let ms = now_ms(Some(row.last_updated_ms));
    conn.prepare_cached("UPDATE resources SET version = ?2, last_updated_ms = ?3, deleted = 1, body = NULL WHERE rid = ?1")?
        .execute(params![row.rid, version, ms])?;
    conn.prepare_cached(
        "INSERT INTO versions (rid, res_type, res_id, version, last_updated_ms, method, body) VALUES (?1, ?2, ?3, ?4, ?5, 'delete', NULL)",
    )?
    .execute(params![row.rid, resource_type, id, version, ms])?;
    delete_index_rows(conn, row.rid)?;
    Ok(Some(version.to_string()))
}

fn set_meta(resource: &mut Value, version: i64, last_updated: &DateTime<Utc>) {
    let object = resource
        .as_object_mut()
        .expect("validated resource is an object");
    let meta = object.entry("meta").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    meta["versionId"] = json!(version.to_string());
    meta["lastUpdated"] = json!(format_instant(last_updated));
}

fn sort_name_of(resource: &Value, resource_type: &str) -> String {
    params_for(resource_type)
        .find(|d| d.name == "name")
        .and_then(|def| {
            extract(resource, def).into_iter().find_map(|v| match v {
                IndexValue::String { folded, .. } => Some(folded),
                _ => None,
            })
        })
        .unwrap_or_default()
}

fn delete_index_rows(conn: &Connection, rid: i64) -> StoreResult<()> {
    for table in INDEX_TABLES {
        conn.prepare_cached(&format!("DELETE FROM {table} WHERE rid = ?1"))?
            .execute([rid])?;
    }
    Ok(())
}

fn insert_index_rows(
    conn: &Connection,
    rid: i64,
    resource_type: &str,
    resource: &Value,
) -> StoreResult<()> {
    let mut token = conn.prepare_cached(
        "INSERT INTO idx_token (rid, res_type, param, system, code) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut string = conn.prepare_cached(
        "INSERT INTO idx_string (rid, res_type, param, folded, raw) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut reference =
        conn.prepare_cached("INSERT INTO idx_reference (rid, res_type, param, target_type, target_id) VALUES (?1, ?2, ?3, ?4, ?5)")?;
    let mut date = conn.prepare_cached(
        "INSERT INTO idx_date (rid, res_type, param, low, high) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for def in params_for(resource_type) {
        for value in extract(resource, def) {
            match value {
                IndexValue::Token { system, code } => {
                    token.execute(params![rid, resource_type, def.name, system, code])?;
                }
                IndexValue::Uri(uri) => {
                    token.execute(params![
                        rid,
                        resource_type,
                        def.name,
                        Option::<String>::None,
                        uri
                    ])?;
                }
                IndexValue::String { folded, raw } => {
                    string.execute(params![rid, resource_type, def.name, folded, raw])?;
                }
                IndexValue::Reference {
                    target_type,
                    target_id,
                } => {
                    reference.execute(params![
                        rid,
                        resource_type,
                        def.name,
                        target_type,
                        target_id
                    ])?;
                }
                IndexValue::Date { low, high } => {
                    date.execute(params![rid, resource_type, def.name, low, high])?;
                }
            }
        }
    }
    Ok(())
}
