//! The contact index: one searchable document per person, for targeting
//! (docs/contact-index.md). Owns the `ContactIndex` contract, the document
//! and query types, and the index errors; `document` builds documents from
//! the FHIR store (the source of truth, so an index can always be rebuilt),
//! `tantivy` is the embedded backend and `elasticsearch` the one for
//! national scale.

pub mod document;
pub mod elasticsearch;
pub mod tantivy;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::{IndexBackendKind, IndexSettings};

/// Why the index could not answer.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// A filter or `by` value the index cannot use; names the parameter.
    #[error("{parameter}: {reason}")]
    BadQuery { parameter: String, reason: String },
    /// The index itself failed (disk, corrupt segment, lock).
    #[error("contact index: {0}")]
    Backend(String),
    /// The `[index]` settings cannot be used.
    #[error("{0}")]
    Config(String),
}

/// What `mhero check` reports of the configured index (nothing is
/// created or locked).
pub async fn describe_index(settings: &IndexSettings) -> Result<String, IndexError> {
    match settings.backend {
        IndexBackendKind::Embedded => tantivy::TantivyIndex::describe(&settings.embedded.path),
        IndexBackendKind::Elasticsearch => {
            elasticsearch::ElasticsearchIndex::describe(&settings.elasticsearch).await
        }
    }
}

/// Opens the configured index.
pub async fn open_index(settings: &IndexSettings) -> Result<SharedIndex, IndexError> {
    match settings.backend {
        IndexBackendKind::Embedded => Ok(std::sync::Arc::new(tantivy::TantivyIndex::open(
            &settings.embedded.path,
        )?)),
        IndexBackendKind::Elasticsearch => Ok(std::sync::Arc::new(
            elasticsearch::ElasticsearchIndex::open(&settings.elasticsearch).await?,
        )),
    }
}

/// A place the person works at or under: the facility first, then each
/// ancestor through `Location.partOf`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaceRef {
    pub id: String,
    pub name: String,
    /// `facility`, `district`, `region`, `country`, or `other`.
    pub level: String,
}

/// A job held through an active PractitionerRole, with its cadre from the
/// job CodeSystem (iHRIS's `cadre` property) when known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRef {
    pub code: String,
    pub display: Option<String>,
    pub cadre: Option<String>,
    pub cadre_display: Option<String>,
}

/// The outbox entry (`Communication`) to the person updated most
/// recently: what officials see as "the last message" and its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastMessage {
    pub communication: String,
    /// `preparation`, `in-progress`, `completed`, `not-done` or `stopped`.
    pub status: String,
    pub updated: DateTime<Utc>,
}

/// One person, as the index keeps them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactDocument {
    /// `Practitioner/<id>`, …: the document's key.
    pub reference: String,
    pub resource_type: String,
    pub id: String,
    pub name: Option<String>,
    /// Every name (given and family parts and texts) for search.
    pub names: Vec<String>,
    /// E.164 numbers.
    pub phones: Vec<String>,
    /// URN schemes the person can be reached on (`tel`, `whatsapp`).
    pub urn_schemes: Vec<String>,
    pub language: Option<String>,
    pub gender: Option<String>,
    pub active: bool,
    pub opted_out: bool,
    pub rapidpro_contact: Option<String>,
    /// `linked` (a RapidPro contact is known), `pending` (reachable, not
    /// yet synced) or `unreachable` (no usable number or URN: never synced).
    #[serde(default)]
    pub sync_state: String,
    /// Numbers of the person the contact sync could not use (not valid
    /// for `phone.default_country`); the contact sync status says which.
    #[serde(default)]
    pub invalid_phones: usize,
    pub jobs: Vec<JobRef>,
    /// Facilities and everything above them.
    pub places: Vec<PlaceRef>,
    /// Organization ids of the person's roles.
    pub organizations: Vec<String>,
    /// Group ids the person is a member of.
    pub groups: Vec<String>,
    #[serde(default)]
    pub last_message: Option<LastMessage>,
    /// When the person's latest reply was received.
    #[serde(default)]
    pub last_reply: Option<DateTime<Utc>>,
}

impl ContactDocument {
    /// `reachable`, `opted-out`, `inactive` or `no-phone` (the `status`
    /// statistic).
    pub fn status(&self) -> &'static str {
        if !self.active {
            "inactive"
        } else if self.opted_out {
            "opted-out"
        } else if self.phones.is_empty() {
            "no-phone"
        } else {
            "reachable"
        }
    }

    /// The cadres counted by the `cadre` statistic: each once, sorted;
    /// `unknown` for none.
    pub fn counted_cadres(&self) -> Vec<&str> {
        let mut cadres: Vec<&str> = self
            .jobs
            .iter()
            .filter_map(|j| j.cadre.as_deref())
            .collect();
        cadres.sort_unstable();
        cadres.dedup();
        if cadres.is_empty() {
            cadres.push(UNKNOWN);
        }
        cadres
    }

    /// The value counted by a statistic other than `cadre` (`unknown` when
    /// the person has none).
    pub fn counted(&self, by: StatsBy) -> &str {
        match by {
            StatsBy::Region => self.place_at("region"),
            StatsBy::District => self.place_at("district"),
            StatsBy::Gender => self.gender.as_deref(),
            StatsBy::Status => Some(self.status()),
            StatsBy::Cadre => self.counted_cadres().first().copied(),
        }
        .unwrap_or(UNKNOWN)
    }

    /// Every ending of 4 digits or more of each phone number's digits: what
    /// `q` matches a number by.
    pub fn phone_endings(&self) -> Vec<String> {
        self.phones.iter().flat_map(|p| phone_endings(p)).collect()
    }

    /// The name of the first place at `level`.
    pub fn place_at(&self, level: &str) -> Option<&str> {
        self.places
            .iter()
            .find(|p| p.level == level)
            .map(|p| p.name.as_str())
    }
}

/// A person without a value for a statistic counts under this key.
pub const UNKNOWN: &str = "unknown";

/// Every ending of 4 digits or more of the number's digits.
pub fn phone_endings(phone: &str) -> Vec<String> {
    let digits: String = phone.chars().filter(char::is_ascii_digit).collect();
    (0..digits.len().saturating_sub(3))
        .map(|start| digits[start..].to_string())
        .collect()
}

/// The digits `q` is looked up by among the phone endings, if `q` is a
/// number of 4 digits or more (a national trunk 0 dropped: `0770…` is not
/// in E.164); `None` for a name search.
pub fn phone_digits(q: &str) -> Option<String> {
    let only_number = q
        .chars()
        .all(|c| c.is_ascii_digit() || " +-().".contains(c));
    let digits: String = q.chars().filter(char::is_ascii_digit).collect();
    let digits = digits.trim_start_matches('0');
    (only_number && digits.len() >= 4).then(|| digits.to_string())
}

/// The edit distance a name word of `q` is matched within: 0 up to 3
/// letters, 1 up to 6, 2 beyond.
pub fn fuzzy_distance(word: &str) -> u8 {
    match word.chars().count() {
        0..=3 => 0,
        4..=6 => 1,
        _ => 2,
    }
}

/// Filters of a contact search (`GET /api/contacts`); every one given must
/// hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContactQuery {
    /// Fuzzy on names; digits (4 or more) match the end of a phone number.
    pub q: Option<String>,
    pub resource_type: Option<String>,
    /// Cadre code (`nurse`) or a job code.
    pub cadre: Option<String>,
    pub job: Option<String>,
    /// A Location id: the place and everything below it.
    pub location: Option<String>,
    pub group: Option<String>,
    pub opted_out: Option<bool>,
    pub has_phone: Option<bool>,
    /// Replied at or after this instant.
    pub replied_since: Option<DateTime<Utc>>,
    /// 0-based page.
    pub page: usize,
    pub page_size: usize,
}

/// The default and largest page size of `GET /api/contacts`.
pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 1000;

fn bad(parameter: &str, reason: impl Into<String>) -> IndexError {
    IndexError::BadQuery {
        parameter: parameter.to_string(),
        reason: reason.into(),
    }
}

fn parse_bool(parameter: &str, value: &str) -> Result<bool, IndexError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(bad(parameter, format!("{other:?} is not true or false"))),
    }
}

/// An instant (`2026-11-01T08:00:00Z`, with any offset) or a date
/// (`2026-11-01`, its start in UTC).
fn parse_instant(parameter: &str, value: &str) -> Result<DateTime<Utc>, IndexError> {
    if let Ok(at) = DateTime::parse_from_rfc3339(value) {
        return Ok(at.with_timezone(&Utc));
    }
    chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .ok_or_else(|| {
            bad(
                parameter,
                format!(
                    "{value:?} is not a date (2026-11-01) or an instant (2026-11-01T08:00:00Z)"
                ),
            )
        })
}

fn parse_page(parameter: &str, value: &str, max: usize) -> Result<usize, IndexError> {
    match value.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(bad(
            parameter,
            format!("{value:?} is not a whole number from 1 to {max}"),
        )),
    }
}

/// The filter names of `GET /api/contacts` (and `stats`, `audience`).
pub const FILTERS: &[&str] = &[
    "q",
    "type",
    "cadre",
    "job",
    "location",
    "group",
    "opted_out",
    "has_phone",
    "replied_since",
];

impl ContactQuery {
    /// Reads the filters (and, with `paging`, `page` (1-based) and
    /// `page_size`) from query parameters. `extra` names other parameters
    /// the caller reads itself. An unknown or repeated parameter is refused,
    /// naming it: a mistyped filter must not widen an audience to everyone.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
        paging: bool,
        extra: &[&str],
    ) -> Result<ContactQuery, IndexError> {
        let mut query = ContactQuery {
            page_size: DEFAULT_PAGE_SIZE,
            ..Default::default()
        };
        let mut seen: Vec<&str> = Vec::new();
        for (name, value) in pairs {
            if seen.contains(&name) {
                return Err(bad(name, "is given twice; give it once"));
            }
            seen.push(name);
            let value = value.trim();
            let text = || (!value.is_empty()).then(|| value.to_string());
            match name {
                "q" => query.q = text(),
                "type" => {
                    if !crate::pipeline::contact::PERSON_TYPES.contains(&value) {
                        return Err(bad(
                            name,
                            format!(
                                "{value:?} is not a person type; use {}",
                                crate::pipeline::contact::PERSON_TYPES.join(", ")
                            ),
                        ));
                    }
                    query.resource_type = text();
                }
                "cadre" => query.cadre = text(),
                "job" => query.job = text(),
                "location" => query.location = text(),
                "group" => query.group = text(),
                "opted_out" => query.opted_out = Some(parse_bool(name, value)?),
                "has_phone" => query.has_phone = Some(parse_bool(name, value)?),
                "replied_since" => query.replied_since = Some(parse_instant(name, value)?),
                "page" if paging => query.page = parse_page(name, value, usize::MAX)? - 1,
                "page_size" if paging => query.page_size = parse_page(name, value, MAX_PAGE_SIZE)?,
                _ if extra.contains(&name) => {}
                _ => {
                    let mut known: Vec<&str> = FILTERS.to_vec();
                    if paging {
                        known.extend(["page", "page_size"]);
                    }
                    known.extend(extra);
                    return Err(bad(
                        name,
                        format!("is not a contact filter; use {}", known.join(", ")),
                    ));
                }
            }
        }
        Ok(query)
    }

    /// The filters as a query string (`cadre=nurse&location=BRB`), in
    /// `FILTERS` order: what an audience Group records.
    pub fn filters_query_string(&self) -> String {
        let mut out = url::form_urlencoded::Serializer::new(String::new());
        let flag = |v: Option<bool>| v.map(|b| b.to_string());
        let values = [
            self.q.clone(),
            self.resource_type.clone(),
            self.cadre.clone(),
            self.job.clone(),
            self.location.clone(),
            self.group.clone(),
            flag(self.opted_out),
            flag(self.has_phone),
            self.replied_since
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        ];
        for (name, value) in FILTERS.iter().zip(values) {
            if let Some(value) = value {
                out.append_pair(name, &value);
            }
        }
        out.finish()
    }
}

/// What `stats` counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsBy {
    Cadre,
    Region,
    District,
    Gender,
    Status,
}

impl StatsBy {
    pub fn parse(value: &str) -> Result<StatsBy, IndexError> {
        Ok(match value {
            "cadre" => StatsBy::Cadre,
            "region" => StatsBy::Region,
            "district" => StatsBy::District,
            "gender" => StatsBy::Gender,
            "status" => StatsBy::Status,
            other => {
                return Err(IndexError::BadQuery {
                    parameter: "by".into(),
                    reason: format!(
                        "{other:?} is not a statistic; use cadre, region, district, gender or status"
                    ),
                });
            }
        })
    }
}

/// A page of matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContactPage {
    pub total: usize,
    pub contacts: Vec<ContactDocument>,
}

/// The searchable contacts. Writes are visible to searches after
/// `commit`.
#[async_trait::async_trait]
pub trait ContactIndex: Send + Sync {
    /// Adds or replaces documents (by `reference`).
    async fn upsert(&self, documents: Vec<ContactDocument>) -> Result<(), IndexError>;
    /// Removes documents by reference.
    async fn delete(&self, references: Vec<String>) -> Result<(), IndexError>;
    /// Removes everything.
    async fn clear(&self) -> Result<(), IndexError>;
    /// Makes the writes so far durable and searchable. `checkpoint`, when
    /// given, records that every store change up to that instant is in
    /// the index (kept with the commit, so the two cannot disagree after a
    /// crash); `None` keeps the previous checkpoint.
    async fn commit(&self, checkpoint: Option<DateTime<Utc>>) -> Result<(), IndexError>;
    /// The checkpoint of the last commit; `None` for an index never built.
    async fn checkpoint(&self) -> Result<Option<DateTime<Utc>>, IndexError>;
    async fn search(&self, query: &ContactQuery) -> Result<ContactPage, IndexError>;
    /// The references of every match (paging ignored), read from one
    /// snapshot of the index, in reference order.
    async fn references(&self, query: &ContactQuery) -> Result<Vec<String>, IndexError>;
    /// Counts of the matches by `by` (a person with two cadres counts
    /// under each; one without under `unknown`).
    async fn stats(
        &self,
        query: &ContactQuery,
        by: StatsBy,
    ) -> Result<BTreeMap<String, u64>, IndexError>;
    async fn count(&self) -> Result<u64, IndexError>;
    /// `embedded` or `elasticsearch`, for `/health/ready` and logs.
    fn backend_name(&self) -> &'static str;
}

/// A shared handle on the configured index.
pub type SharedIndex = std::sync::Arc<dyn ContactIndex>;
