//! The outbox: one `Communication` per (request, delivery, recipient), with
//! a deterministic id, that *is* the record of what was planned, sent, and
//! what became of it (architecture.md, "The messaging state model").
//! This module owns its shape: ids, the batch identifier written before a
//! RapidPro call, the RapidPro broadcast / flow start identifier written
//! after it, the address used (contact UUID or URN), and `not-done` reasons.
//! It also owns the dispatch-state extension kept on the request.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use super::recipients::{Reach, Recipient};
use super::request::{Delivery, MessageText};

/// Identifier system of the batch a Communication was sent in.
pub const BATCH_SYSTEM: &str = "http://mhero.org/fhir/identifier/dispatch-batch";
/// Identifier systems of what RapidPro made of a batch.
pub const BROADCAST_SYSTEM: &str = "http://app.rapidpro.io/broadcast-uuid";
pub const FLOW_START_SYSTEM: &str = "http://app.rapidpro.io/flow-start-uuid";
/// A broadcast's numeric id, which its messages carry (`messages.broadcast`).
pub const BROADCAST_ID_SYSTEM: &str = "http://app.rapidpro.io/broadcast-id";
/// How the recipient was addressed in RapidPro (sub-extensions `contact`
/// and/or `urn`, and `group` when the batch named RapidPro groups) and
/// which delivery of the request this is (`delivery`).
pub const ADDRESS_EXTENSION: &str =
    "http://mhero.org/fhir/StructureDefinition/mhero-rapidpro-address";
pub const DELIVERY_EXTENSION: &str = "http://mhero.org/fhir/StructureDefinition/mhero-delivery";
/// The dispatch state kept on a CommunicationRequest.
pub const DISPATCH_EXTENSION: &str = "http://mhero.org/fhir/StructureDefinition/mhero-dispatch";
/// The key under which a flow start carries its batch id in `params`.
pub const BATCH_PARAM: &str = "mhero_batch";

/// Namespace of the per-recipient Communication ids (UUID v5).
const OUTBOX_NAMESPACE: Uuid = Uuid::from_u128(0x6d68_6572_6f2d_4f75_7462_6f78_0000_0001);

/// The id of the Communication for one (request, delivery, recipient).
pub fn communication_id(request_id: &str, delivery_key: &str, recipient_key: &str) -> String {
    Uuid::new_v5(
        &OUTBOX_NAMESPACE,
        format!("{request_id}|{delivery_key}|{recipient_key}").as_bytes(),
    )
    .to_string()
}

/// What the outbox entry records about the final outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Planned {
    /// Written before the RapidPro call of batch `batch`; `groups` are the
    /// RapidPro groups the call names instead of contacts, if any.
    Preparation { batch: String, groups: Vec<String> },
    /// Not sent, and why.
    NotDone(String),
}

/// How a recipient is addressed in RapidPro.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    Contact(String),
    Urn(String),
}

impl Address {
    pub fn of(recipient: &Recipient) -> Option<Address> {
        match &recipient.reach {
            Reach::Reachable {
                contact_uuid: Some(uuid),
                ..
            } => Some(Address::Contact(uuid.clone())),
            Reach::Reachable { urn, .. } => Some(Address::Urn(urn.clone())),
            Reach::Unreachable(_) => None,
        }
    }

    /// The URN to fall back to when a contact UUID is unknown to RapidPro.
    pub fn urn_of(recipient: &Recipient) -> Option<String> {
        match &recipient.reach {
            Reach::Reachable { urn, .. } => Some(urn.clone()),
            Reach::Unreachable(_) => None,
        }
    }
}

fn payload(delivery: &Delivery) -> Value {
    match delivery {
        Delivery::Message(MessageText::Plain(text)) => json!([{ "contentString": text }]),
        Delivery::Message(text @ MessageText::Translated { .. }) => {
            json!([{ "contentString": text.base() }])
        }
        Delivery::Flow { uuid, .. } => {
            json!([{ "contentReference": { "reference": format!("Basic/{uuid}") } }])
        }
    }
}

/// The outbox entry for `recipient` of `delivery`.
pub fn communication(
    request: &Value,
    request_id: &str,
    delivery: &Delivery,
    recipient: &Recipient,
    planned: &Planned,
) -> Value {
    let id = communication_id(request_id, &delivery.key(), &recipient.key);
    let mut recipient_ref = json!({ "reference": recipient.key });
    if let Some(display) = &recipient.display {
        recipient_ref["display"] = json!(display);
    }
    let mut communication = json!({
        "resourceType": "Communication",
        "id": id,
        "basedOn": [{ "reference": format!("CommunicationRequest/{request_id}") }],
        "recipient": [recipient_ref],
        "payload": payload(delivery),
        "extension": [{ "url": DELIVERY_EXTENSION, "valueString": delivery.key() }],
    });
    if let Some(contained) = &recipient.contained {
        communication["contained"] = json!([contained]);
    }
    for element in ["category", "priority", "sender", "groupIdentifier"] {
        if let Some(value) = request.get(element) {
            match element {
                // Communication has no groupIdentifier; keep it as an identifier.
                "groupIdentifier" => {
                    communication["identifier"] = json!([value]);
                }
                _ => communication[element] = value.clone(),
            }
        }
    }
    match planned {
        Planned::Preparation { batch, groups } => {
            communication["status"] = json!("preparation");
            push_identifier(&mut communication, BATCH_SYSTEM, batch);
            let mut address: Vec<Value> = groups
                .iter()
                .map(|g| json!({ "url": "group", "valueString": g }))
                .collect();
            if let Reach::Reachable { contact_uuid, urn } = &recipient.reach {
                if let Some(uuid) = contact_uuid {
                    address.push(json!({ "url": "contact", "valueString": uuid }));
                }
                address.push(json!({ "url": "urn", "valueString": urn }));
                communication["medium"] = json!([medium(urn)]);
            }
            push_extension(
                &mut communication,
                json!({ "url": ADDRESS_EXTENSION, "extension": address }),
            );
        }
        Planned::NotDone(reason) => {
            communication["status"] = json!("not-done");
            communication["statusReason"] = json!({ "text": reason });
        }
    }
    communication
}

/// `ParticipationMode` of the URN scheme.
pub fn medium(urn: &str) -> Value {
    let (code, display) = match urn.split(':').next().unwrap_or("") {
        "tel" => ("SMSWRIT", "SMS message"),
        "mailto" => ("EMAILWRIT", "email"),
        _ => ("ELECTRONIC", "electronic data"),
    };
    json!({ "coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode",
        "code": code,
        "display": display,
    }] })
}

fn push_identifier(resource: &mut Value, system: &str, value: &str) {
    let entry = json!({ "system": system, "value": value });
    match resource.get_mut("identifier").and_then(Value::as_array_mut) {
        Some(list) => {
            list.retain(|i| i.get("system").and_then(Value::as_str) != Some(system));
            list.push(entry);
        }
        None => resource["identifier"] = json!([entry]),
    }
}

fn push_extension(resource: &mut Value, extension: Value) {
    match resource.get_mut("extension").and_then(Value::as_array_mut) {
        Some(list) => list.push(extension),
        None => resource["extension"] = json!([extension]),
    }
}

/// The identifier value of `system`.
pub fn identifier(resource: &Value, system: &str) -> Option<String> {
    resource
        .get("identifier")?
        .as_array()?
        .iter()
        .find(|i| i.get("system").and_then(Value::as_str) == Some(system))?
        .get("value")?
        .as_str()
        .map(str::to_string)
}

/// The delivery key (`message`, `flow:<uuid>`) an outbox entry belongs to.
pub fn delivery_key(communication: &Value) -> Option<String> {
    communication
        .get("extension")?
        .as_array()?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(DELIVERY_EXTENSION))?
        .get("valueString")?
        .as_str()
        .map(str::to_string)
}

/// The recipient reference (`Practitioner/1`, `#p1`) of an outbox entry.
pub fn recipient_key(communication: &Value) -> Option<String> {
    communication
        .pointer("/recipient/0/reference")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// The RapidPro groups an outbox entry's batch was (to be) sent to.
pub fn groups(communication: &Value) -> Vec<String> {
    address_parts(communication)
        .iter()
        .filter(|s| s.get("url").and_then(Value::as_str) == Some("group"))
        .filter_map(|s| s.get("valueString").and_then(Value::as_str))
        .map(str::to_string)
        .collect()
}

fn address_parts(communication: &Value) -> Vec<Value> {
    communication
        .get("extension")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(ADDRESS_EXTENSION))
        .and_then(|e| e.get("extension"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// The contact UUID and URN an outbox entry was (to be) sent to.
pub fn address(communication: &Value) -> (Option<String>, Option<String>) {
    let subs = address_parts(communication);
    let get = |name: &str| {
        subs.iter()
            .find(|s| s.get("url").and_then(Value::as_str) == Some(name))
            .and_then(|s| s.get("valueString"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    (get("contact"), get("urn"))
}

/// The entry, accepted by RapidPro as `rapidpro_uuid` (a broadcast or a
/// flow start): `in-progress`, with the identifier (and the broadcast's id).
pub fn accepted(
    communication: Value,
    system: &str,
    rapidpro_uuid: &str,
    broadcast_id: Option<i64>,
) -> Value {
    let mut updated = communication;
    updated["status"] = json!("in-progress");
    push_identifier(&mut updated, system, rapidpro_uuid);
    if let Some(id) = broadcast_id {
        push_identifier(&mut updated, BROADCAST_ID_SYSTEM, &id.to_string());
    }
    strip_store_meta(&mut updated);
    updated
}

/// The entry, not sent: `not-done` with `reason`.
pub fn refused(communication: Value, reason: &str) -> Value {
    let mut updated = communication;
    updated["status"] = json!("not-done");
    updated["statusReason"] = json!({ "text": reason });
    strip_store_meta(&mut updated);
    updated
}

fn strip_store_meta(resource: &mut Value) {
    if let Some(meta) = resource.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            resource.as_object_mut().map(|r| r.remove("meta"));
        }
    }
}

/// Statuses after which nothing more happens to an outbox entry.
pub fn is_final(status: &str) -> bool {
    matches!(
        status,
        "completed" | "not-done" | "stopped" | "entered-in-error"
    )
}

/// Where a request's dispatch stands (the `mhero-dispatch` extension).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DispatchState {
    /// `dispatching`, `dispatched`, `refused`, `cancelled`, or empty (new).
    pub phase: String,
    pub owner: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    pub notes: Vec<String>,
}

impl DispatchState {
    pub fn read(request: &Value) -> Self {
        let Some(ext) = request
            .get("extension")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|e| e.get("url").and_then(Value::as_str) == Some(DISPATCH_EXTENSION))
        else {
            return DispatchState::default();
        };
        let subs: Vec<&Value> = ext
            .get("extension")
            .and_then(Value::as_array)
            .map(|s| s.iter().collect())
            .unwrap_or_default();
        let value = |name: &str, key: &str| {
            subs.iter()
                .find(|s| s.get("url").and_then(Value::as_str) == Some(name))
                .and_then(|s| s.get(key))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        DispatchState {
            phase: value("state", "valueCode").unwrap_or_default(),
            owner: value("owner", "valueString"),
            lease_until: value("leaseUntil", "valueInstant")
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc)),
            notes: subs
                .iter()
                .filter(|s| s.get("url").and_then(Value::as_str) == Some("note"))
                .filter_map(|s| s.get("valueString").and_then(Value::as_str))
                .map(str::to_string)
                .collect(),
        }
    }

    /// Someone else holds an unexpired claim.
    pub fn claimed_by_other(&self, me: &str, now: DateTime<Utc>) -> bool {
        self.phase == "dispatching"
            && self.owner.as_deref() != Some(me)
            && self.lease_until.is_some_and(|until| until > now)
    }

    /// `request` carrying this state (other extensions kept).
    pub fn apply(&self, request: &Value) -> Value {
        let mut updated = request.clone();
        strip_store_meta(&mut updated);
        let mut subs = vec![json!({ "url": "state", "valueCode": self.phase })];
        if let Some(owner) = &self.owner {
            subs.push(json!({ "url": "owner", "valueString": owner }));
        }
        if let Some(until) = &self.lease_until {
            subs.push(
                json!({ "url": "leaseUntil", "valueInstant": crate::fhir::format_instant(until) }),
            );
        }
        for note in &self.notes {
            subs.push(json!({ "url": "note", "valueString": note }));
        }
        let extension = json!({ "url": DISPATCH_EXTENSION, "extension": subs });
        match updated.get_mut("extension").and_then(Value::as_array_mut) {
            Some(list) => {
                list.retain(|e| e.get("url").and_then(Value::as_str) != Some(DISPATCH_EXTENSION));
                list.push(extension);
            }
            None => updated["extension"] = json!([extension]),
        }
        updated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let a = communication_id("r1", "message", "Practitioner/1");
        assert_eq!(a, communication_id("r1", "message", "Practitioner/1"));
        assert_ne!(a, communication_id("r1", "flow:x", "Practitioner/1"));
        assert_ne!(a, communication_id("r2", "message", "Practitioner/1"));
        assert!(crate::fhir::resource_types::is_valid_id(&a));
    }

    #[test]
    fn dispatch_state_round_trips() {
        let now = Utc::now();
        let state = DispatchState {
            phase: "dispatching".into(),
            owner: Some("a".into()),
            lease_until: Some(now + chrono::Duration::seconds(60)),
            notes: vec!["Group/x was not found".into()],
        };
        let request = state.apply(
            &json!({"resourceType": "CommunicationRequest", "extension": [{"url": "other"}]}),
        );
        assert_eq!(request["extension"].as_array().unwrap().len(), 2);
        let back = DispatchState::read(&request);
        assert_eq!(back.phase, "dispatching");
        assert_eq!(back.notes, state.notes);
        assert!(back.claimed_by_other("b", now));
        assert!(!back.claimed_by_other("a", now));
        assert!(!back.claimed_by_other("b", now + chrono::Duration::seconds(61)));
    }
}
