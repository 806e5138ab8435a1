//! Writing a person's RapidPro contact UUID (and the hash of what was last
//! pushed to RapidPro) back onto the FHIR resource, as the identifier
//! `http://app.rapidpro.io/contact-uuid`. Optimistic: read, change only
//! that identifier, update with `If-Match`, and on a version conflict read
//! again and retry. Nothing else in the resource is touched.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::pipeline::contact::{CONTACT_UUID_SYSTEM, ContactDraft};
use crate::store::{FhirStore, StoreResult, modify_resource};

/// Extension on the contact-uuid identifier holding the content hash of
/// the contact last pushed to RapidPro: an unchanged person costs no call.
pub const PUSHED_HASH_URL: &str = "http://mhero.org/fhir/StructureDefinition/rapidpro-pushed-hash";
/// Extension on the same identifier: `true` when the connector blocked the
/// contact because the person became inactive (so only such a block is
/// ever undone by the connector).
pub const BLOCKED_BY_CONNECTOR_URL: &str =
    "http://mhero.org/fhir/StructureDefinition/rapidpro-blocked-by-connector";

/// What the write-back records.
#[derive(Debug, Clone, Copy)]
pub struct WrittenBack<'a> {
    pub uuid: &'a str,
    pub hash: &'a str,
    pub blocked_by_connector: bool,
}

/// SHA-256 (hex) of what the contact should be in RapidPro.
pub fn content_hash(draft: &ContactDraft) -> String {
    let canonical = serde_json::to_vec(draft).unwrap_or_default();
    Sha256::digest(&canonical)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn identifier_extension<'a>(resource: &'a Value, url: &str) -> Option<&'a Value> {
    contact_identifier(resource)?
        .get("extension")?
        .as_array()?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(url))
}

/// The hash recorded on the resource, if any.
pub fn pushed_hash(resource: &Value) -> Option<String> {
    identifier_extension(resource, PUSHED_HASH_URL)?
        .get("valueString")?
        .as_str()
        .map(str::to_string)
}

/// Whether the connector blocked this person's contact.
pub fn blocked_by_connector(resource: &Value) -> bool {
    identifier_extension(resource, BLOCKED_BY_CONNECTOR_URL)
        .and_then(|e| e.get("valueBoolean"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn contact_identifier(resource: &Value) -> Option<&Value> {
    resource
        .get("identifier")?
        .as_array()?
        .iter()
        .find(|i| i.get("system").and_then(Value::as_str) == Some(CONTACT_UUID_SYSTEM))
}

/// `resource` with its contact-uuid identifier saying `record`; `None` if
/// it already says exactly that.
fn with_contact_identifier(resource: &Value, record: &WrittenBack) -> Option<Value> {
    if contact_identifier(resource)
        .and_then(|i| i.get("value"))
        .and_then(Value::as_str)
        == Some(record.uuid)
        && pushed_hash(resource).as_deref() == Some(record.hash)
        && blocked_by_connector(resource) == record.blocked_by_connector
    {
        return None;
    }
    let mut extensions = vec![json!({ "url": PUSHED_HASH_URL, "valueString": record.hash })];
    if record.blocked_by_connector {
        extensions.push(json!({ "url": BLOCKED_BY_CONNECTOR_URL, "valueBoolean": true }));
    }
    let identifier =
        json!({ "system": CONTACT_UUID_SYSTEM, "value": record.uuid, "extension": extensions });
    let mut updated = resource.clone();
    let object = updated.as_object_mut()?;
    match object.get_mut("identifier") {
        Some(Value::Array(ids)) => {
            match ids
                .iter_mut()
                .find(|i| i.get("system").and_then(Value::as_str) == Some(CONTACT_UUID_SYSTEM))
            {
                Some(existing) => *existing = identifier,
                None => ids.push(identifier),
            }
        }
        // A non-array identifier (seen from OpenMRS) is kept as the first element.
        Some(other) => {
            let kept = other.take();
            *other = json!([kept, identifier]);
        }
        None => {
            object.insert("identifier".into(), json!([identifier]));
        }
    }
    Some(updated)
}

/// Record `record` on `resource_type/id`. Returns whether a new version
/// was written.
pub async fn write_back(
    store: &dyn FhirStore,
    resource_type: &str,
    id: &str,
    record: &WrittenBack<'_>,
) -> StoreResult<bool> {
    let written = modify_resource(store, resource_type, id, |current| {
        with_contact_identifier(current, record)
    })
    .await?;
    Ok(written.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_contact_identifier_changes() {
        let resource = json!({"resourceType": "Practitioner", "id": "p", "telecom": [{"system": "phone", "value": "077 012 3456"}],
            "identifier": [{"system": "urn:emp", "value": "1"}]});
        let record = |uuid, hash, blocked| WrittenBack {
            uuid,
            hash,
            blocked_by_connector: blocked,
        };
        let updated = with_contact_identifier(&resource, &record("uuid-1", "h1", false)).unwrap();
        assert_eq!(
            updated["telecom"], resource["telecom"],
            "source phone values are not rewritten"
        );
        assert_eq!(updated["identifier"][0], resource["identifier"][0]);
        assert_eq!(updated["identifier"][1]["value"], "uuid-1");
        assert_eq!(pushed_hash(&updated).as_deref(), Some("h1"));
        assert!(
            with_contact_identifier(&updated, &record("uuid-1", "h1", false)).is_none(),
            "nothing to do twice"
        );
        let blocked = with_contact_identifier(&updated, &record("uuid-1", "h1", true)).unwrap();
        assert!(blocked_by_connector(&blocked));
        let replaced = with_contact_identifier(&blocked, &record("uuid-2", "h2", false)).unwrap();
        assert!(!blocked_by_connector(&replaced));
        assert_eq!(replaced["identifier"].as_array().unwrap().len(), 2);
        assert_eq!(replaced["identifier"][1]["value"], "uuid-2");
    }

    #[test]
    fn an_object_identifier_is_kept() {
        let resource = json!({"resourceType": "Patient", "identifier": {"value": "4444-6"}});
        let updated = with_contact_identifier(
            &resource,
            &WrittenBack {
                uuid: "u",
                hash: "h",
                blocked_by_connector: false,
            },
        )
        .unwrap();
        assert_eq!(updated["identifier"][0]["value"], "4444-6");
        assert_eq!(updated["identifier"][1]["value"], "u");
    }
}
