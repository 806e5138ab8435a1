//! The contact sync status of one person, kept as a FHIR `Basic` resource
//! beside it (never inside the source system's resource): the problems the
//! last sync found, as OperationOutcome-style issues (e.g. a phone number
//! that is not valid and was not sent). No problems = no resource.

use serde_json::{Value, json};

use crate::pipeline::contact::ContactDraft;
use crate::store::{FhirStore, StoreResult};

pub const SYNC_STATUS_CODE_SYSTEM: &str = "http://mhero.org/codesystem";
pub const SYNC_STATUS_CODE: &str = "contact-sync-status";
pub const SYNC_ISSUE_URL: &str = "http://mhero.org/fhir/StructureDefinition/contact-sync-issue";

/// `Basic/<id>` of a person's sync status (a UUID v5 of `Type/id`, so any
/// id length fits).
pub fn status_id(resource_type: &str, id: &str) -> String {
    let name = format!("{resource_type}/{id}");
    format!(
        "sync-{}",
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, name.as_bytes())
    )
}

fn issue(severity: &str, code: &str, diagnostics: &str) -> Value {
    json!({
        "url": SYNC_ISSUE_URL,
        "extension": [
            { "url": "severity", "valueCode": severity },
            { "url": "code", "valueCode": code },
            { "url": "diagnostics", "valueString": diagnostics }
        ]
    })
}

/// Record what the mapping of `contact` found wrong (or clear it).
pub async fn record(store: &dyn FhirStore, contact: &ContactDraft) -> StoreResult<()> {
    let id = status_id(&contact.entity_type, &contact.global_id);
    let mut issues: Vec<Value> = contact
        .rejected_phones
        .iter()
        .map(|e| issue("warning", "invalid", &e.to_string()))
        .collect();
    if contact.urns.is_empty() && !contact.inactive {
        issues.push(issue(
            "warning",
            "incomplete",
            "no usable phone number: this person cannot be messaged",
        ));
    }
    if issues.is_empty() {
        // Reads are cheap; a delete takes the writer, so only when needed.
        if store.read("Basic", &id).await.is_ok() {
            store.delete("Basic", &id, None).await?;
        }
        return Ok(());
    }
    let status = json!({
        "resourceType": "Basic",
        "id": id,
        "code": { "coding": [{ "system": SYNC_STATUS_CODE_SYSTEM, "code": SYNC_STATUS_CODE, "display": "mHero contact sync status" }] },
        "subject": { "reference": format!("{}/{}", contact.entity_type, contact.global_id) },
        "extension": issues
    });
    // An equal status makes no new version (the store skips unchanged writes).
    store.update("Basic", &id, status, None).await?;
    Ok(())
}
