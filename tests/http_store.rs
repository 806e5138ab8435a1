//! `HttpFhirStore` against recorded HAPI FHIR responses served by wiremock,
//! fault injection (retries, timeouts, refused connections, odd bodies),
//! authentication headers, and an `#[ignore]`d round trip against a real
//! server named by `MHERO_TEST_FHIR_URL`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mhero::config::{HttpFhirSettings, Secret};
use mhero::store::http::HttpFhirStore;
use mhero::store::{
    FhirStore, HistoryMethod, HistoryRequest, SearchRequest, StoreError, WriteKind,
};
use serde_json::{Value, json};
use url::Url;
use wiremock::matchers::{body_json, header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

const FHIR_JSON: &str = "application/fhir+json";

/// A recorded response from `shared/fixtures/`, found beside the
/// repository (`../shared`) or at `/work/shared`.
fn fixture(relative: &str) -> Value {
    let candidates = [
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures")
            .join(relative),
        PathBuf::from("/work/shared/fixtures").join(relative),
    ];
    let path = candidates
        .iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("fixture {relative} not found in {candidates:?}"));
    let text = std::fs::read_to_string(path).expect("fixture is readable");
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// A HAPI fixture with its recorded base (`https://example.com`) moved to
/// the mock server.
fn hapi_fixture_at(name: &str, base: &str) -> Value {
    let text = fixture(&format!("hapi/{name}")).to_string();
    serde_json::from_str(&text.replace("https://example.com", base)).expect("still JSON")
}

fn settings(base: &str) -> HttpFhirSettings {
    HttpFhirSettings {
        base_url: Some(Url::parse(base).expect("base URL")),
        username: None,
        password: None,
        bearer_token: None,
        timeout_secs: 5,
        max_retries: 2,
    }
}

fn store_with(settings: &HttpFhirSettings) -> HttpFhirStore {
    HttpFhirStore::new(settings)
        .expect("store builds")
        .with_backoff(Duration::from_millis(1))
}

fn store(server: &MockServer) -> HttpFhirStore {
    store_with(&settings(&server.uri()))
}

fn outcome(code: &str, diagnostics: &str) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": "error", "code": code, "diagnostics": diagnostics }]
    })
}

fn patient(id: &str, version: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "id": id,
        "meta": { "versionId": version, "lastUpdated": "2024-03-01T10:00:00.000+00:00" },
        "name": [{ "family": "Kollie" }]
    })
}

async fn request_count(server: &MockServer) -> usize {
    server
        .received_requests()
        .await
        .expect("request recording is on")
        .len()
}

// ----- (a) recorded HAPI responses ------------------------------------------

#[tokio::test]
async fn search_page_one_from_hapi_and_following_the_getpages_cursor() {
    let server = MockServer::start().await;
    let base = server.uri();
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .and(query_param("_count", "3"))
        .and(query_param("gender", "female"))
        .and(header("accept", FHIR_JSON))
        .respond_with(ResponseTemplate::new(200).set_body_json(hapi_fixture_at(
            "fhir-kit-client-search-results-page-1.json",
            &base,
        )))
        .expect(1)
        .mount(&server)
        .await;
    let page_two = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 829,
        "link": [{ "relation": "self", "url": format!("{base}/?_getpages=678cd733-8823-4324-88a7-51d369cf78a9&_getpagesoffset=3") }],
        "entry": [
            { "resource": patient("p4", "1"), "search": { "mode": "match" } },
            { "resource": { "resourceType": "Organization", "id": "o1", "meta": { "versionId": "2" } }, "search": { "mode": "include" } },
            { "resource": outcome("informational", "lenient"), "search": { "mode": "outcome" } }
        ]
    });
    Mock::given(method("GET"))
        .and(path("/"))
        .and(query_param(
            "_getpages",
            "678cd733-8823-4324-88a7-51d369cf78a9",
        ))
        .and(query_param("_getpagesoffset", "3"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page_two))
        .expect(1)
        .mount(&server)
        .await;

    let store = store(&server);
    let page = store
        .search(SearchRequest {
            resource_type: "Patient".into(),
            params: vec![
                ("_count".into(), "3".into()),
                ("gender".into(), "female".into()),
            ],
            ..Default::default()
        })
        .await
        .expect("page 1");
    assert_eq!(page.total, Some(829));
    assert_eq!(page.matches.len(), 3);
    assert!(page.included.is_empty());
    assert_eq!(page.matches[0].id, "a18e455c-c6ce-4413-a51f-cb5658e6c1dc");
    assert_eq!(page.matches[0].version_id, "1");
    let next = page.next_cursor.expect("a next cursor");
    assert_eq!(
        next,
        format!(
            "{base}/?_getpages=678cd733-8823-4324-88a7-51d369cf78a9&_getpagesoffset=3&_count=3&_pretty=true&_bundletype=searchset"
        )
    );

    let page = store
        .search(SearchRequest {
            resource_type: "Patient".into(),
            cursor: Some(next),
            ..Default::default()
        })
        .await
        .expect("page 2");
    assert_eq!(page.matches.len(), 1);
    assert_eq!(page.matches[0].id, "p4");
    assert_eq!(page.included.len(), 1, "include entries are split off");
    assert_eq!(page.included[0].resource_type, "Organization");
    assert_eq!(page.next_cursor, None);

    // A cursor on another server is refused without a request.
    let err = store
        .search(SearchRequest {
            resource_type: "Patient".into(),
            cursor: Some("http://elsewhere.invalid/?_getpages=x".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid(m) if m == "invalid paging cursor"),
        "{err:?}"
    );
    assert_eq!(request_count(&server).await, 2);
}

#[tokio::test]
async fn next_link_advertised_on_another_host_is_moved_onto_the_base() {
    let server = MockServer::start().await;
    let bundle = json!({
        "resourceType": "Bundle", "type": "searchset",
        "link": [{ "relation": "next", "url": "http://localhost:8080/?_getpages=abc&_getpagesoffset=20" }],
        "entry": []
    });
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .respond_with(ResponseTemplate::new(200).set_body_json(bundle))
        .mount(&server)
        .await;
    let page = store(&server)
        .search(SearchRequest {
            resource_type: "Patient".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.total, None);
    assert_eq!(
        page.next_cursor.as_deref(),
        Some(format!("{}/?_getpages=abc&_getpagesoffset=20", server.uri()).as_str())
    );
}

#[tokio::test]
async fn patient_created_reads_the_resource_back_from_location() {
    let server = MockServer::start().await;
    let base = server.uri();
    Mock::given(method("POST"))
        .and(path("/Patient"))
        .and(header("content-type", FHIR_JSON))
        .and(header("accept", FHIR_JSON))
        .and(header("prefer", "return=representation"))
        .and(header("if-none-exist", "identifier=urn:x|1"))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_json(fixture("hapi/fhir-kit-client-patient-created.json"))
                .insert_header(
                    "Location",
                    format!("{base}/Patient/152752/_history/1").as_str(),
                )
                .insert_header("ETag", "W/\"1\""),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/Patient/152752/_history/1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(patient("152752", "1")))
        .expect(1)
        .mount(&server)
        .await;

    let outcome = store(&server)
        .create(
            json!({ "resourceType": "Patient", "name": [{ "family": "Kollie" }] }),
            Some("identifier=urn:x|1"),
        )
        .await
        .expect("created");
    assert_eq!(outcome.kind, WriteKind::Created);
    assert_eq!(outcome.stored.id, "152752");
    assert_eq!(outcome.stored.version_id, "1");
    assert_eq!(outcome.stored.resource["name"][0]["family"], "Kollie");
    assert_eq!(request_count(&server).await, 2);
}

#[tokio::test]
async fn conditional_create_that_matches_is_unchanged_and_uses_the_returned_body() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/Patient"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({ "resourceType": "Patient", "id": "old" }))
                .insert_header("ETag", "W/\"5\"")
                .insert_header("Last-Modified", "Tue, 02 Jan 2024 03:04:05 GMT"),
        )
        .expect(1)
        .mount(&server)
        .await;
    let outcome = store(&server)
        .create(json!({ "resourceType": "Patient" }), Some("identifier=a|b"))
        .await
        .unwrap();
    assert_eq!(outcome.kind, WriteKind::Unchanged);
    assert_eq!(outcome.stored.version_id, "5", "version from the ETag");
    assert_eq!(
        outcome.stored.resource["meta"]["lastUpdated"],
        "2024-01-02T03:04:05.000Z"
    );
}

#[tokio::test]
async fn not_found_operation_outcome_is_not_found() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/Patient/abcdefg"))
        .respond_with(
            ResponseTemplate::new(404)
                .set_body_json(fixture("hapi/fhir-kit-client-patient-not-found.json")),
        )
        .expect(1)
        .mount(&server)
        .await;
    let err = store(&server).read("Patient", "abcdefg").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound { resource_type, id } if resource_type == "Patient" && id == "abcdefg"),
        "{err:?}"
    );
}

#[tokio::test]
async fn batch_and_transaction_responses_are_returned_intact() {
    let server = MockServer::start().await;
    let batch_request = json!({
        "resourceType": "Bundle", "type": "batch",
        "entry": [{ "request": { "method": "GET", "url": "Patient/1" } }]
    });
    let transaction_request = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [{ "fullUrl": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0",
                    "resource": { "resourceType": "Patient" },
                    "request": { "method": "POST", "url": "Patient" } }]
    });
    let batch_response = fixture("hapi/fhir-kit-client-batch-results.json");
    let transaction_response = fixture("hapi/fhir-kit-client-transaction-results.json");
    Mock::given(method("POST"))
        .and(path("/"))
        .and(body_json(&batch_request))
        .respond_with(ResponseTemplate::new(200).set_body_json(&batch_response))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/"))
        .and(body_json(&transaction_request))
        .respond_with(ResponseTemplate::new(200).set_body_json(&transaction_response))
        .expect(1)
        .mount(&server)
        .await;

    let store = store(&server);
    let answer = store.process_bundle(batch_request).await.unwrap();
    assert_eq!(answer, batch_response);
    assert_eq!(answer["type"], "batch-response");
    let answer = store.process_bundle(transaction_request).await.unwrap();
    assert_eq!(answer, transaction_response);

    // Not a batch or transaction: refused before anything is sent.
    let err = store
        .process_bundle(json!({ "resourceType": "Bundle", "type": "searchset" }))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    assert_eq!(request_count(&server).await, 2);
}

#[tokio::test]
async fn capability_statement_makes_check_succeed() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/metadata"))
        .respond_with(ResponseTemplate::new(200).set_body_json(fixture(
            "hapi/fhir-kit-client-valid-capability-statement.json",
        )))
        .expect(1)
        .mount(&server)
        .await;
    let status = store(&server).check().await.expect("check ok");
    assert_eq!(status.name, format!("fhir (http {})", server.uri()));
    assert!(status.detail.contains(&server.uri()), "{}", status.detail);
    assert!(
        status.detail.contains("HAPI FHIR Server 2.4"),
        "{}",
        status.detail
    );
    assert!(status.detail.contains("3.0.1"), "{}", status.detail);
}

#[tokio::test]
async fn check_fails_as_unavailable_when_metadata_is_not_a_capability_statement() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/metadata"))
        .respond_with(ResponseTemplate::new(200).set_body_json(outcome("processing", "nope")))
        .mount(&server)
        .await;
    let err = store(&server).check().await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable { backend, .. } if backend == &format!("fhir (http {})", server.uri())),
        "{err:?}"
    );
}

#[tokio::test]
async fn history_maps_methods_versions_and_next_link() {
    let server = MockServer::start().await;
    let base = server.uri();
    let bundle = json!({
        "resourceType": "Bundle", "type": "history", "total": 3,
        "link": [{ "relation": "next", "url": format!("{base}?_getpages=h1&_getpagesoffset=2") }],
        "entry": [
            { "fullUrl": format!("{base}/Patient/p1"),
              "request": { "method": "DELETE", "url": "Patient/p1" },
              "response": { "status": "204", "etag": "W/\"3\"", "lastModified": "2024-03-03T00:00:00.000Z" } },
            { "fullUrl": format!("{base}/Patient/p1"), "resource": patient("p1", "2"),
              "request": { "method": "PUT", "url": "Patient/p1" },
              "response": { "status": "200 OK", "etag": "W/\"2\"" } }
        ]
    });
    Mock::given(method("GET"))
        .and(path("/Patient/p1/_history"))
        .and(query_param("_since", "2024-01-01T00:00:00.000Z"))
        .and(query_param("_count", "2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(bundle))
        .expect(1)
        .mount(&server)
        .await;
    let page = store(&server)
        .history(HistoryRequest {
            resource_type: Some("Patient".into()),
            id: Some("p1".into()),
            since: Some("2024-01-01T00:00:00Z".parse().unwrap()),
            count: Some(2),
            cursor: None,
        })
        .await
        .unwrap();
    assert_eq!(page.total, Some(3));
    assert_eq!(page.entries.len(), 2);
    assert_eq!(page.entries[0].method, HistoryMethod::Delete);
    assert_eq!(page.entries[0].version_id, "3");
    assert!(page.entries[0].resource.is_none());
    assert_eq!(page.entries[1].method, HistoryMethod::Update);
    assert_eq!(page.entries[1].version_id, "2");
    assert_eq!(page.entries[1].id, "p1");
    assert_eq!(
        page.next_cursor,
        Some(format!("{base}?_getpages=h1&_getpagesoffset=2"))
    );
}

#[tokio::test]
async fn delete_reports_the_version_or_nothing() {
    let server = MockServer::start().await;
    Mock::given(method("DELETE"))
        .and(path("/Patient/p1"))
        .and(header("if-match", "W/\"2\""))
        .respond_with(ResponseTemplate::new(200).insert_header("ETag", "W/\"3\""))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/Patient/gone"))
        .respond_with(ResponseTemplate::new(404))
        .expect(1)
        .mount(&server)
        .await;
    let store = store(&server);
    assert_eq!(
        store.delete("Patient", "p1", Some("2")).await.unwrap(),
        Some("3".to_string())
    );
    assert_eq!(store.delete("Patient", "gone", None).await.unwrap(), None);
}

// ----- (b) fault injection ------------------------------------------------------

#[tokio::test]
async fn get_answered_503_then_200_is_retried() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/Patient/p1"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/Patient/p1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(patient("p1", "7")))
        .mount(&server)
        .await;
    let stored = store(&server).read("Patient", "p1").await.expect("retried");
    assert_eq!(stored.version_id, "7");
    assert_eq!(request_count(&server).await, 2);
}

#[tokio::test]
async fn too_many_requests_with_retry_after_zero_is_retried() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("Retry-After", "0")
                .set_body_json(outcome("throttled", "slow down")),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/Patient"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "resourceType": "Bundle", "type": "searchset", "total": 0
        })))
        .mount(&server)
        .await;
    let page = store(&server)
        .search(SearchRequest {
            resource_type: "Patient".into(),
            ..Default::default()
        })
        .await
        .expect("retried after 429");
    assert_eq!(page.total, Some(0));
    assert_eq!(request_count(&server).await, 2);
}

#[tokio::test]
async fn retries_stop_after_max_retries() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/Patient/p1"))
        .respond_with(ResponseTemplate::new(502))
        .mount(&server)
        .await;
    let err = store(&server).read("Patient", "p1").await.unwrap_err();
    assert!(
        matches!(err, StoreError::Remote { status: 502, .. }),
        "{err:?}"
    );
    assert_eq!(request_count(&server).await, 3, "1 try + max_retries = 2");
}

#[tokio::test]
async fn post_create_answered_503_is_not_retried() {
    let server = MockServer::start().await;
    let body = outcome("transient", "HAPI is restarting");
    Mock::given(method("POST"))
        .and(path("/Patient"))
        .respond_with(ResponseTemplate::new(503).set_body_json(&body))
        .expect(1)
        .mount(&server)
        .await;
    let err = store(&server)
        .create(json!({ "resourceType": "Patient" }), None)
        .await
        .unwrap_err();
    match err {
        StoreError::Remote {
            status,
            message,
            outcome,
        } => {
            assert_eq!(status, 503);
            assert_eq!(message, "HAPI is restarting");
            assert_eq!(outcome, Some(body));
        }
        other => panic!("expected Remote 503, got {other:?}"),
    }
    assert_eq!(request_count(&server).await, 1);
}

#[tokio::test]
async fn precondition_failed_on_put_with_if_match_is_a_version_conflict() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(path("/Patient/p1"))
        .and(header("if-match", "W/\"3\""))
        .and(header("content-type", FHIR_JSON))
        .respond_with(ResponseTemplate::new(412).set_body_json(outcome(
            "conflict",
            "HAPI-0989: Trying to update Patient/p1/_history/3 but this is not the current version",
        )))
        .expect(1)
        .mount(&server)
        .await;
    let err = store(&server)
        .update(
            "Patient",
            "p1",
            json!({ "resourceType": "Patient", "id": "p1" }),
            Some("3"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::VersionConflict { reference, expected, .. } if reference == "Patient/p1" && expected == "3"),
        "{err:?}"
    );
}

#[tokio::test]
async fn precondition_failed_on_a_conditional_write_is_multiple_matches() {
    let server = MockServer::start().await;
    // HAPI's wording names neither "multiple" nor "more than one".
    Mock::given(method("POST"))
        .and(path("/Patient"))
        .respond_with(ResponseTemplate::new(412).set_body_json(outcome(
            "processing",
            "HAPI-0958: Failed to CREATE resource with match URL \"identifier=a|b\" because this search matched 2 resources",
        )))
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .and(path("/Patient"))
        .respond_with(
            ResponseTemplate::new(412)
                .set_body_json(outcome("multiple-matches", "more than one Patient matches")),
        )
        .mount(&server)
        .await;
    let store = store(&server);
    let err = store
        .create(json!({ "resourceType": "Patient" }), Some("identifier=a|b"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::MultipleMatches(m) if m.contains("matched 2 resources")),
        "{err:?}"
    );
    let err = store
        .conditional_update(
            "Patient",
            "identifier=a|b",
            json!({ "resourceType": "Patient" }),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::MultipleMatches(_)), "{err:?}");
}

#[tokio::test]
async fn conflict_409_is_a_version_conflict_only_when_if_match_was_sent() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(path("/Patient/p1"))
        .respond_with(ResponseTemplate::new(409).set_body_json(outcome(
            "conflict",
            "HAPI-0550: Trying to update Patient/p1/_history/1 but this is not the current version",
        )))
        .mount(&server)
        .await;
    let store = store(&server);
    let err = store
        .update(
            "Patient",
            "p1",
            json!({ "resourceType": "Patient" }),
            Some("W/\"1\""),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::VersionConflict { expected, .. } if expected == "1"),
        "{err:?}"
    );
    let err = store
        .update("Patient", "p1", json!({ "resourceType": "Patient" }), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.starts_with("HAPI-0550")),
        "{err:?}"
    );
}

#[tokio::test]
async fn update_answered_200_is_updated_and_201_is_created() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(path("/Patient/p1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(patient("p1", "4")))
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .and(path("/Patient"))
        .and(query_param("identifier", "urn:x|9"))
        .respond_with(ResponseTemplate::new(201).set_body_json(patient("n1", "1")))
        .mount(&server)
        .await;
    let store = store(&server);
    let outcome = store
        .update(
            "Patient",
            "p1",
            json!({ "resourceType": "Patient" }),
            Some("3"),
        )
        .await
        .unwrap();
    assert_eq!(outcome.kind, WriteKind::Updated);
    assert_eq!(outcome.stored.version_id, "4");
    let sent: Value = server.received_requests().await.unwrap()[0]
        .body_json()
        .unwrap();
    assert_eq!(sent["id"], "p1", "the id is put into the body of an update");

    let outcome = store
        .conditional_update(
            "Patient",
            "identifier=urn:x|9",
            json!({ "resourceType": "Patient" }),
            None,
        )
        .await
        .unwrap();
    assert_eq!(outcome.kind, WriteKind::Created);
    assert_eq!(outcome.stored.id, "n1");
}

#[tokio::test]
async fn non_json_500_is_remote_without_panic() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/Patient/p1"))
        .respond_with(ResponseTemplate::new(500).set_body_raw(
            "<html><body>Whitelabel Error Page</body></html>",
            "text/html",
        ))
        .expect(1)
        .mount(&server)
        .await;
    let err = store(&server).read("Patient", "p1").await.unwrap_err();
    match err {
        StoreError::Remote {
            status,
            message,
            outcome,
        } => {
            assert_eq!(status, 500);
            assert_eq!(message, "500 Internal Server Error");
            assert!(outcome.is_none());
        }
        other => panic!("expected Remote 500, got {other:?}"),
    }
}

#[tokio::test]
async fn success_with_a_non_json_body_is_an_error_not_a_panic() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/Patient/p1"))
        .respond_with(ResponseTemplate::new(200).set_body_raw("not json at all", "text/plain"))
        .mount(&server)
        .await;
    let err = store(&server).read("Patient", "p1").await.unwrap_err();
    assert!(
        matches!(err, StoreError::Remote { status: 502, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn connection_refused_is_unavailable() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let base = format!("http://127.0.0.1:{port}/fhir/");
    let store = store_with(&settings(&base));
    let err = store.read("Patient", "p1").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable { backend, .. } if backend == &format!("fhir (http http://127.0.0.1:{port}/fhir)")),
        "{err:?}"
    );
    let err = store.check().await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
}

#[tokio::test]
async fn timeout_is_unavailable() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/Patient/p1"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(patient("p1", "1"))
                .set_delay(Duration::from_secs(3)),
        )
        .mount(&server)
        .await;
    let mut settings = settings(&server.uri());
    settings.timeout_secs = 1;
    let started = Instant::now();
    let err = store_with(&settings)
        .read("Patient", "p1")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable { reason, .. } if reason.contains("1 s")),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(2900),
        "timeouts are not retried"
    );
}

// ----- (c) authentication ---------------------------------------------------------

#[tokio::test]
async fn basic_auth_is_sent_and_never_shown() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/metadata"))
        // base64("mhero:s3cret-pass")
        .and(header("authorization", "Basic bWhlcm86czNjcmV0LXBhc3M="))
        .respond_with(ResponseTemplate::new(200).set_body_json(fixture(
            "hapi/fhir-kit-client-valid-capability-statement.json",
        )))
        .expect(1)
        .mount(&server)
        .await;
    let mut settings = settings(&server.uri());
    settings.username = Some("mhero".into());
    settings.password = Some(Secret::new("s3cret-pass"));
    let store = store_with(&settings);
    store.check().await.expect("authenticated");
    let debug = format!("{store:?}");
    assert!(!debug.contains("s3cret-pass"), "{debug}");
    assert!(!debug.contains("bWhlcm86czNjcmV0LXBhc3M"), "{debug}");
    assert!(debug.contains("basic"), "{debug}");
}

#[tokio::test]
async fn bearer_token_is_sent_and_never_shown() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/Patient/p1"))
        .and(header("authorization", "Bearer tok-very-secret"))
        .respond_with(ResponseTemplate::new(200).set_body_json(patient("p1", "1")))
        .expect(1)
        .mount(&server)
        .await;
    let mut settings = settings(&server.uri());
    settings.bearer_token = Some(Secret::new("tok-very-secret"));
    let store = store_with(&settings);
    store.read("Patient", "p1").await.expect("authenticated");
    let debug = format!("{store:?}");
    assert!(!debug.contains("tok-very-secret"), "{debug}");
    assert!(debug.contains("bearer"), "{debug}");
}

#[tokio::test]
async fn unauthorized_is_remote_401_with_the_servers_outcome() {
    let server = MockServer::start().await;
    let body = outcome("login", "HTTP 401 Unauthorized");
    Mock::given(method("GET"))
        .and(path("/Patient/p1"))
        .respond_with(ResponseTemplate::new(401).set_body_json(&body))
        .expect(1)
        .mount(&server)
        .await;
    let err = store(&server).read("Patient", "p1").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Remote { status: 401, outcome: Some(o), .. } if o == &body),
        "{err:?}"
    );
}

// ----- (d) a real server ------------------------------------------------------------

/// Create, read, update with If-Match, search by identifier, delete, read
/// (Gone) against the FHIR R4 server at `MHERO_TEST_FHIR_URL`.
#[tokio::test]
#[ignore = "needs a FHIR R4 server at MHERO_TEST_FHIR_URL"]
async fn live_fhir_server_round_trip() {
    let Ok(base) = std::env::var("MHERO_TEST_FHIR_URL") else {
        eprintln!("MHERO_TEST_FHIR_URL is not set; skipping");
        return;
    };
    let mut settings = settings(&base);
    settings.timeout_secs = 30;
    let store = HttpFhirStore::new(&settings).expect("store builds");
    store.check().await.expect("server reachable");

    let value = uuid::Uuid::new_v4().to_string();
    let identifier = format!("urn:mhero:test|{value}");
    let created = store
        .create(
            json!({
                "resourceType": "Patient",
                "identifier": [{ "system": "urn:mhero:test", "value": value }],
                "name": [{ "family": "Roundtrip" }]
            }),
            Some(&format!("identifier={identifier}")),
        )
        .await
        .expect("create");
    assert_eq!(created.kind, WriteKind::Created);
    let id = created.stored.id.clone();

    let read = store.read("Patient", &id).await.expect("read");
    assert_eq!(read.version_id, created.stored.version_id);

    let mut changed = read.resource.clone();
    changed["name"][0]["family"] = json!("Roundtrip-2");
    let updated = store
        .update("Patient", &id, changed, Some(&read.version_id))
        .await
        .expect("update");
    assert_eq!(updated.kind, WriteKind::Updated);
    assert_ne!(updated.stored.version_id, read.version_id);

    let stale = store
        .update(
            "Patient",
            &id,
            read.resource.clone(),
            Some(&read.version_id),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(stale, StoreError::VersionConflict { .. }),
        "{stale:?}"
    );

    let page = store
        .search(SearchRequest {
            resource_type: "Patient".into(),
            params: vec![("identifier".into(), identifier.clone())],
            ..Default::default()
        })
        .await
        .expect("search");
    assert_eq!(page.matches.len(), 1);
    assert_eq!(page.matches[0].id, id);
    assert_eq!(page.matches[0].resource["name"][0]["family"], "Roundtrip-2");

    assert!(
        store
            .delete("Patient", &id, None)
            .await
            .expect("delete")
            .is_some()
    );
    let err = store.read("Patient", &id).await.unwrap_err();
    assert!(matches!(err, StoreError::Gone { .. }), "{err:?}");
}
