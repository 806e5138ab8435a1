//! `POST /rapidpro/webhook`: authentication, durable and idempotent intake
//! of RapidPro's webhook bodies, rejected bodies kept for inspection, a
//! sandbox flow calling the app, and a webhook outage recovered by the run
//! poll.

mod common;

use common::survey::{Survey, answer, survey_export};
use mhero::pipeline::webhook_event::{EVENT_CODE, EVENT_CODE_SYSTEM, STATE_TAG_SYSTEM};
use mhero::store::{FhirStore, SharedStore, search_all};
use serde_json::{Value, json};

const TOKEN: &str = "wh-secret-1";
const RESTHOOK: &str = "rapidpro/webhook/goflow-resthook-payload-example.json";

async fn app(store: SharedStore) -> common::TestApp {
    common::spawn_app_on(store, &[("MHERO__AUTH__WEBHOOK_TOKEN", TOKEN)]).await
}

async fn empty_store() -> (tempfile::TempDir, SharedStore) {
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore = std::sync::Arc::new(
        mhero::store::sqlite::SqliteStore::open(&dir.path().join("fhir.sqlite"))
            .await
            .unwrap(),
    );
    (dir, store)
}

async fn post(app: &common::TestApp, auth: Option<&str>, body: &str) -> (u16, Value) {
    let mut request = app
        .client
        .post(format!("{}/rapidpro/webhook", app.base))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn events(store: &dyn FhirStore, state: Option<&str>) -> Vec<Value> {
    let mut params = vec![(
        "code".to_string(),
        format!("{EVENT_CODE_SYSTEM}|{EVENT_CODE}"),
    )];
    if let Some(state) = state {
        params.push(("_tag".into(), format!("{STATE_TAG_SYSTEM}|{state}")));
    }
    search_all(store, "Basic", params)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.resource)
        .collect()
}

#[tokio::test]
async fn the_recorded_resthook_payload_is_stored_and_recorded_once() {
    let (_dir, store) = empty_store().await;
    let app = app(store.clone()).await;
    let body = common::fixture(RESTHOOK).to_string();
    let token = format!("Token {TOKEN}");
    let (status, answer_body) = post(&app, Some(&token), &body).await;
    assert_eq!(status, 200, "{answer_body}");
    assert_eq!(answer_body["state"], "processed");
    let run = "01969b47-113b-76f8-95cf-9fca95f1c30a";
    let response = store.read("QuestionnaireResponse", run).await.unwrap();
    assert_eq!(response.resource["status"], "in-progress");
    assert_eq!(
        answer(&response.resource, "favorite_color")["valueString"],
        "red"
    );
    assert_eq!(
        answer(&response.resource, "favorite_color")["extension"][0]["valueString"],
        "Red"
    );
    let stored = events(store.as_ref(), Some("processed")).await;
    assert_eq!(stored.len(), 1);
    let raw = stored[0]["extension"][0]["extension"][0]["valueString"]
        .as_str()
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(raw).unwrap(),
        common::fixture(RESTHOOK)
    );

    // The same event again (keys in another order): one Basic, nothing rewritten.
    let reordered = serde_json::to_string(&common::fixture(RESTHOOK)).unwrap();
    let (status, again) = post(&app, Some(&token), &reordered).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(events(store.as_ref(), None).await.len(), 1);
    let reread = store.read("QuestionnaireResponse", run).await.unwrap();
    assert_eq!(reread.version_id, response.version_id);
    app.stop().await;
}

#[tokio::test]
async fn the_editors_default_body_is_kept_for_the_run_poll() {
    let (_dir, store) = empty_store().await;
    let app = app(store.clone()).await;
    let body = json!({
        "contact": {"uuid": "5d76d86b-3bb9-4d5a-b822-c9d86f5d8e4f", "name": "Ryan Lewis", "urn": "tel:+12024561111"},
        "flow": {"uuid": "50c3706e-fedb-42c0-8eab-dda3335714b7", "name": "Registration"},
        "results": {"favorite_color": {"value": "red", "category": "Red"},
                    "phone_number": {"value": "+12344563452", "category": ""}}
    });
    let (status, answer_body) =
        post(&app, Some(&format!("Token {TOKEN}")), &body.to_string()).await;
    assert_eq!(status, 202, "{answer_body}");
    assert_eq!(answer_body["state"], "deferred");
    assert_eq!(events(store.as_ref(), Some("deferred")).await.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_refused() {
    let (_dir, store) = empty_store().await;
    let app = app(store.clone()).await;
    let body = common::fixture(RESTHOOK).to_string();
    for auth in [None, Some("Token wrong"), Some("Basic Zm9vOmJhcg==")] {
        let (status, outcome) = post(&app, auth, &body).await;
        assert_eq!(status, 401, "{auth:?}");
        assert_eq!(outcome["resourceType"], "OperationOutcome");
    }
    let response = app
        .client
        .post(format!("{}/rapidpro/webhook?token=wrong", app.base))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    assert!(
        events(store.as_ref(), None).await.is_empty(),
        "nothing kept"
    );
    let response = app
        .client
        .post(format!("{}/rapidpro/webhook?token={TOKEN}", app.base))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    app.stop().await;

    // Without a configured token the endpoint is off, and says which setting.
    let (_dir2, store2) = empty_store().await;
    let off = common::spawn_app_on(store2, &[]).await;
    let (status, outcome) = post(&off, Some("Token x"), "{}").await;
    assert_eq!(status, 503);
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("auth.webhook_token"),
        "{outcome}"
    );
    off.stop().await;
}

#[tokio::test]
async fn a_body_that_cannot_be_understood_is_refused_and_kept() {
    let (_dir, store) = empty_store().await;
    let app = app(store.clone()).await;
    let token = format!("Token {TOKEN}");
    let (status, outcome) = post(&app, Some(&token), "{\"contact\": ").await;
    assert_eq!(status, 400);
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{outcome}"
    );
    let (status, outcome) = post(&app, Some(&token), r#"{"flow": {"uuid": "f"}}"#).await;
    assert_eq!(status, 400);
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("contact is missing"),
        "{outcome}"
    );
    let rejected = events(store.as_ref(), Some("rejected")).await;
    assert_eq!(rejected.len(), 2);
    let subs = rejected[0]["extension"][0]["extension"].as_array().unwrap();
    assert!(subs.iter().any(|s| s["url"] == "reason"), "{subs:?}");
    app.stop().await;
}

/// The survey with the body template the connector recommends (the run
/// uuid included), as a flow author would set it.
fn survey_with_run_template() -> Value {
    let mut export = survey_export();
    let template = r#"{"contact": {"uuid": "@contact.uuid", "urn": "@contact.urn"}, "flow": {"uuid": "@run.flow.uuid", "name": "@run.flow.name"}, "run": {"uuid": "@run.uuid"}, "results": {"stock": {"value": "@results.stock.value", "category": "@results.stock.category"}, "expired": {"value": "@results.expired.value", "category": "@results.expired.category"}}}"#;
    for node in export["flows"][0]["nodes"].as_array_mut().unwrap() {
        for action in node["actions"].as_array_mut().unwrap() {
            if action["type"] == "call_webhook" {
                action["body"] = json!(template);
            }
        }
    }
    export
}

async fn link_contact(survey: &Survey, practitioner: &str, contact: &str) {
    let mut p = survey
        .store
        .read("Practitioner", practitioner)
        .await
        .unwrap()
        .resource;
    p["identifier"] =
        json!([{ "system": "http://app.rapidpro.io/contact-uuid", "value": contact }]);
    survey
        .store
        .update("Practitioner", practitioner, p, None)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_flow_calling_the_webhook_creates_the_response_at_once() {
    let survey = Survey::start(1, survey_with_run_template(), None).await;
    // The app serves the survey's store; the flow's webhook goes to it.
    let app = app(survey.store.clone()).await;
    survey
        .sandbox
        .sandbox()
        .set_knobs(mhero::rapidpro::sandbox::KnobsUpdate {
            webhook_url_override: Some(format!("{}/rapidpro/webhook?token={TOKEN}", app.base)),
            ..Default::default()
        })
        .unwrap();
    let contact = survey.reply("hw-0", &["15"]);
    link_contact(&survey, "hw-0", &contact).await;
    survey.reply("hw-0", &["yes"]);
    let calls = survey.sandbox.sandbox().deliver_pending_webhooks().await;
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].status, Some(200), "{:?}", calls[0]);
    let response = survey.response_of("hw-0").await.expect("recorded at once");
    assert_eq!(answer(&response, "stock")["valueDecimal"], 15);
    assert_eq!(answer(&response, "expired")["valueString"], "yes");
    // The run poll then sees the run's end: same response, completed.
    let report = survey.poll().await;
    assert!(report.failures.is_empty(), "{report}");
    let done = survey.response_of("hw-0").await.unwrap();
    assert_eq!(done["id"], response["id"]);
    assert_eq!(done["status"], "completed");
    assert_eq!(survey.responses().await.len(), 1);
    assert_eq!(survey.outbox_status("hw-0").await, "completed");
    app.stop().await;
}

#[tokio::test]
async fn a_webhook_outage_is_recovered_by_the_run_poll() {
    // The webhook goes to a closed port: RapidPro gets no answer and does
    // not retry.
    let survey = Survey::start(1, survey_with_run_template(), None).await;
    survey.reply("hw-0", &["9", "no"]);
    let calls = survey.sandbox.sandbox().deliver_pending_webhooks().await;
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].status, None, "the call failed: {:?}", calls[0]);
    assert!(survey.responses().await.is_empty());
    let report = survey.poll().await;
    assert!(report.failures.is_empty(), "{report}");
    let response = survey.response_of("hw-0").await.expect("recovered");
    assert_eq!(response["status"], "completed");
    assert_eq!(answer(&response, "stock")["valueDecimal"], 9);
}

#[tokio::test]
async fn an_event_left_received_is_recorded_by_the_next_run_poll() {
    let survey = Survey::start(1, survey_with_run_template(), None).await;
    survey.reply("hw-0", &["21"]);
    let run = survey.sandbox.sandbox().state()["runs"][0]["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    // As if the webhook stored the event but could not record it.
    let body =
        json!({"contact": {"uuid": "c-unknown"}, "flow": {"uuid": common::survey::survey_uuid()},
        "run": {"uuid": run}, "results": {"stock": {"value": "21", "category": "Valid"}}})
        .to_string();
    let key = format!("run:{run}|test");
    let event = mhero::pipeline::webhook_event::event_resource(
        &key,
        &body,
        chrono::Utc::now(),
        mhero::pipeline::webhook_event::State::Received,
        None,
    );
    let id = event["id"].as_str().unwrap().to_string();
    survey
        .store
        .update("Basic", &id, event, None)
        .await
        .unwrap();
    let report = survey.poll().await;
    assert!(report.failures.is_empty(), "{report}");
    assert_eq!(report.webhook_events, 1, "{report}");
    let stored = survey.store.read("Basic", &id).await.unwrap().resource;
    assert_eq!(stored["meta"]["tag"][0]["code"], "processed");
    assert_eq!(
        events(survey.store.as_ref(), Some("received")).await.len(),
        0
    );
}

#[tokio::test]
async fn an_older_event_arriving_late_does_not_undo_a_newer_one() {
    let (_dir, store) = empty_store().await;
    let app = app(store.clone()).await;
    let token = format!("Token {TOKEN}");
    let newer = common::fixture(RESTHOOK);
    // An earlier moment of the same run: only the phone number, and a
    // first answer to the colour question that was later corrected.
    let mut older = newer.clone();
    older["results"] = serde_json::json!({
        "phone_number": newer["results"]["phone_number"].clone(),
        "favorite_color": { "category": "Blue", "category_localized": "Blue",
            "created_on": "2025-05-04T12:31:10.123456Z", "input": "", "name": "Favorite Color",
            "node_uuid": "f5bb9b7a-7b5e-45c3-8f0e-61b4e95edf03", "value": "blue" },
    });
    older["path"] = serde_json::json!([newer["path"][0].clone(), newer["path"][1].clone()]);

    let (status, body) = post(&app, Some(&token), &newer.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let run = "01969b47-113b-76f8-95cf-9fca95f1c30a";
    let first = store.read("QuestionnaireResponse", run).await.unwrap();
    let (status, body) = post(&app, Some(&token), &older.to_string()).await;
    assert!(status == 200 || status == 202, "{status} {body}");
    assert_eq!(body["duplicate"], false, "a different event: {body}");

    let after = store.read("QuestionnaireResponse", run).await.unwrap();
    assert_eq!(
        answer(&after.resource, "favorite_color")["valueString"],
        "red",
        "the later answer stays"
    );
    assert_eq!(
        answer(&after.resource, "2factor")["valueDecimal"],
        34634624463525u64
    );
    assert_eq!(
        answer(&after.resource, "phone_number")["valueString"],
        "+12344563452",
        "a phone number is not a decimal"
    );
    assert_eq!(after.resource["authored"], first.resource["authored"]);
    assert_eq!(events(store.as_ref(), None).await.len(), 2, "both kept");
    app.stop().await;
}
