//! The group sync end to end over real HTTP: people first synced with the
//! contact sync, then FHIR Groups <-> RapidPro groups through the RapidPro
//! client and the in-process sandbox.

use std::collections::BTreeSet;

mod common;

use mhero::config::GroupsSource;
use mhero::jobs::contact_sync::ContactSync;
use mhero::jobs::group_sync::{
    GROUP_UUID_SYSTEM, GroupDirectory, GroupSync, contact_uuid, group_link,
};
use mhero::jobs::rapidpro_directory::RapidProDirectory;
use mhero::pipeline::phone::PhoneNormalizer;
use mhero::rapidpro::sandbox::{SandboxServer, SandboxSettings};
use mhero::rapidpro::types::{ContactAction, ContactActionRequest};
use mhero::store::FhirStore;
use mhero::store::sqlite::SqliteStore;
use serde_json::{Value, json};

/// A store with `count` people synced to a fresh in-process sandbox.
struct World {
    dir: tempfile::TempDir,
    store: SqliteStore,
    sandbox: SandboxServer,
    directory: RapidProDirectory,
}

async fn world(count: usize) -> World {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    people(&store, count).await;
    let sandbox = SandboxServer::start(SandboxSettings::default())
        .await
        .unwrap();
    let directory = RapidProDirectory::new(common::rapidpro_client_for(&sandbox).await);
    sync_contacts(&store, &directory).await;
    World {
        dir,
        store,
        sandbox,
        directory,
    }
}

/// `count` practitioners `hw0..`, each with a valid Liberian mobile, and
/// one `nophone` practitioner without any phone.
async fn people(store: &SqliteStore, count: usize) {
    for n in 0..count {
        let id = format!("hw{n}");
        let p = json!({ "resourceType": "Practitioner", "id": id, "name": [{ "text": format!("Worker {n}") }],
                        "telecom": [{ "system": "phone", "value": format!("0770{:06}", 100_000 + n) }] });
        store.update("Practitioner", &id, p, None).await.unwrap();
    }
    let p = json!({ "resourceType": "Practitioner", "id": "nophone", "name": [{ "text": "No Phone" }] });
    store
        .update("Practitioner", "nophone", p, None)
        .await
        .unwrap();
}

async fn sync_contacts(store: &SqliteStore, directory: &RapidProDirectory) {
    let phones = PhoneNormalizer::new(Some("LR")).unwrap();
    let report = ContactSync {
        store,
        directory,
        phones: &phones,
        page_size: 100,
        progress: indicatif::ProgressBar::hidden(),
    }
    .run_once(false)
    .await
    .unwrap();
    assert!(
        report.failures.is_empty() && report.conflicts.is_empty(),
        "{report:?}"
    );
}

async fn uuid_of(store: &SqliteStore, id: &str) -> String {
    contact_uuid(&store.read("Practitioner", id).await.unwrap().resource).unwrap()
}

fn member(id: &str) -> Value {
    json!({ "entity": { "reference": format!("Practitioner/{id}") } })
}

/// The UUIDs of the live contacts in the RapidPro group `name`.
fn members_in_sandbox(sandbox: &SandboxServer, name: &str) -> BTreeSet<String> {
    sandbox.sandbox().state()["contacts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["deleted"] == false)
        .filter(|c| {
            c["groups"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g["name"] == name)
        })
        .map(|c| c["uuid"].as_str().unwrap().to_string())
        .collect()
}

fn sandbox_groups(sandbox: &SandboxServer) -> Vec<Value> {
    sandbox.sandbox().state()["groups"]
        .as_array()
        .unwrap()
        .clone()
}

/// Contact actions in the call log: (action, number of contacts).
fn group_actions(sandbox: &SandboxServer) -> Vec<(String, usize)> {
    sandbox
        .sandbox()
        .calls()
        .iter()
        .filter(|c| c.path.ends_with("contact_actions.json"))
        .map(|c| {
            (
                c.body["action"].as_str().unwrap().to_string(),
                c.body["contacts"].as_array().unwrap().len(),
            )
        })
        .collect()
}

async fn edit_group(store: &SqliteStore, id: &str, change: impl FnOnce(&mut Value)) {
    let mut group = store.read("Group", id).await.unwrap().resource;
    change(&mut group);
    store.update("Group", id, group, None).await.unwrap();
}

#[tokio::test]
async fn fhir_groups_drive_rapidpro_membership() {
    let World {
        dir: _dir,
        store,
        sandbox,
        directory,
    } = world(5).await;
    let uuids = [
        uuid_of(&store, "hw0").await,
        uuid_of(&store, "hw1").await,
        uuid_of(&store, "hw2").await,
    ];

    let group = json!({ "resourceType": "Group", "id": "nurses", "type": "practitioner", "actual": true,
        "name": "Nurses", "identifier": [{ "system": "urn:ihris:group", "value": "n-1" }],
        "member": [member("hw0"), member("hw1"), member("hw2"),
            { "entity": { "reference": "Practitioner/hw3" }, "inactive": true },
            { "entity": { "reference": "Practitioner/hw4" }, "period": { "end": "2020-01-01" } }] });
    store.update("Group", "nurses", group, None).await.unwrap();
    let not_synced = json!({ "resourceType": "Group", "id": "roster", "type": "practitioner", "actual": false,
        "name": "Roster", "member": [member("hw0")] });
    store
        .update("Group", "roster", not_synced, None)
        .await
        .unwrap();

    let sync = GroupSync {
        store: &store,
        directory: &directory,
        source: GroupsSource::Fhir,
    };
    sandbox.sandbox().clear_calls();
    let first = sync.run_once().await.unwrap();
    assert_eq!((first.created, first.ignored), (1, 1), "{first:?}");
    assert!(
        first.failures.is_empty() && first.conflicts.is_empty(),
        "{first:?}"
    );
    let groups = sandbox_groups(&sandbox);
    assert_eq!(
        groups.len(),
        1,
        "only the actual Group is synced: {groups:?}"
    );
    assert_eq!(groups[0]["name"], "Nurses");
    assert_eq!(
        members_in_sandbox(&sandbox, "Nurses"),
        uuids.iter().cloned().collect::<BTreeSet<_>>(),
        "inactive and ended members are left out"
    );
    assert_eq!(group_actions(&sandbox), vec![("add".to_string(), 3)]);
    // The link is written back, and nothing else in the Group changed.
    let stored = store.read("Group", "nurses").await.unwrap().resource;
    let (linked, hash) = group_link(&stored).unwrap();
    assert_eq!(linked, groups[0]["uuid"].as_str().unwrap());
    assert!(hash.is_some());
    assert_eq!(stored["identifier"][0]["system"], "urn:ihris:group");
    assert_eq!(stored["member"].as_array().unwrap().len(), 5);

    // Unchanged: no RapidPro call at all.
    sandbox.sandbox().clear_calls();
    let second = sync.run_once().await.unwrap();
    assert_eq!(second.unchanged, 1, "{second:?}");
    assert_eq!(sandbox.sandbox().calls().len(), 0, "no call when unchanged");

    // A member removed in FHIR leaves the RapidPro group.
    edit_group(&store, "nurses", |g| {
        g["member"].as_array_mut().unwrap().remove(1);
    })
    .await;
    sandbox.sandbox().clear_calls();
    let third = sync.run_once().await.unwrap();
    assert_eq!(third.updated, 1, "{third:?}");
    assert_eq!(group_actions(&sandbox), vec![("remove".to_string(), 1)]);
    assert_eq!(
        members_in_sandbox(&sandbox, "Nurses"),
        BTreeSet::from([uuids[0].clone(), uuids[2].clone()])
    );

    // A member without a RapidPro contact is reported, not an error.
    edit_group(&store, "nurses", |g| {
        g["member"].as_array_mut().unwrap().push(member("nophone"));
    })
    .await;
    sandbox.sandbox().clear_calls();
    let fourth = sync.run_once().await.unwrap();
    assert_eq!(
        (fourth.not_yet_synced, fourth.unchanged),
        (1, 1),
        "{fourth:?}"
    );
    assert!(fourth.failures.is_empty(), "{fourth:?}");
    assert!(group_actions(&sandbox).is_empty());

    // A second Group with the same name (case-insensitively) is a conflict.
    let twin = json!({ "resourceType": "Group", "id": "nurses-2", "type": "person", "actual": true,
        "name": "NURSES", "member": [member("hw3")] });
    store.update("Group", "nurses-2", twin, None).await.unwrap();
    let fifth = sync.run_once().await.unwrap();
    assert_eq!(fifth.conflicts.len(), 1, "{fifth:?}");
    assert!(fifth.conflicts[0].contains("Group/nurses-2"), "{fifth:?}");
    assert_eq!(sandbox_groups(&sandbox).len(), 1);
    store.delete("Group", "nurses-2", None).await.unwrap();

    // Deactivated: the RapidPro group is emptied and kept.
    edit_group(&store, "nurses", |g| g["active"] = json!(false)).await;
    sandbox.sandbox().clear_calls();
    let sixth = sync.run_once().await.unwrap();
    assert_eq!(sixth.emptied, 1, "{sixth:?}");
    assert_eq!(group_actions(&sandbox), vec![("remove".to_string(), 2)]);
    assert!(members_in_sandbox(&sandbox, "Nurses").is_empty());
    assert_eq!(sandbox_groups(&sandbox).len(), 1, "the group is kept");
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_deleted_group_empties_its_rapidpro_group() {
    let World {
        dir: _dir,
        store,
        sandbox,
        directory,
    } = world(2).await;
    let group = json!({ "resourceType": "Group", "id": "cht", "type": "person", "actual": true,
        "name": "CHWs", "member": [member("hw0"), member("hw1")] });
    store.update("Group", "cht", group, None).await.unwrap();
    let sync = GroupSync {
        store: &store,
        directory: &directory,
        source: GroupsSource::Fhir,
    };
    let first = sync.run_once().await.unwrap();
    assert_eq!(first.created, 1, "{first:?}");
    assert_eq!(members_in_sandbox(&sandbox, "CHWs").len(), 2);

    store.delete("Group", "cht", None).await.unwrap();
    sandbox.sandbox().clear_calls();
    let second = sync.run_once().await.unwrap();
    assert_eq!(second.emptied, 1, "{second:?}");
    assert!(members_in_sandbox(&sandbox, "CHWs").is_empty());
    assert_eq!(sandbox_groups(&sandbox).len(), 1, "the group is kept");
    assert_eq!(group_actions(&sandbox), vec![("remove".to_string(), 2)]);

    // The deletion is behind the cursor now.
    sandbox.sandbox().clear_calls();
    let third = sync.run_once().await.unwrap();
    assert_eq!(third, Default::default());
    assert_eq!(sandbox.sandbox().calls().len(), 0);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn membership_goes_to_rapidpro_in_batches_of_100() {
    let World {
        dir: _dir,
        store,
        sandbox,
        directory,
    } = world(250).await;
    let members: Vec<Value> = (0..250).map(|n| member(&format!("hw{n}"))).collect();
    let group = json!({ "resourceType": "Group", "id": "all", "type": "practitioner", "actual": true,
        "name": "Everyone", "member": members });
    store.update("Group", "all", group, None).await.unwrap();
    sandbox.sandbox().clear_calls();
    let report = GroupSync {
        store: &store,
        directory: &directory,
        source: GroupsSource::Fhir,
    }
    .run_once()
    .await
    .unwrap();
    assert_eq!(report.created, 1, "{report:?}");
    assert_eq!(
        group_actions(&sandbox),
        vec![
            ("add".to_string(), 100),
            ("add".to_string(), 100),
            ("add".to_string(), 50)
        ]
    );
    assert_eq!(members_in_sandbox(&sandbox, "Everyone").len(), 250);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn rapidpro_groups_drive_fhir_membership() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    people(&store, 3).await;
    let sandbox = SandboxServer::start(SandboxSettings::default())
        .await
        .unwrap();
    let client = common::rapidpro_client_for(&sandbox).await;
    let directory = RapidProDirectory::new(client.clone());
    sync_contacts(&store, &directory).await;
    let uuids = [
        uuid_of(&store, "hw0").await,
        uuid_of(&store, "hw1").await,
        uuid_of(&store, "hw2").await,
    ];
    // Made in RapidPro by an operator: two of our people and a stranger.
    let group = client.create_group("Midwives").await.unwrap();
    let stranger = client
        .create_contact(&mhero::rapidpro::types::ContactWrite {
            name: Some("Stranger".into()),
            urns: Some(vec!["tel:+231770999999".into()]),
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .contact_actions(&ContactActionRequest {
            contacts: vec![uuids[0].clone(), uuids[1].clone(), stranger.uuid.clone()],
            action: ContactAction::Add,
            group: Some(group.uuid.clone()),
        })
        .await
        .unwrap();

    let sync = GroupSync {
        store: &store,
        directory: &directory,
        source: GroupsSource::Rapidpro,
    };
    let first = sync.run_once().await.unwrap();
    assert_eq!((first.created, first.not_yet_synced), (1, 1), "{first:?}");
    let found = store
        .search(mhero::store::SearchRequest {
            resource_type: "Group".into(),
            params: vec![(
                "identifier".into(),
                format!("{GROUP_UUID_SYSTEM}|{}", group.uuid),
            )],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(found.matches.len(), 1);
    let fhir_group = &found.matches[0];
    assert_eq!(fhir_group.resource["name"], "Midwives");
    assert_eq!(fhir_group.resource["actual"], true);
    let refs = |g: &Value| -> BTreeSet<String> {
        g["member"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| m["entity"]["reference"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        refs(&fhir_group.resource),
        BTreeSet::from([
            "Practitioner/hw0".to_string(),
            "Practitioner/hw1".to_string()
        ])
    );

    // Unchanged: no FHIR write.
    let second = sync.run_once().await.unwrap();
    assert_eq!(second.unchanged, 1, "{second:?}");
    let again = store.read("Group", &fhir_group.id).await.unwrap();
    assert_eq!(again.version_id, fhir_group.version_id);

    // Membership changes in RapidPro follow into FHIR.
    for (action, contact) in [
        (ContactAction::Remove, &uuids[0]),
        (ContactAction::Add, &uuids[2]),
    ] {
        client
            .contact_actions(&ContactActionRequest {
                contacts: vec![contact.clone()],
                action,
                group: Some(group.uuid.clone()),
            })
            .await
            .unwrap();
    }
    let third = sync.run_once().await.unwrap();
    assert_eq!(third.updated, 1, "{third:?}");
    let after = store.read("Group", &fhir_group.id).await.unwrap();
    assert_eq!(
        refs(&after.resource),
        BTreeSet::from([
            "Practitioner/hw1".to_string(),
            "Practitioner/hw2".to_string()
        ])
    );

    // The stranger becomes a FHIR person later: the next pass adds them,
    // although the RapidPro group did not change.
    let person = json!({ "resourceType": "Person", "id": "stranger", "name": [{ "text": "Stranger" }],
        "identifier": [{ "system": "http://app.rapidpro.io/contact-uuid", "value": stranger.uuid }] });
    store
        .update("Person", "stranger", person, None)
        .await
        .unwrap();
    let fourth = sync.run_once().await.unwrap();
    assert_eq!(
        (fourth.updated, fourth.not_yet_synced),
        (1, 0),
        "{fourth:?}"
    );
    let last = store.read("Group", &fhir_group.id).await.unwrap();
    assert!(refs(&last.resource).contains("Person/stranger"));
    let fifth = sync.run_once().await.unwrap();
    assert_eq!(fifth.unchanged, 1, "{fifth:?}");
    assert_eq!(
        store
            .read("Group", &fhir_group.id)
            .await
            .unwrap()
            .version_id,
        last.version_id,
        "no write once everyone is found"
    );
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_deleted_group_taken_over_by_another_is_not_emptied() {
    let World {
        dir: _dir,
        store,
        sandbox,
        directory,
    } = world(3).await;
    let old = json!({ "resourceType": "Group", "id": "old", "type": "person", "actual": true,
        "name": "Vaccinators", "member": [member("hw0"), member("hw1")] });
    store.update("Group", "old", old, None).await.unwrap();
    let sync = GroupSync {
        store: &store,
        directory: &directory,
        source: GroupsSource::Fhir,
    };
    assert_eq!(sync.run_once().await.unwrap().created, 1);
    let (uuid, _) = group_link(&store.read("Group", "old").await.unwrap().resource).unwrap();

    // The Group is replaced by a new one that an operator linked to the
    // same RapidPro group.
    store.delete("Group", "old", None).await.unwrap();
    let new = json!({ "resourceType": "Group", "id": "new", "type": "person", "actual": true,
        "name": "Vaccinators", "identifier": [{ "system": GROUP_UUID_SYSTEM, "value": uuid }],
        "member": [member("hw1"), member("hw2")] });
    store.update("Group", "new", new, None).await.unwrap();
    let report = sync.run_once().await.unwrap();
    assert_eq!((report.updated, report.emptied), (1, 0), "{report:?}");
    assert_eq!(
        members_in_sandbox(&sandbox, "Vaccinators"),
        BTreeSet::from([uuid_of(&store, "hw1").await, uuid_of(&store, "hw2").await])
    );
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn members_that_may_not_be_messaged_are_left_out() {
    let World {
        dir: _dir,
        store,
        sandbox,
        directory,
    } = world(2).await;
    // hw1 is deactivated: the contact sync blocks its contact, and
    // RapidPro refuses to add a blocked contact to a group.
    let mut inactive = store.read("Practitioner", "hw1").await.unwrap().resource;
    inactive["active"] = json!(false);
    store
        .update("Practitioner", "hw1", inactive, None)
        .await
        .unwrap();
    sync_contacts(&store, &directory).await;
    let group = json!({ "resourceType": "Group", "id": "g", "type": "practitioner", "actual": true,
        "name": "Supervisors", "member": [member("hw0"), member("hw1")] });
    store.update("Group", "g", group, None).await.unwrap();
    let report = GroupSync {
        store: &store,
        directory: &directory,
        source: GroupsSource::Fhir,
    }
    .run_once()
    .await
    .unwrap();
    assert!(report.failures.is_empty(), "{report:?}");
    assert_eq!(
        (report.created, report.not_messageable),
        (1, 1),
        "{report:?}"
    );
    assert_eq!(
        members_in_sandbox(&sandbox, "Supervisors"),
        BTreeSet::from([uuid_of(&store, "hw0").await])
    );
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn reconcile_undoes_a_change_made_by_hand_in_rapidpro() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    people(&store, 2).await;
    let sandbox = SandboxServer::start(SandboxSettings::default())
        .await
        .unwrap();
    let client = common::rapidpro_client_for(&sandbox).await;
    let directory = RapidProDirectory::new(client.clone());
    sync_contacts(&store, &directory).await;
    let group = json!({ "resourceType": "Group", "id": "g", "type": "practitioner", "actual": true,
        "name": "Lab", "member": [member("hw0"), member("hw1")] });
    store.update("Group", "g", group, None).await.unwrap();
    let sync = GroupSync {
        store: &store,
        directory: &directory,
        source: GroupsSource::Fhir,
    };
    assert_eq!(sync.run_once().await.unwrap().created, 1);
    let hw0 = uuid_of(&store, "hw0").await;
    client
        .contact_actions(&ContactActionRequest {
            contacts: vec![hw0.clone()],
            action: ContactAction::Remove,
            group: Some("Lab".into()),
        })
        .await
        .unwrap();
    // A normal pass trusts the recorded hash: no call.
    sandbox.sandbox().clear_calls();
    assert_eq!(sync.run_once().await.unwrap().unchanged, 1);
    assert!(sandbox.sandbox().calls().is_empty());
    assert!(!members_in_sandbox(&sandbox, "Lab").contains(&hw0));
    // A reconcile pass looks and puts the member back.
    let report = sync.reconcile().await.unwrap();
    assert_eq!(report.updated, 1, "{report:?}");
    assert_eq!(group_actions(&sandbox), vec![("add".to_string(), 1)]);
    assert!(members_in_sandbox(&sandbox, "Lab").contains(&hw0));
    sandbox.shutdown().await.unwrap();
}

/// POSTs to `groups.json` with `?uuid=` (renames) in the call log.
fn renames(sandbox: &SandboxServer) -> Vec<Value> {
    sandbox
        .sandbox()
        .calls()
        .iter()
        .filter(|c| c.method == "POST" && c.path.ends_with("groups.json"))
        .filter(|c| c.query.as_deref().is_some_and(|q| q.contains("uuid=")))
        .map(|c| c.body.clone())
        .collect()
}

#[tokio::test]
async fn renaming_a_fhir_group_renames_its_rapidpro_group() {
    let World {
        dir: _dir,
        store,
        sandbox,
        directory,
    } = world(2).await;
    let group = json!({ "resourceType": "Group", "id": "g", "type": "practitioner", "actual": true,
        "name": "Nurses", "member": [member("hw0")] });
    store.update("Group", "g", group, None).await.unwrap();
    let sync = GroupSync {
        store: &store,
        directory: &directory,
        source: GroupsSource::Fhir,
    };
    assert_eq!(sync.run_once().await.unwrap().created, 1);
    let uuid = group_link(&store.read("Group", "g").await.unwrap().resource)
        .unwrap()
        .0;
    // An operator's group, whose name the FHIR Group will try to take.
    let doctors = directory.create_group("Doctors").await.unwrap();

    // Same name: no call at all.
    sandbox.sandbox().clear_calls();
    assert_eq!(sync.run_once().await.unwrap().unchanged, 1);
    assert!(sandbox.sandbox().calls().is_empty());

    // Renamed in FHIR: one rename call, same RapidPro group, members kept.
    edit_group(&store, "g", |g| g["name"] = json!("Senior Nurses")).await;
    sandbox.sandbox().clear_calls();
    let renamed = sync.run_once().await.unwrap();
    assert_eq!(renamed.updated, 1, "{renamed:?}");
    assert!(
        renamed.conflicts.is_empty() && renamed.failures.is_empty(),
        "{renamed:?}"
    );
    assert_eq!(renames(&sandbox), vec![json!({"name": "Senior Nurses"})]);
    assert!(group_actions(&sandbox).is_empty(), "membership unchanged");
    let groups = sandbox_groups(&sandbox);
    let ours = groups.iter().find(|g| g["uuid"] == uuid.as_str()).unwrap();
    assert_eq!(ours["name"], "Senior Nurses");
    assert_eq!(groups.len(), 2, "no new group: {groups:?}");
    assert_eq!(
        members_in_sandbox(&sandbox, "Senior Nurses"),
        BTreeSet::from([uuid_of(&store, "hw0").await])
    );
    sandbox.sandbox().clear_calls();
    assert_eq!(sync.run_once().await.unwrap().unchanged, 1);
    assert!(sandbox.sandbox().calls().is_empty(), "renamed once only");

    // A name another RapidPro group has (case-insensitively) is reported,
    // not sent, on every pass; members are still synced.
    edit_group(&store, "g", |g| {
        g["name"] = json!("doctors");
        g["member"] = json!([member("hw0"), member("hw1")]);
    })
    .await;
    sandbox.sandbox().clear_calls();
    for pass in 0..2 {
        let refused = sync.run_once().await.unwrap();
        assert_eq!(refused.conflicts.len(), 1, "pass {pass}: {refused:?}");
        assert!(
            refused.conflicts[0].contains("\"doctors\"")
                && refused.conflicts[0].contains(&doctors.uuid),
            "{refused:?}"
        );
        assert!(refused.failures.is_empty(), "{refused:?}");
        assert!(renames(&sandbox).is_empty(), "pass {pass}: no rename call");
    }
    assert_eq!(group_actions(&sandbox), vec![("add".to_string(), 1)]);
    assert_eq!(members_in_sandbox(&sandbox, "Senior Nurses").len(), 2);

    // RapidPro's own refusal (400) comes back as `Refused`, not as a
    // transient error.
    let err = directory.rename_group(&uuid, "DOCTORS").await.unwrap_err();
    assert!(
        matches!(&err, mhero::jobs::contact_sync::SyncError::Refused(m) if m.contains("unique")),
        "{err:?}"
    );
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn renaming_a_rapidpro_group_renames_its_fhir_group() {
    let World {
        dir: _dir,
        store,
        sandbox,
        directory,
    } = world(1).await;
    let made = directory.create_group("Midwives").await.unwrap();
    directory
        .add_to_group(&made.uuid, &[uuid_of(&store, "hw0").await])
        .await
        .unwrap();
    let sync = GroupSync {
        store: &store,
        directory: &directory,
        source: GroupsSource::Rapidpro,
    };
    assert_eq!(sync.run_once().await.unwrap().created, 1);
    let found = store
        .search(mhero::store::SearchRequest {
            resource_type: "Group".into(),
            params: vec![(
                "identifier".into(),
                format!("{GROUP_UUID_SYSTEM}|{}", made.uuid),
            )],
            ..Default::default()
        })
        .await
        .unwrap();
    let id = found.matches[0].id.clone();
    let before = store.read("Group", &id).await.unwrap();
    assert_eq!(before.resource["name"], "Midwives");

    directory
        .rename_group(&made.uuid, "Senior Midwives")
        .await
        .unwrap();
    let report = sync.run_once().await.unwrap();
    assert_eq!(report.updated, 1, "{report:?}");
    let after = store.read("Group", &id).await.unwrap();
    assert_eq!(after.resource["name"], "Senior Midwives");
    assert_eq!(after.resource["member"], before.resource["member"]);
    let again = sync.run_once().await.unwrap();
    assert_eq!(again.unchanged, 1, "{again:?}");
    assert_eq!(
        store.read("Group", &id).await.unwrap().version_id,
        after.version_id,
        "no write once the names agree"
    );
    sandbox.shutdown().await.unwrap();
}
