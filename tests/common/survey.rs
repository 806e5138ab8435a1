//! A survey sent through the dispatcher to generated practitioners, with
//! the RapidPro sandbox running it (the flow-results tests).

use std::sync::Arc;
use std::time::Duration;

use mhero::jobs::dispatch::Dispatcher;
use mhero::jobs::run_poll::{RunPoll, RunPollReport};
use mhero::pipeline::outbox;
use mhero::pipeline::phone::PhoneNormalizer;
use mhero::rapidpro::sandbox::{KnobsUpdate, SandboxServer, SandboxSettings};
use mhero::store::SharedStore;
use mhero::store::sqlite::SqliteStore;
use serde_json::{Value, json};

pub const SURVEY: &str = "tests/fixtures/flows/stock_survey_v13.json";
pub const REQUEST: &str = "survey";

pub fn survey_export() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(SURVEY);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The health-worker validation flow (confirmed phone, still working).
pub fn validation_export() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/flows/validation_v13.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn survey_uuid() -> String {
    survey_export()["flows"][0]["uuid"]
        .as_str()
        .unwrap()
        .to_string()
}

pub struct Survey {
    pub dir: tempfile::TempDir,
    pub store: SharedStore,
    pub sandbox: SandboxServer,
    pub client: mhero::rapidpro::client::RapidProClient,
    /// Practitioner id -> URN of their outbox entry.
    pub urns: Vec<(String, String)>,
}

impl Survey {
    /// `n` practitioners get the survey (one flow start); the sandbox starts
    /// their runs. Webhooks of the flow go to `webhook_url` (default: a
    /// closed local port, so they fail fast).
    pub async fn start(n: usize, export: Value, webhook_url: Option<&str>) -> Survey {
        Survey::start_then(n, export, webhook_url, |_| {}).await
    }

    /// As [`Survey::start`], with `before_runs` acting on the sandbox after
    /// the flow start is accepted and before RapidPro processes it.
    pub async fn start_then(
        n: usize,
        export: Value,
        webhook_url: Option<&str>,
        before_runs: impl FnOnce(&mhero::rapidpro::sandbox::Sandbox),
    ) -> Survey {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(
            SqliteStore::open(&dir.path().join("fhir.sqlite"))
                .await
                .unwrap(),
        );
        let mut entries = Vec::new();
        for i in 0..n {
            let id = format!("hw-{i}");
            entries.push(json!({
                "resource": { "resourceType": "Practitioner", "id": id, "active": true,
                    "name": [{ "family": format!("Worker{i}"), "given": ["Test"] }],
                    "telecom": [{ "system": "phone", "value": format!("077 000 {:04}", i) }] },
                "request": { "method": "PUT", "url": format!("Practitioner/{id}") }
            }));
        }
        store
            .process_bundle(
                json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries }),
            )
            .await
            .unwrap();
        let sandbox = SandboxServer::start(SandboxSettings::default())
            .await
            .unwrap();
        sandbox.sandbox().load_flow_export(&export).unwrap();
        sandbox
            .sandbox()
            .set_knobs(KnobsUpdate {
                webhook_url_override: Some(
                    webhook_url
                        .unwrap_or("http://127.0.0.1:9/closed")
                        .to_string(),
                ),
                ..Default::default()
            })
            .unwrap();
        let client = super::rapidpro_client_for(&sandbox).await;
        let recipients: Vec<Value> = (0..n)
            .map(|i| json!({ "reference": format!("Practitioner/hw-{i}") }))
            .collect();
        store
            .update(
                "CommunicationRequest",
                REQUEST,
                json!({ "resourceType": "CommunicationRequest", "id": REQUEST, "status": "active",
                    "recipient": recipients,
                    "payload": [{ "contentReference": { "reference": format!("Basic/{}", export["flows"][0]["uuid"].as_str().unwrap()) } }] }),
                None,
            )
            .await
            .unwrap();
        let settings = super::test_settings(&dir, &[]);
        let report = Dispatcher::new(
            Arc::clone(&store),
            client.clone(),
            Arc::new(PhoneNormalizer::new(Some("LR")).unwrap()),
            settings.messaging.clone(),
        )
        .run_once()
        .await
        .unwrap();
        assert_eq!(report.sent, n, "{report:?}");
        before_runs(sandbox.sandbox());
        sandbox.sandbox().process_flow_starts();
        let mut urns: Vec<(String, String)> = super::outbox_of(store.as_ref(), REQUEST)
            .await
            .iter()
            .map(|c| {
                (
                    outbox::recipient_key(c).unwrap(),
                    outbox::address(c).1.unwrap(),
                )
            })
            .collect();
        urns.sort();
        Survey {
            dir,
            store,
            sandbox,
            client,
            urns,
        }
    }

    pub fn urn(&self, practitioner: &str) -> &str {
        &self
            .urns
            .iter()
            .find(|(p, _)| p == &format!("Practitioner/{practitioner}"))
            .unwrap()
            .1
    }

    /// The practitioner answers (each text one inbound message); returns
    /// the contact uuid.
    pub fn reply(&self, practitioner: &str, texts: &[&str]) -> String {
        let mut contact = String::new();
        for text in texts {
            contact = self
                .sandbox
                .sandbox()
                .receive_message(self.urn(practitioner), text)
                .unwrap();
        }
        contact
    }

    pub fn expire_waiting(&self) -> usize {
        self.sandbox
            .sandbox()
            .expire_waiting_runs(Duration::from_secs(0))
    }

    pub async fn poll(&self) -> RunPollReport {
        self.poll_with(None).await
    }

    /// A run poll pass with the validation write-back configured.
    pub async fn poll_with(
        &self,
        writeback: Option<&mhero::pipeline::writeback::WritebackConfig>,
    ) -> RunPollReport {
        RunPoll {
            store: self.store.as_ref(),
            client: &self.client,
            overlap: chrono::Duration::seconds(60),
            writeback,
        }
        .run_once()
        .await
        .unwrap()
    }

    /// The QuestionnaireResponses, keyed by subject reference.
    pub async fn responses(&self) -> Vec<Value> {
        mhero::store::search_all(
            self.store.as_ref(),
            "QuestionnaireResponse",
            vec![("_count".into(), "1000".into())],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.resource)
        .collect()
    }

    pub async fn response_of(&self, practitioner: &str) -> Option<Value> {
        self.responses()
            .await
            .into_iter()
            .find(|r| r["subject"]["reference"] == format!("Practitioner/{practitioner}"))
    }

    pub async fn outbox_status(&self, practitioner: &str) -> String {
        super::outbox_of(self.store.as_ref(), REQUEST)
            .await
            .iter()
            .find(|c| c["recipient"][0]["reference"] == format!("Practitioner/{practitioner}"))
            .unwrap()["status"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn request_status(&self) -> String {
        self.store
            .read("CommunicationRequest", REQUEST)
            .await
            .unwrap()
            .resource["status"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

/// The answer of `link_id` in a response.
pub fn answer<'a>(response: &'a Value, link_id: &str) -> &'a Value {
    response["item"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["linkId"] == link_id))
        .map(|i| &i["answer"][0])
        .unwrap_or(&Value::Null)
}
