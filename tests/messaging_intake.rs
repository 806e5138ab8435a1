//! Intake of CommunicationRequests through the FHIR API: a request that
//! could never be sent is a 422 naming the problem, through POST, PUT and
//! transaction Bundles alike, and nothing of it is written; a good one is
//! stored (201) and idempotent through `If-None-Exist`.

mod common;

use serde_json::{Value, json};

fn request(extra: Value) -> Value {
    let mut r = json!({
        "resourceType": "CommunicationRequest",
        "status": "active",
        "identifier": [{ "system": "urn:ietf:rfc:3986", "value": "urn:uuid:5b1c2a9e-1d7e-4d8e-9a51-7d6f0c0e1a11" }],
        "recipient": [{ "reference": "Practitioner/p1" }],
        "payload": [{ "contentString": "Hello" }]
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            r.as_object_mut().unwrap().remove(k);
        } else {
            r[k] = v.clone();
        }
    }
    r
}

async fn count_requests(app: &common::TestApp) -> u64 {
    let bundle: Value = app
        .client
        .get(app.url("CommunicationRequest?_summary=count"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    bundle["total"].as_u64().unwrap()
}

#[tokio::test]
async fn unsendable_requests_are_422_naming_the_problem_and_not_stored() {
    let app = common::spawn_app().await;
    let cases = [
        (json!({ "recipient": null }), "recipient is missing"),
        (json!({ "payload": null }), "payload is missing"),
        (
            json!({ "payload": [{ "contentString": "" }] }),
            "payload[0].contentString is empty",
        ),
        (
            json!({ "payload": [{ "contentReference": { "reference": "Basic/survey" } }] }),
            "does not name a flow",
        ),
        (
            json!({ "recipient": [{ "reference": "Observation/o1" }] }),
            "recipient[0] 'Observation/o1'",
        ),
        (
            json!({ "recipient": [{ "reference": "#ghost" }] }),
            "names no contained resource",
        ),
        (
            json!({ "occurrenceDateTime": "next week" }),
            "occurrenceDateTime",
        ),
    ];
    for (extra, expected) in cases {
        let response = app
            .client
            .post(app.url("CommunicationRequest"))
            .json(&request(extra.clone()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{extra}");
        let outcome: Value = response.json().await.unwrap();
        assert_eq!(outcome["resourceType"], "OperationOutcome");
        let text = outcome["issue"][0]["diagnostics"].as_str().unwrap();
        assert!(text.contains(expected), "{extra}: {text}");
    }
    // PUT as well.
    let response = app
        .client
        .put(app.url("CommunicationRequest/r1"))
        .json(&request(json!({ "id": "r1", "recipient": [] })))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    // A transaction with one bad request writes nothing at all.
    let bundle = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            { "resource": { "resourceType": "Practitioner", "id": "p1" }, "request": { "method": "PUT", "url": "Practitioner/p1" } },
            { "resource": request(json!({})), "request": { "method": "POST", "url": "CommunicationRequest" } },
            { "resource": request(json!({ "payload": [{ "contentAttachment": {} }] })), "request": { "method": "POST", "url": "CommunicationRequest" } }
        ]
    });
    let response = app
        .client
        .post(app.url(""))
        .json(&bundle)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let outcome: Value = response.json().await.unwrap();
    let text = outcome["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(
        text.contains("entry 2") && text.contains("contentAttachment.url is missing"),
        "{text}"
    );
    assert_eq!(count_requests(&app).await, 0);
    let practitioner = app
        .client
        .get(app.url("Practitioner/p1"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        practitioner.status(),
        404,
        "nothing of the transaction was written"
    );
    // A record (not actionable) is stored as it is.
    let response = app
        .client
        .post(app.url("CommunicationRequest"))
        .json(&request(
            json!({ "status": "completed", "recipient": null }),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    app.stop().await;
}

#[tokio::test]
async fn a_good_request_is_stored_once_even_when_posted_twice() {
    let app = common::spawn_app().await;
    let identifier = "urn:ietf:rfc:3986|urn:uuid:5b1c2a9e-1d7e-4d8e-9a51-7d6f0c0e1a11";
    let mut ids = Vec::new();
    for expected in [201, 200] {
        let response = app
            .client
            .post(app.url("CommunicationRequest"))
            .header("If-None-Exist", format!("identifier={identifier}"))
            .json(&request(json!({})))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected);
        let stored: Value = response.json().await.unwrap();
        assert_eq!(stored["status"], "active");
        ids.push(stored["id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids[0], ids[1]);
    assert_eq!(count_requests(&app).await, 1);
    app.stop().await;
}
