//! The contact index: one searchable document per person, for targeting
//! (docs/contact-index.md). Owns the `ContactIndex` contract, the document
//! and query types, and the index errors; `document` builds documents from
//! the FHIR store (the source of truth, so an index can always be rebuilt),
//! `tantivy` is the embedded backend.

pub mod document;
pub mod tantivy;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Why the index could not answer.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// A filter or `by` value the index cannot use; names the parameter.
    #[error("{parameter}: {reason}")]
    BadQuery { parameter: String, reason: String },
    /// The index itself failed (disk, corrupt segment, lock).
    #[error("contact index: {0}")]
    Backend(String),
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
    pub jobs: Vec<JobRef>,
    /// Facilities and everything above them.
    pub places: Vec<PlaceRef>,
    /// Organization ids of the person's roles.
    pub organizations: Vec<String>,
    /// Group ids the person is a member of.
    pub groups: Vec<String>,
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

    /// The name of the first place at `level`.
    pub fn place_at(&self, level: &str) -> Option<&str> {
        self.places
            .iter()
            .find(|p| p.level == level)
            .map(|p| p.name.as_str())
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
    /// 0-based page.
    pub page: usize,
    pub page_size: usize,
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
    /// Makes the writes so far durable and searchable.
    async fn commit(&self) -> Result<(), IndexError>;
    async fn search(&self, query: &ContactQuery) -> Result<ContactPage, IndexError>;
    /// Counts of the matches by `by` (a person with two cadres counts
    /// under each; one without under `unknown`).
    async fn stats(
        &self,
        query: &ContactQuery,
        by: StatsBy,
    ) -> Result<BTreeMap<String, u64>, IndexError>;
    async fn count(&self) -> Result<u64, IndexError>;
}
