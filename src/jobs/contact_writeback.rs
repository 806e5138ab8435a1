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

/// SHA-256 (hex) of what the contact should be in RapidPro.
pub fn content_hash(draft: &ContactDraft) -> String {
    let canonical = serde_json::to_vec(draft).unwrap_or_default();
    Sha256::digest(&canonical)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The hash recorded on the resource, if any.
pub fn pushed_hash(resource: &Value) -> Option<String> {
    contact_identifier(resource)?
        .get("extension")?
        .as_array()?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(PUSHED_HASH_URL))?
        .get("valueString")?
        .as_str()
        .map(str::to_string)
}

fn contact_identifier(resource: &Value) -> Option<&Value> {
    resource
        .get("identifier")?
        .as_array()?
        .iter()
        .find(|i| i.get("system").and_then(Value::as_str) == Some(CONTACT_UUID_SYSTEM))
}

/// `resource` with its contact-uuid identifier set to `uuid` and `hash`;
/// `None` if it already says exactly that.
fn with_contact_identifier(resource: &Value, uuid: &str, hash: &str) -> Option<Value> {
    if contact_identifier(resource)
        .and_then(|i| i.get("value"))
        .and_then(Value::as_str)
        == Some(uuid)
        && pushed_hash(resource).as_deref() == Some(hash)
    {
        return None;
    }
    let identifier = json!({
        "system": CONTACT_UUID_SYSTEM,
        "value": uuid,
        "extension": [{ "url": PUSHED_HASH_URL, "valueString": hash }]
    });
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

/// Record `uuid` and `hash` on `resource_type/id`. Returns whether a new
/// version was written.
pub async fn write_back(
    store: &dyn FhirStore,
    resource_type: &str,
    id: &str,
    uuid: &str,
    hash: &str,
) -> StoreResult<bool> {
    let written = modify_resource(store, resource_type, id, |current| {
        with_contact_identifier(current, uuid, hash)
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
        let updated = with_contact_identifier(&resource, "uuid-1", "h1").unwrap();
        assert_eq!(
            updated["telecom"], resource["telecom"],
            "source phone values are not rewritten"
        );
        assert_eq!(updated["identifier"][0], resource["identifier"][0]);
        assert_eq!(updated["identifier"][1]["value"], "uuid-1");
        assert_eq!(pushed_hash(&updated).as_deref(), Some("h1"));
        assert!(
            with_contact_identifier(&updated, "uuid-1", "h1").is_none(),
            "nothing to do twice"
        );
        let replaced = with_contact_identifier(&updated, "uuid-2", "h2").unwrap();
        assert_eq!(replaced["identifier"].as_array().unwrap().len(), 2);
        assert_eq!(replaced["identifier"][1]["value"], "uuid-2");
    }

    #[test]
    fn an_object_identifier_is_kept() {
        let resource = json!({"resourceType": "Patient", "identifier": {"value": "4444-6"}});
        let updated = with_contact_identifier(&resource, "u", "h").unwrap();
        assert_eq!(updated["identifier"][0]["value"], "4444-6");
        assert_eq!(updated["identifier"][1]["value"], "u");
    }
}
