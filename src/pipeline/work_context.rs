//! Where a health worker works, as extra RapidPro contact fields: their
//! job (cadre) and facility from their active PractitionerRole, and the
//! district, region and country above the facility through
//! `Location.partOf`. Which fields are sent is configured
//! (`rapidpro.extra_fields`); levels are recognised by the Location's type
//! code (`district`, `region`, `country`, whatever the code system, as
//! iHRIS and mCSD both use those codes).

use std::collections::HashMap;

use serde_json::Value;

use super::contact::ContactDraft;
use crate::store::{FhirStore, SearchRequest, StoreError, StoreResult};

/// The fields that can be derived.
pub const KNOWN_FIELDS: &[&str] = &["job", "facility", "district", "region", "country"];
const MAX_DEPTH: usize = 12;

/// Locations read during one pass (a hierarchy is shared by many people).
#[derive(Default)]
pub struct LocationCache(HashMap<String, Option<Value>>);

impl LocationCache {
    async fn get(&mut self, store: &dyn FhirStore, id: &str) -> StoreResult<Option<Value>> {
        if let Some(found) = self.0.get(id) {
            return Ok(found.clone());
        }
        let location = match store.read("Location", id).await {
            Ok(stored) => Some(stored.resource),
            Err(StoreError::NotFound { .. }) | Err(StoreError::Gone { .. }) => None,
            Err(e) => return Err(e),
        };
        self.0.insert(id.to_string(), location.clone());
        Ok(location)
    }
}

fn concept_text(concept: &Value) -> Option<String> {
    concept
        .get("text")
        .and_then(Value::as_str)
        .or_else(|| concept.pointer("/coding/0/display").and_then(Value::as_str))
        .or_else(|| concept.pointer("/coding/0/code").and_then(Value::as_str))
        .map(str::to_string)
}

fn reference_id<'a>(reference: &'a Value, resource_type: &str) -> Option<&'a str> {
    reference
        .get("reference")?
        .as_str()?
        .strip_prefix(resource_type)?
        .strip_prefix('/')
}

fn level_of(location: &Value) -> Option<&'static str> {
    let codes = location.get("type")?.as_array()?.iter().flat_map(|t| {
        t.get("coding")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
    });
    for coding in codes {
        let code = coding.get("code").and_then(Value::as_str).unwrap_or("");
        for level in ["district", "region", "country"] {
            if code == level || code.ends_with(&format!(":{level}")) {
                return Some(level);
            }
        }
    }
    None
}

/// Fill `draft.extra_fields` with the `wanted` fields for a Practitioner.
/// Other person types have no roles and get none.
pub async fn enrich(
    store: &dyn FhirStore,
    draft: &mut ContactDraft,
    wanted: &[String],
    cache: &mut LocationCache,
) -> StoreResult<()> {
    if wanted.is_empty() || draft.entity_type != "Practitioner" {
        return Ok(());
    }
    let roles = store
        .search(SearchRequest {
            resource_type: "PractitionerRole".into(),
            params: vec![
                (
                    "practitioner".into(),
                    format!("Practitioner/{}", draft.global_id),
                ),
                ("active:not".into(), "false".into()),
                ("_count".into(), "10".into()),
            ],
            ..Default::default()
        })
        .await?;
    let Some(role) = roles.matches.first().map(|m| &m.resource) else {
        return Ok(());
    };
    let mut found: HashMap<&str, String> = HashMap::new();
    if let Some(job) = role
        .get("code")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .and_then(concept_text)
    {
        found.insert("job", job);
    }
    let mut next = role
        .get("location")
        .and_then(Value::as_array)
        .and_then(|l| l.first())
        .and_then(|r| reference_id(r, "Location"))
        .map(str::to_string);
    let mut depth = 0;
    while let Some(id) = next.take() {
        let Some(location) = cache.get(store, &id).await? else {
            break;
        };
        let name = location
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or(&id)
            .to_string();
        match (depth, level_of(&location)) {
            (0, _) => {
                found.insert("facility", name);
            }
            (_, Some(level)) => {
                found.entry(level).or_insert(name);
            }
            _ => {}
        }
        depth += 1;
        if depth >= MAX_DEPTH {
            break;
        }
        next = location
            .get("partOf")
            .and_then(|p| reference_id(p, "Location"))
            .map(str::to_string);
    }
    for field in wanted {
        if let Some(value) = found.get(field.as_str()) {
            draft.extra_fields.insert(field.clone(), value.clone());
        }
    }
    Ok(())
}
