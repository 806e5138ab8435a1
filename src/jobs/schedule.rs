//! The scheduler: turns emNutt cron schedules into the requests of their
//! firings, and cancels requests (`$cancel`), with all state in FHIR.
//!
//! A CommunicationRequest carrying the schedule extension
//! ([`SCHEDULE_EXTENSION`]) with status `active` or `on-hold` is a schedule
//! *parent*. The dispatcher never sends a parent. One pass
//! ([`Scheduler::run_at`]):
//! 1. sets a new parent `on-hold` ("recurring schedule waiting");
//! 2. computes its due firing from FHIR state only: the cron expression, read
//!    in `messaging.schedule_time_zone`, after the last fired instant kept on
//!    the parent ([`SCHEDULE_STATE_EXTENSION`], `lastFired`) or, before the
//!    first firing, after the parent's `authoredOn` (else the `lastUpdated`
//!    of its first version);
//! 3. creates the *child* of the firing: a copy of the parent without the
//!    schedule, schedule-state and dispatch extensions, `status: active`,
//!    `basedOn` the parent, `occurrenceDateTime` the firing, with a
//!    deterministic id (UUID v5 of parent id + firing instant) written only
//!    if absent; the dispatcher sends it like any request;
//! 4. then records `lastFired` on the parent with `If-Match` (and, for a
//!    `once` schedule, sets it `completed`).
//!
//! A crash between 3 and 4 leaves the child and an unchanged parent: the
//! next pass computes the same firing, finds the child, and only updates the
//! parent. Two replicas compute the same firing and so the same child id;
//! only one parent update wins. Firings found more than
//! `messaging.missed_firing_grace_secs` late were missed (the connector was
//! down): `messaging.missed_firings` says whether they become one late
//! firing (`send-once`) or none (`skip`). Each pass also revokes unsent
//! firings whose parent was cancelled while they were being created.
//! See `docs/scheduling.md`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::config::{MessagingSettings, MissedFirings};
use crate::fhir::format_instant;
use crate::jobs::runner::Nudge;
use crate::pipeline::outbox::{DISPATCH_EXTENSION, DispatchState};
use crate::pipeline::request::{MessageRequest, SCHEDULE_EXTENSION, parse_date_time};
use crate::store::{
    FhirStore, SharedStore, StoreError, StoredResource, WriteKind, escape_search_value,
    modify_resource, search_all,
};

/// Where a schedule parent stands: sub-extension `lastFired` (valueInstant).
pub const SCHEDULE_STATE_EXTENSION: &str =
    "http://mhero.org/fhir/StructureDefinition/mhero-schedule-state";

/// Namespace of the ids of firing requests (UUID v5).
const FIRING_NAMESPACE: Uuid = Uuid::from_u128(0x6d68_6572_6f2d_5363_6865_6475_6c65_0001);

/// Errors of one scheduler pass.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScheduleReport {
    /// Schedule parents looked at.
    pub parents: usize,
    /// Parents set `on-hold` on first sight.
    pub held: usize,
    /// Firing requests created.
    pub fired: usize,
    /// Firings whose request already existed (a crash, another replica).
    pub already_fired: usize,
    /// Firings passed over (`missed_firings = "skip"`).
    pub skipped: usize,
    /// `once` parents that became `completed`.
    pub completed: usize,
    /// Parents another writer changed meanwhile (looked at again next pass).
    pub conflicts: usize,
    /// Parents that failed this pass (tried again next pass).
    pub failed: usize,
    /// Unsent firings revoked because their schedule was cancelled.
    pub revoked: usize,
}

impl ScheduleReport {
    fn add(&mut self, other: &ScheduleReport) {
        self.parents += other.parents;
        self.held += other.held;
        self.fired += other.fired;
        self.already_fired += other.already_fired;
        self.skipped += other.skipped;
        self.completed += other.completed;
        self.conflicts += other.conflicts;
        self.failed += other.failed;
        self.revoked += other.revoked;
    }
}

/// Creates the requests of due firings.
pub struct Scheduler {
    pub store: SharedStore,
    pub settings: MessagingSettings,
}

/// The id of the request of `parent_id`'s firing at `firing`.
pub fn firing_id(parent_id: &str, firing: DateTime<Utc>) -> String {
    Uuid::new_v5(
        &FIRING_NAMESPACE,
        format!("{parent_id}|{}", firing.timestamp()).as_bytes(),
    )
    .to_string()
}

/// The request of `parent`'s firing at `firing` (what the scheduler writes).
pub fn firing_request(parent: &StoredResource, firing: DateTime<Utc>) -> Value {
    let mut child = parent.resource.clone();
    let Some(object) = child.as_object_mut() else {
        return child;
    };
    for element in ["meta", "identifier", "occurrencePeriod", "occurrenceTiming"] {
        object.remove(element);
    }
    let own = [
        SCHEDULE_EXTENSION,
        SCHEDULE_STATE_EXTENSION,
        DISPATCH_EXTENSION,
    ];
    if let Some(list) = object.get_mut("extension").and_then(Value::as_array_mut) {
        list.retain(|e| !own.contains(&e.get("url").and_then(Value::as_str).unwrap_or("")));
        if list.is_empty() {
            object.remove("extension");
        }
    }
    object.insert("id".into(), json!(firing_id(&parent.id, firing)));
    object.insert("status".into(), json!("active"));
    object.insert(
        "basedOn".into(),
        json!([{ "reference": format!("CommunicationRequest/{}", parent.id) }]),
    );
    object.insert("occurrenceDateTime".into(), json!(format_instant(&firing)));
    child
}

/// The `lastFired` instant kept on a parent.
pub fn last_fired(parent: &Value) -> Option<DateTime<Utc>> {
    parent
        .get("extension")?
        .as_array()?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(SCHEDULE_STATE_EXTENSION))?
        .get("extension")?
        .as_array()?
        .iter()
        .find(|s| s.get("url").and_then(Value::as_str) == Some("lastFired"))?
        .get("valueInstant")?
        .as_str()
        .and_then(parse_date_time)
}

/// `parent` with `lastFired` = `fired` and `status`.
fn with_state(parent: &Value, fired: DateTime<Utc>, status: &str) -> Value {
    let mut updated = parent.clone();
    if let Some(meta) = updated.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        meta.remove("lastUpdated");
    }
    updated["status"] = json!(status);
    let extension = json!({
        "url": SCHEDULE_STATE_EXTENSION,
        "extension": [{ "url": "lastFired", "valueInstant": format_instant(&fired) }],
    });
    match updated.get_mut("extension").and_then(Value::as_array_mut) {
        Some(list) => {
            list.retain(|e| e.get("url").and_then(Value::as_str) != Some(SCHEDULE_STATE_EXTENSION));
            list.push(extension);
        }
        None => updated["extension"] = json!([extension]),
    }
    updated
}

fn has_schedule(resource: &Value) -> bool {
    resource
        .get("extension")
        .and_then(Value::as_array)
        .is_some_and(|list| {
            list.iter()
                .any(|e| e.get("url").and_then(Value::as_str) == Some(SCHEDULE_EXTENSION))
        })
}

/// What is due for one parent at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    Nothing,
    /// Fire at this instant (the latest due firing).
    Fire(DateTime<Utc>),
    /// Record this instant as fired without a request (`skip`).
    Skip(DateTime<Utc>),
}

impl Scheduler {
    /// One pass, now.
    pub async fn run_once(&self) -> Result<ScheduleReport, ScheduleError> {
        self.run_at(Utc::now()).await
    }

    /// One pass as if it were `now`.
    pub async fn run_at(&self, now: DateTime<Utc>) -> Result<ScheduleReport, ScheduleError> {
        let time_zone = self.settings.time_zone()?;
        let requests = search_all(
            self.store.as_ref(),
            "CommunicationRequest",
            vec![
                ("status".into(), "active,on-hold".into()),
                ("_count".into(), "200".into()),
            ],
        )
        .await?;
        let mut report = ScheduleReport::default();
        let mut first_error = None;
        let (parents, others): (Vec<_>, Vec<_>) = requests
            .into_iter()
            .partition(|s| has_schedule(&s.resource));
        for (firing, parent_id) in others.iter().filter_map(unsent_firing) {
            match self.revoke_if_parent_revoked(firing, &parent_id).await {
                Ok(true) => report.revoked += 1,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(request = %firing.reference(), %error, "could not check the schedule of a firing; will try again");
                }
            }
        }
        for stored in parents {
            let reference = stored.reference();
            report.parents += 1;
            match self.process(stored, time_zone, now).await {
                Ok(done) => report.add(&done),
                Err(error) => {
                    report.failed += 1;
                    tracing::warn!(request = %reference, %error, "schedule pass failed; will try again");
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) if report.parents == report.failed => Err(error),
            _ => Ok(report),
        }
    }

    async fn process(
        &self,
        stored: StoredResource,
        time_zone: chrono_tz::Tz,
        now: DateTime<Utc>,
    ) -> Result<ScheduleReport, ScheduleError> {
        let mut report = ScheduleReport::default();
        let Ok(parsed) = MessageRequest::parse(&stored.resource) else {
            // Refused at intake; one stored otherwise is left to the
            // dispatcher, which records why it cannot be sent.
            return Ok(report);
        };
        let Some(schedule) = parsed.schedule else {
            return Ok(report);
        };
        let Ok(cron) = schedule.cron() else {
            return Ok(report);
        };
        let after = match last_fired(&stored.resource) {
            Some(fired) => fired,
            None => self.first_base(&stored).await?,
        };
        let due = self.due(&cron, time_zone, after, now);
        let status = stored.resource["status"].as_str().unwrap_or("");
        let (fired, fire) = match due {
            Due::Nothing => {
                if status == "active" {
                    let held = self
                        .write_parent(&stored, {
                            let mut held = stored.resource.clone();
                            held["status"] = json!("on-hold");
                            held
                        })
                        .await?;
                    if held {
                        report.held += 1;
                    } else {
                        report.conflicts += 1;
                    }
                }
                return Ok(report);
            }
            Due::Fire(at) => (at, true),
            Due::Skip(at) => (at, false),
        };
        let mut child_id = None;
        if fire {
            let child = firing_request(&stored, fired);
            let id = child["id"].as_str().unwrap_or_default().to_string();
            match self.store.read("CommunicationRequest", &id).await {
                // Created before a crash, or by another replica; a deleted
                // one was deleted on purpose and is not made again.
                Ok(_) | Err(StoreError::Gone { .. }) => report.already_fired += 1,
                Err(StoreError::NotFound { .. }) => {
                    // Another replica may write the same firing at the same
                    // moment: the same id and content, so one version.
                    let written = self
                        .store
                        .update("CommunicationRequest", &id, child, None)
                        .await?;
                    if written.kind == WriteKind::Created {
                        report.fired += 1;
                    } else {
                        report.already_fired += 1;
                    }
                    child_id = Some(id);
                }
                Err(other) => return Err(other.into()),
            }
        } else {
            report.skipped += 1;
        }
        let next_status = if schedule.recurring || !fire {
            "on-hold"
        } else {
            "completed"
        };
        let updated = with_state(&stored.resource, fired, next_status);
        if self.write_parent(&stored, updated).await? {
            report.completed += (next_status == "completed") as usize;
        } else {
            report.conflicts += 1;
            // Cancelled meanwhile? Then the firing just created is too.
            let current = self.store.read("CommunicationRequest", &stored.id).await?;
            if !matches!(
                current.resource["status"].as_str(),
                Some("active" | "on-hold")
            ) && let Some(id) = child_id
            {
                revoke_if_unsent(self.store.as_ref(), &id).await?;
            }
        }
        Ok(report)
    }

    /// A firing created while its schedule was being cancelled (the
    /// scheduler died before it could see the cancel): revoked now, unless
    /// it was dispatched.
    async fn revoke_if_parent_revoked(
        &self,
        firing: &StoredResource,
        parent_id: &str,
    ) -> Result<bool, StoreError> {
        let parent = match self.store.read("CommunicationRequest", parent_id).await {
            Ok(parent) => parent,
            Err(StoreError::NotFound { .. } | StoreError::Gone { .. }) => return Ok(false),
            Err(other) => return Err(other),
        };
        if !matches!(
            parent.resource["status"].as_str(),
            Some("revoked" | "entered-in-error")
        ) {
            return Ok(false);
        }
        revoke_if_unsent(self.store.as_ref(), &firing.id).await
    }

    /// `false` when another writer changed the parent first.
    async fn write_parent(
        &self,
        stored: &StoredResource,
        updated: Value,
    ) -> Result<bool, StoreError> {
        match self
            .store
            .update(
                "CommunicationRequest",
                &stored.id,
                updated,
                Some(&stored.version_id),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(StoreError::VersionConflict { .. }) => Ok(false),
            Err(other) => Err(other),
        }
    }

    /// Before the first firing: firings come after `authoredOn`, else after
    /// the parent was first stored.
    async fn first_base(&self, stored: &StoredResource) -> Result<DateTime<Utc>, StoreError> {
        if let Some(authored) = stored
            .resource
            .get("authoredOn")
            .and_then(Value::as_str)
            .and_then(parse_date_time)
        {
            return Ok(authored);
        }
        match self
            .store
            .vread("CommunicationRequest", &stored.id, "1")
            .await
        {
            Ok(first) => Ok(first.last_updated),
            // History pruned by the server: the oldest time we still know.
            Err(StoreError::NotFound { .. } | StoreError::Gone { .. }) => Ok(stored.last_updated),
            Err(other) => Err(other),
        }
    }

    fn due(
        &self,
        cron: &croner::Cron,
        time_zone: chrono_tz::Tz,
        after: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Due {
        let local_now = now.with_timezone(&time_zone);
        let Ok(latest) = cron.find_previous_occurrence(&local_now, true) else {
            return Due::Nothing;
        };
        let latest = latest.with_timezone(&Utc);
        if latest <= after {
            return Due::Nothing;
        }
        let grace = chrono::Duration::seconds(
            i64::try_from(self.settings.missed_firing_grace_secs).unwrap_or(i64::MAX / 2),
        );
        match self.settings.missed_firings {
            MissedFirings::SendOnce => Due::Fire(latest),
            MissedFirings::Skip if now - latest <= grace => Due::Fire(latest),
            MissedFirings::Skip => Due::Skip(latest),
        }
    }
}

/// An active firing request not dispatched yet, with its parent's id: its
/// id is the one the scheduler gives the firing at its `occurrenceDateTime`.
fn unsent_firing(stored: &StoredResource) -> Option<(&StoredResource, String)> {
    let resource = &stored.resource;
    if resource["status"] != "active" || DispatchState::read(resource).phase == "dispatched" {
        return None;
    }
    let parent_id = resource
        .pointer("/basedOn/0/reference")?
        .as_str()?
        .strip_prefix("CommunicationRequest/")?;
    let firing = resource
        .get("occurrenceDateTime")?
        .as_str()
        .and_then(parse_date_time)?;
    (firing_id(parent_id, firing) == stored.id).then(|| (stored, parent_id.to_string()))
}

/// Sets an active request `revoked` unless its dispatch is over.
async fn revoke_if_unsent(store: &dyn FhirStore, id: &str) -> Result<bool, StoreError> {
    let revoked = modify_resource(store, "CommunicationRequest", id, |current| {
        let unsent =
            current["status"] == "active" && DispatchState::read(current).phase != "dispatched";
        unsent.then(|| {
            let mut updated = current.clone();
            updated["status"] = json!("revoked");
            updated
        })
    })
    .await?;
    Ok(revoked.is_some())
}

/// Why a request could not be cancelled.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("CommunicationRequest/{0} is not known")]
    NotFound(String),
    /// Nothing is left to cancel (409).
    #[error("CommunicationRequest/{id} is already {status}; there is nothing left to cancel")]
    Final { id: String, status: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Cancels a request (`$cancel`): sets it `revoked`, and for a schedule
/// parent also revokes its firings not dispatched yet. The dispatcher
/// finishes batches already in flight and marks the rest `not-done`.
/// Cancelling a revoked request again answers it as it is.
pub async fn cancel_request(
    store: &dyn FhirStore,
    id: &str,
) -> Result<StoredResource, CancelError> {
    let mut final_status = None;
    let written = modify_resource(store, "CommunicationRequest", id, |current| {
        match current["status"].as_str().unwrap_or("") {
            "revoked" => None,
            status @ ("completed" | "entered-in-error") => {
                final_status = Some(status.to_string());
                None
            }
            _ => {
                let mut updated = current.clone();
                updated["status"] = json!("revoked");
                Some(updated)
            }
        }
    })
    .await
    .map_err(|e| match e {
        StoreError::NotFound { .. } | StoreError::Gone { .. } => CancelError::NotFound(id.into()),
        other => CancelError::Store(other),
    })?;
    if let Some(status) = final_status {
        return Err(CancelError::Final {
            id: id.to_string(),
            status,
        });
    }
    let current = match written {
        Some(stored) => stored,
        None => store.read("CommunicationRequest", id).await?,
    };
    if has_schedule(&current.resource) {
        let children = search_all(
            store,
            "CommunicationRequest",
            vec![
                (
                    "based-on".into(),
                    format!("CommunicationRequest/{}", escape_search_value(id)),
                ),
                ("status".into(), "active".into()),
                ("_count".into(), "200".into()),
            ],
        )
        .await?;
        for child in children {
            revoke_if_unsent(store, &child.id).await?;
        }
    }
    Ok(current)
}

/// The scheduler as a `serve` job; nudges the dispatcher when it created
/// firing requests.
pub struct ScheduleJob {
    pub scheduler: Scheduler,
    pub dispatch: Option<Nudge>,
}

#[async_trait]
impl super::runner::Job for ScheduleJob {
    fn name(&self) -> &'static str {
        "schedule"
    }

    async fn run_once(&self) -> Result<String, String> {
        let report = self.scheduler.run_once().await.map_err(|e| e.to_string())?;
        if report.fired > 0
            && let Some(nudge) = &self.dispatch
        {
            nudge.nudge();
        }
        Ok(format!(
            "{} schedules, {} fired, {} already fired, {} skipped, {} completed, {} conflicts, {} cancelled firings revoked",
            report.parents,
            report.fired,
            report.already_fired,
            report.skipped,
            report.completed,
            report.conflicts,
            report.revoked
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parent() -> StoredResource {
        StoredResource {
            resource: json!({
                "resourceType": "CommunicationRequest", "id": "p", "status": "on-hold",
                "meta": {"versionId": "3"},
                "identifier": [{"system": "s", "value": "1"}],
                "occurrencePeriod": {"start": "2026-01-01"},
                "extension": [
                    {"url": SCHEDULE_EXTENSION, "extension": [{"url": "cronExpression", "valueString": "0 8 * * 1"}]},
                    {"url": DISPATCH_EXTENSION, "extension": [{"url": "state", "valueCode": "refused"}]},
                    {"url": "other", "valueString": "kept"}
                ],
                "payload": [{"contentString": "Hi"}]
            }),
            resource_type: "CommunicationRequest".into(),
            id: "p".into(),
            version_id: "3".into(),
            last_updated: Utc::now(),
        }
    }

    #[test]
    fn a_firing_is_a_plain_request_based_on_its_parent() {
        let at = DateTime::parse_from_rfc3339("2026-03-02T08:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let child = firing_request(&parent(), at);
        assert_eq!(child["id"], firing_id("p", at));
        assert_ne!(firing_id("p", at), firing_id("q", at));
        assert_eq!(child["status"], "active");
        assert_eq!(child["basedOn"][0]["reference"], "CommunicationRequest/p");
        assert_eq!(child["occurrenceDateTime"], "2026-03-02T08:00:00.000Z");
        assert_eq!(
            child["extension"],
            json!([{"url": "other", "valueString": "kept"}])
        );
        for gone in ["meta", "identifier", "occurrencePeriod"] {
            assert!(child.get(gone).is_none(), "{gone}");
        }
    }

    #[test]
    fn last_fired_round_trips() {
        let at = Utc::now();
        let updated = with_state(&parent().resource, at, "on-hold");
        assert_eq!(
            last_fired(&updated).map(|t| t.timestamp_millis()),
            Some(at.timestamp_millis())
        );
        assert!(updated["meta"].get("versionId").is_none());
        assert_eq!(last_fired(&parent().resource), None);
    }
}
