//! Flow runs -> QuestionnaireResponses through the run poll: a survey sent
//! by the dispatcher, answered, interrupted and expired in the RapidPro
//! sandbox, polled into FHIR; the outbox and the request follow.

mod common;

use common::survey::{Survey, answer, survey_export, survey_uuid};
use serde_json::Value;

#[tokio::test]
async fn completed_interrupted_and_expired_runs_become_responses_and_close_the_outbox() {
    let survey = Survey::start(3, survey_export(), None).await;
    // hw-0 answers everything; the webhook (a closed port) fails, the run
    // completes on the failure branch.
    survey.reply("hw-0", &["12", "no"]);
    survey.sandbox.sandbox().deliver_pending_webhooks().await;
    // hw-1 answers the first question, then is interrupted.
    let contact = survey.reply("hw-1", &["5"]);
    assert_eq!(survey.sandbox.sandbox().interrupt_contact(&contact), 1);
    // hw-2 answers once and never again: expired.
    survey.reply("hw-2", &["7"]);
    assert_eq!(survey.expire_waiting(), 1);

    let report = survey.poll().await;
    assert!(report.failures.is_empty(), "{report}");
    assert_eq!((report.examined, report.created), (3, 3), "{report}");
    assert_eq!(report.outbox_closed, 3, "{report}");

    let done = survey.response_of("hw-0").await.expect("hw-0 responded");
    assert_eq!(done["status"], "completed");
    assert_eq!(done["source"]["reference"], "Practitioner/hw-0");
    assert_eq!(
        done["questionnaire"],
        format!("http://mhero.org/fhir/Questionnaire/{}", survey_uuid())
    );
    assert_eq!(answer(&done, "stock")["valueDecimal"], 12);
    assert_eq!(
        answer(&done, "stock")["extension"][0]["valueString"],
        "Valid"
    );
    assert_eq!(answer(&done, "expired")["valueString"], "no");
    assert_eq!(
        answer(&done, "expired")["extension"][0]["valueString"],
        "No"
    );
    assert!(done["authored"].is_string());
    assert_eq!(
        done["identifier"]["system"],
        "http://app.rapidpro.io/run-uuid"
    );

    for stopped in ["hw-1", "hw-2"] {
        let response = survey.response_of(stopped).await.expect("a response");
        assert_eq!(response["status"], "stopped", "{stopped}");
        assert!(answer(&response, "stock")["valueDecimal"].is_number());
        assert_eq!(survey.outbox_status(stopped).await, "stopped");
    }
    assert_eq!(survey.outbox_status("hw-0").await, "completed");
    assert_eq!(survey.request_status().await, "completed");

    let questionnaire = survey
        .store
        .read("Questionnaire", &survey_uuid())
        .await
        .unwrap()
        .resource;
    assert_eq!(questionnaire["status"], "active");
    let stock = questionnaire["item"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["linkId"] == "stock")
        .unwrap();
    assert_eq!(stock["type"], "decimal");
    assert_eq!(stock["text"], "Stock");

    // A second pass (the overlap reads the same runs again) changes nothing.
    let versions = |responses: Vec<Value>| {
        let mut v: Vec<(String, String)> = responses
            .iter()
            .map(|r| {
                (
                    r["id"].as_str().unwrap().to_string(),
                    r["meta"]["versionId"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = versions(survey.responses().await);
    let again = survey.poll().await;
    assert!(again.failures.is_empty(), "{again}");
    assert_eq!((again.created, again.updated), (0, 0), "{again}");
    assert_eq!(again.questionnaires, 0, "{again}");
    assert_eq!(versions(survey.responses().await), before);
}

#[tokio::test]
async fn a_run_in_progress_is_updated_in_place_as_it_advances() {
    let survey = Survey::start(1, survey_export(), None).await;
    survey.reply("hw-0", &["40"]);
    let first = survey.poll().await;
    assert_eq!(first.created, 1, "{first}");
    let response = survey.response_of("hw-0").await.unwrap();
    assert_eq!(response["status"], "in-progress");
    assert_eq!(survey.outbox_status("hw-0").await, "in-progress");
    assert_eq!(survey.request_status().await, "active");

    survey.reply("hw-0", &["yes"]);
    survey.sandbox.sandbox().deliver_pending_webhooks().await;
    let second = survey.poll().await;
    assert_eq!((second.created, second.updated), (0, 1), "{second}");
    let updated = survey.response_of("hw-0").await.unwrap();
    assert_eq!(updated["id"], response["id"]);
    assert_eq!(updated["status"], "completed");
    assert_eq!(answer(&updated, "expired")["valueString"], "yes");
    assert_eq!(survey.request_status().await, "completed");
}

#[tokio::test]
async fn a_run_without_a_flow_start_is_recorded_for_the_contact_owner() {
    let survey = Survey::start(1, survey_export(), None).await;
    // Someone RapidPro knows but the request never reached writes in and is
    // put in the flow by hand (as a keyword trigger would): no outbox entry.
    let stranger = survey
        .sandbox
        .sandbox()
        .receive_message("tel:+231770009999", "hello")
        .unwrap();
    survey
        .client
        .create_flow_start(&mhero::rapidpro::types::FlowStartWrite {
            flow: survey_uuid(),
            contacts: vec![stranger.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    survey.sandbox.sandbox().process_flow_starts();
    survey
        .store
        .update(
            "Person",
            "walk-in",
            serde_json::json!({ "resourceType": "Person", "id": "walk-in",
                "identifier": [{ "system": "http://app.rapidpro.io/contact-uuid", "value": stranger }] }),
            None,
        )
        .await
        .unwrap();
    survey
        .sandbox
        .sandbox()
        .receive_message("tel:+231770009999", "3")
        .unwrap();
    let report = survey.poll().await;
    assert!(report.failures.is_empty(), "{report}");
    let response = survey
        .responses()
        .await
        .into_iter()
        .find(|r| r["subject"]["reference"] == "Person/walk-in")
        .expect("the walk-in's run is recorded");
    assert!(
        response.get("source").is_none(),
        "R4: a Person cannot be the source"
    );
    assert_eq!(answer(&response, "stock")["valueDecimal"], 3);
}
