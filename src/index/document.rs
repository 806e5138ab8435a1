//! Contact documents from the FHIR store. A [`Directory`] is read once per
//! (re)build, in bulk: every Location (for the facility -> district ->
//! region -> country chain), every active PractitionerRole (jobs,
//! facilities, organisations), every Group's members and the job
//! CodeSystems (cadre of each job); then each person becomes a
//! [`ContactDocument`] with no further reads. The person's own fields come
//! from the same mapping as their RapidPro contact (`pipeline::contact`).

use std::collections::HashMap;

use serde_json::Value;

use super::{ContactDocument, JobRef, PlaceRef};
use crate::pipeline::contact::{PERSON_TYPES, draft};
use crate::pipeline::phone::PhoneNormalizer;
use crate::store::{FhirStore, StoreError, search_all};

const MAX_DEPTH: usize = 12;

struct Place {
    name: String,
    level: String,
    parent: Option<String>,
}

/// One active PractitionerRole, as far as documents need it.
struct CurrentRole {
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

impl Directory {
    /// Reads the shared facts from `store`.
    pub async fn load(store: &dyn FhirStore) -> Result<Directory, StoreError> {
        let mut directory = Directory::default();
        let all = |t: &'static str| search_all(store, t, vec![("_count".into(), "1000".into())]);
        for location in all("Location").await? {
            let resource = &location.resource;
            directory.places.insert(
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
        for system in all("CodeSystem").await? {
            let resource = &system.resource;
            let url = resource["url"].as_str().unwrap_or_default();
            if !(url.ends_with("/ihris-job")
                || url.ends_with("/ihris-cadre")
                || url.ends_with("/ihris-classification"))
            {
                continue;
            }
            for concept in resource["concept"].as_array().into_iter().flatten() {
                let Some(code) = concept["code"].as_str() else {
                    continue;
                };
                if let Some(display) = concept["display"].as_str() {
                    directory
                        .displays
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
                    directory
                        .cadres
                        .insert(code.to_string(), (cadre.to_string(), None));
                }
            }
        }
        let displays = &directory.displays;
        for (_, (cadre, display)) in directory.cadres.iter_mut() {
            *display = displays.get(cadre).cloned();
        }
        for role in all("PractitionerRole").await? {
            let resource = &role.resource;
            if !role_is_current(resource) {
                continue;
            }
            let Some(person) = resource["practitioner"]["reference"].as_str() else {
                continue;
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
                        .or_else(|| directory.displays.get(&code).cloned());
                    let (cadre, cadre_display) = match directory.cadres.get(&code) {
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
            directory
                .roles
                .entry(person.to_string())
                .or_default()
                .push(CurrentRole {
                    job,
                    location,
                    organization,
                });
        }
        for group in all("Group").await? {
            for member in group.resource["member"].as_array().into_iter().flatten() {
                if member["inactive"] == Value::Bool(true) {
                    continue;
                }
                if let Some(person) = member["entity"]["reference"].as_str() {
                    directory
                        .groups
                        .entry(person.to_string())
                        .or_default()
                        .push(group.id.clone());
                }
            }
        }
        Ok(directory)
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
        for role in self.roles.get(&reference).into_iter().flatten() {
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
            jobs,
            places,
            organizations,
            groups: self.groups.get(&reference).cloned().unwrap_or_default(),
        }
    }
}

/// Every person in the store as a document, in batches of `batch` handed
/// to `each` (a full rebuild reads the store once).
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
        let people = search_all(store, person_type, vec![("_count".into(), "1000".into())]).await?;
        for chunk in people.chunks(batch.max(1)) {
            let documents: Vec<ContactDocument> = chunk
                .iter()
                .map(|p| directory.document(&p.resource, phones))
                .collect();
            count += documents.len();
            each(documents).await?;
        }
    }
    Ok(count)
}
