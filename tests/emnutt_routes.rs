//! The emNutt-compatible routes with iHRIS-shaped bodies (reference
//! `emnutt.md` §2.1 and §2.5): submission, progress derived from FHIR while
//! the dispatcher (driven with `run_once()`) sends, opt-out and its undo,
//! the FHIR API under `/emNutt/fhir`, `/sync` triggers, and auth.

mod common;

use std::sync::Arc;

use mhero::jobs::dispatch::Dispatcher;
use mhero::pipeline::phone::PhoneNormalizer;
use mhero::rapidpro::sandbox::{SandboxServer, SandboxSettings};
use mhero::store::SharedStore;
use mhero::store::sqlite::SqliteStore;
use serde_json::{Value, json};

async fn store_with_people(dir: &tempfile::TempDir) -> SharedStore {
    let store: SharedStore = Arc::new(
        SqliteStore::open(&dir.path().join("shared.sqlite"))
            .await
            .unwrap(),
    );
    for (id, phone) in [
        ("p1", Some("0770001001")),
        ("p2", Some("0770001002")),
        ("p3", None),
    ] {
        let mut p = json!({ "resourceType": "Practitioner", "id": id, "name": [{ "text": format!("Health Worker {id}") }] });
        if let Some(phone) = phone {
            p["telecom"] = json!([{ "system": "phone", "value": phone }]);
        }
        store.update("Practitioner", id, p, None).await.unwrap();
    }
    store
}

/// What iHRIS posts (`ihris-backend/routes/mhero.js`).
fn ihris_submission(parent: &str) -> Value {
    json!({
        "resourceType": "CommunicationRequest",
        "meta": { "tag": [{ "system": "parentReqId", "code": parent }] },
        "extension": [{ "url": "sender", "valueReference": { "reference": "Person/admin" } }],
        "payload": [{ "contentString": "Please confirm your facility" }],
        "recipient": [
            { "reference": "Practitioner/p1" },
            { "reference": "Practitioner/p2" },
            { "reference": "Practitioner/p3" }
        ],
        "occurrenceDateTime": "2026-11-22T09:00:00Z"
    })
}

#[tokio::test]
async fn an_ihris_submission_is_stored_sent_and_its_progress_reported() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_people(&dir).await;
    let app = common::spawn_app_on(Arc::clone(&store), &[]).await;
    let parent = "0b6a4d6e-3c1f-4b3e-9a53-2f7f0d5c8a10";

    let response = app
        .client
        .post(format!("{}/emNutt/fhir/CommunicationRequest", app.base))
        .json(&ihris_submission(parent))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["status"], "Processing");
    let req_id = answer["reqID"].as_str().unwrap().to_string();

    let stored = store
        .read("CommunicationRequest", &req_id)
        .await
        .unwrap()
        .resource;
    assert_eq!(stored["status"], "active");
    assert_eq!(stored["groupIdentifier"]["value"], parent);
    assert!(
        stored["meta"]["tag"].is_null(),
        "the parentReqId tag is consumed: {stored}"
    );

    let progress = |ids: Value| {
        let url = format!("{}/emNutt/fhir/getProgress", app.base);
        let client = app.client.clone();
        async move {
            let response = client
                .get(url)
                .query(&[("requestIDs", ids.to_string())])
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()
        }
    };
    let before =
        progress(json!({ "childrenReqIDs": [req_id, "unknown-id"], "parentReqId": parent })).await;
    assert_eq!(before[0]["status"], "Preparing Data");
    assert_eq!(before[0]["totalRecords"], 3);
    assert_eq!(before[0]["processedRecords"], 0);
    assert!(before[1].is_null());

    // The dispatcher sends it (driven here instead of in the background).
    let sandbox = SandboxServer::start(SandboxSettings::default())
        .await
        .unwrap();
    let settings = common::test_settings(&dir, &[]);
    let dispatcher = Dispatcher::new(
        Arc::clone(&store),
        common::rapidpro_client_for(&sandbox).await,
        Arc::new(PhoneNormalizer::new(Some("LR")).unwrap()),
        settings.messaging,
    );
    let report = dispatcher.run_once().await.unwrap();
    assert_eq!((report.sent, report.not_done), (2, 1), "{report:?}");

    let after =
        progress(json!({ "childrenReqIDs": [format!("CommunicationRequest/{req_id}")] })).await;
    let p = &after[0];
    assert_eq!(p["status"], "done");
    assert_eq!(
        (p["totalRecords"].as_u64(), p["processedRecords"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(p["percent"], 100.0);
    let counts = &p["sendStatus"][&req_id]["Please confirm your facility"];
    assert_eq!(
        (
            counts["success"].as_u64(),
            counts["failed"].as_u64(),
            counts["ignored"].as_u64()
        ),
        (Some(2), Some(1), Some(0))
    );
    assert_eq!(
        counts["descriptions"]["Health Worker p3"],
        "no phone number"
    );

    let cleared = app
        .client
        .get(format!("{}/emNutt/fhir/clearProgress", app.base))
        .query(&[(
            "requestIDs",
            json!({ "childrenReqIDs": [req_id] }).to_string(),
        )])
        .send()
        .await
        .unwrap();
    assert_eq!(cleared.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn bad_progress_queries_and_bad_submissions_get_a_named_4xx() {
    let app = common::spawn_app().await;
    for query in ["not json", "{\"parentReqId\": \"x\"}"] {
        let response = app
            .client
            .get(format!("{}/emNutt/fhir/getProgress", app.base))
            .query(&[("requestIDs", query)])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let outcome: Value = response.json().await.unwrap();
        assert!(
            outcome["issue"][0]["diagnostics"]
                .as_str()
                .unwrap()
                .contains("requestIDs"),
            "{outcome}"
        );
    }
    let mut no_recipients = ihris_submission("p");
    no_recipients["recipient"] = json!([]);
    let response = app
        .client
        .post(format!("{}/emNutt/fhir/CommunicationRequest", app.base))
        .json(&no_recipients)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let response = app
        .client
        .post(format!("{}/emNutt/fhir/CommunicationRequest", app.base))
        .json(&json!({ "resourceType": "Patient" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    app.stop().await;
}

#[tokio::test]
async fn opt_out_and_undo_set_and_remove_the_tag() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_people(&dir).await;
    let app = common::spawn_app_on(Arc::clone(&store), &[]).await;
    let tagged = |resource: &Value| {
        resource["meta"]["tag"].as_array().is_some_and(|t| {
            t.iter()
                .any(|t| t["code"] == "optedout" && t["system"] == "http://mhero.org/codesystem")
        })
    };
    let response = app
        .client
        .put(format!("{}/emNutt/optout", app.base))
        .json(&json!([{ "entitytype": "Practitioner", "globalid": "p1" }]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(tagged(
        &store.read("Practitioner", "p1").await.unwrap().resource
    ));
    // The query form, for the second person.
    let response = app
        .client
        .put(format!(
            "{}/emNutt/optout?globalid=p2&entitytype=Practitioner",
            app.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(tagged(
        &store.read("Practitioner", "p2").await.unwrap().resource
    ));

    let response = app
        .client
        .put(format!("{}/emNutt/undoOptout", app.base))
        .json(&json!([{ "entitytype": "Practitioner", "globalid": "p1" }, { "entitytype": "Practitioner", "globalid": "ghost" }]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404, "one of them does not exist");
    let entries: Value = response.json().await.unwrap();
    assert_eq!(entries[0]["response"]["status"], "200 OK");
    assert!(
        entries[1]["response"]["status"]
            .as_str()
            .unwrap()
            .starts_with("404")
    );
    assert!(!tagged(
        &store.read("Practitioner", "p1").await.unwrap().resource
    ));

    for bad in [
        json!({ "globalid": "p1" }),
        json!([{ "entitytype": "Observation", "globalid": "o" }]),
    ] {
        let response = app
            .client
            .put(format!("{}/emNutt/optout", app.base))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{bad}");
    }
    app.stop().await;
}

#[tokio::test]
async fn the_fhir_api_answers_under_emnutt_fhir_and_sync_triggers_are_named() {
    let app = common::spawn_app_with(&[("MHERO__AUTH__API_KEYS", "secret-key")]).await;
    let with_key = |r: reqwest::RequestBuilder| r.bearer_auth("secret-key");
    let response = with_key(
        app.client
            .put(format!("{}/emNutt/fhir/Practitioner/x1", app.base)),
    )
    .json(&json!({ "resourceType": "Practitioner", "id": "x1" }))
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 201);
    let read = with_key(app.client.get(app.url("Practitioner/x1")))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    let search: Value = with_key(app.client.get(format!(
        "{}/emNutt/fhir/CommunicationRequest?status=active",
        app.base
    )))
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(search["resourceType"], "Bundle");

    for path in [
        "/emNutt/fhir/Practitioner/x1",
        "/emNutt/fhir/getProgress?requestIDs={}",
        "/sync/syncContacts",
    ] {
        let response = app
            .client
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{path} needs the key");
    }
    let paused = with_key(
        app.client
            .get(format!("{}/sync/checkCommunicationRequest", app.base)),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(paused.status(), 503, "no RapidPro configured");
    let unknown = with_key(app.client.get(format!("{}/sync/cacheFHIR2ES", app.base)))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let outcome: Value = unknown.json().await.unwrap();
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("syncContacts")
    );
    app.stop().await;
}

#[tokio::test]
async fn cancel_message_schedule_revokes_each_named_request() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_people(&dir).await;
    let app = common::spawn_app_on(Arc::clone(&store), &[]).await;
    let mut weekly = ihris_submission("parent");
    weekly["extension"] = json!([{ "url": "http://mhero.org/fhir/StructureDefinition/sms-cron-expression-schedule",
        "extension": [{ "url": "cronExpression", "valueString": "0 8 * * 1" }, { "url": "frequency", "valueString": "recurring" }] }]);
    let mut ids = Vec::new();
    for body in [weekly, ihris_submission("parent")] {
        let answer: Value = app
            .client
            .post(format!("{}/emNutt/fhir/CommunicationRequest", app.base))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(answer["reqID"].as_str().unwrap().to_string());
    }
    let response = app
        .client
        .post(format!("{}/emNutt/fhir/cancelMessageSchedule", app.base))
        .json(
            &json!({ "schedules": [format!("CommunicationRequest/{}", ids[0]), ids[1], "ghost"] }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404, "one of them does not exist");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["status"], "Processing");
    assert_eq!(answer["reqID"], ids[0].as_str());
    assert_eq!(
        answer["results"][2]["error"]["resourceType"],
        "OperationOutcome"
    );
    for id in &ids {
        let request = store
            .read("CommunicationRequest", id)
            .await
            .unwrap()
            .resource;
        assert_eq!(request["status"], "revoked", "{id}");
    }
    let bad = app
        .client
        .post(format!("{}/emNutt/fhir/cancelMessageSchedule", app.base))
        .json(&json!({ "schedules": [] }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    app.stop().await;
}
