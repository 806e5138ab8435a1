//! Contact documents from the FHIR store. A [`Directory`] holds what the
//! documents need besides the person: Locations (for the facility ->
//! district -> region -> country chain), active PractitionerRoles (jobs,
//! facilities, organisations), Group members, the job CodeSystems (cadre
//! of each job) and each person's latest message and reply. A rebuild
//! reads it once, in bulk (`Directory::load`); an update reads only what
//! the changed people need (`Directory::for_people`); both give the same
//! document. The person's own fields come from the same mapping as their
//! RapidPro contact (`pipeline::contact`).

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{ContactDocument, JobRef, LastMessage, PlaceRef};
use crate::pipeline::contact::{PERSON_TYPES, draft};
use crate::pipeline::outbox::DELIVERY_EXTENSION;
use crate::pipeline::phone::PhoneNormalizer;
use crate::store::{FhirStore, SearchRequest, StoreError, StoredResource, search_all};

const MAX_DEPTH: usize = 12;

struct Place {
    name: String,
    level: String,
    parent: Option<String>,
}

/// One active PractitionerRole, as far as documents need it.
struct CurrentRole {
    /// The role's id: a person's roles are taken in this order.
    id: String,
    job: Option<JobRef>,
    location: Option<String>,
    organization: Option<String>,
}

/// What the documents need besides the person: read once, shared by all.
#[derive(Default)]
pub struct Directory {
    places: HashMap<String, Place>,
    /// Person reference -> their active roles.
    roles: HashMap<String, Vec<CurrentRole>>,
    /// Person reference -> Group ids.
    groups: HashMap<String, Vec<String>>,
    /// Job code -> (cadre code, cadre display).
    cadres: HashMap<String, (String, Option<String>)>,
    /// Concept displays of the job and cadre CodeSystems, by code.
    displays: HashMap<String, String>,
    /// Person reference -> their latest message and reply.
    activity: HashMap<String, Activity>,
}

#[derive(Default)]
struct Activity {
    last_message: Option<LastMessage>,
    last_reply: Option<DateTime<Utc>>,
}

fn reference_id<'a>(reference: &'a Value, resource_type: &str) -> Option<&'a str> {
    reference
        .get("reference")?
        .as_str()?
        .strip_prefix(resource_type)?
        .strip_prefix('/')
}

/// The level of a Location by its type code (`district`, `region`,
/// `country`, as iHRIS and mCSD code them); `facility` for a facility type.
fn level_of(location: &Value) -> String {
    let codes = location["type"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["coding"].as_array().into_iter().flatten())
        .filter_map(|c| c["code"].as_str());
    for code in codes {
        for level in ["district", "region", "country"] {
            if code == level || code.ends_with(&format!(":{level}")) {
                return level.to_string();
            }
        }
        if code.contains("facility") {
            return "facility".to_string();
        }
    }
    "other".to_string()
}

/// A role counts while it is active and not ended.
fn role_is_current(role: &Value) -> bool {
    if role["active"] == Value::Bool(false) {
        return false;
    }
    match role["period"]["end"].as_str() {
        Some(end) => {
            end.get(..10).unwrap_or(end)
                >= chrono::Utc::now().format("%Y-%m-%d").to_string().as_str()
        }
        None => true,
    }
}

/// The iHRIS job, cadre and classification CodeSystems (by URL ending).
fn is_job_terminology(url: &str) -> bool {
    url.ends_with("/ihris-job")
        || url.ends_with("/ihris-cadre")
        || url.ends_with("/ihris-classification")
}

/// Whether a change to this CodeSystem changes documents (a job's cadre
/// or a display): the iHRIS job terminology.
pub fn affects_documents(code_system: &Value) -> bool {
    is_job_terminology(code_system["url"].as_str().unwrap_or_default())
}

fn page_of(chunk: &[String]) -> String {
    chunk
        .iter()
        .map(|v| crate::store::escape_search_value(v))
        .collect::<Vec<_>>()
        .join(",")
}

/// Matches of `parameter` = any of `values`, read in chunks of 50.
pub async fn search_any_of(
    store: &dyn FhirStore,
    resource_type: &str,
    parameter: &str,
    values: &[String],
) -> Result<Vec<StoredResource>, StoreError> {
    let mut found = Vec::new();
    for chunk in values.chunks(50) {
        let params = vec![
            (parameter.to_string(), page_of(chunk)),
            ("_count".into(), "1000".into()),
        ];
        found.extend(search_all(store, resource_type, params).await?);
    }
    Ok(found)
}

impl Directory {
    /// Reads the shared facts from `store`, for every person (a rebuild),
    /// a page at a time: only what documents need is kept (a country's
    /// roles and messages are not held in memory as resources).
    pub async fn load(store: &dyn FhirStore) -> Result<Directory, StoreError> {
        let mut directory = Directory::default();
        let mut pages = Pages::new(store, "Location");
        while let Some(page) = pages.next().await? {
            page.iter().for_each(|l| directory.add_location(l));
        }
        directory.add_job_terminology(
            &search_all(store, "CodeSystem", vec![("_count".into(), "1000".into())]).await?,
        );
        let mut pages = Pages::new(store, "PractitionerRole");
        while let Some(page) = pages.next().await? {
            page.iter().for_each(|r| directory.add_role(&r.resource));
        }
        let mut pages = Pages::new(store, "Group");
        while let Some(page) = pages.next().await? {
            page.iter().for_each(|g| directory.add_group(g, None));
        }
        // Messages are many: only each person's latest is kept.
        let mut pages = Pages::new(store, "Communication");
        while let Some(page) = pages.next().await? {
            page.iter()
                .for_each(|c| directory.add_communication(c, None));
        }
        Ok(directory)
    }

    /// Reads what the documents of `people` (references) need, and only
    /// that: their roles, groups and messages, the places above their
    /// facilities, and the job terminology (an incremental update).
    pub async fn for_people(
        store: &dyn FhirStore,
        people: &BTreeSet<String>,
    ) -> Result<Directory, StoreError> {
        let mut directory = Directory::default();
        let people_list: Vec<String> = people.iter().cloned().collect();
        let terminology =
            search_all(store, "CodeSystem", vec![("_count".into(), "1000".into())]).await?;
        directory.add_job_terminology(&terminology);
        let practitioners: Vec<String> = people_list
            .iter()
            .filter(|p| p.starts_with("Practitioner/"))
            .cloned()
            .collect();
        for role in search_any_of(store, "PractitionerRole", "practitioner", &practitioners).await?
        {
            directory.add_role(&role.resource);
        }
        for group in search_any_of(store, "Group", "member", &people_list).await? {
            directory.add_group(&group, Some(people));
        }
        for parameter in ["recipient", "sender"] {
            for communication in
                search_any_of(store, "Communication", parameter, &people_list).await?
            {
                directory.add_communication(&communication, Some(people));
            }
        }
        // The facilities, then each level above, until no place is new.
        let mut wanted: BTreeSet<String> = directory
            .roles
            .values()
            .flatten()
            .filter_map(|r| r.location.clone())
            .collect();
        for _ in 0..MAX_DEPTH {
            let missing: Vec<String> = wanted
                .iter()
                .filter(|id| !directory.places.contains_key(*id))
                .cloned()
                .collect();
            if missing.is_empty() {
                break;
            }
            wanted.clear();
            for location in search_any_of(store, "Location", "_id", &missing).await? {
                directory.add_location(&location);
                if let Some(parent) = &directory.places[&location.id].parent {
                    wanted.insert(parent.clone());
                }
            }
        }
        Ok(directory)
    }

    fn add_location(&mut self, location: &StoredResource) {
        let resource = &location.resource;
        self.places.insert(
            location.id.clone(),
            Place {
                name: resource["name"]
                    .as_str()
                    .unwrap_or(&location.id)
                    .to_string(),
                level: level_of(resource),
                parent: reference_id(&resource["partOf"], "Location").map(str::to_string),
            },
        );
    }

    /// Job and cadre displays, and each job's cadre.
    fn add_job_terminology(&mut self, code_systems: &[StoredResource]) {
        for system in code_systems {
            let resource = &system.resource;
            let url = resource["url"].as_str().unwrap_or_default();
            if !is_job_terminology(url) {
                continue;
            }
            for concept in resource["concept"].as_array().into_iter().flatten() {
                let Some(code) = concept["code"].as_str() else {
                    continue;
                };
                if let Some(display) = concept["display"].as_str() {
                    self.displays
                        .entry(code.to_string())
                        .or_insert_with(|| display.to_string());
                }
                let cadre = concept["property"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["code"] == "cadre")
                    .and_then(|p| {
                        p["valueCoding"]["code"]
                            .as_str()
                            .or(p["valueCode"].as_str())
                    });
                if url.ends_with("/ihris-job")
                    && let Some(cadre) = cadre
                {
                    self.cadres
                        .insert(code.to_string(), (cadre.to_string(), None));
                }
            }
        }
        let displays = &self.displays;
        for (_, (cadre, display)) in self.cadres.iter_mut() {
            *display = displays.get(cadre).cloned();
        }
    }

    fn add_role(&mut self, resource: &Value) {
        if !role_is_current(resource) {
            return;
        }
        let Some(person) = resource["practitioner"]["reference"].as_str() else {
            return;
        };
        let job = resource["code"]
            .as_array()
            .and_then(|c| c.first())
            .and_then(|concept| {
                let coding = &concept["coding"][0];
                let code = coding["code"].as_str()?.to_string();
                let display = coding["display"]
                    .as_str()
                    .or(concept["text"].as_str())
                    .map(str::to_string)
                    .or_else(|| self.displays.get(&code).cloned());
                let (cadre, cadre_display) = match self.cadres.get(&code) {
                    Some((cadre, display)) => (Some(cadre.clone()), display.clone()),
                    None => (None, None),
                };
                Some(JobRef {
                    code,
                    display,
                    cadre,
                    cadre_display,
                })
            });
        let location = resource["location"]
            .as_array()
            .and_then(|l| l.first())
            .and_then(|l| reference_id(l, "Location"))
            .map(str::to_string);
        let organization =
            reference_id(&resource["organization"], "Organization").map(str::to_string);
        self.roles
            .entry(person.to_string())
            .or_default()
            .push(CurrentRole {
                id: resource["id"].as_str().unwrap_or_default().to_string(),
                job,
                location,
                organization,
            });
    }

    /// The group's active members (of `only`, when given).
    fn add_group(&mut self, group: &StoredResource, only: Option<&BTreeSet<String>>) {
        for member in group.resource["member"].as_array().into_iter().flatten() {
            if member["inactive"] == Value::Bool(true) {
                continue;
            }
            let Some(person) = member["entity"]["reference"].as_str() else {
                continue;
            };
            if only.is_some_and(|only| !only.contains(person)) {
                continue;
            }
            let groups = self.groups.entry(person.to_string()).or_default();
            if !groups.contains(&group.id) {
                groups.push(group.id.clone());
            }
        }
    }

    /// An outbox entry (it carries the delivery extension) is a message
    /// to its recipient; any other Communication with a person as sender
    /// and a `received` time is a reply from them.
    fn add_communication(
        &mut self,
        communication: &StoredResource,
        only: Option<&BTreeSet<String>>,
    ) {
        let resource = &communication.resource;
        let wanted = |person: &str| only.is_none_or(|only| only.contains(person));
        let is_outbox_entry = resource["extension"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["url"] == DELIVERY_EXTENSION);
        if is_outbox_entry {
            let Some(person) = resource["recipient"][0]["reference"].as_str() else {
                return;
            };
            if !wanted(person) {
                return;
            }
            let candidate = LastMessage {
                communication: communication.id.clone(),
                status: resource["status"].as_str().unwrap_or("unknown").to_string(),
                updated: communication.last_updated,
            };
            let slot = self.activity.entry(person.to_string()).or_default();
            // Latest update wins; equal instants are settled by id so a
            // rebuild and an update agree.
            let newer = slot.last_message.as_ref().is_none_or(|last| {
                (candidate.updated, &candidate.communication) > (last.updated, &last.communication)
            });
            if newer {
                slot.last_message = Some(candidate);
            }
        } else if let (Some(person), Some(received)) = (
            resource["sender"]["reference"].as_str(),
            resource["received"]
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok()),
        ) {
            if !wanted(person)
                || !PERSON_TYPES
                    .iter()
                    .any(|t| person.starts_with(&format!("{t}/")))
            {
                return;
            }
            let received = received.with_timezone(&Utc);
            let slot = self.activity.entry(person.to_string()).or_default();
            if slot.last_reply.is_none_or(|last| received > last) {
                slot.last_reply = Some(received);
            }
        }
    }

    /// The facility `id` and every place above it.
    fn chain(&self, id: &str) -> Vec<PlaceRef> {
        let mut chain = Vec::new();
        let mut next = Some(id.to_string());
        while let Some(id) = next.take() {
            if chain.len() >= MAX_DEPTH || chain.iter().any(|p: &PlaceRef| p.id == id) {
                break;
            }
            let Some(place) = self.places.get(&id) else {
                break;
            };
            let level = if chain.is_empty() && place.level == "other" {
                "facility".to_string()
            } else {
                place.level.clone()
            };
            chain.push(PlaceRef {
                id: id.clone(),
                name: place.name.clone(),
                level,
            });
            next = place.parent.clone();
        }
        chain
    }

    /// The document of one person (`resource` of a person type).
    pub fn document(&self, resource: &Value, phones: &PhoneNormalizer) -> ContactDocument {
        let contact = draft(resource, phones);
        let reference = format!("{}/{}", contact.entity_type, contact.global_id);
        let mut names: Vec<String> = Vec::new();
        for name in resource["name"].as_array().into_iter().flatten() {
            let parts = name["given"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(name["prefix"].as_array().into_iter().flatten())
                .filter_map(Value::as_str)
                .chain(name["family"].as_str())
                .chain(name["text"].as_str());
            for part in parts {
                if !names.iter().any(|n| n == part) {
                    names.push(part.to_string());
                }
            }
        }
        let phones_e164: Vec<String> = contact
            .urns
            .iter()
            .filter_map(|u| u.strip_prefix("tel:"))
            .map(str::to_string)
            .collect();
        let mut urn_schemes: Vec<String> = Vec::new();
        for urn in &contact.urns {
            if let Some((scheme, _)) = urn.split_once(':')
                && !urn_schemes.iter().any(|s| s == scheme)
            {
                urn_schemes.push(scheme.to_string());
            }
        }
        let mut jobs = Vec::new();
        let mut places: Vec<PlaceRef> = Vec::new();
        let mut organizations = Vec::new();
        let mut roles: Vec<&CurrentRole> =
            self.roles.get(&reference).into_iter().flatten().collect();
        roles.sort_by(|a, b| a.id.cmp(&b.id));
        for role in roles {
            if let Some(job) = &role.job
                && !jobs.contains(job)
            {
                jobs.push(job.clone());
            }
            for place in role
                .location
                .as_deref()
                .map(|l| self.chain(l))
                .unwrap_or_default()
            {
                if !places.iter().any(|p| p.id == place.id) {
                    places.push(place);
                }
            }
            if let Some(organization) = &role.organization
                && !organizations.contains(organization)
            {
                organizations.push(organization.clone());
            }
        }
        ContactDocument {
            resource_type: contact.entity_type.clone(),
            id: contact.global_id.clone(),
            reference: reference.clone(),
            name: contact.name.clone(),
            names,
            phones: phones_e164,
            urn_schemes,
            language: contact.language.clone(),
            gender: resource["gender"].as_str().map(str::to_string),
            active: !contact.inactive,
            opted_out: contact.opted_out,
            rapidpro_contact: contact.contact_uuid.clone(),
            sync_state: if contact.contact_uuid.is_some() {
                "linked"
            } else if contact.urns.is_empty() {
                "unreachable"
            } else {
                "pending"
            }
            .to_string(),
            invalid_phones: contact.rejected_phones.len(),
            jobs,
            places,
            organizations,
            groups: {
                let mut groups = self.groups.get(&reference).cloned().unwrap_or_default();
                groups.sort();
                groups
            },
            last_message: self
                .activity
                .get(&reference)
                .and_then(|a| a.last_message.clone()),
            last_reply: self.activity.get(&reference).and_then(|a| a.last_reply),
        }
    }
}

/// Every resource of a type, a page of 1,000 at a time.
struct Pages<'a> {
    store: &'a dyn FhirStore,
    resource_type: &'static str,
    cursor: Option<String>,
    done: bool,
}

impl<'a> Pages<'a> {
    fn new(store: &'a dyn FhirStore, resource_type: &'static str) -> Pages<'a> {
        Pages {
            store,
            resource_type,
            cursor: None,
            done: false,
        }
    }

    async fn next(&mut self) -> Result<Option<Vec<StoredResource>>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let page = self
            .store
            .search(SearchRequest {
                resource_type: self.resource_type.into(),
                params: vec![
                    ("_count".into(), "1000".into()),
                    ("_total".into(), "none".into()),
                ],
                cursor: self.cursor.take(),
                lenient: false,
            })
            .await?;
        self.cursor = page.next_cursor;
        self.done = self.cursor.is_none();
        Ok(Some(page.matches))
    }
}

/// Every person in the store as a document, in batches of at most `batch`
/// handed to `each` (a full rebuild reads the store once, a page at a
/// time).
pub async fn all_documents<F, Fut, E>(
    store: &dyn FhirStore,
    phones: &PhoneNormalizer,
    batch: usize,
    mut each: F,
) -> Result<usize, E>
where
    F: FnMut(Vec<ContactDocument>) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: From<StoreError>,
{
    let directory = Directory::load(store).await?;
    let mut count = 0;
    for person_type in PERSON_TYPES {
        let mut pages = Pages::new(store, person_type);
        while let Some(people) = pages.next().await? {
            for chunk in people.chunks(batch.max(1)) {
                let documents: Vec<ContactDocument> = chunk
                    .iter()
                    .map(|p| directory.document(&p.resource, phones))
                    .collect();
                count += documents.len();
                each(documents).await?;
            }
        }
    }
    Ok(count)
}
