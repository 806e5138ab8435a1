//! FHIR `Group` <-> RapidPro group sync, one direction at a time
//! (`groups.source`). A FHIR Group of `type` person or practitioner with
//! `actual = true` is linked to its RapidPro group by the identifier
//! `http://app.rapidpro.io/group-uuid`, which also carries the hash of the
//! member contact set last synced (and, FHIR -> RapidPro, the group name
//! last synced), so an unchanged group costs no RapidPro call (FHIR ->
//! RapidPro) and no FHIR write (RapidPro -> FHIR). A renamed Group renames
//! its RapidPro group, and the other way round with `source = "rapidpro"`.
//! See `docs/group-sync.md`. RapidPro is reached through [`GroupDirectory`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::contact_sync::SyncError;
use super::contact_writeback::blocked_by_connector;
use super::cursor::Cursor;
use crate::config::GroupsSource;
use crate::pipeline::contact::{CONTACT_UUID_SYSTEM, OPT_OUT_CODE, OPT_OUT_SYSTEM, PERSON_TYPES};
use crate::store::{
    FhirStore, HistoryMethod, HistoryRequest, StoreError, StoredResource, escape_search_value,
    modify_resource, search_all,
};

/// The identifier linking a FHIR Group to its RapidPro group (emNutt's).
pub const GROUP_UUID_SYSTEM: &str = "http://app.rapidpro.io/group-uuid";
/// Extension on that identifier: SHA-256 of the member contact UUIDs last
/// synced.
pub const MEMBERS_HASH_URL: &str =
    "http://mhero.org/fhir/StructureDefinition/rapidpro-group-members-hash";
/// Extension on that identifier: the RapidPro group name last synced
/// (FHIR -> RapidPro), so an unchanged `Group.name` costs no RapidPro call.
pub const SYNCED_NAME_URL: &str = "http://mhero.org/fhir/StructureDefinition/rapidpro-group-name";
/// Extension on that identifier: a `Group.name` RapidPro refused (or would
/// refuse); it is not sent again until `Group.name` changes.
pub const REFUSED_NAME_URL: &str =
    "http://mhero.org/fhir/StructureDefinition/rapidpro-group-name-refused";
/// RapidPro's limit of contacts per `contact_actions` call.
pub const ACTION_BATCH: usize = 100;
/// Ids (or identifier values) per FHIR search.
const SEARCH_BATCH: usize = 100;
/// The cursor over Group deletions (FHIR -> RapidPro).
const DELETIONS_CURSOR: &str = "groups-deleted";

/// A RapidPro group as the sync needs to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteGroup {
    pub uuid: String,
    pub name: String,
    /// A query-based group: its members cannot be set.
    pub smart: bool,
    pub system: bool,
}

/// What the group sync needs from RapidPro.
#[async_trait]
pub trait GroupDirectory: Send + Sync {
    /// Every group of the workspace.
    async fn groups(&self) -> Result<Vec<RemoteGroup>, SyncError>;
    /// Create a manual group.
    async fn create_group(&self, name: &str) -> Result<RemoteGroup, SyncError>;
    /// Rename a group. A name RapidPro refuses (a duplicate, or one that
    /// breaks its name rules) is [`SyncError::Refused`].
    async fn rename_group(&self, group_uuid: &str, name: &str) -> Result<RemoteGroup, SyncError>;
    /// The UUIDs of the group's contacts.
    async fn group_members(&self, group_uuid: &str) -> Result<Vec<String>, SyncError>;
    /// `contact_actions` `add`; at most [`ACTION_BATCH`] contacts.
    async fn add_to_group(&self, group_uuid: &str, contacts: &[String]) -> Result<(), SyncError>;
    /// `contact_actions` `remove`; at most [`ACTION_BATCH`] contacts.
    async fn remove_from_group(
        &self,
        group_uuid: &str,
        contacts: &[String],
    ) -> Result<(), SyncError>;
}

/// One pass.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GroupSyncReport {
    /// Groups looked at (FHIR Groups, or RapidPro groups for `rapidpro`).
    pub examined: usize,
    /// RapidPro groups (or FHIR Groups) created.
    pub created: usize,
    /// Groups whose membership or link changed.
    pub updated: usize,
    /// Same members as last synced: nothing written.
    pub unchanged: usize,
    /// RapidPro groups emptied because their FHIR Group was deleted or
    /// deactivated (the group itself is kept).
    pub emptied: usize,
    /// FHIR Groups that are not synced (not `actual`, or of another type).
    pub ignored: usize,
    /// Members without a RapidPro contact yet (FHIR -> RapidPro), or
    /// RapidPro contacts without a FHIR person (RapidPro -> FHIR).
    pub not_yet_synced: usize,
    /// Members left out of RapidPro because they may not be messaged
    /// (inactive, opted out, blocked).
    pub not_messageable: usize,
    pub conflicts: Vec<String>,
    pub failures: Vec<String>,
}

/// What happened to one group.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Created,
    Updated,
    Unchanged,
    Emptied,
    Conflict(String),
}

/// How a rename went (the strings are conflict reports).
enum Rename {
    Done(RemoteGroup),
    /// Another RapidPro group has the name: found in the group list, no
    /// call made; tried again once the name is free.
    Clash(String),
    /// RapidPro refused the name (400), or would (its name rules): not
    /// sent again until `Group.name` changes.
    Refused(String),
}

/// The sync job.
pub struct GroupSync<'a> {
    pub store: &'a dyn FhirStore,
    pub directory: &'a dyn GroupDirectory,
    pub source: GroupsSource,
}

// ----- FHIR Group helpers -----------------------------------------------------

/// A Group the sync handles: `actual` people or practitioners.
pub fn is_synced_group(group: &Value) -> bool {
    group.get("actual").and_then(Value::as_bool) == Some(true)
        && matches!(
            group.get("type").and_then(Value::as_str),
            Some("person" | "practitioner")
        )
}

fn group_identifier(group: &Value) -> Option<&Value> {
    group
        .get("identifier")?
        .as_array()?
        .iter()
        .find(|i| i.get("system").and_then(Value::as_str) == Some(GROUP_UUID_SYSTEM))
}

/// The linked RapidPro group UUID and the members hash recorded with it.
pub fn group_link(group: &Value) -> Option<(String, Option<String>)> {
    let identifier = group_identifier(group)?;
    let uuid = identifier.get("value")?.as_str()?.to_string();
    let hash = identifier
        .get("extension")
        .and_then(Value::as_array)
        .and_then(|e| {
            e.iter()
                .find(|x| x.get("url").and_then(Value::as_str) == Some(MEMBERS_HASH_URL))
        })
        .and_then(|x| x.get("valueString"))
        .and_then(Value::as_str)
        .map(str::to_string);
    Some((uuid, hash))
}

fn link_extension(group: &Value, url: &str) -> Option<String> {
    group_identifier(group)?
        .get("extension")?
        .as_array()?
        .iter()
        .find(|x| x.get("url").and_then(Value::as_str) == Some(url))?
        .get("valueString")?
        .as_str()
        .map(str::to_string)
}

/// The RapidPro group name last synced, recorded on the link.
pub fn synced_name(group: &Value) -> Option<String> {
    link_extension(group, SYNCED_NAME_URL)
}

/// The `Group.name` RapidPro refused last, recorded on the link.
pub fn refused_name(group: &Value) -> Option<String> {
    link_extension(group, REFUSED_NAME_URL)
}

/// The names recorded on a link: the RapidPro group's, and a refused one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkNames<'a> {
    pub synced: Option<&'a str>,
    pub refused: Option<&'a str>,
}

fn link_identifier(uuid: &str, hash: Option<&str>, names: LinkNames<'_>) -> Value {
    let mut extension = Vec::new();
    if let Some(hash) = hash {
        extension.push(json!({ "url": MEMBERS_HASH_URL, "valueString": hash }));
    }
    if let Some(name) = names.synced {
        extension.push(json!({ "url": SYNCED_NAME_URL, "valueString": name }));
    }
    if let Some(name) = names.refused {
        extension.push(json!({ "url": REFUSED_NAME_URL, "valueString": name }));
    }
    if extension.is_empty() {
        json!({ "system": GROUP_UUID_SYSTEM, "value": uuid })
    } else {
        json!({ "system": GROUP_UUID_SYSTEM, "value": uuid, "extension": extension })
    }
}

/// `group` with its group-uuid identifier saying `uuid` (and `hash`);
/// `None` if it already does. The recorded names stay while the UUID does.
/// Nothing else changes.
pub fn with_group_link(group: &Value, uuid: &str, hash: Option<&str>) -> Option<Value> {
    let same = group_link(group).is_some_and(|(linked, _)| linked == uuid);
    let synced = same.then(|| synced_name(group)).flatten();
    let refused = same.then(|| refused_name(group)).flatten();
    let names = LinkNames {
        synced: synced.as_deref(),
        refused: refused.as_deref(),
    };
    with_named_link(group, uuid, hash, names)
}

/// [`with_group_link`] that records `names` instead of keeping them.
pub fn with_named_link(
    group: &Value,
    uuid: &str,
    hash: Option<&str>,
    names: LinkNames<'_>,
) -> Option<Value> {
    if group_link(group) == Some((uuid.to_string(), hash.map(str::to_string)))
        && synced_name(group).as_deref() == names.synced
        && refused_name(group).as_deref() == names.refused
    {
        return None;
    }
    let identifier = link_identifier(uuid, hash, names);
    let mut updated = group.clone();
    let object = updated.as_object_mut()?;
    match object.get_mut("identifier") {
        Some(Value::Array(ids)) => match ids
            .iter_mut()
            .find(|i| i.get("system").and_then(Value::as_str) == Some(GROUP_UUID_SYSTEM))
        {
            Some(existing) => *existing = identifier,
            None => ids.push(identifier),
        },
        Some(other) => {
            let kept = other.take();
            *other = json!([kept, identifier]);
        }
        None => {
            object.insert("identifier".into(), json!([identifier]));
        }
    }
    Some(updated)
}

/// SHA-256 (hex) of a set of contact UUIDs.
pub fn members_hash(contacts: &BTreeSet<String>) -> String {
    let mut hasher = Sha256::new();
    for uuid in contacts {
        hasher.update(uuid.as_bytes());
        hasher.update(b"\n");
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `Type/id` of a person reference (relative or absolute); `None` for
/// other types, contained and logical references.
fn person_reference(reference: &str) -> Option<(String, String)> {
    let mut parts = reference.trim_end_matches('/').rsplit('/');
    let mut id = parts.next()?;
    let mut resource_type = parts.next()?;
    if resource_type == "_history" {
        // Type/id/_history/vid
        id = parts.next()?;
        resource_type = parts.next()?;
    }
    (PERSON_TYPES.contains(&resource_type) && !id.is_empty())
        .then(|| (resource_type.to_string(), id.to_string()))
}

fn period_ended(member: &Value, now: DateTime<Utc>) -> bool {
    let Some(end) = member.pointer("/period/end").and_then(Value::as_str) else {
        return false;
    };
    if let Ok(instant) = DateTime::parse_from_rfc3339(end) {
        return instant.with_timezone(&Utc) < now;
    }
    // A date (or year-month, year) ends at the end of that day.
    let date = match end.len() {
        4 => NaiveDate::parse_from_str(&format!("{end}-12-31"), "%Y-%m-%d").ok(),
        7 => NaiveDate::parse_from_str(&format!("{end}-01"), "%Y-%m-%d")
            .ok()
            .and_then(|d| d.checked_add_months(chrono::Months::new(1)))
            .and_then(|d| d.pred_opt()),
        _ => NaiveDate::parse_from_str(end, "%Y-%m-%d").ok(),
    };
    date.is_some_and(|d| d < now.date_naive())
}

/// Why RapidPro would refuse `name` for a group (reference §5.3: at most
/// 64 characters, no `"`, `\` or NUL; the name is already trimmed).
fn name_problem(name: &str) -> Option<String> {
    if name.chars().count() > 64 {
        return Some("RapidPro group names have at most 64 characters".into());
    }
    name.chars()
        .find(|c| ['"', '\\', '\0'].contains(c))
        .map(|c| format!("RapidPro group names cannot contain {c:?}"))
}

/// `Group.name`, trimmed; `None` when missing or blank.
fn group_name(group: &Value) -> Option<&str> {
    group
        .get("name")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|n| !n.is_empty())
}

/// Whether a `member` entry makes its entity a current member.
fn is_current(member: &Value, now: DateTime<Utc>) -> bool {
    member.get("inactive").and_then(Value::as_bool) != Some(true) && !period_ended(member, now)
}

fn member_reference(member: &Value) -> Option<(String, String)> {
    person_reference(member.pointer("/entity/reference")?.as_str()?)
}

/// The current person members of a Group (`inactive` and ended entries
/// left out), without duplicates, in order.
pub fn current_members(group: &Value, now: DateTime<Utc>) -> Vec<(String, String)> {
    let mut seen = BTreeSet::new();
    group
        .get("member")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|m| is_current(m, now))
        .filter_map(member_reference)
        .filter(|r| seen.insert(r.clone()))
        .collect()
}

/// The RapidPro contact UUID written back on a person.
pub fn contact_uuid(person: &Value) -> Option<String> {
    person
        .get("identifier")?
        .as_array()?
        .iter()
        .find(|i| i.get("system").and_then(Value::as_str) == Some(CONTACT_UUID_SYSTEM))?
        .get("value")?
        .as_str()
        .map(str::to_string)
}

/// May RapidPro put this person in a group? Not when inactive, opted out,
/// or blocked by the connector (RapidPro refuses to add non-active
/// contacts, and blocking takes a contact out of every group).
fn messageable(person: &Value) -> bool {
    let opted_out = person
        .pointer("/meta/tag")
        .and_then(Value::as_array)
        .is_some_and(|tags| {
            tags.iter().any(|t| {
                t.get("system").and_then(Value::as_str) == Some(OPT_OUT_SYSTEM)
                    && t.get("code").and_then(Value::as_str) == Some(OPT_OUT_CODE)
            })
        });
    person.get("active").and_then(Value::as_bool) != Some(false)
        && !opted_out
        && !blocked_by_connector(person)
}

/// Read the people `refs` name, in bulk (`_id=a,b,c` per type).
async fn read_people(
    store: &dyn FhirStore,
    refs: &[(String, String)],
) -> Result<HashMap<(String, String), Value>, StoreError> {
    let mut by_type: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (resource_type, id) in refs {
        by_type.entry(resource_type).or_default().push(id);
    }
    let mut people = HashMap::new();
    for (resource_type, ids) in by_type {
        for chunk in ids.chunks(SEARCH_BATCH) {
            let ids: Vec<String> = chunk.iter().map(|id| escape_search_value(id)).collect();
            let params = vec![
                ("_id".to_string(), ids.join(",")),
                ("_count".to_string(), SEARCH_BATCH.to_string()),
            ];
            for found in search_all(store, resource_type, params).await? {
                people.insert((found.resource_type, found.id), found.resource);
            }
        }
    }
    Ok(people)
}

/// The FHIR people whose contact-uuid identifier is one of `uuids`:
/// contact UUID -> (type, id).
async fn people_by_contact(
    store: &dyn FhirStore,
    uuids: &BTreeSet<String>,
) -> Result<BTreeMap<String, (String, String)>, StoreError> {
    let uuids: Vec<&String> = uuids.iter().collect();
    let mut found = BTreeMap::new();
    for resource_type in PERSON_TYPES {
        for chunk in uuids.chunks(SEARCH_BATCH) {
            let values: Vec<String> = chunk
                .iter()
                .map(|u| format!("{CONTACT_UUID_SYSTEM}|{}", escape_search_value(u)))
                .collect();
            let params = vec![
                ("identifier".to_string(), values.join(",")),
                ("_count".to_string(), SEARCH_BATCH.to_string()),
            ];
            for person in search_all(store, resource_type, params).await? {
                if let Some(uuid) = contact_uuid(&person.resource) {
                    found
                        .entry(uuid)
                        .or_insert((person.resource_type, person.id));
                }
            }
        }
    }
    Ok(found)
}

/// The RapidPro groups, read once per pass and only when needed.
#[derive(Default)]
struct RemoteIndex {
    groups: Option<Vec<RemoteGroup>>,
}

impl RemoteIndex {
    async fn get(
        &mut self,
        directory: &dyn GroupDirectory,
    ) -> Result<&mut Vec<RemoteGroup>, SyncError> {
        if self.groups.is_none() {
            self.groups = Some(directory.groups().await?);
        }
        Ok(self.groups.get_or_insert_with(Vec::new))
    }
}

/// What the members of a FHIR Group amount to in RapidPro.
struct Wanted {
    contacts: BTreeSet<String>,
    not_yet_synced: usize,
    not_messageable: usize,
}

impl GroupSync<'_> {
    /// One pass. A group whose members have the hash recorded on its link
    /// is skipped (no RapidPro call for `fhir`, no FHIR write for
    /// `rapidpro`).
    pub async fn run_once(&self) -> Result<GroupSyncReport, SyncError> {
        self.run(false).await
    }

    /// A pass that ignores the recorded hashes, undoing changes made by
    /// hand on the side that follows (one membership listing per group).
    pub async fn reconcile(&self) -> Result<GroupSyncReport, SyncError> {
        self.run(true).await
    }

    async fn run(&self, full: bool) -> Result<GroupSyncReport, SyncError> {
        match self.source {
            GroupsSource::Fhir => self.push_all(full).await,
            GroupsSource::Rapidpro => self.pull_all(full).await,
        }
    }

    // ----- FHIR -> RapidPro ---------------------------------------------------

    async fn push_all(&self, full: bool) -> Result<GroupSyncReport, SyncError> {
        let mut report = GroupSyncReport::default();
        let mut remote = RemoteIndex::default();
        let groups = search_all(
            self.store,
            "Group",
            vec![("_count".to_string(), SEARCH_BATCH.to_string())],
        )
        .await?;
        // A RapidPro group linked from several Groups would flip between
        // their memberships: none of them is synced.
        let mut links: HashMap<String, Vec<String>> = HashMap::new();
        for group in groups.iter().filter(|g| is_synced_group(&g.resource)) {
            if let Some((uuid, _)) = group_link(&group.resource) {
                links.entry(uuid).or_default().push(group.reference());
            }
        }
        for group in &groups {
            report.examined += 1;
            if !is_synced_group(&group.resource) {
                report.ignored += 1;
                continue;
            }
            if let Some((uuid, _)) = group_link(&group.resource)
                && let Some(sharing) = links.get(&uuid).filter(|s| s.len() > 1)
            {
                report.conflicts.push(format!(
                    "{}: RapidPro group {uuid} is linked from several Groups ({})",
                    group.reference(),
                    sharing.join(", ")
                ));
                continue;
            }
            match self.push_group(group, full, &mut remote, &mut report).await {
                Ok(outcome) => count(&mut report, outcome),
                Err(e) => report.failures.push(format!("{}: {e}", group.reference())),
            }
        }
        self.push_deletions(&mut remote, &mut report).await?;
        Ok(report)
    }

    async fn wanted(&self, group: &Value) -> Result<Wanted, SyncError> {
        let mut wanted = Wanted {
            contacts: BTreeSet::new(),
            not_yet_synced: 0,
            not_messageable: 0,
        };
        if group.get("active").and_then(Value::as_bool) == Some(false) {
            return Ok(wanted);
        }
        let refs = current_members(group, Utc::now());
        let people = read_people(self.store, &refs).await?;
        for reference in &refs {
            match people.get(reference) {
                None => {
                    tracing::warn!(member = %format!("{}/{}", reference.0, reference.1), "group member not found in the FHIR store");
                    wanted.not_yet_synced += 1;
                }
                Some(person) => match contact_uuid(person) {
                    None => wanted.not_yet_synced += 1,
                    Some(_) if !messageable(person) => wanted.not_messageable += 1,
                    Some(uuid) => {
                        wanted.contacts.insert(uuid);
                    }
                },
            }
        }
        Ok(wanted)
    }

    async fn push_group(
        &self,
        group: &StoredResource,
        full: bool,
        remote: &mut RemoteIndex,
        report: &mut GroupSyncReport,
    ) -> Result<Outcome, SyncError> {
        let resource = &group.resource;
        let wanted = self.wanted(resource).await?;
        report.not_yet_synced += wanted.not_yet_synced;
        report.not_messageable += wanted.not_messageable;
        let hash = members_hash(&wanted.contacts);
        let link = group_link(resource);
        let name = group_name(resource);
        // A name RapidPro refused is not sent again until it changes (a
        // reconcile pass tries it again); it stays reported.
        let mut refused = refused_name(resource).filter(|r| !full && Some(r.as_str()) == name);
        if let Some(refused) = &refused {
            report.conflicts.push(format!(
                "{}: RapidPro refused the name \"{refused}\" for its group; change Group.name",
                group.reference()
            ));
        }
        // A name equal to the one last synced needs no RapidPro call.
        let renamed =
            name.is_some() && synced_name(resource).as_deref() != name && refused.is_none();
        if !full
            && !renamed
            && let Some((_, Some(recorded))) = &link
            && *recorded == hash
        {
            return Ok(Outcome::Unchanged);
        }
        let groups = remote.get(self.directory).await?;
        let linked = link
            .as_ref()
            .and_then(|(uuid, _)| groups.iter().find(|g| &g.uuid == uuid))
            .cloned();
        let (mut target, created) = match linked {
            Some(found) => (found, false),
            None => {
                let Some(name) = name else {
                    return Ok(Outcome::Conflict(format!(
                        "{}: has no name, so no RapidPro group can be made for it",
                        group.reference()
                    )));
                };
                if let Some(clash) = groups
                    .iter()
                    .find(|g| g.name.to_lowercase() == name.to_lowercase())
                {
                    return Ok(Outcome::Conflict(format!(
                        "{}: RapidPro already has a group named \"{}\" ({}) that is not linked to this Group",
                        group.reference(),
                        clash.name,
                        clash.uuid
                    )));
                }
                let made = self.directory.create_group(name).await?;
                groups.push(made.clone());
                // Link at once, so that a failure below cannot orphan the group.
                modify_resource(self.store, "Group", &group.id, |current| {
                    let names = LinkNames {
                        synced: Some(&made.name),
                        refused: None,
                    };
                    with_named_link(current, &made.uuid, None, names)
                })
                .await?;
                (made, true)
            }
        };
        if target.smart || target.system {
            return Ok(Outcome::Conflict(format!(
                "{}: RapidPro group \"{}\" ({}) is query based or a system group; its members cannot be set",
                group.reference(),
                target.name,
                target.uuid
            )));
        }
        let mut renamed_remote = false;
        if let Some(name) = name
            && target.name != name
            && refused.is_none()
        {
            // A refused name is reported; the members are synced all the same.
            match self.rename(groups, &target, name).await? {
                Rename::Done(renamed) => {
                    target = renamed;
                    renamed_remote = true;
                }
                Rename::Clash(conflict) => report
                    .conflicts
                    .push(format!("{}: {conflict}", group.reference())),
                Rename::Refused(conflict) => {
                    report
                        .conflicts
                        .push(format!("{}: {conflict}", group.reference()));
                    refused = Some(name.to_string());
                }
            }
        }
        let current: BTreeSet<String> = if created {
            BTreeSet::new()
        } else {
            self.directory
                .group_members(&target.uuid)
                .await?
                .into_iter()
                .collect()
        };
        let changed = self.apply(&target.uuid, &current, &wanted.contacts).await?;
        let relinked = modify_resource(self.store, "Group", &group.id, |current| {
            let names = LinkNames {
                synced: Some(&target.name),
                refused: refused.as_deref(),
            };
            with_named_link(current, &target.uuid, Some(&hash), names)
        })
        .await?
        .is_some();
        let emptied = wanted.contacts.is_empty()
            && !current.is_empty()
            && resource.get("active").and_then(Value::as_bool) == Some(false);
        Ok(if created {
            Outcome::Created
        } else if emptied {
            Outcome::Emptied
        } else if changed
            || renamed_remote
            || (relinked && link.is_none_or(|(uuid, _)| uuid != target.uuid))
        {
            Outcome::Updated
        } else {
            Outcome::Unchanged
        })
    }

    /// Rename the RapidPro group `target` to `name`; `groups` is kept up
    /// to date.
    async fn rename(
        &self,
        groups: &mut [RemoteGroup],
        target: &RemoteGroup,
        name: &str,
    ) -> Result<Rename, SyncError> {
        if let Some(problem) = name_problem(name) {
            return Ok(Rename::Refused(format!(
                "RapidPro group \"{}\" ({}) cannot be renamed to \"{name}\": {problem}",
                target.name, target.uuid
            )));
        }
        if let Some(clash) = groups
            .iter()
            .find(|g| g.uuid != target.uuid && g.name.to_lowercase() == name.to_lowercase())
        {
            return Ok(Rename::Clash(format!(
                "RapidPro group \"{}\" ({}) cannot be renamed to \"{name}\": RapidPro already has a group of that name ({})",
                target.name, target.uuid, clash.uuid
            )));
        }
        match self.directory.rename_group(&target.uuid, name).await {
            Ok(renamed) => {
                if let Some(listed) = groups.iter_mut().find(|g| g.uuid == renamed.uuid) {
                    *listed = renamed.clone();
                }
                Ok(Rename::Done(renamed))
            }
            Err(SyncError::Refused(why)) => Ok(Rename::Refused(format!(
                "RapidPro refused to rename group \"{}\" ({}) to \"{name}\": {why}",
                target.name, target.uuid
            ))),
            Err(e) => Err(e),
        }
    }

    /// Make the RapidPro group's members `wanted` (it has `current`).
    /// Returns whether anything was sent.
    async fn apply(
        &self,
        group_uuid: &str,
        current: &BTreeSet<String>,
        wanted: &BTreeSet<String>,
    ) -> Result<bool, SyncError> {
        let add: Vec<String> = wanted.difference(current).cloned().collect();
        let remove: Vec<String> = current.difference(wanted).cloned().collect();
        for batch in remove.chunks(ACTION_BATCH) {
            self.directory.remove_from_group(group_uuid, batch).await?;
        }
        for batch in add.chunks(ACTION_BATCH) {
            self.directory.add_to_group(group_uuid, batch).await?;
        }
        Ok(!add.is_empty() || !remove.is_empty())
    }

    /// Groups deleted from FHIR since the cursor: their RapidPro groups are
    /// emptied, not deleted (see `docs/group-sync.md`).
    async fn push_deletions(
        &self,
        remote: &mut RemoteIndex,
        report: &mut GroupSyncReport,
    ) -> Result<(), SyncError> {
        let mut cursor = Cursor::load(self.store, DELETIONS_CURSOR).await?;
        let since = cursor
            .position
            .as_deref()
            .and_then(|p| DateTime::parse_from_rfc3339(p).ok())
            .map(|p| p.with_timezone(&Utc));
        let mut deletions = Vec::new();
        let mut page_cursor = None;
        loop {
            let page = self
                .store
                .history(HistoryRequest {
                    resource_type: Some("Group".into()),
                    id: None,
                    since,
                    count: Some(SEARCH_BATCH),
                    cursor: page_cursor,
                })
                .await?;
            deletions.extend(page.entries.into_iter().filter(|e| {
                // `since` is inclusive: what is at the cursor was done.
                e.method == HistoryMethod::Delete && since.is_none_or(|s| e.last_updated > s)
            }));
            match page.next_cursor {
                Some(next) => page_cursor = Some(next),
                None => break,
            }
        }
        deletions.sort_by_key(|e| e.last_updated);
        let mut latest = None;
        let mut failed = false;
        for deletion in &deletions {
            match self.empty_deleted(&deletion.id, remote).await {
                Ok(Some(outcome)) => count(report, outcome),
                Ok(None) => {}
                Err(e) => {
                    failed = true;
                    report
                        .failures
                        .push(format!("deleted Group/{}: {e}", deletion.id));
                }
            }
            if !failed {
                latest = Some(deletion.last_updated);
            }
        }
        if let Some(latest) = latest {
            cursor
                .advance(
                    self.store,
                    &latest.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                )
                .await?;
        }
        Ok(())
    }

    /// Empty the RapidPro group of a deleted FHIR Group (found in its last
    /// stored version). `None` when there is nothing to do.
    async fn empty_deleted(
        &self,
        id: &str,
        remote: &mut RemoteIndex,
    ) -> Result<Option<Outcome>, SyncError> {
        match self.store.read("Group", id).await {
            // Created again since: the normal pass handles it.
            Ok(_) => return Ok(None),
            Err(StoreError::NotFound { .. } | StoreError::Gone { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let history = self
            .store
            .history(HistoryRequest {
                resource_type: Some("Group".into()),
                id: Some(id.to_string()),
                ..Default::default()
            })
            .await?;
        let Some(last) = history
            .entries
            .iter()
            .filter_map(|e| e.resource.as_ref().map(|r| (e.last_updated, r)))
            .max_by_key(|(at, _)| *at)
            .map(|(_, r)| r)
        else {
            return Ok(None);
        };
        let Some((uuid, _)) = group_link(last).filter(|_| is_synced_group(last)) else {
            return Ok(None);
        };
        // Another Group took the RapidPro group over (an operator linked a
        // new Group to it): its members are not ours to remove.
        let linked_elsewhere = search_all(
            self.store,
            "Group",
            vec![(
                "identifier".to_string(),
                format!("{GROUP_UUID_SYSTEM}|{}", escape_search_value(&uuid)),
            )],
        )
        .await?;
        if !linked_elsewhere.is_empty() {
            return Ok(None);
        }
        if !remote
            .get(self.directory)
            .await?
            .iter()
            .any(|g| g.uuid == uuid)
        {
            return Ok(None);
        }
        let current: BTreeSet<String> = self
            .directory
            .group_members(&uuid)
            .await?
            .into_iter()
            .collect();
        let changed = self.apply(&uuid, &current, &BTreeSet::new()).await?;
        Ok(Some(if changed {
            Outcome::Emptied
        } else {
            Outcome::Unchanged
        }))
    }

    // ----- RapidPro -> FHIR ---------------------------------------------------

    async fn pull_all(&self, full: bool) -> Result<GroupSyncReport, SyncError> {
        let mut report = GroupSyncReport::default();
        for remote in self.directory.groups().await? {
            if remote.system {
                continue;
            }
            report.examined += 1;
            match self.pull_group(&remote, full, &mut report).await {
                Ok(outcome) => count(&mut report, outcome),
                Err(e) => report.failures.push(format!(
                    "RapidPro group {} ({}): {e}",
                    remote.name, remote.uuid
                )),
            }
        }
        Ok(report)
    }

    async fn pull_group(
        &self,
        remote: &RemoteGroup,
        full: bool,
        report: &mut GroupSyncReport,
    ) -> Result<Outcome, SyncError> {
        let contacts: BTreeSet<String> = self
            .directory
            .group_members(&remote.uuid)
            .await?
            .into_iter()
            .collect();
        let hash = members_hash(&contacts);
        let linked = search_all(
            self.store,
            "Group",
            vec![(
                "identifier".to_string(),
                format!("{GROUP_UUID_SYSTEM}|{}", escape_search_value(&remote.uuid)),
            )],
        )
        .await?;
        if linked.len() > 1 {
            return Ok(Outcome::Conflict(format!(
                "RapidPro group {} ({}) is linked from {} FHIR Groups: {}",
                remote.name,
                remote.uuid,
                linked.len(),
                linked
                    .iter()
                    .map(StoredResource::reference)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if !full
            && let Some(existing) = linked.first()
            && group_link(&existing.resource)
                .and_then(|(_, h)| h)
                .as_deref()
                == Some(&hash)
            && existing.resource.get("name").and_then(Value::as_str) == Some(remote.name.as_str())
        {
            return Ok(Outcome::Unchanged);
        }
        let people = people_by_contact(self.store, &contacts).await?;
        report.not_yet_synced += contacts.len() - people.len();
        // The hash recorded is that of the contacts found in FHIR: while
        // some are missing it differs from the group's, so they are looked
        // for again on the next pass.
        let hash = members_hash(&people.keys().cloned().collect());
        let wanted: BTreeSet<(String, String)> = people.into_values().collect();
        let (id, created) = match linked.into_iter().next() {
            Some(existing) => (existing.id, false),
            None => {
                let all_practitioners =
                    !wanted.is_empty() && wanted.iter().all(|(t, _)| t == "Practitioner");
                let group = json!({
                    "resourceType": "Group",
                    "active": true,
                    "type": if all_practitioners { "practitioner" } else { "person" },
                    "actual": true,
                    "name": remote.name,
                    "identifier": [link_identifier(&remote.uuid, None, LinkNames::default())],
                });
                let query = format!("identifier={GROUP_UUID_SYSTEM}|{}", remote.uuid);
                let outcome = self.store.create(group, Some(&query)).await?;
                (outcome.stored.id, true)
            }
        };
        // Members not in RapidPro that have no contact are kept: RapidPro
        // cannot know about them.
        let current = self.store.read("Group", &id).await?;
        let refs = current_members(&current.resource, Utc::now());
        let people = read_people(self.store, &refs).await?;
        let keep: BTreeSet<(String, String)> = refs
            .into_iter()
            .filter(|r| {
                wanted.contains(r)
                    || people
                        .get(r)
                        .is_none_or(|person| contact_uuid(person).is_none())
            })
            .collect();
        let written = modify_resource(self.store, "Group", &id, |group| {
            let members = with_members(group, &keep, &wanted, &remote.uuid, &hash);
            // Renamed in RapidPro: the FHIR Group follows.
            let named = members.as_ref().unwrap_or(group);
            match with_name(named, &remote.name) {
                Some(renamed) => Some(renamed),
                None => members,
            }
        })
        .await?;
        Ok(if created {
            Outcome::Created
        } else if written.is_some() {
            Outcome::Updated
        } else {
            Outcome::Unchanged
        })
    }
}

/// `group` whose current members are `keep` plus `wanted`, linked to
/// `uuid` with `hash`; past (`inactive` or ended) entries stay as they are.
fn with_members(
    group: &Value,
    keep: &BTreeSet<(String, String)>,
    wanted: &BTreeSet<(String, String)>,
    uuid: &str,
    hash: &str,
) -> Option<Value> {
    let now = Utc::now();
    let linked = with_group_link(group, uuid, Some(hash));
    let mut updated = linked.clone().unwrap_or_else(|| group.clone());
    let entries: Vec<Value> = group
        .get("member")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut present = BTreeSet::new();
    let mut members = Vec::new();
    for entry in entries {
        if !is_current(&entry, now) {
            members.push(entry);
            continue;
        }
        match member_reference(&entry) {
            Some(r) if keep.contains(&r) || wanted.contains(&r) => {
                if present.insert(r) {
                    members.push(entry);
                }
            }
            Some(_) => {}
            // Not a person reference: not ours to manage.
            None => members.push(entry),
        }
    }
    let mut added = false;
    for r in wanted {
        if present.insert(r.clone()) {
            members.push(json!({ "entity": { "reference": format!("{}/{}", r.0, r.1) } }));
            added = true;
        }
    }
    let before = group
        .get("member")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    if linked.is_none() && !added && members.len() == before {
        return None;
    }
    let object = updated.as_object_mut()?;
    if members.is_empty() {
        object.remove("member");
    } else {
        object.insert("member".into(), Value::Array(members));
    }
    if object.contains_key("quantity") {
        let current = object["member"]
            .as_array()
            .map_or(0, |m| m.iter().filter(|e| is_current(e, now)).count());
        object.insert("quantity".into(), json!(current));
    }
    Some(updated)
}

/// `group` with `name`; `None` if it has it already.
fn with_name(group: &Value, name: &str) -> Option<Value> {
    if group.get("name").and_then(Value::as_str) == Some(name) {
        return None;
    }
    let mut renamed = group.clone();
    renamed.as_object_mut()?.insert("name".into(), json!(name));
    Some(renamed)
}

fn count(report: &mut GroupSyncReport, outcome: Outcome) {
    match outcome {
        Outcome::Created => report.created += 1,
        Outcome::Updated => report.updated += 1,
        Outcome::Unchanged => report.unchanged += 1,
        Outcome::Emptied => report.emptied += 1,
        Outcome::Conflict(message) => report.conflicts.push(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::test_support::Counting;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn only_actual_person_groups_are_synced() {
        assert!(is_synced_group(
            &json!({"type": "practitioner", "actual": true})
        ));
        assert!(is_synced_group(&json!({"type": "person", "actual": true})));
        assert!(!is_synced_group(
            &json!({"type": "person", "actual": false})
        ));
        assert!(!is_synced_group(&json!({"type": "person"})));
        assert!(!is_synced_group(&json!({"type": "device", "actual": true})));
    }

    #[test]
    fn current_members_skip_inactive_ended_and_other_entities() {
        let now = at("2026-11-22T08:00:00Z");
        let group = json!({"member": [
            {"entity": {"reference": "Practitioner/a"}},
            {"entity": {"reference": "Practitioner/a"}},
            {"entity": {"reference": "http://ihris.example/fhir/Patient/b/_history/3"}},
            {"entity": {"reference": "Person/c"}, "inactive": true},
            {"entity": {"reference": "RelatedPerson/d"}, "period": {"end": "2026-11-21"}},
            {"entity": {"reference": "RelatedPerson/e"}, "period": {"end": "2026-11-22"}},
            {"entity": {"reference": "Person/f"}, "period": {"end": "2026-11-22T07:59:00Z"}},
            {"entity": {"reference": "Person/g"}, "period": {"end": "2026-11"}},
            {"entity": {"reference": "Person/h"}, "period": {"end": "2025"}},
            {"entity": {"reference": "Device/x"}},
            {"entity": {"reference": "#contained"}},
            {"entity": {"display": "no reference"}}
        ]});
        let refs: Vec<String> = current_members(&group, now)
            .into_iter()
            .map(|(t, id)| format!("{t}/{id}"))
            .collect();
        assert_eq!(
            refs,
            vec!["Practitioner/a", "Patient/b", "RelatedPerson/e", "Person/g"]
        );
    }

    #[test]
    fn the_link_changes_only_its_identifier() {
        let group = json!({"resourceType": "Group", "name": "N", "identifier": [{"system": "urn:x", "value": "1"}],
            "member": [{"entity": {"reference": "Practitioner/a"}}]});
        let linked = with_group_link(&group, "g-1", None).unwrap();
        assert_eq!(group_link(&linked), Some(("g-1".to_string(), None)));
        assert_eq!(linked["identifier"][0], group["identifier"][0]);
        assert_eq!(linked["member"], group["member"]);
        assert!(with_group_link(&linked, "g-1", None).is_none());
        let hashed = with_group_link(&linked, "g-1", Some("h")).unwrap();
        assert_eq!(
            group_link(&hashed),
            Some(("g-1".to_string(), Some("h".to_string())))
        );
        assert_eq!(hashed["identifier"].as_array().unwrap().len(), 2);
        let bare = with_group_link(&json!({"resourceType": "Group"}), "g-2", Some("h")).unwrap();
        assert_eq!(bare["identifier"][0]["value"], "g-2");
    }

    #[test]
    fn the_synced_name_rides_on_the_link() {
        let group = json!({"resourceType": "Group", "name": "N"});
        let names = LinkNames {
            synced: Some("N"),
            refused: Some("X\\Y"),
        };
        let named = with_named_link(&group, "g-1", None, names).unwrap();
        assert_eq!(synced_name(&named).as_deref(), Some("N"));
        assert_eq!(refused_name(&named).as_deref(), Some("X\\Y"));
        assert!(with_named_link(&named, "g-1", None, names).is_none());
        // A new hash keeps the name; another RapidPro group drops it.
        let hashed = with_group_link(&named, "g-1", Some("h")).unwrap();
        assert_eq!(synced_name(&hashed).as_deref(), Some("N"));
        assert_eq!(refused_name(&hashed).as_deref(), Some("X\\Y"));
        assert_eq!(
            group_link(&hashed),
            Some(("g-1".to_string(), Some("h".to_string())))
        );
        let moved = with_group_link(&hashed, "g-2", Some("h")).unwrap();
        assert_eq!(synced_name(&moved), None);
        assert_eq!(refused_name(&moved), None);
        assert_eq!(with_name(&moved, "M").unwrap()["name"], "M");
        assert!(with_name(&moved, "N").is_none());
    }

    #[test]
    fn names_rapidpro_would_refuse_are_caught_before_sending() {
        assert_eq!(name_problem("Nurses, Bong County"), None);
        assert_eq!(name_problem(&"é".repeat(64)), None);
        assert!(name_problem(&"x".repeat(65)).is_some());
        assert!(name_problem("The \"A\" team").is_some());
        assert!(name_problem("a\\b").is_some());
        assert!(name_problem("a\0b").is_some());
    }

    #[test]
    fn the_hash_depends_on_the_set_only() {
        let a: BTreeSet<String> = ["u2", "u1"].map(String::from).into();
        let b: BTreeSet<String> = ["u1", "u2"].map(String::from).into();
        let c: BTreeSet<String> = ["u1"].map(String::from).into();
        assert_eq!(members_hash(&a), members_hash(&b));
        assert_ne!(members_hash(&a), members_hash(&c));
        assert_ne!(members_hash(&c), members_hash(&BTreeSet::new()));
    }

    #[test]
    fn pulled_members_replace_current_ones_and_keep_the_rest() {
        let key = |t: &str, id: &str| (t.to_string(), id.to_string());
        let group = json!({"resourceType": "Group", "quantity": 3, "member": [
            {"entity": {"reference": "Practitioner/stays"}, "period": {"start": "2024-01-01"}},
            {"entity": {"reference": "Practitioner/leaves"}},
            {"entity": {"reference": "Practitioner/nocontact"}},
            {"entity": {"reference": "Practitioner/old"}, "inactive": true},
            {"entity": {"reference": "Device/d"}}
        ]});
        let keep = BTreeSet::from([key("Practitioner", "nocontact")]);
        let wanted = BTreeSet::from([key("Practitioner", "stays"), key("Patient", "new")]);
        let updated = with_members(&group, &keep, &wanted, "g", "h").unwrap();
        let refs: Vec<&str> = updated["member"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["entity"]["reference"].as_str().unwrap())
            .collect();
        assert_eq!(
            refs,
            vec![
                "Practitioner/stays",
                "Practitioner/nocontact",
                "Practitioner/old",
                "Device/d",
                "Patient/new"
            ]
        );
        assert_eq!(updated["member"][0]["period"]["start"], "2024-01-01");
        assert_eq!(updated["quantity"], 4);
        assert!(
            with_members(&updated, &keep, &wanted, "g", "h").is_none(),
            "nothing to do twice"
        );
    }

    /// RapidPro in memory; `add` fails while `fail_adds` is set, and a
    /// rename is refused (as RapidPro's 400) while `refuse_renames` is.
    #[derive(Default)]
    struct Fake {
        groups: std::sync::Mutex<Vec<RemoteGroup>>,
        members: std::sync::Mutex<HashMap<String, BTreeSet<String>>>,
        fail_adds: std::sync::atomic::AtomicBool,
        refuse_renames: std::sync::atomic::AtomicBool,
        renames: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl GroupDirectory for Fake {
        async fn groups(&self) -> Result<Vec<RemoteGroup>, SyncError> {
            Ok(self.groups.lock().unwrap().clone())
        }
        async fn create_group(&self, name: &str) -> Result<RemoteGroup, SyncError> {
            let mut groups = self.groups.lock().unwrap();
            let group = RemoteGroup {
                uuid: format!("g-{}", groups.len()),
                name: name.to_string(),
                smart: false,
                system: false,
            };
            groups.push(group.clone());
            Ok(group)
        }
        async fn rename_group(
            &self,
            group_uuid: &str,
            name: &str,
        ) -> Result<RemoteGroup, SyncError> {
            self.renames
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self
                .refuse_renames
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return Err(SyncError::Refused(
                    "name: This field must be unique.".into(),
                ));
            }
            let mut groups = self.groups.lock().unwrap();
            let group = groups
                .iter_mut()
                .find(|g| g.uuid == group_uuid)
                .ok_or_else(|| SyncError::RapidPro("404".into()))?;
            group.name = name.to_string();
            Ok(group.clone())
        }
        async fn group_members(&self, group_uuid: &str) -> Result<Vec<String>, SyncError> {
            let members = self.members.lock().unwrap();
            Ok(members
                .get(group_uuid)
                .into_iter()
                .flatten()
                .cloned()
                .collect())
        }
        async fn add_to_group(
            &self,
            group_uuid: &str,
            contacts: &[String],
        ) -> Result<(), SyncError> {
            assert!(contacts.len() <= ACTION_BATCH);
            if self.fail_adds.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(SyncError::RapidPro("503 Service Unavailable".into()));
            }
            let mut members = self.members.lock().unwrap();
            members
                .entry(group_uuid.to_string())
                .or_default()
                .extend(contacts.iter().cloned());
            Ok(())
        }
        async fn remove_from_group(
            &self,
            group_uuid: &str,
            contacts: &[String],
        ) -> Result<(), SyncError> {
            let mut members = self.members.lock().unwrap();
            if let Some(set) = members.get_mut(group_uuid) {
                for c in contacts {
                    set.remove(c);
                }
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_rename_rapidpro_refuses_is_a_conflict_and_members_still_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::sqlite::SqliteStore::open(&dir.path().join("fhir.sqlite"))
            .await
            .unwrap();
        for id in ["a", "b"] {
            let person = json!({"resourceType": "Practitioner", "id": id,
                "identifier": [{"system": CONTACT_UUID_SYSTEM, "value": format!("c-{id}")}]});
            store
                .update("Practitioner", id, person, None)
                .await
                .unwrap();
        }
        let group = json!({"resourceType": "Group", "id": "g", "type": "practitioner", "actual": true, "name": "Team",
            "member": [{"entity": {"reference": "Practitioner/a"}}]});
        store.update("Group", "g", group, None).await.unwrap();
        let fake = Fake::default();
        let sync = GroupSync {
            store: &store,
            directory: &fake,
            source: GroupsSource::Fhir,
        };
        assert_eq!(sync.run_once().await.unwrap().created, 1);
        let mut group = store.read("Group", "g").await.unwrap().resource;
        group["name"] = json!("Team B");
        group["member"] = json!([{"entity": {"reference": "Practitioner/a"}}, {"entity": {"reference": "Practitioner/b"}}]);
        store.update("Group", "g", group, None).await.unwrap();
        fake.refuse_renames
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let refused = sync.run_once().await.unwrap();
        assert!(refused.failures.is_empty(), "{refused:?}");
        assert_eq!(refused.conflicts.len(), 1, "{refused:?}");
        assert!(
            refused.conflicts[0].contains("refused") && refused.conflicts[0].contains("unique"),
            "{refused:?}"
        );
        assert_eq!(refused.updated, 1, "members synced: {refused:?}");
        assert_eq!(fake.members.lock().unwrap()["g-0"].len(), 2);
        assert_eq!(fake.groups.lock().unwrap()[0].name, "Team");
        let stored = store.read("Group", "g").await.unwrap().resource;
        assert_eq!(synced_name(&stored).as_deref(), Some("Team"));
        assert_eq!(refused_name(&stored).as_deref(), Some("Team B"));
        // Still reported, but not sent again while the name is the same.
        fake.refuse_renames
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let again = sync.run_once().await.unwrap();
        assert_eq!(
            (again.unchanged, again.conflicts.len()),
            (1, 1),
            "{again:?}"
        );
        assert_eq!(fake.renames.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Another name: sent, accepted, the refusal forgotten.
        let mut group = store.read("Group", "g").await.unwrap().resource;
        group["name"] = json!("Team C");
        store.update("Group", "g", group, None).await.unwrap();
        let renamed = sync.run_once().await.unwrap();
        assert_eq!(
            (renamed.updated, renamed.conflicts.len()),
            (1, 0),
            "{renamed:?}"
        );
        assert_eq!(fake.groups.lock().unwrap()[0].name, "Team C");
        assert_eq!(fake.renames.load(std::sync::atomic::Ordering::SeqCst), 2);
        let stored = store.read("Group", "g").await.unwrap().resource;
        assert_eq!(refused_name(&stored), None);
        assert_eq!(sync.run_once().await.unwrap().unchanged, 1);
        assert_eq!(fake.renames.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_add_is_retried_on_the_next_pass_and_smart_groups_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::sqlite::SqliteStore::open(&dir.path().join("fhir.sqlite"))
            .await
            .unwrap();
        for id in ["a", "b"] {
            let person = json!({"resourceType": "Practitioner", "id": id,
                "identifier": [{"system": CONTACT_UUID_SYSTEM, "value": format!("c-{id}")}]});
            store
                .update("Practitioner", id, person, None)
                .await
                .unwrap();
        }
        let group = json!({"resourceType": "Group", "id": "g", "type": "practitioner", "actual": true, "name": "Team",
            "member": [{"entity": {"reference": "Practitioner/a"}}, {"entity": {"reference": "Practitioner/b"}}]});
        store.update("Group", "g", group, None).await.unwrap();
        let fake = Fake::default();
        fake.fail_adds
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let sync = GroupSync {
            store: &store,
            directory: &fake,
            source: GroupsSource::Fhir,
        };
        let first = sync.run_once().await.unwrap();
        assert_eq!(first.failures.len(), 1, "{first:?}");
        let linked = store.read("Group", "g").await.unwrap().resource;
        assert_eq!(
            group_link(&linked),
            Some(("g-0".to_string(), None)),
            "linked at creation, no hash recorded"
        );

        fake.fail_adds
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let second = sync.run_once().await.unwrap();
        assert_eq!((second.updated, second.created), (1, 0), "{second:?}");
        assert_eq!(fake.groups.lock().unwrap().len(), 1, "no second group");
        assert_eq!(
            fake.members.lock().unwrap()["g-0"],
            BTreeSet::from(["c-a".to_string(), "c-b".to_string()])
        );
        let third = sync.run_once().await.unwrap();
        assert_eq!(third.unchanged, 1, "{third:?}");

        fake.groups.lock().unwrap().push(RemoteGroup {
            uuid: "smart-1".into(),
            name: "Smart".into(),
            smart: true,
            system: false,
        });
        let smart = json!({"resourceType": "Group", "id": "s", "type": "person", "actual": true, "name": "Smart",
            "identifier": [{"system": GROUP_UUID_SYSTEM, "value": "smart-1"}],
            "member": [{"entity": {"reference": "Practitioner/a"}}]});
        store.update("Group", "s", smart, None).await.unwrap();
        let fourth = sync.run_once().await.unwrap();
        assert_eq!(fourth.conflicts.len(), 1, "{fourth:?}");
        assert!(fourth.conflicts[0].contains("query based"), "{fourth:?}");
        assert!(!fake.members.lock().unwrap().contains_key("smart-1"));
        store.delete("Group", "s", None).await.unwrap();

        // A copy of the link on another Group: both are conflicts, nothing changes.
        let mut copy = store.read("Group", "g").await.unwrap().resource;
        copy["id"] = json!("copy");
        copy["member"] = json!([]);
        store.update("Group", "copy", copy, None).await.unwrap();
        let fifth = sync.run_once().await.unwrap();
        assert_eq!(fifth.conflicts.len(), 2, "{fifth:?}");
        assert_eq!(fake.members.lock().unwrap()["g-0"].len(), 2);
    }

    #[tokio::test]
    async fn members_are_read_in_bulk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Counting::over(
            crate::store::sqlite::SqliteStore::open(&dir.path().join("fhir.sqlite"))
                .await
                .unwrap(),
        );
        let mut members = Vec::new();
        for n in 0..250 {
            let (resource_type, id) = if n % 5 == 0 {
                ("Patient", format!("pa{n}"))
            } else {
                ("Practitioner", format!("pr{n}"))
            };
            let person = json!({"resourceType": resource_type, "id": id,
                "identifier": [{"system": CONTACT_UUID_SYSTEM, "value": format!("c-{n}")}]});
            store
                .update(resource_type, &id, person, None)
                .await
                .unwrap();
            members.push(json!({"entity": {"reference": format!("{resource_type}/{id}")}}));
        }
        let group =
            json!({"resourceType": "Group", "type": "person", "actual": true, "member": members});
        let fake = Fake::default();
        let sync = GroupSync {
            store: &store,
            directory: &fake,
            source: GroupsSource::Fhir,
        };
        let wanted = sync.wanted(&group).await.unwrap();
        assert_eq!(wanted.contacts.len(), 250);
        assert_eq!(store.reads.load(std::sync::atomic::Ordering::SeqCst), 0);
        // 200 Practitioners in 2 searches of 100 ids, 50 Patients in 1.
        assert_eq!(store.searches.load(std::sync::atomic::Ordering::SeqCst), 3);
    }
}
