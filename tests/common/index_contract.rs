//! The `ContactIndex` contract on the iHRIS demo data, for any backend:
//! tantivy runs it in CI, Elasticsearch when `MHERO_TEST_ES_URL` is set.
//! A rebuild, the location hierarchy, cadres, names, phones, statistics,
//! every match of a filter, and the follower applying an update and a
//! delete.

use std::collections::BTreeMap;
use std::sync::Arc;

use mhero::index::{ContactQuery, SharedIndex, StatsBy};
use mhero::jobs::index_sync::{IndexSync, rebuild};
use mhero::pipeline::phone::PhoneNormalizer;
use mhero::store::SharedStore;
use mhero::store::sqlite::SqliteStore;
use serde_json::json;

/// A store with the demo data in `dir`.
pub async fn demo_store(dir: &tempfile::TempDir) -> (SharedStore, PhoneNormalizer) {
    let store: SharedStore = Arc::new(
        SqliteStore::open(&dir.path().join("fhir.sqlite"))
            .await
            .unwrap(),
    );
    let phones = PhoneNormalizer::new(Some("LR")).unwrap();
    mhero::cli::demo::load_demo_data(store.as_ref(), &phones)
        .await
        .unwrap();
    (store, phones)
}

async fn find(index: &SharedIndex, query: ContactQuery) -> Vec<String> {
    let page = index
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

fn at(location: &str) -> ContactQuery {
    ContactQuery {
        location: Some(location.into()),
        ..Default::default()
    }
}

pub async fn contract(store: SharedStore, index: SharedIndex, phones: PhoneNormalizer) {
    assert_eq!(rebuild(&store, &index, &phones, |_| {}).await.unwrap(), 65);
    assert_eq!(index.count().await.unwrap(), 65);
    assert!(index.checkpoint().await.unwrap().is_some());

    let district = find(&index, at("TF.N.BRB")).await;
    let region = find(&index, at("TF.N")).await;
    assert_eq!((district.len(), region.len()), (14, 17));
    assert_eq!(find(&index, at("TF")).await.len(), 57);
    assert_eq!(index.references(&at("TF.N")).await.unwrap(), region);
    let nurses = ContactQuery {
        cadre: Some("nurse".into()),
        ..Default::default()
    };
    assert_eq!(find(&index, nurses).await.len(), 40);

    let named = |q: &str| ContactQuery {
        q: Some(q.into()),
        ..Default::default()
    };
    let thabo = vec![
        "Practitioner/P10187".to_string(),
        "Practitioner/P10224".to_string(),
    ];
    assert_eq!(find(&index, named("THABO")).await, thabo);
    assert_eq!(find(&index, named("Thabbo")).await, thabo, "one typo");
    let page = index
        .search(&ContactQuery {
            q: Some("Thabo".into()),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let phone = page.contacts[0].phones[0].clone();
    let last_digits = &phone[phone.len() - 6..];
    assert!(
        find(&index, named(last_digits))
            .await
            .contains(&page.contacts[0].reference)
    );

    let by_cadre = index
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
    let by_district = index.stats(&at("TF.N"), StatsBy::District).await.unwrap();
    assert_eq!(by_district.get("Buraba"), Some(&14));

    // The follower: a new name and a deletion.
    let follower = IndexSync::new(
        Arc::clone(&store),
        Arc::clone(&index),
        phones,
        chrono::Duration::seconds(5),
        Default::default(),
    );
    follower.run_once().await.unwrap();
    let current = store.read("Practitioner", "P10208").await.unwrap();
    let mut person = current.resource;
    person["name"] = json!([{ "family": "Mokoena", "given": ["Sibonakaliso"] }]);
    store
        .update("Practitioner", "P10208", person, Some(&current.version_id))
        .await
        .unwrap();
    store.delete("Practitioner", "P10187", None).await.unwrap();
    let report = follower.run_once().await.unwrap();
    assert_eq!((report.updated, report.removed), (1, 1), "{report:?}");
    assert_eq!(
        find(&index, named("Mokoena")).await,
        vec!["Practitioner/P10208".to_string()]
    );
    assert_eq!(index.count().await.unwrap(), 64);
}
