//! Recipient resolution: from what a CommunicationRequest names to the
//! people it reaches, each with the URN (or RapidPro contact) to use or a
//! reason a person can read for not messaging them.
//!
//! Named people (literal or contained) are taken as they are. `Group`s are
//! expanded to their members (nested groups too), and, the mCSD way,
//! `PractitionerRole`s to their practitioner, `Location`s to the active roles
//! at that place or anywhere below it (`partOf`), `Organization`s (and their
//! sub-organisations) and `HealthcareService`s to their active roles; roles
//! are narrowed by the request's job/cadre filter. Everything is read in
//! bulk (`_id` lists and comma-separated searches, paged), never one request
//! per person. People are de-duplicated by reference, then by normalised URN.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::contact::{PERSON_TYPES, draft};
use super::phone::PhoneNormalizer;
use super::request::{JobCode, MessageRequest, RecipientRef};
use crate::store::{FhirStore, SearchRequest, StoreResult, StoredResource, escape_search_value};
use crate::telemetry::mask_phone;

/// How many ids go into one `_id=` or reference OR-list search.
const CHUNK: usize = 100;

/// Whether and how one person can be messaged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// Send to the RapidPro contact if known, else to the URN.
    Reachable {
        contact_uuid: Option<String>,
        urn: String,
    },
    /// Not messaged, and why (becomes a `not-done` Communication).
    Unreachable(String),
}

/// One intended person.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipient {
    /// `Practitioner/123`, or `#p1` for a person contained in the request.
    pub key: String,
    pub display: Option<String>,
    /// The contained resource itself (copied into the Communication).
    pub contained: Option<Value>,
    pub reach: Reach,
}

impl Recipient {
    pub fn is_reachable(&self) -> bool {
        matches!(self.reach, Reach::Reachable { .. })
    }
}

/// The people of a request, in a stable order, and the names that led to
/// nobody (a Group or Location that does not exist, ...).
#[derive(Debug, Clone, Default)]
pub struct Resolution {
    pub recipients: Vec<Recipient>,
    pub warnings: Vec<String>,
}

impl Resolution {
    pub fn reachable(&self) -> usize {
        self.recipients.iter().filter(|r| r.is_reachable()).count()
    }
}

/// An ordered set of `(type, id)`.
#[derive(Default)]
struct OrderedRefs {
    list: Vec<(String, String)>,
    seen: HashSet<(String, String)>,
}

impl OrderedRefs {
    fn push(&mut self, resource_type: &str, id: &str) -> bool {
        let key = (resource_type.to_string(), id.to_string());
        if self.seen.insert(key.clone()) {
            self.list.push(key);
            true
        } else {
            false
        }
    }
}

fn split_reference(reference: &str) -> Option<(&str, &str)> {
    let mut parts = reference.trim_end_matches('/').rsplit('/');
    let id = parts.next()?;
    let resource_type = parts.next()?;
    (!id.is_empty() && !resource_type.is_empty()).then_some((resource_type, id))
}

fn or_list<'a>(ids: impl IntoIterator<Item = &'a String>) -> String {
    ids.into_iter()
        .map(|id| escape_search_value(id))
        .collect::<Vec<_>>()
        .join(",")
}

/// Calls `each` for every match of a search, page by page (nothing is
/// accumulated; no total is counted).
async fn each_match<F>(
    store: &dyn FhirStore,
    resource_type: &str,
    mut params: Vec<(String, String)>,
    mut each: F,
) -> StoreResult<()>
where
    F: FnMut(StoredResource),
{
    params.push(("_total".to_string(), "none".to_string()));
    let mut cursor = None;
    loop {
        let page = store
            .search(SearchRequest {
                resource_type: resource_type.to_string(),
                params: params.clone(),
                cursor,
                lenient: false,
            })
            .await?;
        page.matches.into_iter().for_each(&mut each);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(()),
        }
    }
}

/// Calls `each` for the resources of one type with these ids, in chunks.
async fn each_by_id<F>(
    store: &dyn FhirStore,
    resource_type: &str,
    ids: &[String],
    mut each: F,
) -> StoreResult<()>
where
    F: FnMut(StoredResource),
{
    for chunk in ids.chunks(CHUNK) {
        let params = vec![
            ("_id".to_string(), or_list(chunk)),
            ("_count".to_string(), CHUNK.to_string()),
        ];
        each_match(store, resource_type, params, &mut each).await?;
    }
    Ok(())
}

/// Reads resources of one type by id; returns id -> resource (for the few
/// Groups, places and services a request names).
async fn read_by_id(
    store: &dyn FhirStore,
    resource_type: &str,
    ids: &[String],
) -> StoreResult<HashMap<String, Value>> {
    let mut found = HashMap::new();
    each_by_id(store, resource_type, ids, |stored| {
        found.insert(stored.id, stored.resource);
    })
    .await?;
    Ok(found)
}

/// Calls `each` for every match of `resource_type?param=<ids OR-list>`.
async fn each_by_reference<F>(
    store: &dyn FhirStore,
    resource_type: &str,
    param: &str,
    ids: &[String],
    mut each: F,
) -> StoreResult<()>
where
    F: FnMut(StoredResource),
{
    for chunk in ids.chunks(CHUNK) {
        let params = vec![
            (param.to_string(), or_list(chunk)),
            ("_count".to_string(), "1000".to_string()),
        ];
        each_match(store, resource_type, params, &mut each).await?;
    }
    Ok(())
}

/// `ids` and everything below them through `partOf` (Location and
/// Organization alike); unknown roots are reported.
async fn with_descendants(
    store: &dyn FhirStore,
    resource_type: &str,
    roots: &[String],
    warnings: &mut Vec<String>,
) -> StoreResult<Vec<String>> {
    let existing = read_by_id(store, resource_type, roots).await?;
    let mut all: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for id in roots {
        if existing.contains_key(id) {
            if seen.insert(id.clone()) {
                all.push(id.clone());
            }
        } else {
            warnings.push(format!("{resource_type}/{id} was not found"));
        }
    }
    let mut frontier = all.clone();
    while !frontier.is_empty() {
        let mut children = Vec::new();
        each_by_reference(store, resource_type, "partof", &frontier, |child| {
            if seen.insert(child.id.clone()) {
                children.push(child.id);
            }
        })
        .await?;
        all.extend(children.iter().cloned());
        frontier = children;
    }
    Ok(all)
}

fn role_matches(role: &Value, filter: &[JobCode]) -> bool {
    if role.get("active").and_then(Value::as_bool) == Some(false) {
        return false;
    }
    if let Some(end) = role
        .pointer("/period/end")
        .and_then(Value::as_str)
        .and_then(super::request::parse_date_time)
        && end < chrono::Utc::now()
    {
        return false;
    }
    filter.is_empty()
        || role
            .get("code")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .flat_map(|c| {
                c.get("coding")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
            })
            .filter_map(|coding| coding.get("code").and_then(Value::as_str))
            .any(|code| filter.iter().any(|f| f.code == code))
}

/// Expands what `request` names into people and decides, for each, how to
/// reach them.
pub async fn resolve(
    store: &dyn FhirStore,
    request: &Value,
    parsed: &MessageRequest,
    phones: &PhoneNormalizer,
) -> StoreResult<Resolution> {
    let mut warnings = Vec::new();
    let mut people = OrderedRefs::default();
    let mut by_type: HashMap<&str, Vec<String>> = HashMap::new();
    let mut contained_keys: Vec<String> = Vec::new();
    for recipient in &parsed.recipients {
        match recipient {
            RecipientRef::Contained(id) => contained_keys.push(id.clone()),
            RecipientRef::Literal { resource_type, id } => {
                if PERSON_TYPES.contains(&resource_type.as_str()) {
                    people.push(resource_type, id);
                } else {
                    let list = by_type
                        .entry(
                            super::request::RECIPIENT_TYPES
                                .iter()
                                .find(|t| **t == resource_type)
                                .copied()
                                .unwrap_or("Group"),
                        )
                        .or_default();
                    list.push(id.clone());
                }
            }
        }
    }

    // Groups, breadth first; members may be anything a request may name.
    let mut group_queue = by_type.remove("Group").unwrap_or_default();
    let mut groups_seen: HashSet<String> = group_queue.iter().cloned().collect();
    while !group_queue.is_empty() {
        let found = read_by_id(store, "Group", &group_queue).await?;
        let mut next = Vec::new();
        for id in &group_queue {
            let Some(group) = found.get(id) else {
                warnings.push(format!("Group/{id} was not found"));
                continue;
            };
            if group.get("active").and_then(Value::as_bool) == Some(false) {
                warnings.push(format!(
                    "Group/{id} is inactive; its members were not messaged"
                ));
                continue;
            }
            for member in group
                .get("member")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if member.get("inactive").and_then(Value::as_bool) == Some(true) {
                    continue;
                }
                let Some((t, mid)) = member
                    .pointer("/entity/reference")
                    .and_then(Value::as_str)
                    .and_then(split_reference)
                else {
                    continue;
                };
                if PERSON_TYPES.contains(&t) {
                    people.push(t, mid);
                } else if t == "Group" {
                    if groups_seen.insert(mid.to_string()) {
                        next.push(mid.to_string());
                    }
                } else if let Some(known) =
                    super::request::RECIPIENT_TYPES.iter().find(|k| **k == t)
                {
                    by_type.entry(known).or_default().push(mid.to_string());
                }
            }
        }
        group_queue = next;
    }

    // Roles: named directly, at places (and below), of organisations (and
    // below), offering services; each active one matching the job filter
    // brings its practitioner. Streamed page by page.
    let job_filter = &parsed.job_filter;
    let mut take_role = |role: &Value| {
        if role_matches(role, job_filter)
            && let Some((t, id)) = role
                .pointer("/practitioner/reference")
                .and_then(Value::as_str)
                .and_then(split_reference)
            && t == "Practitioner"
        {
            people.push(t, id);
        }
    };
    if let Some(ids) = by_type.remove("PractitionerRole") {
        let found = read_by_id(store, "PractitionerRole", &ids).await?;
        for id in &ids {
            match found.get(id) {
                Some(role) => take_role(role),
                None => warnings.push(format!("PractitionerRole/{id} was not found")),
            }
        }
    }
    if let Some(ids) = by_type.remove("Location") {
        let places = with_descendants(store, "Location", &ids, &mut warnings).await?;
        each_by_reference(store, "PractitionerRole", "location", &places, |r| {
            take_role(&r.resource)
        })
        .await?;
    }
    if let Some(ids) = by_type.remove("Organization") {
        let orgs = with_descendants(store, "Organization", &ids, &mut warnings).await?;
        each_by_reference(store, "PractitionerRole", "organization", &orgs, |r| {
            take_role(&r.resource)
        })
        .await?;
    }
    if let Some(ids) = by_type.remove("HealthcareService") {
        let found = read_by_id(store, "HealthcareService", &ids).await?;
        for id in ids.iter().filter(|id| !found.contains_key(*id)) {
            warnings.push(format!("HealthcareService/{id} was not found"));
        }
        let services: Vec<String> = ids
            .into_iter()
            .filter(|id| found.contains_key(id))
            .collect();
        each_by_reference(store, "PractitionerRole", "service", &services, |r| {
            take_role(&r.resource)
        })
        .await?;
    }

    // The people themselves, in bulk per type, kept only as what reaching
    // them needs.
    let mut reachable: HashMap<(String, String), Candidate> = HashMap::new();
    for person_type in PERSON_TYPES {
        let ids: Vec<String> = people
            .list
            .iter()
            .filter(|(t, _)| t == person_type)
            .map(|(_, id)| id.clone())
            .collect();
        if ids.is_empty() {
            continue;
        }
        each_by_id(store, person_type, &ids, |stored| {
            let candidate = candidate(&stored.resource, phones);
            reachable.insert((person_type.to_string(), stored.id), candidate);
        })
        .await?;
    }

    let mut urn_owner: HashMap<String, String> = HashMap::new();
    let mut recipients = Vec::with_capacity(people.list.len() + contained_keys.len());
    for (resource_type, id) in &people.list {
        let key = format!("{resource_type}/{id}");
        let recipient = match reachable.remove(&(resource_type.clone(), id.clone())) {
            None => Recipient {
                reach: Reach::Unreachable(format!("{key} was not found")),
                key,
                display: None,
                contained: None,
            },
            Some(candidate) => candidate.into_recipient(key, None, &mut urn_owner),
        };
        recipients.push(recipient);
    }
    let contained: Vec<&Value> = request
        .get("contained")
        .and_then(Value::as_array)
        .map(|c| c.iter().collect())
        .unwrap_or_default();
    for id in contained_keys {
        if let Some(resource) = contained
            .iter()
            .find(|c| c.get("id").and_then(Value::as_str) == Some(id.as_str()))
        {
            recipients.push(candidate(resource, phones).into_recipient(
                format!("#{id}"),
                Some((*resource).clone()),
                &mut urn_owner,
            ));
        }
    }
    Ok(Resolution {
        recipients,
        warnings,
    })
}

/// What reaching one person needs, before de-duplication by URN.
struct Candidate {
    display: Option<String>,
    /// `(contact uuid, first URN)`, or why not.
    reach: Result<(Option<String>, String), String>,
}

fn candidate(resource: &Value, phones: &PhoneNormalizer) -> Candidate {
    let contact = draft(resource, phones);
    let reach = if contact.opted_out {
        Err("opted out of mHero messages".to_string())
    } else if contact.inactive {
        Err("inactive (active = false)".to_string())
    } else if let Some(urn) = contact.urns.first() {
        Ok((contact.contact_uuid.clone(), urn.clone()))
    } else if let Some(rejected) = contact.rejected_phones.first() {
        Err(format!("invalid phone number: {rejected}"))
    } else {
        Err("no phone number".to_string())
    };
    Candidate {
        display: contact.name,
        reach,
    }
}

impl Candidate {
    /// The recipient; a URN already taken by an earlier recipient makes
    /// this one unreachable (the message reaches that number once).
    fn into_recipient(
        self,
        key: String,
        contained: Option<Value>,
        urn_owner: &mut HashMap<String, String>,
    ) -> Recipient {
        let reach = match self.reach {
            Err(reason) => Reach::Unreachable(reason),
            Ok((contact_uuid, urn)) => match urn_owner.get(&urn) {
                Some(owner) => Reach::Unreachable(format!(
                    "same phone number ({}) as {owner}, who receives the message once for both",
                    mask_phone(&urn)
                )),
                None => {
                    urn_owner.insert(urn.clone(), key.clone());
                    Reach::Reachable { contact_uuid, urn }
                }
            },
        };
        Recipient {
            key,
            display: self.display,
            contained,
            reach,
        }
    }
}
