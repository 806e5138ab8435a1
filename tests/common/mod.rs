//! Shared test support: spawn the real application on port 0 with a
//! temporary embedded store, and read fixtures from `../shared/fixtures`.
#![allow(dead_code)]

pub mod contract;
pub mod index_contract;
pub mod survey;

use std::collections::HashMap;
use std::path::PathBuf;

use mhero::config::Settings;
use mhero::startup::Application;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub struct TestApp {
    pub fhir: String,
    pub base: String,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
    pub dir: tempfile::TempDir,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.fhir, path.trim_start_matches('/'))
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.server.await;
    }
}

/// Settings for a test: embedded store in a fresh temp dir, port 0, plus
/// `MHERO__...` style overrides.
pub fn test_settings(dir: &tempfile::TempDir, overrides: &[(&str, &str)]) -> Settings {
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert("MHERO__SERVER__LISTEN".into(), "127.0.0.1:0".into());
    env.insert(
        "MHERO__FHIR__EMBEDDED__PATH".into(),
        dir.path().join("fhir.sqlite").display().to_string(),
    );
    env.insert(
        "MHERO__INDEX__EMBEDDED__PATH".into(),
        dir.path().join("index").display().to_string(),
    );
    for (k, v) in overrides {
        env.insert((*k).to_string(), (*v).to_string());
    }
    Settings::load_from(None, Some(env)).expect("test settings")
}

pub async fn spawn_app_with(overrides: &[(&str, &str)]) -> TestApp {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = test_settings(&dir, overrides);
    let app = Application::build(settings)
        .await
        .expect("application builds");
    start(app, dir)
}

/// Like [`spawn_app_with`], on a store the test also holds (to drive jobs
/// with `run_once()` against the same data the API serves).
pub async fn spawn_app_on(store: mhero::store::SharedStore, overrides: &[(&str, &str)]) -> TestApp {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = test_settings(&dir, overrides);
    let app = Application::build_with_store(settings, store)
        .await
        .expect("application builds");
    start(app, dir)
}

fn start(app: Application, dir: tempfile::TempDir) -> TestApp {
    let fhir = app.fhir_base().to_string();
    let base = fhir.trim_end_matches("/fhir").to_string();
    let shutdown = app.shutdown_token();
    let server = tokio::spawn(app.run_until_stopped());
    mhero::install_tls_provider();
    TestApp {
        fhir,
        base,
        client: reqwest::Client::new(),
        shutdown,
        server,
        dir,
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Path of a shared fixture (`../shared/fixtures/<rel>` beside the repo).
pub fn fixture_path(rel: &str) -> PathBuf {
    let beside = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures")
        .join(rel);
    if beside.exists() {
        return beside;
    }
    PathBuf::from("/work/shared/fixtures").join(rel)
}

pub fn fixture(rel: &str) -> Value {
    let path = fixture_path(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// The resource without `meta.versionId` / `meta.lastUpdated` (and without
/// `meta` if nothing else is left), for equality with what was sent.
pub fn without_store_meta(resource: &Value) -> Value {
    let mut copy = resource.clone();
    if let Some(meta) = copy.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            copy.as_object_mut().unwrap().remove("meta");
        }
    }
    copy
}

/// A RapidPro client for an in-process sandbox, with a throttle budget
/// that never waits.
pub async fn rapidpro_client_for(
    sandbox: &mhero::rapidpro::sandbox::SandboxServer,
) -> mhero::rapidpro::client::RapidProClient {
    mhero::install_tls_provider();
    let env = HashMap::from([
        (
            "MHERO__RAPIDPRO__BASE_URL".to_string(),
            sandbox.base_url().to_string(),
        ),
        (
            "MHERO__RAPIDPRO__TOKEN".to_string(),
            sandbox.token().to_string(),
        ),
    ]);
    let settings = Settings::load_from(None, Some(env)).unwrap();
    mhero::rapidpro::client::RapidProClient::from_settings(
        &settings.rapidpro,
        mhero::rapidpro::throttle::Throttle::uniform(1_000_000),
    )
    .unwrap()
}

/// The outbox of a CommunicationRequest: every Communication `basedOn` it.
pub async fn outbox_of(store: &dyn mhero::store::FhirStore, request_id: &str) -> Vec<Value> {
    mhero::store::search_all(
        store,
        "Communication",
        vec![
            (
                "based-on".into(),
                format!("CommunicationRequest/{request_id}"),
            ),
            ("_count".into(), "1000".into()),
        ],
    )
    .await
    .unwrap()
    .into_iter()
    .map(|s| s.resource)
    .collect()
}

/// How many outbox entries have each status.
pub fn count_by_status(outbox: &[Value]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for c in outbox {
        *counts
            .entry(c["status"].as_str().unwrap_or("?").to_string())
            .or_insert(0) += 1;
    }
    counts
}
