//! RapidPro -> FHIR over HTTP against the sandbox: a STOP in RapidPro
//! opts the FHIR person out, coming back opts them in, and contacts nobody
//! owns are imported only when configured.

mod common;

use chrono::Duration;
use mhero::jobs::contact_status_poll::ContactStatusPoll;
use mhero::jobs::contact_sync::ContactSync;
use mhero::jobs::rapidpro_directory::RapidProDirectory;
use mhero::pipeline::phone::PhoneNormalizer;
use mhero::rapidpro::sandbox::{SandboxServer, SandboxSettings};
use mhero::rapidpro::types::ContactWrite;
use mhero::store::sqlite::SqliteStore;
use mhero::store::{FhirStore, SearchRequest};
use serde_json::json;

fn opted_out(resource: &serde_json::Value) -> bool {
    resource["meta"]["tag"]
        .as_array()
        .is_some_and(|tags| tags.iter().any(|t| t["code"] == "optedout"))
}

#[tokio::test]
async fn stop_in_rapidpro_opts_out_in_fhir_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    let person = json!({ "resourceType": "Practitioner", "id": "hw1", "name": [{ "text": "Hawa Konneh" }],
                         "telecom": [{ "system": "phone", "value": "077 000 3001" }] });
    store
        .update("Practitioner", "hw1", person, None)
        .await
        .unwrap();
    let sandbox = SandboxServer::start(SandboxSettings::default())
        .await
        .unwrap();
    let client = common::rapidpro_client_for(&sandbox).await;
    let directory = RapidProDirectory::new(common::rapidpro_client_for(&sandbox).await);
    let phones = PhoneNormalizer::new(Some("LR")).unwrap();
    let sync = ContactSync {
        store: &store,
        directory: &directory,
        phones: &phones,
        page_size: 50,
        progress: indicatif::ProgressBar::hidden(),
    };
    assert_eq!(sync.run_once(false).await.unwrap().created, 1);
    let uuid = store.read("Practitioner", "hw1").await.unwrap().resource["identifier"][0]["value"]
        .as_str()
        .unwrap()
        .to_string();

    let poll = ContactStatusPoll {
        store: &store,
        client: &client,
        import_unknown_contacts: false,
        overlap: Duration::minutes(5),
    };
    let quiet = poll.run_once().await.unwrap();
    assert_eq!(quiet.consent_changes, 0, "{quiet:?}");

    assert!(sandbox.sandbox().set_contact_status(&uuid, "stopped"));
    let stopped = poll.run_once().await.unwrap();
    assert_eq!(stopped.consent_changes, 1, "{stopped:?}");
    assert!(opted_out(
        &store.read("Practitioner", "hw1").await.unwrap().resource
    ));
    let again = poll.run_once().await.unwrap();
    assert_eq!(
        again.consent_changes, 0,
        "the overlap window re-reads without re-writing: {again:?}"
    );

    assert!(sandbox.sandbox().set_contact_status(&uuid, "active"));
    let back = poll.run_once().await.unwrap();
    assert_eq!(back.consent_changes, 1, "{back:?}");
    assert!(!opted_out(
        &store.read("Practitioner", "hw1").await.unwrap().resource
    ));
    sandbox.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_contacts_are_imported_only_when_configured_and_only_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    let sandbox = SandboxServer::start(SandboxSettings::default())
        .await
        .unwrap();
    let client = common::rapidpro_client_for(&sandbox).await;
    let made_in_rapidpro = ContactWrite {
        name: Some("Walk-in Volunteer".into()),
        urns: Some(vec!["tel:+231770004001".into()]),
        ..Default::default()
    };
    let contact = client.create_contact(&made_in_rapidpro).await.unwrap();

    let ignore = ContactStatusPoll {
        store: &store,
        client: &client,
        import_unknown_contacts: false,
        overlap: Duration::minutes(5),
    };
    let report = ignore.run_once().await.unwrap();
    assert_eq!((report.unknown, report.imported), (1, 0), "{report:?}");

    let import = ContactStatusPoll {
        store: &store,
        client: &client,
        import_unknown_contacts: true,
        overlap: Duration::minutes(5),
    };
    let report = import.run_once().await.unwrap();
    assert_eq!(report.imported, 1, "{report:?}");
    let found = store
        .search(SearchRequest {
            resource_type: "Practitioner".into(),
            params: vec![(
                "identifier".into(),
                format!("http://app.rapidpro.io/contact-uuid|{}", contact.uuid),
            )],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(found.matches.len(), 1);
    let practitioner = &found.matches[0].resource;
    assert_eq!(practitioner["telecom"][0]["value"], "+231770004001");
    assert_eq!(practitioner["name"][0]["text"], "Walk-in Volunteer");
    // The contact now names its FHIR person, so it is no longer unknown.
    let state = sandbox.sandbox().state();
    let remote = state["contacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["uuid"] == contact.uuid.as_str())
        .unwrap();
    assert_eq!(remote["fields"]["globalid"], found.matches[0].id.as_str());
    let again = import.run_once().await.unwrap();
    assert_eq!((again.unknown, again.imported), (0, 0), "{again:?}");
    sandbox.shutdown().await.unwrap();
}
