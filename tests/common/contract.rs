//! The `FhirStore` contract: one suite, run against every backend that can
//! run here (`SqliteStore` directly, `HttpFhirStore` over the connector's
//! own `/fhir`), and against a live server when `MHERO_TEST_FHIR_URL` is
//! set. Every check uses its own unique identifiers so the suite can share
//! one store (and a server that already has data).

use mhero::error::status_and_outcome;
use mhero::store::{
    FhirStore, HistoryMethod, HistoryRequest, SearchRequest, StoreError, WriteKind,
};
use serde_json::{Value, json};

fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

fn status(error: &StoreError) -> u16 {
    status_and_outcome(error).0.as_u16()
}

fn practitioner(tag: &str, family: &str, given: &str) -> Value {
    json!({
        "resourceType": "Practitioner",
        "identifier": [{ "system": "urn:mhero:test", "value": format!("{tag}-{family}") }],
        "active": true,
        "name": [{ "family": family, "given": [given] }],
        "telecom": [{ "system": "phone", "value": format!("+23177{}", &tag[..6].bytes().map(|b| (b % 10).to_string()).collect::<String>()) }],
        "extension": [{ "url": "http://mhero.org/fhir/StructureDefinition/test", "valueString": tag }]
    })
}

async fn search(
    store: &dyn FhirStore,
    resource_type: &str,
    params: &[(&str, &str)],
) -> mhero::store::SearchPage {
    store
        .search(SearchRequest {
            resource_type: resource_type.into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
        .await
        .expect("search")
}

pub async fn create_read_update_vread(store: &dyn FhirStore) {
    let tag = unique();
    let sent = practitioner(&tag, "Kollie", "Fatu");
    let created = store.create(sent.clone(), None).await.expect("create");
    assert_eq!(created.kind, WriteKind::Created);
    assert_eq!(created.stored.version_id, "1");
    assert!(!created.stored.id.is_empty());
    assert_eq!(created.stored.resource["meta"]["versionId"], "1");
    assert!(created.stored.resource["meta"]["lastUpdated"].is_string());

    let read = store
        .read("Practitioner", &created.stored.id)
        .await
        .expect("read");
    let mut expected = sent.clone();
    expected["id"] = json!(created.stored.id);
    assert_eq!(
        super::without_store_meta(&read.resource),
        expected,
        "unknown elements and extensions survive"
    );

    let mut changed = read.resource.clone();
    changed["active"] = json!(false);
    let wrong = store
        .update(
            "Practitioner",
            &created.stored.id,
            changed.clone(),
            Some("7"),
        )
        .await
        .unwrap_err();
    assert_eq!(status(&wrong), 412, "{wrong}");
    let updated = store
        .update("Practitioner", &created.stored.id, changed, Some("1"))
        .await
        .expect("update");
    assert_eq!(updated.kind, WriteKind::Updated);
    assert_eq!(updated.stored.version_id, "2");

    let v1 = store
        .vread("Practitioner", &created.stored.id, "1")
        .await
        .expect("vread 1");
    assert_eq!(v1.resource["active"], true);
    let v2 = store
        .vread("Practitioner", &created.stored.id, "2")
        .await
        .expect("vread 2");
    assert_eq!(v2.resource["active"], false);
    let missing = store
        .vread("Practitioner", &created.stored.id, "9")
        .await
        .unwrap_err();
    assert_eq!(status(&missing), 404);
}

pub async fn update_creates_with_the_client_id(store: &dyn FhirStore) {
    let id = format!("client-{}", unique());
    let mut resource = practitioner(&unique(), "Dolo", "Amos");
    resource["id"] = json!(id);
    let outcome = store
        .update("Practitioner", &id, resource, None)
        .await
        .expect("create on update");
    assert_eq!(outcome.kind, WriteKind::Created);
    assert_eq!(outcome.stored.id, id);
    assert_eq!(
        store.read("Practitioner", &id).await.unwrap().version_id,
        "1"
    );
}

pub async fn conditional_create_is_idempotent(store: &dyn FhirStore) {
    let tag = unique();
    let condition = format!("identifier=urn:mhero:test|{tag}-Weah");
    let first = store
        .create(practitioner(&tag, "Weah", "Musu"), Some(&condition))
        .await
        .expect("first");
    assert_eq!(first.kind, WriteKind::Created);
    let second = store
        .create(practitioner(&tag, "Weah", "Musu"), Some(&condition))
        .await
        .expect("second");
    assert_eq!(second.kind, WriteKind::Unchanged);
    assert_eq!(second.stored.id, first.stored.id);

    // Two resources share an identifier system: a condition matching both is 412.
    let shared = format!("identifier=urn:mhero:test|{tag}-Twin");
    for _ in 0..2 {
        store
            .create(practitioner(&tag, "Twin", "A"), None)
            .await
            .expect("twin");
    }
    let err = store
        .create(practitioner(&tag, "Twin", "A"), Some(&shared))
        .await
        .unwrap_err();
    assert_eq!(status(&err), 412, "{err}");
}

pub async fn delete_is_versioned(store: &dyn FhirStore) {
    let created = store
        .create(practitioner(&unique(), "Toe", "Korto"), None)
        .await
        .expect("create");
    let id = created.stored.id.clone();
    let deleted = store
        .delete("Practitioner", &id, None)
        .await
        .expect("delete");
    assert!(deleted.is_some());
    let err = store.read("Practitioner", &id).await.unwrap_err();
    assert_eq!(status(&err), 410, "{err}");
    assert!(
        store.vread("Practitioner", &id, "1").await.is_ok(),
        "old versions stay readable"
    );
    let history = store
        .history(HistoryRequest {
            resource_type: Some("Practitioner".into()),
            id: Some(id.clone()),
            ..Default::default()
        })
        .await
        .expect("history");
    assert_eq!(history.entries.len(), 2);
    assert_eq!(history.entries[0].method, HistoryMethod::Delete);
    assert!(history.entries[0].resource.is_none());
    assert_eq!(history.entries[1].version_id, "1");
    // Re-creating a deleted resource continues its versions.
    let mut again = practitioner(&unique(), "Toe", "Korto");
    again["id"] = json!(id);
    let recreated = store
        .update("Practitioner", &id, again, None)
        .await
        .expect("recreate");
    assert_eq!(recreated.stored.version_id, "3");
}

pub async fn search_by_identifier_name_and_paging(store: &dyn FhirStore) {
    let tag = unique();
    let family = format!("Núñez{tag}");
    for given in ["Ana", "Béatrice", "Carla", "Dora", "Eva"] {
        store
            .create(practitioner(&tag, &family, given), None)
            .await
            .expect("create");
    }
    store
        .create(practitioner(&tag, "Other", "Zed"), None)
        .await
        .expect("create other");

    let by_identifier = search(
        store,
        "Practitioner",
        &[("identifier", &format!("urn:mhero:test|{tag}-Other"))],
    )
    .await;
    assert_eq!(by_identifier.matches.len(), 1);
    assert_eq!(
        by_identifier.matches[0].resource["name"][0]["family"],
        "Other"
    );

    // Case- and accent-insensitive prefix.
    let folded_prefix = format!("nunez{}", &tag[..4]);
    let page = search(store, "Practitioner", &[("family", &folded_prefix)]).await;
    assert_eq!(page.total, Some(5));
    let given = search(
        store,
        "Practitioner",
        &[("family", &folded_prefix), ("given", "beat")],
    )
    .await;
    assert_eq!(given.matches.len(), 1, "repeated parameters AND");
    let either = search(
        store,
        "Practitioner",
        &[("family", &folded_prefix), ("given", "ana,eva")],
    )
    .await;
    assert_eq!(either.matches.len(), 2, "comma ORs");

    // Paging collects everyone exactly once.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .search(SearchRequest {
                resource_type: "Practitioner".into(),
                params: vec![
                    ("family".into(), folded_prefix.clone()),
                    ("_count".into(), "2".into()),
                ],
                cursor: cursor.clone(),
                lenient: false,
            })
            .await
            .expect("page");
        assert!(page.matches.len() <= 2);
        assert_eq!(
            page.total,
            Some(5),
            "every page carries the total over all pages"
        );
        seen.extend(page.matches.iter().map(|m| m.id.clone()));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let mut unique_ids = seen.clone();
    unique_ids.sort();
    unique_ids.dedup();
    assert_eq!(seen.len(), 5);
    assert_eq!(unique_ids.len(), 5);

    let err = store
        .search(SearchRequest {
            resource_type: "Practitioner".into(),
            params: vec![("shoe-size".into(), "9".into())],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status(&err), 400, "{err}");
}

pub async fn transaction_resolves_references_and_is_atomic(store: &dyn FhirStore) {
    let tag = unique();
    let bundle = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            { "fullUrl": "urn:uuid:0b5c1f43-1111-4a55-9d0a-000000000001",
              "resource": practitioner(&tag, "Flomo", "Prince"),
              "request": { "method": "POST", "url": "Practitioner" } },
            { "fullUrl": "urn:uuid:0b5c1f43-1111-4a55-9d0a-000000000002",
              "resource": { "resourceType": "PractitionerRole", "active": true,
                            "identifier": [{ "system": "urn:mhero:test", "value": format!("{tag}-role") }],
                            "practitioner": { "reference": "urn:uuid:0b5c1f43-1111-4a55-9d0a-000000000001" } },
              "request": { "method": "POST", "url": "PractitionerRole" } }
        ]
    });
    let response = store.process_bundle(bundle).await.expect("transaction");
    assert_eq!(response["type"], "transaction-response");
    let entries = response["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert!(
        entries[0]["response"]["status"]
            .as_str()
            .unwrap()
            .starts_with("201")
    );
    let practitioner_location = entries[0]["response"]["location"].as_str().unwrap();
    let practitioner_id = practitioner_location
        .split("Practitioner/")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    let roles = search(
        store,
        "PractitionerRole",
        &[("identifier", &format!("urn:mhero:test|{tag}-role"))],
    )
    .await;
    assert_eq!(roles.matches.len(), 1);
    assert_eq!(
        roles.matches[0].resource["practitioner"]["reference"],
        format!("Practitioner/{practitioner_id}")
    );

    // A failing entry rolls back the entries before it.
    let failing = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            { "resource": practitioner(&tag, "Rollback", "One"), "request": { "method": "POST", "url": "Practitioner" } },
            { "resource": { "resourceType": "Practitioner", "id": "mismatch" }, "request": { "method": "PUT", "url": "Practitioner/other-id" } }
        ]
    });
    let err = store.process_bundle(failing).await.unwrap_err();
    assert_eq!(status(&err), 400, "{err}");
    let none = search(
        store,
        "Practitioner",
        &[("identifier", &format!("urn:mhero:test|{tag}-Rollback"))],
    )
    .await;
    assert_eq!(
        none.matches.len(),
        0,
        "nothing of a failed transaction is written"
    );
}

pub async fn batch_entries_are_independent(store: &dyn FhirStore) {
    let tag = unique();
    let bundle = json!({
        "resourceType": "Bundle", "type": "batch",
        "entry": [
            { "resource": practitioner(&tag, "Batch", "Ok"), "request": { "method": "POST", "url": "Practitioner" } },
            { "request": { "method": "GET", "url": format!("Practitioner/missing-{tag}") } }
        ]
    });
    let response = store.process_bundle(bundle).await.expect("batch");
    assert_eq!(response["type"], "batch-response");
    assert!(
        response["entry"][0]["response"]["status"]
            .as_str()
            .unwrap()
            .starts_with("201")
    );
    assert!(
        response["entry"][1]["response"]["status"]
            .as_str()
            .unwrap()
            .starts_with("404")
    );
    let written = search(
        store,
        "Practitioner",
        &[("identifier", &format!("urn:mhero:test|{tag}-Batch"))],
    )
    .await;
    assert_eq!(written.matches.len(), 1);
}

pub async fn unsupported_type_is_refused(store: &dyn FhirStore) {
    let err = store.read("MedicationRequest", "x").await.unwrap_err();
    assert_eq!(status(&err), 404);
    assert!(err.to_string().contains("MedicationRequest"), "{err}");
}

/// A comma-separated value matches any of the values, for references,
/// tokens and strings.
pub async fn any_of_several_values_matches(store: &dyn FhirStore) {
    let tag = unique();
    let mut ids = Vec::new();
    for family in ["Anyof", "Bnyof", "Cnyof"] {
        let created = store
            .create(practitioner(&tag, family, "Test"), None)
            .await
            .unwrap();
        let id = created.stored.id.clone();
        store
            .create(
                json!({
                    "resourceType": "PractitionerRole",
                    "practitioner": { "reference": format!("Practitioner/{id}") },
                    "identifier": [{ "system": "urn:mhero:test", "value": format!("{tag}-role") }]
                }),
                None,
            )
            .await
            .unwrap();
        ids.push(id);
    }
    let practitioners = format!("Practitioner/{},Practitioner/{}", ids[0], ids[2]);
    let roles = search(
        store,
        "PractitionerRole",
        &[("practitioner", &practitioners)],
    )
    .await;
    let mut found: Vec<String> = roles
        .matches
        .iter()
        .map(|r| {
            r.resource["practitioner"]["reference"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    found.sort();
    let mut expected = vec![
        format!("Practitioner/{}", ids[0]),
        format!("Practitioner/{}", ids[2]),
    ];
    expected.sort();
    assert_eq!(found, expected);
    let identifiers = format!("urn:mhero:test|{tag}-Anyof,urn:mhero:test|{tag}-Bnyof");
    let by_identifier = search(store, "Practitioner", &[("identifier", &identifiers)]).await;
    assert_eq!(by_identifier.matches.len(), 2);
    let by_name = search(
        store,
        "Practitioner",
        &[
            ("family", "Bnyof,Cnyof"),
            (
                "identifier",
                &format!("urn:mhero:test|{tag}-Cnyof,urn:mhero:test|{tag}-Anyof"),
            ),
        ],
    )
    .await;
    assert_eq!(by_name.matches.len(), 1, "both parameters must hold");
    assert_eq!(by_name.matches[0].id, ids[2]);
}

/// Every check, in order.
pub async fn run_all(store: &dyn FhirStore) {
    create_read_update_vread(store).await;
    update_creates_with_the_client_id(store).await;
    conditional_create_is_idempotent(store).await;
    delete_is_versioned(store).await;
    search_by_identifier_name_and_paging(store).await;
    any_of_several_values_matches(store).await;
    transaction_resolves_references_and_is_atomic(store).await;
    batch_entries_are_independent(store).await;
    unsupported_type_is_refused(store).await;
}
