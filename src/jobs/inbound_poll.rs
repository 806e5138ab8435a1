//! Inbound messages (replies outside flows) from RapidPro into FHIR, and the
//! STOP/START keywords.
//!
//! A pass ([`InboundPoll::run_once`]) reads `messages.json?folder=inbox`
//! created after a stored cursor (minus an overlap window, since RapidPro
//! filters by creation time), and writes each message as a `Communication`
//! with a deterministic id (from the RapidPro message uuid, so a message
//! read twice is one resource): `status` completed, `sender` = the person
//! whose RapidPro contact uuid it is (else the one named by the contact's
//! emNutt fields `mheroentitytype`/`globalid`), `recipient` = the configured
//! organisation, `received`, the text and attachments, `medium` from the URN
//! scheme, `inResponseTo` the last message sent to that person within
//! `messaging.reply_window_hours` and `basedOn` its request. A text that is
//! a STOP keyword sets the person's opt-out tag; a START keyword removes it.
//! A message already recorded is left as it is (the overlap re-reads
//! some). The cursor moves only after everything before it is stored. Replies
//! inside flows are flow results (not handled here).

use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures::StreamExt;
use serde_json::{Value, json};
use uuid::Uuid;

use super::cursor::Cursor;
use crate::config::MessagingSettings;
use crate::fhir::format_instant;
use crate::pipeline::contact::{PERSON_TYPES, with_opt_out};
use crate::pipeline::outbox;
use crate::rapidpro::client::{ContactQuery, MessageQuery, RapidProClient, RapidProError};
use crate::rapidpro::types::{Message, MessageDirection, MessageFolder};
use crate::store::{SharedStore, StoreError, modify_resource, search_all};

const CURSOR_NAME: &str = "rapidpro-inbound";
/// Namespace of inbound Communication ids (UUID v5 of the message uuid).
const INBOUND_NAMESPACE: Uuid = Uuid::from_u128(0x6d68_6572_6f2d_496e_626f_756e_6400_0001);

#[derive(Debug, thiserror::Error)]
pub enum InboundPollError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    RapidPro(#[from] RapidProError),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InboundReport {
    /// Messages read (including ones already stored).
    pub read: usize,
    /// Communications written for the first time.
    pub recorded: usize,
    /// Messages from a contact no FHIR person has.
    pub unknown_sender: usize,
    pub opted_out: usize,
    pub opted_in: usize,
}

impl std::fmt::Display for InboundReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "inbound: {} messages read, {} recorded, {} from contacts no person has, {} opted out, {} opted back in",
            self.read, self.recorded, self.unknown_sender, self.opted_out, self.opted_in
        )
    }
}

pub struct InboundPoll {
    pub store: SharedStore,
    pub client: RapidProClient,
    pub settings: MessagingSettings,
    pub overlap: Duration,
}

impl InboundPoll {
    pub async fn run_once(&self) -> Result<InboundReport, InboundPollError> {
        let mut cursor = Cursor::load(self.store.as_ref(), CURSOR_NAME).await?;
        let after = cursor
            .position
            .as_deref()
            .and_then(|p| chrono::DateTime::parse_from_rfc3339(p).ok())
            .map(|p| {
                p.with_timezone(&Utc) - chrono::Duration::from_std(self.overlap).unwrap_or_default()
            });
        let mut stream = self.client.messages(&MessageQuery {
            folder: Some(MessageFolder::Inbox),
            after,
            ..Default::default()
        });
        let mut messages: Vec<Message> = Vec::new();
        while let Some(message) = stream.next().await {
            messages.push(message?);
        }
        messages.sort_by_key(|m| m.created_on);
        let mut report = InboundReport::default();
        let mut newest = None;
        for message in messages
            .iter()
            .filter(|m| m.direction == Some(MessageDirection::In))
        {
            report.read += 1;
            self.record(message, &mut report).await?;
            newest = newest.max(message.created_on);
        }
        if let Some(newest) = newest {
            cursor
                .advance(self.store.as_ref(), &format_instant(&newest))
                .await?;
        }
        Ok(report)
    }

    /// The person whose RapidPro contact this is: `(type, id)`, found by the
    /// contact-uuid identifier, else by the contact's emNutt fields
    /// (`mheroentitytype`/`globalid`, one RapidPro call) when they name a
    /// person the store has.
    async fn sender(
        &self,
        contact_uuid: &str,
    ) -> Result<Option<(String, String)>, InboundPollError> {
        if let Some(found) = self.sender_by_identifier(contact_uuid).await? {
            return Ok(Some(found));
        }
        let contact = self
            .client
            .contacts(&ContactQuery {
                uuid: Some(contact_uuid.to_string()),
                ..Default::default()
            })
            .next()
            .await
            .transpose()?;
        let named = contact.and_then(|c| {
            let field = |key: &str| c.fields.get(key).cloned().flatten();
            Some((field("mheroentitytype")?, field("globalid")?))
        });
        let Some((person_type, id)) = named else {
            return Ok(None);
        };
        if !PERSON_TYPES.contains(&person_type.as_str())
            || crate::fhir::resource_types::ensure_valid_id(&id).is_err()
        {
            return Ok(None);
        }
        match self.store.read(&person_type, &id).await {
            Ok(_) => Ok(Some((person_type, id))),
            Err(StoreError::NotFound { .. }) | Err(StoreError::Gone { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn sender_by_identifier(
        &self,
        contact_uuid: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        let found =
            crate::pipeline::flow_results::person_of_contact(self.store.as_ref(), contact_uuid)
                .await?;
        Ok(found.and_then(|r| {
            r.split_once('/')
                .map(|(t, id)| (t.to_string(), id.to_string()))
        }))
    }

    async fn record(
        &self,
        message: &Message,
        report: &mut InboundReport,
    ) -> Result<(), InboundPollError> {
        let Some(uuid) = message.uuid.as_deref() else {
            return Ok(());
        };
        let id = Uuid::new_v5(&INBOUND_NAMESPACE, uuid.as_bytes()).to_string();
        match self.store.read("Communication", &id).await {
            Ok(_) => return Ok(()),
            Err(StoreError::NotFound { .. }) | Err(StoreError::Gone { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let sender = match &message.contact {
            Some(contact) => self.sender(&contact.uuid).await?,
            None => None,
        };

        let received = message.created_on.unwrap_or_else(Utc::now);
        let mut communication = json!({
            "resourceType": "Communication",
            "id": id,
            "identifier": [{ "system": "http://app.rapidpro.io/message-uuid", "value": uuid }],
            "status": "completed",
            "received": format_instant(&received),
        });
        if let Some(payload) = payload(message) {
            communication["payload"] = payload;
        }
        if let Some(urn) = &message.urn {
            communication["medium"] = json!([outbox::medium(urn)]);
        }
        if !self.settings.organization_reference.trim().is_empty() {
            communication["recipient"] =
                json!([{ "reference": self.settings.organization_reference.trim() }]);
        }
        match &sender {
            Some((person_type, person_id)) => {
                let reference = format!("{person_type}/{person_id}");
                communication["sender"] = json!({ "reference": reference });
                if let Some(last) = self.last_sent_to(&reference, received).await? {
                    communication["inResponseTo"] =
                        json!([{ "reference": format!("Communication/{}", last.0) }]);
                    if let Some(request) = last.1 {
                        communication["basedOn"] = json!([{ "reference": request }]);
                    }
                }
            }
            None => {
                report.unknown_sender += 1;
                communication["note"] = json!([{ "text": "the sender is not a known person (no FHIR person has this RapidPro contact)" }]);
            }
        }
        let written = self
            .store
            .update("Communication", &id, communication, None)
            .await?;

        if written.kind == crate::store::WriteKind::Created {
            report.recorded += 1;
        }
        // Keywords act once, when the message is first recorded.
        if written.kind == crate::store::WriteKind::Created
            && let Some((person_type, person_id)) = &sender
        {
            let text = message.text.as_deref().unwrap_or("").trim().to_uppercase();
            let matches = |words: &[String]| words.iter().any(|w| w.trim().to_uppercase() == text);
            let opt_out = if matches(&self.settings.stop_keywords) {
                Some(true)
            } else if matches(&self.settings.start_keywords) {
                Some(false)
            } else {
                None
            };
            if let Some(opted_out) = opt_out {
                let changed = modify_resource(self.store.as_ref(), person_type, person_id, |p| {
                    with_opt_out(p, opted_out)
                })
                .await?;
                if changed.is_some() {
                    if opted_out {
                        report.opted_out += 1;
                    } else {
                        report.opted_in += 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// The last outbox entry sent to `person` within the reply window
    /// before `received`: `(Communication id, its request reference)`.
    /// The outbox entry sent to `person` most recently updated within the
    /// reply window before `received`, and its request. Searched by
    /// recipient only (the person's few entries, through the reference
    /// index) and picked here: a `status`, `_lastUpdated` or `_sort` filter
    /// made the embedded store walk every sent Communication per reply.
    async fn last_sent_to(
        &self,
        person: &str,
        received: chrono::DateTime<Utc>,
    ) -> Result<Option<(String, Option<String>)>, StoreError> {
        let since = received - chrono::Duration::hours(self.settings.reply_window_hours as i64);
        let sent = search_all(
            self.store.as_ref(),
            "Communication",
            vec![
                ("recipient".into(), person.to_string()),
                ("_count".into(), "100".into()),
            ],
        )
        .await?;
        let updated = |c: &crate::store::StoredResource| {
            c.resource["meta"]["lastUpdated"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc))
        };
        Ok(sent
            .into_iter()
            .filter(|c| {
                matches!(
                    c.resource["status"].as_str(),
                    Some("in-progress" | "completed")
                )
            })
            .filter_map(|c| updated(&c).filter(|t| *t >= since).map(|t| (t, c)))
            .max_by_key(|(t, _)| *t)
            .map(|(_, c)| {
                let request = c.resource["basedOn"][0]["reference"]
                    .as_str()
                    .map(str::to_string);
                (c.id, request)
            }))
    }
}

/// The text and attachments, or `None` for an empty message.
fn payload(message: &Message) -> Option<Value> {
    let mut payload = Vec::new();
    if let Some(text) = message.text.as_deref().filter(|t| !t.is_empty()) {
        payload.push(json!({ "contentString": text }));
    }
    for attachment in &message.attachments {
        if let Some(url) = &attachment.url {
            let mut content = json!({ "url": url });
            if let Some(kind) = &attachment.content_type {
                content["contentType"] = json!(kind);
            }
            payload.push(json!({ "contentAttachment": content }));
        }
    }
    (!payload.is_empty()).then_some(Value::Array(payload))
}

/// The inbound poll as a `serve` job.
pub struct InboundPollJob(pub InboundPoll);

#[async_trait]
impl super::runner::Job for InboundPollJob {
    fn name(&self) -> &'static str {
        "inbound_poll"
    }

    async fn run_once(&self) -> Result<String, String> {
        super::runner::pass_outcome(self.0.run_once().await)
    }
}
