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

#[tokio::test]
async fn a_completed_validation_run_is_written_back_once_with_its_provenance() {
    use common::survey::validation_export;
    use mhero::config::{PersonElement, WritebackRule};
    use mhero::pipeline::phone::PhoneNormalizer;
    use mhero::pipeline::writeback::WritebackConfig;

    let survey = Survey::start(3, validation_export(), None).await;
    // hw-0 confirms a new number and still works there.
    survey.reply("hw-0", &["my number is +231 886 555 123", "yes"]);
    // hw-1 gives hw-2's number (RapidPro has it on hw-2's contact) and no
    // longer works there.
    survey.reply("hw-1", &["+231 77 000 0002", "no"]);
    // hw-2 answers the first question and is interrupted: nothing of an
    // unfinished run is written back.
    let contact = survey.reply("hw-2", &["+231 886 555 999"]);
    assert_eq!(survey.sandbox.sandbox().interrupt_contact(&contact), 1);
    // hw-2 is known to FHIR by their contact (as the contact sync does).
    mhero::store::modify_resource(survey.store.as_ref(), "Practitioner", "hw-2", |p| {
        let mut p = p.clone();
        p["identifier"] =
            serde_json::json!([{ "system": "http://app.rapidpro.io/contact-uuid", "value": contact }]);
        Some(p)
    })
    .await
    .unwrap();

    let config = WritebackConfig {
        rules: vec![
            WritebackRule {
                flow: "*".into(),
                result: "confirmed_phone".into(),
                element: PersonElement::Phone,
            },
            WritebackRule {
                flow: validation_export()["flows"][0]["uuid"]
                    .as_str()
                    .unwrap()
                    .into(),
                result: "still_working".into(),
                element: PersonElement::Active,
            },
        ],
        phones: PhoneNormalizer::new(Some("LR")).unwrap(),
    };
    let report = survey.poll_with(Some(&config)).await;
    assert!(report.failures.is_empty(), "{report}");
    assert_eq!(
        (
            report.written_back,
            report.elements_written,
            report.writeback_rejected
        ),
        (2, 2, 1),
        "{report}"
    );

    let read = |id: &str| {
        let store = std::sync::Arc::clone(&survey.store);
        let id = id.to_string();
        async move { store.read("Practitioner", &id).await.unwrap().resource }
    };
    let provenance_of = |person: &str| {
        let store = std::sync::Arc::clone(&survey.store);
        let person = person.to_string();
        async move {
            mhero::store::search_all(
                store.as_ref(),
                "Provenance",
                vec![("target".into(), person)],
            )
            .await
            .unwrap()
        }
    };
    let outcome = |provenance: &Value, result: &str| -> (String, Option<String>) {
        let part = provenance["extension"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["extension"][0]["valueString"] == result)
            .unwrap_or_else(|| panic!("{result} in {provenance}"));
        let sub = |name: &str| {
            part["extension"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["url"] == name)
                .map(|s| {
                    s.get("valueString")
                        .or(s.get("valueCode"))
                        .unwrap()
                        .as_str()
                        .unwrap()
                        .to_string()
                })
        };
        (sub("outcome").unwrap(), sub("previous").or(sub("reason")))
    };

    let hw0 = read("hw-0").await;
    assert_eq!(hw0["telecom"][0]["value"], "+231886555123");
    assert_eq!(hw0["active"], true);
    let provenance = provenance_of("Practitioner/hw-0").await;
    assert_eq!(provenance.len(), 1);
    let p0 = &provenance[0].resource;
    assert_eq!(p0["agent"][0]["who"]["reference"], "Practitioner/hw-0");
    assert!(
        p0["entity"][0]["what"]["reference"]
            .as_str()
            .unwrap()
            .starts_with("QuestionnaireResponse/")
    );
    assert_eq!(p0["activity"]["coding"][0]["code"], "UPDATE");
    assert_eq!(
        outcome(p0, "confirmed_phone"),
        ("applied".into(), Some("077 000 0000".into()))
    );
    assert_eq!(outcome(p0, "still_working").0, "unchanged");

    let hw1 = read("hw-1").await;
    assert_eq!(hw1["active"], false);
    assert_eq!(hw1["telecom"][0]["value"], "077 000 0001", "not forced");
    let p1 = provenance_of("Practitioner/hw-1").await;
    let (conflict, reason) = outcome(&p1[0].resource, "confirmed_phone");
    assert_eq!(conflict, "conflict");
    assert!(reason.unwrap().contains("Practitioner/hw-2"));

    assert!(provenance_of("Practitioner/hw-2").await.is_empty());
    assert_eq!(read("hw-2").await["telecom"][0]["value"], "077 000 0002");

    // The next pass sees the same runs: nothing is written back twice.
    let version = hw0["meta"]["versionId"].clone();
    let again = survey.poll_with(Some(&config)).await;
    assert!(again.failures.is_empty(), "{again}");
    assert_eq!(again.written_back, 0, "{again}");
    assert_eq!(read("hw-0").await["meta"]["versionId"], version);
}
