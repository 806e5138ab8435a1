//! The FHIR -> RapidPro contact sync pass against an in-memory directory
//! that counts calls: creates, zero calls for unchanged people, URN
//! replacement on a phone change, block on deactivation, conflicts.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use mhero::jobs::contact_sync::{ContactDirectory, ContactSync, RemoteContact, SyncError};
use mhero::pipeline::contact::ContactDraft;
use mhero::pipeline::phone::PhoneNormalizer;
use mhero::store::FhirStore;
use mhero::store::sqlite::SqliteStore;
use serde_json::{Value, json};

/// uuid -> (urns, globalid, blocked)
type Contacts = HashMap<String, (Vec<String>, Option<String>, bool)>;

#[derive(Default)]
struct FakeDirectory {
    contacts: Mutex<Contacts>,
    calls: Mutex<Vec<String>>,
}

impl FakeDirectory {
    fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
    fn remote(&self, uuid: &str, entry: &(Vec<String>, Option<String>, bool)) -> RemoteContact {
        RemoteContact {
            uuid: uuid.to_string(),
            urns: entry.0.clone(),
            global_id: entry.1.clone(),
            blocked: entry.2,
        }
    }
}

#[async_trait]
impl ContactDirectory for FakeDirectory {
    async fn find_by_uuid(&self, uuid: &str) -> Result<Option<RemoteContact>, SyncError> {
        self.calls.lock().unwrap().push(format!("get uuid {uuid}"));
        Ok(self
            .contacts
            .lock()
            .unwrap()
            .get(uuid)
            .map(|entry| self.remote(uuid, entry)))
    }
    async fn find_by_urn(&self, urn: &str) -> Result<Option<RemoteContact>, SyncError> {
        self.calls.lock().unwrap().push(format!("get urn {urn}"));
        let contacts = self.contacts.lock().unwrap();
        Ok(contacts
            .iter()
            .find(|(_, (u, _, _))| u.iter().any(|x| x == urn))
            .map(|(id, entry)| self.remote(id, entry)))
    }
    async fn create(&self, draft: &ContactDraft) -> Result<RemoteContact, SyncError> {
        self.calls.lock().unwrap().push("create".into());
        let mut contacts = self.contacts.lock().unwrap();
        // As in RapidPro: a create with a URN someone has is a 400.
        if contacts
            .values()
            .any(|c| c.0.iter().any(|u| draft.urns.contains(u)))
        {
            return Err(SyncError::UrnTaken);
        }
        let uuid = uuid::Uuid::new_v4().to_string();
        let entry = (draft.urns.clone(), Some(draft.global_id.clone()), false);
        contacts.insert(uuid.clone(), entry.clone());
        Ok(self.remote(&uuid, &entry))
    }
    async fn update(&self, uuid: &str, draft: &ContactDraft) -> Result<RemoteContact, SyncError> {
        self.calls.lock().unwrap().push(format!("update {uuid}"));
        let mut contacts = self.contacts.lock().unwrap();
        let Some(existing) = contacts.get(uuid) else {
            return Err(SyncError::ContactNotFound);
        };
        // As in RapidPro: an update does not unblock, and silently skips
        // URNs that another contact has.
        let blocked = existing.2;
        let urns: Vec<String> = draft
            .urns
            .iter()
            .filter(|u| {
                !contacts
                    .iter()
                    .any(|(other, c)| other != uuid && c.0.contains(u))
            })
            .cloned()
            .collect();
        let entry = (urns, Some(draft.global_id.clone()), blocked);
        contacts.insert(uuid.to_string(), entry.clone());
        Ok(self.remote(uuid, &entry))
    }
    async fn block(&self, uuid: &str) -> Result<(), SyncError> {
        self.calls.lock().unwrap().push(format!("block {uuid}"));
        if let Some(c) = self.contacts.lock().unwrap().get_mut(uuid) {
            c.2 = true;
        }
        Ok(())
    }
    async fn unblock(&self, uuid: &str) -> Result<(), SyncError> {
        self.calls.lock().unwrap().push(format!("unblock {uuid}"));
        if let Some(c) = self.contacts.lock().unwrap().get_mut(uuid) {
            c.2 = false;
        }
        Ok(())
    }
}

fn pass_over<'a>(
    store: &'a SqliteStore,
    directory: &'a FakeDirectory,
    phones: &'a PhoneNormalizer,
    page_size: usize,
) -> ContactSync<'a> {
    ContactSync {
        store,
        directory,
        phones,
        page_size,
        progress: indicatif::ProgressBar::hidden(),
    }
}

fn person(id: &str, phone: Option<&str>) -> Value {
    let mut p = json!({ "resourceType": "Practitioner", "id": id, "active": true, "name": [{ "text": format!("Worker {id}") }] });
    if let Some(phone) = phone {
        p["telecom"] = json!([{ "system": "phone", "value": phone }]);
    }
    p
}

#[tokio::test]
async fn sync_creates_then_costs_nothing_then_follows_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    for (id, phone) in [
        ("a", Some("0770123456")),
        ("b", Some("0886123456")),
        ("c", None),
        ("d", Some("111-111-1111")),
    ] {
        store
            .update("Practitioner", id, person(id, phone), None)
            .await
            .unwrap();
    }
    let directory = FakeDirectory::default();
    let phones = PhoneNormalizer::new(Some("LR")).unwrap();
    let sync = pass_over(&store, &directory, &phones, 2);

    let first = sync.run_once(false).await.unwrap();
    assert_eq!(first.created, 2, "{first:?}");
    assert_eq!(
        first.no_phone, 2,
        "no phone, and an invalid placeholder phone: {first:?}"
    );
    assert!(
        first.failures.is_empty() && first.conflicts.is_empty(),
        "{first:?}"
    );
    let a = store.read("Practitioner", "a").await.unwrap();
    let uuid_a = a.resource["identifier"][0]["value"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        a.resource["telecom"][0]["value"], "0770123456",
        "the source's phone is untouched"
    );

    let calls_before = directory.calls();
    let second = sync.run_once(true).await.unwrap();
    assert_eq!(second.created + second.updated, 0, "{second:?}");
    assert_eq!(second.unchanged, 2, "{second:?}");
    assert_eq!(
        directory.calls(),
        calls_before,
        "unchanged people cost zero RapidPro calls"
    );

    // A new phone replaces the old URN on the same contact.
    let mut changed = a.resource.clone();
    changed["telecom"] = json!([{ "system": "phone", "value": "0555 123 456" }]);
    store
        .update("Practitioner", "a", changed, None)
        .await
        .unwrap();
    let third = sync.run_once(false).await.unwrap();
    assert_eq!(third.updated, 1, "{third:?}");
    let contacts = directory.contacts.lock().unwrap().clone();
    assert_eq!(
        contacts[&uuid_a].0,
        vec!["tel:+231555123456"],
        "old URN replaced, not added"
    );

    // Deactivation blocks the contact.
    let mut inactive = store.read("Practitioner", "a").await.unwrap().resource;
    inactive["active"] = json!(false);
    store
        .update("Practitioner", "a", inactive, None)
        .await
        .unwrap();
    let fourth = sync.run_once(false).await.unwrap();
    assert_eq!(fourth.blocked, 1, "{fourth:?}");
    assert!(
        directory.contacts.lock().unwrap()[&uuid_a].2,
        "blocked in RapidPro"
    );
}

#[tokio::test]
async fn a_urn_owned_by_someone_else_is_a_reported_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    store
        .update(
            "Practitioner",
            "new",
            person("new", Some("0770123456")),
            None,
        )
        .await
        .unwrap();
    let directory = FakeDirectory::default();
    directory.contacts.lock().unwrap().insert(
        "owner-uuid".into(),
        (
            vec!["tel:+231770123456".into()],
            Some("someone-else".into()),
            false,
        ),
    );
    let phones = PhoneNormalizer::new(Some("LR")).unwrap();
    let sync = pass_over(&store, &directory, &phones, 50);
    let report = sync.run_once(false).await.unwrap();
    assert_eq!(report.conflicts.len(), 1, "{report:?}");
    assert!(
        report.conflicts[0].contains("owner-uuid") && report.conflicts[0].contains("someone-else")
    );
    assert_eq!(report.created + report.updated, 0);
    let unchanged = store.read("Practitioner", "new").await.unwrap();
    assert_eq!(
        unchanged.version_id, "1",
        "nothing written back on a conflict"
    );
    assert_eq!(
        directory.contacts.lock().unwrap()["owner-uuid"]
            .1
            .as_deref(),
        Some("someone-else"),
        "not stolen"
    );
}

#[tokio::test]
async fn an_operators_block_is_never_undone() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    let mut p = person("kept", Some("0770123456"));
    p["identifier"] =
        json!([{ "system": "http://app.rapidpro.io/contact-uuid", "value": "op-blocked" }]);
    store.update("Practitioner", "kept", p, None).await.unwrap();
    let directory = FakeDirectory::default();
    directory.contacts.lock().unwrap().insert(
        "op-blocked".into(),
        (vec!["tel:+231770123456".into()], Some("kept".into()), true),
    );
    let phones = PhoneNormalizer::new(Some("LR")).unwrap();
    let sync = pass_over(&store, &directory, &phones, 50);
    let report = sync.run_once(false).await.unwrap();
    assert_eq!(report.updated, 1, "{report:?}");
    assert!(
        directory.contacts.lock().unwrap()["op-blocked"].2,
        "still blocked"
    );
    assert!(
        !directory
            .calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.starts_with("unblock"))
    );
}

#[tokio::test]
async fn a_deleted_person_has_the_contact_blocked_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    store
        .update(
            "Practitioner",
            "gone",
            person("gone", Some("0770123456")),
            None,
        )
        .await
        .unwrap();
    let directory = FakeDirectory::default();
    let phones = PhoneNormalizer::new(Some("LR")).unwrap();
    let sync = pass_over(&store, &directory, &phones, 50);
    assert_eq!(sync.run_once(false).await.unwrap().created, 1);
    let uuid = directory
        .contacts
        .lock()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    store.delete("Practitioner", "gone", None).await.unwrap();
    let report = sync.run_once(false).await.unwrap();
    assert_eq!(report.blocked, 1, "{report:?}");
    assert!(
        directory.contacts.lock().unwrap()[&uuid].2,
        "blocked in RapidPro"
    );
    let again = sync.run_once(false).await.unwrap();
    assert_eq!(again.blocked, 0, "a delete is handled once: {again:?}");
}

#[tokio::test]
async fn invalid_phones_are_recorded_beside_the_person_and_cleared_when_fixed() {
    use mhero::jobs::sync_status::status_id;
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    store
        .update(
            "Practitioner",
            "p1",
            person("p1", Some("111-111-1111")),
            None,
        )
        .await
        .unwrap();
    let directory = FakeDirectory::default();
    let phones = PhoneNormalizer::new(Some("LR")).unwrap();
    let sync = pass_over(&store, &directory, &phones, 50);
    assert_eq!(sync.run_once(false).await.unwrap().no_phone, 1);
    let status = store
        .read("Basic", &status_id("Practitioner", "p1"))
        .await
        .unwrap()
        .resource;
    assert_eq!(status["subject"]["reference"], "Practitioner/p1");
    let text = status.to_string();
    assert!(
        text.contains("not a valid number") || text.contains("cannot be read"),
        "{text}"
    );
    assert!(
        !text.contains("111-111-1111"),
        "no whole number in the status"
    );
    assert_eq!(
        store.read("Practitioner", "p1").await.unwrap().version_id,
        "1",
        "the person itself is untouched"
    );

    let mut fixed = store.read("Practitioner", "p1").await.unwrap().resource;
    fixed["telecom"] = json!([{ "system": "phone", "value": "0770123456" }]);
    store
        .update("Practitioner", "p1", fixed, None)
        .await
        .unwrap();
    assert_eq!(sync.run_once(false).await.unwrap().created, 1);
    assert!(
        store
            .read("Basic", &status_id("Practitioner", "p1"))
            .await
            .is_err(),
        "cleared once the phone is fixed"
    );
}

#[tokio::test]
async fn one_call_per_new_or_changed_person_and_lookups_only_when_needed() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    store
        .update("Practitioner", "a", person("a", Some("0770123456")), None)
        .await
        .unwrap();
    let directory = FakeDirectory::default();
    // Someone else's contact, and a contact made in RapidPro by hand (no globalid).
    directory.contacts.lock().unwrap().insert(
        "theirs".into(),
        (
            vec!["tel:+231886123456".into()],
            Some("other".into()),
            false,
        ),
    );
    directory.contacts.lock().unwrap().insert(
        "by-hand".into(),
        (vec!["tel:+231555123456".into()], None, false),
    );
    store
        .update("Practitioner", "b", person("b", Some("0555123456")), None)
        .await
        .unwrap();
    let phones = PhoneNormalizer::new(Some("LR")).unwrap();
    let sync = pass_over(&store, &directory, &phones, 50);

    let first = sync.run_once(false).await.unwrap();
    assert_eq!((first.created, first.updated), (1, 1), "{first:?}");
    let calls = directory.calls.lock().unwrap().clone();
    assert_eq!(
        calls.iter().filter(|c| c.starts_with("get")).count(),
        1,
        "one lookup, for the refused create: {calls:?}"
    );
    assert!(
        calls.contains(&"update by-hand".to_string()),
        "the hand-made contact is adopted: {calls:?}"
    );

    // A new phone that another contact has: RapidPro skips it on update; reported.
    directory.calls.lock().unwrap().clear();
    let mut a = store.read("Practitioner", "a").await.unwrap().resource;
    a["telecom"] = json!([{ "system": "phone", "value": "0886123456" }]);
    store.update("Practitioner", "a", a, None).await.unwrap();
    let second = sync.run_once(false).await.unwrap();
    assert_eq!(second.conflicts.len(), 1, "{second:?}");
    assert!(
        second.conflicts[0].contains("another contact has it"),
        "{second:?}"
    );
    let calls = directory.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "a changed person costs one call: {calls:?}");
    assert_eq!(
        directory.contacts.lock().unwrap()["theirs"].1.as_deref(),
        Some("other"),
        "not stolen"
    );

    // A contact deleted in RapidPro is made again.
    let uuid_b = store.read("Practitioner", "b").await.unwrap().resource["identifier"][0]["value"]
        .as_str()
        .unwrap()
        .to_string();
    directory.contacts.lock().unwrap().remove(&uuid_b);
    let mut b = store.read("Practitioner", "b").await.unwrap().resource;
    b["name"] = json!([{ "text": "Renamed" }]);
    store.update("Practitioner", "b", b, None).await.unwrap();
    let third = sync.run_once(false).await.unwrap();
    assert_eq!(third.created, 1, "{third:?}");
}
