//! The contact index (tantivy) on the iHRIS demo data: the location
//! hierarchy, cadre through the job CodeSystem, names folded for accents and
//! case, phone digits, opt-out, statistics; the follower (`IndexSync`)
//! seeing updates and deletes of people, roles, places, groups, messages
//! and the job terminology; a full rebuild equal to the followed updates;
//! and a crash before the follower's commit.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use mhero::index::tantivy::TantivyIndex;
use mhero::index::{ContactIndex, ContactQuery, SharedIndex, StatsBy};
use mhero::jobs::index_sync::{IndexSync, IndexSyncReport};
use mhero::pipeline::phone::PhoneNormalizer;
use mhero::store::SharedStore;
use serde_json::json;

struct World {
    dir: tempfile::TempDir,
    store: SharedStore,
    index: TantivyIndex,
    phones: PhoneNormalizer,
    sync: IndexSync,
}

impl World {
    async fn demo() -> World {
        let dir = tempfile::tempdir().unwrap();
        let (store, phones) = common::index_contract::demo_store(&dir).await;
        let index = TantivyIndex::open(&dir.path().join("index")).unwrap();
        let sync = IndexSync::new(
            Arc::clone(&store),
            Arc::new(index.clone()),
            phones.clone(),
            chrono::Duration::seconds(5),
            Default::default(),
        );
        let world = World {
            dir,
            store,
            index,
            phones,
            sync,
        };
        // A never-built index: the first pass rebuilds it.
        assert_eq!(world.follow().await.rebuilt, Some(65));
        assert!(world.index.checkpoint().await.unwrap().is_some());
        world
    }

    async fn rebuild(&self, index: &TantivyIndex) -> usize {
        let shared: SharedIndex = Arc::new(index.clone());
        mhero::jobs::index_sync::rebuild(&self.store, &shared, &self.phones, |_| {})
            .await
            .unwrap()
    }

    /// One pass of the index follower, as `serve` runs it.
    async fn follow(&self) -> IndexSyncReport {
        self.sync.run_once().await.unwrap()
    }

    async fn find(&self, query: ContactQuery) -> Vec<String> {
        let page = self
            .index
            .search(&ContactQuery {
                page_size: 1000,
                ..query
            })
            .await
            .unwrap();
        assert_eq!(page.total, page.contacts.len());
        let mut found: Vec<String> = page.contacts.into_iter().map(|c| c.reference).collect();
        found.sort();
        found
    }

    async fn edit(&self, id: &str, change: impl FnOnce(&mut serde_json::Value)) {
        let current = self.store.read("Practitioner", id).await.unwrap();
        let mut person = current.resource;
        change(&mut person);
        self.store
            .update("Practitioner", id, person, Some(&current.version_id))
            .await
            .unwrap();
    }
}

fn q(text: &str) -> ContactQuery {
    ContactQuery {
        q: Some(text.into()),
        ..Default::default()
    }
}

fn at(location: &str) -> ContactQuery {
    ContactQuery {
        location: Some(location.into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_location_hierarchy_and_cadres_come_from_the_demo_data() {
    let world = World::demo().await;
    assert_eq!(world.index.count().await.unwrap(), 65);
    // A district finds the staff of its facilities; its region and the
    // country find them too.
    let district = world.find(at("TF.N.BRB")).await;
    let region = world.find(at("TF.N")).await;
    let country = world.find(at("TF")).await;
    assert_eq!(district.len(), 14);
    assert!(district.iter().all(|p| region.contains(p)));
    assert_eq!(region.len(), 17);
    assert_eq!(country.len(), 57, "everyone with a current role (5 ended)");
    assert!(world.find(at("TF.S.NOWHERE")).await.is_empty());

    // Cadre through the job CodeSystem (role codes are job codes).
    let nurses = world
        .find(ContactQuery {
            cadre: Some("nurse".into()),
            ..Default::default()
        })
        .await;
    assert_eq!(nurses.len(), 40);
    let nurses_in_buraba = world
        .find(ContactQuery {
            cadre: Some("nurse".into()),
            location: Some("TF.N.BRB".into()),
            ..Default::default()
        })
        .await;
    assert!(nurses_in_buraba.len() < district.len());
    assert!(
        nurses_in_buraba
            .iter()
            .all(|p| nurses.contains(p) && district.contains(p))
    );
    // A job code is a cadre filter too.
    let doctors = world
        .find(ContactQuery {
            job: Some("2221-1D".into()),
            ..Default::default()
        })
        .await;
    assert!(doctors.contains(&"Practitioner/P10187".to_string()));

    let by_cadre = world
        .index
        .stats(&ContactQuery::default(), StatsBy::Cadre)
        .await
        .unwrap();
    let expected: BTreeMap<String, u64> = [
        ("nurse", 40),
        ("doctor", 9),
        ("allied-health", 6),
        ("unknown", 10),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(by_cadre, expected);
    let by_district = world
        .index
        .stats(&at("TF.N"), StatsBy::District)
        .await
        .unwrap();
    assert_eq!(by_district.get("Buraba"), Some(&14));
    assert_eq!(by_district.values().sum::<u64>(), 17);
    let by_status = world
        .index
        .stats(&ContactQuery::default(), StatsBy::Status)
        .await
        .unwrap();
    assert_eq!(by_status.get("reachable"), Some(&65), "{by_status:?}");
}

#[tokio::test]
async fn names_are_fuzzy_and_folded_and_phones_match_by_their_digits() {
    let world = World::demo().await;
    let kobina = vec!["Practitioner/P10187".to_string()];
    assert_eq!(world.find(q("Kobina Thabo")).await, kobina);
    // One letter missing: Kobina, and no one far from it.
    let fuzzy = world.find(q("kobna")).await;
    assert!(fuzzy.contains(&kobina[0]) && fuzzy.len() <= 3, "{fuzzy:?}");
    // Case does not matter; two people are called Thabo.
    assert_eq!(
        world.find(q("THABO")).await,
        vec![
            "Practitioner/P10187".to_string(),
            "Practitioner/P10224".to_string()
        ]
    );
    assert!(world.find(q("Zyxwvut")).await.is_empty());

    world
        .edit("P10204", |p| {
            p["name"] = json!([{ "family": "Désta", "given": ["Saúda"] }])
        })
        .await;
    world.follow().await;
    let sauda = vec!["Practitioner/P10204".to_string()];
    assert_eq!(world.find(q("sauda desta")).await, sauda);
    assert_eq!(world.find(q("Saúda")).await, sauda);

    // The demo gave everyone a number: find one by its last digits, by the
    // whole number, and written the local way.
    let doc = world
        .index
        .search(&ContactQuery {
            q: Some("Kobina".into()),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .contacts
        .remove(0);
    let phone = doc.phones[0].clone();
    assert!(phone.starts_with("+231"), "{phone}");
    let last_six = &phone[phone.len() - 6..];
    assert!(world.find(q(last_six)).await.contains(&kobina[0]));
    assert_eq!(world.find(q(&phone)).await, kobina);
    let local = format!("0{} {}", &phone[4..6], &phone[6..]);
    assert_eq!(world.find(q(&local)).await, kobina, "{local}");
}

#[tokio::test]
async fn updates_and_deletes_are_seen_and_a_rebuild_equals_the_updates() {
    let world = World::demo().await;
    // Opt-out, a new name, and a person deleted.
    world
        .edit(
            "P10162",
            |p| {
                p["meta"]["tag"] =
                    json!([{ "system": "http://mhero.org/codesystem", "code": "optedout" }])
            },
        )
        .await;
    world
        .edit("P10208", |p| {
            p["name"] = json!([{ "family": "Mokoena", "given": ["Sibonakaliso"] }])
        })
        .await;
    world
        .store
        .delete("Practitioner", "P10187", None)
        .await
        .unwrap();
    let report = world.follow().await;
    assert_eq!(
        (report.updated, report.removed, report.rebuilt),
        (2, 1, None)
    );

    let opted_out = world
        .find(ContactQuery {
            opted_out: Some(true),
            ..Default::default()
        })
        .await;
    assert_eq!(opted_out, vec!["Practitioner/P10162".to_string()]);
    assert!(
        world.find(q("Lesedi")).await.is_empty(),
        "the old name is gone"
    );
    assert_eq!(
        world.find(q("Mokoena")).await,
        vec!["Practitioner/P10208".to_string()]
    );
    assert!(world.find(q("Kobina")).await.is_empty());
    assert_eq!(world.index.count().await.unwrap(), 64);

    // A rebuild from the store gives the same documents.
    let fresh = TantivyIndex::open(&world.dir.path().join("rebuilt")).unwrap();
    assert_eq!(world.rebuild(&fresh).await, 64);
    let all = |index: TantivyIndex| async move {
        let mut docs = index
            .search(&ContactQuery {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .contacts;
        docs.sort_by(|a, b| a.reference.cmp(&b.reference));
        docs
    };
    assert_eq!(all(world.index.clone()).await, all(fresh).await);
}

#[tokio::test]
async fn an_unknown_statistic_is_refused_by_name() {
    let error = StatsBy::parse("shoe_size").unwrap_err();
    assert!(error.to_string().starts_with("by:"), "{error}");
    assert!(error.to_string().contains("shoe_size"));
}

impl World {
    async fn put(&self, resource: serde_json::Value) {
        let resource_type = resource["resourceType"].as_str().unwrap().to_string();
        let id = resource["id"].as_str().unwrap().to_string();
        self.store
            .update(&resource_type, &id, resource, None)
            .await
            .unwrap();
    }

    async fn change(
        &self,
        resource_type: &str,
        id: &str,
        edit: impl FnOnce(&mut serde_json::Value),
    ) {
        let mut resource = self.store.read(resource_type, id).await.unwrap().resource;
        edit(&mut resource);
        self.put(resource).await;
    }

    async fn document(&self, reference: &str) -> mhero::index::ContactDocument {
        let id = reference.split_once('/').unwrap().1;
        let page = self
            .index
            .search(&ContactQuery {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        page.contacts
            .into_iter()
            .find(|c| c.id == id)
            .unwrap_or_else(|| panic!("{reference} is not in the index"))
    }

    async fn all(index: &TantivyIndex) -> Vec<mhero::index::ContactDocument> {
        let mut docs = index
            .search(&ContactQuery {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .contacts;
        docs.sort_by(|a, b| a.reference.cmp(&b.reference));
        docs
    }
}

fn person(id: &str) -> String {
    format!("Practitioner/{id}")
}

#[tokio::test]
async fn the_follower_sees_roles_places_groups_messages_and_the_job_terminology() {
    let world = World::demo().await;
    assert_eq!(
        world.follow().await,
        IndexSyncReport::default(),
        "idle: nothing to do"
    );

    // A role ends; another moves to a district of the West.
    world
        .change("PractitionerRole", "PR10188", |r| {
            r["period"]["end"] = json!("2001-01-01")
        })
        .await;
    world
        .change("PractitionerRole", "PR10205", |r| {
            r["location"] = json!([{ "reference": "Location/TF.W.RSN" }])
        })
        .await;
    // The district is renamed.
    world
        .change("Location", "TF.N.BRB", |l| {
            l["name"] = json!("Buraba County")
        })
        .await;
    let report = world.follow().await;
    assert_eq!(report.changes, 3);
    assert_eq!(report.rebuilt, None);
    let buraba = world.find(at("TF.N.BRB")).await;
    assert_eq!(buraba.len(), 12);
    assert!(!buraba.contains(&person("P10187")) && !buraba.contains(&person("P10204")));
    assert!(world.find(at("TF.W")).await.contains(&person("P10204")));
    let by_district = world
        .index
        .stats(&at("TF.N"), StatsBy::District)
        .await
        .unwrap();
    assert_eq!(
        by_district.get("Buraba County"),
        Some(&12),
        "{by_district:?}"
    );
    assert_eq!(by_district.get("Buraba"), None);

    // A group gains two members, then loses one.
    world
        .put(json!({
            "resourceType": "Group", "id": "ipc-trained", "type": "practitioner", "actual": true,
            "member": [
                { "entity": { "reference": "Practitioner/P10162" } },
                { "entity": { "reference": "Practitioner/P10208" } }
            ]
        }))
        .await;
    world.follow().await;
    let group = ContactQuery {
        group: Some("ipc-trained".into()),
        ..Default::default()
    };
    assert_eq!(
        world.find(group.clone()).await,
        vec![person("P10162"), person("P10208")]
    );
    world
        .change("Group", "ipc-trained", |g| {
            g["member"].as_array_mut().unwrap().pop();
        })
        .await;
    world.follow().await;
    assert_eq!(world.find(group).await, vec![person("P10162")]);

    // A message to a worker, and their reply.
    world
        .put(json!({
            "resourceType": "Communication", "id": "out-1", "status": "in-progress",
            "extension": [{ "url": mhero::pipeline::outbox::DELIVERY_EXTENSION, "valueString": "message" }],
            "recipient": [{ "reference": "Practitioner/P10162" }]
        }))
        .await;
    world
        .put(json!({
            "resourceType": "Communication", "id": "reply-1", "status": "completed",
            "received": "2026-11-20T10:00:00Z",
            "sender": { "reference": "Practitioner/P10162" },
            "inResponseTo": [{ "reference": "Communication/out-1" }]
        }))
        .await;
    world.follow().await;
    let document = world.document("Practitioner/P10162").await;
    let last = document.last_message.expect("a last message");
    assert_eq!(
        (last.communication.as_str(), last.status.as_str()),
        ("out-1", "in-progress")
    );
    assert_eq!(
        document.last_reply.map(|t| t.to_rfc3339()),
        Some("2026-11-20T10:00:00+00:00".to_string())
    );
    let replied = |since: &str| ContactQuery {
        replied_since: Some(since.parse().unwrap()),
        ..Default::default()
    };
    assert_eq!(
        world.find(replied("2026-11-19T00:00:00Z")).await,
        vec![person("P10162")]
    );
    assert!(world.find(replied("2026-11-21T00:00:00Z")).await.is_empty());
    world
        .change("Communication", "out-1", |c| {
            c["status"] = json!("completed")
        })
        .await;
    world.follow().await;
    assert_eq!(
        world
            .document("Practitioner/P10162")
            .await
            .last_message
            .unwrap()
            .status,
        "completed"
    );

    // The job terminology changes a job's cadre: everyone is rebuilt.
    world
        .change("CodeSystem", "ihris-job", |cs| {
            for concept in cs["concept"].as_array_mut().unwrap() {
                if concept["code"] == "2221-1D" {
                    for property in concept["property"].as_array_mut().unwrap() {
                        if property["code"] == "cadre" {
                            property["valueCoding"] = json!({"code": "allied-health"});
                            property["valueCode"] = json!("allied-health");
                        }
                    }
                }
            }
        })
        .await;
    let report = world.follow().await;
    assert_eq!(report.rebuilt, Some(65));
    let medical_doctors = world
        .find(ContactQuery {
            job: Some("2221-1D".into()),
            ..Default::default()
        })
        .await;
    assert!(!medical_doctors.is_empty());
    let allied = world
        .find(ContactQuery {
            cadre: Some("allied-health".into()),
            ..Default::default()
        })
        .await;
    assert!(medical_doctors.iter().all(|d| allied.contains(d)));
    assert_eq!(
        world.follow().await,
        IndexSyncReport::default(),
        "not rebuilt twice"
    );

    // Everything followed equals a rebuild from the store.
    let fresh = TantivyIndex::open(&world.dir.path().join("rebuilt")).unwrap();
    world.rebuild(&fresh).await;
    assert_eq!(World::all(&world.index).await, World::all(&fresh).await);
}

#[tokio::test]
async fn a_crash_before_the_commit_loses_nothing() {
    let world = World::demo().await;
    let before = world.index.checkpoint().await.unwrap();
    world
        .edit("P10208", |p| {
            p["name"] = json!([{ "family": "Mokoena", "given": ["Sibonakaliso"] }])
        })
        .await;
    // Half a pass: a write the index never commits, then the process dies.
    let mut stale = world.document("Practitioner/P10208").await;
    stale.names = vec!["Halfwritten".into()];
    world.index.upsert(vec![stale]).await.unwrap();
    let World {
        dir,
        store,
        index,
        phones,
        sync,
    } = world;
    drop((index, sync));

    let index = TantivyIndex::open(&dir.path().join("index")).unwrap();
    assert_eq!(
        index.checkpoint().await.unwrap(),
        before,
        "the checkpoint did not move"
    );
    let world = World {
        sync: IndexSync::new(
            Arc::clone(&store),
            Arc::new(index.clone()),
            phones.clone(),
            chrono::Duration::seconds(5),
            Default::default(),
        ),
        dir,
        store,
        index,
        phones,
    };
    let report = world.follow().await;
    assert!(
        report.updated >= 1 || report.rebuilt.is_some(),
        "{report:?}"
    );
    assert!(world.find(q("Halfwritten")).await.is_empty());
    assert_eq!(world.find(q("Mokoena")).await, vec![person("P10208")]);
}

#[tokio::test]
async fn the_index_contract_holds_for_tantivy() {
    let dir = tempfile::tempdir().unwrap();
    let (store, phones) = common::index_contract::demo_store(&dir).await;
    let index = Arc::new(TantivyIndex::open(&dir.path().join("index")).unwrap());
    common::index_contract::contract(store, index, phones).await;
}
