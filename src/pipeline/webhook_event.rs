//! RapidPro webhook events kept as FHIR (docs/flow-results.md): every body
//! POSTed to `/rapidpro/webhook` becomes a `Basic` (code
//! `http://mhero.org/fhir/CodeSystem/mhero-resource#rapidpro-webhook-event`)
//! *before* it is answered, with a deterministic id (the run uuid, or the
//! contact and flow, + the last path node + a hash of the results; a body
//! that cannot be understood: a hash of the raw bytes), so the same event
//! twice is one resource. The raw body, the received instant and a
//! processing state (`received`, `processed`, `deferred`, `rejected` and
//! its reason) are sub-extensions of `mhero-webhook-event`; the state is
//! also a `meta.tag` so the run poll can find events left `received`.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use super::flow_results::{self, RunRecord};
use crate::store::{FhirStore, StoreError, StoredResource};

pub const EVENT_CODE_SYSTEM: &str = "http://mhero.org/fhir/CodeSystem/mhero-resource";
pub const EVENT_CODE: &str = "rapidpro-webhook-event";
pub const EVENT_EXTENSION: &str = "http://mhero.org/fhir/StructureDefinition/mhero-webhook-event";
pub const EVENT_IDENTIFIER_SYSTEM: &str = "http://mhero.org/fhir/identifier/rapidpro-webhook-event";
/// `meta.tag` system of the processing state.
pub const STATE_TAG_SYSTEM: &str = "http://mhero.org/fhir/CodeSystem/mhero-webhook-state";

const EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x6d68_6572_6f2d_5768_6f6f_6b00_0000_0001);

/// Where an event stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Stored, not yet recorded as a QuestionnaireResponse.
    Received,
    /// Recorded.
    Processed,
    /// Understood but without a run uuid (the editor's default body): the
    /// run poll records the run.
    Deferred,
    /// Not understood (kept for inspection, with the reason).
    Rejected,
}

impl State {
    pub fn code(self) -> &'static str {
        match self {
            State::Received => "received",
            State::Processed => "processed",
            State::Deferred => "deferred",
            State::Rejected => "rejected",
        }
    }

    fn parse(code: &str) -> Option<State> {
        [
            State::Received,
            State::Processed,
            State::Deferred,
            State::Rejected,
        ]
        .into_iter()
        .find(|s| s.code() == code)
    }
}

/// JSON with object keys sorted (so equal results hash equally whatever
/// order RapidPro wrote them in).
fn canonical(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical(&map[k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

/// The event key of an understood body.
pub fn event_key(body: &Value, record: &RunRecord) -> String {
    let who = match &record.run_uuid {
        Some(run) => format!("run:{run}"),
        None => format!("contact:{}|flow:{}", record.contact_uuid, record.flow_uuid),
    };
    let last_node = body["path"]
        .as_array()
        .and_then(|p| p.last())
        .and_then(|n| n["node_uuid"].as_str())
        .unwrap_or("");
    let results = Uuid::new_v5(&EVENT_NAMESPACE, canonical(&body["results"]).as_bytes());
    format!("{who}|{last_node}|{results}")
}

/// The key of a body that could not be understood: its bytes.
pub fn raw_key(raw: &[u8]) -> String {
    format!("raw:{}", Uuid::new_v5(&EVENT_NAMESPACE, raw))
}

pub fn event_id(key: &str) -> String {
    Uuid::new_v5(&EVENT_NAMESPACE, key.as_bytes()).to_string()
}

/// The Basic of an event.
pub fn event_resource(
    key: &str,
    raw: &str,
    received: DateTime<Utc>,
    state: State,
    reason: Option<&str>,
) -> Value {
    let mut subs = vec![
        json!({ "url": "body", "valueString": raw }),
        json!({ "url": "receivedAt", "valueInstant": crate::fhir::format_instant(&received) }),
        json!({ "url": "state", "valueCode": state.code() }),
    ];
    if let Some(reason) = reason {
        subs.push(json!({ "url": "reason", "valueString": reason }));
    }
    json!({
        "resourceType": "Basic",
        "id": event_id(key),
        "meta": { "tag": [{ "system": STATE_TAG_SYSTEM, "code": state.code() }] },
        "identifier": [{ "system": EVENT_IDENTIFIER_SYSTEM, "value": key }],
        "code": { "coding": [{ "system": EVENT_CODE_SYSTEM, "code": EVENT_CODE, "display": "RapidPro webhook event" }] },
        "created": received.format("%Y-%m-%d").to_string(),
        "extension": [{ "url": EVENT_EXTENSION, "extension": subs }],
    })
}

fn sub<'a>(event: &'a Value, name: &str) -> Option<&'a Value> {
    event["extension"]
        .as_array()?
        .iter()
        .find(|e| e["url"] == EVENT_EXTENSION)?["extension"]
        .as_array()?
        .iter()
        .find(|s| s["url"] == name)
}

/// The state of a stored event.
pub fn state_of(event: &Value) -> Option<State> {
    sub(event, "state")?["valueCode"]
        .as_str()
        .and_then(State::parse)
}

/// `event` with its state (and reason) changed.
pub fn with_state(event: &Value, state: State, reason: Option<&str>) -> Value {
    let raw = sub(event, "body")
        .and_then(|b| b["valueString"].as_str())
        .unwrap_or_default();
    let received = sub(event, "receivedAt")
        .and_then(|b| b["valueInstant"].as_str())
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map_or_else(Utc::now, |t| t.with_timezone(&Utc));
    let key = event["identifier"][0]["value"].as_str().unwrap_or_default();
    let mut updated = event_resource(key, raw, received, state, reason);
    updated["id"] = event["id"].clone();
    updated
}

/// Records a stored event's run (events with a run uuid) and moves it to
/// `processed`; returns the new state. An event without a run uuid becomes
/// `deferred`.
pub async fn process(store: &dyn FhirStore, event: &StoredResource) -> Result<State, StoreError> {
    let raw = sub(&event.resource, "body")
        .and_then(|b| b["valueString"].as_str())
        .unwrap_or_default();
    let received = sub(&event.resource, "receivedAt")
        .and_then(|b| b["valueInstant"].as_str())
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map_or_else(Utc::now, |t| t.with_timezone(&Utc));
    let parsed = serde_json::from_str::<Value>(raw)
        .map_err(|e| e.to_string())
        .and_then(|body| RunRecord::from_webhook(&body, received));
    let state = match parsed {
        Err(_) => State::Rejected,
        Ok(record) if record.run_uuid.is_none() => State::Deferred,
        Ok(record) => {
            let specs = match store
                .read("Questionnaire", &flow_results::id_for(&record.flow_uuid))
                .await
            {
                Ok(q) => flow_results::specs_from_questionnaire(&q.resource),
                Err(StoreError::NotFound { .. }) | Err(StoreError::Gone { .. }) => Vec::new(),
                Err(e) => return Err(e),
            };
            flow_results::record_run(store, &record, &specs, false).await?;
            State::Processed
        }
    };
    if state_of(&event.resource) != Some(state) {
        let updated = with_state(&event.resource, state, None);
        store
            .update("Basic", &event.id, updated, Some(&event.version_id))
            .await?;
    }
    Ok(state)
}

/// A new event with a run uuid: the event (`processed`) and the run's
/// QuestionnaireResponse (merged with what is stored, `If-Match`) in one
/// transaction, so the intake costs one write. If that fails (a concurrent
/// update, a store error), the event alone is written `received` for the
/// run poll to record. Either way the event is stored when this returns
/// `Ok`; the state says which.
pub async fn store_and_record(
    store: &dyn FhirStore,
    writer: Option<&BatchWriter>,
    key: &str,
    raw: &str,
    received: DateTime<Utc>,
    record: &RunRecord,
) -> Result<State, StoreError> {
    let written = match record_entries(store, key, raw, received, record).await {
        Ok(entries) => match writer {
            Some(writer) => writer.write(entries).await,
            None => write_transaction(store, entries).await,
        },
        Err(e) => Err(e),
    };
    match written {
        Ok(()) => Ok(State::Processed),
        Err(e) => {
            tracing::warn!(
                "webhook event left to the run poll: {}",
                crate::telemetry::redact_phones(&e.to_string())
            );
            let event = event_resource(key, raw, received, State::Received, None);
            store.update("Basic", &event_id(key), event, None).await?;
            Ok(State::Received)
        }
    }
}

/// The transaction entries of a new event and its QuestionnaireResponse.
async fn record_entries(
    store: &dyn FhirStore,
    key: &str,
    raw: &str,
    received: DateTime<Utc>,
    record: &RunRecord,
) -> Result<Vec<Value>, StoreError> {
    let Some(run_uuid) = record.run_uuid.as_deref() else {
        return Err(StoreError::Invalid("the event names no run".into()));
    };
    let id = flow_results::id_for(run_uuid);
    let questionnaire_id = flow_results::id_for(&record.flow_uuid);
    // Independent reads, at once.
    let (questionnaire, subject, current) = tokio::join!(
        store.read("Questionnaire", &questionnaire_id),
        flow_results::person_of_contact(store, &record.contact_uuid),
        store.read("QuestionnaireResponse", &id),
    );
    let absent =
        |e: &StoreError| matches!(e, StoreError::NotFound { .. } | StoreError::Gone { .. });
    let specs = match questionnaire {
        Ok(q) => flow_results::specs_from_questionnaire(&q.resource),
        Err(e) if absent(&e) => Vec::new(),
        Err(e) => return Err(e),
    };
    let current = match current {
        Ok(current) => Some(current),
        Err(e) if absent(&e) => None,
        Err(e) => return Err(e),
    };
    let Some(qr) = flow_results::questionnaire_response(record, subject?.as_deref(), &specs) else {
        return Err(StoreError::Invalid("the event names no run".into()));
    };
    let merged = flow_results::merge(current.as_ref().map(|c| &c.resource), qr, false);
    let mut qr_request = json!({ "method": "PUT", "url": format!("QuestionnaireResponse/{id}") });
    if let Some(current) = &current {
        qr_request["ifMatch"] = json!(format!("W/\"{}\"", current.version_id));
    }
    let event = event_resource(key, raw, received, State::Processed, None);
    Ok(vec![
        json!({ "resource": merged, "request": qr_request }),
        json!({ "resource": event, "request": { "method": "PUT", "url": format!("Basic/{}", event_id(key)) } }),
    ])
}

async fn write_transaction(store: &dyn FhirStore, entries: Vec<Value>) -> Result<(), StoreError> {
    store
        .process_bundle(
            json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries }),
        )
        .await
        .map(|_| ())
}

type Pending = (
    Vec<Value>,
    tokio::sync::oneshot::Sender<Result<(), StoreError>>,
);

/// Group commit for the webhook: the transactions of concurrent requests
/// that queue while one is being written are written together, as one
/// transaction (the embedded store has one writer, so one commit for many
/// events is what lets the intake keep up). If a combined transaction
/// fails (an `If-Match` conflict of one event, two events of one run), each
/// is written alone, so one event's failure is its own.
#[derive(Clone)]
pub struct BatchWriter {
    queue: tokio::sync::mpsc::Sender<Pending>,
}

/// Events written together at most.
const GROUP_COMMIT_MAX: usize = 64;

impl BatchWriter {
    /// Starts the writer task (it ends when every handle is dropped).
    pub fn spawn(store: crate::store::SharedStore) -> BatchWriter {
        let (queue, mut pending) = tokio::sync::mpsc::channel::<Pending>(4 * GROUP_COMMIT_MAX);
        tokio::spawn(async move {
            while let Some(first) = pending.recv().await {
                let mut batch = vec![first];
                while batch.len() < GROUP_COMMIT_MAX {
                    match pending.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let mut urls = std::collections::HashSet::new();
                let distinct = batch.iter().flat_map(|(entries, _)| entries).all(|e| {
                    urls.insert(e["request"]["url"].as_str().unwrap_or_default().to_string())
                });
                if batch.len() > 1 && distinct {
                    let all: Vec<Value> = batch
                        .iter()
                        .flat_map(|(entries, _)| entries.iter().cloned())
                        .collect();
                    if write_transaction(store.as_ref(), all).await.is_ok() {
                        for (_, done) in batch {
                            let _ = done.send(Ok(()));
                        }
                        continue;
                    }
                }
                for (entries, done) in batch {
                    let _ = done.send(write_transaction(store.as_ref(), entries).await);
                }
            }
        });
        BatchWriter { queue }
    }

    /// Writes `entries` as (part of) a transaction.
    pub async fn write(&self, entries: Vec<Value>) -> Result<(), StoreError> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        let gone = || StoreError::Internal("the webhook writer stopped".into());
        self.queue.send((entries, done)).await.map_err(|_| gone())?;
        outcome.await.map_err(|_| gone())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_event_has_the_same_key_whatever_the_key_order() {
        let now = Utc::now();
        let a: Value = serde_json::from_str(
            r#"{"contact":{"uuid":"c"},"flow":{"uuid":"f"},"run":{"uuid":"r"},"results":{"a":{"value":"1","category":"x"},"b":{"value":"2"}}}"#,
        )
        .unwrap();
        let b: Value = serde_json::from_str(
            r#"{"results":{"b":{"value":"2"},"a":{"category":"x","value":"1"}},"run":{"uuid":"r"},"flow":{"uuid":"f"},"contact":{"uuid":"c"}}"#,
        )
        .unwrap();
        let ka = event_key(&a, &RunRecord::from_webhook(&a, now).unwrap());
        let kb = event_key(&b, &RunRecord::from_webhook(&b, now).unwrap());
        assert_eq!(ka, kb);
        let mut c = a.clone();
        c["results"]["a"]["value"] = json!("3");
        assert_ne!(
            ka,
            event_key(&c, &RunRecord::from_webhook(&c, now).unwrap())
        );
    }

    #[test]
    fn state_round_trips() {
        let event = event_resource("k", "{}", Utc::now(), State::Received, None);
        assert_eq!(state_of(&event), Some(State::Received));
        let done = with_state(&event, State::Rejected, Some("bad"));
        assert_eq!(state_of(&done), Some(State::Rejected));
        assert_eq!(done["id"], event["id"]);
        assert_eq!(done["meta"]["tag"][0]["code"], "rejected");
    }
}
