//! The messaging dispatcher end to end: CommunicationRequests in the
//! embedded store, the RapidPro client over real HTTP, the in-process
//! RapidPro sandbox, and the iHRIS demo facilities and health workers
//! (given Liberian mobiles where the demo has placeholders). Crashes are
//! injected between every pair of steps and every recipient must still be
//! messaged exactly once.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use mhero::cli::import::import_files;
use mhero::jobs::dispatch::{DispatchError, Dispatcher, Step};
use mhero::pipeline::phone::PhoneNormalizer;
use mhero::rapidpro::sandbox::{SandboxServer, SandboxSettings};
use mhero::store::sqlite::SqliteStore;
use mhero::store::{SharedStore, search_all};
use serde_json::{Value, json};

const COLOR_FLOW: &str = "rapidpro/flows/color_v13.json";

struct World {
    _dir: tempfile::TempDir,
    store: SharedStore,
    sandbox: SandboxServer,
    settings: mhero::config::Settings,
}

impl World {
    /// The iHRIS demo, every practitioner with a phone except `phoneless`.
    async fn ihris(phoneless: &[&str], opted_out: &[&str]) -> World {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteStore::open(&dir.path().join("fhir.sqlite"))
            .await
            .unwrap();
        let summary = import_files(
            &sqlite,
            &[
                common::fixture_path("ihris/ihris-demo-locations-open.bundle.json"),
                common::fixture_path("ihris/ihris-demo-practitioners-open.bundle.json"),
            ],
        )
        .await;
        assert!(summary.failed.is_empty(), "{summary}");
        let store: SharedStore = Arc::new(sqlite);
        let practitioners = search_all(
            store.as_ref(),
            "Practitioner",
            vec![("_count".into(), "1000".into())],
        )
        .await
        .unwrap();
        for (n, stored) in practitioners.iter().enumerate() {
            let mut p = stored.resource.clone();
            p["telecom"] = if phoneless.contains(&stored.id.as_str()) {
                json!([])
            } else {
                json!([{ "system": "phone", "use": "mobile", "value": phone(n) }])
            };
            if opted_out.contains(&stored.id.as_str()) {
                p["meta"]["tag"] =
                    json!([{ "system": "http://mhero.org/codesystem", "code": "optedout" }]);
            }
            store
                .update("Practitioner", &stored.id, p, None)
                .await
                .unwrap();
        }
        World::around(dir, store).await
    }

    /// `n` generated practitioners, all in `Group/everyone`.
    async fn generated(n: usize) -> World {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(
            SqliteStore::open(&dir.path().join("fhir.sqlite"))
                .await
                .unwrap(),
        );
        let mut entries = Vec::new();
        let mut members = Vec::new();
        for i in 0..n {
            let id = format!("gen-{i}");
            entries.push(json!({
                "resource": { "resourceType": "Practitioner", "id": id, "active": true,
                    "name": [{ "family": format!("Worker{i}"), "given": ["Test"] }],
                    "telecom": [{ "system": "phone", "value": phone(i) }] },
                "request": { "method": "PUT", "url": format!("Practitioner/{id}") }
            }));
            members.push(json!({ "entity": { "reference": format!("Practitioner/{id}") } }));
        }
        entries.push(json!({
            "resource": { "resourceType": "Group", "id": "everyone", "name": "Everyone", "type": "practitioner", "actual": true, "member": members },
            "request": { "method": "PUT", "url": "Group/everyone" }
        }));
        store
            .process_bundle(
                json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries }),
            )
            .await
            .unwrap();
        World::around(dir, store).await
    }

    async fn around(dir: tempfile::TempDir, store: SharedStore) -> World {
        let sandbox = SandboxServer::start(SandboxSettings::default())
            .await
            .unwrap();
        sandbox
            .sandbox()
            .load_flow_export(&common::fixture(COLOR_FLOW))
            .unwrap();
        let settings = common::test_settings(&dir, &[]);
        World {
            _dir: dir,
            store,
            sandbox,
            settings,
        }
    }

    async fn dispatcher(&self, instance: &str) -> Dispatcher {
        let mut messaging = self.settings.messaging.clone();
        messaging.instance_id = instance.to_string();
        Dispatcher::new(
            Arc::clone(&self.store),
            common::rapidpro_client_for(&self.sandbox).await,
            Arc::new(PhoneNormalizer::new(Some("LR")).unwrap()),
            messaging,
        )
    }

    /// A dispatcher of `instance` dies at the `nth` `step`; the same
    /// replica restarts and runs a full pass, whose report is returned.
    async fn crash_and_restart(
        &self,
        instance: &str,
        step: Step,
        nth: usize,
    ) -> mhero::jobs::dispatch::DispatchReport {
        let error = self
            .dispatcher(instance)
            .await
            .crash_at(step, nth)
            .run_once()
            .await
            .unwrap_err();
        assert!(
            matches!(error, DispatchError::Crashed(s) if s == step),
            "{error}"
        );
        self.dispatcher(instance).await.run_once().await.unwrap()
    }

    async fn request(&self, id: &str, body: Value) {
        let mut body = body;
        body["resourceType"] = json!("CommunicationRequest");
        body["id"] = json!(id);
        if body.get("status").is_none() {
            body["status"] = json!("active");
        }
        self.store
            .update("CommunicationRequest", id, body, None)
            .await
            .unwrap();
    }

    async fn outbox(&self, request_id: &str) -> Vec<Value> {
        common::outbox_of(self.store.as_ref(), request_id).await
    }

    async fn request_status(&self, id: &str) -> String {
        self.store
            .read("CommunicationRequest", id)
            .await
            .unwrap()
            .resource["status"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Outgoing messages per URN, after the sandbox delivered broadcasts.
    fn messages_per_urn(&self) -> HashMap<String, usize> {
        self.sandbox.sandbox().tick();
        let mut counts = HashMap::new();
        for m in self.sandbox.sandbox().state()["messages"]
            .as_array()
            .unwrap()
        {
            if m["direction"] == "out" {
                *counts
                    .entry(m["urn"].as_str().unwrap_or("none").to_string())
                    .or_insert(0) += 1;
            }
        }
        counts
    }

    fn api_calls(&self, endpoint: &str) -> usize {
        self.sandbox
            .sandbox()
            .calls()
            .iter()
            .filter(|c| c.method == "POST" && c.path.contains(endpoint))
            .count()
    }
}

/// A valid Liberian mobile, distinct per `n`.
fn phone(n: usize) -> String {
    format!("077 {:03} {:04}", n / 10_000, n % 10_000)
}

/// R4's rules for what the connector writes: required elements present,
/// codes from the value set, every extension with a url and either a value
/// or sub-extensions (never both).
fn assert_valid_r4(resource: &Value) {
    fn extensions_ok(element: &Value) {
        for ext in element["extension"].as_array().into_iter().flatten() {
            assert!(ext["url"].is_string(), "extension without url: {ext}");
            let values = ext
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| k.starts_with("value"))
                .count();
            let has_subs = ext.get("extension").is_some();
            assert!(
                values + has_subs as usize == 1,
                "extension needs one value or sub-extensions: {ext}"
            );
            extensions_ok(ext);
        }
    }
    extensions_ok(resource);
    match resource["resourceType"].as_str().unwrap() {
        "Communication" => {
            let status = resource["status"]
                .as_str()
                .expect("Communication.status is required");
            assert!(
                [
                    "preparation",
                    "in-progress",
                    "not-done",
                    "on-hold",
                    "stopped",
                    "completed",
                    "entered-in-error",
                    "unknown"
                ]
                .contains(&status),
                "{status}"
            );
            for payload in resource["payload"].as_array().into_iter().flatten() {
                assert!(
                    payload
                        .as_object()
                        .unwrap()
                        .keys()
                        .any(|k| k.starts_with("content")),
                    "payload.content[x] is required: {payload}"
                );
            }
            if status == "not-done" {
                assert!(resource["statusReason"]["text"].is_string(), "{resource}");
            }
            for contained in resource["contained"].as_array().into_iter().flatten() {
                let reference = format!("#{}", contained["id"].as_str().unwrap());
                assert!(
                    resource.to_string().contains(&format!("\"{reference}\"")),
                    "contained resources must be referenced"
                );
            }
        }
        "CommunicationRequest" => {
            assert!(
                resource["status"].is_string(),
                "CommunicationRequest.status is required"
            );
        }
        other => panic!("unexpected {other}"),
    }
}

fn reason_of<'a>(outbox: &'a [Value], recipient: &str) -> &'a str {
    outbox
        .iter()
        .find(|c| c["recipient"][0]["reference"] == recipient)
        .unwrap_or_else(|| panic!("no outbox entry for {recipient}"))["statusReason"]["text"]
        .as_str()
        .unwrap_or("")
}

async fn practitioners_below(world: &World, location: &str) -> Vec<String> {
    // The expected audience, computed independently from the demo data.
    let locations = common::fixture("ihris/ihris-demo-locations-open.bundle.json");
    let parent: HashMap<String, String> = locations["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["resource"]["id"].as_str()?.to_string(),
                e["resource"]["partOf"]["reference"]
                    .as_str()?
                    .trim_start_matches("Location/")
                    .to_string(),
            ))
        })
        .collect();
    let under = |mut l: String| loop {
        if l == location {
            return true;
        }
        match parent.get(&l) {
            Some(p) => l = p.clone(),
            None => return false,
        }
    };
    let roles = search_all(
        world.store.as_ref(),
        "PractitionerRole",
        vec![("_count".into(), "1000".into())],
    )
    .await
    .unwrap();
    let mut people: Vec<String> = roles
        .iter()
        .filter(|r| r.resource["active"] != false && r.resource["period"]["end"].is_null())
        .filter(|r| {
            under(
                r.resource["location"][0]["reference"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("Location/")
                    .to_string(),
            )
        })
        .map(|r| {
            r.resource["practitioner"]["reference"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    people.sort();
    people.dedup();
    people
}

#[tokio::test]
async fn a_district_message_reaches_every_health_worker_below_it_once() {
    let world = World::ihris(&[], &[]).await;
    // Roles that ended (period.end in the past) no longer count.
    let expected = practitioners_below(&world, "TF.N.BRB").await;
    assert!(
        expected.len() > 5,
        "the demo district has staff: {expected:?}"
    );
    world
        .request(
            "district",
            json!({
                "recipient": [{ "reference": "Location/TF.N.BRB" }],
                "payload": [{ "contentString": "Ebola preparedness meeting at 10:00" }]
            }),
        )
        .await;
    let report = world.dispatcher("a").await.run_once().await.unwrap();
    assert_eq!(report.sent, expected.len(), "{report:?}");
    assert_eq!(report.batches_sent, 1);

    let outbox = world.outbox("district").await;
    let mut recipients: Vec<String> = outbox
        .iter()
        .map(|c| c["recipient"][0]["reference"].as_str().unwrap().to_string())
        .collect();
    recipients.sort();
    assert_eq!(recipients, expected);
    assert_eq!(
        common::count_by_status(&outbox),
        HashMap::from([("in-progress".to_string(), expected.len())])
    );
    let broadcast = world.sandbox.sandbox().state()["broadcasts"][0]["uuid"].clone();
    for c in &outbox {
        assert!(
            c["identifier"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["system"] == "http://app.rapidpro.io/broadcast-uuid"
                    && i["value"] == broadcast),
            "{c}"
        );
        assert_eq!(
            c["basedOn"][0]["reference"],
            "CommunicationRequest/district"
        );
        assert_eq!(
            c["payload"][0]["contentString"],
            "Ebola preparedness meeting at 10:00"
        );
    }
    let request = world
        .store
        .read("CommunicationRequest", "district")
        .await
        .unwrap();
    for resource in outbox.iter().chain([&request.resource]) {
        assert_valid_r4(resource);
    }
    let messages = world.messages_per_urn();
    assert_eq!(messages.len(), expected.len());
    assert!(messages.values().all(|n| *n == 1), "{messages:?}");
    assert_eq!(
        world.request_status("district").await,
        "active",
        "delivery is not known yet"
    );

    // A second pass sends nothing more.
    let again = world.dispatcher("a").await.run_once().await.unwrap();
    assert_eq!((again.sent, again.batches_sent), (0, 0), "{again:?}");
    assert_eq!(world.api_calls("broadcasts"), 1);
}

#[tokio::test]
async fn the_cadre_filter_narrows_a_region_to_its_doctors() {
    let world = World::ihris(&[], &[]).await;
    world
        .request("doctors", json!({
            "recipient": [{ "reference": "Location/TF" }],
            "payload": [{ "contentString": "Doctors: case definitions updated" }],
            "extension": [{ "url": "http://mhero.org/fhir/StructureDefinition/mhero-recipient-job",
                "valueCodeableConcept": { "coding": [{ "system": "http://example.org/other-system", "code": "2221-1D" }] } }]
        }))
        .await;
    world.dispatcher("a").await.run_once().await.unwrap();
    let roles = search_all(
        world.store.as_ref(),
        "PractitionerRole",
        vec![("role".into(), "2221-1D".into())],
    )
    .await
    .unwrap();
    let mut doctors: Vec<String> = roles
        .iter()
        .filter(|r| r.resource["active"] != false && r.resource["period"]["end"].is_null())
        .map(|r| {
            r.resource["practitioner"]["reference"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    doctors.sort();
    doctors.dedup();
    let mut reached: Vec<String> = world
        .outbox("doctors")
        .await
        .iter()
        .map(|c| c["recipient"][0]["reference"].as_str().unwrap().to_string())
        .collect();
    reached.sort();
    assert!(!doctors.is_empty());
    assert_eq!(reached, doctors);
}

#[tokio::test]
async fn unreachable_people_get_a_not_done_entry_with_a_reason() {
    let world = World::ihris(&["P10187"], &["P10204"]).await;
    world
        .store
        .update(
            "Practitioner",
            "inactive-1",
            json!({
                "resourceType": "Practitioner", "id": "inactive-1", "active": false,
                "telecom": [{ "system": "phone", "value": "077 999 0001" }]
            }),
            None,
        )
        .await
        .unwrap();
    world
        .store
        .update(
            "Practitioner",
            "bad-phone",
            json!({
                "resourceType": "Practitioner", "id": "bad-phone",
                "telecom": [{ "system": "phone", "value": "12" }]
            }),
            None,
        )
        .await
        .unwrap();
    world
        .store
        .update("Group", "nested", json!({ "resourceType": "Group", "id": "nested", "type": "practitioner", "actual": true,
            "member": [{ "entity": { "reference": "Practitioner/P10204" } }, { "entity": { "reference": "Practitioner/bad-phone" } }] }), None)
        .await
        .unwrap();
    world
        .store
        .update("Group", "outer", json!({ "resourceType": "Group", "id": "outer", "type": "practitioner", "actual": true,
            "member": [{ "entity": { "reference": "Group/nested" } }, { "entity": { "reference": "Practitioner/P10187" } }, { "entity": { "reference": "Group/outer" } }] }), None)
        .await
        .unwrap();
    world
        .request("mixed", json!({
            "contained": [{ "resourceType": "Person", "id": "visitor", "name": [{ "text": "Visiting Nurse" }],
                "telecom": [{ "system": "phone", "value": "+231 77 555 0123" }] }],
            "recipient": [
                { "reference": "Group/outer" },
                { "reference": "Practitioner/inactive-1" },
                { "reference": "Practitioner/missing" },
                { "reference": "Group/no-such-group" },
                { "reference": "#visitor" }
            ],
            "payload": [{ "contentString": "Stock count due Friday" }]
        }))
        .await;
    let report = world.dispatcher("a").await.run_once().await.unwrap();
    assert_eq!((report.sent, report.not_done), (1, 5), "{report:?}");
    let outbox = world.outbox("mixed").await;
    assert_eq!(reason_of(&outbox, "Practitioner/P10187"), "no phone number");
    assert_eq!(
        reason_of(&outbox, "Practitioner/P10204"),
        "opted out of mHero messages"
    );
    assert_eq!(
        reason_of(&outbox, "Practitioner/inactive-1"),
        "inactive (active = false)"
    );
    assert_eq!(
        reason_of(&outbox, "Practitioner/missing"),
        "Practitioner/missing was not found"
    );
    assert!(
        reason_of(&outbox, "Practitioner/bad-phone").starts_with("invalid phone number"),
        "{outbox:?}"
    );
    outbox.iter().for_each(assert_valid_r4);
    let visitor = outbox
        .iter()
        .find(|c| c["recipient"][0]["reference"] == "#visitor")
        .unwrap();
    assert_eq!(visitor["status"], "in-progress");
    assert_eq!(visitor["contained"][0]["id"], "visitor");
    let request = world
        .store
        .read("CommunicationRequest", "mixed")
        .await
        .unwrap()
        .resource;
    assert!(
        request
            .to_string()
            .contains("Group/no-such-group was not found"),
        "{request}"
    );
    assert_eq!(
        world.messages_per_urn().keys().collect::<Vec<_>>(),
        vec!["tel:+231775550123"]
    );
}

#[tokio::test]
async fn a_request_nobody_can_receive_completes_at_once() {
    let world = World::ihris(&["P10187"], &[]).await;
    world
        .request(
            "nobody",
            json!({
                "recipient": [{ "reference": "Practitioner/P10187" }],
                "payload": [{ "contentString": "Hello" }]
            }),
        )
        .await;
    let report = world.dispatcher("a").await.run_once().await.unwrap();
    assert_eq!(report.completed, 1, "{report:?}");
    assert_eq!(world.request_status("nobody").await, "completed");
    assert_eq!(world.api_calls("broadcasts"), 0);
}

#[tokio::test]
async fn a_flow_start_carries_params_and_a_message_goes_too() {
    let world = World::ihris(&[], &[]).await;
    let flow = common::fixture(COLOR_FLOW)["flows"][0]["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    world
        .request("survey", json!({
            "recipient": [{ "reference": "Location/TF.N.BRB" }],
            "payload": [
                { "contentString": "A short survey follows" },
                { "contentReference": { "reference": format!("Basic/{flow}") },
                  "extension": [{ "url": "http://mhero.org/fhir/StructureDefinition/mhero-flow-params",
                                  "extension": [{ "url": "district", "valueString": "Buraba" }] }] }
            ],
            "extension": [{ "url": "http://mhero.org/fhir/StructureDefinition/mhero-flow-start-options",
                            "extension": [{ "url": "restartParticipants", "valueBoolean": false }] }]
        }))
        .await;
    let expected = practitioners_below(&world, "TF.N.BRB").await.len();
    let report = world.dispatcher("a").await.run_once().await.unwrap();
    assert_eq!(
        report.sent,
        2 * expected,
        "each recipient once per kind: {report:?}"
    );
    let state = world.sandbox.sandbox().state();
    let start = &state["flow_starts"][0];
    assert_eq!(start["params"]["district"], "Buraba");
    assert!(start["params"]["mhero_batch"].is_string(), "{start}");
    assert_eq!(start["restart_participants"], false);
    let outbox = world.outbox("survey").await;
    let flow_entries = outbox
        .iter()
        .filter(|c| c["payload"][0]["contentReference"]["reference"] == format!("Basic/{flow}"))
        .count();
    assert_eq!(flow_entries, expected);
    world.sandbox.sandbox().process_flow_starts();
    let runs = world.sandbox.sandbox().state()["runs"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(runs, expected);
}

#[tokio::test]
async fn a_crash_between_any_two_steps_messages_everyone_exactly_once() {
    for (step, nth) in [
        (Step::Claimed, 1),
        (Step::BatchPrepared, 2),
        (Step::BatchSent, 2),
        (Step::BatchMarked, 1),
        (Step::BatchSent, 3),
    ] {
        let world = World::generated(250).await;
        world
            .request(
                "crash",
                json!({
                    "recipient": [{ "reference": "Group/everyone" }],
                    "payload": [{ "contentString": "Exactly once, please" }]
                }),
            )
            .await;
        world.crash_and_restart("replica-1", step, nth).await;
        let outbox = world.outbox("crash").await;
        assert_eq!(
            common::count_by_status(&outbox),
            HashMap::from([("in-progress".to_string(), 250)]),
            "{step:?}"
        );
        let messages = world.messages_per_urn();
        assert_eq!(messages.len(), 250, "{step:?}");
        assert!(messages.values().all(|n| *n == 1), "{step:?}: {messages:?}");
        assert_eq!(
            world.api_calls("broadcasts"),
            3,
            "{step:?}: ceil(250/100) broadcasts"
        );
    }
}

#[tokio::test]
async fn two_dispatchers_racing_send_each_batch_once() {
    let world = World::generated(300).await;
    world
        .request(
            "race",
            json!({
                "recipient": [{ "reference": "Group/everyone" }],
                "payload": [{ "contentString": "Only one of us sends this" }]
            }),
        )
        .await;
    let (a, b) = (world.dispatcher("a").await, world.dispatcher("b").await);
    let (ra, rb) = tokio::join!(a.run_once(), b.run_once());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.sent + rb.sent, 300, "{ra:?} {rb:?}");
    assert_eq!(
        ra.requests + rb.requests,
        1,
        "only one claimed it: {ra:?} {rb:?}"
    );
    assert_eq!(world.api_calls("broadcasts"), 3);
    assert!(world.messages_per_urn().values().all(|n| *n == 1));
}

#[tokio::test]
async fn scheduled_and_windowed_requests_wait_and_expire() {
    let world = World::ihris(&[], &[]).await;
    let now = chrono::Utc::now();
    let later = now + chrono::Duration::hours(2);
    world
        .request(
            "later",
            json!({
                "recipient": [{ "reference": "Practitioner/P10187" }],
                "payload": [{ "contentString": "Reminder" }],
                "occurrenceDateTime": later.to_rfc3339()
            }),
        )
        .await;
    world
        .request("expired", json!({
            "recipient": [{ "reference": "Practitioner/P10187" }],
            "payload": [{ "contentString": "Too late" }],
            "occurrencePeriod": { "start": (now - chrono::Duration::hours(3)).to_rfc3339(), "end": (now - chrono::Duration::hours(1)).to_rfc3339() }
        }))
        .await;
    let dispatcher = world.dispatcher("a").await;
    let report = dispatcher.run_at(now).await.unwrap();
    assert_eq!(report.sent, 0, "{report:?}");
    assert!(world.outbox("later").await.is_empty());
    let expired = world.outbox("expired").await;
    assert_eq!(expired[0]["status"], "not-done");
    assert!(reason_of(&expired, "Practitioner/P10187").contains("sending window"));
    assert_eq!(world.request_status("expired").await, "completed");

    let report = dispatcher
        .run_at(later + chrono::Duration::seconds(1))
        .await
        .unwrap();
    assert_eq!(report.sent, 1, "{report:?}");
    assert_eq!(world.outbox("later").await[0]["status"], "in-progress");
}

/// Contacts and groups synced to the sandbox, as `serve` would have done.
async fn sync_people_and_groups(world: &World) {
    let directory = mhero::jobs::rapidpro_directory::RapidProDirectory::new(
        common::rapidpro_client_for(&world.sandbox).await,
    );
    let phones = PhoneNormalizer::new(Some("LR")).unwrap();
    let contacts = mhero::jobs::contact_sync::ContactSync {
        store: world.store.as_ref(),
        directory: &directory,
        phones: &phones,
        page_size: 500,
        progress: indicatif::ProgressBar::hidden(),
    }
    .run_once(false)
    .await
    .unwrap();
    assert!(contacts.failures.is_empty(), "{contacts:?}");
    let groups = mhero::jobs::group_sync::GroupSync {
        store: world.store.as_ref(),
        directory: &directory,
        source: mhero::config::GroupsSource::Fhir,
    }
    .run_once()
    .await
    .unwrap();
    assert_eq!(groups.created, 1, "{groups:?}");
}

#[tokio::test]
async fn a_request_to_a_synced_group_is_one_call_naming_the_group() {
    let world = World::generated(250).await;
    sync_people_and_groups(&world).await;
    world
        .request(
            "to-group",
            json!({
                "recipient": [{ "reference": "Group/everyone" }],
                "payload": [{ "contentString": "One call for the whole group" }]
            }),
        )
        .await;
    let report = world.dispatcher("a").await.run_once().await.unwrap();
    assert_eq!((report.sent, report.batches_sent), (250, 1), "{report:?}");
    let calls: Vec<_> = world
        .sandbox
        .sandbox()
        .calls()
        .into_iter()
        .filter(|c| c.method == "POST" && c.path.contains("broadcasts"))
        .collect();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].body["groups"].as_array().unwrap().len(),
        1,
        "{:?}",
        calls[0].body
    );
    assert!(calls[0].body.get("contacts").is_none() && calls[0].body.get("urns").is_none());
    assert_eq!(
        common::count_by_status(&world.outbox("to-group").await),
        HashMap::from([("in-progress".to_string(), 250)])
    );
    let messages = world.messages_per_urn();
    assert_eq!(messages.len(), 250);
    assert!(messages.values().all(|n| *n == 1));

    // Someone opts out in FHIR before the group sync ran: back to batches
    // of people, so the opted-out worker is not messaged through the group.
    let mut p = world
        .store
        .read("Practitioner", "gen-7")
        .await
        .unwrap()
        .resource;
    p["meta"]["tag"] = json!([{ "system": "http://mhero.org/codesystem", "code": "optedout" }]);
    world
        .store
        .update("Practitioner", "gen-7", p, None)
        .await
        .unwrap();
    world
        .request(
            "after-opt-out",
            json!({
                "recipient": [{ "reference": "Group/everyone" }],
                "payload": [{ "contentString": "Second message" }]
            }),
        )
        .await;
    let report = world.dispatcher("a").await.run_once().await.unwrap();
    assert_eq!(
        (report.sent, report.not_done, report.batches_sent),
        (249, 1, 3),
        "{report:?}"
    );
}

#[tokio::test]
async fn a_crash_after_a_group_call_is_reconciled_by_the_group() {
    let world = World::generated(120).await;
    sync_people_and_groups(&world).await;
    world
        .request(
            "group-crash",
            json!({
                "recipient": [{ "reference": "Group/everyone" }],
                "payload": [{ "contentString": "Once, through the group" }]
            }),
        )
        .await;
    let report = world.crash_and_restart("a", Step::BatchSent, 1).await;
    assert_eq!(
        (report.reconciled, report.batches_sent, report.sent),
        (1, 0, 120),
        "{report:?}"
    );
    assert_eq!(world.api_calls("broadcasts"), 1);
    assert!(world.messages_per_urn().values().all(|n| *n == 1));
}

#[tokio::test]
async fn a_crash_mid_way_through_ten_thousand_recipients_messages_each_once() {
    let world = World::generated(10_000).await;
    world
        .request(
            "big",
            json!({
                "recipient": [{ "reference": "Group/everyone" }],
                "payload": [{ "contentString": "National campaign starts Monday" }]
            }),
        )
        .await;
    // Batches are in flight four at a time: the crash drops the others
    // wherever they were (written, sent, or being marked).
    let report = world
        .crash_and_restart("replica-1", Step::BatchSent, 37)
        .await;
    assert!(
        report.reconciled >= 1,
        "the crashed batch was found, not re-sent: {report:?}"
    );
    assert_eq!(
        common::count_by_status(&world.outbox("big").await),
        HashMap::from([("in-progress".to_string(), 10_000)])
    );
    assert_eq!(
        world.api_calls("broadcasts"),
        100,
        "ceil(10,000 / 100) broadcasts, none twice"
    );
    let messages = world.messages_per_urn();
    assert_eq!(messages.len(), 10_000);
    assert!(messages.values().all(|n| *n == 1));
}
