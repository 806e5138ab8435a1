//! RapidPro flows -> FHIR `Basic` (mHero's "mHeroWorkflows", which iHRIS
//! lists as the workflows it can send). This module owns that Basic's
//! shape: id = flow UUID, the `mhero-workflows` profile, `Basic.code`
//! `mhero-resource#mHeroWorkflows`, and the `mhero-workflows-details`
//! extension (emNutt's sub-extensions plus `status`: `active`, `archived`,
//! or `deleted` for a flow RapidPro no longer lists; such a Basic is kept,
//! never deleted). A pass reads every flow, compares with the Basics in
//! the store and writes only what changed, in transaction Bundles of at
//! most [`WRITE_CHUNK`] entries; what it writes depends only on RapidPro's
//! answer, so an unchanged flow never makes a new version. See
//! `docs/flows.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use indicatif::ProgressBar;
use serde_json::{Value, json};

use super::runner::Job;
use crate::fhir::profiles::{
    RESOURCE_CODE_SYSTEM, RUN_SUMMARY_EXTENSION, WORKFLOWS_CODE, WORKFLOWS_DETAILS_EXTENSION,
    WORKFLOWS_PROFILE,
};
use crate::fhir::resource_types::is_valid_id;
use crate::rapidpro::client::{RapidProClient, RapidProError, TimeQuery};
use crate::rapidpro::types::Flow;
use crate::store::{FhirStore, SharedStore, StoreError, search_all};

/// Entries per transaction Bundle.
pub const WRITE_CHUNK: usize = 250;

/// The `status` sub-extension of `mhero-workflows-details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowStatus {
    Active,
    Archived,
    /// RapidPro no longer lists the flow.
    Deleted,
}

impl FlowStatus {
    pub fn code(self) -> &'static str {
        match self {
            FlowStatus::Active => "active",
            FlowStatus::Archived => "archived",
            FlowStatus::Deleted => "deleted",
        }
    }
}

/// Why a pass could not run; nothing is written when it fails.
#[derive(Debug, thiserror::Error)]
pub enum FlowSyncError {
    #[error("cannot read the flows from RapidPro: {0}")]
    RapidPro(#[from] RapidProError),
    #[error("FHIR store: {0}")]
    Store(#[from] StoreError),
}

/// One pass.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlowSyncReport {
    /// Flows RapidPro listed.
    pub examined: usize,
    /// Basics written for the first time.
    pub created: usize,
    /// Basics changed (name, counts, archived, ... or a flow back again).
    pub updated: usize,
    /// Basics already up to date: nothing written.
    pub unchanged: usize,
    /// Of the flows listed, how many are archived.
    pub archived: usize,
    /// Basics newly marked `deleted` (their flow is gone from RapidPro).
    pub deleted: usize,
    /// Flows whose UUID cannot be a FHIR id (not written).
    pub skipped: Vec<String>,
}

impl fmt::Display for FlowSyncReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "flows: {} read from RapidPro ({} archived): {} created, {} updated, {} unchanged; {} marked deleted; {} skipped",
            self.examined,
            self.archived,
            self.created,
            self.updated,
            self.unchanged,
            self.deleted,
            self.skipped.len()
        )?;
        for skipped in &self.skipped {
            writeln!(f, "  skipped: {skipped}")?;
        }
        Ok(())
    }
}

/// FHIR `dateTime` of a RapidPro time (UTC, RapidPro's precision kept).
fn date_time(instant: &DateTime<Utc>) -> String {
    instant.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// The Basic for a flow RapidPro lists.
pub fn workflow_basic(flow: &Flow) -> Value {
    let mut details = vec![
        json!({ "url": "name", "valueString": flow.name }),
        json!({ "url": "uuid", "valueString": flow.uuid }),
    ];
    if let Some(flow_type) = &flow.flow_type {
        details.push(json!({ "url": "flow_type", "valueString": flow_type.as_str() }));
    }
    details.push(json!({ "url": "archived", "valueBoolean": flow.archived }));
    if let Some(expires) = flow.expires.and_then(|e| i32::try_from(e).ok()) {
        details.push(json!({ "url": "expires", "valueInteger": expires }));
    }
    // FHIR integers are 32-bit; counts beyond that are capped.
    let count = |n: u64| i32::try_from(n).unwrap_or(i32::MAX);
    let runs = &flow.runs;
    details.push(json!({
        "url": RUN_SUMMARY_EXTENSION,
        "extension": [
            // RapidPro >= 7 counts runs waiting for a reply apart; iHRIS's
            // "active" means not yet ended, so both are counted here.
            { "url": "active", "valueInteger": count(runs.active.saturating_add(runs.waiting)) },
            { "url": "completed", "valueInteger": count(runs.completed) },
            { "url": "interrupted", "valueInteger": count(runs.interrupted) },
            { "url": "expired", "valueInteger": count(runs.expired) },
            { "url": "waiting", "valueInteger": count(runs.waiting) },
            { "url": "failed", "valueInteger": count(runs.failed) }
        ]
    }));
    if let Some(created) = &flow.created_on {
        details.push(json!({ "url": "created_on", "valueDateTime": date_time(created) }));
    }
    if let Some(modified) = &flow.modified_on {
        details.push(json!({ "url": "modified_on", "valueDateTime": date_time(modified) }));
    }
    let status = if flow.archived {
        FlowStatus::Archived
    } else {
        FlowStatus::Active
    };
    details.push(json!({ "url": "status", "valueCode": status.code() }));
    json!({
        "resourceType": "Basic",
        "id": flow.uuid,
        "meta": { "profile": [WORKFLOWS_PROFILE] },
        "code": {
            "coding": [{ "system": RESOURCE_CODE_SYSTEM, "code": WORKFLOWS_CODE }],
            "text": WORKFLOWS_CODE
        },
        "extension": [{ "url": WORKFLOWS_DETAILS_EXTENSION, "extension": details }]
    })
}

fn details_of(basic: &Value) -> Option<&Vec<Value>> {
    basic
        .get("extension")?
        .as_array()?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(WORKFLOWS_DETAILS_EXTENSION))?
        .get("extension")?
        .as_array()
}

/// The `status` a workflow Basic records (`None` if it has none).
pub fn workflow_status(basic: &Value) -> Option<&str> {
    details_of(basic)?
        .iter()
        .find(|s| s.get("url").and_then(Value::as_str) == Some("status"))?
        .get("valueCode")?
        .as_str()
}

/// A stored Basic marked `deleted` (everything else kept); `None` when it
/// already is, or is not a workflow Basic this module wrote.
fn marked_deleted(stored: &Value) -> Option<Value> {
    details_of(stored)?;
    if workflow_status(stored) == Some(FlowStatus::Deleted.code()) {
        return None;
    }
    let mut basic = owned_view(stored);
    let details = basic
        .get_mut("extension")?
        .as_array_mut()?
        .iter_mut()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(WORKFLOWS_DETAILS_EXTENSION))?
        .get_mut("extension")?
        .as_array_mut()?;
    details.retain(|s| s.get("url").and_then(Value::as_str) != Some("status"));
    details.push(json!({ "url": "status", "valueCode": FlowStatus::Deleted.code() }));
    Some(basic)
}

/// What the sync compares: the resource without the store's `meta`
/// bookkeeping (`versionId`, `lastUpdated`, a server's `source`, ...):
/// only `meta.profile` is the sync's.
fn owned_view(stored: &Value) -> Value {
    let mut copy = stored.clone();
    if let Some(object) = copy.as_object_mut() {
        let profile = object.get("meta").and_then(|m| m.get("profile")).cloned();
        object.remove("meta");
        if let Some(profile) = profile {
            object.insert("meta".into(), json!({ "profile": profile }));
        }
    }
    copy
}

/// The flow sync: `FlowSync { store, client }.run_once()`.
pub struct FlowSync<'a> {
    pub store: &'a dyn FhirStore,
    pub client: &'a RapidProClient,
}

impl FlowSync<'_> {
    /// One pass: read every flow, then write what changed.
    pub async fn run_once(&self) -> Result<FlowSyncReport, FlowSyncError> {
        self.run_with_progress(&ProgressBar::hidden()).await
    }

    /// [`FlowSync::run_once`], counting the flows read on `progress`.
    pub async fn run_with_progress(
        &self,
        progress: &ProgressBar,
    ) -> Result<FlowSyncReport, FlowSyncError> {
        let mut report = FlowSyncReport::default();
        // Every flow first: a RapidPro failure leaves the store untouched.
        let mut flows: BTreeMap<String, Flow> = BTreeMap::new();
        let mut stream = self.client.flows(&TimeQuery::default());
        while let Some(flow) = stream.next().await {
            let flow = flow?;
            progress.inc(1);
            report.examined += 1;
            if !is_valid_id(&flow.uuid) {
                report.skipped.push(format!(
                    "flow {:?}: its UUID {:?} cannot be a FHIR id",
                    flow.name, flow.uuid
                ));
                continue;
            }
            flows.insert(flow.uuid.clone(), flow);
        }
        report.archived = flows.values().filter(|f| f.archived).count();

        let stored: BTreeMap<String, Value> = search_all(
            self.store,
            "Basic",
            vec![("_profile".to_string(), WORKFLOWS_PROFILE.to_string())],
        )
        .await?
        .into_iter()
        .map(|s| (s.id, s.resource))
        .collect();
        // A Basic of this id written without the profile is overwritten too.
        let mut writes = Vec::new();
        for (uuid, flow) in &flows {
            let wanted = workflow_basic(flow);
            let existing = match stored.get(uuid) {
                Some(existing) => Some(existing.clone()),
                None => match self.store.read("Basic", uuid).await {
                    Ok(found) => Some(found.resource),
                    Err(StoreError::NotFound { .. } | StoreError::Gone { .. }) => None,
                    Err(other) => return Err(other.into()),
                },
            };
            match existing {
                Some(existing) if owned_view(&existing) == wanted => report.unchanged += 1,
                Some(_) => {
                    report.updated += 1;
                    writes.push(wanted);
                }
                None => {
                    report.created += 1;
                    writes.push(wanted);
                }
            }
        }
        let listed: BTreeSet<&String> = flows.keys().collect();
        for (id, basic) in &stored {
            if listed.contains(id) {
                continue;
            }
            if let Some(deleted) = marked_deleted(basic) {
                report.deleted += 1;
                writes.push(deleted);
            }
        }
        for chunk in writes.chunks(WRITE_CHUNK) {
            self.write(chunk).await?;
        }
        Ok(report)
    }

    /// One transaction of PUTs by id.
    async fn write(&self, basics: &[Value]) -> Result<(), StoreError> {
        let entries: Vec<Value> = basics
            .iter()
            .map(|basic| {
                let id = basic.get("id").and_then(Value::as_str).unwrap_or_default();
                json!({
                    "fullUrl": format!("Basic/{id}"),
                    "resource": basic,
                    "request": { "method": "PUT", "url": format!("Basic/{id}") }
                })
            })
            .collect();
        let bundle = json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries });
        self.store.process_bundle(bundle).await?;
        Ok(())
    }
}

/// The flow sync as a `serve` job (every `messaging.flow_sync_interval_secs`).
pub struct FlowSyncJob {
    pub store: SharedStore,
    pub client: RapidProClient,
}

#[async_trait]
impl Job for FlowSyncJob {
    fn name(&self) -> &'static str {
        "flow_sync"
    }

    async fn run_once(&self) -> Result<String, String> {
        FlowSync {
            store: self.store.as_ref(),
            client: &self.client,
        }
        .run_once()
        .await
        .map(|report| report.to_string().trim_end().to_string())
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rapidpro::types::{FlowRunCounts, FlowType};

    fn flow() -> Flow {
        Flow {
            uuid: "5f05311e-8f81-4a67-a5b5-1501b6d6496a".into(),
            name: "Colors".into(),
            flow_type: Some(FlowType::Message),
            archived: false,
            expires: Some(720),
            runs: FlowRunCounts {
                active: 1,
                waiting: 2,
                completed: 3,
                interrupted: 4,
                expired: 5,
                failed: 6,
            },
            created_on: DateTime::parse_from_rfc3339("2016-01-06T15:33:00.813162Z")
                .ok()
                .map(|t| t.with_timezone(&Utc)),
            ..Flow::default()
        }
    }

    fn sub<'a>(basic: &'a Value, name: &str) -> Option<&'a Value> {
        details_of(basic)?
            .iter()
            .find(|s| s.get("url").and_then(Value::as_str) == Some(name))
    }

    #[test]
    fn the_basic_has_code_profile_and_emnutts_details() {
        let basic = workflow_basic(&flow());
        assert_eq!(basic["id"], "5f05311e-8f81-4a67-a5b5-1501b6d6496a");
        assert_eq!(basic["code"]["coding"][0]["code"], "mHeroWorkflows");
        assert_eq!(basic["meta"]["profile"][0], WORKFLOWS_PROFILE);
        assert_eq!(sub(&basic, "flow_type").unwrap()["valueString"], "message");
        assert_eq!(sub(&basic, "expires").unwrap()["valueInteger"], 720);
        assert_eq!(
            sub(&basic, "created_on").unwrap()["valueDateTime"],
            "2016-01-06T15:33:00.813162Z"
        );
        assert!(sub(&basic, "modified_on").is_none(), "unknown: left out");
        let runs = sub(&basic, RUN_SUMMARY_EXTENSION).unwrap()["extension"]
            .as_array()
            .unwrap();
        assert_eq!(runs[0], json!({"url": "active", "valueInteger": 3}));
        assert_eq!(workflow_status(&basic), Some("active"));
        assert_eq!(workflow_basic(&flow()), basic, "deterministic");
    }

    #[test]
    fn deleted_marking_keeps_the_rest_and_is_done_once() {
        let mut stored = workflow_basic(&Flow {
            archived: true,
            ..flow()
        });
        assert_eq!(workflow_status(&stored), Some("archived"));
        stored["meta"]["versionId"] = json!("3");
        let deleted = marked_deleted(&stored).unwrap();
        assert_eq!(workflow_status(&deleted), Some("deleted"));
        assert_eq!(sub(&deleted, "archived").unwrap()["valueBoolean"], true);
        assert!(deleted["meta"].get("versionId").is_none());
        assert!(marked_deleted(&deleted).is_none());
        assert!(marked_deleted(&json!({"resourceType": "Basic"})).is_none());
    }
}
