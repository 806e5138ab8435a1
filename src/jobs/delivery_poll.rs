//! Delivery status of sent messages, from RapidPro into the outbox.
//!
//! A pass ([`DeliveryPoll::run_once`]) reads the outbox entries still
//! `in-progress` that were sent as a broadcast, asks RapidPro for the
//! messages of each of those broadcasts (`messages.json?broadcast=<id>`,
//! the id recorded at dispatch), and moves each entry forward:
//! `wired`/`sent` -> `completed` with `sent`; `delivered`/`read` ->
//! `completed` with `sent` and `received`; `failed` -> `not-done` with a
//! reason. `queued`, `handled` and `errored` (RapidPro still retries) stay
//! `in-progress`. Entries only move forward, with `If-Match` (a re-poll, or
//! an older answer, changes nothing). Requests whose outbox became final are
//! then `completed`.
//!
//! RapidPro filters messages by creation time only, so a cursor cannot see
//! status changes; asking per open broadcast can, and costs one call per
//! broadcast still open (at most 100 recipients each).

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::fhir::format_instant;
use crate::pipeline::outbox::{self, BROADCAST_ID_SYSTEM};
use crate::rapidpro::client::{MessageQuery, RapidProClient, RapidProError};
use crate::rapidpro::types::{Message, MessageStatus};
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
    /// Entries that became `completed` (sent or delivered).
    pub delivered: usize,
    /// Entries that became `not-done` (RapidPro failed the message).
    pub failed: usize,
    /// Entries still waiting for a final status.
    pub waiting: usize,
    /// Requests that became `completed`.
    pub completed_requests: usize,
}

/// Brings RapidPro's delivery status into the outbox.
pub struct DeliveryPoll {
    pub store: SharedStore,
    pub client: RapidProClient,
}

/// What a message's status means for its outbox entry.
enum Outcome {
    Sent {
        sent: Option<DateTime<Utc>>,
        received: Option<DateTime<Utc>>,
    },
    Failed,
    Waiting,
}

fn outcome(message: &Message) -> Outcome {
    match message.status {
        Some(MessageStatus::Wired) | Some(MessageStatus::Sent) => Outcome::Sent {
            sent: message.sent_on.or(message.modified_on),
            received: None,
        },
        Some(MessageStatus::Delivered) | Some(MessageStatus::Read) => Outcome::Sent {
            sent: message.sent_on,
            received: message.modified_on.or(message.sent_on),
        },
        Some(MessageStatus::Failed) => Outcome::Failed,
        _ => Outcome::Waiting,
    }
}

/// A failed message's reason, in words. RapidPro's API does not say which
/// of its failure reasons applied.
const FAILED_REASON: &str = "RapidPro could not deliver the message (the contact is blocked, stopped or archived, has no usable number or channel, or the channel failed)";

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
        for entry in open {
            if let Some(id) = outbox::identifier(&entry.resource, BROADCAST_ID_SYSTEM)
                .and_then(|id| id.parse().ok())
            {
                by_broadcast.entry(id).or_default().push(entry);
            }
        }
        let mut report = DeliveryReport::default();
        let mut requests: BTreeSet<String> = BTreeSet::new();
        for (broadcast, entries) in by_broadcast {
            report.broadcasts += 1;
            let mut messages = self.client.messages(&MessageQuery {
                broadcast: Some(broadcast),
                ..Default::default()
            });
            let mut by_contact: BTreeMap<String, Message> = BTreeMap::new();
            let mut by_urn: BTreeMap<String, Message> = BTreeMap::new();
            while let Some(message) = messages.next().await {
                let message = message?;
                if let Some(contact) = &message.contact {
                    by_contact.insert(contact.uuid.clone(), message.clone());
                }
                if let Some(urn) = &message.urn {
                    by_urn.insert(urn.clone(), message);
                }
            }
            for entry in entries {
                let (contact, urn) = outbox::address(&entry.resource);
                let message = contact
                    .as_ref()
                    .and_then(|c| by_contact.get(c))
                    .or_else(|| urn.as_ref().and_then(|u| by_urn.get(u)));
                let Some(message) = message else {
                    report.waiting += 1;
                    continue;
                };
                let outcome = outcome(message);
                if matches!(outcome, Outcome::Waiting) {
                    report.waiting += 1;
                    continue;
                }
                let changed =
                    modify_resource(self.store.as_ref(), "Communication", &entry.id, |current| {
                        apply(current, &outcome)
                    })
                    .await?;
                if changed.is_some() {
                    match outcome {
                        Outcome::Failed => report.failed += 1,
                        _ => report.delivered += 1,
                    }
                    if let Some(request) = entry.resource["basedOn"][0]["reference"]
                        .as_str()
                        .and_then(|r| r.strip_prefix("CommunicationRequest/"))
                    {
                        requests.insert(request.to_string());
                    }
                }
            }
        }
        for request in requests {
            if super::dispatch::complete_if_final(self.store.as_ref(), &request).await? {
                report.completed_requests += 1;
            }
        }
        Ok(report)
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
        Outcome::Failed => {
            updated["status"] = json!("not-done");
            updated["statusReason"] = json!({ "text": FAILED_REASON });
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
        self.0
            .run_once()
            .await
            .map(|r| {
                format!(
                    "{} broadcasts, {} delivered, {} failed, {} waiting, {} requests completed",
                    r.broadcasts, r.delivered, r.failed, r.waiting, r.completed_requests
                )
            })
            .map_err(|e| crate::telemetry::redact_phones(&e.to_string()))
    }
}
