//! Search in the embedded store: parameters parsed against the search
//! parameter table, planned into SQL over the `idx_*` tables, keyset
//! paging (so pages stay correct while other writes happen), totals, and
//! `_include` / `_revinclude`.

use std::collections::HashSet;

use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, params_from_iter};

use super::rows::stored_from_parts;
use crate::fhir::extract::{IndexValue, date_range, fold, parse_reference};
use crate::fhir::search_params::{self, IncludeDef, ParamKind, SearchParamDef, find_include};
use crate::store::{SearchPage, StoreError, StoreResult, StoredResource};

pub const DEFAULT_COUNT: usize = 50;
pub const MAX_COUNT: usize = 1000;
const MAX_INCLUDE_ITERATIONS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sort {
    Default,
    LastUpdated { descending: bool },
    Name { descending: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Total {
    Accurate,
    None,
}

/// A search made ready for SQL.
pub struct PlannedSearch {
    resource_type: String,
    conditions: Vec<String>,
    binds: Vec<SqlValue>,
    count: usize,
    sort: Sort,
    total: Total,
    summary_count: bool,
    includes: Vec<(&'static IncludeDef, bool)>,
    rev_includes: Vec<(&'static IncludeDef, bool)>,
    pub ignored: Vec<String>,
}

fn invalid(message: String) -> StoreError {
    StoreError::Invalid(message)
}

/// Split a parameter value on unescaped commas (`\,` is a literal comma).
fn split_or_values(value: &str) -> Vec<String> {
    let mut values = Vec::new();
    let mut current = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if matches!(chars.peek(), Some(',') | Some('\\') | Some('|') | Some('$')) => {
                current.push(chars.next().unwrap_or('\\'));
            }
            ',' => values.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    values.push(current);
    values
}

const PREFIXES: &[&str] = &["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"];

fn split_prefix(value: &str) -> (&str, &str) {
    if value.len() > 2
        && value.is_char_boundary(2)
        && PREFIXES.contains(&&value[..2])
        && !value[2..].starts_with(|c: char| c.is_ascii_alphabetic())
    {
        (&value[..2], &value[2..])
    } else {
        ("eq", value)
    }
}

/// SQL for a date comparison between a target range (`lo`, `hi` column
/// expressions) and the range of the searched value.
fn date_condition(
    prefix: &str,
    lo: &str,
    hi: &str,
    binds: &mut Vec<SqlValue>,
    p_lo: i64,
    p_hi: i64,
) -> String {
    let mut bind = |v: i64| {
        binds.push(SqlValue::Integer(v));
        "?".to_string()
    };
    match prefix {
        "eq" => format!("({lo} >= {} AND {hi} <= {})", bind(p_lo), bind(p_hi)),
        "ne" => format!("NOT ({lo} >= {} AND {hi} <= {})", bind(p_lo), bind(p_hi)),
        "gt" => format!("{hi} > {}", bind(p_hi)),
        "ge" => format!("{hi} > {}", bind(p_lo)),
        "lt" => format!("{lo} < {}", bind(p_lo)),
        "le" => format!("{lo} < {}", bind(p_hi)),
        "sa" => format!("{lo} >= {}", bind(p_hi)),
        _ /* eb */ => format!("{hi} <= {}", bind(p_lo)),
    }
}

fn parse_date_value(name: &str, raw: &str) -> StoreResult<(&'static str, i64, i64)> {
    let (prefix, text) = split_prefix(raw);
    let (lo, hi) = date_range(text).ok_or_else(|| invalid(format!("'{raw}' is not a valid date for search parameter '{name}' (use e.g. ge2024-01-01 or 2024-01-01T10:00:00Z)")))?;
    let prefix = PREFIXES
        .iter()
        .find(|p| **p == prefix)
        .copied()
        .unwrap_or("eq");
    Ok((prefix, lo, hi))
}

fn subquery(
    table: &str,
    binds: &mut Vec<SqlValue>,
    resource_type: &str,
    param: &str,
    extra: &str,
) -> String {
    binds.push(SqlValue::Text(resource_type.to_string()));
    binds.push(SqlValue::Text(param.to_string()));
    format!("SELECT rid FROM {table} WHERE res_type = ? AND param = ?{extra}")
}

fn table_for(kind: ParamKind) -> &'static str {
    match kind {
        ParamKind::Token | ParamKind::Uri => "idx_token",
        ParamKind::String => "idx_string",
        ParamKind::Reference => "idx_reference",
        ParamKind::Date => "idx_date",
    }
}

/// One `name[:modifier]=v1,v2` occurrence as an SQL condition (values OR'ed).
fn condition_for(
    resource_type: &str,
    def: &SearchParamDef,
    modifier: Option<&str>,
    value: &str,
    binds: &mut Vec<SqlValue>,
) -> StoreResult<String> {
    let name = def.name;
    if modifier == Some("missing") {
        let missing = match value {
            "true" => true,
            "false" => false,
            _ => {
                return Err(invalid(format!(
                    "{name}:missing takes true or false, not '{value}'"
                )));
            }
        };
        return Ok(match name {
            "_id" | "_lastUpdated" => {
                if missing {
                    "0".into()
                } else {
                    "1".into()
                }
            }
            _ => {
                let sub = subquery(table_for(def.kind), binds, resource_type, name, "");
                format!("r.rid {} ({sub})", if missing { "NOT IN" } else { "IN" })
            }
        });
    }
    let values = split_or_values(value);
    if values.iter().any(|v| v.is_empty()) {
        return Err(invalid(format!(
            "search parameter '{name}' has an empty value"
        )));
    }
    let mut alternatives = Vec::with_capacity(values.len());

    if name == "_id" {
        if modifier.is_some() {
            return Err(invalid(format!(
                "modifier ':{}' is not supported on _id",
                modifier.unwrap_or_default()
            )));
        }
        // Through the (res_type, res_id) index: a plain condition on
        // r.res_id let SQLite scan every resource of the type instead.
        binds.push(SqlValue::Text(resource_type.to_string()));
        for v in &values {
            binds.push(SqlValue::Text(v.clone()));
            alternatives.push("?".to_string());
        }
        return Ok(format!(
            "r.rid IN (SELECT rid FROM resources WHERE res_type = ? AND res_id IN ({}))",
            alternatives.join(", ")
        ));
    }
    if name == "_lastUpdated" {
        if modifier.is_some() {
            return Err(invalid(
                "modifiers are not supported on _lastUpdated".into(),
            ));
        }
        for v in &values {
            let (prefix, lo, hi) = parse_date_value(name, v)?;
            alternatives.push(date_condition(
                prefix,
                "r.last_updated_ms",
                "(r.last_updated_ms + 1)",
                binds,
                lo,
                hi,
            ));
        }
        return Ok(format!("({})", alternatives.join(" OR ")));
    }

    let negate = modifier == Some("not");
    for v in &values {
        let condition = match def.kind {
            ParamKind::Token | ParamKind::Uri => {
                if !matches!(modifier, None | Some("not")) {
                    return Err(invalid(format!(
                        "modifier ':{}' is not supported on token parameter '{name}' (supported: missing, not)",
                        modifier.unwrap_or_default()
                    )));
                }
                let (extra, code_binds) = match (def.kind, v.split_once('|')) {
                    (ParamKind::Token, Some(("", code))) => (
                        " AND code = ? AND system IS NULL".to_string(),
                        vec![code.to_string()],
                    ),
                    (ParamKind::Token, Some((system, ""))) => {
                        (" AND system = ?".to_string(), vec![system.to_string()])
                    }
                    (ParamKind::Token, Some((system, code))) => (
                        " AND code = ? AND system = ?".to_string(),
                        vec![code.to_string(), system.to_string()],
                    ),
                    _ => (" AND code = ?".to_string(), vec![v.clone()]),
                };
                let sub = subquery("idx_token", binds, resource_type, name, &extra);
                binds.extend(code_binds.into_iter().map(SqlValue::Text));
                sub
            }
            ParamKind::String => {
                let folded = fold(v);
                match modifier {
                    None => {
                        let sub = subquery(
                            "idx_string",
                            binds,
                            resource_type,
                            name,
                            " AND folded >= ? AND folded < ?",
                        );
                        binds.push(SqlValue::Text(folded.clone()));
                        binds.push(SqlValue::Text(format!("{folded}\u{10FFFF}")));
                        sub
                    }
                    Some("exact") => {
                        let sub = subquery(
                            "idx_string",
                            binds,
                            resource_type,
                            name,
                            " AND folded = ? AND raw = ?",
                        );
                        binds.push(SqlValue::Text(folded));
                        binds.push(SqlValue::Text(v.clone()));
                        sub
                    }
                    Some("contains") => {
                        let sub = subquery(
                            "idx_string",
                            binds,
                            resource_type,
                            name,
                            " AND instr(folded, ?) > 0",
                        );
                        binds.push(SqlValue::Text(folded));
                        sub
                    }
                    Some(other) => {
                        return Err(invalid(format!(
                            "modifier ':{other}' is not supported on string parameter '{name}' (supported: exact, contains, missing)"
                        )));
                    }
                }
            }
            ParamKind::Reference => {
                let type_modifier = match modifier {
                    None => None,
                    Some(t) if crate::fhir::resource_types::looks_like_type_name(t) => Some(t),
                    Some(other) => {
                        return Err(invalid(format!(
                            "modifier ':{other}' is not supported on reference parameter '{name}' (supported: a resource type, missing)"
                        )));
                    }
                };
                let (target_type, target_id) = match parse_reference(v) {
                    Some(IndexValue::Reference {
                        target_type,
                        target_id,
                    }) => (target_type, target_id),
                    _ => {
                        return Err(invalid(format!(
                            "'{v}' is not a reference for search parameter '{name}' (use Type/id or id)"
                        )));
                    }
                };
                let target_type = target_type.or(type_modifier.map(str::to_string));
                match target_type {
                    Some(t) => {
                        let sub = subquery(
                            "idx_reference",
                            binds,
                            resource_type,
                            name,
                            " AND target_id = ? AND (target_type = ? OR target_type IS NULL)",
                        );
                        binds.push(SqlValue::Text(target_id));
                        binds.push(SqlValue::Text(t));
                        sub
                    }
                    None => {
                        let sub = subquery(
                            "idx_reference",
                            binds,
                            resource_type,
                            name,
                            " AND target_id = ?",
                        );
                        binds.push(SqlValue::Text(target_id));
                        sub
                    }
                }
            }
            ParamKind::Date => {
                if modifier.is_some() {
                    return Err(invalid(format!(
                        "modifiers are not supported on date parameter '{name}'"
                    )));
                }
                let (prefix, lo, hi) = parse_date_value(name, v)?;
                let sub = subquery("idx_date", binds, resource_type, name, "");
                let cond = date_condition(prefix, "low", "high", binds, lo, hi);
                format!("{sub} AND {cond}")
            }
        };
        alternatives.push(condition);
    }
    // One subquery for all the values (`a,b,c`): SQLite then probes each
    // resource once, where an OR of one `IN` per value probed each
    // resource once per value (50 values over 30,000 roles: 40 ms).
    let joined = format!("(r.rid IN ({}))", alternatives.join(" UNION ALL "));
    Ok(if negate {
        format!("NOT {joined}")
    } else {
        joined
    })
}

fn parse_include(value: &str, reverse: bool, resource_type: &str) -> Option<&'static IncludeDef> {
    let mut parts = value.split(':');
    let source = parts.next()?;
    let param = parts.next()?;
    let target = parts.next();
    let def = find_include(source, param)?;
    if let Some(t) = target
        && !def.targets.contains(&t)
    {
        return None;
    }
    let applies = if reverse {
        def.targets.contains(&resource_type)
    } else {
        def.source == resource_type
    };
    applies.then_some(def)
}

/// Turn the client's parameters into a plan, or a 400 naming the problem.
pub fn plan(
    resource_type: &str,
    params: &[(String, String)],
    lenient: bool,
) -> StoreResult<PlannedSearch> {
    let mut plan = PlannedSearch {
        resource_type: resource_type.to_string(),
        conditions: Vec::new(),
        binds: Vec::new(),
        count: DEFAULT_COUNT,
        sort: Sort::Default,
        total: Total::Accurate,
        summary_count: false,
        includes: Vec::new(),
        rev_includes: Vec::new(),
        ignored: Vec::new(),
    };
    for (key, value) in params {
        let (name, modifier) = match key.split_once(':') {
            Some((n, m)) => (n, Some(m)),
            None => (key.as_str(), None),
        };
        match name {
            "_count" => {
                let n: usize = value.parse().map_err(|_| {
                    invalid(format!(
                        "_count must be a non-negative integer, not '{value}'"
                    ))
                })?;
                if n > MAX_COUNT {
                    if lenient {
                        plan.ignored
                            .push(format!("_count={value} (clamped to {MAX_COUNT})"));
                    } else {
                        return Err(invalid(format!(
                            "_count={n} is above the maximum page size of {MAX_COUNT}"
                        )));
                    }
                }
                plan.count = n.min(MAX_COUNT);
            }
            "_sort" => {
                plan.sort = match value.as_str() {
                    "_lastUpdated" => Sort::LastUpdated { descending: false },
                    "-_lastUpdated" => Sort::LastUpdated { descending: true },
                    "name" | "-name" if search_params::find(resource_type, "name").is_some() => {
                        Sort::Name {
                            descending: value.starts_with('-'),
                        }
                    }
                    _ => {
                        return Err(invalid(format!(
                            "_sort={value} is not supported; use _lastUpdated, -_lastUpdated, or name / -name on types with a name"
                        )));
                    }
                };
            }
            "_total" => {
                plan.total = match value.as_str() {
                    "none" => Total::None,
                    "accurate" | "estimate" => Total::Accurate,
                    _ => {
                        return Err(invalid(format!(
                            "_total must be none, estimate or accurate, not '{value}'"
                        )));
                    }
                };
            }
            "_summary" => match value.as_str() {
                "count" => plan.summary_count = true,
                "false" => {}
                _ => plan
                    .ignored
                    .push(format!("_summary={value} (full resources are returned)")),
            },
            "_include" | "_revinclude" => {
                let reverse = name == "_revinclude";
                let iterate = matches!(modifier, Some("iterate") | Some("recurse"));
                match parse_include(value, reverse, resource_type) {
                    Some(def) if reverse => plan.rev_includes.push((def, iterate)),
                    Some(def) => plan.includes.push((def, iterate)),
                    None if lenient => plan.ignored.push(format!("{key}={value}")),
                    None => {
                        return Err(invalid(format!(
                            "{name}={value} is not supported for {resource_type}; supported: {}",
                            search_params::INCLUDES
                                .iter()
                                .map(|i| format!("{}:{}", i.source, i.param))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )));
                    }
                }
            }
            "_format" | "_pretty" => {}
            "_elements" => plan
                .ignored
                .push(format!("_elements={value} (full resources are returned)")),
            _ => match search_params::find(resource_type, name) {
                Some(def) => {
                    let condition =
                        condition_for(resource_type, def, modifier, value, &mut plan.binds)?;
                    plan.conditions.push(condition);
                }
                None if lenient => plan.ignored.push(key.clone()),
                None => {
                    return Err(StoreError::UnknownSearchParameter {
                        resource_type: resource_type.to_string(),
                        name: key.clone(),
                        known: search_params::names_for(resource_type).join(", "),
                    });
                }
            },
        }
    }
    Ok(plan)
}

fn order_by(sort: Sort) -> &'static str {
    match sort {
        Sort::Default => "r.rid",
        Sort::LastUpdated { descending: false } => "r.last_updated_ms, r.rid",
        Sort::LastUpdated { descending: true } => "r.last_updated_ms DESC, r.rid DESC",
        Sort::Name { descending: false } => "r.sort_name, r.rid",
        Sort::Name { descending: true } => "r.sort_name DESC, r.rid DESC",
    }
}

fn keyset_condition(sort: Sort, cursor: &str, binds: &mut Vec<SqlValue>) -> StoreResult<String> {
    let bad = || {
        invalid(format!(
            "invalid paging cursor '{cursor}'; start again from the first page"
        ))
    };
    let (tag, rest) = cursor.split_at(cursor.find('.').ok_or_else(bad)?);
    let rest = &rest[1..];
    let (key, rid) = rest.rsplit_once('.').unwrap_or(("", rest));
    let rid: i64 = rid.parse().map_err(|_| bad())?;
    match (sort, tag) {
        (Sort::Default, "r") => {
            binds.push(SqlValue::Integer(rid));
            Ok("r.rid > ?".into())
        }
        (Sort::LastUpdated { descending }, "u") => {
            let ms: i64 = key.parse().map_err(|_| bad())?;
            let op = if descending { "<" } else { ">" };
            binds.extend([
                SqlValue::Integer(ms),
                SqlValue::Integer(ms),
                SqlValue::Integer(rid),
            ]);
            Ok(format!(
                "(r.last_updated_ms {op} ? OR (r.last_updated_ms = ? AND r.rid {op} ?))"
            ))
        }
        (Sort::Name { descending }, "n") => {
            let op = if descending { "<" } else { ">" };
            binds.extend([
                SqlValue::Text(key.to_string()),
                SqlValue::Text(key.to_string()),
                SqlValue::Integer(rid),
            ]);
            Ok(format!(
                "(r.sort_name {op} ? OR (r.sort_name = ? AND r.rid {op} ?))"
            ))
        }
        _ => Err(bad()),
    }
}

fn cursor_after(sort: Sort, rid: i64, last_updated_ms: i64, sort_name: &str) -> String {
    match sort {
        Sort::Default => format!("r.{rid}"),
        Sort::LastUpdated { .. } => format!("u.{last_updated_ms}.{rid}"),
        Sort::Name { .. } => format!("n.{sort_name}.{rid}"),
    }
}

/// Run a planned search: one page after `cursor`, its total and includes.
pub fn execute(
    conn: &Connection,
    plan: &PlannedSearch,
    cursor: Option<&str>,
) -> StoreResult<SearchPage> {
    let mut where_sql = String::from("r.res_type = ? AND r.deleted = 0");
    let mut binds = vec![SqlValue::Text(plan.resource_type.clone())];
    for condition in &plan.conditions {
        where_sql.push_str(" AND ");
        where_sql.push_str(condition);
    }
    binds.extend(plan.binds.iter().cloned());

    let count_total = |binds: &[SqlValue]| -> StoreResult<u64> {
        let sql = format!("SELECT count(*) FROM resources r WHERE {where_sql}");
        let n: i64 = conn
            .prepare(&sql)?
            .query_row(params_from_iter(binds.iter()), |row| row.get(0))?;
        Ok(n as u64)
    };
    if plan.summary_count || plan.count == 0 {
        let total = Some(count_total(&binds)?);
        return Ok(SearchPage {
            total,
            ignored_params: plan.ignored.clone(),
            ..Default::default()
        });
    }

    let mut page_binds = binds.clone();
    let mut page_where = where_sql.clone();
    if let Some(cursor) = cursor {
        let keyset = keyset_condition(plan.sort, cursor, &mut page_binds)?;
        page_where.push_str(" AND ");
        page_where.push_str(&keyset);
    }
    let sql = format!(
        "SELECT r.rid, r.res_id, r.version, r.last_updated_ms, r.sort_name, r.body FROM resources r WHERE {page_where} ORDER BY {} LIMIT {}",
        order_by(plan.sort),
        plan.count + 1
    );
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query(params_from_iter(page_binds.iter()))?;
    let mut matches = Vec::with_capacity(plan.count);
    let mut keys = Vec::with_capacity(plan.count);
    let mut has_more = false;
    while let Some(row) = rows.next()? {
        if matches.len() == plan.count {
            has_more = true;
            break;
        }
        let rid: i64 = row.get(0)?;
        let id: String = row.get(1)?;
        let version: i64 = row.get(2)?;
        let ms: i64 = row.get(3)?;
        let sort_name: String = row.get(4)?;
        let body: String = row.get(5)?;
        matches.push(stored_from_parts(
            &plan.resource_type,
            &id,
            version,
            ms,
            &body,
        )?);
        keys.push((rid, ms, sort_name));
    }
    let next_cursor = if has_more {
        keys.last()
            .map(|(rid, ms, name)| cursor_after(plan.sort, *rid, *ms, name))
    } else {
        None
    };
    // A first page that holds every match is its own total: no count query.
    let total = match plan.total {
        Total::None => None,
        Total::Accurate if cursor.is_none() && !has_more => Some(matches.len() as u64),
        Total::Accurate => Some(count_total(&binds)?),
    };
    let included = includes(conn, plan, &matches)?;
    Ok(SearchPage {
        total,
        matches,
        included,
        next_cursor,
        ignored_params: plan.ignored.clone(),
    })
}

fn fetch_current(
    conn: &Connection,
    resource_type: &str,
    id: &str,
) -> StoreResult<Option<StoredResource>> {
    match super::rows::read(conn, resource_type, id) {
        Ok(stored) => Ok(Some(stored)),
        Err(StoreError::NotFound { .. }) | Err(StoreError::Gone { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

fn includes(
    conn: &Connection,
    plan: &PlannedSearch,
    matches: &[StoredResource],
) -> StoreResult<Vec<StoredResource>> {
    if plan.includes.is_empty() && plan.rev_includes.is_empty() {
        return Ok(Vec::new());
    }
    let mut seen: HashSet<(String, String)> = matches
        .iter()
        .map(|m| (m.resource_type.clone(), m.id.clone()))
        .collect();
    let mut included: Vec<StoredResource> = Vec::new();
    let mut frontier: Vec<StoredResource> = matches.to_vec();
    for round in 0..MAX_INCLUDE_ITERATIONS {
        let mut found = Vec::new();
        for (def, iterate) in &plan.includes {
            if round > 0 && !iterate {
                continue;
            }
            let mut stmt = conn.prepare_cached(
                "SELECT x.target_type, x.target_id FROM idx_reference x JOIN resources r ON r.rid = x.rid
                 WHERE r.res_type = ?1 AND r.res_id = ?2 AND x.param = ?3",
            )?;
            for source in frontier.iter().filter(|s| s.resource_type == def.source) {
                let targets: Vec<(Option<String>, String)> = stmt
                    .query_map(
                        rusqlite::params![source.resource_type, source.id, def.param],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )?
                    .collect::<Result<_, _>>()?;
                for (target_type, target_id) in targets {
                    let Some(target_type) =
                        target_type.filter(|t| def.targets.contains(&t.as_str()))
                    else {
                        continue;
                    };
                    if seen.insert((target_type.clone(), target_id.clone()))
                        && let Some(stored) = fetch_current(conn, &target_type, &target_id)?
                    {
                        found.push(stored);
                    }
                }
            }
        }
        for (def, iterate) in &plan.rev_includes {
            if round > 0 && !iterate {
                continue;
            }
            let mut stmt = conn.prepare_cached(
                "SELECT r.res_id, r.version, r.last_updated_ms, r.body FROM idx_reference x JOIN resources r ON r.rid = x.rid
                 WHERE x.res_type = ?1 AND x.param = ?2 AND x.target_id = ?3 AND (x.target_type = ?4 OR x.target_type IS NULL) AND r.deleted = 0",
            )?;
            for target in frontier
                .iter()
                .filter(|t| def.targets.contains(&t.resource_type.as_str()))
            {
                let rows: Vec<(String, i64, i64, String)> = stmt
                    .query_map(
                        rusqlite::params![def.source, def.param, target.id, target.resource_type],
                        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
                    )?
                    .collect::<Result<_, _>>()?;
                for (id, version, ms, body) in rows {
                    if seen.insert((def.source.to_string(), id.clone())) {
                        found.push(stored_from_parts(def.source, &id, version, ms, &body)?);
                    }
                }
            }
        }
        if found.is_empty() {
            break;
        }
        included.extend(found.iter().cloned());
        frontier = found;
    }
    Ok(included)
}

/// Parse a query string (`a=1&b=2`) into pairs.
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.trim_start_matches('?').as_bytes())
        .into_owned()
        .collect()
}

/// Search inside a write transaction (conditional create/update/references):
/// up to `limit` matching ids.
pub fn matching_ids(
    conn: &Connection,
    resource_type: &str,
    query: &str,
    limit: usize,
) -> StoreResult<Vec<String>> {
    let params = parse_query(query);
    if params.is_empty() {
        return Err(invalid(format!(
            "the condition on {resource_type} is empty"
        )));
    }
    let mut plan = plan(resource_type, &params, false)?;
    plan.count = limit;
    plan.total = Total::None;
    plan.includes.clear();
    plan.rev_includes.clear();
    Ok(execute(conn, &plan, None)?
        .matches
        .into_iter()
        .map(|m| m.id)
        .collect())
}

/// The single resource matching a condition (`None` if none; several is
/// `MultipleMatches`). Used by conditional create, update, delete and
/// conditional references.
pub fn resolve_single(
    conn: &Connection,
    resource_type: &str,
    query: &str,
) -> StoreResult<Option<String>> {
    let mut ids = matching_ids(conn, resource_type, query, 2)?;
    match ids.len() {
        0 | 1 => Ok(ids.pop()),
        _ => Err(StoreError::MultipleMatches(format!(
            "the condition {resource_type}?{query} matches more than one resource"
        ))),
    }
}

/// The id a conditional update writes: the one match, or (no match) the
/// body's id or a new UUID. A body id that names another resource than the
/// match is refused.
pub fn conditional_update_target(
    conn: &Connection,
    resource_type: &str,
    query: &str,
    resource: &serde_json::Value,
) -> StoreResult<String> {
    let body_id = resource.get("id").and_then(serde_json::Value::as_str);
    match resolve_single(conn, resource_type, query)? {
        Some(id) => match body_id {
            Some(body_id) if body_id != id => Err(StoreError::Invalid(format!(
                "the id '{body_id}' in the body does not match {resource_type}/{id} found by {query}"
            ))),
            _ => Ok(id),
        },
        None => Ok(body_id
            .map(str::to_string)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_split_unless_escaped() {
        assert_eq!(split_or_values("a,b"), vec!["a", "b"]);
        assert_eq!(split_or_values("a\\,b"), vec!["a,b"]);
    }

    #[test]
    fn prefixes_are_recognised_only_before_a_date() {
        assert_eq!(split_prefix("ge2024"), ("ge", "2024"));
        assert_eq!(split_prefix("2024"), ("eq", "2024"));
        assert_eq!(split_prefix("ge"), ("eq", "ge"));
    }

    #[test]
    fn unknown_parameter_is_rejected_unless_lenient() {
        let params = vec![("shoe-size".to_string(), "9".to_string())];
        assert!(matches!(
            plan("Practitioner", &params, false),
            Err(StoreError::UnknownSearchParameter { .. })
        ));
        assert_eq!(
            plan("Practitioner", &params, true).unwrap().ignored,
            vec!["shoe-size"]
        );
    }

    #[test]
    fn oversize_count_is_rejected_or_clamped() {
        let params = vec![("_count".to_string(), "100000".to_string())];
        assert!(plan("Patient", &params, false).is_err());
        assert_eq!(plan("Patient", &params, true).unwrap().count, MAX_COUNT);
    }
}
