//! The scheduler and `$cancel` end to end: schedule parents in the embedded
//! store, the scheduler driven with `run_at(now)` at chosen instants (no
//! waiting on the clock), firings sent by the dispatcher through the
//! in-process RapidPro sandbox.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use mhero::jobs::dispatch::{DispatchError, Dispatcher, Step};
use mhero::jobs::schedule::{
    CancelError, SCHEDULE_STATE_EXTENSION, ScheduleReport, Scheduler, cancel_request,
    firing_request, last_fired,
};
use mhero::pipeline::outbox::DispatchState;
use mhero::pipeline::phone::PhoneNormalizer;
use mhero::pipeline::request::{MessageRequest, SCHEDULE_EXTENSION};
use mhero::rapidpro::sandbox::{SandboxServer, SandboxSettings};
use mhero::store::sqlite::SqliteStore;
use mhero::store::{SharedStore, search_all};
use serde_json::{Value, json};

struct World {
    _dir: tempfile::TempDir,
    store: SharedStore,
    sandbox: SandboxServer,
    settings: mhero::config::Settings,
}

impl World {
    /// `n` practitioners with phones, all in `Group/everyone`; settings
    /// overridden by `MHERO__...` pairs.
    async fn new(n: usize, overrides: &[(&str, &str)]) -> World {
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
                    "telecom": [{ "system": "phone", "value": format!("077 {:03} {:04}", i / 10_000, i % 10_000) }] },
                "request": { "method": "PUT", "url": format!("Practitioner/{id}") }
            }));
            members.push(json!({ "entity": { "reference": format!("Practitioner/{id}") } }));
        }
        entries.push(json!({
            "resource": { "resourceType": "Group", "id": "everyone", "type": "practitioner", "actual": true, "member": members },
            "request": { "method": "PUT", "url": "Group/everyone" }
        }));
        store
            .process_bundle(
                json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries }),
            )
            .await
            .unwrap();
        let sandbox = SandboxServer::start(SandboxSettings::default())
            .await
            .unwrap();
        let settings = common::test_settings(&dir, overrides);
        World {
            _dir: dir,
            store,
            sandbox,
            settings,
        }
    }

    fn scheduler(&self) -> Scheduler {
        Scheduler {
            store: Arc::clone(&self.store),
            settings: self.settings.messaging.clone(),
        }
    }

    async fn dispatcher(&self) -> Dispatcher {
        let mut messaging = self.settings.messaging.clone();
        messaging.instance_id = "replica-1".into();
        // One batch at a time, so that a crash "after the first batch" is exact.
        messaging.max_concurrent_calls = 1;
        Dispatcher::new(
            Arc::clone(&self.store),
            common::rapidpro_client_for(&self.sandbox).await,
            Arc::new(PhoneNormalizer::new(Some("LR")).unwrap()),
            messaging,
        )
    }

    /// A message to everyone; `schedule` = (cron, frequency) makes it a
    /// schedule parent.
    async fn request(&self, id: &str, authored_on: &str, schedule: Option<(&str, &str)>) {
        let mut body = json!({
            "resourceType": "CommunicationRequest",
            "id": id,
            "status": "active",
            "authoredOn": authored_on,
            "identifier": [{ "system": "urn:ihris", "value": id }],
            "recipient": [{ "reference": "Group/everyone" }],
            "payload": [{ "contentString": format!("Reminder {id}") }]
        });
        if let Some((cron, frequency)) = schedule {
            body["extension"] = json!([{ "url": SCHEDULE_EXTENSION, "extension": [
                { "url": "cronExpression", "valueString": cron },
                { "url": "frequency", "valueString": frequency }
            ]}]);
        }
        self.store
            .update("CommunicationRequest", id, body, None)
            .await
            .unwrap();
    }

    async fn read(&self, id: &str) -> Value {
        self.store
            .read("CommunicationRequest", id)
            .await
            .unwrap()
            .resource
    }

    /// The firing requests of `parent`, by occurrence.
    async fn children(&self, parent: &str) -> Vec<Value> {
        let mut children: Vec<Value> = search_all(
            self.store.as_ref(),
            "CommunicationRequest",
            vec![
                ("based-on".into(), format!("CommunicationRequest/{parent}")),
                ("_count".into(), "100".into()),
            ],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.resource)
        .collect();
        children.sort_by_key(|c| c["occurrenceDateTime"].as_str().unwrap_or("").to_string());
        children
    }

    async fn outbox(&self, request_id: &str) -> Vec<Value> {
        common::outbox_of(self.store.as_ref(), request_id).await
    }

    fn broadcasts_created(&self) -> usize {
        self.sandbox
            .sandbox()
            .calls()
            .iter()
            .filter(|c| c.method == "POST" && c.path.contains("broadcasts"))
            .count()
    }
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

fn occurrences(children: &[Value]) -> Vec<&str> {
    children
        .iter()
        .map(|c| c["occurrenceDateTime"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn a_weekly_schedule_fires_at_local_time_in_the_configured_zone() {
    // Monday 08:00 in Nairobi (UTC+3) is 05:00 UTC; in Monrovia (UTC+0) 08:00.
    let nairobi = World::new(
        3,
        &[("MHERO__MESSAGING__SCHEDULE_TIME_ZONE", "Africa/Nairobi")],
    )
    .await;
    let monrovia = World::new(
        3,
        &[("MHERO__MESSAGING__SCHEDULE_TIME_ZONE", "Africa/Monrovia")],
    )
    .await;
    for world in [&nairobi, &monrovia] {
        // 2026-03-01 is a Sunday.
        world
            .request(
                "weekly",
                "2026-03-01T00:00:00Z",
                Some(("0 8 * * MON", "recurring")),
            )
            .await;
        let report = world
            .scheduler()
            .run_at(at("2026-03-01T01:00:00Z"))
            .await
            .unwrap();
        assert_eq!(
            (report.parents, report.held, report.fired),
            (1, 1, 0),
            "{report:?}"
        );
        assert_eq!(world.read("weekly").await["status"], "on-hold");
        assert!(
            world
                .scheduler()
                .run_at(at("2026-03-02T04:59:59Z"))
                .await
                .unwrap()
                .fired
                == 0
        );
    }
    let report = nairobi
        .scheduler()
        .run_at(at("2026-03-02T05:00:10Z"))
        .await
        .unwrap();
    assert_eq!(report.fired, 1, "{report:?}");
    let report = monrovia
        .scheduler()
        .run_at(at("2026-03-02T05:00:10Z"))
        .await
        .unwrap();
    assert_eq!(
        report.fired, 0,
        "08:00 in Monrovia is not there yet: {report:?}"
    );
    let report = monrovia
        .scheduler()
        .run_at(at("2026-03-02T08:00:10Z"))
        .await
        .unwrap();
    assert_eq!(report.fired, 1, "{report:?}");

    // The next passes of the same minute fire nothing more; next Monday does.
    for world in [&nairobi, &monrovia] {
        let again = world
            .scheduler()
            .run_at(at("2026-03-02T08:00:40Z"))
            .await
            .unwrap();
        assert_eq!(again.fired + again.already_fired, 0, "{again:?}");
        world
            .scheduler()
            .run_at(at("2026-03-09T08:00:30Z"))
            .await
            .unwrap();
        world
            .scheduler()
            .run_at(at("2026-03-10T12:00:00Z"))
            .await
            .unwrap();
    }
    assert_eq!(
        occurrences(&nairobi.children("weekly").await),
        ["2026-03-02T05:00:00.000Z", "2026-03-09T05:00:00.000Z"]
    );
    assert_eq!(
        occurrences(&monrovia.children("weekly").await),
        ["2026-03-02T08:00:00.000Z", "2026-03-09T08:00:00.000Z"]
    );
    let parent = nairobi.read("weekly").await;
    assert_eq!(
        parent["status"], "on-hold",
        "a recurring schedule keeps waiting"
    );
    assert_eq!(last_fired(&parent), Some(at("2026-03-09T05:00:00Z")));

    // A firing is a plain, sendable request of its own.
    let children = nairobi.children("weekly").await;
    let child = &children[0];
    assert_eq!(child["status"], "active");
    assert_eq!(
        child["basedOn"][0]["reference"],
        "CommunicationRequest/weekly"
    );
    assert!(
        child.get("identifier").is_none(),
        "the parent keeps its identifier"
    );
    let extensions = child["extension"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(
        extensions, 0,
        "no schedule, schedule state or dispatch state: {child}"
    );
    let parsed = MessageRequest::parse(child).unwrap();
    assert!(parsed.schedule.is_none());
    assert_eq!(parsed.recipients.len(), 1);

    // The dispatcher sends each firing once, with its own outbox.
    let report = nairobi
        .dispatcher()
        .await
        .run_at(at("2026-03-10T12:00:10Z"))
        .await
        .unwrap();
    assert_eq!(report.sent, 6, "3 recipients x 2 firings: {report:?}");
    for child in &children {
        let id = child["id"].as_str().unwrap();
        let outbox = nairobi.outbox(id).await;
        assert_eq!(
            common::count_by_status(&outbox),
            HashMap::from([("in-progress".into(), 3)])
        );
        assert!(
            outbox
                .iter()
                .all(|c| c["basedOn"][0]["reference"] == format!("CommunicationRequest/{id}"))
        );
    }
    assert!(
        nairobi.outbox("weekly").await.is_empty(),
        "the parent is never sent"
    );
    assert_eq!(nairobi.broadcasts_created(), 2);
}

#[tokio::test]
async fn a_once_schedule_fires_once_and_completes() {
    let world = World::new(
        2,
        &[("MHERO__MESSAGING__SCHEDULE_TIME_ZONE", "Africa/Monrovia")],
    )
    .await;
    // iHRIS's "send once later": 5 September, 14:06.
    world
        .request(
            "later",
            "2026-08-01T10:00:00Z",
            Some(("06 14 05 09 *", "once")),
        )
        .await;
    assert_eq!(
        world
            .scheduler()
            .run_at(at("2026-09-05T14:05:00Z"))
            .await
            .unwrap()
            .fired,
        0
    );
    let report = world
        .scheduler()
        .run_at(at("2026-09-05T14:06:20Z"))
        .await
        .unwrap();
    assert_eq!((report.fired, report.completed), (1, 1), "{report:?}");
    assert_eq!(world.read("later").await["status"], "completed");
    // emNutt fired it again every year; this does not.
    let report = world
        .scheduler()
        .run_at(at("2027-09-05T14:06:20Z"))
        .await
        .unwrap();
    assert_eq!(report, ScheduleReport::default());
    assert_eq!(
        occurrences(&world.children("later").await),
        ["2026-09-05T14:06:00.000Z"]
    );
}

#[tokio::test]
async fn a_crash_between_creating_the_firing_and_updating_the_parent_does_not_duplicate() {
    let world = World::new(2, &[]).await;
    world
        .request(
            "daily",
            "2026-03-01T00:00:00Z",
            Some(("0 9 * * *", "recurring")),
        )
        .await;
    world
        .scheduler()
        .run_at(at("2026-03-01T01:00:00Z"))
        .await
        .unwrap();
    // A scheduler created the firing of 09:00, then died before the parent.
    let parent = world
        .store
        .read("CommunicationRequest", "daily")
        .await
        .unwrap();
    let firing = at("2026-03-01T09:00:00Z");
    let child = firing_request(&parent, firing);
    let child_id = child["id"].as_str().unwrap().to_string();
    world
        .store
        .update("CommunicationRequest", &child_id, child, None)
        .await
        .unwrap();
    assert_eq!(last_fired(&world.read("daily").await), None);

    let report = world
        .scheduler()
        .run_at(at("2026-03-01T09:00:30Z"))
        .await
        .unwrap();
    assert_eq!((report.fired, report.already_fired), (0, 1), "{report:?}");
    let children = world.children("daily").await;
    assert_eq!(children.len(), 1);
    assert_eq!(children[0]["id"], child_id.as_str());
    assert_eq!(last_fired(&world.read("daily").await), Some(firing));
    let report = world
        .scheduler()
        .run_at(at("2026-03-01T09:01:00Z"))
        .await
        .unwrap();
    assert_eq!(report.fired + report.already_fired, 0, "{report:?}");
}

#[tokio::test]
async fn two_schedulers_racing_create_one_request_per_firing() {
    let world = World::new(2, &[]).await;
    world
        .request(
            "race",
            "2026-03-01T00:00:00Z",
            Some(("*/10 * * * *", "recurring")),
        )
        .await;
    for minute in ["00", "10", "20"] {
        let now = at(&format!("2026-03-01T09:{minute}:05Z"));
        let (a, b) = (world.scheduler(), world.scheduler());
        let (ra, rb) = tokio::join!(a.run_at(now), b.run_at(now));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(ra.fired + rb.fired <= 1, "{ra:?} {rb:?}");
    }
    assert_eq!(
        occurrences(&world.children("race").await),
        [
            "2026-03-01T09:00:00.000Z",
            "2026-03-01T09:10:00.000Z",
            "2026-03-01T09:20:00.000Z"
        ]
    );
}

#[tokio::test]
async fn missed_firings_are_sent_once_late_or_skipped() {
    for (policy, expected_late) in [("send-once", 1), ("skip", 0)] {
        let world = World::new(2, &[("MHERO__MESSAGING__MISSED_FIRINGS", policy)]).await;
        world
            .request(
                "daily",
                "2026-03-01T00:00:00Z",
                Some(("0 9 * * *", "recurring")),
            )
            .await;
        world
            .scheduler()
            .run_at(at("2026-03-01T01:00:00Z"))
            .await
            .unwrap();
        // Down from before the first firing until after the fifth.
        let late = world
            .scheduler()
            .run_at(at("2026-03-05T12:00:00Z"))
            .await
            .unwrap();
        assert_eq!(late.fired, expected_late, "{policy}: {late:?}");
        assert_eq!(late.skipped, 1 - expected_late, "{policy}: {late:?}");
        let again = world
            .scheduler()
            .run_at(at("2026-03-05T12:30:00Z"))
            .await
            .unwrap();
        assert_eq!(
            again.fired + again.already_fired + again.skipped,
            0,
            "{policy}: {again:?}"
        );
        let children = world.children("daily").await;
        if expected_late == 1 {
            // The latest missed firing stands for all of them.
            assert_eq!(
                occurrences(&children),
                ["2026-03-05T09:00:00.000Z"],
                "{policy}"
            );
        } else {
            assert!(children.is_empty(), "{policy}");
        }
        // Then the schedule goes on as usual.
        let next = world
            .scheduler()
            .run_at(at("2026-03-06T09:00:20Z"))
            .await
            .unwrap();
        assert_eq!(next.fired, 1, "{policy}: {next:?}");
        assert_eq!(
            world.children("daily").await.len(),
            expected_late + 1,
            "{policy}"
        );
        assert_eq!(
            last_fired(&world.read("daily").await),
            Some(at("2026-03-06T09:00:00Z"))
        );
    }
}

#[tokio::test]
async fn cancel_stops_future_firings_and_unsent_ones() {
    let world = World::new(2, &[]).await;
    world
        .request(
            "daily",
            "2026-03-01T00:00:00Z",
            Some(("0 9 * * *", "recurring")),
        )
        .await;
    let scheduler = world.scheduler();
    scheduler.run_at(at("2026-03-01T09:00:10Z")).await.unwrap();
    world
        .dispatcher()
        .await
        .run_at(at("2026-03-01T09:00:20Z"))
        .await
        .unwrap();
    scheduler.run_at(at("2026-03-02T09:00:10Z")).await.unwrap();
    let children = world.children("daily").await;
    assert_eq!(children.len(), 2);

    let cancelled = cancel_request(world.store.as_ref(), "daily").await.unwrap();
    assert_eq!(cancelled.resource["status"], "revoked");
    let children = world.children("daily").await;
    // The sent firing is a record; the unsent one is cancelled.
    assert_eq!(children[0]["status"], "active", "sent, awaiting delivery");
    assert_eq!(DispatchState::read(&children[0]).phase, "dispatched");
    assert_eq!(children[1]["status"], "revoked");
    let later = scheduler.run_at(at("2026-03-10T09:00:10Z")).await.unwrap();
    assert_eq!(later.fired, 0, "{later:?}");
    assert_eq!(world.children("daily").await.len(), 2);
    world
        .dispatcher()
        .await
        .run_at(at("2026-03-10T09:00:20Z"))
        .await
        .unwrap();
    assert!(
        world
            .outbox(children[1]["id"].as_str().unwrap())
            .await
            .is_empty()
    );
    assert_eq!(world.broadcasts_created(), 1);

    // Again: the same answer. Unknown: not found.
    let again = cancel_request(world.store.as_ref(), "daily").await.unwrap();
    assert_eq!(again.resource["status"], "revoked");
    assert!(matches!(
        cancel_request(world.store.as_ref(), "nope").await,
        Err(CancelError::NotFound(_))
    ));
    // The parent's schedule state survives the cancel.
    let parent = world.read("daily").await;
    assert!(
        parent["extension"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["url"] == SCHEDULE_STATE_EXTENSION)
    );
}

#[tokio::test]
async fn cancel_in_the_middle_of_a_dispatch_sends_no_more() {
    let world = World::new(250, &[]).await;
    world.request("big", "2026-03-01T00:00:00Z", None).await;
    let crashing = world.dispatcher().await.crash_at(Step::BatchMarked, 1);
    let error = crashing.run_once().await.unwrap_err();
    assert!(
        matches!(error, DispatchError::Crashed(Step::BatchMarked)),
        "{error}"
    );
    assert_eq!(world.broadcasts_created(), 1);

    cancel_request(world.store.as_ref(), "big").await.unwrap();
    world.dispatcher().await.run_once().await.unwrap();
    let outbox = world.outbox("big").await;
    assert_eq!(
        common::count_by_status(&outbox),
        HashMap::from([("in-progress".into(), 100), ("not-done".into(), 150)])
    );
    assert!(
        outbox
            .iter()
            .filter(|c| c["status"] == "not-done")
            .all(|c| c["statusReason"]["text"]
                .as_str()
                .unwrap()
                .contains("cancelled")),
        "every unsent entry says it was cancelled"
    );
    assert_eq!(
        world.broadcasts_created(),
        1,
        "no RapidPro call after the cancel"
    );
    assert_eq!(world.read("big").await["status"], "revoked");
    // A further pass changes nothing.
    world.dispatcher().await.run_once().await.unwrap();
    assert_eq!(world.broadcasts_created(), 1);
}

#[tokio::test]
async fn the_api_refuses_bad_cron_and_cancels_with_the_fhir_operation() {
    let app = common::spawn_app().await;
    let request = |cron: &str| {
        json!({
            "resourceType": "CommunicationRequest",
            "status": "active",
            "recipient": [{ "reference": "Practitioner/p1" }],
            "payload": [{ "contentString": "Hello" }],
            "extension": [{ "url": SCHEDULE_EXTENSION, "extension": [
                { "url": "cronExpression", "valueString": cron }]}]
        })
    };
    let response = app
        .client
        .post(app.url("CommunicationRequest"))
        .json(&request("0 25 * * *"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let outcome: Value = response.json().await.unwrap();
    let text = outcome["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(
        text.contains("cronExpression") && text.contains("0 25 * * *"),
        "{text}"
    );

    let response = app
        .client
        .post(app.url("CommunicationRequest"))
        .json(&request("06 14 05 09 *"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_str().unwrap();

    let cancel = |id: String| {
        let url = app.url(&format!("CommunicationRequest/{id}/$cancel"));
        let client = app.client.clone();
        async move { client.post(url).send().await.unwrap() }
    };
    let response = cancel(id.to_string()).await;
    let status = response.status();
    let revoked: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["status"], "revoked");
    assert_eq!(revoked["id"], id);
    // Reading it back agrees; the plain read route still works beside $cancel.
    let read: Value = app
        .client
        .get(app.url(&format!("CommunicationRequest/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(read["status"], "revoked");

    assert_eq!(cancel("unknown".into()).await.status(), 404);

    let done = json!({
        "resourceType": "CommunicationRequest", "id": "done", "status": "completed"
    });
    let response = app
        .client
        .put(app.url("CommunicationRequest/done"))
        .json(&done)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let response = cancel("done".into()).await;
    assert_eq!(response.status(), 409);
    let outcome: Value = response.json().await.unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("completed"),
        "{outcome}"
    );
    app.stop().await;
}

#[tokio::test]
async fn without_authored_on_the_first_firing_follows_the_first_version() {
    let world = World::new(1, &[]).await;
    let body = json!({
        "resourceType": "CommunicationRequest", "id": "fresh", "status": "active",
        "recipient": [{ "reference": "Group/everyone" }],
        "payload": [{ "contentString": "Daily check-in" }],
        "extension": [{ "url": SCHEDULE_EXTENSION, "extension": [
            { "url": "cronExpression", "valueString": "0 9 * * *" }]}]
    });
    let first = world
        .store
        .update("CommunicationRequest", "fresh", body, None)
        .await
        .unwrap()
        .stored;
    let stored_at = first.last_updated;
    let mut next = stored_at
        .date_naive()
        .and_hms_opt(9, 0, 0)
        .unwrap()
        .and_utc();
    if next <= stored_at {
        next += chrono::Duration::days(1);
    }
    let report = world
        .scheduler()
        .run_at(next - chrono::Duration::seconds(1))
        .await
        .unwrap();
    assert_eq!(
        report.fired, 0,
        "nothing before the first 09:00 after storage"
    );
    let report = world
        .scheduler()
        .run_at(next + chrono::Duration::seconds(5))
        .await
        .unwrap();
    assert_eq!(report.fired, 1, "{report:?}");
    let children = world.children("fresh").await;
    assert_eq!(
        occurrences(&children),
        [mhero::fhir::format_instant(&next).as_str()]
    );
}

#[tokio::test]
async fn a_client_rewriting_the_parent_without_the_schedule_state_sends_nothing_twice() {
    let world = World::new(1, &[]).await;
    world
        .request(
            "daily",
            "2026-03-01T00:00:00Z",
            Some(("0 9 * * *", "recurring")),
        )
        .await;
    world
        .scheduler()
        .run_at(at("2026-03-01T09:00:10Z"))
        .await
        .unwrap();
    // iHRIS PUTs its own copy back: no schedule state, status active.
    world
        .request(
            "daily",
            "2026-03-01T00:00:00Z",
            Some(("0 9 * * *", "recurring")),
        )
        .await;
    assert_eq!(last_fired(&world.read("daily").await), None);
    let report = world
        .scheduler()
        .run_at(at("2026-03-01T12:00:00Z"))
        .await
        .unwrap();
    assert_eq!((report.fired, report.already_fired), (0, 1), "{report:?}");
    assert_eq!(world.children("daily").await.len(), 1);
    let parent = world.read("daily").await;
    assert_eq!(parent["status"], "on-hold");
    assert_eq!(last_fired(&parent), Some(at("2026-03-01T09:00:00Z")));
}

#[tokio::test]
async fn a_firing_created_while_its_schedule_was_cancelled_is_revoked_by_the_next_pass() {
    let world = World::new(1, &[]).await;
    world
        .request(
            "daily",
            "2026-03-01T00:00:00Z",
            Some(("0 9 * * *", "recurring")),
        )
        .await;
    // A scheduler read the parent, then the cancel ran (no firing yet to
    // revoke), then the scheduler wrote its firing and died.
    let before_cancel = world
        .store
        .read("CommunicationRequest", "daily")
        .await
        .unwrap();
    cancel_request(world.store.as_ref(), "daily").await.unwrap();
    let child = firing_request(&before_cancel, at("2026-03-01T09:00:00Z"));
    let child_id = child["id"].as_str().unwrap().to_string();
    world
        .store
        .update("CommunicationRequest", &child_id, child, None)
        .await
        .unwrap();
    // A plain request based on another one is none of the scheduler's business.
    world.request("plain", "2026-03-01T00:00:00Z", None).await;
    let mut plain = world.read("plain").await;
    plain["basedOn"] = json!([{ "reference": "CommunicationRequest/daily" }]);
    world
        .store
        .update("CommunicationRequest", "plain", plain, None)
        .await
        .unwrap();

    let report = world
        .scheduler()
        .run_at(at("2026-03-01T09:00:30Z"))
        .await
        .unwrap();
    assert_eq!((report.revoked, report.fired), (1, 0), "{report:?}");
    assert_eq!(world.read(&child_id).await["status"], "revoked");
    assert_eq!(world.read("plain").await["status"], "active");
    world
        .dispatcher()
        .await
        .run_at(at("2026-03-01T09:00:40Z"))
        .await
        .unwrap();
    assert!(world.outbox(&child_id).await.is_empty());
}
