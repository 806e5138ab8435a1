//! Authentication, health, metrics, request ids, a store that is down,
//! and graceful shutdown.

mod common;

use async_trait::async_trait;
use common::{spawn_app, spawn_app_with, test_settings};
use mhero::startup::Application;
use mhero::store::*;
use reqwest::StatusCode;
use serde_json::Value;

#[tokio::test]
async fn api_keys_guard_fhir_but_not_metadata() {
    let app = spawn_app_with(&[("MHERO__AUTH__API_KEYS", "k-one,k-two")]).await;
    let anonymous = app
        .client
        .get(app.url("Practitioner"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert!(
        anonymous.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("Bearer")
    );
    let body: Value = anonymous.json().await.unwrap();
    assert_eq!(body["issue"][0]["code"], "login");

    let wrong = app
        .client
        .get(app.url("Practitioner"))
        .bearer_auth("k-three")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let bearer = app
        .client
        .get(app.url("Practitioner"))
        .bearer_auth("k-two")
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), StatusCode::OK);
    let basic = app
        .client
        .get(app.url("Practitioner"))
        .basic_auth("ihris", Some("k-one"))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), StatusCode::OK);
    let write = app
        .client
        .post(app.url("Practitioner"))
        .body("{\"resourceType\":\"Practitioner\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        write.status(),
        StatusCode::UNAUTHORIZED,
        "writes need a key too"
    );

    let metadata = app.client.get(app.url("metadata")).send().await.unwrap();
    assert_eq!(metadata.status(), StatusCode::OK);
    let health = app
        .client
        .get(format!("{}/health/live", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        health.status(),
        StatusCode::OK,
        "health is open unless protect_metrics"
    );
    app.stop().await;
}

#[tokio::test]
async fn protect_metrics_requires_a_key_on_health_and_metrics() {
    let app = spawn_app_with(&[
        ("MHERO__AUTH__API_KEYS", "k"),
        ("MHERO__AUTH__PROTECT_METRICS", "true"),
    ])
    .await;
    for path in ["health/live", "health/ready", "metrics"] {
        let url = format!("{}/{path}", app.base);
        assert_eq!(
            app.client.get(&url).send().await.unwrap().status(),
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
        assert_eq!(
            app.client
                .get(&url)
                .bearer_auth("k")
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::OK,
            "{path}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn refuses_to_listen_publicly_without_keys() {
    let dir = tempfile::tempdir().unwrap();
    let settings = test_settings(&dir, &[("MHERO__SERVER__LISTEN", "0.0.0.0:0")]);
    let error = Application::build(settings).await.err().expect("refused");
    assert!(error.to_string().contains("auth.api_keys"), "{error}");
}

#[tokio::test]
async fn health_metrics_and_request_ids() {
    let app = spawn_app().await;
    let ready: Value = app
        .client
        .get(format!("{}/health/ready", app.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["backends"][0]["status"], "ok");

    let created = app
        .client
        .post(app.url("Practitioner"))
        .header("x-request-id", "req-from-client")
        .body("{\"resourceType\":\"Practitioner\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        created.headers()["x-request-id"],
        "req-from-client",
        "a client's request id is kept"
    );
    let generated = app
        .client
        .get(app.url("Practitioner"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        generated.headers()["x-request-id"].len(),
        36,
        "a UUID is generated otherwise"
    );

    let metrics = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("http_requests_total"), "{metrics}");
    assert!(
        metrics.contains("route=\"/fhir/{resource_type}\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("http_request_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "store_operations_total{backend=\"embedded\",operation=\"create\",outcome=\"ok\"}"
        ),
        "{metrics}"
    );
    app.stop().await;
}

/// A store whose backend is down: every call fails as unavailable.
struct DownStore;

fn down<T>() -> StoreResult<T> {
    Err(StoreError::Unavailable {
        backend: "fhir (http http://hapi.invalid/fhir)".into(),
        reason: "connection refused".into(),
    })
}

#[async_trait]
impl FhirStore for DownStore {
    fn backend_name(&self) -> &'static str {
        "http"
    }
    async fn create(&self, _: Value, _: Option<&str>) -> StoreResult<WriteOutcome> {
        down()
    }
    async fn update(
        &self,
        _: &str,
        _: &str,
        _: Value,
        _: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        down()
    }
    async fn conditional_update(
        &self,
        _: &str,
        _: &str,
        _: Value,
        _: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        down()
    }
    async fn read(&self, _: &str, _: &str) -> StoreResult<StoredResource> {
        down()
    }
    async fn vread(&self, _: &str, _: &str, _: &str) -> StoreResult<StoredResource> {
        down()
    }
    async fn delete(&self, _: &str, _: &str, _: Option<&str>) -> StoreResult<Option<String>> {
        down()
    }
    async fn search(&self, _: SearchRequest) -> StoreResult<SearchPage> {
        down()
    }
    async fn history(&self, _: HistoryRequest) -> StoreResult<HistoryPage> {
        down()
    }
    async fn process_bundle(&self, _: Value) -> StoreResult<Value> {
        down()
    }
    async fn check(&self) -> StoreResult<BackendStatus> {
        down()
    }
}

#[tokio::test]
async fn a_store_that_is_down_gives_503_and_not_ready() {
    mhero::install_tls_provider();
    let dir = tempfile::tempdir().unwrap();
    let settings = test_settings(&dir, &[]);
    let app = Application::build_with_store(settings, std::sync::Arc::new(DownStore))
        .await
        .unwrap();
    let fhir = app.fhir_base().to_string();
    let base = fhir.trim_end_matches("/fhir").to_string();
    let token = app.shutdown_token();
    let server = tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::new();

    let read = client
        .get(format!("{fhir}/Patient/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::SERVICE_UNAVAILABLE);
    let outcome: Value = read.json().await.unwrap();
    assert_eq!(outcome["issue"][0]["code"], "transient");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("connection refused")
    );

    let ready = client
        .get(format!("{base}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["backends"][0]["status"], "failing");
    assert!(
        body["backends"][0]["name"]
            .as_str()
            .unwrap()
            .contains("fhir")
    );
    assert_eq!(
        client
            .get(format!("{base}/health/live"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    token.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn graceful_shutdown_stops_the_server() {
    let app = spawn_app().await;
    let url = app.url("metadata");
    assert_eq!(
        app.client.get(&url).send().await.unwrap().status(),
        StatusCode::OK
    );
    let client = app.client.clone();
    app.shutdown.cancel();
    let result = app.server.await.unwrap();
    assert!(result.is_ok());
    assert!(
        client.get(&url).send().await.is_err(),
        "nothing listens after shutdown"
    );
}

#[tokio::test]
async fn the_index_follower_reports_a_store_that_is_down_and_keeps_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let index = std::sync::Arc::new(
        mhero::index::tantivy::TantivyIndex::open(&dir.path().join("index")).unwrap(),
    );
    let health = mhero::jobs::index_sync::IndexHealth::default();
    let follower = mhero::jobs::index_sync::IndexSync::new(
        std::sync::Arc::new(DownStore),
        index.clone(),
        mhero::pipeline::phone::PhoneNormalizer::new(Some("LR")).unwrap(),
        chrono::Duration::seconds(5),
        health.clone(),
    );
    let error = follower.run_once().await.unwrap_err().to_string();
    assert!(error.contains("connection refused"), "{error}");
    let state = health.snapshot();
    assert!(state.last_error.unwrap().contains("connection refused"));
    assert_eq!(state.current_as_of, None);
    use mhero::index::ContactIndex;
    assert_eq!(index.checkpoint().await.unwrap(), None, "nothing committed");
    assert_eq!(index.count().await.unwrap(), 0);
}
