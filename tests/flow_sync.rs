//! The flow sync end to end: RapidPro flows (the in-process sandbox, or
//! wiremock for a failing RapidPro) -> FHIR `Basic` (mHeroWorkflows) in
//! the embedded store; and the conformance resources of `fhir-profiles/`
//! loaded at start-up and listed in the CapabilityStatement.

mod common;

use std::time::Duration;

use mhero::config::Secret;
use mhero::fhir::profiles::{
    RESOURCE_CODE_SYSTEM, RUN_SUMMARY_EXTENSION, WORKFLOWS_DETAILS_EXTENSION, WORKFLOWS_PROFILE,
};
use mhero::jobs::flow_sync::{FlowSync, FlowSyncError, FlowSyncJob, workflow_status};
use mhero::jobs::runner::Job;
use mhero::rapidpro::client::{ClientOptions, RapidProClient};
use mhero::rapidpro::sandbox::{SandboxServer, SandboxSettings};
use mhero::rapidpro::throttle::Throttle;
use mhero::startup::Application;
use mhero::store::sqlite::SqliteStore;
use mhero::store::{FhirStore, SearchRequest};
use serde_json::Value;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const COLORS: &str = "ca45c8dd-d882-4f56-8522-1cdda67fd5b5";
const SEND_ONLY: &str = "1a737778-2cef-4e2f-830e-33a9d3921741";

struct World {
    _dir: tempfile::TempDir,
    store: SqliteStore,
    sandbox: SandboxServer,
    client: RapidProClient,
}

/// A fresh store and a sandbox with the two fixture flows, one flow per
/// page (so the sync must follow `next`).
async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    let sandbox = SandboxServer::start(SandboxSettings {
        page_size: 1,
        ..SandboxSettings::default()
    })
    .await
    .unwrap();
    for name in ["color_v13", "send_only_v13"] {
        let export = common::fixture(&format!("rapidpro/flows/{name}.json"));
        sandbox.sandbox().load_flow_export(&export).unwrap();
    }
    let client = common::rapidpro_client_for(&sandbox).await;
    World {
        _dir: dir,
        store,
        sandbox,
        client,
    }
}

impl World {
    fn sync(&self) -> FlowSync<'_> {
        FlowSync {
            store: &self.store,
            client: &self.client,
        }
    }

    async fn basic(&self, id: &str) -> (Value, String) {
        let stored = self.store.read("Basic", id).await.unwrap();
        (stored.resource, stored.version_id)
    }
}

/// The `mhero-workflows-details` sub-extension `name`.
fn detail<'a>(basic: &'a Value, name: &str) -> &'a Value {
    let details = basic["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"] == WORKFLOWS_DETAILS_EXTENSION)
        .expect("the details extension");
    details["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["url"] == name)
        .unwrap_or_else(|| panic!("no {name} in {details}"))
}

#[tokio::test]
async fn every_flow_becomes_a_workflow_basic_and_a_second_pass_writes_nothing() {
    let world = world().await;
    let report = world.sync().run_once().await.unwrap();
    assert_eq!(
        (
            report.examined,
            report.created,
            report.updated,
            report.unchanged
        ),
        (2, 2, 0, 0),
        "{report:?}"
    );

    let (colors, version) = world.basic(COLORS).await;
    assert_eq!(version, "1");
    // R4 requires Basic.code (1..1); iHRIS finds workflows by profile.
    assert_eq!(colors["code"]["coding"][0]["system"], RESOURCE_CODE_SYSTEM);
    assert_eq!(colors["code"]["coding"][0]["code"], "mHeroWorkflows");
    assert_eq!(colors["code"]["text"], "mHeroWorkflows");
    assert_eq!(colors["meta"]["profile"][0], WORKFLOWS_PROFILE);
    assert!(
        colors["meta"].get("code").is_none(),
        "not emNutt's misplaced code"
    );
    assert_eq!(detail(&colors, "name")["valueString"], "Colors");
    assert_eq!(detail(&colors, "uuid")["valueString"], COLORS);
    assert_eq!(detail(&colors, "flow_type")["valueString"], "message");
    assert_eq!(detail(&colors, "archived")["valueBoolean"], false);
    assert!(detail(&colors, "expires")["valueInteger"].is_i64());
    assert!(detail(&colors, "created_on")["valueDateTime"].is_string());
    assert!(detail(&colors, "modified_on")["valueDateTime"].is_string());
    let runs = detail(&colors, RUN_SUMMARY_EXTENSION)["extension"]
        .as_array()
        .unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r["url"].as_str().unwrap()).collect();
    for name in ["active", "completed", "interrupted", "expired"] {
        assert!(names.contains(&name), "{names:?}");
    }
    assert_eq!(workflow_status(&colors), Some("active"));

    // What iHRIS asks for.
    let page = world
        .store
        .search(SearchRequest {
            resource_type: "Basic".into(),
            params: vec![("_profile".into(), WORKFLOWS_PROFILE.into())],
            cursor: None,
            lenient: false,
        })
        .await
        .unwrap();
    let mut ids: Vec<&str> = page.matches.iter().map(|m| m.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, vec![SEND_ONLY, COLORS]);
    for found in &page.matches {
        assert!(found.resource["code"]["coding"].is_array(), "{}", found.id);
    }

    let again = world.sync().run_once().await.unwrap();
    assert_eq!(
        (again.created, again.updated, again.unchanged),
        (0, 0, 2),
        "{again:?}"
    );
    assert_eq!(world.basic(COLORS).await.1, "1", "no new version");
    assert_eq!(world.basic(SEND_ONLY).await.1, "1", "no new version");

    // The serve job does the same pass and says what it did.
    let job = FlowSyncJob {
        store: std::sync::Arc::new(
            SqliteStore::open(&world._dir.path().join("fhir.sqlite"))
                .await
                .unwrap(),
        ),
        client: world.client.clone(),
    };
    let summary = job.run_once().await.unwrap();
    assert!(summary.contains("2 unchanged"), "{summary}");
    assert_eq!(world.basic(COLORS).await.1, "1");
}

#[tokio::test]
async fn archived_flows_are_marked_and_vanished_ones_are_kept_as_deleted() {
    let world = world().await;
    world.sync().run_once().await.unwrap();

    assert!(world.sandbox.sandbox().set_flow_archived(COLORS, true));
    assert!(world.sandbox.sandbox().remove_flow(SEND_ONLY));
    let report = world.sync().run_once().await.unwrap();
    assert_eq!(
        (
            report.examined,
            report.archived,
            report.updated,
            report.deleted
        ),
        (1, 1, 1, 1),
        "{report:?}"
    );
    let (colors, _) = world.basic(COLORS).await;
    assert_eq!(workflow_status(&colors), Some("archived"));
    assert_eq!(detail(&colors, "archived")["valueBoolean"], true);
    let (gone, gone_version) = world.basic(SEND_ONLY).await;
    assert_eq!(workflow_status(&gone), Some("deleted"));
    assert_eq!(detail(&gone, "name")["valueString"], "Send Only", "kept");
    assert!(gone["code"].is_object());

    // Marked once: the next pass writes nothing.
    let again = world.sync().run_once().await.unwrap();
    assert_eq!(
        (again.unchanged, again.deleted, again.updated),
        (1, 0, 0),
        "{again:?}"
    );
    assert_eq!(world.basic(SEND_ONLY).await.1, gone_version);

    // A flow that comes back is active again.
    let export = common::fixture("rapidpro/flows/send_only_v13.json");
    world.sandbox.sandbox().load_flow_export(&export).unwrap();
    let back = world.sync().run_once().await.unwrap();
    assert_eq!(back.updated, 1, "{back:?}");
    assert_eq!(
        workflow_status(&world.basic(SEND_ONLY).await.0),
        Some("active")
    );
}

#[tokio::test]
async fn a_failing_rapidpro_leaves_the_store_untouched() {
    let world = world().await;
    world.sync().run_once().await.unwrap();

    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/flows.json"))
        .respond_with(ResponseTemplate::new(500).set_body_string("Server Error"))
        .mount(&server)
        .await;
    let failing = RapidProClient::new(
        &url::Url::parse(&server.uri()).unwrap(),
        &Secret::new("401f7ac837da42b97f613d789819ff93537bee6a"),
        ClientOptions {
            timeout: Duration::from_secs(5),
            max_retries: 0,
            backoff: Duration::from_millis(10),
            max_throttle_wait: Duration::from_secs(1),
        },
        Throttle::uniform(1_000_000),
    )
    .unwrap();
    let error = FlowSync {
        store: &world.store,
        client: &failing,
    }
    .run_once()
    .await
    .unwrap_err();
    assert!(matches!(error, FlowSyncError::RapidPro(_)), "{error}");
    assert!(error.to_string().contains("500"), "{error}");
    for id in [COLORS, SEND_ONLY] {
        let (basic, version) = world.basic(id).await;
        assert_eq!(version, "1", "{id} untouched");
        assert_eq!(
            workflow_status(&basic),
            Some("active"),
            "{id} not marked deleted"
        );
    }
}

/// Start the application on `dir`'s store, read `path` from the FHIR API,
/// and stop it.
async fn get_on(dir: &tempfile::TempDir, paths: &[&str]) -> Vec<(u16, Value)> {
    mhero::install_tls_provider();
    let settings = common::test_settings(dir, &[]);
    let app = Application::build(settings).await.expect("app builds");
    let fhir = app.fhir_base().to_string();
    let shutdown = app.shutdown_token();
    let server = tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::new();
    let mut answers = Vec::new();
    for path in paths {
        let response = client.get(format!("{fhir}/{path}")).send().await.unwrap();
        let status = response.status().as_u16();
        answers.push((status, response.json::<Value>().await.unwrap()));
    }
    shutdown.cancel();
    let _ = server.await;
    answers
}

#[tokio::test]
async fn start_up_loads_the_profiles_once_and_the_capability_statement_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    let paths = [
        "StructureDefinition/mhero-workflows",
        "StructureDefinition/mhero-workflows-details",
        "CodeSystem/mhero-resource",
        "SearchParameter/communication-request-mHeroFlowStarts",
        "metadata",
    ];
    let first = get_on(&dir, &paths).await;
    for (path, (status, body)) in paths.iter().zip(&first) {
        assert_eq!(*status, 200, "{path}: {body}");
    }
    assert_eq!(first[0].1["url"], WORKFLOWS_PROFILE);
    assert_eq!(first[0].1["type"], "Basic");
    assert_eq!(
        first[2].1["concept"][0]["code"], "mHeroWorkflows",
        "the code Basic.code uses is defined"
    );
    let basic = first[4].1["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Basic")
        .unwrap();
    assert_eq!(basic["supportedProfile"][0], WORKFLOWS_PROFILE);

    // A restart on the same store writes no new versions.
    let second = get_on(&dir, &paths[..4]).await;
    for (before, after) in first.iter().zip(&second) {
        assert_eq!(after.0, 200);
        assert_eq!(before.1["meta"]["versionId"], after.1["meta"]["versionId"]);
        assert_eq!(after.1["meta"]["versionId"], "1");
    }
}
