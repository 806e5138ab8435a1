//! The dispatcher against RapidPro faults served by wiremock: a 500 that
//! created nothing and one that did, a timeout after RapidPro acted, a 429
//! storm, a refused URN and a contact RapidPro no longer knows. In every
//! case each recipient ends up sent exactly once, and a broadcast is never
//! created twice. Then the delivery poll against recorded-shape answers:
//! each failure gets its coded reason (a stopped contact, a channel error,
//! a contact RapidPro skipped, a failed broadcast).

mod common;

use std::sync::Arc;
use std::time::Duration;

use mhero::config::Secret;
use mhero::jobs::dispatch::Dispatcher;
use mhero::pipeline::phone::PhoneNormalizer;
use mhero::rapidpro::client::{ClientOptions, RapidProClient};
use mhero::rapidpro::throttle::Throttle;
use mhero::store::SharedStore;
use mhero::store::sqlite::SqliteStore;
use serde_json::{Value, json};
use url::Url;
use wiremock::matchers::{body_partial_json, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const TEXT: &str = "Cholera alert: report cases today";
const URNS: [&str; 3] = [
    "tel:+231770001001",
    "tel:+231770001002",
    "tel:+231770001003",
];

struct Setup {
    _dir: tempfile::TempDir,
    store: SharedStore,
    server: MockServer,
    dispatcher: Dispatcher,
}

async fn setup(contact_uuid_for_first: Option<&str>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore = Arc::new(
        SqliteStore::open(&dir.path().join("fhir.sqlite"))
            .await
            .unwrap(),
    );
    for (i, urn) in URNS.iter().enumerate() {
        let id = format!("p{i}");
        let mut p = json!({ "resourceType": "Practitioner", "id": id,
            "telecom": [{ "system": "phone", "value": urn.trim_start_matches("tel:") }] });
        if i == 0
            && let Some(uuid) = contact_uuid_for_first
        {
            p["identifier"] =
                json!([{ "system": "http://app.rapidpro.io/contact-uuid", "value": uuid }]);
        }
        store.update("Practitioner", &id, p, None).await.unwrap();
    }
    store
        .update(
            "CommunicationRequest",
            "alert",
            json!({ "resourceType": "CommunicationRequest", "id": "alert", "status": "active",
                "recipient": [{ "reference": "Practitioner/p0" }, { "reference": "Practitioner/p1" }, { "reference": "Practitioner/p2" }],
                "payload": [{ "contentString": TEXT }] }),
            None,
        )
        .await
        .unwrap();
    let server = MockServer::start().await;
    let client = client_for(&server);
    let settings = common::test_settings(&dir, &[]);
    let dispatcher = Dispatcher::new(
        Arc::clone(&store),
        client,
        Arc::new(PhoneNormalizer::new(Some("LR")).unwrap()),
        settings.messaging,
    );
    Setup {
        _dir: dir,
        store,
        server,
        dispatcher,
    }
}

fn client_for(server: &MockServer) -> RapidProClient {
    mhero::install_tls_provider();
    RapidProClient::new(
        &Url::parse(&server.uri()).unwrap(),
        &Secret::new("token"),
        ClientOptions {
            timeout: Duration::from_millis(300),
            max_retries: 2,
            backoff: Duration::from_millis(5),
            max_throttle_wait: Duration::from_secs(1),
        },
        Throttle::uniform(1_000_000),
    )
    .unwrap()
}

fn broadcast(uuid: &str, urns: &[&str]) -> Value {
    json!({
        "uuid": uuid, "id": 7, "status": "pending", "progress": { "total": -1, "started": 0 },
        "urns": urns, "contacts": [], "groups": [], "text": { "eng": TEXT },
        "attachments": { "eng": [] }, "quick_replies": { "eng": [] }, "base_language": "eng",
        "created_on": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
    })
}

fn page(results: Vec<Value>) -> Value {
    json!({ "next": null, "previous": null, "results": results })
}

async fn outbox(store: &SharedStore) -> Vec<Value> {
    common::outbox_of(store.as_ref(), "alert").await
}

fn statuses(outbox: &[Value]) -> Vec<&str> {
    let mut s: Vec<&str> = outbox
        .iter()
        .map(|c| c["status"].as_str().unwrap())
        .collect();
    s.sort();
    s
}

fn sent_as(outbox: &[Value], uuid: &str) -> bool {
    outbox.iter().all(|c| {
        c["identifier"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["system"] == "http://app.rapidpro.io/broadcast-uuid" && i["value"] == uuid)
    })
}

async fn posts(server: &MockServer) -> Vec<Value> {
    server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.method.as_str() == "POST" && r.url.path() == "/api/v2/broadcasts.json")
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect()
}

#[tokio::test]
async fn a_500_that_created_nothing_is_sent_again_after_reconciling() {
    let s = setup(None).await;
    Mock::given(method("POST"))
        .and(path("/api/v2/broadcasts.json"))
        .respond_with(ResponseTemplate::new(500).set_body_string("Server Error"))
        .up_to_n_times(1)
        .mount(&s.server)
        .await;
    let error = s.dispatcher.run_once().await.unwrap_err();
    assert!(error.to_string().contains("500"), "{error}");
    assert_eq!(statuses(&outbox(&s.store).await), vec!["preparation"; 3]);

    Mock::given(method("GET"))
        .and(path("/api/v2/broadcasts.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(vec![])))
        .mount(&s.server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v2/broadcasts.json"))
        .respond_with(ResponseTemplate::new(201).set_body_json(broadcast("b-2", &URNS)))
        .mount(&s.server)
        .await;
    let report = s.dispatcher.run_once().await.unwrap();
    assert_eq!(
        (report.sent, report.reconciled, report.batches_sent),
        (3, 0, 1),
        "{report:?}"
    );
    let entries = outbox(&s.store).await;
    assert_eq!(statuses(&entries), vec!["in-progress"; 3]);
    assert!(sent_as(&entries, "b-2"));
    assert_eq!(posts(&s.server).await.len(), 2, "one failed, one accepted");
}

#[tokio::test]
async fn a_timeout_after_rapidpro_acted_is_found_and_never_sent_twice() {
    let s = setup(None).await;
    Mock::given(method("POST"))
        .and(path("/api/v2/broadcasts.json"))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_json(broadcast("b-1", &URNS))
                .set_delay(Duration::from_secs(2)),
        )
        .mount(&s.server)
        .await;
    let error = s.dispatcher.run_once().await.unwrap_err();
    assert!(error.to_string().contains("did not answer"), "{error}");
    assert_eq!(statuses(&outbox(&s.store).await), vec!["preparation"; 3]);

    // RapidPro did create it: the listing shows it (and an unrelated one).
    let other = json!({ "uuid": "b-other", "urns": ["tel:+231770009999"], "contacts": [], "groups": [],
        "text": { "eng": TEXT }, "created_on": chrono::Utc::now().to_rfc3339() });
    Mock::given(method("GET"))
        .and(path("/api/v2/broadcasts.json"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(page(vec![other, broadcast("b-1", &URNS)])),
        )
        .mount(&s.server)
        .await;
    let report = s.dispatcher.run_once().await.unwrap();
    assert_eq!(
        (report.sent, report.reconciled, report.batches_sent),
        (3, 1, 0),
        "{report:?}"
    );
    assert!(sent_as(&outbox(&s.store).await, "b-1"));
    assert_eq!(posts(&s.server).await.len(), 1, "never re-sent");
}

#[tokio::test]
async fn a_429_storm_is_waited_out_and_sent_once() {
    let s = setup(None).await;
    Mock::given(method("POST"))
        .and(path("/api/v2/broadcasts.json"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("Retry-After", "0")
                .set_body_json(
                    json!({ "detail": "Request was throttled. Expected available in 0 seconds." }),
                ),
        )
        .up_to_n_times(2)
        .mount(&s.server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v2/broadcasts.json"))
        .respond_with(ResponseTemplate::new(201).set_body_json(broadcast("b-3", &URNS)))
        .mount(&s.server)
        .await;
    let report = s.dispatcher.run_once().await.unwrap();
    assert_eq!((report.sent, report.batches_sent), (3, 1), "{report:?}");
    assert!(sent_as(&outbox(&s.store).await, "b-3"));
    assert_eq!(
        posts(&s.server).await.len(),
        3,
        "two throttled, one accepted"
    );
}

#[tokio::test]
async fn a_refused_urn_is_not_done_and_the_others_are_sent() {
    let s = setup(None).await;
    Mock::given(method("POST"))
        .and(path("/api/v2/broadcasts.json"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({ "urns": { "1": ["Invalid URN: tel:+231770001002. Ensure phone numbers contain country codes."] } })))
        .up_to_n_times(1)
        .mount(&s.server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v2/broadcasts.json"))
        .respond_with(
            ResponseTemplate::new(201).set_body_json(broadcast("b-4", &[URNS[0], URNS[2]])),
        )
        .mount(&s.server)
        .await;
    let report = s.dispatcher.run_once().await.unwrap();
    assert_eq!((report.sent, report.not_done), (2, 1), "{report:?}");
    let entries = outbox(&s.store).await;
    let refused = entries.iter().find(|c| c["status"] == "not-done").unwrap();
    assert_eq!(refused["recipient"][0]["reference"], "Practitioner/p1");
    assert!(
        refused["statusReason"]["text"]
            .as_str()
            .unwrap()
            .contains("RapidPro refused the number")
    );
    let calls = posts(&s.server).await;
    assert_eq!(calls[1]["urns"], json!([URNS[0], URNS[2]]));
}

#[tokio::test]
async fn an_unknown_contact_uuid_falls_back_to_urns() {
    let s = setup(Some("5e0e2a1c-2c41-4a58-9b5e-3b4f1c7a9d01")).await;
    Mock::given(method("POST"))
        .and(path("/api/v2/broadcasts.json"))
        .and(body_partial_json(
            json!({ "contacts": ["5e0e2a1c-2c41-4a58-9b5e-3b4f1c7a9d01"] }),
        ))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({ "contacts": ["No such object: 5e0e2a1c-2c41-4a58-9b5e-3b4f1c7a9d01"] }),
        ))
        .mount(&s.server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v2/broadcasts.json"))
        .respond_with(ResponseTemplate::new(201).set_body_json(broadcast("b-5", &URNS)))
        .mount(&s.server)
        .await;
    let report = s.dispatcher.run_once().await.unwrap();
    assert_eq!(report.sent, 3, "{report:?}");
    let calls = posts(&s.server).await;
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[0]["contacts"],
        json!(["5e0e2a1c-2c41-4a58-9b5e-3b4f1c7a9d01"])
    );
    assert!(calls[1].get("contacts").is_none(), "{}", calls[1]);
    assert_eq!(calls[1]["urns"].as_array().unwrap().len(), 3);
}

/// A failed outbound message, in `messages.json`'s shape.
fn failed_message(contact: &str, urn: &str, channel: Option<&str>) -> Value {
    let now = chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    json!({
        "uuid": uuid::Uuid::new_v4().to_string(), "id": 1,
        "contact": { "uuid": contact, "name": "Worker" }, "urn": urn,
        "channel": channel.map(|c| json!({ "uuid": c, "name": "Vonage" })),
        "direction": "out", "type": "text", "status": "failed", "archived": false,
        "visibility": "visible", "text": TEXT, "labels": [], "flow": null, "attachments": [],
        "quick_replies": [], "created_on": now, "sent_on": null, "modified_on": now,
        "media": null, "broadcast": 7
    })
}

fn contact(uuid: &str, status: &str) -> Value {
    json!({ "uuid": uuid, "name": "Worker", "status": status, "language": null,
        "urns": [], "groups": [], "notes": [], "fields": {}, "flow": null,
        "created_on": "2026-01-01T00:00:00.000000Z", "modified_on": "2026-01-01T00:00:00.000000Z",
        "last_seen_on": null })
}

async fn sent_broadcast() -> Setup {
    let s = setup(None).await;
    Mock::given(method("POST"))
        .and(path("/api/v2/broadcasts.json"))
        .respond_with(ResponseTemplate::new(201).set_body_json(broadcast("b-1", &URNS)))
        .mount(&s.server)
        .await;
    s.dispatcher.run_once().await.unwrap();
    assert_eq!(statuses(&outbox(&s.store).await), vec!["in-progress"; 3]);
    s
}

fn reason_of<'a>(outbox: &'a [Value], practitioner: &str) -> (&'a str, &'a str) {
    let entry = outbox
        .iter()
        .find(|c| c["recipient"][0]["reference"] == format!("Practitioner/{practitioner}"))
        .unwrap();
    let coding = &entry["statusReason"]["coding"][0];
    assert_eq!(
        coding["system"],
        "http://mhero.org/fhir/CodeSystem/mhero-delivery-failure"
    );
    (
        entry["status"].as_str().unwrap(),
        coding["code"].as_str().unwrap_or("-"),
    )
}

#[tokio::test]
async fn each_delivery_failure_gets_its_coded_reason() {
    let s = sent_broadcast().await;
    // p0's message failed before any channel, and RapidPro lists p0 as
    // stopped; p1's failed at the channel; p2 has no message at all, and
    // the broadcast is completed: RapidPro skipped p2.
    Mock::given(method("GET"))
        .and(path("/api/v2/messages.json"))
        .and(wiremock::matchers::query_param("broadcast", "7"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(vec![
            failed_message("c-0", URNS[0], None),
            failed_message("c-1", URNS[1], Some("ch-1")),
        ])))
        .mount(&s.server)
        .await;
    for (uuid, status) in [("c-0", "stopped"), ("c-1", "active")] {
        Mock::given(method("GET"))
            .and(path("/api/v2/contacts.json"))
            .and(wiremock::matchers::query_param("uuid", uuid))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(page(vec![contact(uuid, status)])),
            )
            .mount(&s.server)
            .await;
    }
    let mut completed = broadcast("b-1", &URNS);
    completed["status"] = json!("completed");
    Mock::given(method("GET"))
        .and(path("/api/v2/broadcasts.json"))
        .and(wiremock::matchers::query_param("uuid", "b-1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(vec![completed])))
        .mount(&s.server)
        .await;
    let poll = mhero::jobs::delivery_poll::DeliveryPoll {
        store: Arc::clone(&s.store),
        client: client_for(&s.server),
    };
    let report = poll.run_once().await.unwrap();
    assert_eq!(
        (report.failed, report.delivered, report.completed_requests),
        (3, 0, 1),
        "{report:?}"
    );
    let entries = outbox(&s.store).await;
    assert_eq!(reason_of(&entries, "p0"), ("not-done", "contact-stopped"));
    assert_eq!(reason_of(&entries, "p1"), ("not-done", "channel-error"));
    assert_eq!(reason_of(&entries, "p2"), ("not-done", "not-sent"));
    let request = s.store.read("CommunicationRequest", "alert").await.unwrap();
    assert_eq!(request.resource["status"], "completed");
}

#[tokio::test]
async fn a_failed_broadcast_fails_its_entries_and_one_still_running_waits() {
    let s = sent_broadcast().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/messages.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(vec![])))
        .mount(&s.server)
        .await;
    let mut running = broadcast("b-1", &URNS);
    running["status"] = json!("started");
    Mock::given(method("GET"))
        .and(path("/api/v2/broadcasts.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(vec![running])))
        .up_to_n_times(1)
        .mount(&s.server)
        .await;
    let poll = mhero::jobs::delivery_poll::DeliveryPoll {
        store: Arc::clone(&s.store),
        client: client_for(&s.server),
    };
    let report = poll.run_once().await.unwrap();
    assert_eq!((report.failed, report.waiting), (0, 3), "{report:?}");
    assert_eq!(statuses(&outbox(&s.store).await), vec!["in-progress"; 3]);

    let mut failed = broadcast("b-1", &URNS);
    failed["status"] = json!("failed");
    Mock::given(method("GET"))
        .and(path("/api/v2/broadcasts.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(vec![failed])))
        .mount(&s.server)
        .await;
    let report = poll.run_once().await.unwrap();
    assert_eq!(
        (report.failed, report.completed_requests),
        (3, 1),
        "{report:?}"
    );
    let entries = outbox(&s.store).await;
    for p in ["p0", "p1", "p2"] {
        assert_eq!(reason_of(&entries, p), ("not-done", "broadcast-failed"));
    }
}
