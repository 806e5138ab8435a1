//! FHIR -> RapidPro contact sync: for each person changed since the
//! stored cursor, compute the contact draft, skip it if its hash equals
//! what was last pushed, otherwise find the RapidPro contact (by the
//! written-back UUID, then by URN), create or update it, and write the
//! UUID and hash back. When extra contact fields are configured
//! (`rapidpro.extra_fields`), Practitioners whose PractitionerRole, or
//! whose role's Location or one above it, changed since that kind's own
//! cursor are synced again too (selected in bulk searches). RapidPro is reached through
//! [`ContactDirectory`], implemented by the RapidPro client (and by fakes
//! in tests).

use std::collections::{BTreeSet, HashSet};

use async_trait::async_trait;

use super::contact_writeback::{
    WrittenBack, blocked_by_connector, content_hash, pushed_hash, write_back,
};
use super::cursor::Cursor;
use crate::pipeline::contact::{ContactDraft, PERSON_TYPES, draft};
use crate::pipeline::phone::PhoneNormalizer;
use crate::pipeline::work_context::LocationCache;
use crate::store::{
    FhirStore, HistoryMethod, HistoryRequest, SearchRequest, StoreError, StoredResource,
};
use crate::store::{escape_search_value, search_all};

/// Ids (or references) per bulk FHIR search of the work-context pass.
const SEARCH_BATCH: usize = 100;
/// Deepest `Location.partOf` chain followed down from a changed Location
/// (as deep as `pipeline::work_context` follows it up).
const MAX_LOCATION_DEPTH: usize = 12;
/// The cursors of the work-context pass.
const ROLES_CURSOR: &str = "contacts-practitionerrole";
const LOCATIONS_CURSOR: &str = "contacts-location";
/// Extra fields that come from the role's Location (and those above it);
/// `job` comes from the role alone.
const LOCATION_FIELDS: &[&str] = &["facility", "district", "region", "country"];

/// A RapidPro contact as the sync needs to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteContact {
    pub uuid: String,
    pub urns: Vec<String>,
    /// The `globalid` field: the FHIR id of the person it belongs to.
    pub global_id: Option<String>,
    /// Blocked in RapidPro (RapidPro messages it never, and it is in no group).
    pub blocked: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("RapidPro: {0}")]
    RapidPro(String),
    /// The contact named by a UUID does not exist (any more) in RapidPro.
    #[error("RapidPro: no such contact")]
    ContactNotFound,
    /// RapidPro refused a create because a URN belongs to another contact.
    #[error("RapidPro: a URN is in use by another contact")]
    UrnTaken,
    /// RapidPro refused a write as invalid (400), e.g. a group name it
    /// already has: retrying the same request cannot help.
    #[error("RapidPro refused it: {0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the sync needs from RapidPro.
#[async_trait]
pub trait ContactDirectory: Send + Sync {
    async fn find_by_uuid(&self, uuid: &str) -> Result<Option<RemoteContact>, SyncError>;
    async fn find_by_urn(&self, urn: &str) -> Result<Option<RemoteContact>, SyncError>;
    async fn create(&self, draft: &ContactDraft) -> Result<RemoteContact, SyncError>;
    async fn update(&self, uuid: &str, draft: &ContactDraft) -> Result<RemoteContact, SyncError>;
    /// The person is inactive: RapidPro's `block` contact action (the only
    /// API status change that stops RapidPro itself, campaigns and triggers
    /// included, from messaging a contact; it also leaves every group).
    async fn block(&self, uuid: &str) -> Result<(), SyncError>;
    /// The person is active again: `unblock` (group memberships come back
    /// through the group sync).
    async fn unblock(&self, uuid: &str) -> Result<(), SyncError>;
    /// Extra contact fields to derive and send (`job`, `facility`, ...).
    fn extra_fields(&self) -> &[String] {
        &[]
    }
}

/// What happened to one person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PersonOutcome {
    /// Same content as last pushed: no RapidPro call.
    Unchanged,
    Created(String),
    Updated(String),
    /// Deactivated: the contact was blocked by the connector.
    Blocked(String),
    /// No valid phone and no contact yet: nothing to create.
    NoPhone,
    /// A URN belongs to another person's contact: reported, not stolen.
    Conflict(String),
}

/// One pass over people changed since the cursor.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub examined: usize,
    pub unchanged: usize,
    pub created: usize,
    pub updated: usize,
    pub blocked: usize,
    pub no_phone: usize,
    pub conflicts: Vec<String>,
    pub failures: Vec<String>,
}

/// The contact found by the written-back UUID, else by any URN.
async fn find_existing(
    directory: &dyn ContactDirectory,
    contact: &ContactDraft,
) -> Result<Option<RemoteContact>, SyncError> {
    if let Some(uuid) = &contact.contact_uuid
        && let Some(found) = directory.find_by_uuid(uuid).await?
    {
        return Ok(Some(found));
    }
    find_by_urns(directory, contact).await
}

async fn find_by_urns(
    directory: &dyn ContactDirectory,
    contact: &ContactDraft,
) -> Result<Option<RemoteContact>, SyncError> {
    for urn in &contact.urns {
        if let Some(remote) = directory.find_by_urn(urn).await? {
            return Ok(Some(remote));
        }
    }
    Ok(None)
}

/// A contact that belongs to another person: reported, never taken over.
fn conflict_with(contact: &ContactDraft, remote: &RemoteContact) -> Option<PersonOutcome> {
    let owner = remote
        .global_id
        .as_deref()
        .filter(|g| !g.is_empty() && *g != contact.global_id)?;
    Some(PersonOutcome::Conflict(format!(
        "{}/{}: a phone number of this person belongs to RapidPro contact {} of {owner}",
        contact.entity_type, contact.global_id, remote.uuid
    )))
}

/// After an update: undo the connector's own block, and report URNs that
/// RapidPro skipped because another contact has them (it drops them from
/// an update silently).
async fn finish_update(
    directory: &dyn ContactDirectory,
    contact: &ContactDraft,
    remote: RemoteContact,
    blocked_by_us: bool,
) -> Result<PersonOutcome, SyncError> {
    // Only a block the connector made is undone: an operator's block (or
    // one RapidPro applied) stays.
    if remote.blocked && blocked_by_us && !contact.opted_out {
        directory.unblock(&remote.uuid).await?;
    }
    let skipped: Vec<&str> = contact
        .urns
        .iter()
        .filter(|u| !remote.urns.contains(u))
        .map(|u| u.as_str())
        .collect();
    if !skipped.is_empty() {
        let masked: Vec<String> = skipped
            .iter()
            .map(|u| crate::telemetry::redact_phones(u))
            .collect();
        return Ok(PersonOutcome::Conflict(format!(
            "{}/{}: RapidPro kept {} off contact {} because another contact has it",
            contact.entity_type,
            contact.global_id,
            masked.join(", "),
            remote.uuid
        )));
    }
    Ok(PersonOutcome::Updated(remote.uuid))
}

/// Sync one person (already read from the store). `locations` caches the
/// Location hierarchy across the people of one pass.
pub async fn sync_person(
    store: &dyn FhirStore,
    directory: &dyn ContactDirectory,
    phones: &PhoneNormalizer,
    locations: &mut LocationCache,
    resource: &serde_json::Value,
) -> Result<PersonOutcome, SyncError> {
    let mut contact = draft(resource, phones);
    crate::pipeline::work_context::enrich(store, &mut contact, directory.extra_fields(), locations)
        .await?;
    for rejected in &contact.rejected_phones {
        metrics::counter!("contact_sync_invalid_phones_total", "resource_type" => contact.entity_type.clone()).increment(1);
        tracing::warn!(person = %format!("{}/{}", contact.entity_type, contact.global_id), reason = %rejected, "phone number not usable; not sent to RapidPro");
    }
    let hash = content_hash(&contact);
    if contact.contact_uuid.is_some() && pushed_hash(resource).as_deref() == Some(hash.as_str()) {
        return Ok(PersonOutcome::Unchanged);
    }
    super::sync_status::record(store, &contact).await?;
    let blocked_by_us = blocked_by_connector(resource);
    let outcome = if contact.inactive {
        // Rare: find the contact the person had, and block it.
        match find_existing(directory, &contact).await? {
            Some(remote) => {
                if let Some(conflict) = conflict_with(&contact, &remote) {
                    return Ok(conflict);
                }
                if !remote.blocked {
                    directory.block(&remote.uuid).await?;
                }
                PersonOutcome::Blocked(remote.uuid)
            }
            None => PersonOutcome::NoPhone,
        }
    } else {
        // The usual case costs one call: update by the written-back UUID,
        // or create. Lookups happen only when RapidPro says they must.
        let updated = match &contact.contact_uuid {
            Some(uuid) => match directory.update(uuid, &contact).await {
                Ok(remote) => Some(remote),
                // Deleted in RapidPro: create it again (or find it by URN).
                Err(SyncError::ContactNotFound) => None,
                Err(e) => return Err(e),
            },
            None => None,
        };
        match updated {
            Some(remote) => finish_update(directory, &contact, remote, blocked_by_us).await?,
            None if contact.urns.is_empty() => PersonOutcome::NoPhone,
            None => match directory.create(&contact).await {
                Ok(remote) => PersonOutcome::Created(remote.uuid),
                Err(SyncError::UrnTaken) => {
                    let Some(remote) = find_by_urns(directory, &contact).await? else {
                        return Err(SyncError::RapidPro(
                            "RapidPro says a URN is taken, but no contact has it".into(),
                        ));
                    };
                    if let Some(conflict) = conflict_with(&contact, &remote) {
                        return Ok(conflict);
                    }
                    // A contact made in RapidPro by hand (no globalid) is adopted.
                    let remote = directory.update(&remote.uuid, &contact).await?;
                    finish_update(directory, &contact, remote, blocked_by_us).await?
                }
                Err(e) => return Err(e),
            },
        }
    };
    let written = match &outcome {
        PersonOutcome::Created(uuid) | PersonOutcome::Updated(uuid) => Some((uuid, false)),
        PersonOutcome::Blocked(uuid) => Some((uuid, true)),
        _ => None,
    };
    if let Some((uuid, blocked)) = written {
        write_back(
            store,
            &contact.entity_type,
            &contact.global_id,
            &WrittenBack {
                uuid,
                hash: &hash,
                blocked_by_connector: blocked,
            },
        )
        .await?;
    }
    Ok(outcome)
}

/// The periodic pass: every person type, changed since its cursor, oldest
/// first; each cursor advances after each page is done.
pub struct ContactSync<'a> {
    pub store: &'a dyn FhirStore,
    pub directory: &'a dyn ContactDirectory,
    pub phones: &'a PhoneNormalizer,
    pub page_size: usize,
    /// Ticked once per person (hidden unless the caller shows it).
    pub progress: indicatif::ProgressBar,
}

impl ContactSync<'_> {
    /// `full` ignores the cursors and looks at everyone.
    pub async fn run_once(&self, full: bool) -> Result<SyncReport, SyncError> {
        let mut report = SyncReport::default();
        // People written after the pass started (its own write-backs
        // included) wait for the next pass, which the cursor guarantees.
        let started = crate::fhir::format_instant(&chrono::Utc::now());
        let mut locations = LocationCache::default();
        // Practitioners examined by this pass (the work-context pass skips them).
        let mut done: HashSet<String> = HashSet::new();
        // Every Practitioner was looked at (a full or a first pass).
        let mut all_practitioners = false;
        for resource_type in PERSON_TYPES {
            let mut cursor = Cursor::load(
                self.store,
                &format!("contacts-{}", resource_type.to_ascii_lowercase()),
            )
            .await?;
            let since = if full { None } else { cursor.position.clone() };
            if *resource_type == "Practitioner" {
                all_practitioners = since.is_none();
            }
            let mut params = vec![
                ("_sort".to_string(), "_lastUpdated".to_string()),
                ("_count".to_string(), self.page_size.to_string()),
                ("_total".to_string(), "none".to_string()),
                ("_lastUpdated".to_string(), format!("le{started}")),
            ];
            if let Some(since) = &since {
                params.push(("_lastUpdated".into(), format!("ge{since}")));
            }
            let mut page_cursor = None;
            let mut done_up_to = None;
            loop {
                let page = self
                    .store
                    .search(SearchRequest {
                        resource_type: resource_type.to_string(),
                        params: params.clone(),
                        cursor: page_cursor.clone(),
                        lenient: false,
                    })
                    .await?;
                for person in &page.matches {
                    if *resource_type == "Practitioner" {
                        done.insert(person.id.clone());
                    }
                    self.sync_one(person, &mut locations, &mut report).await;
                }
                // Only what was done without failures counts as done.
                if report.failures.is_empty()
                    && let Some(last) = page.matches.last()
                {
                    done_up_to = Some(last.last_updated);
                }
                match page.next_cursor {
                    Some(next) if report.failures.is_empty() => page_cursor = Some(next),
                    _ => break,
                }
            }
            if let Some(done) = done_up_to {
                cursor
                    .advance(self.store, &crate::fhir::format_instant(&done))
                    .await?;
            }
            self.block_deleted(resource_type, full, &mut report).await?;
        }
        let pass = WorkContextPass {
            started: &started,
            all_practitioners: all_practitioners && report.failures.is_empty(),
        };
        self.sync_work_context(&pass, &mut done, &mut locations, &mut report)
            .await?;
        Ok(report)
    }

    async fn sync_one(
        &self,
        person: &StoredResource,
        locations: &mut LocationCache,
        report: &mut SyncReport,
    ) {
        report.examined += 1;
        self.progress.inc(1);
        match sync_person(
            self.store,
            self.directory,
            self.phones,
            locations,
            &person.resource,
        )
        .await
        {
            Ok(PersonOutcome::Unchanged) => report.unchanged += 1,
            Ok(PersonOutcome::Created(_)) => report.created += 1,
            Ok(PersonOutcome::Updated(_)) => report.updated += 1,
            Ok(PersonOutcome::Blocked(_)) => report.blocked += 1,
            Ok(PersonOutcome::NoPhone) => report.no_phone += 1,
            Ok(PersonOutcome::Conflict(message)) => report.conflicts.push(message),
            Err(e) => report.failures.push(format!("{}: {e}", person.reference())),
        }
    }

    /// The extra fields come from PractitionerRoles and Locations, whose
    /// changes leave the Practitioner's `lastUpdated` alone: Practitioners
    /// with a role changed since the roles cursor, or a role at a Location
    /// (or below one, through `partOf`) changed since the locations cursor,
    /// are synced again. Nothing is read when no such field is configured.
    /// Each cursor works like the people's: the pass stops at `started`,
    /// and a cursor moves only past pages done without failures.
    async fn sync_work_context(
        &self,
        pass: &WorkContextPass<'_>,
        done: &mut HashSet<String>,
        locations: &mut LocationCache,
        report: &mut SyncReport,
    ) -> Result<(), SyncError> {
        let extra = self.directory.extra_fields();
        if extra.is_empty() {
            return Ok(());
        }
        let by_location = extra.iter().any(|f| LOCATION_FIELDS.contains(&f.as_str()));
        let kinds: &[(&str, &str)] = if by_location {
            &[
                ("PractitionerRole", ROLES_CURSOR),
                ("Location", LOCATIONS_CURSOR),
            ]
        } else {
            &[("PractitionerRole", ROLES_CURSOR)]
        };
        for (resource_type, name) in kinds {
            let mut cursor = Cursor::load(self.store, name).await?;
            if pass.all_practitioners {
                // Everyone was just synced with the roles and Locations as
                // they were at `started` or later.
                cursor.advance(self.store, pass.started).await?;
                continue;
            }
            let mut params = vec![
                ("_sort".to_string(), "_lastUpdated".to_string()),
                ("_count".to_string(), self.page_size.to_string()),
                ("_total".to_string(), "none".to_string()),
                ("_lastUpdated".to_string(), format!("le{}", pass.started)),
            ];
            if let Some(since) = &cursor.position {
                params.push(("_lastUpdated".into(), format!("ge{since}")));
            }
            let mut page_cursor = None;
            let mut done_up_to = None;
            loop {
                let page = self
                    .store
                    .search(SearchRequest {
                        resource_type: resource_type.to_string(),
                        params: params.clone(),
                        cursor: page_cursor.clone(),
                        lenient: false,
                    })
                    .await?;
                let roles = if *resource_type == "Location" {
                    let ids: Vec<String> = page.matches.iter().map(|l| l.id.clone()).collect();
                    self.roles_at_or_below(&ids).await?
                } else {
                    page.matches.iter().map(|r| r.resource.clone()).collect()
                };
                let wanted: BTreeSet<String> = roles
                    .iter()
                    .filter_map(role_practitioner)
                    .filter(|id| !done.contains(id))
                    .collect();
                for practitioner in self.read_practitioners(&wanted).await? {
                    done.insert(practitioner.id.clone());
                    self.sync_one(&practitioner, locations, report).await;
                }
                if report.failures.is_empty()
                    && let Some(last) = page.matches.last()
                {
                    done_up_to = Some(last.last_updated);
                }
                match page.next_cursor {
                    Some(next) if report.failures.is_empty() => page_cursor = Some(next),
                    _ => break,
                }
            }
            if let Some(done_up_to) = done_up_to {
                cursor
                    .advance(self.store, &crate::fhir::format_instant(&done_up_to))
                    .await?;
            }
        }
        Ok(())
    }

    /// The PractitionerRoles at the Locations `ids` or at any Location
    /// below them (`partOf`, down to [`MAX_LOCATION_DEPTH`] levels), found
    /// with `partof=` and `location=` searches of up to [`SEARCH_BATCH`]
    /// references each.
    async fn roles_at_or_below(&self, ids: &[String]) -> Result<Vec<serde_json::Value>, SyncError> {
        let mut seen: BTreeSet<String> = ids.iter().cloned().collect();
        let mut frontier: Vec<String> = seen.iter().cloned().collect();
        for _ in 0..MAX_LOCATION_DEPTH {
            if frontier.is_empty() {
                break;
            }
            let mut next = Vec::new();
            for chunk in frontier.chunks(SEARCH_BATCH) {
                for child in search_all(
                    self.store,
                    "Location",
                    reference_list("partof", "Location", chunk),
                )
                .await?
                {
                    if seen.insert(child.id.clone()) {
                        next.push(child.id);
                    }
                }
            }
            frontier = next;
        }
        let all: Vec<String> = seen.into_iter().collect();
        let mut roles = Vec::new();
        for chunk in all.chunks(SEARCH_BATCH) {
            roles.extend(
                search_all(
                    self.store,
                    "PractitionerRole",
                    reference_list("location", "Location", chunk),
                )
                .await?
                .into_iter()
                .map(|r| r.resource),
            );
        }
        Ok(roles)
    }

    /// The Practitioners `ids`, read with `_id=` searches.
    async fn read_practitioners(
        &self,
        ids: &BTreeSet<String>,
    ) -> Result<Vec<StoredResource>, SyncError> {
        let ids: Vec<&String> = ids.iter().collect();
        let mut found = Vec::new();
        for chunk in ids.chunks(SEARCH_BATCH) {
            let list: Vec<String> = chunk.iter().map(|id| escape_search_value(id)).collect();
            let params = vec![
                ("_id".to_string(), list.join(",")),
                ("_count".to_string(), SEARCH_BATCH.to_string()),
            ];
            found.extend(search_all(self.store, "Practitioner", params).await?);
        }
        Ok(found)
    }

    /// People deleted in FHIR since the deletions cursor: their contacts are
    /// blocked (as for `active = false`), found through the UUID written
    /// back on the last version before the delete.
    async fn block_deleted(
        &self,
        resource_type: &str,
        full: bool,
        report: &mut SyncReport,
    ) -> Result<(), SyncError> {
        let mut cursor = Cursor::load(
            self.store,
            &format!("contacts-deleted-{}", resource_type.to_ascii_lowercase()),
        )
        .await?;
        let since = if full {
            None
        } else {
            cursor
                .position
                .as_deref()
                .and_then(|p| chrono::DateTime::parse_from_rfc3339(p).ok())
        };
        let mut deletes = Vec::new();
        let mut newest_seen: Option<chrono::DateTime<chrono::Utc>> = None;
        let mut page_cursor = None;
        loop {
            let page = self
                .store
                .history(HistoryRequest {
                    resource_type: Some(resource_type.to_string()),
                    id: None,
                    since: since.map(|s| s.with_timezone(&chrono::Utc)),
                    count: Some(self.page_size.max(1)),
                    cursor: page_cursor,
                })
                .await?;
            if newest_seen.is_none() {
                // History is newest first.
                newest_seen = page.entries.first().map(|e| e.last_updated);
            }
            deletes.extend(
                page.entries
                    .into_iter()
                    .filter(|e| e.method == HistoryMethod::Delete),
            );
            match page.next_cursor {
                Some(next) => page_cursor = Some(next),
                None => break,
            }
        }
        // Oldest first, so the cursor can follow.
        deletes.reverse();
        for deleted in deletes {
            let before: u64 = deleted.version_id.parse().unwrap_or(0);
            let previous = match before.checked_sub(1).filter(|v| *v > 0) {
                Some(version) => self
                    .store
                    .vread(resource_type, &deleted.id, &version.to_string())
                    .await
                    .ok(),
                None => None,
            };
            let uuid = previous
                .as_ref()
                .and_then(|p| draft(&p.resource, self.phones).contact_uuid);
            if let Some(uuid) = uuid {
                match self.directory.find_by_uuid(&uuid).await {
                    Ok(Some(remote)) if !remote.blocked => {
                        match self.directory.block(&uuid).await {
                            Ok(()) => report.blocked += 1,
                            Err(e) => report
                                .failures
                                .push(format!("{resource_type}/{} (deleted): {e}", deleted.id)),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => report
                        .failures
                        .push(format!("{resource_type}/{} (deleted): {e}", deleted.id)),
                }
            }
            if !report.failures.is_empty() {
                // This delete is tried again next pass.
                return Ok(());
            }
        }
        // Everything up to the newest version seen is handled.
        if let Some(newest) = newest_seen {
            cursor
                .advance(self.store, &crate::fhir::format_instant(&newest))
                .await?;
        }
        Ok(())
    }
}

/// What the people part of a pass tells the work-context part.
struct WorkContextPass<'a> {
    /// The pass's upper bound on `_lastUpdated`.
    started: &'a str,
    /// Every Practitioner was synced by this pass without failures.
    all_practitioners: bool,
}

/// `name=Type/a,Type/b,...` (and a page size) for a reference search.
fn reference_list(name: &str, resource_type: &str, ids: &[String]) -> Vec<(String, String)> {
    let list: Vec<String> = ids
        .iter()
        .map(|id| format!("{resource_type}/{}", escape_search_value(id)))
        .collect();
    vec![
        (name.to_string(), list.join(",")),
        ("_count".to_string(), SEARCH_BATCH.to_string()),
    ]
}

/// The id of a role's Practitioner (relative or absolute reference).
fn role_practitioner(role: &serde_json::Value) -> Option<String> {
    let reference = role.pointer("/practitioner/reference")?.as_str()?;
    let mut parts = reference.trim_end_matches('/').rsplit('/');
    let mut id = parts.next()?;
    let mut resource_type = parts.next()?;
    if resource_type == "_history" {
        id = parts.next()?;
        resource_type = parts.next()?;
    }
    (resource_type == "Practitioner" && !id.is_empty()).then(|| id.to_string())
}

/// The RapidPro sync as a background job of `mhero serve`: contacts FHIR ->
/// RapidPro, then RapidPro -> FHIR statuses, then groups.
pub struct ContactSyncJob {
    pub store: crate::store::SharedStore,
    pub client: crate::rapidpro::client::RapidProClient,
    pub directory: super::rapidpro_directory::RapidProDirectory,
    pub phones: PhoneNormalizer,
    pub import_unknown_contacts: bool,
    pub poll_overlap: chrono::Duration,
    /// Which side owns group membership (the group sync runs after the contacts).
    pub groups_source: crate::config::GroupsSource,
}

#[async_trait]
impl super::runner::Job for ContactSyncJob {
    fn name(&self) -> &'static str {
        "contact-sync"
    }

    async fn run_once(&self) -> Result<String, String> {
        let sync = ContactSync {
            store: self.store.as_ref(),
            directory: &self.directory,
            phones: &self.phones,
            page_size: 100,
            progress: indicatif::ProgressBar::hidden(),
        };
        let pushed = sync.run_once(false).await.map_err(|e| e.to_string())?;
        let poll = super::contact_status_poll::ContactStatusPoll {
            store: self.store.as_ref(),
            client: &self.client,
            import_unknown_contacts: self.import_unknown_contacts,
            overlap: self.poll_overlap,
        };
        let pulled = poll.run_once().await.map_err(|e| e.to_string())?;
        let groups = super::group_sync::GroupSync {
            store: self.store.as_ref(),
            directory: &self.directory,
            source: self.groups_source,
        }
        .run_once()
        .await
        .map_err(|e| e.to_string())?;
        let summary = format!(
            "to RapidPro: {} created, {} updated, {} blocked, {} unchanged, {} conflicts, {} failed; from RapidPro: {} contacts read, {} consent changes, {} imported",
            pushed.created,
            pushed.updated,
            pushed.blocked,
            pushed.unchanged,
            pushed.conflicts.len(),
            pushed.failures.len(),
            pulled.examined,
            pulled.consent_changes,
            pulled.imported
        );
        let summary = format!(
            "{summary}; groups: {} created, {} updated, {} unchanged, {} emptied, {} conflicts",
            groups.created,
            groups.updated,
            groups.unchanged,
            groups.emptied,
            groups.conflicts.len()
        );
        if pushed.failures.is_empty() && pulled.failures.is_empty() && groups.failures.is_empty() {
            Ok(summary)
        } else {
            let mut failures = pushed.failures;
            failures.extend(pulled.failures);
            failures.extend(groups.failures);
            Err(format!("{summary}; first failure: {}", failures[0]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::test_support::Counting;
    use serde_json::{Value, json};
    use std::sync::Mutex;

    /// RapidPro in memory: every create succeeds; updates are recorded.
    struct Fake {
        extra: Vec<String>,
        updates: Mutex<Vec<String>>,
    }

    fn remote(uuid: String, draft: &ContactDraft) -> RemoteContact {
        RemoteContact {
            uuid,
            urns: draft.urns.clone(),
            global_id: Some(draft.global_id.clone()),
            blocked: false,
        }
    }

    #[async_trait]
    impl ContactDirectory for Fake {
        async fn find_by_uuid(&self, _: &str) -> Result<Option<RemoteContact>, SyncError> {
            Ok(None)
        }
        async fn find_by_urn(&self, _: &str) -> Result<Option<RemoteContact>, SyncError> {
            Ok(None)
        }
        async fn create(&self, draft: &ContactDraft) -> Result<RemoteContact, SyncError> {
            Ok(remote(format!("c-{}", draft.global_id), draft))
        }
        async fn update(
            &self,
            uuid: &str,
            draft: &ContactDraft,
        ) -> Result<RemoteContact, SyncError> {
            self.updates.lock().unwrap().push(draft.global_id.clone());
            Ok(remote(uuid.to_string(), draft))
        }
        async fn block(&self, _: &str) -> Result<(), SyncError> {
            Ok(())
        }
        async fn unblock(&self, _: &str) -> Result<(), SyncError> {
            Ok(())
        }
        fn extra_fields(&self) -> &[String] {
            &self.extra
        }
    }

    fn location(id: &str, name: &str, level: Option<&str>, part_of: Option<&str>) -> Value {
        let mut l = json!({"resourceType": "Location", "id": id, "name": name});
        if let Some(level) = level {
            l["type"] = json!([{"coding": [{"code": level}]}]);
        }
        if let Some(parent) = part_of {
            l["partOf"] = json!({"reference": format!("Location/{parent}")});
        }
        l
    }

    #[tokio::test]
    async fn role_and_location_changes_select_practitioners_in_bulk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Counting::over(
            crate::store::sqlite::SqliteStore::open(&dir.path().join("fhir.sqlite"))
                .await
                .unwrap(),
        );
        for l in [
            location("north", "North", Some("region"), None),
            location("d", "Buraba", Some("district"), Some("north")),
            location("f1", "Clinic 1", None, Some("d")),
            location("f2", "Clinic 2", None, Some("d")),
            location("west", "West", Some("region"), None),
            location("e", "Karita", Some("district"), Some("west")),
            location("g", "Clinic 3", None, Some("e")),
        ] {
            let id = l["id"].as_str().unwrap().to_string();
            store.update("Location", &id, l, None).await.unwrap();
        }
        // 150 practitioners under district d, 10 under e.
        for n in 0..160 {
            let id = format!("p{n}");
            let p = json!({"resourceType": "Practitioner", "id": id, "name": [{"text": format!("W {n}")}],
                "telecom": [{"system": "phone", "value": format!("0770{:06}", 100_000 + n)}]});
            store.update("Practitioner", &id, p, None).await.unwrap();
            let at = match n {
                0..150 if n % 2 == 0 => "f1",
                0..150 => "f2",
                _ => "g",
            };
            let role = json!({"resourceType": "PractitionerRole", "id": format!("r{n}"), "active": true,
                "practitioner": {"reference": format!("Practitioner/{id}")},
                "location": [{"reference": format!("Location/{at}")}]});
            store
                .update("PractitionerRole", &format!("r{n}"), role, None)
                .await
                .unwrap();
        }
        let fake = Fake {
            extra: vec!["facility".into(), "district".into()],
            updates: Mutex::new(Vec::new()),
        };
        let phones = PhoneNormalizer::new(Some("LR")).unwrap();
        let sync = ContactSync {
            store: &store,
            directory: &fake,
            phones: &phones,
            page_size: 50,
            progress: indicatif::ProgressBar::hidden(),
        };
        let first = sync.run_once(false).await.unwrap();
        assert_eq!(first.created, 160, "{first:?}");
        // The next pass looks at the write-backs; it ends at a bystander.
        let bystander = json!({"resourceType": "Practitioner", "id": "by"});
        store
            .update("Practitioner", "by", bystander, None)
            .await
            .unwrap();
        let settled = sync.run_once(false).await.unwrap();
        assert_eq!(settled.updated, 0, "{settled:?}");

        // A district renamed: its 150 practitioners, selected in a few searches.
        let renamed = location("d", "Buraba East", Some("district"), Some("north"));
        store.update("Location", "d", renamed, None).await.unwrap();
        store.searched.lock().unwrap().clear();
        let report = sync.run_once(false).await.unwrap();
        assert_eq!(report.updated, 150, "{report:?}");
        let mut updated = std::mem::take(&mut *fake.updates.lock().unwrap());
        updated.sort_by_key(|id| id[1..].parse::<usize>().unwrap_or(usize::MAX));
        let expected: Vec<String> = (0..150).map(|n| format!("p{n}")).collect();
        assert_eq!(updated, expected, "nobody under district e");
        // The Locations below d (one level, then none), the roles there
        // (150 in pages of 100), the practitioners (100 ids per search).
        // (The roles pass before may pick up the last role written before
        // the first pass, at its inclusive cursor: counted from the
        // Locations pass on.)
        let searched = store.searched.lock().unwrap().clone();
        let from = searched
            .iter()
            .position(|(t, params)| t == "Location" && params.iter().any(|p| p == "partof"))
            .unwrap();
        let count = |resource_type: &str, param: &str| {
            searched[from..]
                .iter()
                .filter(|(t, params)| t == resource_type && params.iter().any(|p| p == param))
                .count()
        };
        assert_eq!(count("Location", "partof"), 2);
        assert_eq!(count("PractitionerRole", "location"), 2);
        assert_eq!(count("Practitioner", "_id"), 2);

        // The write-backs again, ending at the bystander: nothing to send.
        let bystander = json!({"resourceType": "Practitioner", "id": "by", "active": true});
        store
            .update("Practitioner", "by", bystander, None)
            .await
            .unwrap();
        let settled = sync.run_once(false).await.unwrap();
        assert_eq!(settled.updated, 0, "{settled:?}");

        // A role moved to another district: only its practitioner.
        let mut role = store.read("PractitionerRole", "r0").await.unwrap().resource;
        role["location"] = json!([{"reference": "Location/g"}]);
        store
            .update("PractitionerRole", "r0", role, None)
            .await
            .unwrap();
        let report = sync.run_once(false).await.unwrap();
        assert_eq!(report.updated, 1, "{report:?}");
        let moved = std::mem::take(&mut *fake.updates.lock().unwrap());
        assert_eq!(moved, vec!["p0".to_string()]);
        let quiet = sync.run_once(false).await.unwrap();
        assert_eq!(quiet.updated, 0, "{quiet:?}");
        assert!(fake.updates.lock().unwrap().is_empty());
    }
}
