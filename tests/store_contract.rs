//! The `FhirStore` contract suite against every backend that runs here.

mod common;

use common::contract;
use mhero::store::sqlite::SqliteStore;

#[tokio::test]
async fn sqlite_store_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    contract::run_all(&store).await;
}

#[tokio::test]
async fn a_database_from_a_newer_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fhir.sqlite");
    drop(SqliteStore::open(&path).await.unwrap());
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let error = SqliteStore::open(&path).await.err().expect("refused");
    assert!(error.to_string().contains("newer"), "{error}");
}

fn http_settings(base_url: &str) -> mhero::config::HttpFhirSettings {
    mhero::config::HttpFhirSettings {
        base_url: Some(base_url.parse().unwrap()),
        username: None,
        password: None,
        bearer_token: std::env::var("MHERO_TEST_FHIR_TOKEN")
            .ok()
            .map(mhero::config::Secret::new),
        timeout_secs: 30,
        max_retries: 2,
    }
}

/// `HttpFhirStore` against the connector's own `/fhir` API served over
/// HTTP: the same contract, end to end through REST.
#[tokio::test]
async fn http_store_against_the_connectors_own_api_meets_the_contract() {
    let app = common::spawn_app().await;
    let store = mhero::store::http::HttpFhirStore::new(&http_settings(&app.fhir)).unwrap();
    contract::run_all(&store).await;
    app.stop().await;
}

/// The same contract against a real FHIR R4 server (HAPI):
/// `MHERO_TEST_FHIR_URL=http://localhost:8090/fhir cargo test --locked -- --ignored`
#[tokio::test]
#[ignore = "needs MHERO_TEST_FHIR_URL (a running FHIR R4 server such as HAPI)"]
async fn live_fhir_server_meets_the_contract() {
    let Ok(url) = std::env::var("MHERO_TEST_FHIR_URL") else {
        eprintln!("MHERO_TEST_FHIR_URL is not set; nothing to check");
        return;
    };
    mhero::install_tls_provider();
    let store = mhero::store::http::HttpFhirStore::new(&http_settings(&url)).unwrap();
    contract::run_all(&store).await;
}
