//! The mapping of a FHIR person (Practitioner, Patient, Person,
//! RelatedPerson) to what its RapidPro contact should be: name, URNs,
//! language, the `globalid` / `mheroentitytype` fields, and whether it may
//! be messaged at all. Pure functions: the sync job compares the result
//! with RapidPro and decides which calls to make.

use chrono::Utc;
use serde::Serialize;
use serde_json::Value;

use super::phone::{PhoneError, PhoneNormalizer, looks_like_phone};
use crate::fhir::extract::date_range;

/// The opt-out tag: a person carrying it is never messaged on any channel.
pub const OPT_OUT_SYSTEM: &str = "http://mhero.org/codesystem";
pub const OPT_OUT_CODE: &str = "optedout";
/// Where the RapidPro contact UUID is written back on the FHIR resource.
pub const CONTACT_UUID_SYSTEM: &str = "http://app.rapidpro.io/contact-uuid";

/// The people types that become RapidPro contacts.
pub const PERSON_TYPES: &[&str] = &["Practitioner", "Patient", "Person", "RelatedPerson"];

/// What the RapidPro contact of one FHIR person should look like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContactDraft {
    pub name: Option<String>,
    /// ISO 639-3, as RapidPro wants it (`eng`, `fra`).
    pub language: Option<String>,
    /// `tel:+E164`, most preferred first, without duplicates.
    pub urns: Vec<String>,
    /// `globalid` = FHIR id, `mheroentitytype` = FHIR type.
    pub global_id: String,
    pub entity_type: String,
    /// `active = false` in FHIR.
    pub inactive: bool,
    /// Carries the opt-out tag.
    pub opted_out: bool,
    /// Configured extra contact fields (`job`, `facility`, `district`, ...),
    /// filled by [`enrich`](crate::pipeline::work_context::enrich).
    pub extra_fields: std::collections::BTreeMap<String, String>,
    /// The RapidPro contact UUID already written back, if any.
    #[serde(skip)]
    pub contact_uuid: Option<String>,
    /// Phone values that could not be used, with the reason (never sent).
    #[serde(skip)]
    pub rejected_phones: Vec<PhoneError>,
}

impl ContactDraft {
    /// May this person be messaged?
    pub fn reachable(&self) -> bool {
        !self.inactive && !self.opted_out && !self.urns.is_empty()
    }
}

/// Marks an opt-out tag that RapidPro's contact status (stopped, blocked)
/// caused: only such an opt-out is lifted when RapidPro says `active` again.
pub const OPT_OUT_BY_RAPIDPRO_CODE: &str = "optedout-by-rapidpro-status";

fn has_tag(resource: &Value, code: &str) -> bool {
    resource
        .pointer("/meta/tag")
        .and_then(Value::as_array)
        .is_some_and(|tags| {
            tags.iter().any(|t| {
                t.get("system").and_then(Value::as_str) == Some(OPT_OUT_SYSTEM)
                    && t.get("code").and_then(Value::as_str) == Some(code)
            })
        })
}

/// `resource` with exactly these mHero consent tags: the opt-out tag if
/// `opted_out`, and the RapidPro-status marker if `by_rapidpro` (only with
/// the opt-out). Other tags and `meta` elements are kept. `None` if it
/// already says so.
fn with_consent_tags(resource: &Value, opted_out: bool, by_rapidpro: bool) -> Option<Value> {
    let by_rapidpro = opted_out && by_rapidpro;
    if has_tag(resource, OPT_OUT_CODE) == opted_out
        && has_tag(resource, OPT_OUT_BY_RAPIDPRO_CODE) == by_rapidpro
    {
        return None;
    }
    let mut updated = resource.clone();
    let object = updated.as_object_mut()?;
    let meta = object
        .entry("meta")
        .or_insert_with(|| serde_json::json!({}));
    let meta = meta.as_object_mut()?;
    let tags = meta.entry("tag").or_insert_with(|| serde_json::json!([]));
    let tags = tags.as_array_mut()?;
    tags.retain(|t| {
        t.get("system").and_then(Value::as_str) != Some(OPT_OUT_SYSTEM)
            || !matches!(
                t.get("code").and_then(Value::as_str),
                Some(OPT_OUT_CODE) | Some(OPT_OUT_BY_RAPIDPRO_CODE)
            )
    });
    if opted_out {
        tags.push(serde_json::json!({ "system": OPT_OUT_SYSTEM, "code": OPT_OUT_CODE, "display": "Opted out of mHero messages" }));
    }
    if by_rapidpro {
        tags.push(serde_json::json!({ "system": OPT_OUT_SYSTEM, "code": OPT_OUT_BY_RAPIDPRO_CODE, "display": "Opt-out set because the RapidPro contact is stopped or blocked" }));
    }
    if tags.is_empty() {
        meta.remove("tag");
    }
    if meta.is_empty() {
        object.remove("meta");
    }
    Some(updated)
}

/// `resource` opted out (or back in) by the person or an operator (API,
/// emNutt route, STOP/START keyword): such an opt-out is not lifted by
/// RapidPro's status. `None` if it already says so.
pub fn with_opt_out(resource: &Value, opted_out: bool) -> Option<Value> {
    with_consent_tags(resource, opted_out, false)
}

/// `resource` after RapidPro reported its contact `stopped`/`blocked`
/// (`opted_out`) or `active`: `active` lifts only an opt-out that RapidPro's
/// status caused, never one the person asked for another way.
pub fn with_rapidpro_opt_out(resource: &Value, opted_out: bool) -> Option<Value> {
    let opted_out_already = has_tag(resource, OPT_OUT_CODE);
    let by_rapidpro = has_tag(resource, OPT_OUT_BY_RAPIDPRO_CODE);
    match (opted_out, opted_out_already) {
        // A new opt-out: RapidPro's.
        (true, false) => with_consent_tags(resource, true, true),
        // Already opted out (by RapidPro or otherwise): nothing to add.
        (true, true) => None,
        // Back to active: lift only RapidPro's own opt-out.
        (false, true) if by_rapidpro => with_consent_tags(resource, false, false),
        (false, _) => None,
    }
}

/// HumanName rules: `official` over `usual` over the first name; `text`
/// if present, else the givens joined with spaces, then the family name.
pub fn display_name(resource: &Value) -> Option<String> {
    let names = resource.get("name")?.as_array()?;
    let pick = |wanted: &str| {
        names
            .iter()
            .find(|n| n.get("use").and_then(Value::as_str) == Some(wanted))
    };
    let name = pick("official")
        .or_else(|| pick("usual"))
        .or_else(|| names.first())?;
    if let Some(text) = name
        .get("text")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        return Some(text.to_string());
    }
    let mut parts: Vec<&str> = name
        .get("given")
        .and_then(Value::as_array)
        .map(|g| g.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if let Some(family) = name.get("family").and_then(Value::as_str) {
        parts.push(family);
    }
    let joined = parts
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    (!joined.is_empty()).then_some(joined)
}

/// A telecom that is over (`use: old`, or a `period.end` in the past).
fn is_retired(telecom: &Value) -> bool {
    if telecom.get("use").and_then(Value::as_str) == Some("old") {
        return true;
    }
    let now = Utc::now().timestamp_millis();
    telecom
        .pointer("/period/end")
        .and_then(Value::as_str)
        .and_then(date_range)
        .is_some_and(|(_, end)| end <= now)
}

fn is_phone(telecom: &Value) -> bool {
    match telecom.get("system").and_then(Value::as_str) {
        Some("phone") | Some("sms") => true,
        // OpenMRS sends phone numbers without a system.
        None => telecom
            .get("value")
            .and_then(Value::as_str)
            .is_some_and(looks_like_phone),
        Some(_) => false,
    }
}

/// The language RapidPro expects (ISO 639-3) from `communication`
/// (preferred first) or, for Practitioners, `communication` as a list of
/// CodeableConcepts.
fn language(resource: &Value) -> Option<String> {
    let entries = resource.get("communication")?.as_array()?;
    let mut ordered: Vec<&Value> = entries
        .iter()
        .filter(|c| c.get("preferred").and_then(Value::as_bool) == Some(true))
        .collect();
    ordered.extend(entries.iter());
    ordered.into_iter().find_map(|entry| {
        let concept = entry.get("language").unwrap_or(entry);
        concept
            .get("coding")?
            .as_array()?
            .iter()
            .find_map(|coding| {
                let code = coding.get("code")?.as_str()?;
                let primary = code.split(['-', '_']).next()?.to_ascii_lowercase();
                match primary.len() {
                    2 => isolang::Language::from_639_1(&primary).map(|l| l.to_639_3().to_string()),
                    3 => isolang::Language::from_639_3(&primary).map(|l| l.to_639_3().to_string()),
                    _ => None,
                }
            })
    })
}

/// Map one person resource. `resource_type` and `id` come from the store.
pub fn draft(resource: &Value, phones: &PhoneNormalizer) -> ContactDraft {
    let resource_type = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let id = resource
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut telecoms: Vec<&Value> = resource
        .get("telecom")
        .and_then(Value::as_array)
        .map(|t| t.iter().filter(|t| !is_retired(t)).collect())
        .unwrap_or_default();
    // Lower rank first; unranked last; otherwise the order of the resource.
    telecoms.sort_by_key(|t| t.get("rank").and_then(Value::as_u64).unwrap_or(u64::MAX));
    let mut urns = Vec::new();
    let mut rejected_phones = Vec::new();
    for telecom in telecoms {
        let Some(value) = telecom.get("value").and_then(Value::as_str) else {
            continue;
        };
        let tel = is_phone(telecom).then(|| phones.tel_urn(value));
        // `tel:` first, then the `whatsapp:` / `telegram:` URNs configured for it.
        for result in tel.into_iter().chain(phones.mapped_urns(telecom)) {
            match result {
                Ok(urn) if !urns.contains(&urn) => urns.push(urn),
                Ok(_) => {}
                Err(e) => rejected_phones.push(e),
            }
        }
    }
    let opted_out = resource
        .pointer("/meta/tag")
        .and_then(Value::as_array)
        .is_some_and(|tags| {
            tags.iter().any(|t| {
                t.get("system").and_then(Value::as_str) == Some(OPT_OUT_SYSTEM)
                    && t.get("code").and_then(Value::as_str) == Some(OPT_OUT_CODE)
            })
        });
    let contact_uuid = resource
        .get("identifier")
        .and_then(Value::as_array)
        .and_then(|ids| {
            ids.iter()
                .find(|i| i.get("system").and_then(Value::as_str) == Some(CONTACT_UUID_SYSTEM))
                .and_then(|i| i.get("value").and_then(Value::as_str))
                .map(str::to_string)
        });
    ContactDraft {
        name: display_name(resource),
        language: language(resource),
        urns,
        global_id: id,
        entity_type: resource_type,
        inactive: resource.get("active").and_then(Value::as_bool) == Some(false),
        opted_out,
        extra_fields: Default::default(),
        contact_uuid,
        rejected_phones,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn opt_out_tag_is_added_and_removed_alone() {
        let r = json!({"resourceType": "Practitioner", "meta": {"profile": ["p"], "tag": [{"system": "s", "code": "other"}]}});
        let out = with_opt_out(&r, true).unwrap();
        assert_eq!(out["meta"]["tag"].as_array().unwrap().len(), 2);
        assert_eq!(out["meta"]["profile"], r["meta"]["profile"]);
        assert!(with_opt_out(&out, true).is_none());
        let back = with_opt_out(&out, false).unwrap();
        assert_eq!(back["meta"], r["meta"]);
        assert!(with_opt_out(&json!({"resourceType": "Patient"}), false).is_none());
    }

    #[test]
    fn official_name_wins_and_text_is_preferred() {
        let r = json!({"name": [{"use": "usual", "given": ["Jim"]}, {"use": "official", "family": "Chalmers", "given": ["Peter", "James"]}]});
        assert_eq!(display_name(&r).as_deref(), Some("Peter James Chalmers"));
        let r = json!({"name": [{"text": "Lorne Green", "family": "Green"}]});
        assert_eq!(display_name(&r).as_deref(), Some("Lorne Green"));
        assert_eq!(display_name(&json!({"name": []})), None);
    }

    #[test]
    fn phones_are_ranked_deduplicated_and_retired_ones_skipped() {
        let phones = PhoneNormalizer::new(Some("LR")).unwrap();
        let r = json!({"resourceType": "Practitioner", "id": "p1", "telecom": [
            {"system": "phone", "value": "0886 123 456", "rank": 2},
            {"system": "sms", "value": "+231 77 012 3456", "rank": 1},
            {"system": "phone", "value": "077 012 3456"},
            {"system": "phone", "value": "0555 000 000", "use": "old"},
            {"system": "phone", "value": "12"},
            {"system": "email", "value": "a@b.org"},
            {"value": "0770 999 888"}
        ]});
        let d = draft(&r, &phones);
        assert_eq!(
            d.urns,
            vec![
                "tel:+231770123456",
                "tel:+231886123456",
                "tel:+231770999888"
            ]
        );
        assert_eq!(d.rejected_phones.len(), 1);
        assert_eq!(
            (d.global_id.as_str(), d.entity_type.as_str()),
            ("p1", "Practitioner")
        );
        assert!(d.reachable());
    }

    #[test]
    fn opt_out_inactive_and_language() {
        let phones = PhoneNormalizer::new(Some("LR")).unwrap();
        let r = json!({"resourceType": "Patient", "id": "x", "active": false,
            "meta": {"tag": [{"system": OPT_OUT_SYSTEM, "code": OPT_OUT_CODE}]},
            "identifier": [{"system": CONTACT_UUID_SYSTEM, "value": "c-uuid"}],
            "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "fr-LR"}]}, "preferred": true}],
            "telecom": [{"system": "phone", "value": "0770123456"}]});
        let d = draft(&r, &phones);
        assert!(d.opted_out && d.inactive && !d.reachable());
        assert_eq!(d.language.as_deref(), Some("fra"));
        assert_eq!(d.contact_uuid.as_deref(), Some("c-uuid"));
    }
}
