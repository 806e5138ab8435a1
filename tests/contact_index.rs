//! The contact index (tantivy) on the iHRIS demo data: the location
//! hierarchy, cadre through the job CodeSystem, names folded for accents and
//! case, phone digits, opt-out, statistics, updates and deletes, and a full
//! rebuild equal to incremental updates.

use std::collections::BTreeMap;
use std::sync::Arc;

use mhero::index::document::{Directory, all_documents};
use mhero::index::tantivy::TantivyIndex;
use mhero::index::{ContactIndex, ContactQuery, StatsBy};
use mhero::pipeline::phone::PhoneNormalizer;
use mhero::store::SharedStore;
use mhero::store::sqlite::SqliteStore;
use serde_json::json;

struct World {
    dir: tempfile::TempDir,
    store: SharedStore,
    index: TantivyIndex,
    phones: PhoneNormalizer,
}

impl World {
    async fn demo() -> World {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(
            SqliteStore::open(&dir.path().join("fhir.sqlite"))
                .await
                .unwrap(),
        );
        let phones = PhoneNormalizer::new(Some("LR")).unwrap();
        mhero::cli::demo::load_demo_data(store.as_ref(), &phones)
            .await
            .unwrap();
        let index = TantivyIndex::open(&dir.path().join("index")).unwrap();
        let world = World {
            dir,
            store,
            index,
            phones,
        };
        world.rebuild(&world.index).await;
        world
    }

    async fn rebuild(&self, index: &TantivyIndex) -> usize {
        index.clear().await.unwrap();
        let count = all_documents(self.store.as_ref(), &self.phones, 100, |docs| {
            let index = index.clone();
            async move {
                index.upsert(docs).await.unwrap();
                Ok::<(), mhero::store::StoreError>(())
            }
        })
        .await
        .unwrap();
        index.commit().await.unwrap();
        count
    }

    /// Re-indexes one person after a change (as the index updater does).
    async fn reindex_one(&self, reference: &str) {
        let (resource_type, id) = reference.split_once('/').unwrap();
        let directory = Directory::load(self.store.as_ref()).await.unwrap();
        let person = self.store.read(resource_type, id).await.unwrap();
        self.index
            .upsert(vec![directory.document(&person.resource, &self.phones)])
            .await
            .unwrap();
        self.index.commit().await.unwrap();
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
    world.reindex_one("Practitioner/P10204").await;
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
    world.reindex_one("Practitioner/P10162").await;
    world
        .edit("P10208", |p| {
            p["name"] = json!([{ "family": "Mokoena", "given": ["Sibonakaliso"] }])
        })
        .await;
    world.reindex_one("Practitioner/P10208").await;
    world
        .store
        .delete("Practitioner", "P10187", None)
        .await
        .unwrap();
    world
        .index
        .delete(vec!["Practitioner/P10187".into()])
        .await
        .unwrap();
    world.index.commit().await.unwrap();

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
