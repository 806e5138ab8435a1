//! `ElasticsearchIndex` against wiremock serving Elasticsearch 8's answer
//! shapes: index creation with the explicit mapping and alias, bulk writes
//! and a refused document, searches and statistics, a rebuild that moves
//! the alias, the checkpoint in the mapping's `_meta`, every match through
//! a point in time, and 429 / 503 answers. The contract itself runs against
//! a real cluster when `MHERO_TEST_ES_URL` is set.

mod common;

use std::sync::Arc;

use mhero::config::{ElasticsearchSettings, Secret};
use mhero::index::elasticsearch::ElasticsearchIndex;
use mhero::index::{
    ContactDocument, ContactIndex, ContactQuery, IndexError, JobRef, PlaceRef, StatsBy,
};
use serde_json::{Value, json};
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

const CURRENT: &str = "mhero-contacts-20261101000000000";

fn settings(server: &MockServer) -> ElasticsearchSettings {
    ElasticsearchSettings {
        url: Some(server.uri().parse().unwrap()),
        username: Some("elastic".into()),
        password: Some(Secret::new("changeme")),
        index_prefix: "mhero".into(),
    }
}

fn nurse() -> ContactDocument {
    ContactDocument {
        reference: "Practitioner/P10162".into(),
        resource_type: "Practitioner".into(),
        id: "P10162".into(),
        name: Some("Lesedi Zulu".into()),
        names: vec!["Lesedi".into(), "Zulu".into()],
        phones: vec!["+231770001001".into()],
        urn_schemes: vec!["tel".into()],
        language: None,
        gender: Some("female".into()),
        active: true,
        opted_out: false,
        rapidpro_contact: None,
        sync_state: "pending".into(),
        invalid_phones: 0,
        jobs: vec![JobRef {
            code: "2230-2B".into(),
            display: Some("Midwife".into()),
            cadre: Some("nurse".into()),
            cadre_display: Some("Nurse".into()),
        }],
        places: vec![
            PlaceRef {
                id: "TF.N.BRB.14".into(),
                name: "Buraba Clinic".into(),
                level: "facility".into(),
            },
            PlaceRef {
                id: "TF.N.BRB".into(),
                name: "Buraba".into(),
                level: "district".into(),
            },
            PlaceRef {
                id: "TF.N".into(),
                name: "North".into(),
                level: "region".into(),
            },
        ],
        organizations: vec![],
        groups: vec![],
        last_message: None,
        last_reply: Some("2026-11-20T10:00:00Z".parse().unwrap()),
    }
}

fn ok(body: Value) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(body)
}

fn shards() -> Value {
    json!({ "total": 2, "successful": 1, "skipped": 0, "failed": 0 })
}

/// A cluster where the alias exists, with a checkpoint.
async fn existing_cluster() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/_alias/mhero-contacts"))
        .respond_with(ok(
            json!({ CURRENT: { "aliases": { "mhero-contacts": {} } } }),
        ))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/mhero-contacts/_mapping"))
        .respond_with(ok(json!({ CURRENT: { "mappings": {
            "_meta": { "checkpoint": "2026-11-20T10:00:00.000Z" },
            "dynamic": "strict",
            "properties": { "reference": { "type": "keyword" } }
        } } })))
        .mount(&server)
        .await;
    server
}

async fn requests(server: &MockServer) -> Vec<wiremock::Request> {
    server.received_requests().await.unwrap()
}

#[tokio::test]
async fn a_new_cluster_gets_the_mapping_and_the_alias() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/_alias/mhero-contacts"))
        .respond_with(
            ResponseTemplate::new(404)
                .set_body_json(json!({ "error": "alias [mhero-contacts] missing", "status": 404 })),
        )
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .and(path_regex("^/mhero-contacts-[0-9]{17}$"))
        .respond_with(ok(json!({ "acknowledged": true, "shards_acknowledged": true, "index": "mhero-contacts-x" })))
        .expect(1)
        .mount(&server)
        .await;
    let index = ElasticsearchIndex::open(&settings(&server)).await.unwrap();
    assert_eq!(index.checkpoint().await.unwrap(), None);
    let created = requests(&server)
        .await
        .into_iter()
        .find(|r| r.method.as_str() == "PUT")
        .unwrap();
    let body: Value = serde_json::from_slice(&created.body).unwrap();
    assert_eq!(body["aliases"], json!({ "mhero-contacts": {} }));
    assert_eq!(body["mappings"]["dynamic"], "strict");
    assert_eq!(
        body["mappings"]["properties"]["names"]["analyzer"],
        "folded"
    );
    assert_eq!(body["mappings"]["properties"]["document"]["enabled"], false);
    assert_eq!(
        body["settings"]["analysis"]["analyzer"]["folded"]["filter"],
        json!(["lowercase", "asciifolding"])
    );
    let auth = created
        .headers
        .get("authorization")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(auth.starts_with("Basic "), "{auth}");
}

#[tokio::test]
async fn writes_are_bulk_requests_and_a_refused_document_is_named() {
    let server = existing_cluster().await;
    let index = ElasticsearchIndex::open(&settings(&server)).await.unwrap();
    assert_eq!(
        index.checkpoint().await.unwrap().map(|t| t.to_rfc3339()),
        Some("2026-11-20T10:00:00+00:00".into())
    );
    Mock::given(method("POST"))
        .and(path("/_bulk"))
        .respond_with(ok(json!({ "errors": false, "took": 5, "items": [
            { "index": { "_index": CURRENT, "_id": "Practitioner/P10162", "_version": 1, "result": "created",
                         "_shards": shards(), "_seq_no": 0, "_primary_term": 1, "status": 201 } }
        ] })))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    index.upsert(vec![nurse()]).await.unwrap();
    let bulk = requests(&server)
        .await
        .into_iter()
        .find(|r| r.url.path() == "/_bulk")
        .unwrap();
    let lines: Vec<Value> = String::from_utf8(bulk.body.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines[0],
        json!({ "index": { "_index": "mhero-contacts", "_id": "Practitioner/P10162" } })
    );
    let source = &lines[1];
    assert_eq!(source["cadre"], json!(["nurse"]));
    assert_eq!(
        source["location"],
        json!(["TF.N.BRB.14", "TF.N.BRB", "TF.N"])
    );
    assert_eq!(source["district"], "Buraba");
    assert_eq!(source["status"], "reachable");
    assert!(source["phone"].as_array().unwrap().contains(&json!("1001")));
    assert_eq!(source["document"]["reference"], "Practitioner/P10162");

    Mock::given(method("POST"))
        .and(path("/_bulk"))
        .respond_with(ok(json!({ "errors": true, "took": 3, "items": [
            { "index": { "_index": CURRENT, "_id": "Practitioner/P10162", "status": 400,
                         "error": { "type": "document_parsing_exception",
                                    "reason": "[1:210] failed to parse field [last_reply] of type [date]" } } }
        ] })))
        .mount(&server)
        .await;
    let error = index.upsert(vec![nurse()]).await.unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, IndexError::Backend(_)));
    assert!(
        text.contains("Practitioner/P10162") && text.contains("document_parsing_exception"),
        "{text}"
    );
}

#[tokio::test]
async fn searches_and_statistics_read_elasticsearch_answers() {
    let server = existing_cluster().await;
    let index = ElasticsearchIndex::open(&settings(&server)).await.unwrap();
    Mock::given(method("POST"))
        .and(path("/mhero-contacts/_search"))
        .respond_with(ok(json!({
            "took": 3, "timed_out": false, "_shards": shards(),
            "hits": { "total": { "value": 14, "relation": "eq" }, "max_score": null, "hits": [
                { "_index": CURRENT, "_id": "Practitioner/P10162", "_score": 2.1,
                  "_source": { "document": serde_json::to_value(nurse()).unwrap() },
                  "sort": [2.1, "Practitioner/P10162"] }
            ] },
            "aggregations": { "by": { "doc_count_error_upper_bound": 0, "sum_other_doc_count": 0,
                "buckets": [ { "key": "nurse", "doc_count": 11 }, { "key": "unknown", "doc_count": 3 } ] } }
        })))
        .mount(&server)
        .await;
    let query = ContactQuery {
        q: Some("Lésedi zulu".into()),
        location: Some("TF.N.BRB".into()),
        replied_since: Some("2026-11-01T00:00:00Z".parse().unwrap()),
        page: 1,
        page_size: 10,
        ..Default::default()
    };
    let page = index.search(&query).await.unwrap();
    assert_eq!(page.total, 14);
    assert_eq!(page.contacts, vec![nurse()]);
    let sent: Value =
        serde_json::from_slice(&requests(&server).await.last().unwrap().body).unwrap();
    assert_eq!(
        (sent["from"].clone(), sent["size"].clone()),
        (json!(10), json!(10))
    );
    let bool_query = &sent["query"]["bool"];
    assert_eq!(
        bool_query["must"][0]["match"]["names"]["fuzziness"], 1,
        "6 letters: one edit"
    );
    assert_eq!(bool_query["must"][1]["match"]["names"]["query"], "zulu");
    assert!(
        bool_query["filter"]
            .as_array()
            .unwrap()
            .contains(&json!({ "term": { "location": "TF.N.BRB" } }))
    );
    assert!(bool_query["filter"].to_string().contains("last_reply"));

    let counts = index
        .stats(&ContactQuery::default(), StatsBy::Cadre)
        .await
        .unwrap();
    assert_eq!(counts.get("nurse"), Some(&11));
    assert_eq!(counts.get("unknown"), Some(&3));
    let sent: Value =
        serde_json::from_slice(&requests(&server).await.last().unwrap().body).unwrap();
    assert_eq!(sent["aggs"]["by"]["terms"]["field"], "cadre");
    assert_eq!(sent["query"], json!({ "match_all": {} }));

    // A phone number is an exact lookup of its ending.
    index
        .search(&ContactQuery {
            q: Some("0770 001 001".into()),
            page_size: 5,
            ..Default::default()
        })
        .await
        .unwrap();
    let sent: Value =
        serde_json::from_slice(&requests(&server).await.last().unwrap().body).unwrap();
    assert_eq!(
        sent["query"]["bool"]["filter"][0],
        json!({ "term": { "phone": "770001001" } })
    );

    let deep = index
        .search(&ContactQuery {
            page: 20,
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(deep, IndexError::BadQuery { ref parameter, .. } if parameter == "page"),
        "{deep}"
    );
}

#[tokio::test]
async fn a_rebuild_moves_the_alias_and_keeps_the_checkpoint_in_the_mapping() {
    let server = existing_cluster().await;
    let index = ElasticsearchIndex::open(&settings(&server)).await.unwrap();
    Mock::given(method("PUT"))
        .and(path_regex("^/mhero-contacts-[0-9]{17}$"))
        .respond_with(ok(
            json!({ "acknowledged": true, "shards_acknowledged": true }),
        ))
        .mount(&server)
        .await;
    for (verb, pattern, answer) in [
        (
            "POST",
            "^/_bulk$",
            json!({ "errors": false, "took": 1, "items": [] }),
        ),
        (
            "GET",
            "^/mhero-contacts-[0-9]{17}/_refresh$",
            json!({ "_shards": shards() }),
        ),
        (
            "PUT",
            "^/mhero-contacts-[0-9]{17}/_mapping$",
            json!({ "acknowledged": true }),
        ),
        ("POST", "^/_aliases$", json!({ "acknowledged": true })),
        (
            "DELETE",
            "^/mhero-contacts-20261101000000000$",
            json!({ "acknowledged": true }),
        ),
    ] {
        Mock::given(method(verb))
            .and(path_regex(pattern))
            .respond_with(ok(answer))
            .mount(&server)
            .await;
    }
    index.clear().await.unwrap();
    index.upsert(vec![nurse()]).await.unwrap();
    let checkpoint = "2026-11-22T08:00:00Z".parse().unwrap();
    index.commit(Some(checkpoint)).await.unwrap();

    let sent = requests(&server).await;
    let new_index = sent
        .iter()
        .find(|r| r.method.as_str() == "PUT" && !r.url.path().ends_with("_mapping"))
        .unwrap()
        .url
        .path()
        .trim_start_matches('/')
        .to_string();
    let bulk = sent.iter().find(|r| r.url.path() == "/_bulk").unwrap();
    let action: Value =
        serde_json::from_str(String::from_utf8_lossy(&bulk.body).lines().next().unwrap()).unwrap();
    assert_eq!(
        action["index"]["_index"],
        new_index.as_str(),
        "a rebuild writes to the new index"
    );
    let meta = sent
        .iter()
        .find(|r| r.url.path().ends_with("/_mapping") && r.method.as_str() == "PUT")
        .unwrap();
    let meta: Value = serde_json::from_slice(&meta.body).unwrap();
    assert_eq!(meta["_meta"]["checkpoint"], "2026-11-22T08:00:00.000Z");
    let aliases = sent.iter().find(|r| r.url.path() == "/_aliases").unwrap();
    let aliases: Value = serde_json::from_slice(&aliases.body).unwrap();
    assert_eq!(
        aliases["actions"],
        json!([
            { "remove": { "index": CURRENT, "alias": "mhero-contacts" } },
            { "add": { "index": new_index, "alias": "mhero-contacts" } }
        ])
    );
    let order: Vec<String> = sent
        .iter()
        .map(|r| format!("{} {}", r.method, r.url.path()))
        .collect();
    let position = |needle: &str| order.iter().position(|o| o.contains(needle)).unwrap();
    assert!(position("_refresh") < position("_aliases"), "{order:?}");
    assert!(
        position("_aliases") < position(&format!("DELETE /{CURRENT}")),
        "{order:?}"
    );
    assert_eq!(index.checkpoint().await.unwrap(), Some(checkpoint));
}

#[tokio::test]
async fn every_match_is_read_through_one_point_in_time() {
    let server = existing_cluster().await;
    let index = ElasticsearchIndex::open(&settings(&server)).await.unwrap();
    Mock::given(method("POST"))
        .and(path("/mhero-contacts/_pit"))
        .respond_with(ok(json!({ "id": "46ToAwMDaWR5", "_shards": shards() })))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/_search"))
        .respond_with(ok(json!({ "took": 1, "timed_out": false, "pit_id": "46ToAwMDaWR5", "_shards": shards(),
            "hits": { "total": { "value": 2, "relation": "eq" }, "max_score": null, "hits": [
                { "_index": CURRENT, "_id": "Practitioner/P2", "_score": null, "fields": { "reference": ["Practitioner/P2"] }, "sort": ["Practitioner/P2", 1] },
                { "_index": CURRENT, "_id": "Practitioner/P1", "_score": null, "fields": { "reference": ["Practitioner/P1"] }, "sort": ["Practitioner/P1", 2] }
            ] } })))
        .mount(&server)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/_pit"))
        .respond_with(ok(json!({ "succeeded": true, "num_freed": 1 })))
        .expect(1)
        .mount(&server)
        .await;
    let all = index.references(&ContactQuery::default()).await.unwrap();
    assert_eq!(all, vec!["Practitioner/P1", "Practitioner/P2"]);
    let search = requests(&server)
        .await
        .into_iter()
        .find(|r| r.url.path() == "/_search")
        .unwrap();
    let body: Value = serde_json::from_slice(&search.body).unwrap();
    assert_eq!(body["pit"]["id"], "46ToAwMDaWR5");
}

#[tokio::test]
async fn throttling_and_an_unavailable_cluster_are_errors_that_say_so() {
    let server = existing_cluster().await;
    let index = ElasticsearchIndex::open(&settings(&server)).await.unwrap();
    Mock::given(method("POST"))
        .and(path("/_bulk"))
        .respond_with(ResponseTemplate::new(429).set_body_json(json!({
            "error": { "root_cause": [{ "type": "es_rejected_execution_exception", "reason": "rejected execution of coordinating operation" }],
                       "type": "es_rejected_execution_exception", "reason": "rejected execution of coordinating operation" },
            "status": 429
        })))
        .mount(&server)
        .await;
    let error = index.upsert(vec![nurse()]).await.unwrap_err().to_string();
    assert!(
        error.contains("429") && error.contains("es_rejected_execution_exception"),
        "{error}"
    );
    Mock::given(method("GET"))
        .and(path("/mhero-contacts/_count"))
        .respond_with(ResponseTemplate::new(503).set_body_json(json!({
            "error": { "type": "cluster_block_exception", "reason": "blocked by: [SERVICE_UNAVAILABLE/1/state not recovered / initialized];" },
            "status": 503
        })))
        .mount(&server)
        .await;
    let error = index.count().await.unwrap_err();
    assert!(matches!(error, IndexError::Backend(_)));
    assert!(
        error.to_string().contains("cluster_block_exception"),
        "{error}"
    );

    let refused = ElasticsearchIndex::open(&ElasticsearchSettings {
        index_prefix: "MHero!".into(),
        ..settings(&server)
    })
    .await
    .err()
    .unwrap();
    assert!(matches!(refused, IndexError::Config(_)), "{refused}");
}

/// The contract against a real cluster (`MHERO_TEST_ES_URL`, e.g.
/// `http://elastic:changeme@localhost:9200`), in indices of a unique prefix
/// deleted afterwards.
#[tokio::test]
#[ignore = "needs an Elasticsearch cluster: set MHERO_TEST_ES_URL"]
async fn the_index_contract_holds_for_elasticsearch() {
    let url: url::Url = std::env::var("MHERO_TEST_ES_URL")
        .expect("MHERO_TEST_ES_URL")
        .parse()
        .expect("MHERO_TEST_ES_URL is a URL");
    let prefix = format!("mhero-test-{}", uuid::Uuid::new_v4().simple());
    let mut bare = url.clone();
    let _ = bare.set_username("");
    let _ = bare.set_password(None);
    let settings = ElasticsearchSettings {
        url: Some(bare.clone()),
        username: (!url.username().is_empty()).then(|| url.username().to_string()),
        password: url.password().map(Secret::new),
        index_prefix: prefix.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    let (store, phones) = common::index_contract::demo_store(&dir).await;
    let index = Arc::new(ElasticsearchIndex::open(&settings).await.unwrap());
    common::index_contract::contract(store, index, phones).await;
    let client = reqwest::Client::new();
    let mut delete = client.delete(format!("{}{prefix}-contacts-*", bare.as_str()));
    if let Some(user) = &settings.username {
        delete = delete.basic_auth(user, settings.password.as_ref().map(|p| p.expose()));
    }
    let _ = delete.send().await;
}
