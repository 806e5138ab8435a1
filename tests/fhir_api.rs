//! The FHIR REST API over HTTP: status codes, headers, content negotiation,
//! bad input, search features, paging, transactions, history.

mod common;

use common::{spawn_app, spawn_app_with};
use reqwest::StatusCode;
use serde_json::{Value, json};

const FHIR_JSON: &str = "application/fhir+json";

async fn post(app: &common::TestApp, path: &str, body: &Value) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .header("content-type", FHIR_JSON)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

async fn put(app: &common::TestApp, path: &str, body: &Value) -> reqwest::Response {
    app.client
        .put(app.url(path))
        .header("content-type", FHIR_JSON)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

async fn get(app: &common::TestApp, path: &str) -> reqwest::Response {
    app.client.get(app.url(path)).send().await.unwrap()
}

async fn json_of(response: reqwest::Response) -> Value {
    response.json().await.expect("JSON body")
}

/// Assert an OperationOutcome whose diagnostics mention `needle`.
async fn assert_outcome(response: reqwest::Response, status: StatusCode, needle: &str) {
    assert_eq!(response.status(), status);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with(FHIR_JSON)
    );
    let body = json_of(response).await;
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    let diagnostics = body["issue"][0]["diagnostics"].as_str().unwrap_or_default();
    assert!(
        diagnostics.contains(needle),
        "'{diagnostics}' should mention '{needle}'"
    );
}

fn practitioner(family: &str) -> Value {
    json!({ "resourceType": "Practitioner", "name": [{ "family": family, "given": ["Test"] }],
            "identifier": [{ "system": "urn:test", "value": family }] })
}

fn ids_of(bundle: &Value, mode: &str) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|e| e["search"]["mode"] == mode)
                .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn create_answers_201_with_location_etag_and_last_modified() {
    let app = spawn_app().await;
    let response = post(&app, "Practitioner", &practitioner("Kamara")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let headers = response.headers().clone();
    let body = json_of(response).await;
    let id = body["id"].as_str().unwrap();
    assert_eq!(
        headers["location"],
        format!("{}/Practitioner/{id}/_history/1", app.fhir).as_str()
    );
    assert_eq!(headers["etag"], "W/\"1\"");
    assert!(headers.contains_key("last-modified"));
    assert!(headers.contains_key("x-request-id"));

    let read = get(&app, &format!("Practitioner/{id}")).await;
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(read.headers()["etag"], "W/\"1\"");
    app.stop().await;
}

#[tokio::test]
async fn prefer_return_controls_the_body() {
    let app = spawn_app().await;
    let minimal = app
        .client
        .post(app.url("Practitioner"))
        .header("content-type", FHIR_JSON)
        .header("prefer", "return=minimal")
        .body(practitioner("Minimal").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(minimal.status(), StatusCode::CREATED);
    assert!(minimal.headers().contains_key("location"));
    assert!(minimal.bytes().await.unwrap().is_empty());
    let outcome = app
        .client
        .post(app.url("Practitioner"))
        .header("content-type", FHIR_JSON)
        .header("prefer", "return=OperationOutcome")
        .body(practitioner("Outcome").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(outcome.status(), StatusCode::CREATED);
    assert_eq!(json_of(outcome).await["resourceType"], "OperationOutcome");
    app.stop().await;
}

#[tokio::test]
async fn update_if_match_delete_and_gone() {
    let app = spawn_app().await;
    let mut resource = practitioner("Flomo");
    resource["id"] = json!("P1");
    let created = put(&app, "Practitioner/P1", &resource).await;
    assert_eq!(created.status(), StatusCode::CREATED, "update-as-create");

    resource["active"] = json!(true);
    let stale = app
        .client
        .put(app.url("Practitioner/P1"))
        .header("content-type", FHIR_JSON)
        .header("if-match", "W/\"5\"")
        .body(resource.to_string())
        .send()
        .await
        .unwrap();
    assert_outcome(stale, StatusCode::PRECONDITION_FAILED, "expected version 5").await;
    let fresh = app
        .client
        .put(app.url("Practitioner/P1"))
        .header("content-type", FHIR_JSON)
        .header("if-match", "W/\"1\"")
        .body(resource.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.status(), StatusCode::OK);
    assert_eq!(fresh.headers()["etag"], "W/\"2\"");

    let unchanged = put(&app, "Practitioner/P1", &resource).await;
    assert_eq!(unchanged.status(), StatusCode::OK);
    assert_eq!(
        unchanged.headers()["etag"],
        "W/\"2\"",
        "an equal body makes no new version"
    );

    let wrong_delete = app
        .client
        .delete(app.url("Practitioner/P1"))
        .header("if-match", "W/\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_delete.status(), StatusCode::PRECONDITION_FAILED);
    let deleted = app
        .client
        .delete(app.url("Practitioner/P1"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::OK);
    assert_outcome(
        get(&app, "Practitioner/P1").await,
        StatusCode::GONE,
        "deleted",
    )
    .await;
    let old = get(&app, "Practitioner/P1/_history/1").await;
    assert_eq!(old.status(), StatusCode::OK);

    let history = json_of(get(&app, "Practitioner/P1/_history").await).await;
    assert_eq!(history["type"], "history");
    let methods: Vec<&str> = history["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["request"]["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, vec!["DELETE", "PUT", "POST"]);
    assert_outcome(
        get(&app, "Practitioner/never/_history").await,
        StatusCode::NOT_FOUND,
        "Practitioner/never",
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn conditional_create_and_conditional_update() {
    let app = spawn_app().await;
    let send = |body: Value| {
        app.client
            .post(app.url("CommunicationRequest"))
            .header("content-type", FHIR_JSON)
            .header("if-none-exist", "identifier=urn:ihris|req-1")
            .body(body.to_string())
            .send()
    };
    let request = json!({ "resourceType": "CommunicationRequest", "status": "active",
                          "identifier": [{ "system": "urn:ihris", "value": "req-1" }],
                          "recipient": [{ "reference": "Practitioner/p1" }],
                          "payload": [{ "contentString": "Hello" }] });
    let first = send(request.clone()).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first_id = json_of(first).await["id"].as_str().unwrap().to_string();
    let second = send(request).await.unwrap();
    assert_eq!(
        second.status(),
        StatusCode::OK,
        "a resubmission does not create a second request"
    );
    assert_eq!(json_of(second).await["id"], first_id);

    let body = json!({ "resourceType": "Practitioner", "identifier": [{ "system": "urn:emp", "value": "77" }], "active": true });
    let created = put(&app, "Practitioner?identifier=urn:emp|77", &body).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let id = json_of(created).await["id"].as_str().unwrap().to_string();
    let mut body2 = body.clone();
    body2["active"] = json!(false);
    let updated = put(&app, "Practitioner?identifier=urn:emp|77", &body2).await;
    assert_eq!(updated.status(), StatusCode::OK);
    assert_eq!(json_of(updated).await["id"], id);
    assert_outcome(
        put(&app, "Practitioner", &body).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "conditional update",
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_named_4xx() {
    let app = spawn_app_with(&[("MHERO__SERVER__MAX_BODY_BYTES", "2000")]).await;
    let raw = |path: &str, content_type: &str, body: &str| {
        app.client
            .post(app.url(path))
            .header("content-type", content_type)
            .body(body.to_string())
            .send()
    };
    assert_outcome(
        raw("Patient", FHIR_JSON, "{\"resourceType\": ")
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "not valid JSON",
    )
    .await;
    assert_outcome(
        raw("Patient", FHIR_JSON, "[1,2]").await.unwrap(),
        StatusCode::BAD_REQUEST,
        "an array",
    )
    .await;
    assert_outcome(
        raw("Patient", FHIR_JSON, "").await.unwrap(),
        StatusCode::BAD_REQUEST,
        "no body",
    )
    .await;
    assert_outcome(
        raw("Patient", FHIR_JSON, "{\"resourceType\":\"Practitioner\"}")
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "does not match",
    )
    .await;
    assert_outcome(
        raw("Patient", FHIR_JSON, "{\"name\":[]}").await.unwrap(),
        StatusCode::BAD_REQUEST,
        "no resourceType",
    )
    .await;
    assert_outcome(
        raw(
            "Patient",
            FHIR_JSON,
            "{\"resourceType\":\"Patient\",\"id\":\"a/b\"}",
        )
        .await
        .unwrap(),
        StatusCode::BAD_REQUEST,
        "not a valid FHIR id",
    )
    .await;
    assert_outcome(
        raw(
            "MedicationRequest",
            FHIR_JSON,
            "{\"resourceType\":\"MedicationRequest\"}",
        )
        .await
        .unwrap(),
        StatusCode::NOT_FOUND,
        "Practitioner",
    )
    .await;
    assert_outcome(
        raw("Patient", "application/fhir+xml", "<Patient/>")
            .await
            .unwrap(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "application/fhir+xml",
    )
    .await;
    let big = format!(
        "{{\"resourceType\":\"Patient\",\"text\":{{\"div\":\"{}\"}}}}",
        "x".repeat(5000)
    );
    assert_outcome(
        raw("Patient", FHIR_JSON, &big).await.unwrap(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "2000 bytes",
    )
    .await;

    let mut body = practitioner("Id");
    body["id"] = json!("other");
    assert_outcome(
        put(&app, "Practitioner/mine", &body).await,
        StatusCode::BAD_REQUEST,
        "does not match 'mine'",
    )
    .await;

    let xml = app
        .client
        .get(app.url("Patient/1"))
        .header("accept", "application/fhir+xml")
        .send()
        .await
        .unwrap();
    assert_outcome(xml, StatusCode::NOT_ACCEPTABLE, "application/fhir+xml").await;
    assert_outcome(
        get(&app, "Patient?_format=xml").await,
        StatusCode::NOT_ACCEPTABLE,
        "_format=xml",
    )
    .await;
    let patch = app
        .client
        .patch(app.url("Patient/1"))
        .header("content-type", FHIR_JSON)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_outcome(patch, StatusCode::METHOD_NOT_ALLOWED, "PATCH").await;
    assert_outcome(
        app.client
            .get(format!("{}/nowhere", app.base))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "/nowhere",
    )
    .await;
    // Bad search requests: each a 400 OperationOutcome naming the problem.
    for (query, needle) in [
        ("Patient?shoe-size=9", "shoe-size"),
        ("Patient?_count=100000", "maximum page size"),
        (
            "CommunicationRequest?authored=yesterday",
            "not a valid date",
        ),
        ("Patient?name:fuzzy=x", ":fuzzy"),
        ("Patient?_sort=birthdate", "_sort=birthdate"),
        ("Patient?_include=Patient:organization", "_include"),
        ("Patient?_cursor=garbage", "cursor"),
    ] {
        assert_outcome(get(&app, query).await, StatusCode::BAD_REQUEST, needle).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn lenient_handling_ignores_unknown_parameters_with_a_warning() {
    let app = spawn_app().await;
    post(&app, "Practitioner", &practitioner("Lenient")).await;
    let response = app
        .client
        .get(app.url("Practitioner?shoe-size=9&_count=5000"))
        .header("prefer", "handling=lenient")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bundle = json_of(response).await;
    assert_eq!(bundle["total"], 1);
    let outcome = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["search"]["mode"] == "outcome")
        .unwrap();
    let text = outcome["resource"]["issue"][0]["diagnostics"]
        .as_str()
        .unwrap();
    assert!(
        text.contains("shoe-size") && text.contains("clamped"),
        "{text}"
    );
    app.stop().await;
}

#[tokio::test]
async fn search_features_over_the_api() {
    let app = spawn_app().await;
    let bundle = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            { "resource": { "resourceType": "Location", "id": "district", "name": "Bong District" }, "request": { "method": "PUT", "url": "Location/district" } },
            { "resource": { "resourceType": "Location", "id": "clinic", "name": "Gbarnga Clinic", "partOf": { "reference": "Location/district" } }, "request": { "method": "PUT", "url": "Location/clinic" } },
            { "resource": { "resourceType": "Practitioner", "id": "nurse", "name": [{ "family": "Gbowee", "given": ["Léymah"] }],
                            "telecom": [{ "system": "phone", "value": "+231770000001" }], "meta": { "tag": [{ "system": "http://mhero.org/codesystem", "code": "optedout" }] } },
              "request": { "method": "PUT", "url": "Practitioner/nurse" } },
            { "resource": { "resourceType": "Practitioner", "id": "doctor", "name": [{ "family": "Sirleaf", "given": ["Ellen"] }],
                            "meta": { "profile": ["http://ihris.org/fhir/StructureDefinition/ihris-practitioner"] } },
              "request": { "method": "PUT", "url": "Practitioner/doctor" } },
            { "resource": { "resourceType": "PractitionerRole", "id": "role", "active": true, "practitioner": { "reference": "Practitioner/nurse" },
                            "location": [{ "reference": "Location/clinic" }],
                            "code": [{ "coding": [{ "system": "http://ihris.org/fhir/CodeSystem/ihris-job", "code": "midwife" }] }] },
              "request": { "method": "PUT", "url": "PractitionerRole/role" } },
            { "resource": { "resourceType": "CommunicationRequest", "id": "cr", "status": "active", "authoredOn": "2024-03-05T10:00:00Z",
                            "recipient": [{ "reference": "Practitioner/nurse" }], "payload": [{ "contentString": "Hi" }] },
              "request": { "method": "PUT", "url": "CommunicationRequest/cr" } }
        ]
    });
    assert_eq!(post(&app, "", &bundle).await.status(), StatusCode::OK);

    let app_ref = &app;
    let search = |query: &'static str| async move { json_of(get(app_ref, query).await).await };
    assert_eq!(
        ids_of(&search("Practitioner?name=leymah").await, "match"),
        vec!["nurse"],
        "accent-insensitive"
    );
    assert_eq!(
        ids_of(&search("Practitioner?name:exact=Léymah").await, "match"),
        vec!["nurse"]
    );
    assert!(ids_of(&search("Practitioner?name:exact=leymah").await, "match").is_empty());
    assert_eq!(
        ids_of(&search("Practitioner?name:contains=owe").await, "match"),
        vec!["nurse"]
    );
    assert_eq!(
        ids_of(&search("Practitioner?phone=%2B231770000001").await, "match"),
        vec!["nurse"]
    );
    assert_eq!(
        ids_of(&search("Practitioner?phone:missing=true").await, "match"),
        vec!["doctor"]
    );
    assert_eq!(
        ids_of(
            &search("Practitioner?_tag=http://mhero.org/codesystem|optedout").await,
            "match"
        ),
        vec!["nurse"]
    );
    assert_eq!(
        ids_of(
            &search("Practitioner?_tag:not=http://mhero.org/codesystem|optedout").await,
            "match"
        ),
        vec!["doctor"]
    );
    assert_eq!(
        ids_of(
            &search(
                "Practitioner?_profile=http://ihris.org/fhir/StructureDefinition/ihris-practitioner"
            )
            .await,
            "match"
        ),
        vec!["doctor"]
    );
    assert_eq!(
        ids_of(
            &search("Practitioner?_id=doctor,nurse&_sort=name").await,
            "match"
        ),
        vec!["nurse", "doctor"],
        "gbowee before sirleaf"
    );
    assert_eq!(
        ids_of(
            &search("Practitioner?_id=doctor,nurse&_sort=-name").await,
            "match"
        ),
        vec!["doctor", "nurse"]
    );
    assert_eq!(
        ids_of(&search("PractitionerRole?role=midwife").await, "match"),
        vec!["role"]
    );
    assert_eq!(
        ids_of(
            &search("PractitionerRole?role=http://ihris.org/fhir/CodeSystem/ihris-job|midwife")
                .await,
            "match"
        ),
        vec!["role"]
    );
    assert!(
        ids_of(
            &search("PractitionerRole?role=urn:other|midwife").await,
            "match"
        )
        .is_empty()
    );
    let with_includes = search("PractitionerRole?location=clinic&_include=PractitionerRole:practitioner&_include=PractitionerRole:location").await;
    let mut included = ids_of(&with_includes, "include");
    included.sort();
    assert_eq!(included, vec!["clinic", "nurse"]);
    let reverse = search("Practitioner?_id=nurse&_revinclude=PractitionerRole:practitioner").await;
    assert_eq!(ids_of(&reverse, "include"), vec!["role"]);
    let below = search("Location?_id=district&_revinclude:iterate=Location:partof").await;
    assert_eq!(ids_of(&below, "include"), vec!["clinic"]);
    assert_eq!(
        ids_of(
            &search("CommunicationRequest?authored=2024-03").await,
            "match"
        ),
        vec!["cr"]
    );
    assert_eq!(
        ids_of(
            &search("CommunicationRequest?authored=ge2024-03-05&authored=lt2024-03-06").await,
            "match"
        ),
        vec!["cr"]
    );
    assert!(
        ids_of(
            &search("CommunicationRequest?authored=gt2024-03-05").await,
            "match"
        )
        .is_empty(),
        "gt a day excludes that day"
    );
    assert_eq!(
        ids_of(
            &search("CommunicationRequest?recipient=Practitioner/nurse&status=active").await,
            "match"
        ),
        vec!["cr"]
    );
    assert_eq!(
        ids_of(
            &search("Practitioner?_lastUpdated=gt2020-01-01").await,
            "match"
        )
        .len(),
        2
    );
    assert!(
        ids_of(
            &search("Practitioner?_lastUpdated=lt2020-01-01").await,
            "match"
        )
        .is_empty()
    );
    let count = search("Practitioner?_summary=count").await;
    assert_eq!(count["total"], 2);
    assert!(count.get("entry").is_none());

    let form = app
        .client
        .post(app.url("Practitioner/_search"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("family=sirl")
        .send()
        .await
        .unwrap();
    assert_eq!(ids_of(&json_of(form).await, "match"), vec!["doctor"]);
    app.stop().await;
}

#[tokio::test]
async fn paging_links_stay_correct_while_writes_happen() {
    let app = spawn_app().await;
    for i in 0..7 {
        post(&app, "Practitioner", &practitioner(&format!("Page{i}"))).await;
    }
    let mut next = Some(app.url("Practitioner?family=page&_count=3"));
    let mut seen: Vec<String> = Vec::new();
    let mut round = 0;
    while let Some(url) = next {
        let bundle: Value = app
            .client
            .get(&url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            bundle["link"][0]["url"]
                .as_str()
                .unwrap()
                .starts_with(&app.fhir)
        );
        seen.extend(ids_of(&bundle, "match"));
        // Writes between pages: a new match and a deletion of something already seen.
        if round == 0 {
            post(&app, "Practitioner", &practitioner("PageLate")).await;
            app.client
                .delete(app.url(&format!("Practitioner/{}", seen[0])))
                .send()
                .await
                .unwrap();
        }
        round += 1;
        next = bundle["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_string());
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "no resource twice");
    assert_eq!(
        seen.len(),
        8,
        "the 7 originals and the one created while paging"
    );
    app.stop().await;
}

#[tokio::test]
async fn transaction_over_http_rolls_back_and_names_the_entry() {
    let app = spawn_app().await;
    let bundle = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            { "fullUrl": "urn:uuid:a0000000-0000-4000-8000-000000000001", "resource": practitioner("Tx"), "request": { "method": "POST", "url": "Practitioner" } },
            { "resource": { "resourceType": "PractitionerRole", "practitioner": { "reference": "urn:uuid:a0000000-0000-4000-8000-00000000dead" } },
              "request": { "method": "POST", "url": "PractitionerRole" } }
        ]
    });
    let response = post(&app, "", &bundle).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let outcome = json_of(response).await;
    assert_eq!(outcome["issue"][0]["expression"][0], "Bundle.entry[1]");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("urn:uuid:a0000000-0000-4000-8000-00000000dead")
    );
    let search = json_of(get(&app, "Practitioner?identifier=urn:test|Tx").await).await;
    assert_eq!(
        search["total"], 0,
        "nothing of the failed transaction was written"
    );

    let not_a_bundle = post(&app, "", &json!({ "resourceType": "Patient" })).await;
    assert_outcome(not_a_bundle, StatusCode::BAD_REQUEST, "expects a Bundle").await;
    let collection = post(
        &app,
        "",
        &json!({ "resourceType": "Bundle", "type": "collection" }),
    )
    .await;
    assert_outcome(collection, StatusCode::BAD_REQUEST, "batch or transaction").await;
    let conditional_reference = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [{ "resource": { "resourceType": "PractitionerRole", "practitioner": { "reference": "Practitioner?identifier=urn:test|nobody" } },
                    "request": { "method": "POST", "url": "PractitionerRole" } }]
    });
    assert_outcome(
        post(&app, "", &conditional_reference).await,
        StatusCode::BAD_REQUEST,
        "matches no resource",
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn type_and_system_history() {
    let app = spawn_app().await;
    for i in 0..3 {
        post(
            &app,
            "Organization",
            &json!({ "resourceType": "Organization", "name": format!("Org {i}") }),
        )
        .await;
    }
    let page = json_of(get(&app, "Organization/_history?_count=2").await).await;
    assert_eq!(page["type"], "history");
    assert_eq!(page["total"], 3);
    assert_eq!(page["entry"].as_array().unwrap().len(), 2);
    let next = page["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let rest: Value = app
        .client
        .get(next)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rest["entry"].as_array().unwrap().len(), 1);
    let system = json_of(get(&app, "_history?_since=2020-01-01T00:00:00Z").await).await;
    // The Organizations and the conformance resources loaded at start-up.
    assert_eq!(
        system["total"],
        3 + mhero::fhir::profiles::PROFILE_FILES.len()
    );
    assert_outcome(
        get(&app, "_history?_since=soon").await,
        StatusCode::BAD_REQUEST,
        "_since",
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn capability_statement_lists_types_and_parameters() {
    let app = spawn_app().await;
    let cs = json_of(get(&app, "metadata").await).await;
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    let resources = cs["rest"][0]["resource"].as_array().unwrap();
    let comm = resources
        .iter()
        .find(|r| r["type"] == "CommunicationRequest")
        .unwrap();
    let names: Vec<&str> = comm["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for expected in [
        "status",
        "recipient",
        "identifier",
        "group-identifier",
        "category",
        "occurrence",
        "authored",
        "requester",
    ] {
        assert!(names.contains(&expected), "{expected}");
    }
    app.stop().await;
}
