//! Validation write-back: what a health worker confirmed in a survey, into
//! their own record (docs/flow-results.md).
//!
//! Configured by `[[writeback]]` rules (`config::WritebackRule`): a flow
//! (or any), a result key, and the element of the person it confirms
//! (phone, email, gender, birth date, active, language). When the run
//! poll records a *completed* run of a known person, each mapped result is
//! read, validated and normalised ([`plan`]); the changes are written to
//! the person with `If-Match` together with a `Provenance` (id from the run,
//! so a run is written back once) in one transaction. The Provenance names
//! the person as informant, the QuestionnaireResponse as source, and lists
//! every result considered in `mhero-writeback` extensions: applied (with
//! the previous value), unchanged, invalid or conflicting (with the
//! reason). Invalid and conflicting values are reported, never forced.

use futures::StreamExt;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::config::{PersonElement, WritebackRule};
use crate::pipeline::contact::PERSON_TYPES;
use crate::pipeline::flow_results::{ResultValue, RunRecord};
use crate::pipeline::phone::PhoneNormalizer;
use crate::rapidpro::client::{ContactQuery, RapidProClient, RapidProError};
use crate::store::{FhirStore, SearchRequest, StoreError, escape_search_value};

/// The extension listing what a write-back did with each result.
pub const WRITEBACK_EXTENSION: &str = "http://mhero.org/fhir/StructureDefinition/mhero-writeback";
/// Namespace of Provenance ids (UUID v5 of the run uuid).
const PROVENANCE_NAMESPACE: Uuid = Uuid::from_u128(0x6d68_6572_6f2d_5772_6974_6562_6163_6b01);

/// What became of one mapped result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Written; the element's value before.
    Applied { previous: Option<String> },
    /// The record already says so.
    Unchanged,
    /// Not a usable value for the element.
    Invalid(String),
    /// Usable, but not written: it contradicts something else.
    Conflict(String),
}

impl Outcome {
    fn code(&self) -> &'static str {
        match self {
            Outcome::Applied { .. } => "applied",
            Outcome::Unchanged => "unchanged",
            Outcome::Invalid(_) => "invalid",
            Outcome::Conflict(_) => "conflict",
        }
    }
}

/// One result considered for the write-back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Considered {
    pub result: String,
    pub element: PersonElement,
    /// The value as it will be written (normalised), or as received.
    pub value: String,
    pub outcome: Outcome,
}

/// The write-back rules and the phone normaliser they use.
pub struct WritebackConfig {
    pub rules: Vec<WritebackRule>,
    pub phones: PhoneNormalizer,
}

impl WritebackConfig {
    /// The configured rules; `None` when there are none.
    pub fn from_settings(
        settings: &crate::config::Settings,
    ) -> Result<Option<WritebackConfig>, crate::pipeline::phone::PhoneError> {
        if settings.writeback.is_empty() {
            return Ok(None);
        }
        Ok(Some(WritebackConfig {
            rules: settings.writeback.clone(),
            phones: PhoneNormalizer::from_settings(&settings.phone)?,
        }))
    }
}

/// What a write-back did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WritebackReport {
    pub applied: usize,
    pub rejected: usize,
}

/// The Provenance id of `run_uuid`'s write-back.
pub fn provenance_id(run_uuid: &str) -> String {
    Uuid::new_v5(&PROVENANCE_NAMESPACE, run_uuid.as_bytes()).to_string()
}

/// The rules of `rules` that apply to `record`, with its value for each.
fn mapped<'a>(
    rules: &'a [WritebackRule],
    record: &'a RunRecord,
) -> Vec<(&'a WritebackRule, &'a ResultValue)> {
    rules
        .iter()
        .filter(|r| r.flow == "*" || r.flow.eq_ignore_ascii_case(&record.flow_uuid))
        .filter_map(|r| record.values.get(&r.result).map(|v| (r, v)))
        .collect()
}

/// A yes/no answer (value, else category).
fn boolean(value: &ResultValue) -> Option<bool> {
    let read = |s: &str| match s.trim().to_lowercase().as_str() {
        "yes" | "y" | "true" | "1" | "oui" | "sim" | "si" | "sí" | "ndiyo" | "active" => {
            Some(true)
        }
        "no" | "n" | "false" | "0" | "non" | "não" | "nao" | "hapana" | "inactive" => Some(false),
        _ => None,
    };
    read(&value.value).or_else(|| value.category.as_deref().and_then(read))
}

fn gender(value: &ResultValue) -> Option<&'static str> {
    let read = |s: &str| match s.trim().to_lowercase().as_str() {
        "male" | "m" | "man" | "homme" | "masculino" => Some("male"),
        "female" | "f" | "woman" | "femme" | "feminino" | "femenino" => Some("female"),
        "other" | "autre" | "outro" | "otro" => Some("other"),
        "unknown" => Some("unknown"),
        _ => None,
    };
    read(&value.value).or_else(|| value.category.as_deref().and_then(read))
}

fn birth_date(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let date = chrono::NaiveDate::parse_from_str(raw, "%Y-%m-%d")
        .or_else(|_| chrono::NaiveDate::parse_from_str(raw, "%d-%m-%Y"))
        .or_else(|_| chrono::NaiveDate::parse_from_str(raw, "%d/%m/%Y"))
        .or_else(|_| chrono::DateTime::parse_from_rfc3339(raw).map(|d| d.date_naive()))
        .ok()?;
    (date.year_ce().1 >= 1900 && date <= chrono::Utc::now().date_naive())
        .then(|| date.format("%Y-%m-%d").to_string())
}

use chrono::Datelike;

fn telecom_value(person: &Value, system: &str) -> Option<String> {
    person["telecom"]
        .as_array()?
        .iter()
        .find(|t| t["system"] == system)
        .and_then(|t| t["value"].as_str())
        .map(str::to_string)
}

/// Sets the first `system` contact point to `value` (adding one if none).
fn set_telecom(person: &mut Value, system: &str, value: &str) {
    if !person["telecom"].is_array() {
        person["telecom"] = json!([]);
    }
    let Some(telecom) = person["telecom"].as_array_mut() else {
        return;
    };
    match telecom.iter_mut().find(|t| t["system"] == system) {
        Some(point) => point["value"] = json!(value),
        None => telecom.push(json!({ "system": system, "value": value, "use": "mobile" })),
    }
}

fn language_of(person: &Value) -> Option<String> {
    person["communication"][0]["language"]["coding"][0]["code"]
        .as_str()
        .map(str::to_string)
}

/// The element's current value and the value to write, or why not.
fn normalise(
    element: PersonElement,
    value: &ResultValue,
    person: &Value,
    phones: &PhoneNormalizer,
) -> Result<(Option<String>, String), String> {
    let raw = value.value.trim();
    match element {
        PersonElement::Phone => {
            let e164 = phones
                .to_e164(raw, None)
                .map_err(|e| format!("not a valid phone number: {e}"))?;
            let current = telecom_value(person, "phone");
            let same = current
                .as_deref()
                .and_then(|c| phones.to_e164(c, None).ok())
                .is_some_and(|c| c == e164);
            Ok((if same { Some(e164.clone()) } else { current }, e164))
        }
        PersonElement::Email => {
            let ok = raw.len() <= 254
                && !raw.contains(char::is_whitespace)
                && raw
                    .split_once('@')
                    .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'));
            if !ok {
                return Err("not an email address".into());
            }
            Ok((telecom_value(person, "email"), raw.to_lowercase()))
        }
        PersonElement::Gender => {
            let gender = gender(value).ok_or("not a gender (male, female, other, unknown)")?;
            Ok((
                person["gender"].as_str().map(str::to_string),
                gender.to_string(),
            ))
        }
        PersonElement::BirthDate => {
            let date = birth_date(raw).ok_or("not a past date (YYYY-MM-DD)")?;
            Ok((person["birthDate"].as_str().map(str::to_string), date))
        }
        PersonElement::Active => {
            let active = boolean(value).ok_or("not a yes/no answer")?;
            Ok((
                person["active"].as_bool().map(|b| b.to_string()),
                active.to_string(),
            ))
        }
        PersonElement::Language => {
            let code = raw.to_lowercase();
            if !(2..=3).contains(&code.len()) || !code.chars().all(|c| c.is_ascii_lowercase()) {
                return Err("not a language code (ISO 639, e.g. en, fr, eng)".into());
            }
            Ok((language_of(person), code))
        }
    }
}

fn set_element(person: &mut Value, element: PersonElement, value: &str) {
    match element {
        PersonElement::Phone => set_telecom(person, "phone", value),
        PersonElement::Email => set_telecom(person, "email", value),
        PersonElement::Gender => person["gender"] = json!(value),
        PersonElement::BirthDate => person["birthDate"] = json!(value),
        PersonElement::Active => person["active"] = json!(value == "true"),
        PersonElement::Language => {
            person["communication"] = json!([{
                "language": { "coding": [{ "system": "urn:ietf:bcp:47", "code": value }] },
                "preferred": true,
            }]);
        }
    }
}

/// The person's record with the mapped results applied (`None` when
/// nothing changes), and what became of each. `phone_owner` answers
/// whether another person already has a phone number.
pub fn plan(
    person: &Value,
    mapped: &[(&WritebackRule, &ResultValue)],
    phones: &PhoneNormalizer,
    phone_owner: impl Fn(&str) -> Option<String>,
) -> (Option<Value>, Vec<Considered>) {
    let mut updated = person.clone();
    let mut considered: Vec<Considered> = Vec::new();
    for (rule, value) in mapped {
        let (value_text, outcome) = match normalise(rule.element, value, person, phones) {
            Err(reason) => (value.value.clone(), Outcome::Invalid(reason)),
            Ok((current, new)) => {
                let twice = considered
                    .iter()
                    .find(|c| c.element == rule.element && c.value != new);
                if let Some(other) = twice {
                    let reason = format!(
                        "result {:?} gives another value for the same element",
                        other.result
                    );
                    (new, Outcome::Conflict(reason))
                } else if current.as_deref() == Some(new.as_str()) {
                    (new, Outcome::Unchanged)
                } else if let Some(owner) = (rule.element == PersonElement::Phone)
                    .then(|| phone_owner(&new))
                    .flatten()
                {
                    (
                        new,
                        Outcome::Conflict(format!("{owner} already has this number")),
                    )
                } else {
                    set_element(&mut updated, rule.element, &new);
                    (new, Outcome::Applied { previous: current })
                }
            }
        };
        considered.push(Considered {
            result: rule.result.clone(),
            element: rule.element,
            value: value_text,
            outcome,
        });
    }
    let changed = considered
        .iter()
        .any(|c| matches!(c.outcome, Outcome::Applied { .. }));
    (changed.then_some(updated), considered)
}

/// The Provenance of a write-back.
pub fn provenance(
    run_uuid: &str,
    person: &str,
    response_id: &str,
    considered: &[Considered],
) -> Value {
    let mut provenance = json!({
        "resourceType": "Provenance",
        "id": provenance_id(run_uuid),
        "target": [{ "reference": person }],
        "recorded": crate::fhir::format_instant(&chrono::Utc::now()),
        "reason": [{ "text": "Validation write-back: values the person confirmed in a RapidPro flow" }],
        "agent": [
            {
                "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "informant", "display": "Informant" }] },
                "who": { "reference": person },
            },
            {
                "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "assembler", "display": "Assembler" }] },
                "who": { "display": "mHero connector" },
            },
        ],
        "entity": [{ "role": "source", "what": { "reference": format!("QuestionnaireResponse/{response_id}") } }],
        "extension": considered.iter().map(|c| {
            let mut parts = vec![
                json!({ "url": "result", "valueString": c.result }),
                json!({ "url": "element", "valueCode": c.element.as_str() }),
                json!({ "url": "outcome", "valueCode": c.outcome.code() }),
            ];
            if !c.value.is_empty() {
                parts.push(json!({ "url": "value", "valueString": c.value }));
            }
            match &c.outcome {
                Outcome::Applied { previous: Some(previous) } => {
                    parts.push(json!({ "url": "previous", "valueString": previous }));
                }
                Outcome::Invalid(reason) | Outcome::Conflict(reason) => {
                    parts.push(json!({ "url": "reason", "valueString": reason }));
                }
                _ => {}
            }
            json!({ "url": WRITEBACK_EXTENSION, "extension": parts })
        }).collect::<Vec<_>>(),
    });
    if considered
        .iter()
        .any(|c| matches!(c.outcome, Outcome::Applied { .. }))
    {
        provenance["activity"] = json!({ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "UPDATE", "display": "revise" }] });
    }
    provenance
}

/// Why a write-back could not be done (it is tried again by the next pass).
#[derive(Debug, thiserror::Error)]
pub enum WritebackError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    RapidPro(#[from] RapidProError),
}

/// Who else has phone `e164`, if anyone: the RapidPro contact with that URN
/// (one URN belongs to one contact, so RapidPro would refuse the number
/// for this person's contact) and its person; else a person whose stored
/// phone is written in E.164.
async fn phone_owner(
    store: &dyn FhirStore,
    client: &RapidProClient,
    e164: &str,
    person: &str,
    contact_uuid: &str,
) -> Result<Option<String>, WritebackError> {
    let holder = client
        .contacts(&ContactQuery {
            urn: Some(format!("tel:{e164}")),
            ..Default::default()
        })
        .next()
        .await
        .transpose()?;
    if let Some(holder) = holder.filter(|c| c.uuid != contact_uuid) {
        let owner = crate::pipeline::flow_results::person_of_contact(store, &holder.uuid).await?;
        return Ok(Some(match owner {
            Some(owner) if owner != person => owner,
            _ => format!("RapidPro contact {}", holder.uuid),
        }));
    }
    Ok(stored_phone_owner(store, e164, person).await?)
}

/// Another person whose stored phone is `e164` exactly.
async fn stored_phone_owner(
    store: &dyn FhirStore,
    e164: &str,
    except: &str,
) -> Result<Option<String>, StoreError> {
    for person_type in PERSON_TYPES {
        let found = store
            .search(SearchRequest {
                resource_type: person_type.to_string(),
                params: vec![
                    ("phone".into(), escape_search_value(e164)),
                    ("_count".into(), "2".into()),
                    ("_total".into(), "none".into()),
                ],
                cursor: None,
                lenient: false,
            })
            .await?;
        if let Some(other) = found
            .matches
            .iter()
            .map(|m| format!("{person_type}/{}", m.id))
            .find(|r| r != except)
        {
            return Ok(Some(other));
        }
    }
    Ok(None)
}

/// Writes back `record` (a completed run of `person`, recorded as
/// QuestionnaireResponse `response_id`) once. `None` when no rule applies
/// or it was already written back.
pub async fn write_back(
    store: &dyn FhirStore,
    client: &RapidProClient,
    config: &WritebackConfig,
    record: &RunRecord,
    person: &str,
    response_id: &str,
) -> Result<Option<WritebackReport>, WritebackError> {
    let phones = &config.phones;
    let (Some(run_uuid), "completed") = (record.run_uuid.as_deref(), record.status) else {
        return Ok(None);
    };
    let mapped = mapped(&config.rules, record);
    if mapped.is_empty() {
        return Ok(None);
    }
    let id = provenance_id(run_uuid);
    match store.read("Provenance", &id).await {
        Ok(_) => return Ok(None),
        Err(StoreError::NotFound { .. }) | Err(StoreError::Gone { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let Some((person_type, person_id)) = person.split_once('/') else {
        return Ok(None);
    };
    // Who else has a number, asked (one RapidPro call) only for a number
    // that would change the record.
    let mut owners = std::collections::HashMap::new();
    for _ in 0..8 {
        let current = match store.read(person_type, person_id).await {
            Ok(current) => current,
            Err(StoreError::NotFound { .. }) | Err(StoreError::Gone { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let on_record =
            telecom_value(&current.resource, "phone").and_then(|p| phones.to_e164(&p, None).ok());
        for (rule, value) in &mapped {
            if rule.element == PersonElement::Phone
                && let Ok(e164) = phones.to_e164(&value.value, None)
                && on_record.as_deref() != Some(e164.as_str())
                && !owners.contains_key(&e164)
            {
                let owner = phone_owner(store, client, &e164, person, &record.contact_uuid).await?;
                owners.insert(e164, owner);
            }
        }
        let (updated, considered) = plan(&current.resource, &mapped, phones, |e164| {
            owners.get(e164).cloned().flatten()
        });
        let mut entries = Vec::new();
        if let Some(mut updated) = updated {
            if let Some(meta) = updated.get_mut("meta").and_then(Value::as_object_mut) {
                meta.remove("versionId");
                meta.remove("lastUpdated");
            }
            entries.push(json!({
                "resource": updated,
                "request": { "method": "PUT", "url": person, "ifMatch": format!("W/\"{}\"", current.version_id) },
            }));
        }
        entries.push(json!({
            "resource": provenance(run_uuid, person, response_id, &considered),
            "request": { "method": "PUT", "url": format!("Provenance/{id}") },
        }));
        let result = store
            .process_bundle(
                json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries }),
            )
            .await;
        match result {
            Ok(_) => {
                let applied = considered
                    .iter()
                    .filter(|c| matches!(c.outcome, Outcome::Applied { .. }))
                    .count();
                let rejected = considered
                    .iter()
                    .filter(|c| matches!(c.outcome, Outcome::Invalid(_) | Outcome::Conflict(_)))
                    .count();
                for c in &considered {
                    if let Outcome::Invalid(reason) | Outcome::Conflict(reason) = &c.outcome {
                        tracing::warn!(
                            person = %person,
                            result = %c.result,
                            reason = %crate::telemetry::redact_phones(reason),
                            "a flow result was not written back"
                        );
                    }
                }
                return Ok(Some(WritebackReport { applied, rejected }));
            }
            Err(StoreError::VersionConflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::Conflict(format!(
        "{person} kept changing while a flow result was written back"
    ))
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(result: &str, element: PersonElement) -> WritebackRule {
        WritebackRule {
            flow: "*".into(),
            result: result.into(),
            element,
        }
    }

    fn value(v: &str, category: Option<&str>) -> ResultValue {
        ResultValue {
            name: None,
            value: v.into(),
            category: category.map(str::to_string),
        }
    }

    fn phones() -> PhoneNormalizer {
        PhoneNormalizer::new(Some("LR")).unwrap()
    }

    #[test]
    fn values_are_normalised_applied_and_the_previous_kept() {
        let person = json!({ "resourceType": "Practitioner", "id": "p",
            "telecom": [{ "system": "phone", "value": "077 000 1001", "use": "work" }],
            "active": true });
        let rules = [
            rule("phone", PersonElement::Phone),
            rule("working", PersonElement::Active),
            rule("dob", PersonElement::BirthDate),
        ];
        let values = [
            value("0880 123 456", None),
            value("Nope", Some("No")),
            value("12/03/1985", None),
        ];
        let mapped: Vec<_> = rules.iter().zip(values.iter()).collect();
        let (updated, considered) = plan(&person, &mapped, &phones(), |_| None);
        let updated = updated.expect("changes");
        assert_eq!(updated["telecom"][0]["value"], "+231880123456");
        assert_eq!(updated["telecom"][0]["use"], "work");
        assert_eq!(updated["active"], false);
        assert_eq!(updated["birthDate"], "1985-03-12");
        assert_eq!(
            considered[0].outcome,
            Outcome::Applied {
                previous: Some("077 000 1001".into())
            }
        );
    }

    #[test]
    fn the_same_number_in_another_format_is_unchanged() {
        let person = json!({ "resourceType": "Practitioner", "id": "p",
            "telecom": [{ "system": "phone", "value": "077 000 1001" }] });
        let rules = [rule("phone", PersonElement::Phone)];
        let values = [value("+231 77 000 1001", None)];
        let mapped: Vec<_> = rules.iter().zip(values.iter()).collect();
        let (updated, considered) = plan(&person, &mapped, &phones(), |_| None);
        assert!(updated.is_none());
        assert_eq!(considered[0].outcome, Outcome::Unchanged);
    }

    #[test]
    fn invalid_and_conflicting_values_are_reported_not_forced() {
        let person = json!({ "resourceType": "Practitioner", "id": "p", "gender": "female" });
        let rules = [
            rule("phone", PersonElement::Phone),
            rule("other_phone", PersonElement::Phone),
            rule("sex", PersonElement::Gender),
            rule("mail", PersonElement::Email),
        ];
        let values = [
            value("0880 123 456", None),
            value("0770 001 002", None),
            value("banana", None),
            value("not an email", None),
        ];
        let mapped: Vec<_> = rules.iter().zip(values.iter()).collect();
        let (updated, considered) = plan(&person, &mapped, &phones(), |n| {
            (n == "+231880123456").then(|| "Practitioner/q".to_string())
        });
        assert!(updated.is_none(), "nothing may be written");
        assert!(
            matches!(&considered[0].outcome, Outcome::Conflict(r) if r.contains("Practitioner/q"))
        );
        assert!(matches!(&considered[1].outcome, Outcome::Conflict(r) if r.contains("phone")));
        assert!(matches!(considered[2].outcome, Outcome::Invalid(_)));
        assert!(matches!(considered[3].outcome, Outcome::Invalid(_)));
        let provenance = provenance("run-1", "Practitioner/p", "qr", &considered);
        assert!(provenance.get("activity").is_none());
        assert_eq!(provenance["extension"].as_array().unwrap().len(), 4);
    }
}
