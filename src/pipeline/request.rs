//! What a `CommunicationRequest` asks for, read and checked: the message
//! text (with translations) and/or the flows to start, the recipients named,
//! the job/cadre filter, when to send (`occurrence[x]`) and the emNutt cron
//! schedule. [`check_writable`] is what makes a request that could never be
//! sent a `422` at intake (through `POST`, `PUT` and Bundles alike), so that
//! nothing unusable is stored; [`MessageRequest::parse`] is what the
//! dispatcher works from.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde_json::{Map, Value};

use super::contact::PERSON_TYPES;

/// emNutt's schedule extension (sub-extensions `cronExpression`, `frequency`).
pub const SCHEDULE_EXTENSION: &str =
    "http://mhero.org/fhir/StructureDefinition/sms-cron-expression-schedule";
/// Flow parameters (`@trigger.params`): sub-extensions named by the key.
pub const FLOW_PARAMS_EXTENSION: &str =
    "http://mhero.org/fhir/StructureDefinition/mhero-flow-params";
/// Flow start options: sub-extensions `restartParticipants`, `excludeActive`.
pub const FLOW_OPTIONS_EXTENSION: &str =
    "http://mhero.org/fhir/StructureDefinition/mhero-flow-start-options";
/// Narrows role-based recipients to jobs/cadres (`valueCodeableConcept` or
/// `valueCoding`, repeatable; a code matches under any system).
pub const JOB_FILTER_EXTENSION: &str =
    "http://mhero.org/fhir/StructureDefinition/mhero-recipient-job";
/// The language of a payload (`valueCode`, BCP-47).
pub const LANGUAGE_EXTENSION: &str = "http://hl7.org/fhir/StructureDefinition/language";
/// A translation of a string primitive (`lang`, `content`).
pub const TRANSLATION_EXTENSION: &str = "http://hl7.org/fhir/StructureDefinition/translation";
/// The mACM alert category, bare or as `urn:oid:`.
pub const MACM_ALERT_SYSTEM: &str = "1.3.6.1.4.1.19376.1.2.5.1";

/// The types a recipient reference may name.
pub const RECIPIENT_TYPES: &[&str] = &[
    "Practitioner",
    "Patient",
    "Person",
    "RelatedPerson",
    "Group",
    "PractitionerRole",
    "Location",
    "Organization",
    "HealthcareService",
];

/// Request statuses the dispatcher or the scheduler act on; only these are
/// checked at intake (a `completed` or `revoked` request is a record).
pub const ACTIONABLE_STATUSES: &[&str] = &["active", "on-hold"];

/// A message text: untranslated, or keyed by ISO 639-3 language.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageText {
    Plain(String),
    Translated {
        base_language: String,
        texts: BTreeMap<String, String>,
    },
}

impl MessageText {
    /// The text in the base language (what reconciliation compares).
    pub fn base(&self) -> &str {
        match self {
            MessageText::Plain(text) => text,
            MessageText::Translated {
                base_language,
                texts,
            } => texts.get(base_language).map(String::as_str).unwrap_or(""),
        }
    }
}

/// One thing to do for every recipient.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    Message(MessageText),
    Flow {
        uuid: String,
        params: Map<String, Value>,
        restart_participants: Option<bool>,
        exclude_active: Option<bool>,
    },
}

impl Delivery {
    /// A stable name, part of every per-recipient Communication id:
    /// `message` or `flow:<uuid>`.
    pub fn key(&self) -> String {
        match self {
            Delivery::Message(_) => "message".to_string(),
            Delivery::Flow { uuid, .. } => format!("flow:{uuid}"),
        }
    }
}

/// A recipient as named by the request.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum RecipientRef {
    /// `Type/id`.
    Literal { resource_type: String, id: String },
    /// `#id`: a person contained in the request.
    Contained(String),
}

/// A code of the job/cadre filter; `system` is informational (a code
/// matches under any system, as iHRIS uses more than one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCode {
    pub system: Option<String>,
    pub code: String,
}

/// When the request is to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Occurrence {
    Now,
    At(DateTime<Utc>),
    Window {
        start: Option<DateTime<Utc>>,
        end: Option<DateTime<Utc>>,
    },
}

impl Occurrence {
    pub fn is_due(&self, now: DateTime<Utc>) -> bool {
        match self {
            Occurrence::Now => true,
            Occurrence::At(at) => *at <= now,
            Occurrence::Window { start, .. } => start.is_none_or(|s| s <= now),
        }
    }

    pub fn has_expired(&self, now: DateTime<Utc>) -> bool {
        matches!(self, Occurrence::Window { end: Some(end), .. } if *end < now)
    }
}

/// emNutt's cron schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub expression: String,
    /// `once` fires one time and completes; `recurring` fires until cancelled.
    pub recurring: bool,
}

impl Schedule {
    /// The expression, parsed (it was checked when the request was read).
    pub fn cron(&self) -> Result<croner::Cron, RequestProblem> {
        parse_cron(&self.expression)
    }
}

/// A cron expression as node-cron (emNutt) reads it: 5 fields (minute hour
/// day-of-month month day-of-week) or 6 with seconds first; names
/// (`MON`, `JAN`), ranges, lists and steps. An expression that can never
/// fire (`0 0 30 2 *`) is refused too.
pub fn parse_cron(expression: &str) -> Result<croner::Cron, RequestProblem> {
    use croner::parser::{CronParser, Seconds, Year};
    let fields = expression.split_whitespace().count();
    if !(5..=6).contains(&fields) && !expression.trim_start().starts_with('@') {
        return Err(problem(format!(
            "schedule cronExpression '{expression}' has {fields} fields; give 5 (minute hour day month weekday) or 6 (seconds first)"
        )));
    }
    let cron = CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(expression)
        .map_err(|e| {
            problem(format!(
                "schedule cronExpression '{expression}' is not a cron expression: {e}"
            ))
        })?;
    // Any instant will do: an expression that fires at all fires within
    // the few years croner searches.
    let probe = DateTime::<Utc>::from_timestamp(1_767_225_600, 0).unwrap_or_default();
    if cron.find_next_occurrence(&probe, false).is_err() {
        return Err(problem(format!(
            "schedule cronExpression '{expression}' never fires"
        )));
    }
    Ok(cron)
}

/// A CommunicationRequest, read.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRequest {
    pub status: String,
    pub deliveries: Vec<Delivery>,
    pub recipients: Vec<RecipientRef>,
    pub job_filter: Vec<JobCode>,
    pub occurrence: Occurrence,
    pub schedule: Option<Schedule>,
    /// `urgent`, `asap`, `stat` or `routine` (kept, reported).
    pub priority: Option<String>,
    pub is_alert: bool,
}

/// What is wrong with a request, in words a sender can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RequestProblem(pub String);

fn problem(text: impl Into<String>) -> RequestProblem {
    RequestProblem(text.into())
}

/// Refuses (as `422` through the store's `Unprocessable`) an actionable
/// CommunicationRequest that could never be sent. Other resources and other
/// statuses pass.
pub fn check_writable(resource: &Value) -> Result<(), RequestProblem> {
    if resource.get("resourceType").and_then(Value::as_str) != Some("CommunicationRequest") {
        return Ok(());
    }
    let status = resource.get("status").and_then(Value::as_str);
    if status.is_some_and(|s| !ACTIONABLE_STATUSES.contains(&s)) {
        return Ok(());
    }
    MessageRequest::parse(resource)
        .map(|_| ())
        .map_err(|p| RequestProblem(format!("CommunicationRequest cannot be sent: {p}")))
}

impl MessageRequest {
    pub fn parse(resource: &Value) -> Result<Self, RequestProblem> {
        let status = match resource.get("status") {
            Some(Value::String(s)) => s.clone(),
            None => return Err(problem("status is missing (use \"active\" to send)")),
            Some(_) => return Err(problem("status must be a string")),
        };
        let deliveries = deliveries(resource)?;
        let recipients = recipients(resource)?;
        let job_filter = job_filter(resource)?;
        let occurrence = occurrence(resource)?;
        let schedule = schedule(resource)?;
        let priority = resource
            .get("priority")
            .and_then(Value::as_str)
            .map(str::to_string);
        let is_alert = resource
            .get("category")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .flat_map(|c| {
                c.get("coding")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
            })
            .any(|coding| {
                let system = coding.get("system").and_then(Value::as_str).unwrap_or("");
                let system = system.strip_prefix("urn:oid:").unwrap_or(system);
                system == MACM_ALERT_SYSTEM
                    && coding.get("code").and_then(Value::as_str) == Some("alert")
            });
        Ok(MessageRequest {
            status,
            deliveries,
            recipients,
            job_filter,
            occurrence,
            schedule,
            priority,
            is_alert,
        })
    }
}

fn extensions<'a>(element: &'a Value, url: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    element
        .get("extension")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(move |e| e.get("url").and_then(Value::as_str) == Some(url))
}

/// BCP-47 (`fr`, `fr-CA`, `swa`) to the ISO 639-3 code RapidPro wants.
pub fn iso639_3(code: &str) -> Option<String> {
    let primary = code.split(['-', '_']).next()?.to_ascii_lowercase();
    let language = match primary.len() {
        2 => isolang::Language::from_639_1(&primary),
        3 => isolang::Language::from_639_3(&primary),
        _ => None,
    }?;
    // RapidPro allows only 639-3 codes of languages that have a 639-1 code.
    language.to_639_1()?;
    Some(language.to_639_3().to_string())
}

fn deliveries(resource: &Value) -> Result<Vec<Delivery>, RequestProblem> {
    let payloads = match resource.get("payload") {
        None => {
            return Err(problem(
                "payload is missing: give payload.contentString (a message) or payload.contentReference = Basic/<flow uuid> (a flow)",
            ));
        }
        Some(Value::Array(p)) if !p.is_empty() => p,
        Some(_) => return Err(problem("payload must be a non-empty list")),
    };
    let mut texts: Vec<(Option<String>, String, usize)> = Vec::new();
    let mut flows: Vec<Delivery> = Vec::new();
    for (index, payload) in payloads.iter().enumerate() {
        if let Some(text) = payload.get("contentString") {
            let text = text
                .as_str()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| problem(format!("payload[{index}].contentString is empty")))?;
            if text.chars().count() > 4096 {
                return Err(problem(format!(
                    "payload[{index}].contentString is longer than RapidPro's 4,096 characters"
                )));
            }
            let language = match extensions(payload, LANGUAGE_EXTENSION).next() {
                None => None,
                Some(ext) => {
                    let code = ext.get("valueCode").and_then(Value::as_str).unwrap_or("");
                    Some(iso639_3(code).ok_or_else(|| {
                        problem(format!("payload[{index}]: language '{code}' has no ISO 639-3 code RapidPro accepts"))
                    })?)
                }
            };
            texts.push((language, text.to_string(), index));
            // Translations of the primitive (`_contentString`).
            if let Some(primitive) = payload.get("_contentString") {
                for translation in extensions(primitive, TRANSLATION_EXTENSION) {
                    let lang = extensions(translation, "lang")
                        .next()
                        .and_then(|e| e.get("valueCode"))
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    let content = extensions(translation, "content")
                        .next()
                        .and_then(|e| e.get("valueString"))
                        .and_then(Value::as_str)
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .ok_or_else(|| {
                            problem(format!("payload[{index}]: a translation without content"))
                        })?;
                    let code = iso639_3(lang).ok_or_else(|| {
                        problem(format!("payload[{index}]: translation language '{lang}' has no ISO 639-3 code RapidPro accepts"))
                    })?;
                    texts.push((Some(code), content.to_string(), index));
                }
            }
        } else if let Some(flow) = flow_reference(payload, index)? {
            let params = flow_params(resource, payload, index)?;
            let (restart_participants, exclude_active) = flow_options(resource, payload, index)?;
            let delivery = Delivery::Flow {
                uuid: flow,
                params,
                restart_participants,
                exclude_active,
            };
            if !flows.iter().any(|f| f.key() == delivery.key()) {
                flows.push(delivery);
            }
        } else {
            return Err(problem(format!(
                "payload[{index}] has no usable content: give contentString (a message), contentReference = Basic/<flow uuid> or contentAttachment.url = <flow uuid> (a flow)"
            )));
        }
    }
    let mut deliveries = Vec::new();
    if let Some(message) = message_text(texts)? {
        deliveries.push(Delivery::Message(message));
    }
    deliveries.extend(flows);
    Ok(deliveries)
}

fn message_text(
    texts: Vec<(Option<String>, String, usize)>,
) -> Result<Option<MessageText>, RequestProblem> {
    match texts.len() {
        0 => return Ok(None),
        1 if texts[0].0.is_none() => return Ok(Some(MessageText::Plain(texts[0].1.clone()))),
        _ => {}
    }
    let mut base_language = None;
    let mut map = BTreeMap::new();
    let mut untranslated = 0;
    for (language, text, index) in texts {
        let language = match language {
            Some(l) => l,
            None => {
                untranslated += 1;
                if untranslated > 1 {
                    return Err(problem(format!(
                        "payload[{index}]: several message texts without a language; mark each with the extension {LANGUAGE_EXTENSION}"
                    )));
                }
                // The untranslated text is the base; RapidPro needs a key.
                DEFAULT_BASE_LANGUAGE.to_string()
            }
        };
        if map.insert(language.clone(), text).is_some() {
            return Err(problem(format!(
                "payload[{index}]: two message texts in language '{language}'"
            )));
        }
        base_language.get_or_insert(language);
    }
    Ok(Some(MessageText::Translated {
        base_language: base_language.unwrap_or_else(|| DEFAULT_BASE_LANGUAGE.to_string()),
        texts: map,
    }))
}

/// The language key given to an untranslated text when translations are
/// present (RapidPro's own default flow language).
pub const DEFAULT_BASE_LANGUAGE: &str = "eng";

fn is_uuid(value: &str) -> bool {
    uuid::Uuid::parse_str(value).is_ok() && value.len() == 36
}

/// `contentReference.reference` = `Basic/<uuid>` (emNutt), or
/// `contentAttachment.url` = `<uuid>` or `Basic/<uuid>` (emNutt's docs).
fn flow_reference(payload: &Value, index: usize) -> Result<Option<String>, RequestProblem> {
    let (raw, element) = if let Some(reference) = payload.get("contentReference") {
        (
            reference.get("reference").and_then(Value::as_str),
            "contentReference.reference",
        )
    } else if let Some(attachment) = payload.get("contentAttachment") {
        (
            attachment.get("url").and_then(Value::as_str),
            "contentAttachment.url",
        )
    } else {
        return Ok(None);
    };
    let raw = raw.ok_or_else(|| problem(format!("payload[{index}].{element} is missing")))?;
    let uuid = raw
        .rsplit_once("Basic/")
        .map(|(_, id)| id)
        .unwrap_or(raw)
        .trim_end_matches('/');
    if is_uuid(uuid) {
        Ok(Some(uuid.to_ascii_lowercase()))
    } else {
        Err(problem(format!(
            "payload[{index}].{element} '{raw}' does not name a flow: expected Basic/<flow uuid>"
        )))
    }
}

/// The params extension on the payload, else on the request.
fn flow_params(
    resource: &Value,
    payload: &Value,
    index: usize,
) -> Result<Map<String, Value>, RequestProblem> {
    let Some(ext) = extensions(payload, FLOW_PARAMS_EXTENSION)
        .next()
        .or_else(|| extensions(resource, FLOW_PARAMS_EXTENSION).next())
    else {
        return Ok(Map::new());
    };
    let mut params = Map::new();
    if let Some(json) = ext.get("valueString").and_then(Value::as_str) {
        match serde_json::from_str::<Value>(json) {
            Ok(Value::Object(map)) => params = map,
            _ => {
                return Err(problem(format!(
                    "payload[{index}]: the flow params extension's valueString must be a JSON object"
                )));
            }
        }
    }
    for sub in ext
        .get("extension")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = sub.get("url").and_then(Value::as_str).unwrap_or("");
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(problem(format!(
                "payload[{index}]: flow param name '{key}' must be letters, digits or _"
            )));
        }
        let value = [
            "valueString",
            "valueInteger",
            "valueDecimal",
            "valueBoolean",
            "valueCode",
        ]
        .iter()
        .find_map(|k| sub.get(*k))
        .cloned()
        .ok_or_else(|| {
            problem(format!(
                "payload[{index}]: flow param '{key}' has no string, number or boolean value"
            ))
        })?;
        params.insert(key.to_string(), value);
    }
    // RapidPro's limit, with room for the connector's batch id.
    if serde_json::to_string(&params).map_or(0, |s| s.len()) > 9_900 {
        return Err(problem(format!(
            "payload[{index}]: flow params exceed RapidPro's 10,000 characters"
        )));
    }
    Ok(params)
}

fn flow_options(
    resource: &Value,
    payload: &Value,
    index: usize,
) -> Result<(Option<bool>, Option<bool>), RequestProblem> {
    let Some(ext) = extensions(payload, FLOW_OPTIONS_EXTENSION)
        .next()
        .or_else(|| extensions(resource, FLOW_OPTIONS_EXTENSION).next())
    else {
        return Ok((None, None));
    };
    let flag = |name: &str| -> Result<Option<bool>, RequestProblem> {
        match extensions(ext, name).next() {
            None => Ok(None),
            Some(sub) => sub
                .get("valueBoolean")
                .and_then(Value::as_bool)
                .map(Some)
                .ok_or_else(|| {
                    problem(format!(
                        "payload[{index}]: flow option '{name}' needs valueBoolean"
                    ))
                }),
        }
    };
    Ok((flag("restartParticipants")?, flag("excludeActive")?))
}

fn recipients(resource: &Value) -> Result<Vec<RecipientRef>, RequestProblem> {
    let list = match resource.get("recipient") {
        None => {
            return Err(problem(
                "recipient is missing: name at least one person, Group, PractitionerRole, Location, Organization or HealthcareService",
            ));
        }
        Some(Value::Array(list)) if !list.is_empty() => list,
        Some(_) => return Err(problem("recipient must be a non-empty list")),
    };
    let contained: Vec<(&str, &str)> = resource
        .get("contained")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| Some((c.get("id")?.as_str()?, c.get("resourceType")?.as_str()?)))
        .collect();
    let mut refs = Vec::new();
    for (index, recipient) in list.iter().enumerate() {
        let reference = recipient
            .get("reference")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                problem(format!(
                    "recipient[{index}] has no reference (only literal references such as Practitioner/<id> can be resolved)"
                ))
            })?;
        let parsed = if let Some(id) = reference.strip_prefix('#') {
            match contained.iter().find(|(cid, _)| *cid == id) {
                Some((_, t)) if PERSON_TYPES.contains(t) => RecipientRef::Contained(id.to_string()),
                Some((_, t)) => {
                    return Err(problem(format!(
                        "recipient[{index}] '#{id}' is a contained {t}; contained recipients must be one of {}",
                        PERSON_TYPES.join(", ")
                    )));
                }
                None => {
                    return Err(problem(format!(
                        "recipient[{index}] '#{id}' names no contained resource"
                    )));
                }
            }
        } else {
            let mut parts = reference.trim_end_matches('/').rsplit('/');
            let id = parts.next().unwrap_or("");
            let resource_type = parts.next().unwrap_or("");
            if !RECIPIENT_TYPES.contains(&resource_type)
                || !crate::fhir::resource_types::is_valid_id(id)
            {
                return Err(problem(format!(
                    "recipient[{index}] '{reference}' is not a reference to one of {}",
                    RECIPIENT_TYPES.join(", ")
                )));
            }
            RecipientRef::Literal {
                resource_type: resource_type.to_string(),
                id: id.to_string(),
            }
        };
        if !refs.contains(&parsed) {
            refs.push(parsed);
        }
    }
    Ok(refs)
}

fn job_filter(resource: &Value) -> Result<Vec<JobCode>, RequestProblem> {
    let mut codes = Vec::new();
    for ext in extensions(resource, JOB_FILTER_EXTENSION) {
        let codings: Vec<&Value> = if let Some(coding) = ext.get("valueCoding") {
            vec![coding]
        } else if let Some(concept) = ext.get("valueCodeableConcept") {
            concept
                .get("coding")
                .and_then(Value::as_array)
                .map(|c| c.iter().collect())
                .unwrap_or_default()
        } else if let Some(code) = ext.get("valueCode").and_then(Value::as_str) {
            codes.push(JobCode {
                system: None,
                code: code.to_string(),
            });
            continue;
        } else {
            Vec::new()
        };
        if codings.is_empty() {
            return Err(problem(
                "the job filter extension needs valueCoding, valueCodeableConcept or valueCode",
            ));
        }
        for coding in codings {
            let code = coding
                .get("code")
                .and_then(Value::as_str)
                .ok_or_else(|| problem("a job filter coding has no code"))?;
            codes.push(JobCode {
                system: coding
                    .get("system")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                code: code.to_string(),
            });
        }
    }
    Ok(codes)
}

/// A FHIR dateTime as an instant: a full date-time with an offset, a
/// date-time without offset (read as UTC), or a date (its start, UTC).
pub fn parse_date_time(value: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return Some(t.with_timezone(&Utc));
    }
    if let Ok(t) = NaiveDateTime::parse_from_str(value, "%Y-%m-%dT%H:%M:%S%.f") {
        return Some(t.and_utc());
    }
    if let Ok(d) = NaiveDate::parse_from_str(value, "%Y-%m-%d") {
        return d.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
    }
    None
}

fn date_time_field(
    value: Option<&Value>,
    name: &str,
) -> Result<Option<DateTime<Utc>>, RequestProblem> {
    match value {
        None => Ok(None),
        Some(v) => v
            .as_str()
            .and_then(parse_date_time)
            .map(Some)
            .ok_or_else(|| problem(format!("{name} is not a FHIR dateTime"))),
    }
}

fn occurrence(resource: &Value) -> Result<Occurrence, RequestProblem> {
    if let Some(at) = date_time_field(resource.get("occurrenceDateTime"), "occurrenceDateTime")? {
        return Ok(Occurrence::At(at));
    }
    if let Some(period) = resource.get("occurrencePeriod") {
        let start = date_time_field(period.get("start"), "occurrencePeriod.start")?;
        let end = date_time_field(period.get("end"), "occurrencePeriod.end")?;
        if let (Some(s), Some(e)) = (start, end)
            && e < s
        {
            return Err(problem("occurrencePeriod ends before it starts"));
        }
        return Ok(Occurrence::Window { start, end });
    }
    Ok(Occurrence::Now)
}

fn schedule(resource: &Value) -> Result<Option<Schedule>, RequestProblem> {
    let Some(ext) = extensions(resource, SCHEDULE_EXTENSION).next() else {
        return Ok(None);
    };
    fn sub<'a>(ext: &'a Value, name: &'a str) -> Option<&'a str> {
        extensions(ext, name).next().and_then(|e| {
            ["valueString", "valueCode"]
                .iter()
                .find_map(|k| e.get(*k).and_then(Value::as_str))
        })
    }
    let expression = sub(ext, "cronExpression")
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .ok_or_else(|| problem("the schedule extension has no cronExpression"))?;
    parse_cron(expression)?;
    let recurring = match sub(ext, "frequency") {
        None | Some("recurring") => true,
        Some("once") => false,
        Some(other) => {
            return Err(problem(format!(
                "schedule frequency '{other}' is not once or recurring"
            )));
        }
    };
    Ok(Some(Schedule {
        expression: expression.to_string(),
        recurring,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(extra: Value) -> Value {
        let mut r = json!({
            "resourceType": "CommunicationRequest",
            "status": "active",
            "recipient": [{"reference": "Practitioner/p1"}],
            "payload": [{"contentString": "Hello"}]
        });
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        r
    }

    #[test]
    fn message_flow_and_both_kinds() {
        let parsed = MessageRequest::parse(&request(json!({}))).unwrap();
        assert_eq!(
            parsed.deliveries,
            vec![Delivery::Message(MessageText::Plain("Hello".into()))]
        );
        let flow = "f5901b62-ba76-4003-9c62-72fdacc1b7b7";
        let both = request(json!({"payload": [
            {"contentString": "Hi"},
            {"contentReference": {"reference": format!("Basic/{flow}")}},
            {"contentAttachment": {"url": flow}}
        ]}));
        let parsed = MessageRequest::parse(&both).unwrap();
        assert_eq!(
            parsed.deliveries.len(),
            2,
            "the same flow twice is one delivery"
        );
        assert_eq!(parsed.deliveries[1].key(), format!("flow:{flow}"));
    }

    #[test]
    fn translations_from_language_extensions_and_primitive_translations() {
        let r = request(json!({"payload": [
            {"contentString": "Hello", "extension": [{"url": LANGUAGE_EXTENSION, "valueCode": "en"}],
             "_contentString": {"extension": [{"url": TRANSLATION_EXTENSION, "extension": [
                {"url": "lang", "valueCode": "fr-FR"}, {"url": "content", "valueString": "Bonjour"}]}]}},
            {"contentString": "Habari", "extension": [{"url": LANGUAGE_EXTENSION, "valueCode": "sw"}]}
        ]}));
        let parsed = MessageRequest::parse(&r).unwrap();
        let Delivery::Message(MessageText::Translated {
            base_language,
            texts,
        }) = &parsed.deliveries[0]
        else {
            panic!("translated text expected: {:?}", parsed.deliveries);
        };
        assert_eq!(base_language, "eng");
        assert_eq!(texts["fra"], "Bonjour");
        assert_eq!(texts["swa"], "Habari");
        let two_plain =
            request(json!({"payload": [{"contentString": "a"}, {"contentString": "b"}]}));
        let err = MessageRequest::parse(&two_plain).unwrap_err();
        assert!(err.0.contains("without a language"), "{err}");
    }

    #[test]
    fn problems_name_the_element() {
        let cases = [
            (json!({"payload": []}), "payload"),
            (
                json!({"payload": [{"contentString": "  "}]}),
                "payload[0].contentString is empty",
            ),
            (
                json!({"payload": [{"contentReference": {"reference": "Basic/not-a-flow"}}]}),
                "does not name a flow",
            ),
            (json!({"recipient": []}), "recipient"),
            (
                json!({"recipient": [{"display": "Jane"}]}),
                "recipient[0] has no reference",
            ),
            (
                json!({"recipient": [{"reference": "Observation/1"}]}),
                "recipient[0] 'Observation/1'",
            ),
            (
                json!({"recipient": [{"reference": "#nope"}]}),
                "names no contained resource",
            ),
            (
                json!({"occurrenceDateTime": "tomorrow"}),
                "occurrenceDateTime",
            ),
            (
                json!({"occurrencePeriod": {"start": "2026-02-02", "end": "2026-01-01"}}),
                "ends before",
            ),
        ];
        for (extra, expected) in cases {
            let err = MessageRequest::parse(&request(extra.clone())).unwrap_err();
            assert!(err.0.contains(expected), "{extra}: {err}");
        }
    }

    #[test]
    fn only_actionable_requests_are_checked() {
        let mut r = request(json!({"recipient": []}));
        assert!(check_writable(&r).is_err());
        r["status"] = json!("completed");
        assert!(check_writable(&r).is_ok());
        assert!(check_writable(&json!({"resourceType": "Patient"})).is_ok());
    }

    #[test]
    fn params_options_job_filter_schedule_and_alert() {
        let r = request(json!({
            "payload": [{"contentReference": {"reference": "Basic/f5901b62-ba76-4003-9c62-72fdacc1b7b7"},
                "extension": [{"url": FLOW_PARAMS_EXTENSION, "extension": [{"url": "district", "valueString": "Bong"}, {"url": "round", "valueInteger": 2}]}]}],
            "extension": [
                {"url": FLOW_OPTIONS_EXTENSION, "extension": [{"url": "restartParticipants", "valueBoolean": false}]},
                {"url": JOB_FILTER_EXTENSION, "valueCodeableConcept": {"coding": [{"system": "s", "code": "midwife"}]}},
                {"url": SCHEDULE_EXTENSION, "extension": [{"url": "cronExpression", "valueString": "0 8 * * 1"}, {"url": "frequency", "valueString": "once"}]}
            ],
            "category": [{"coding": [{"system": "urn:oid:1.3.6.1.4.1.19376.1.2.5.1", "code": "alert"}]}]
        }));
        let parsed = MessageRequest::parse(&r).unwrap();
        let Delivery::Flow {
            params,
            restart_participants,
            exclude_active,
            ..
        } = &parsed.deliveries[0]
        else {
            panic!()
        };
        assert_eq!(params["district"], "Bong");
        assert_eq!(params["round"], 2);
        assert_eq!(
            (*restart_participants, *exclude_active),
            (Some(false), None)
        );
        assert_eq!(parsed.job_filter[0].code, "midwife");
        assert!(!parsed.schedule.as_ref().unwrap().recurring);
        assert!(parsed.is_alert);
    }

    #[test]
    fn cron_expressions_are_checked_at_intake() {
        let with_cron = |expression: &str| {
            request(
                json!({"extension": [{"url": SCHEDULE_EXTENSION, "extension": [
                {"url": "cronExpression", "valueString": expression}]}]}),
            )
        };
        // iHRIS's "send once later", node-cron's 6 fields, names and steps.
        for good in ["06 14 05 09 *", "30 0 8 * * MON", "*/15 8-17 * * 1-5"] {
            let parsed = MessageRequest::parse(&with_cron(good)).unwrap();
            assert_eq!(parsed.schedule.unwrap().expression, good);
        }
        for (bad, expected) in [
            ("61 * * * *", "is not a cron expression"),
            ("* * *", "has 3 fields"),
            ("0 0 8 * * * 2030", "has 7 fields"),
            ("0 0 30 2 *", "never fires"),
            ("every monday", "cronExpression"),
        ] {
            let err = check_writable(&with_cron(bad)).unwrap_err();
            assert!(
                err.0.contains("cronExpression") && err.0.contains(expected),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn occurrence_due_and_expired() {
        let now = Utc::now();
        let window = Occurrence::Window {
            start: Some(now - chrono::Duration::hours(2)),
            end: Some(now - chrono::Duration::hours(1)),
        };
        assert!(window.is_due(now) && window.has_expired(now));
        assert!(!Occurrence::At(now + chrono::Duration::hours(1)).is_due(now));
        assert!(Occurrence::Now.is_due(now));
    }
}
