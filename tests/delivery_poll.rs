//! Delivery status from the RapidPro sandbox into the outbox: sent and
//! delivered messages complete their Communication, a message to a blocked
//! contact fails it with a reason, the request completes once everything is
//! final (never while it is still being dispatched), and a second poll
//! changes nothing.

mod common;

use std::sync::Arc;

use mhero::jobs::delivery_poll::DeliveryPoll;
use mhero::jobs::dispatch::{Dispatcher, Step};
use mhero::pipeline::phone::PhoneNormalizer;
use mhero::rapidpro::sandbox::{SandboxServer, SandboxSettings};
use mhero::store::SharedStore;
use mhero::store::sqlite::SqliteStore;
use serde_json::{Value, json};

struct World {
    dir: tempfile::TempDir,
    store: SharedStore,
    sandbox: SandboxServer,
}

impl World {
    async fn with_people(n: usize) -> World {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(
            SqliteStore::open(&dir.path().join("fhir.sqlite"))
                .await
                .unwrap(),
        );
        for i in 0..n {
            let id = format!("p{i}");
            store
                .update(
                    "Practitioner",
                    &id,
                    json!({ "resourceType": "Practitioner", "id": id,
                        "telecom": [{ "system": "phone", "value": format!("077 000 {:04}", 1000 + i) }] }),
                    None,
                )
                .await
                .unwrap();
        }
        let sandbox = SandboxServer::start(SandboxSettings::default())
            .await
            .unwrap();
        World {
            dir,
            store,
            sandbox,
        }
    }

    async fn dispatcher(&self) -> Dispatcher {
        Dispatcher::new(
            Arc::clone(&self.store),
            common::rapidpro_client_for(&self.sandbox).await,
            Arc::new(PhoneNormalizer::new(Some("LR")).unwrap()),
            common::test_settings(&self.dir, &[]).messaging,
        )
    }

    async fn poll(&self) -> DeliveryPoll {
        DeliveryPoll {
            store: Arc::clone(&self.store),
            client: common::rapidpro_client_for(&self.sandbox).await,
        }
    }

    async fn request(&self, id: &str, people: std::ops::Range<usize>) {
        let recipients: Vec<Value> = people
            .map(|i| json!({ "reference": format!("Practitioner/p{i}") }))
            .collect();
        self.store
            .update(
                "CommunicationRequest",
                id,
                json!({ "resourceType": "CommunicationRequest", "id": id, "status": "active",
                    "recipient": recipients, "payload": [{ "contentString": format!("Message {id}") }] }),
                None,
            )
            .await
            .unwrap();
    }

    /// The sandbox moves every message as far as it goes.
    fn deliver(&self) {
        for _ in 0..4 {
            self.sandbox.sandbox().tick();
        }
    }

    async fn status(&self, id: &str) -> String {
        self.store
            .read("CommunicationRequest", id)
            .await
            .unwrap()
            .resource["status"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

#[tokio::test]
async fn delivered_messages_complete_the_outbox_and_a_blocked_contact_fails() {
    let world = World::with_people(3).await;
    world.request("first", 0..3).await;
    world.dispatcher().await.run_once().await.unwrap();
    world.deliver();
    // p1's contact (created by the first broadcast) is blocked in RapidPro.
    let state = world.sandbox.sandbox().state();
    let p1 = state["contacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["urns"][0] == "tel:+231770001001")
        .unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(world.sandbox.sandbox().set_contact_status(&p1, "blocked"));
    world.request("second", 0..3).await;
    world.dispatcher().await.run_once().await.unwrap();
    world.deliver();

    let report = world.poll().await.run_once().await.unwrap();
    assert_eq!((report.delivered, report.failed), (5, 1), "{report:?}");
    assert_eq!(report.completed_requests, 2, "{report:?}");
    assert_eq!(world.status("first").await, "completed");
    assert_eq!(world.status("second").await, "completed");

    let second = common::outbox_of(world.store.as_ref(), "second").await;
    let failed = second.iter().find(|c| c["status"] == "not-done").unwrap();
    assert_eq!(failed["recipient"][0]["reference"], "Practitioner/p1");
    assert_eq!(
        failed["statusReason"]["coding"][0]["code"],
        "contact-blocked"
    );
    assert!(
        failed["statusReason"]["text"]
            .as_str()
            .unwrap()
            .contains("blocked")
    );
    for c in second.iter().filter(|c| c["status"] == "completed") {
        assert!(c["sent"].is_string(), "{c}");
    }

    // Nothing moves twice.
    let versions: Vec<Value> = second
        .iter()
        .map(|c| c["meta"]["versionId"].clone())
        .collect();
    let again = world.poll().await.run_once().await.unwrap();
    assert_eq!(
        (again.delivered, again.failed, again.broadcasts),
        (0, 0, 0),
        "{again:?}"
    );
    let after: Vec<Value> = common::outbox_of(world.store.as_ref(), "second")
        .await
        .iter()
        .map(|c| c["meta"]["versionId"].clone())
        .collect();
    assert_eq!(versions, after);
}

#[tokio::test]
async fn a_request_still_being_dispatched_is_not_completed_early() {
    let world = World::with_people(150).await;
    world.request("big", 0..150).await;
    // The dispatcher dies after the first batch of 100 is marked sent.
    let mut settings = common::test_settings(&world.dir, &[]).messaging;
    settings.max_concurrent_calls = 1;
    let crashing = Dispatcher::new(
        Arc::clone(&world.store),
        common::rapidpro_client_for(&world.sandbox).await,
        Arc::new(PhoneNormalizer::new(Some("LR")).unwrap()),
        settings,
    )
    .crash_at(Step::BatchMarked, 1);
    assert!(crashing.run_once().await.is_err());
    world.deliver();
    let report = world.poll().await.run_once().await.unwrap();
    assert_eq!(report.delivered, 100, "{report:?}");
    assert_eq!(report.completed_requests, 0);
    assert_eq!(
        world.status("big").await,
        "active",
        "50 recipients are not even planned yet"
    );

    world.dispatcher().await.run_once().await.unwrap();
    world.deliver();
    let report = world.poll().await.run_once().await.unwrap();
    assert_eq!(
        (report.delivered, report.completed_requests),
        (50, 1),
        "{report:?}"
    );
    assert_eq!(world.status("big").await, "completed");
}

impl World {
    async fn inbound(&self) -> mhero::jobs::inbound_poll::InboundPoll {
        let mut settings = common::test_settings(&self.dir, &[]).messaging;
        settings.organization_reference = "Organization/moh".into();
        mhero::jobs::inbound_poll::InboundPoll {
            store: Arc::clone(&self.store),
            client: common::rapidpro_client_for(&self.sandbox).await,
            settings,
            overlap: std::time::Duration::from_secs(300),
        }
    }

    /// Contacts are known to FHIR by their uuid (as the contact sync
    /// writes it back).
    async fn link_contacts(&self) {
        let state = self.sandbox.sandbox().state();
        for contact in state["contacts"].as_array().unwrap() {
            let urn = contact["urns"][0].as_str().unwrap();
            let n: usize = urn
                .trim_start_matches("tel:+23177000")
                .parse::<usize>()
                .unwrap()
                - 1000;
            let id = format!("p{n}");
            let uuid = contact["uuid"].as_str().unwrap().to_string();
            mhero::store::modify_resource(self.store.as_ref(), "Practitioner", &id, |p| {
                let mut p = p.clone();
                p["identifier"] =
                    json!([{ "system": "http://app.rapidpro.io/contact-uuid", "value": uuid }]);
                Some(p)
            })
            .await
            .unwrap();
        }
    }
}

#[tokio::test]
async fn replies_are_recorded_once_linked_to_what_was_sent_and_stop_opts_out() {
    let world = World::with_people(2).await;
    world.request("ask", 0..2).await;
    world.dispatcher().await.run_once().await.unwrap();
    world.deliver();
    world.link_contacts().await;
    world
        .sandbox
        .sandbox()
        .receive_message("tel:+231770001000", "We have 40 ORS sachets")
        .unwrap();
    world
        .sandbox
        .sandbox()
        .receive_message("tel:+231770001001", " stop ")
        .unwrap();

    let report = world.inbound().await.run_once().await.unwrap();
    assert_eq!(
        (report.read, report.recorded, report.opted_out),
        (2, 2, 1),
        "{report:?}"
    );
    let replies = mhero::store::search_all(
        world.store.as_ref(),
        "Communication",
        vec![("sender".into(), "Practitioner/p0".into())],
    )
    .await
    .unwrap();
    assert_eq!(replies.len(), 1);
    let reply = &replies[0].resource;
    assert_eq!(
        reply["payload"][0]["contentString"],
        "We have 40 ORS sachets"
    );
    assert_eq!(reply["recipient"][0]["reference"], "Organization/moh");
    assert_eq!(reply["basedOn"][0]["reference"], "CommunicationRequest/ask");
    let sent_to_p0 = common::outbox_of(world.store.as_ref(), "ask")
        .await
        .into_iter()
        .find(|c| c["recipient"][0]["reference"] == "Practitioner/p0")
        .unwrap();
    assert_eq!(
        reply["inResponseTo"][0]["reference"],
        format!("Communication/{}", sent_to_p0["id"].as_str().unwrap())
    );
    assert_eq!(reply["medium"][0]["coding"][0]["code"], "SMSWRIT");
    let p1 = world
        .store
        .read("Practitioner", "p1")
        .await
        .unwrap()
        .resource;
    assert!(p1["meta"]["tag"].to_string().contains("optedout"), "{p1}");

    // RapidPro still has the contact active (the STOP came as a text): the
    // contact status poll must not undo the person's own opt-out.
    let client = common::rapidpro_client_for(&world.sandbox).await;
    mhero::jobs::contact_status_poll::ContactStatusPoll {
        store: world.store.as_ref(),
        client: &client,
        import_unknown_contacts: false,
        overlap: chrono::Duration::seconds(300),
    }
    .run_once()
    .await
    .unwrap();
    let p1 = world
        .store
        .read("Practitioner", "p1")
        .await
        .unwrap()
        .resource;
    assert!(p1["meta"]["tag"].to_string().contains("optedout"), "{p1}");

    // Read again: nothing new, no second opt-out.
    let again = world.inbound().await.run_once().await.unwrap();
    assert_eq!((again.recorded, again.opted_out), (0, 0), "{again:?}");

    // The opted-out worker is not messaged; START brings them back.
    world.request("next", 0..2).await;
    world.dispatcher().await.run_once().await.unwrap();
    let next = common::outbox_of(world.store.as_ref(), "next").await;
    let p1_entry = next
        .iter()
        .find(|c| c["recipient"][0]["reference"] == "Practitioner/p1")
        .unwrap();
    assert_eq!(p1_entry["status"], "not-done");
    world
        .sandbox
        .sandbox()
        .receive_message("tel:+231770001001", "Start")
        .unwrap();
    let back = world.inbound().await.run_once().await.unwrap();
    assert_eq!(back.opted_in, 1, "{back:?}");
    let p1 = world
        .store
        .read("Practitioner", "p1")
        .await
        .unwrap()
        .resource;
    assert!(!p1["meta"]["tag"].to_string().contains("optedout"), "{p1}");
}

#[tokio::test]
async fn a_failed_flow_start_fails_its_entries_and_a_running_one_waits_for_its_runs() {
    use common::survey::{Survey, survey_export, survey_uuid};
    let running = Survey::start(1, survey_export(), None).await;
    let poll = DeliveryPoll {
        store: Arc::clone(&running.store),
        client: running.client.clone(),
    };
    let report = poll.run_once().await.unwrap();
    assert_eq!(
        (report.flow_starts, report.waiting, report.failed),
        (1, 1, 0),
        "{report:?}"
    );
    assert_eq!(running.outbox_status("hw-0").await, "in-progress");

    // The flow is archived before RapidPro processes the start: it fails.
    let failed = Survey::start_then(2, survey_export(), None, |sandbox| {
        assert!(sandbox.set_flow_archived(&survey_uuid(), true));
    })
    .await;
    let poll = DeliveryPoll {
        store: Arc::clone(&failed.store),
        client: failed.client.clone(),
    };
    let report = poll.run_once().await.unwrap();
    assert_eq!(
        (report.flow_starts, report.failed, report.completed_requests),
        (1, 2, 1),
        "{report:?}"
    );
    for practitioner in ["hw-0", "hw-1"] {
        assert_eq!(failed.outbox_status(practitioner).await, "not-done");
    }
    assert_eq!(failed.request_status().await, "completed");
    let again = poll.run_once().await.unwrap();
    assert_eq!((again.flow_starts, again.failed), (0, 0), "{again:?}");
}

#[tokio::test]
async fn a_sender_without_the_uuid_identifier_is_found_by_emnutt_fields_and_a_reply_is_read_once() {
    use mhero::rapidpro::client::ContactLookup;
    use mhero::rapidpro::types::{ContactWrite, FieldType, FieldWrite};
    let world = World::with_people(2).await;
    // The contact was made by emNutt: no uuid identifier on p1, but the
    // contact names it through its globalid/mheroentitytype fields.
    let contact = world
        .sandbox
        .sandbox()
        .receive_message("tel:+231770001001", "Clinic closed today")
        .unwrap();
    let client = common::rapidpro_client_for(&world.sandbox).await;
    for name in ["globalid", "mheroentitytype"] {
        client
            .create_field(&FieldWrite {
                name: name.into(),
                field_type: FieldType::Text,
            })
            .await
            .unwrap();
    }
    // emNutt's fields on a contact: the person it stands for.
    let name_person = |contact: String, id: &'static str| {
        let client = client.clone();
        async move {
            let fields = [("globalid", id), ("mheroentitytype", "Practitioner")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), Some(v.to_string())))
                .collect();
            client
                .update_contact(
                    &ContactLookup::Uuid(contact),
                    &ContactWrite {
                        fields: Some(fields),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
        }
    };
    name_person(contact, "p1").await;
    // Another contact names a person the store does not have.
    let stranger = world
        .sandbox
        .sandbox()
        .receive_message("tel:+231770009999", "hello")
        .unwrap();
    name_person(stranger, "nobody").await;

    let inbound = world.inbound().await;
    let report = inbound.run_once().await.unwrap();
    assert_eq!(
        (report.read, report.recorded, report.unknown_sender),
        (2, 2, 1),
        "{report:?}"
    );
    let from_p1 = mhero::store::search_all(
        world.store.as_ref(),
        "Communication",
        vec![("sender".into(), "Practitioner/p1".into())],
    )
    .await
    .unwrap();
    assert_eq!(from_p1.len(), 1);
    let version = from_p1[0].resource["meta"]["versionId"].clone();

    // The overlap reads both again: nothing is written or counted twice.
    let again = inbound.run_once().await.unwrap();
    assert_eq!((again.read, again.recorded), (2, 0), "{again:?}");
    let after = world
        .store
        .read("Communication", &from_p1[0].id)
        .await
        .unwrap();
    assert_eq!(after.resource["meta"]["versionId"], version);
}
