//! RapidPro -> FHIR: poll RapidPro contacts modified since a stored cursor
//! (with an overlap window, so late updates are not missed) and bring what
//! they say back to FHIR: a `stopped` or `blocked` status becomes the
//! opt-out tag on the person named by the contact's `globalid` field, and
//! `active` removes it. Contacts that no FHIR person owns are counted, and
//! become Practitioners only with `rapidpro.import_unknown_contacts`.
//! The cursor moves only after everything up to it is stored.

use chrono::{DateTime, Duration, Utc};
use futures::StreamExt;
use serde_json::{Value, json};

use super::contact_status::apply_status;
use super::cursor::Cursor;
use super::rapidpro_directory::{ENTITY_TYPE_FIELD, GLOBAL_ID_FIELD, ensure_contact_fields};
use crate::pipeline::contact::{CONTACT_UUID_SYSTEM, PERSON_TYPES};
use crate::rapidpro::client::{ContactLookup, ContactQuery, RapidProClient};
use crate::rapidpro::types::{Contact, ContactWrite};
use crate::store::{FhirStore, StoreError};

const CURSOR_NAME: &str = "rapidpro-contacts";

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StatusPollReport {
    pub examined: usize,
    /// FHIR people whose opt-out tag changed.
    pub consent_changes: usize,
    /// Contacts that no FHIR person owns (no `globalid`).
    pub unknown: usize,
    /// Unknown contacts imported as Practitioners.
    pub imported: usize,
    /// Contacts naming a FHIR person that does not exist (any more).
    pub missing_people: usize,
    pub failures: Vec<String>,
}

pub struct ContactStatusPoll<'a> {
    pub store: &'a dyn FhirStore,
    pub client: &'a RapidProClient,
    pub import_unknown_contacts: bool,
    /// How far before the cursor to look again.
    pub overlap: Duration,
}

impl ContactStatusPoll<'_> {
    pub async fn run_once(&self) -> Result<StatusPollReport, StoreError> {
        let mut cursor = Cursor::load(self.store, CURSOR_NAME).await?;
        let after = cursor
            .position
            .as_deref()
            .and_then(|p| DateTime::parse_from_rfc3339(p).ok())
            .map(|p| p.with_timezone(&Utc) - self.overlap);
        let query = ContactQuery {
            after,
            reverse: true,
            ..Default::default()
        };
        let mut contacts = self.client.contacts(&query);
        let mut report = StatusPollReport::default();
        let mut fields_ready = false;
        let mut newest: Option<DateTime<Utc>> = None;
        while let Some(item) = contacts.next().await {
            let contact = match item {
                Ok(contact) => contact,
                Err(e) => {
                    report.failures.push(format!(
                        "listing contacts: {}",
                        crate::telemetry::redact_phones(&e.to_string())
                    ));
                    break;
                }
            };
            report.examined += 1;
            match self.apply(&contact, &mut report, &mut fields_ready).await {
                Ok(()) => {
                    if contact.modified_on > newest {
                        newest = contact.modified_on;
                    }
                }
                Err(e) => report.failures.push(format!(
                    "contact {}: {}",
                    contact.uuid,
                    crate::telemetry::redact_phones(&e)
                )),
            }
        }
        if report.failures.is_empty()
            && let Some(newest) = newest
        {
            cursor
                .advance(self.store, &crate::fhir::format_instant(&newest))
                .await?;
        }
        Ok(report)
    }

    async fn apply(
        &self,
        contact: &Contact,
        report: &mut StatusPollReport,
        fields_ready: &mut bool,
    ) -> Result<(), String> {
        let field = |key: &str| {
            contact
                .fields
                .get(key)
                .cloned()
                .flatten()
                .filter(|v| !v.is_empty())
        };
        let (Some(id), Some(resource_type)) = (field(GLOBAL_ID_FIELD), field(ENTITY_TYPE_FIELD))
        else {
            report.unknown += 1;
            if self.import_unknown_contacts && contact.status.is_some() {
                if !*fields_ready {
                    ensure_contact_fields(self.client, &[])
                        .await
                        .map_err(|e| e.to_string())?;
                    *fields_ready = true;
                }
                self.import(contact).await?;
                report.imported += 1;
            }
            return Ok(());
        };
        if !PERSON_TYPES.contains(&resource_type.as_str()) {
            report.unknown += 1;
            return Ok(());
        }
        let Some(status) = &contact.status else {
            return Ok(());
        };
        match apply_status(self.store, &resource_type, &id, status.as_str()).await {
            Ok(true) => report.consent_changes += 1,
            Ok(false) => {}
            Err(StoreError::NotFound { .. }) | Err(StoreError::Gone { .. }) => {
                report.missing_people += 1
            }
            Err(e) => return Err(e.to_string()),
        }
        Ok(())
    }

    /// An unknown contact becomes a Practitioner (idempotent through its
    /// contact UUID), and the contact gets the `globalid` fields.
    async fn import(&self, contact: &Contact) -> Result<(), String> {
        let practitioner = practitioner_from_contact(contact);
        let condition = format!("identifier={CONTACT_UUID_SYSTEM}|{}", contact.uuid);
        let created = self
            .store
            .create(practitioner, Some(&condition))
            .await
            .map_err(|e| e.to_string())?;
        let fields = [
            (GLOBAL_ID_FIELD.to_string(), Some(created.stored.id.clone())),
            (
                ENTITY_TYPE_FIELD.to_string(),
                Some("Practitioner".to_string()),
            ),
        ];
        let write = ContactWrite {
            fields: Some(fields.into_iter().collect()),
            ..Default::default()
        };
        self.client
            .update_contact(&ContactLookup::Uuid(contact.uuid.clone()), &write)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// A Practitioner for a RapidPro contact nobody owns: name, its `tel:` URNs
/// as phones (E.164, as RapidPro keeps them), other URNs as `other`, the
/// contact UUID as identifier, and the opt-out tag if it is stopped or
/// blocked.
pub fn practitioner_from_contact(contact: &Contact) -> Value {
    let telecom: Vec<Value> = contact
        .urns
        .iter()
        .filter_map(|urn| {
            let (scheme, path) = urn.split_once(':')?;
            let path = path.split('#').next().unwrap_or(path);
            Some(match scheme {
                "tel" => json!({ "system": "phone", "value": path, "use": "mobile" }),
                "mailto" => json!({ "system": "email", "value": path }),
                _ => json!({ "system": "other", "value": format!("{scheme}:{path}") }),
            })
        })
        .collect();
    let mut practitioner = json!({
        "resourceType": "Practitioner",
        "active": true,
        "identifier": [{ "system": CONTACT_UUID_SYSTEM, "value": contact.uuid }],
        "telecom": telecom
    });
    if let Some(name) = contact.name.as_deref().filter(|n| !n.trim().is_empty()) {
        practitioner["name"] = json!([{ "text": name }]);
    }
    if let Some(status) = &contact.status
        && crate::jobs::contact_status::opt_out_for_status(status.as_str()) == Some(true)
        && let Some(tagged) = crate::pipeline::contact::with_opt_out(&practitioner, true)
    {
        practitioner = tagged;
    }
    practitioner
}
