//! The contact sync end to end over real HTTP: the FHIR store, the RapidPro
//! client and the in-process RapidPro sandbox, with iHRIS demo
//! practitioners (given real Liberian phones where the demo has
//! placeholders) and an OpenMRS patient.

mod common;

use mhero::cli::import::import_files;
use mhero::jobs::contact_sync::ContactSync;
use mhero::jobs::rapidpro_directory::RapidProDirectory;
use mhero::pipeline::phone::PhoneNormalizer;
use mhero::rapidpro::sandbox::{SandboxServer, SandboxSettings};
use mhero::store::FhirStore;
use mhero::store::sqlite::SqliteStore;
use serde_json::{Value, json};

fn contacts(sandbox: &SandboxServer) -> Vec<Value> {
    sandbox.sandbox().state()["contacts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["deleted"] == false)
        .cloned()
        .collect()
}

#[tokio::test]
async fn ihris_practitioners_become_contacts_once_and_follow_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    let summary = import_files(
        &store,
        &[common::fixture_path(
            "ihris/ihris-demo-practitioners-open.bundle.json",
        )],
    )
    .await;
    assert!(summary.failed.is_empty(), "{summary}");
    // The demo has phones only as placeholders: give ten practitioners real Liberian mobiles.
    let bundle = common::fixture("ihris/ihris-demo-practitioners-open.bundle.json");
    let practitioners: Vec<String> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["resource"]["resourceType"] == "Practitioner")
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .take(10)
        .collect();
    for (n, id) in practitioners.iter().enumerate() {
        let mut p = store.read("Practitioner", id).await.unwrap().resource;
        p["telecom"] =
            json!([{ "system": "phone", "use": "mobile", "value": format!("077 000 10{n:02}") }]);
        store.update("Practitioner", id, p, None).await.unwrap();
    }
    let mut patient = common::fixture("openmrs/openmrs-fhir2-patient-example.json");
    patient["id"] = json!("openmrs-1");
    patient["telecom"][0]["value"] = json!("0886 555 123");
    store
        .update("Patient", "openmrs-1", patient, None)
        .await
        .unwrap();

    let sandbox = SandboxServer::start(SandboxSettings::default())
        .await
        .unwrap();
    let directory = RapidProDirectory::new(common::rapidpro_client_for(&sandbox).await);
    let phones = PhoneNormalizer::new(Some("LR")).unwrap();
    let sync = ContactSync {
        store: &store,
        directory: &directory,
        phones: &phones,
        page_size: 25,
        progress: indicatif::ProgressBar::hidden(),
    };

    let first = sync.run_once(false).await.unwrap();
    assert_eq!(first.created, 11, "{first:?}");
    assert!(
        first.failures.is_empty() && first.conflicts.is_empty(),
        "{first:?}"
    );
    let created = contacts(&sandbox);
    assert_eq!(created.len(), 11);
    let p0 = created
        .iter()
        .find(|c| c["fields"]["globalid"] == practitioners[0].as_str())
        .expect("globalid field set");
    assert_eq!(p0["fields"]["mheroentitytype"], "Practitioner");
    assert_eq!(p0["urns"][0], "tel:+231770001000");
    let patient_contact = created
        .iter()
        .find(|c| c["fields"]["globalid"] == "openmrs-1")
        .unwrap();
    assert_eq!(patient_contact["language"], "nld");
    assert_eq!(patient_contact["name"], "Pieter van de Heuvel");
    // The contact UUID is written back on the FHIR resource.
    let stored = store.read("Practitioner", &practitioners[0]).await.unwrap();
    let identifiers = stored.resource["identifier"].as_array().unwrap();
    assert!(
        identifiers
            .iter()
            .any(|i| i["system"] == "http://app.rapidpro.io/contact-uuid"
                && i["value"] == p0["uuid"])
    );

    // Unchanged people cost zero RapidPro calls.
    sandbox.sandbox().clear_calls();
    let second = sync.run_once(true).await.unwrap();
    assert_eq!(second.unchanged, 11, "{second:?}");
    assert_eq!(
        sandbox.sandbox().calls().len(),
        0,
        "no RapidPro call for unchanged people"
    );

    // A phone change replaces the URN on the same contact (one update call).
    let mut changed = store
        .read("Practitioner", &practitioners[0])
        .await
        .unwrap()
        .resource;
    changed["telecom"] = json!([{ "system": "phone", "value": "0555 777 888" }]);
    store
        .update("Practitioner", &practitioners[0], changed, None)
        .await
        .unwrap();
    let third = sync.run_once(false).await.unwrap();
    assert_eq!(third.updated, 1, "{third:?}");
    let after = contacts(&sandbox);
    let p0_after = after.iter().find(|c| c["uuid"] == p0["uuid"]).unwrap();
    assert_eq!(
        p0_after["urns"],
        json!(["tel:+231555777888"]),
        "old URN replaced"
    );
    assert_eq!(after.len(), 11, "no duplicate contact");

    // Deactivation blocks the contact in RapidPro.
    let mut inactive = store
        .read("Practitioner", &practitioners[1])
        .await
        .unwrap()
        .resource;
    inactive["active"] = json!(false);
    store
        .update("Practitioner", &practitioners[1], inactive, None)
        .await
        .unwrap();
    let fourth = sync.run_once(false).await.unwrap();
    assert_eq!(fourth.blocked, 1, "{fourth:?}");
    let blocked = contacts(&sandbox)
        .into_iter()
        .find(|c| c["fields"]["globalid"] == practitioners[1].as_str())
        .unwrap();
    assert_eq!(blocked["status"], "blocked");
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_rapidpro_outage_fails_the_pass_and_the_next_pass_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    for n in 0..3 {
        let p = json!({ "resourceType": "Practitioner", "id": format!("hw{n}"), "name": [{ "text": format!("Worker {n}") }],
                        "telecom": [{ "system": "phone", "value": format!("077 000 20{n:02}") }] });
        store
            .update("Practitioner", &format!("hw{n}"), p, None)
            .await
            .unwrap();
    }
    let sandbox = SandboxServer::start(SandboxSettings::default())
        .await
        .unwrap();
    let directory = RapidProDirectory::new(common::rapidpro_client_for(&sandbox).await);
    let phones = PhoneNormalizer::new(Some("LR")).unwrap();
    let sync = ContactSync {
        store: &store,
        directory: &directory,
        phones: &phones,
        page_size: 25,
        progress: indicatif::ProgressBar::hidden(),
    };

    sandbox.sandbox().set_error_rate(1.0);
    let failed = sync.run_once(false).await.unwrap();
    assert_eq!(failed.created, 0);
    assert_eq!(failed.failures.len(), 3, "{failed:?}");
    assert!(contacts(&sandbox).is_empty());

    sandbox.sandbox().set_error_rate(0.0);
    let recovered = sync.run_once(false).await.unwrap();
    assert_eq!(
        recovered.created, 3,
        "the cursor did not move past the failures: {recovered:?}"
    );
    assert_eq!(contacts(&sandbox).len(), 3);
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn extra_fields_carry_job_facility_district_and_region_from_ihris() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    let files = [
        common::fixture_path("ihris/ihris-demo-locations-open.bundle.json"),
        common::fixture_path("ihris/ihris-demo-practitioners-open.bundle.json"),
    ];
    assert!(import_files(&store, &files).await.failed.is_empty());
    // PR10188: Medical Doctor at TF.N.BRB.14 (North region). Give its practitioner a phone.
    let mut doctor = store.read("Practitioner", "P10187").await.unwrap().resource;
    doctor["telecom"] = json!([{ "system": "phone", "value": "077 000 6001" }]);
    store
        .update("Practitioner", "P10187", doctor, None)
        .await
        .unwrap();
    let facility = store
        .read("Location", "TF.N.BRB.14")
        .await
        .unwrap()
        .resource;
    let district = store
        .read(
            "Location",
            facility["partOf"]["reference"]
                .as_str()
                .unwrap()
                .trim_start_matches("Location/"),
        )
        .await
        .unwrap()
        .resource;

    let sandbox = SandboxServer::start(SandboxSettings::default())
        .await
        .unwrap();
    let wanted: Vec<String> = ["job", "facility", "district", "region"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let directory = RapidProDirectory::new(common::rapidpro_client_for(&sandbox).await)
        .with_extra_fields(wanted);
    let phones = PhoneNormalizer::new(Some("LR")).unwrap();
    let sync = ContactSync {
        store: &store,
        directory: &directory,
        phones: &phones,
        page_size: 100,
        progress: indicatif::ProgressBar::hidden(),
    };
    let report = sync.run_once(false).await.unwrap();
    assert_eq!(report.created, 1, "{report:?}");
    let contact = contacts(&sandbox).into_iter().next().unwrap();
    assert_eq!(contact["fields"]["job"], "Medical Doctor");
    assert_eq!(contact["fields"]["facility"], facility["name"]);
    assert_eq!(contact["fields"]["district"], district["name"]);
    assert_eq!(contact["fields"]["region"], "North");
    sandbox.shutdown().await.unwrap();
}

/// The iHRIS demo locations and practitioners, with real phones for the
/// doctors `P10187` (Example Clinic, Buraba, North), `P5269` (Rushonga
/// Hospital, West) and `P7344` (Musoza Hospital, North).
async fn ihris_with_phones(store: &SqliteStore) {
    let files = [
        common::fixture_path("ihris/ihris-demo-locations-open.bundle.json"),
        common::fixture_path("ihris/ihris-demo-practitioners-open.bundle.json"),
    ];
    assert!(import_files(store, &files).await.failed.is_empty());
    for (n, id) in ["P10187", "P5269", "P7344"].iter().enumerate() {
        let mut p = store.read("Practitioner", id).await.unwrap().resource;
        p["telecom"] = json!([{ "system": "phone", "value": format!("077 000 700{n}") }]);
        store.update("Practitioner", id, p, None).await.unwrap();
    }
}

async fn edit(store: &SqliteStore, resource_type: &str, id: &str, change: impl FnOnce(&mut Value)) {
    let mut resource = store.read(resource_type, id).await.unwrap().resource;
    change(&mut resource);
    store
        .update(resource_type, id, resource, None)
        .await
        .unwrap();
}

/// The contact whose `globalid` is `id`.
fn contact_of(sandbox: &SandboxServer, id: &str) -> Value {
    contacts(sandbox)
        .into_iter()
        .find(|c| c["fields"]["globalid"] == id)
        .unwrap()
}

/// The contact updates in the call log, by the `globalid` they carry.
fn updated_globalids(sandbox: &SandboxServer) -> Vec<String> {
    let mut ids: Vec<String> = sandbox
        .sandbox()
        .calls()
        .iter()
        .filter(|c| c.method == "POST" && c.path.ends_with("contacts.json"))
        .map(|c| c.body["fields"]["globalid"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn role_and_location_changes_alone_resync_the_extra_fields() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    ihris_with_phones(&store).await;
    let sandbox = SandboxServer::start(SandboxSettings::default())
        .await
        .unwrap();
    let wanted: Vec<String> = ["job", "facility", "district", "region"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let directory = RapidProDirectory::new(common::rapidpro_client_for(&sandbox).await)
        .with_extra_fields(wanted);
    let phones = PhoneNormalizer::new(Some("LR")).unwrap();
    let sync = ContactSync {
        store: &store,
        directory: &directory,
        phones: &phones,
        page_size: 10,
        progress: indicatif::ProgressBar::hidden(),
    };
    let first = sync.run_once(false).await.unwrap();
    assert_eq!(first.created, 3, "{first:?}");
    assert_eq!(
        contact_of(&sandbox, "P7344")["fields"]["facility"],
        "Musoza Hospital"
    );
    // A pass looks again at the people written since the last one (the
    // write-backs) and at the last one at the cursor. So that only the
    // role and location selection can find the doctors, that pass is done
    // here, ending at a bystander without phone.
    let settle = |round: usize| {
        let store = &store;
        let sync = &sync;
        let sandbox = &sandbox;
        async move {
            let p = json!({ "resourceType": "Practitioner", "id": "bystander", "name": [{ "text": format!("By Stander {round}") }] });
            store
                .update("Practitioner", "bystander", p, None)
                .await
                .unwrap();
            sandbox.sandbox().clear_calls();
            let settled = sync.run_once(false).await.unwrap();
            assert_eq!(settled.updated, 0, "{settled:?}");
            assert!(sandbox.sandbox().calls().is_empty());
            sandbox.sandbox().clear_calls();
        }
    };
    settle(0).await;

    // A district renamed: only the doctor under it is updated.
    edit(&store, "Location", "TF.N.BRB", |l| {
        l["name"] = json!("Buraba East")
    })
    .await;
    sandbox.sandbox().clear_calls();
    let renamed = sync.run_once(false).await.unwrap();
    assert_eq!(renamed.updated, 1, "{renamed:?}");
    assert!(renamed.failures.is_empty(), "{renamed:?}");
    assert_eq!(updated_globalids(&sandbox), vec!["P10187"]);
    assert_eq!(
        contact_of(&sandbox, "P10187")["fields"]["district"],
        "Buraba East"
    );
    assert_eq!(contact_of(&sandbox, "P10187")["fields"]["region"], "North");

    // A role moved to another facility: its practitioner is updated.
    settle(1).await;
    edit(&store, "PractitionerRole", "PR7346", |r| {
        r["location"] = json!([{ "reference": "Location/TF.N.BRB.17" }]);
    })
    .await;
    sandbox.sandbox().clear_calls();
    let moved = sync.run_once(false).await.unwrap();
    assert_eq!(moved.updated, 1, "{moved:?}");
    assert_eq!(updated_globalids(&sandbox), vec!["P7344"]);
    let contact = contact_of(&sandbox, "P7344");
    assert_eq!(contact["fields"]["facility"], "Test Facility");
    assert_eq!(contact["fields"]["district"], "Buraba East");

    // A region renamed reaches everyone below it (two levels down), and
    // nobody else.
    settle(2).await;
    edit(&store, "Location", "TF.N", |l| {
        l["name"] = json!("Northern")
    })
    .await;
    // RapidPro down: the locations cursor stays where it was.
    let cursor = |name: &'static str| {
        let store = &store;
        async move {
            mhero::jobs::cursor::Cursor::load(store, name)
                .await
                .unwrap()
                .position
        }
    };
    let before = cursor("contacts-location").await;
    assert!(before.is_some());
    sandbox.sandbox().set_error_rate(1.0);
    let failed = sync.run_once(false).await.unwrap();
    assert!(!failed.failures.is_empty(), "{failed:?}");
    assert_eq!(
        cursor("contacts-location").await,
        before,
        "not past a failure"
    );
    sandbox.sandbox().set_error_rate(0.0);
    sandbox.sandbox().clear_calls();
    let region = sync.run_once(false).await.unwrap();
    assert_eq!(region.updated, 2, "{region:?}");
    assert_eq!(updated_globalids(&sandbox), vec!["P10187", "P7344"]);
    assert_eq!(
        contact_of(&sandbox, "P7344")["fields"]["region"],
        "Northern"
    );
    assert_eq!(contact_of(&sandbox, "P5269")["fields"]["region"], "West");

    // Nothing changed: no RapidPro call, and the cursors moved on.
    sandbox.sandbox().clear_calls();
    let quiet = sync.run_once(false).await.unwrap();
    assert_eq!((quiet.updated, quiet.created), (0, 0), "{quiet:?}");
    assert!(sandbox.sandbox().calls().is_empty());
    assert!(cursor("contacts-practitionerrole").await.is_some());
    assert!(
        cursor("contacts-location").await > before,
        "moved past the region"
    );
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_extra_fields_roles_and_locations_are_not_looked_at() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    ihris_with_phones(&store).await;
    let sandbox = SandboxServer::start(SandboxSettings::default())
        .await
        .unwrap();
    let directory = RapidProDirectory::new(common::rapidpro_client_for(&sandbox).await);
    let phones = PhoneNormalizer::new(Some("LR")).unwrap();
    let sync = ContactSync {
        store: &store,
        directory: &directory,
        phones: &phones,
        page_size: 100,
        progress: indicatif::ProgressBar::hidden(),
    };
    assert_eq!(sync.run_once(false).await.unwrap().created, 3);
    edit(&store, "Location", "TF.N", |l| {
        l["name"] = json!("Northern")
    })
    .await;
    sandbox.sandbox().clear_calls();
    let report = sync.run_once(false).await.unwrap();
    // Only the three people written back by the first pass: none of the
    // practitioners under the renamed region.
    assert_eq!((report.examined, report.unchanged), (3, 3), "{report:?}");
    assert!(sandbox.sandbox().calls().is_empty());
    for cursor in ["contacts-practitionerrole", "contacts-location"] {
        let stored = mhero::jobs::cursor::Cursor::load(&store, cursor)
            .await
            .unwrap();
        assert_eq!(stored.position, None, "{cursor} never used");
    }
    sandbox.shutdown().await.unwrap();
}
