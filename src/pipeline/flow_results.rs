//! Flow results -> FHIR (docs/flow-results.md).
//!
//! - A flow becomes a `Questionnaire` (`Questionnaire/<flow uuid>`, url
//!   `http://mhero.org/fhir/Questionnaire/<flow uuid>`): one item per result
//!   key (linkId = key, text = result name), typed from the router's cases
//!   (number tests -> `decimal`, date tests -> `date`, otherwise `string`).
//! - A run (from `runs.json` or a webhook payload) becomes a
//!   `QuestionnaireResponse` with the run uuid as id (and identifier), so it
//!   is updated in place as the run advances; writing equal content makes
//!   no new version. `subject`/`source` = the person with the contact's
//!   uuid (`http://app.rapidpro.io/contact-uuid`), or the recipient of the
//!   flow start's outbox entry; status `in-progress` (no exit yet),
//!   `completed` (exit completed) or `stopped` (interrupted, expired,
//!   failed). Each answer is typed by the item (`valueDecimal`, `valueDate`,
//!   else `valueString`) and carries RapidPro's category in the
//!   `mhero-flow-result-category` extension.
//! - A finished run of a flow start closes its per-recipient outbox
//!   `Communication` (`completed` / `stopped`, forward only, `If-Match`), and
//!   the request completes once its outbox is all final.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use super::contact::{CONTACT_UUID_SYSTEM, PERSON_TYPES};
use super::outbox::{self, FLOW_START_SYSTEM};
use crate::rapidpro::types::{ExitType, Flow, Run};
use crate::store::{
    FhirStore, SearchRequest, StoreError, WriteKind, escape_search_value, search_all,
};

/// Canonical url base of the generated Questionnaires.
pub const QUESTIONNAIRE_BASE: &str = "http://mhero.org/fhir/Questionnaire/";
/// Identifier system of a QuestionnaireResponse's run.
pub const RUN_UUID_SYSTEM: &str = "http://app.rapidpro.io/run-uuid";
/// RapidPro's category of an answer (`valueString`).
pub const CATEGORY_EXTENSION: &str =
    "http://mhero.org/fhir/StructureDefinition/mhero-flow-result-category";
/// The RapidPro contact (uuid) a response came from.
pub const CONTACT_EXTENSION: &str =
    "http://mhero.org/fhir/StructureDefinition/mhero-rapidpro-contact";
/// The flow start (uuid) a run belongs to, when it was started by one.
pub const FLOW_START_EXTENSION: &str = "http://mhero.org/fhir/StructureDefinition/mhero-flow-start";

/// Namespace of ids derived from run uuids that are not valid FHIR ids.
const RUN_NAMESPACE: Uuid = Uuid::from_u128(0x6d68_6572_6f2d_5275_6e73_0000_0000_0001);

/// The FHIR type of a result's answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemType {
    Decimal,
    Date,
    String,
}

impl ItemType {
    fn code(self) -> &'static str {
        match self {
            ItemType::Decimal => "decimal",
            ItemType::Date => "date",
            ItemType::String => "string",
        }
    }
}

/// One result of a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultSpec {
    pub key: String,
    pub name: String,
    pub item_type: ItemType,
    pub categories: Vec<String>,
}

/// RapidPro's result key of a result name (snake case, as the API does).
pub fn result_key(name: &str) -> String {
    let mut key = String::new();
    for c in name.trim().chars() {
        if c.is_alphanumeric() {
            key.extend(c.to_lowercase());
        } else if !key.ends_with('_') {
            key.push('_');
        }
    }
    key.trim_matches('_').chars().take(64).collect()
}

fn type_of_cases(cases: &[Value]) -> ItemType {
    let types: Vec<&str> = cases.iter().filter_map(|c| c["type"].as_str()).collect();
    if !types.is_empty() && types.iter().all(|t| t.starts_with("has_number")) {
        ItemType::Decimal
    } else if !types.is_empty() && types.iter().all(|t| t.starts_with("has_date")) {
        ItemType::Date
    } else {
        ItemType::String
    }
}

/// The results of a flow definition (one flow of a `definitions.json`
/// export): routers with a `result_name` and actions with one (webhooks),
/// in node order, one per key.
pub fn specs_from_definition(flow: &Value) -> Vec<ResultSpec> {
    let mut specs: Vec<ResultSpec> = Vec::new();
    let mut add = |name: &str, item_type: ItemType, categories: Vec<String>| {
        let key = result_key(name);
        if key.is_empty() {
            return;
        }
        match specs.iter_mut().find(|s| s.key == key) {
            Some(spec) => {
                if spec.item_type != item_type {
                    spec.item_type = ItemType::String;
                }
                for c in categories {
                    if !spec.categories.contains(&c) {
                        spec.categories.push(c);
                    }
                }
            }
            None => specs.push(ResultSpec {
                key,
                name: name.trim().to_string(),
                item_type,
                categories,
            }),
        }
    };
    for node in flow["nodes"].as_array().into_iter().flatten() {
        for action in node["actions"].as_array().into_iter().flatten() {
            if let Some(name) = action["result_name"].as_str() {
                add(name, ItemType::String, Vec::new());
            }
        }
        let router = &node["router"];
        if let Some(name) = router["result_name"].as_str() {
            let cases = router["cases"].as_array().cloned().unwrap_or_default();
            let categories = router["categories"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["name"].as_str().map(str::to_string))
                .collect();
            add(name, type_of_cases(&cases), categories);
        }
    }
    specs
}

/// The results of a flow as `flows.json` lists them (no case types: every
/// item is a `string`).
pub fn specs_from_flow(flow: &Flow) -> Vec<ResultSpec> {
    flow.results
        .iter()
        .filter(|r| !r.key.is_empty())
        .map(|r| ResultSpec {
            key: r.key.clone(),
            name: r.name.clone(),
            item_type: ItemType::String,
            categories: r.categories.clone(),
        })
        .collect()
}

/// The canonical url of a flow's Questionnaire.
pub fn questionnaire_url(flow_uuid: &str) -> String {
    format!("{QUESTIONNAIRE_BASE}{flow_uuid}")
}

/// A FHIR id for a RapidPro uuid (the uuid itself when it is one).
pub fn id_for(uuid: &str) -> String {
    if crate::fhir::resource_types::is_valid_id(uuid) {
        uuid.to_string()
    } else {
        Uuid::new_v5(&RUN_NAMESPACE, uuid.as_bytes()).to_string()
    }
}

/// The Questionnaire of a flow.
pub fn questionnaire(flow_uuid: &str, flow_name: &str, specs: &[ResultSpec]) -> Value {
    let items: Vec<Value> = specs
        .iter()
        .map(|s| {
            let mut item = json!({ "linkId": s.key, "text": s.name, "type": s.item_type.code() });
            if !s.categories.is_empty() {
                // Categories are RapidPro's buckets, not the allowed answers
                // (the answer is the raw value): kept as an extension.
                item["extension"] = json!(
                    s.categories
                        .iter()
                        .map(|c| json!({ "url": CATEGORY_EXTENSION, "valueString": c }))
                        .collect::<Vec<_>>()
                );
            }
            item
        })
        .collect();
    let mut q = json!({
        "resourceType": "Questionnaire",
        "id": id_for(flow_uuid),
        "url": questionnaire_url(flow_uuid),
        "identifier": [{ "system": "http://app.rapidpro.io/flow-uuid", "value": flow_uuid }],
        "name": questionnaire_name(flow_name),
        "title": flow_name,
        "status": "active",
        "subjectType": PERSON_TYPES,
    });
    if !items.is_empty() {
        q["item"] = json!(items);
    }
    q
}

/// A computer-friendly name (R4: starts with a capital letter, letters,
/// digits and `_`).
fn questionnaire_name(flow_name: &str) -> String {
    let mut name: String = flow_name
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut cs = w.chars();
            cs.next()
                .map(|f| f.to_ascii_uppercase().to_string() + cs.as_str())
                .unwrap_or_default()
        })
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_uppercase()) {
        name.insert_str(0, "Flow");
    }
    name
}

/// One recorded result value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultValue {
    pub name: Option<String>,
    pub value: String,
    pub category: Option<String>,
}

/// What a run says, from `runs.json` or a webhook payload.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    /// `None` in a webhook body without `run` (the editor's default body).
    pub run_uuid: Option<String>,
    pub flow_uuid: String,
    pub flow_name: Option<String>,
    pub contact_uuid: String,
    pub contact_urn: Option<String>,
    pub start_uuid: Option<String>,
    /// `in-progress`, `completed` or `stopped`.
    pub status: &'static str,
    pub authored: Option<DateTime<Utc>>,
    pub values: BTreeMap<String, ResultValue>,
}

/// The QuestionnaireResponse status of a run's exit.
pub fn status_of(exit: Option<&ExitType>) -> &'static str {
    match exit {
        None => "in-progress",
        Some(ExitType::Completed) => "completed",
        Some(_) => "stopped",
    }
}

impl RunRecord {
    /// A run of `runs.json`; `None` without uuid, flow or contact.
    pub fn from_run(run: &Run) -> Option<RunRecord> {
        let run_uuid = run.uuid.clone().filter(|u| !u.is_empty())?;
        let flow = run.flow.as_ref().filter(|f| !f.uuid.is_empty())?;
        let contact = run.contact.as_ref().filter(|c| !c.uuid.is_empty())?;
        Some(RunRecord {
            run_uuid: Some(run_uuid),
            flow_uuid: flow.uuid.clone(),
            flow_name: flow.name.clone(),
            contact_uuid: contact.uuid.clone(),
            contact_urn: contact.urn.clone(),
            start_uuid: run
                .start
                .as_ref()
                .map(|s| s.uuid.clone())
                .filter(|u| !u.is_empty()),
            status: status_of(run.exit_type.as_ref()),
            authored: run.modified_on.or(run.created_on),
            values: run
                .values
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        k.clone(),
                        ResultValue {
                            name: v.name.clone(),
                            value: v.value.clone()?,
                            category: v.category.clone().filter(|c| !c.is_empty()),
                        },
                    ))
                })
                .collect(),
        })
    }

    /// A webhook body: the flow editor's default Call Webhook body
    /// (`contact`, `flow`, `results`), its legacy form and the resthook
    /// payload (`run`, `path`, `input`, `channel` too). The error names what
    /// is missing or malformed.
    pub fn from_webhook(body: &Value, received: DateTime<Utc>) -> Result<RunRecord, String> {
        let object = body
            .as_object()
            .ok_or("the body is not a JSON object".to_string())?;
        fn text(v: &Value) -> Option<&str> {
            v.as_str().map(str::trim).filter(|s| !s.is_empty())
        }
        let contact = object
            .get("contact")
            .filter(|c| c.is_object())
            .ok_or("contact is missing")?;
        let contact_uuid = text(&contact["uuid"]).ok_or("contact.uuid is missing")?;
        let flow = object
            .get("flow")
            .filter(|c| c.is_object())
            .ok_or("flow is missing")?;
        let flow_uuid = text(&flow["uuid"]).ok_or("flow.uuid is missing")?;
        let results = match object.get("results") {
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(Value::Object(map)) => map.clone(),
            Some(_) => return Err("results is not an object".into()),
        };
        let mut values = BTreeMap::new();
        let mut newest: Option<DateTime<Utc>> = None;
        for (key, result) in &results {
            let Some(result) = result.as_object() else {
                return Err(format!("results.{key} is not an object"));
            };
            let value = match result.get("value") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(Value::Bool(b)) => b.to_string(),
                _ => continue,
            };
            if let Some(t) = result
                .get("created_on")
                .and_then(Value::as_str)
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            {
                let t = t.with_timezone(&Utc);
                newest = Some(newest.map_or(t, |n| n.max(t)));
            }
            values.insert(
                key.clone(),
                ResultValue {
                    name: result.get("name").and_then(text).map(str::to_string),
                    value,
                    category: result.get("category").and_then(text).map(str::to_string),
                },
            );
        }
        let run_uuid = match object.get("run") {
            None | Some(Value::Null) => None,
            Some(run) => Some(text(&run["uuid"]).ok_or("run.uuid is missing")?.to_string()),
        };
        Ok(RunRecord {
            run_uuid,
            flow_uuid: flow_uuid.to_string(),
            flow_name: flow.get("name").and_then(text).map(str::to_string),
            contact_uuid: contact_uuid.to_string(),
            contact_urn: contact.get("urn").and_then(text).map(str::to_string),
            start_uuid: None,
            status: "in-progress",
            authored: Some(newest.unwrap_or(received)),
            values,
        })
    }
}

/// The answer of one value, typed by its item.
fn answer(value: &ResultValue, item_type: ItemType) -> Value {
    let raw = value.value.trim();
    let mut answer = match item_type {
        ItemType::Decimal => match raw.parse::<f64>() {
            Ok(n) if n.is_finite() && is_plain_number(raw) => {
                serde_json::from_str::<serde_json::Number>(raw)
                    .map(|n| json!({ "valueDecimal": n }))
                    .unwrap_or_else(|_| json!({ "valueDecimal": n }))
            }
            _ => json!({ "valueString": value.value }),
        },
        ItemType::Date => match raw
            .get(..10)
            .and_then(|d| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
        {
            Some(date) => json!({ "valueDate": date.format("%Y-%m-%d").to_string() }),
            None => json!({ "valueString": value.value }),
        },
        ItemType::String => json!({ "valueString": value.value }),
    };
    if let Some(category) = &value.category {
        answer["extension"] = json!([{ "url": CATEGORY_EXTENSION, "valueString": category }]);
    }
    answer
}

/// `-12`, `3.5`, `0.25`: JSON-compatible decimals only (no `1e3`, `NaN`,
/// `0x1`), and nothing a number would change: a leading `+` or zero is a
/// phone number or a code (`+231770…`, `0770…`), kept as text.
fn is_plain_number(raw: &str) -> bool {
    let digits = raw.strip_prefix('-').unwrap_or(raw);
    let mut parts = digits.splitn(2, '.');
    let whole = parts.next().unwrap_or("");
    let frac = parts.next();
    !whole.is_empty()
        && (whole == "0" || !whole.starts_with('0'))
        && whole.chars().all(|c| c.is_ascii_digit())
        && frac.is_none_or(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_digit()))
}

/// How a value without a known item is typed: a plain number is decimal.
fn guess_type(value: &ResultValue) -> ItemType {
    if is_plain_number(value.value.trim()) {
        ItemType::Decimal
    } else {
        ItemType::String
    }
}

/// The QuestionnaireResponse of a run (`run_uuid` required). `subject` is a
/// reference to the person (`Practitioner/x`), if one was found.
pub fn questionnaire_response(
    record: &RunRecord,
    subject: Option<&str>,
    specs: &[ResultSpec],
) -> Option<Value> {
    let run_uuid = record.run_uuid.as_deref()?;
    let items: Vec<Value> = record
        .values
        .iter()
        .map(|(key, value)| {
            let spec = specs.iter().find(|s| &s.key == key);
            let item_type = spec.map_or_else(|| guess_type(value), |s| s.item_type);
            let mut item = json!({ "linkId": key, "answer": [answer(value, item_type)] });
            if let Some(text) = spec.map(|s| s.name.clone()).or(value.name.clone()) {
                item["text"] = json!(text);
            }
            item
        })
        .collect();
    let mut extension =
        vec![json!({ "url": CONTACT_EXTENSION, "valueString": record.contact_uuid })];
    if let Some(start) = &record.start_uuid {
        extension.push(json!({ "url": FLOW_START_EXTENSION, "valueString": start }));
    }
    let mut qr = json!({
        "resourceType": "QuestionnaireResponse",
        "id": id_for(run_uuid),
        "identifier": { "system": RUN_UUID_SYSTEM, "value": run_uuid },
        "questionnaire": questionnaire_url(&record.flow_uuid),
        "status": record.status,
        "extension": extension,
    });
    if let Some(reference) = subject {
        qr["subject"] = json!({ "reference": reference });
        // R4: source is Patient | Practitioner | PractitionerRole | RelatedPerson.
        if !reference.starts_with("Person/") {
            qr["source"] = json!({ "reference": reference });
        }
    }
    if let Some(authored) = &record.authored {
        qr["authored"] = json!(crate::fhir::format_instant(authored));
    }
    if !items.is_empty() {
        qr["item"] = json!(items);
    }
    Some(qr)
}

fn is_final_status(status: &str) -> bool {
    matches!(
        status,
        "completed" | "stopped" | "amended" | "entered-in-error"
    )
}

/// What to write over `stored` (the current version, if any). A full run
/// (`authoritative`, from `runs.json`) replaces the items; a webhook merges
/// its results into them; a webhook older than what is stored (an event
/// arriving late) only adds answers the response lacks, never replaces
/// one. Never moves a final response back to `in-progress`, never
/// replaces a newer `authored`, keeps a known subject.
pub fn merge(stored: Option<&Value>, new: Value, authoritative: bool) -> Value {
    let Some(stored) = stored else {
        return new;
    };
    let mut merged = new;
    let stored_status = stored["status"].as_str().unwrap_or("");
    if is_final_status(stored_status) && !is_final_status(merged["status"].as_str().unwrap_or("")) {
        merged["status"] = json!(stored_status);
    }
    let parse = |v: &Value| {
        v.as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
    };
    let late = matches!(
        (parse(&stored["authored"]), parse(&merged["authored"])),
        (Some(old), Some(new)) if old > new
    );
    if late {
        merged["authored"] = stored["authored"].clone();
    }
    for element in ["subject", "source"] {
        if merged.get(element).is_none()
            && let Some(value) = stored.get(element)
        {
            merged[element] = value.clone();
        }
    }
    if !authoritative {
        let mut items: Vec<Value> = stored["item"].as_array().cloned().unwrap_or_default();
        for item in merged["item"].as_array().cloned().unwrap_or_default() {
            match items.iter_mut().find(|i| i["linkId"] == item["linkId"]) {
                Some(_) if late => {}
                Some(existing) => *existing = item,
                None => items.push(item),
            }
        }
        if !items.is_empty() {
            merged["item"] = json!(items);
        }
    }
    merged
}

/// How a write went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Created,
    Updated,
    Unchanged,
}

/// The person with RapidPro contact `contact_uuid` (`Practitioner/x`).
pub async fn person_of_contact(
    store: &dyn FhirStore,
    contact_uuid: &str,
) -> Result<Option<String>, StoreError> {
    // The four searches at once; the first type in PERSON_TYPES order wins.
    let searches = PERSON_TYPES.iter().map(|resource_type| {
        store.search(SearchRequest {
            resource_type: (*resource_type).to_string(),
            params: vec![
                (
                    "identifier".into(),
                    format!(
                        "{CONTACT_UUID_SYSTEM}|{}",
                        escape_search_value(contact_uuid)
                    ),
                ),
                ("_count".into(), "1".into()),
                ("_total".into(), "none".into()),
            ],
            cursor: None,
            lenient: false,
        })
    });
    for page in futures::future::join_all(searches).await {
        if let Some(found) = page?.matches.first() {
            return Ok(Some(found.reference()));
        }
    }
    Ok(None)
}

/// The outbox entries of a flow start addressed to this contact (by contact
/// uuid, else by URN).
pub async fn outbox_entries_of_run(
    store: &dyn FhirStore,
    start_uuid: &str,
    contact_uuid: &str,
    urn: Option<&str>,
) -> Result<Vec<crate::store::StoredResource>, StoreError> {
    let entries = search_all(
        store,
        "Communication",
        vec![
            (
                "identifier".into(),
                format!("{FLOW_START_SYSTEM}|{}", escape_search_value(start_uuid)),
            ),
            ("_count".into(), "200".into()),
        ],
    )
    .await?;
    let by_contact: Vec<_> = entries
        .iter()
        .filter(|e| outbox::address(&e.resource).0.as_deref() == Some(contact_uuid))
        .cloned()
        .collect();
    if !by_contact.is_empty() {
        return Ok(by_contact);
    }
    let urn = urn.map(|u| u.split('#').next().unwrap_or(u));
    Ok(entries
        .into_iter()
        .filter(|e| urn.is_some() && outbox::address(&e.resource).1.as_deref() == urn)
        .collect())
}

/// Writes the QuestionnaireResponse of `record` (merged with what is
/// stored, `If-Match`; equal content makes no new version).
pub async fn store_response(
    store: &dyn FhirStore,
    qr: Value,
    authoritative: bool,
) -> Result<Written, StoreError> {
    let id = qr["id"].as_str().unwrap_or_default().to_string();
    for _ in 0..8 {
        let current = match store.read("QuestionnaireResponse", &id).await {
            Ok(current) => Some(current),
            Err(StoreError::NotFound { .. }) | Err(StoreError::Gone { .. }) => None,
            Err(e) => return Err(e),
        };
        let body = merge(
            current.as_ref().map(|c| &c.resource),
            qr.clone(),
            authoritative,
        );
        // A first write is a PUT with the run's id (two first writers at
        // once: the later one wins, and carries the same run).
        let if_match = current.as_ref().map(|c| c.version_id.as_str());
        let result = store
            .update("QuestionnaireResponse", &id, body, if_match)
            .await;
        match result {
            Ok(outcome) => {
                return Ok(match outcome.kind {
                    WriteKind::Unchanged => Written::Unchanged,
                    WriteKind::Created if current.is_none() => Written::Created,
                    _ => Written::Updated,
                });
            }
            Err(StoreError::VersionConflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Conflict(format!(
        "QuestionnaireResponse/{id} kept changing while it was being updated"
    )))
}

/// Closes the outbox entries of a finished run (`completed` / `stopped`):
/// forward only (an entry already final stays as it is), `If-Match`; then
/// the request completes when its outbox is all final. Returns how many
/// entries changed.
pub async fn close_outbox(
    store: &dyn FhirStore,
    record: &RunRecord,
) -> Result<(usize, Option<String>), StoreError> {
    let (Some(start), true) = (&record.start_uuid, is_final_status(record.status)) else {
        return Ok((0, None));
    };
    let entries = outbox_entries_of_run(
        store,
        start,
        &record.contact_uuid,
        record.contact_urn.as_deref(),
    )
    .await?;
    let mut changed = 0;
    let mut requests = Vec::new();
    for entry in &entries {
        let status = record.status;
        let result = crate::store::modify_resource(store, "Communication", &entry.id, |current| {
            let now = current["status"].as_str().unwrap_or("");
            (!outbox::is_final(now)).then(|| {
                let mut updated = current.clone();
                updated["status"] = json!(status);
                if let Some(meta) = updated.get_mut("meta").and_then(Value::as_object_mut) {
                    meta.remove("versionId");
                    meta.remove("lastUpdated");
                }
                updated
            })
        })
        .await?;
        if result.is_some() {
            changed += 1;
        }
        if let Some(request) = entry.resource["basedOn"][0]["reference"]
            .as_str()
            .and_then(|r| r.strip_prefix("CommunicationRequest/"))
            && !requests.iter().any(|r: &String| r == request)
        {
            requests.push(request.to_string());
        }
    }
    let subject = entries
        .first()
        .and_then(|e| outbox::recipient_key(&e.resource))
        .filter(|r| !r.starts_with('#'));
    for request in requests {
        crate::jobs::dispatch::complete_if_final(store, &request).await?;
    }
    Ok((changed, subject))
}

/// The item types of a stored Questionnaire (for answers recorded from a
/// webhook, which carries no definition).
pub fn specs_from_questionnaire(questionnaire: &Value) -> Vec<ResultSpec> {
    questionnaire["item"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| {
            Some(ResultSpec {
                key: item["linkId"].as_str()?.to_string(),
                name: item["text"].as_str().unwrap_or_default().to_string(),
                item_type: match item["type"].as_str() {
                    Some("decimal") => ItemType::Decimal,
                    Some("date") => ItemType::Date,
                    _ => ItemType::String,
                },
                categories: Vec::new(),
            })
        })
        .collect()
}

/// What recording one run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub response: Written,
    /// The QuestionnaireResponse's id.
    pub response_id: String,
    /// The person the run is about (`Practitioner/<id>`, …), if known.
    pub subject: Option<String>,
    /// Outbox entries that became `completed` / `stopped`.
    pub outbox_closed: usize,
    /// No FHIR person was found for the contact.
    pub unknown_person: bool,
}

/// Records a run (with its uuid) as its QuestionnaireResponse, then closes
/// its outbox entries when it has finished. `authoritative`: a full run
/// from `runs.json` (not a webhook's partial view).
pub async fn record_run(
    store: &dyn FhirStore,
    record: &RunRecord,
    specs: &[ResultSpec],
    authoritative: bool,
) -> Result<Option<Recorded>, StoreError> {
    let mut subject = person_of_contact(store, &record.contact_uuid).await?;
    if subject.is_none()
        && let Some(start) = &record.start_uuid
    {
        subject = outbox_entries_of_run(
            store,
            start,
            &record.contact_uuid,
            record.contact_urn.as_deref(),
        )
        .await?
        .first()
        .and_then(|e| outbox::recipient_key(&e.resource))
        .filter(|r| !r.starts_with('#'));
    }
    let Some(qr) = questionnaire_response(record, subject.as_deref(), specs) else {
        return Ok(None);
    };
    let response_id = qr["id"].as_str().unwrap_or_default().to_string();
    let response = store_response(store, qr, authoritative).await?;
    let (outbox_closed, _) = close_outbox(store, record).await?;
    Ok(Some(Recorded {
        response,
        response_id,
        outbox_closed,
        unknown_person: subject.is_none(),
        subject,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow_def() -> Value {
        let text = include_str!("../../tests/fixtures/flows/stock_survey_v13.json");
        serde_json::from_str::<Value>(text).unwrap()["flows"][0].clone()
    }

    #[test]
    fn a_definition_gives_typed_items() {
        let specs = specs_from_definition(&flow_def());
        let stock = specs.iter().find(|s| s.key == "stock").unwrap();
        assert_eq!(stock.item_type, ItemType::Decimal);
        assert_eq!(stock.categories, vec!["Valid", "Other"]);
        let expired = specs.iter().find(|s| s.key == "expired").unwrap();
        assert_eq!(expired.item_type, ItemType::String);
        assert!(specs.iter().any(|s| s.key == "upload"), "{specs:?}");
        let q = questionnaire(
            "5b0e3a8c-2f5e-4c55-9a43-7f2d8f0b6a11",
            "Stock survey",
            &specs,
        );
        assert_eq!(q["status"], "active");
        assert_eq!(q["name"], "StockSurvey");
        for item in q["item"].as_array().unwrap() {
            assert!(item["linkId"].is_string() && item["type"].is_string());
        }
    }

    #[test]
    fn answers_are_typed_and_keep_the_category() {
        let v = |value: &str, category: Option<&str>| ResultValue {
            name: None,
            value: value.into(),
            category: category.map(str::to_string),
        };
        assert_eq!(
            answer(&v("12", Some("Valid")), ItemType::Decimal),
            json!({"valueDecimal": 12, "extension": [{"url": CATEGORY_EXTENSION, "valueString": "Valid"}]})
        );
        assert_eq!(
            answer(&v("twelve", None), ItemType::Decimal),
            json!({"valueString": "twelve"})
        );
        assert_eq!(
            answer(&v("1e400", None), ItemType::Decimal),
            json!({"valueString": "1e400"})
        );
        assert_eq!(
            answer(&v("2026-11-22T10:00:00+02:00", None), ItemType::Date),
            json!({"valueDate": "2026-11-22"})
        );
        assert_eq!(guess_type(&v("+12344563452x", None)), ItemType::String);
        // A phone number or a code with a leading zero is not a quantity.
        assert_eq!(guess_type(&v("+12344563452", None)), ItemType::String);
        assert_eq!(
            answer(&v("0770123456", None), ItemType::Decimal),
            json!({"valueString": "0770123456"})
        );
        assert_eq!(
            answer(&v("0.5", None), ItemType::Decimal),
            json!({"valueDecimal": 0.5})
        );
    }

    #[test]
    fn webhook_bodies_parse_or_say_what_is_wrong() {
        let now = Utc::now();
        let body = json!({"contact": {"uuid": "c1", "name": "", "urn": null},
            "flow": {"uuid": "f1", "name": "F"},
            "results": {"color": {"value": "red", "category": "Red"}}});
        let record = RunRecord::from_webhook(&body, now).unwrap();
        assert_eq!(record.run_uuid, None);
        assert_eq!(record.values["color"].category.as_deref(), Some("Red"));
        let err = RunRecord::from_webhook(&json!({"flow": {"uuid": "f"}}), now).unwrap_err();
        assert_eq!(err, "contact is missing");
        let err = RunRecord::from_webhook(&json!([1]), now).unwrap_err();
        assert!(err.contains("not a JSON object"));
    }

    #[test]
    fn a_final_response_is_not_reopened_by_a_late_webhook() {
        let stored = json!({"status": "completed", "authored": "2026-11-22T10:00:00.000Z",
            "subject": {"reference": "Practitioner/1"},
            "item": [{"linkId": "a", "answer": [{"valueString": "x"}]}]});
        let late = json!({"status": "in-progress", "authored": "2026-11-22T09:00:00.000Z",
            "item": [{"linkId": "b", "answer": [{"valueString": "y"}]}]});
        let merged = merge(Some(&stored), late, false);
        assert_eq!(merged["status"], "completed");
        assert_eq!(merged["authored"], "2026-11-22T10:00:00.000Z");
        assert_eq!(merged["item"].as_array().unwrap().len(), 2);
        assert_eq!(merged["subject"]["reference"], "Practitioner/1");
    }
}
