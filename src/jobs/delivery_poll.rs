//! Delivery status of sent messages, from RapidPro into the outbox.
//!
//! A pass ([`DeliveryPoll::run_once`]) reads the outbox entries still
//! `in-progress` and moves each forward, forward only and with `If-Match`
//! (a re-poll, or an older answer, changes nothing):
//!
//! - **Broadcast entries**: RapidPro is asked for the messages of each open
//!   broadcast (`messages.json?broadcast=<id>`, the id recorded at
//!   dispatch). `wired`/`sent` -> `completed` with `sent`;
//!   `delivered`/`read` -> `completed` with `sent` and `received`; `failed`
//!   -> `not-done` with a coded reason (the contact's RapidPro status, no
//!   route, or a channel error). `queued`, `handled` and `errored` (RapidPro
//!   still retries) wait. An entry with no message makes the pass ask for
//!   the broadcast: `failed` -> `not-done` (broadcast failed); `completed`
//!   -> the messages are read again and an entry still without one is
//!   `not-done` (RapidPro skipped the contact).
//! - **Flow-start entries**: RapidPro is asked for each open flow start
//!   (`flow_starts.json?uuid=`); `failed` or `interrupted` -> `not-done`.
//!   Otherwise the run decides (`pipeline::flow_results`).
//!
//! Requests whose outbox became final are then `completed`.
//!
//! RapidPro filters messages by creation time only, so a cursor cannot see
//! status changes; asking per open broadcast can, and costs one call per
//! broadcast still open (at most 100 recipients each).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::fhir::format_instant;
use crate::pipeline::outbox::{self, BROADCAST_ID_SYSTEM, BROADCAST_SYSTEM, FLOW_START_SYSTEM};
use crate::rapidpro::client::{
    ContactQuery, MessageQuery, RapidProClient, RapidProError, TimeQuery,
};
use crate::rapidpro::types::{ContactStatus, JobStatus, Message, MessageStatus};
use crate::store::{SharedStore, StoreError, StoredResource, modify_resource, search_all};

#[derive(Debug, thiserror::Error)]
pub enum DeliveryPollError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    RapidPro(#[from] RapidProError),
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Broadcasts asked about.
    pub broadcasts: usize,
    /// Flow starts asked about.
    pub flow_starts: usize,
    /// Entries that became `completed` (sent or delivered).
    pub delivered: usize,
    /// Entries that became `not-done` (RapidPro failed or skipped them).
    pub failed: usize,
    /// Entries still waiting for a final status.
    pub waiting: usize,
    /// Requests that became `completed`.
    pub completed_requests: usize,
}

impl std::fmt::Display for DeliveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "delivery: {} broadcasts and {} flow starts read: {} recipients delivered or sent, {} failed, {} still waiting; {} requests completed",
            self.broadcasts,
            self.flow_starts,
            self.delivered,
            self.failed,
            self.waiting,
            self.completed_requests
        )
    }
}

/// Brings RapidPro's delivery status into the outbox.
pub struct DeliveryPoll {
    pub store: SharedStore,
    pub client: RapidProClient,
}

/// The code system of `Communication.statusReason` for entries RapidPro
/// did not deliver (`fhir-profiles/CodeSystem-mhero-delivery-failure.json`).
pub const FAILURE_CODE_SYSTEM: &str = "http://mhero.org/fhir/CodeSystem/mhero-delivery-failure";

/// Why an entry was not delivered, as far as RapidPro's API tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    ContactStopped,
    ContactBlocked,
    ContactArchived,
    NoRoute,
    ChannelError,
    NotSent,
    BroadcastFailed,
    FlowStartFailed,
}

impl FailureReason {
    pub fn code(self) -> &'static str {
        match self {
            FailureReason::ContactStopped => "contact-stopped",
            FailureReason::ContactBlocked => "contact-blocked",
            FailureReason::ContactArchived => "contact-archived",
            FailureReason::NoRoute => "no-route",
            FailureReason::ChannelError => "channel-error",
            FailureReason::NotSent => "not-sent",
            FailureReason::BroadcastFailed => "broadcast-failed",
            FailureReason::FlowStartFailed => "flow-start-failed",
        }
    }

    fn display(self) -> &'static str {
        match self {
            FailureReason::ContactStopped => "Contact stopped",
            FailureReason::ContactBlocked => "Contact blocked",
            FailureReason::ContactArchived => "Contact archived",
            FailureReason::NoRoute => "No route",
            FailureReason::ChannelError => "Channel error",
            FailureReason::NotSent => "No message created",
            FailureReason::BroadcastFailed => "Broadcast failed",
            FailureReason::FlowStartFailed => "Flow start failed",
        }
    }

    fn text(self) -> &'static str {
        match self {
            FailureReason::ContactStopped => {
                "RapidPro did not deliver the message: the contact is stopped (opted out)"
            }
            FailureReason::ContactBlocked => {
                "RapidPro did not deliver the message: the contact is blocked"
            }
            FailureReason::ContactArchived => {
                "RapidPro did not deliver the message: the contact is archived or gone"
            }
            FailureReason::NoRoute => {
                "RapidPro did not deliver the message: no channel can send to this contact's number"
            }
            FailureReason::ChannelError => {
                "RapidPro could not deliver the message: the channel failed (retries ran out)"
            }
            FailureReason::NotSent => {
                "RapidPro finished the broadcast without a message for this contact (stopped, blocked or archived)"
            }
            FailureReason::BroadcastFailed => "RapidPro marked the broadcast failed",
            FailureReason::FlowStartFailed => {
                "RapidPro marked the flow start failed or interrupted it (an archived flow?)"
            }
        }
    }

    /// The `statusReason` CodeableConcept.
    pub fn status_reason(self) -> Value {
        json!({
            "coding": [{
                "system": FAILURE_CODE_SYSTEM,
                "code": self.code(),
                "display": self.display(),
            }],
            "text": self.text(),
        })
    }
}

/// What a message's status means for its outbox entry.
enum Outcome {
    Sent {
        sent: Option<DateTime<Utc>>,
        received: Option<DateTime<Utc>>,
    },
    Failed(FailureReason),
    Waiting,
}

/// RapidPro reads in flight at once (the client's throttle still paces
/// them).
const CONCURRENT_READS: usize = 4;

/// Failed messages whose contact is looked up in one pass, at most (one
/// call each); beyond that the reason comes from the message alone.
const CONTACT_LOOKUPS_PER_PASS: usize = 50;

/// Messages of one broadcast, by contact uuid and by URN.
#[derive(Default)]
struct BroadcastMessages {
    by_contact: BTreeMap<String, Message>,
    by_urn: BTreeMap<String, Message>,
}

impl BroadcastMessages {
    fn find(&self, entry: &StoredResource) -> Option<&Message> {
        let (contact, urn) = outbox::address(&entry.resource);
        contact
            .as_ref()
            .and_then(|c| self.by_contact.get(c))
            .or_else(|| urn.as_ref().and_then(|u| self.by_urn.get(u)))
    }
}

/// One pass's state: the report, the requests touched, and the contact
/// statuses already asked for.
#[derive(Default)]
struct Pass {
    report: DeliveryReport,
    requests: BTreeSet<String>,
    contact_status: HashMap<String, Option<ContactStatus>>,
}

impl DeliveryPoll {
    pub async fn run_once(&self) -> Result<DeliveryReport, DeliveryPollError> {
        let open = search_all(
            self.store.as_ref(),
            "Communication",
            vec![
                ("status".into(), "in-progress".into()),
                ("_count".into(), "1000".into()),
            ],
        )
        .await?;
        let mut by_broadcast: BTreeMap<i64, Vec<StoredResource>> = BTreeMap::new();
        let mut by_flow_start: BTreeMap<String, Vec<StoredResource>> = BTreeMap::new();
        for entry in open {
            if let Some(id) = outbox::identifier(&entry.resource, BROADCAST_ID_SYSTEM)
                .and_then(|id| id.parse().ok())
            {
                by_broadcast.entry(id).or_default().push(entry);
            } else if let Some(start) = outbox::identifier(&entry.resource, FLOW_START_SYSTEM) {
                by_flow_start.entry(start).or_default().push(entry);
            }
        }
        let mut pass = Pass::default();
        // The messages of a few broadcasts are read at once (the calls
        // wait on RapidPro); each is settled as its answer comes, in order.
        let mut fetched = futures::stream::iter(by_broadcast)
            .map(|(broadcast, entries)| async move {
                (broadcast, self.messages_of(broadcast).await, entries)
            })
            .buffered(CONCURRENT_READS);
        while let Some((broadcast, messages, entries)) = fetched.next().await {
            self.poll_broadcast(broadcast, messages?, entries, &mut pass)
                .await?;
        }
        for (start, entries) in by_flow_start {
            self.poll_flow_start(&start, entries, &mut pass).await?;
        }
        for request in &pass.requests {
            if super::dispatch::complete_if_final(self.store.as_ref(), request).await? {
                pass.report.completed_requests += 1;
            }
        }
        Ok(pass.report)
    }

    async fn messages_of(&self, broadcast: i64) -> Result<BroadcastMessages, RapidProError> {
        let mut messages = self.client.messages(&MessageQuery {
            broadcast: Some(broadcast),
            ..Default::default()
        });
        let mut found = BroadcastMessages::default();
        while let Some(message) = messages.next().await {
            let message = message?;
            if let Some(contact) = &message.contact {
                found
                    .by_contact
                    .insert(contact.uuid.clone(), message.clone());
            }
            if let Some(urn) = &message.urn {
                found.by_urn.insert(urn.clone(), message);
            }
        }
        Ok(found)
    }

    async fn poll_broadcast(
        &self,
        broadcast: i64,
        mut messages: BroadcastMessages,
        entries: Vec<StoredResource>,
        pass: &mut Pass,
    ) -> Result<(), DeliveryPollError> {
        pass.report.broadcasts += 1;
        let mut missing = Vec::new();
        for entry in entries {
            let Some(message) = messages.find(&entry).cloned() else {
                missing.push(entry);
                continue;
            };
            let outcome = self.outcome(&message, pass).await?;
            self.settle(&entry, outcome, pass).await?;
        }
        if missing.is_empty() {
            return Ok(());
        }
        let uuid = outbox::identifier(&missing[0].resource, BROADCAST_SYSTEM);
        let status = match uuid {
            Some(uuid) => self
                .client
                .broadcasts(&TimeQuery {
                    uuid: Some(uuid),
                    ..Default::default()
                })
                .next()
                .await
                .transpose()?
                .and_then(|b| b.status),
            None => None,
        };
        match status {
            Some(JobStatus::Failed) => {
                for entry in missing {
                    let outcome = Outcome::Failed(FailureReason::BroadcastFailed);
                    self.settle(&entry, outcome, pass).await?;
                }
            }
            Some(JobStatus::Completed) => {
                // Read again: a message created between the first read and
                // the broadcast completing must not be taken as skipped.
                messages = self.messages_of(broadcast).await?;
                for entry in missing {
                    let outcome = match messages.find(&entry).cloned() {
                        Some(message) => self.outcome(&message, pass).await?,
                        None => Outcome::Failed(FailureReason::NotSent),
                    };
                    self.settle(&entry, outcome, pass).await?;
                }
            }
            _ => pass.report.waiting += missing.len(),
        }
        Ok(())
    }

    async fn poll_flow_start(
        &self,
        start: &str,
        entries: Vec<StoredResource>,
        pass: &mut Pass,
    ) -> Result<(), DeliveryPollError> {
        pass.report.flow_starts += 1;
        let status = self
            .client
            .flow_starts(&TimeQuery {
                uuid: Some(start.to_string()),
                ..Default::default()
            })
            .next()
            .await
            .transpose()?
            .and_then(|s| s.status);
        if matches!(
            status,
            Some(JobStatus::Failed) | Some(JobStatus::Interrupted)
        ) {
            for entry in entries {
                let outcome = Outcome::Failed(FailureReason::FlowStartFailed);
                self.settle(&entry, outcome, pass).await?;
            }
        } else {
            pass.report.waiting += entries.len();
        }
        Ok(())
    }

    /// What `message`'s status means; for a failed one, why (asking
    /// RapidPro for the contact's status, at most
    /// `CONTACT_LOOKUPS_PER_PASS` times a pass).
    async fn outcome(&self, message: &Message, pass: &mut Pass) -> Result<Outcome, RapidProError> {
        Ok(match message.status {
            Some(MessageStatus::Wired) | Some(MessageStatus::Sent) => Outcome::Sent {
                sent: message.sent_on.or(message.modified_on),
                received: None,
            },
            Some(MessageStatus::Delivered) | Some(MessageStatus::Read) => Outcome::Sent {
                sent: message.sent_on,
                received: message.modified_on.or(message.sent_on),
            },
            Some(MessageStatus::Failed) => Outcome::Failed(self.failure(message, pass).await?),
            _ => Outcome::Waiting,
        })
    }

    async fn failure(
        &self,
        message: &Message,
        pass: &mut Pass,
    ) -> Result<FailureReason, RapidProError> {
        let no_route = message.channel.is_none() || message.urn.is_none();
        let Some(contact) = message.contact.as_ref().map(|c| c.uuid.clone()) else {
            return Ok(reason_from_message(no_route));
        };
        let status = match pass.contact_status.get(&contact) {
            Some(status) => status.clone(),
            None if pass.contact_status.len() < CONTACT_LOOKUPS_PER_PASS => {
                let found = self
                    .client
                    .contacts(&ContactQuery {
                        uuid: Some(contact.clone()),
                        ..Default::default()
                    })
                    .next()
                    .await
                    .transpose()?;
                let status = match found {
                    Some(contact) => contact.status,
                    None => Some(ContactStatus::Archived),
                };
                pass.contact_status.insert(contact, status.clone());
                status
            }
            None => return Ok(reason_from_message(no_route)),
        };
        Ok(match status {
            Some(ContactStatus::Stopped) => FailureReason::ContactStopped,
            Some(ContactStatus::Blocked) => FailureReason::ContactBlocked,
            Some(ContactStatus::Archived) => FailureReason::ContactArchived,
            _ => reason_from_message(no_route),
        })
    }

    /// Moves `entry` by `outcome` and counts it.
    async fn settle(
        &self,
        entry: &StoredResource,
        outcome: Outcome,
        pass: &mut Pass,
    ) -> Result<(), StoreError> {
        if matches!(outcome, Outcome::Waiting) {
            pass.report.waiting += 1;
            return Ok(());
        }
        let changed = modify_resource(self.store.as_ref(), "Communication", &entry.id, |current| {
            apply(current, &outcome)
        })
        .await?;
        if changed.is_some() {
            match outcome {
                Outcome::Failed(_) => pass.report.failed += 1,
                _ => pass.report.delivered += 1,
            }
            if let Some(request) = entry.resource["basedOn"][0]["reference"]
                .as_str()
                .and_then(|r| r.strip_prefix("CommunicationRequest/"))
            {
                pass.requests.insert(request.to_string());
            }
        }
        Ok(())
    }
}

fn reason_from_message(no_route: bool) -> FailureReason {
    if no_route {
        FailureReason::NoRoute
    } else {
        FailureReason::ChannelError
    }
}

/// The entry moved forward by `outcome`, or `None` if it already moved.
fn apply(current: &Value, outcome: &Outcome) -> Option<Value> {
    if current["status"] != "in-progress" {
        return None;
    }
    let mut updated = current.clone();
    match outcome {
        Outcome::Sent { sent, received } => {
            updated["status"] = json!("completed");
            if let Some(sent) = sent {
                updated["sent"] = json!(format_instant(sent));
            }
            if let Some(received) = received {
                updated["received"] = json!(format_instant(received));
            }
        }
        Outcome::Failed(reason) => {
            updated["status"] = json!("not-done");
            updated["statusReason"] = reason.status_reason();
        }
        Outcome::Waiting => return None,
    }
    Some(updated)
}

/// The delivery poll as a `serve` job.
pub struct DeliveryPollJob(pub DeliveryPoll);

#[async_trait]
impl super::runner::Job for DeliveryPollJob {
    fn name(&self) -> &'static str {
        "delivery_poll"
    }

    async fn run_once(&self) -> Result<String, String> {
        super::runner::pass_outcome(self.0.run_once().await)
    }
}
