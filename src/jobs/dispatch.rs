//! The dispatcher: sends due CommunicationRequests to RapidPro exactly once
//! per recipient and delivery, with all work state in FHIR.
//!
//! One pass ([`Dispatcher::run_once`]) looks at every `active` request
//! (and `revoked` ones left mid-way). For a due request it:
//! 1. claims it: the `mhero-dispatch` extension (state `dispatching`, owner,
//!    lease) written with `If-Match`, so two replicas never work on the same
//!    request; the lease is renewed while sending and lets another replica
//!    take over from a crashed one;
//! 2. reconciles outbox entries left in `preparation` by an interrupted
//!    pass: a flow start is found by the batch id in its `params`, a
//!    broadcast by text, recipients and creation time; found batches are
//!    marked, the others are sent now;
//! 3. resolves the recipients and writes a `not-done` entry for everyone
//!    who cannot be messaged;
//! 4. sends the rest in batches of up to 100: each batch is written as
//!    `preparation` *before* its broadcast / flow start and marked
//!    `in-progress` (identifier = the RapidPro uuid) after it; up to
//!    `messaging.max_concurrent_calls` batches are in flight;
//! 5. marks the request `dispatched`, and `completed` once every entry is
//!    final (delivery updates come from the two-way sync).
//!
//! An answer that leaves in doubt whether RapidPro acted (timeout, dropped
//! connection, 5xx, throttled) leaves the batch in `preparation`; the next
//! pass reconciles it. A 400 is certain: nothing was created.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use serde_json::{Map, Value, json};

use crate::config::MessagingSettings;
use crate::jobs::group_sync::GROUP_UUID_SYSTEM;
use crate::pipeline::outbox::{
    self, Address, BATCH_PARAM, BATCH_SYSTEM, BROADCAST_SYSTEM, DispatchState, FLOW_START_SYSTEM,
    Planned,
};
use crate::pipeline::phone::PhoneNormalizer;
use crate::pipeline::recipients::{Reach, Recipient, resolve};
use crate::pipeline::request::{Delivery, MessageRequest, MessageText, RecipientRef};
use crate::rapidpro::client::{ContactQuery, RapidProClient, RapidProError, TimeQuery};
use crate::rapidpro::types::{BroadcastWrite, ContactStatus, FlowStartWrite, Translated};
use crate::store::{
    SearchRequest, SharedStore, StoreError, StoredResource, escape_search_value, parse_etag,
    search_all,
};

/// Errors of one dispatch pass.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    RapidPro(#[from] RapidProError),
    /// Another replica took the request over (its claim is newer).
    #[error("lost the claim on CommunicationRequest/{0} to another dispatcher")]
    LostClaim(String),
    /// Fault injection: the dispatcher "died" at this step.
    #[error("dispatcher stopped at {0:?} (fault injection)")]
    Crashed(Step),
}

/// The points between which a dispatcher may die (fault injection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The claim is written.
    Claimed,
    /// A batch is written as `preparation`; RapidPro not called yet.
    BatchPrepared,
    /// RapidPro accepted a batch; the outbox is not marked yet.
    BatchSent,
    /// A batch is marked `in-progress`.
    BatchMarked,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DispatchReport {
    /// Requests this pass claimed and worked through.
    pub requests: usize,
    /// Batches sent (broadcasts + flow starts created).
    pub batches_sent: usize,
    /// Outbox entries marked `in-progress`.
    pub sent: usize,
    /// Entries written `not-done`.
    pub not_done: usize,
    /// Batches left by an earlier pass and found in RapidPro.
    pub reconciled: usize,
    /// Requests that became `completed`.
    pub completed: usize,
    /// Requests skipped because another dispatcher holds them.
    pub claimed_elsewhere: usize,
    /// Requests that failed this pass (tried again next pass).
    pub failed: usize,
}

impl DispatchReport {
    fn add(&mut self, other: &DispatchReport) {
        self.requests += other.requests;
        self.batches_sent += other.batches_sent;
        self.sent += other.sent;
        self.not_done += other.not_done;
        self.reconciled += other.reconciled;
        self.completed += other.completed;
        self.claimed_elsewhere += other.claimed_elsewhere;
        self.failed += other.failed;
    }
}

/// Sends due CommunicationRequests through RapidPro.
pub struct Dispatcher {
    store: SharedStore,
    client: RapidProClient,
    phones: Arc<PhoneNormalizer>,
    settings: MessagingSettings,
    instance: String,
    crash_at: Option<(Step, usize)>,
    steps_seen: AtomicUsize,
}

/// How one recipient is addressed: (RapidPro contact uuid, URN).
type ContactAddress = (Option<String>, Option<String>);

/// Outbox entries written per transaction.
const WRITE_CHUNK: usize = 500;

/// Whom a RapidPro call names.
#[derive(Clone, Copy)]
enum Target<'a> {
    /// `(contact uuid, urn)` per recipient; contacts preferred.
    People(&'a [ContactAddress]),
    /// Whole RapidPro groups (their active members).
    Groups(&'a [String]),
}

/// How a batch went at RapidPro.
enum BatchOutcome {
    /// Accepted as broadcast / flow start `uuid`; `refused` recipients
    /// (by index) were left out, with RapidPro's reason.
    Accepted {
        uuid: String,
        refused: Vec<(usize, String)>,
    },
    /// Refused as a whole (nothing created), with the reason.
    Refused(String),
}

impl Dispatcher {
    pub fn new(
        store: SharedStore,
        client: RapidProClient,
        phones: Arc<PhoneNormalizer>,
        settings: MessagingSettings,
    ) -> Self {
        let instance = settings.instance_name();
        Dispatcher {
            store,
            client,
            phones,
            settings,
            instance,
            crash_at: None,
            steps_seen: AtomicUsize::new(0),
        }
    }

    /// Fault injection for tests: stop (as if the process died) the
    /// `nth` time (1-based) the dispatcher reaches `step`.
    pub fn crash_at(mut self, step: Step, nth: usize) -> Self {
        self.crash_at = Some((step, nth));
        self
    }

    fn reached(&self, step: Step) -> Result<(), DispatchError> {
        if let Some((crash_step, nth)) = self.crash_at
            && crash_step == step
            && self.steps_seen.fetch_add(1, Ordering::SeqCst) + 1 == nth
        {
            return Err(DispatchError::Crashed(step));
        }
        Ok(())
    }

    /// One pass over the requests, now.
    pub async fn run_once(&self) -> Result<DispatchReport, DispatchError> {
        self.run_at(Utc::now()).await
    }

    /// One pass as if it were `now` (due times, leases).
    pub async fn run_at(&self, now: DateTime<Utc>) -> Result<DispatchReport, DispatchError> {
        let requests = search_all(
            self.store.as_ref(),
            "CommunicationRequest",
            vec![
                ("status".into(), "active,revoked".into()),
                ("_count".into(), "200".into()),
            ],
        )
        .await?;
        let mut report = DispatchReport::default();
        let mut first_error = None;
        for stored in requests {
            let reference = stored.reference();
            match self.process(stored, now).await {
                Ok(done) => report.add(&done),
                Err(crash @ DispatchError::Crashed(_)) => return Err(crash),
                Err(error) => {
                    report.failed += 1;
                    tracing::warn!(request = %reference, error = %crate::telemetry::redact_phones(&error.to_string()), "dispatch failed; will try again");
                    first_error.get_or_insert(error);
                }
            }
        }
        // A pass where nothing worked is an error (the job runner logs and
        // counts it); otherwise the report says how many failed.
        match first_error {
            Some(error) if report.requests == 0 => Err(error),
            _ => Ok(report),
        }
    }

    async fn process(
        &self,
        stored: StoredResource,
        now: DateTime<Utc>,
    ) -> Result<DispatchReport, DispatchError> {
        let mut report = DispatchReport::default();
        let state = DispatchState::read(&stored.resource);
        let status = stored.resource["status"].as_str().unwrap_or("").to_string();
        if status == "revoked" && state.phase != "dispatching" {
            return Ok(report);
        }
        let parsed = match MessageRequest::parse(&stored.resource) {
            Ok(parsed) => parsed,
            Err(problem) => {
                // Stored before validation existed, or through another path.
                if state.phase != "refused" {
                    let refused = DispatchState {
                        phase: "refused".into(),
                        notes: vec![problem.0],
                        ..Default::default()
                    };
                    self.write_state(&stored, &refused).await?;
                }
                return Ok(report);
            }
        };
        if parsed.schedule.is_some() {
            // A schedule parent: the scheduler creates its firings.
            return Ok(report);
        }
        if state.phase == "dispatched" {
            report.completed += self.complete_if_final(&stored).await? as usize;
            return Ok(report);
        }
        if state.phase == "refused" || (status == "active" && !parsed.occurrence.is_due(now)) {
            return Ok(report);
        }
        if state.claimed_by_other(&self.instance, now) {
            report.claimed_elsewhere += 1;
            return Ok(report);
        }
        // 1. Claim.
        let mut claim = DispatchState {
            phase: "dispatching".into(),
            owner: Some(self.instance.clone()),
            lease_until: Some(now + self.lease()),
            notes: state.notes.clone(),
        };
        let mut current = match self.write_state(&stored, &claim).await {
            Ok(current) => current,
            Err(StoreError::VersionConflict { .. }) => {
                report.claimed_elsewhere += 1;
                return Ok(report);
            }
            Err(other) => return Err(other.into()),
        };
        self.reached(Step::Claimed)?;
        report.requests += 1;
        let request_id = stored.id.clone();

        // 2. Reconcile what an interrupted pass left in preparation.
        let outbox = self.load_outbox(&request_id).await?;
        let cancelled = status == "revoked";
        report.add(&self.reconcile(&parsed, &outbox, cancelled).await?);

        // 3. Plan: everyone without an outbox entry yet.
        let resolution = resolve(
            self.store.as_ref(),
            &current.resource,
            &parsed,
            &self.phones,
        )
        .await?;
        claim.notes = resolution.warnings.clone();
        let expired = parsed.occurrence.has_expired(now);
        let mut not_done = Vec::new();
        let mut to_send: Vec<(usize, Vec<&Recipient>)> = Vec::new();
        for (index, delivery) in parsed.deliveries.iter().enumerate() {
            let key = delivery.key();
            let mut pending = Vec::new();
            for recipient in &resolution.recipients {
                let id = outbox::communication_id(&request_id, &key, &recipient.key);
                if outbox.contains_key(&id) {
                    continue;
                }
                let reason = match &recipient.reach {
                    Reach::Unreachable(reason) => Some(reason.clone()),
                    _ if cancelled => Some("the request was cancelled before this was sent".into()),
                    _ if expired => Some(
                        "the sending window (occurrencePeriod) ended before this was sent".into(),
                    ),
                    _ => None,
                };
                match reason {
                    Some(reason) => not_done.push(outbox::communication(
                        &current.resource,
                        &request_id,
                        delivery,
                        recipient,
                        &Planned::NotDone(reason),
                    )),
                    None => pending.push(recipient),
                }
            }
            if !pending.is_empty() {
                to_send.push((index, pending));
            }
        }
        report.not_done += not_done.len();
        for chunk in not_done.chunks(WRITE_CHUNK) {
            self.write_all(chunk).await?;
        }

        // 4. Send, batch by batch, renewing the claim as we go: one call
        //    naming the RapidPro groups when they hold exactly the people
        //    to reach, else batches of people.
        let groups = if outbox.is_empty() && not_done.is_empty() {
            self.whole_groups(&parsed, &resolution.recipients).await?
        } else {
            None
        };
        let mut batches: Vec<(&Delivery, Vec<&Recipient>)> = Vec::new();
        for (index, pending) in &to_send {
            let size = if groups.is_some() {
                pending.len()
            } else {
                self.settings.batch_size
            };
            for chunk in pending.chunks(size) {
                batches.push((&parsed.deliveries[*index], chunk.to_vec()));
            }
        }
        let groups = groups.unwrap_or_default();
        let per_renewal = self.settings.max_concurrent_calls * 10;
        for group in batches.chunks(per_renewal.max(1)) {
            let mut sends = Vec::with_capacity(group.len());
            for (delivery, recipients) in group {
                sends.push(self.send_batch(
                    &current.resource,
                    &request_id,
                    delivery,
                    recipients,
                    &groups,
                ));
            }
            let results: Vec<DispatchReport> = futures::stream::iter(sends)
                .buffer_unordered(self.settings.max_concurrent_calls)
                .try_collect()
                .await?;
            for done in &results {
                report.add(done);
            }
            claim.lease_until = Some(Utc::now().max(now) + self.lease());
            current = self.renew(&current, &claim).await?;
        }

        // 5. Done sending.
        claim.phase = if cancelled { "cancelled" } else { "dispatched" }.into();
        claim.lease_until = None;
        current = self.renew(&current, &claim).await?;
        if !cancelled {
            report.completed += self.complete_if_final(&current).await? as usize;
        }
        Ok(report)
    }

    /// The RapidPro group uuids to send to instead of people, when the
    /// request names only Groups linked to RapidPro groups, has no job
    /// filter, everyone can be reached through a known contact, and the
    /// groups' active contacts in RapidPro are exactly those people (a
    /// membership change not yet synced, or an opt-out, makes it `None`).
    async fn whole_groups(
        &self,
        parsed: &MessageRequest,
        recipients: &[Recipient],
    ) -> Result<Option<Vec<String>>, DispatchError> {
        if !parsed.job_filter.is_empty() || parsed.recipients.is_empty() {
            return Ok(None);
        }
        let mut group_ids = Vec::new();
        for recipient in &parsed.recipients {
            match recipient {
                RecipientRef::Literal { resource_type, id } if resource_type == "Group" => {
                    group_ids.push(id.clone())
                }
                _ => return Ok(None),
            }
        }
        let mut wanted: HashSet<&str> = HashSet::new();
        for recipient in recipients {
            match &recipient.reach {
                Reach::Reachable {
                    contact_uuid: Some(uuid),
                    ..
                } => {
                    wanted.insert(uuid.as_str());
                }
                _ => return Ok(None),
            }
        }
        let mut uuids = Vec::new();
        for id in &group_ids {
            let group = self.store.read("Group", id).await?;
            match outbox::identifier(&group.resource, GROUP_UUID_SYSTEM) {
                Some(uuid) => uuids.push(uuid),
                None => return Ok(None),
            }
        }
        let mut members: HashSet<String> = HashSet::new();
        for uuid in &uuids {
            let mut contacts = self.client.contacts(&ContactQuery {
                group: Some(uuid.clone()),
                ..Default::default()
            });
            while let Some(contact) = contacts.next().await {
                let contact = contact?;
                if contact.status == Some(ContactStatus::Active) {
                    members.insert(contact.uuid);
                }
            }
        }
        let same =
            members.len() == wanted.len() && members.iter().all(|m| wanted.contains(m.as_str()));
        Ok(same.then_some(uuids))
    }

    fn lease(&self) -> chrono::Duration {
        chrono::Duration::seconds(
            i64::try_from(self.settings.claim_lease_secs).unwrap_or(i64::MAX / 2),
        )
    }

    /// Writes `state` onto the request with `If-Match` on its version.
    async fn write_state(
        &self,
        stored: &StoredResource,
        state: &DispatchState,
    ) -> Result<StoredResource, StoreError> {
        let updated = state.apply(&stored.resource);
        let outcome = self
            .store
            .update(
                "CommunicationRequest",
                &stored.id,
                updated,
                Some(&stored.version_id),
            )
            .await?;
        Ok(outcome.stored)
    }

    /// Renews our claim; a client may have changed the request meanwhile
    /// (re-read and keep going), another dispatcher may have taken it
    /// (stop), or it may have been revoked (finish what is in flight, then
    /// the next pass cancels the rest).
    async fn renew(
        &self,
        current: &StoredResource,
        claim: &DispatchState,
    ) -> Result<StoredResource, DispatchError> {
        let mut current = current.clone();
        for _ in 0..8 {
            match self.write_state(&current, claim).await {
                Ok(stored) => return Ok(stored),
                Err(StoreError::VersionConflict { .. }) => {
                    current = self.store.read("CommunicationRequest", &current.id).await?;
                    let state = DispatchState::read(&current.resource);
                    if state.owner.as_deref() != Some(self.instance.as_str()) {
                        return Err(DispatchError::LostClaim(current.id.clone()));
                    }
                }
                Err(other) => return Err(other.into()),
            }
        }
        Err(DispatchError::LostClaim(current.id.clone()))
    }

    /// Every outbox entry of a request, by id.
    async fn load_outbox(
        &self,
        request_id: &str,
    ) -> Result<HashMap<String, StoredResource>, StoreError> {
        let entries = search_all(
            self.store.as_ref(),
            "Communication",
            vec![
                (
                    "based-on".into(),
                    format!("CommunicationRequest/{}", escape_search_value(request_id)),
                ),
                ("_count".into(), "1000".into()),
            ],
        )
        .await?;
        Ok(entries.into_iter().map(|s| (s.id.clone(), s)).collect())
    }

    /// `completed` when no outbox entry is still open.
    async fn complete_if_final(&self, stored: &StoredResource) -> Result<bool, DispatchError> {
        if stored.resource["status"] != "active" {
            return Ok(false);
        }
        Ok(complete_request_if_final(self.store.as_ref(), &stored.id).await?)
    }

    /// Writes resources with PUT in one transaction; returns id -> version.
    async fn write_all(&self, resources: &[Value]) -> Result<HashMap<String, String>, StoreError> {
        let entries: Vec<(&Value, Option<&str>)> = resources.iter().map(|r| (r, None)).collect();
        self.write_bundle(&entries).await
    }

    /// PUTs `(resource, If-Match version)` pairs in one transaction;
    /// returns id -> new version.
    async fn write_bundle(
        &self,
        resources: &[(&Value, Option<&str>)],
    ) -> Result<HashMap<String, String>, StoreError> {
        if resources.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<String> = resources
            .iter()
            .map(|(r, _)| r["id"].as_str().unwrap_or_default().to_string())
            .collect();
        let entries: Vec<Value> = resources
            .iter()
            .map(|(resource, if_match)| {
                let mut request = json!({
                    "method": "PUT",
                    "url": format!("Communication/{}", resource["id"].as_str().unwrap_or_default()),
                });
                if let Some(version) = if_match {
                    request["ifMatch"] = json!(format!("W/\"{version}\""));
                }
                json!({ "resource": *resource, "request": request })
            })
            .collect();
        let response = self
            .store
            .process_bundle(json!({
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": entries,
            }))
            .await?;
        let mut versions = HashMap::new();
        for (id, entry) in ids
            .into_iter()
            .zip(response["entry"].as_array().cloned().unwrap_or_default())
        {
            if let Some(version) = entry
                .pointer("/response/etag")
                .and_then(Value::as_str)
                .and_then(parse_etag)
            {
                versions.insert(id, version);
            }
        }
        Ok(versions)
    }

    /// Plans, sends and marks one batch.
    async fn send_batch(
        &self,
        request: &Value,
        request_id: &str,
        delivery: &Delivery,
        recipients: &[&Recipient],
        groups: &[String],
    ) -> Result<DispatchReport, DispatchError> {
        let batch = uuid::Uuid::new_v4().to_string();
        let planned = Planned::Preparation {
            batch: batch.clone(),
            groups: groups.to_vec(),
        };
        let entries: Vec<Value> = recipients
            .iter()
            .map(|r| outbox::communication(request, request_id, delivery, r, &planned))
            .collect();
        let mut versions = HashMap::new();
        for chunk in entries.chunks(WRITE_CHUNK) {
            versions.extend(self.write_all(chunk).await?);
        }
        self.reached(Step::BatchPrepared)?;
        let addresses: Vec<ContactAddress> = recipients
            .iter()
            .map(|r| match Address::of(r) {
                Some(Address::Contact(uuid)) => (Some(uuid), Address::urn_of(r)),
                _ => (None, Address::urn_of(r)),
            })
            .collect();
        let target = if groups.is_empty() {
            Target::People(&addresses)
        } else {
            Target::Groups(groups)
        };
        let outcome = self.call(delivery, &batch, target).await?;
        let mut report = DispatchReport::default();
        if matches!(outcome, BatchOutcome::Accepted { .. }) {
            report.batches_sent += 1;
        }
        self.reached(Step::BatchSent)?;
        let stored: Vec<(Value, Option<String>)> = entries
            .into_iter()
            .map(|e| {
                let version = versions.get(e["id"].as_str().unwrap_or_default()).cloned();
                (e, version)
            })
            .collect();
        report.add(&self.mark(delivery, stored, outcome).await?);
        self.reached(Step::BatchMarked)?;
        Ok(report)
    }

    /// Marks a batch's entries from RapidPro's answer.
    async fn mark(
        &self,
        delivery: &Delivery,
        entries: Vec<(Value, Option<String>)>,
        outcome: BatchOutcome,
    ) -> Result<DispatchReport, DispatchError> {
        let mut report = DispatchReport::default();
        let system = match delivery {
            Delivery::Message(_) => BROADCAST_SYSTEM,
            Delivery::Flow { .. } => FLOW_START_SYSTEM,
        };
        let updates: Vec<(Value, Option<String>)> = entries
            .into_iter()
            .enumerate()
            .map(|(i, (entry, version))| {
                let updated = match &outcome {
                    BatchOutcome::Refused(reason) => {
                        report.not_done += 1;
                        outbox::refused(entry, reason)
                    }
                    BatchOutcome::Accepted { uuid, refused } => {
                        match refused.iter().find(|(index, _)| *index == i) {
                            Some((_, reason)) => {
                                report.not_done += 1;
                                outbox::refused(entry, reason)
                            }
                            None => {
                                report.sent += 1;
                                outbox::accepted(entry, system, uuid)
                            }
                        }
                    }
                };
                (updated, version)
            })
            .collect();
        for chunk in updates.chunks(WRITE_CHUNK) {
            self.write_marks(chunk).await?;
        }
        Ok(report)
    }

    /// Writes marked entries in one transaction, or one by one (only what
    /// is still in preparation) if a delivery update got there first.
    async fn write_marks(&self, updates: &[(Value, Option<String>)]) -> Result<(), DispatchError> {
        let entries: Vec<(&Value, Option<&str>)> =
            updates.iter().map(|(r, v)| (r, v.as_deref())).collect();
        match self.write_bundle(&entries).await {
            Ok(_) => {}
            Err(StoreError::TransactionEntry { .. }) | Err(StoreError::VersionConflict { .. }) => {
                for (updated, _) in updates.iter() {
                    let id = updated["id"].as_str().unwrap_or_default().to_string();
                    crate::store::modify_resource(
                        self.store.as_ref(),
                        "Communication",
                        &id,
                        |current| {
                            (current["status"] == "preparation").then(|| {
                                let mut merged = current.clone();
                                merged["status"] = updated["status"].clone();
                                merged["identifier"] = updated["identifier"].clone();
                                if let Some(reason) = updated.get("statusReason") {
                                    merged["statusReason"] = reason.clone();
                                }
                                merged
                            })
                        },
                    )
                    .await?;
                }
            }
            Err(other) => return Err(other.into()),
        }
        Ok(())
    }

    /// Creates the broadcast or flow start of a batch. Addresses are
    /// `(contact uuid, urn)`; contacts are preferred. Certain refusals are
    /// returned as outcomes; doubtful failures as errors.
    async fn call(
        &self,
        delivery: &Delivery,
        batch: &str,
        target: Target<'_>,
    ) -> Result<BatchOutcome, DispatchError> {
        let (addresses, groups): (&[ContactAddress], Vec<String>) = match target {
            Target::People(addresses) => (addresses, Vec::new()),
            Target::Groups(groups) => (&[], groups.to_vec()),
        };
        let mut use_urns_only = false;
        let mut refused: Vec<(usize, String)> = Vec::new();
        for _attempt in 0..3 {
            // Positions in the call -> positions in the batch.
            let mut contacts = Vec::new();
            let mut urns = Vec::new();
            let mut urn_positions = Vec::new();
            for (i, (contact, urn)) in addresses.iter().enumerate() {
                if refused.iter().any(|(r, _)| *r == i) {
                    continue;
                }
                match (contact, urn) {
                    (Some(c), _) if !use_urns_only => contacts.push(c.clone()),
                    (_, Some(u)) => {
                        urns.push(u.clone());
                        urn_positions.push(i);
                    }
                    (Some(c), None) => contacts.push(c.clone()),
                    (None, None) => refused.push((i, "no address".into())),
                }
            }
            if contacts.is_empty() && urns.is_empty() && groups.is_empty() {
                return Ok(BatchOutcome::Refused(
                    refused
                        .first()
                        .map(|(_, r)| r.clone())
                        .unwrap_or_else(|| "no recipients".into()),
                ));
            }
            let result = match delivery {
                Delivery::Message(text) => self
                    .client
                    .create_broadcast(&BroadcastWrite {
                        urns,
                        contacts,
                        groups: groups.clone(),
                        text: Some(broadcast_text(text)),
                        base_language: match text {
                            MessageText::Translated { base_language, .. } => {
                                Some(base_language.clone())
                            }
                            MessageText::Plain(_) => None,
                        },
                        ..Default::default()
                    })
                    .await
                    .map(|b| b.uuid.unwrap_or_default()),
                Delivery::Flow {
                    uuid,
                    params,
                    restart_participants,
                    exclude_active,
                } => {
                    let mut params: Map<String, Value> = params.clone();
                    params.insert(BATCH_PARAM.into(), json!(batch));
                    self.client
                        .create_flow_start(&FlowStartWrite {
                            flow: uuid.clone(),
                            contacts,
                            urns,
                            groups: groups.clone(),
                            restart_participants: *restart_participants,
                            exclude_active: *exclude_active,
                            params: Some(params),
                        })
                        .await
                        .map(|s| s.uuid)
                }
            };
            match result {
                Ok(uuid) => return Ok(BatchOutcome::Accepted { uuid, refused }),
                Err(RapidProError::Invalid(errors)) => {
                    let urn_errors = errors.urn_errors();
                    if !urn_errors.is_empty() {
                        for (index, message) in urn_errors {
                            if let Some(position) = urn_positions.get(index) {
                                refused.push((
                                    *position,
                                    format!("RapidPro refused the number: {message}"),
                                ));
                            }
                        }
                        continue;
                    }
                    if !errors.for_field("contacts").is_empty() && !use_urns_only {
                        // A contact UUID RapidPro no longer knows: the URNs
                        // reach the same people (and recreate the contact).
                        use_urns_only = true;
                        continue;
                    }
                    return Ok(BatchOutcome::Refused(format!(
                        "RapidPro refused the {}: {errors}",
                        match delivery {
                            Delivery::Message(_) => "broadcast",
                            Delivery::Flow { .. } => "flow start",
                        }
                    )));
                }
                Err(other) => return Err(other.into()),
            }
        }
        Ok(BatchOutcome::Refused(
            "RapidPro kept refusing the batch".into(),
        ))
    }

    /// Batches left in `preparation`: found in RapidPro -> marked; not
    /// found -> sent now (or, for a cancelled request, `not-done`).
    async fn reconcile(
        &self,
        parsed: &MessageRequest,
        outbox: &HashMap<String, StoredResource>,
        cancelled: bool,
    ) -> Result<DispatchReport, DispatchError> {
        let mut report = DispatchReport::default();
        let mut batches: BTreeMap<String, Vec<&StoredResource>> = BTreeMap::new();
        for entry in outbox.values() {
            if entry.resource["status"] == "preparation"
                && let Some(batch) = outbox::identifier(&entry.resource, BATCH_SYSTEM)
            {
                batches.entry(batch).or_default().push(entry);
            }
        }
        for (batch, mut entries) in batches {
            entries.sort_by(|a, b| a.id.cmp(&b.id));
            let key = outbox::delivery_key(&entries[0].resource).unwrap_or_default();
            let Some(delivery) = parsed.deliveries.iter().find(|d| d.key() == key) else {
                continue;
            };
            let addresses: Vec<ContactAddress> = entries
                .iter()
                .map(|e| outbox::address(&e.resource))
                .collect();
            let prepared_at = entries
                .iter()
                .map(|e| e.last_updated)
                .min()
                .unwrap_or_else(Utc::now);
            let stored: Vec<(Value, Option<String>)> = entries
                .iter()
                .map(|e| (e.resource.clone(), Some(e.version_id.clone())))
                .collect();
            let groups = outbox::groups(&entries[0].resource);
            let target = if groups.is_empty() {
                Target::People(&addresses)
            } else {
                Target::Groups(&groups)
            };
            let outcome = match self
                .find_in_rapidpro(delivery, &batch, target, prepared_at)
                .await?
            {
                Some(uuid) => {
                    report.reconciled += 1;
                    BatchOutcome::Accepted {
                        uuid,
                        refused: Vec::new(),
                    }
                }
                None if cancelled => {
                    BatchOutcome::Refused("the request was cancelled before this was sent".into())
                }
                None => {
                    let outcome = self.call(delivery, &batch, target).await?;
                    if matches!(outcome, BatchOutcome::Accepted { .. }) {
                        report.batches_sent += 1;
                    }
                    self.reached(Step::BatchSent)?;
                    outcome
                }
            };
            report.add(&self.mark(delivery, stored, outcome).await?);
        }
        Ok(report)
    }

    /// The broadcast / flow start RapidPro made of `batch`, if any.
    async fn find_in_rapidpro(
        &self,
        delivery: &Delivery,
        batch: &str,
        target: Target<'_>,
        prepared_at: DateTime<Utc>,
    ) -> Result<Option<String>, DispatchError> {
        // Clocks differ: look a little before the batch was written.
        let query = TimeQuery {
            after: Some(prepared_at - chrono::Duration::minutes(10)),
            ..Default::default()
        };
        match delivery {
            Delivery::Flow { .. } => {
                let mut starts = self.client.flow_starts(&query);
                while let Some(start) = starts.next().await {
                    let start = start?;
                    let params = start.params.as_ref().or(start.extra.as_ref());
                    if params
                        .and_then(|p| p.get(BATCH_PARAM))
                        .and_then(Value::as_str)
                        == Some(batch)
                    {
                        return Ok(Some(start.uuid));
                    }
                }
                Ok(None)
            }
            Delivery::Message(text) => {
                let (addresses, groups): (&[ContactAddress], &[String]) = match target {
                    Target::People(addresses) => (addresses, &[]),
                    Target::Groups(groups) => (&[], groups),
                };
                let wanted_groups: HashSet<&str> = groups.iter().map(String::as_str).collect();
                let wanted_contacts: HashSet<&str> =
                    addresses.iter().filter_map(|(c, _)| c.as_deref()).collect();
                let wanted_urns: HashSet<&str> =
                    addresses.iter().filter_map(|(_, u)| u.as_deref()).collect();
                let mut broadcasts = self.client.broadcasts(&query);
                while let Some(broadcast) = broadcasts.next().await {
                    let broadcast = broadcast?;
                    let same_text = match &broadcast.text {
                        Some(Translated::Plain(t)) => t == text.base(),
                        Some(Translated::ByLanguage(map)) => map.values().any(|t| t == text.base()),
                        None => false,
                    };
                    if !same_text {
                        continue;
                    }
                    if !wanted_groups.is_empty() {
                        let named: HashSet<&str> =
                            broadcast.groups.iter().map(|g| g.uuid.as_str()).collect();
                        if named == wanted_groups {
                            return Ok(broadcast.uuid);
                        }
                        continue;
                    }
                    let contacts: HashSet<&str> =
                        broadcast.contacts.iter().map(|c| c.uuid.as_str()).collect();
                    let urns: HashSet<&str> = broadcast
                        .urns
                        .iter()
                        .flatten()
                        .map(String::as_str)
                        .collect();
                    // Every recipient of the batch is in the broadcast, by
                    // contact or by URN, and nobody else.
                    let all_in = addresses.iter().all(|(c, u)| {
                        c.as_deref().is_some_and(|c| contacts.contains(c))
                            || u.as_deref().is_some_and(|u| urns.contains(u))
                    });
                    let nobody_else = contacts.iter().all(|c| wanted_contacts.contains(c))
                        && urns.iter().all(|u| wanted_urns.contains(u));
                    if all_in && nobody_else && !addresses.is_empty() {
                        return Ok(broadcast.uuid);
                    }
                }
                Ok(None)
            }
        }
    }
}

/// Marks `CommunicationRequest/<request_id>` `completed` (with `If-Match`)
/// when it is `active` and none of its outbox entries is still open
/// (`preparation`, `in-progress`, `on-hold`). Shared by the dispatcher and
/// the delivery / flow-result updates. True when it changed.
pub async fn complete_request_if_final(
    store: &dyn crate::store::FhirStore,
    request_id: &str,
) -> Result<bool, StoreError> {
    let open = store
        .search(SearchRequest {
            resource_type: "Communication".into(),
            params: vec![
                (
                    "based-on".into(),
                    format!("CommunicationRequest/{}", escape_search_value(request_id)),
                ),
                ("status".into(), "preparation,in-progress,on-hold".into()),
                ("_summary".into(), "count".into()),
            ],
            cursor: None,
            lenient: false,
        })
        .await?
        .total
        .unwrap_or(1);
    if open > 0 {
        return Ok(false);
    }
    let result =
        crate::store::modify_resource(store, "CommunicationRequest", request_id, |current| {
            (current["status"] == "active").then(|| {
                let mut updated = current.clone();
                updated["status"] = json!("completed");
                updated
            })
        })
        .await?;
    Ok(result.is_some())
}

fn broadcast_text(text: &MessageText) -> Translated<String> {
    match text {
        MessageText::Plain(t) => Translated::Plain(t.clone()),
        MessageText::Translated { texts, .. } => Translated::ByLanguage(texts.clone()),
    }
}

/// The dispatcher as a `serve` job.
pub struct DispatchJob(pub Dispatcher);

#[async_trait]
impl super::runner::Job for DispatchJob {
    fn name(&self) -> &'static str {
        "dispatch"
    }

    async fn run_once(&self) -> Result<String, String> {
        self.0
            .run_once()
            .await
            .map(|r| {
                format!(
                    "{} requests, {} batches sent, {} recipients sent, {} not sent, {} reconciled, {} completed",
                    r.requests, r.batches_sent, r.sent, r.not_done, r.reconciled, r.completed
                )
            })
            .map_err(|e| e.to_string())
    }
}
