//! Writing a person through the FHIR API starts a contact sync pass at
//! once; other writes, reads and refused writes do not. Every successful
//! write starts an index follower pass.

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use mhero::api::{AppState, router};
use mhero::config::Settings;
use mhero::jobs::runner::Nudge;
use mhero::store::sqlite::SqliteStore;
use tower::ServiceExt;

#[tokio::test]
async fn person_writes_nudge_the_contact_sync() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    let nudge = Nudge::default();
    let index_nudge = Nudge::default();
    let index = mhero::index::tantivy::TantivyIndex::open(&dir.path().join("index")).unwrap();
    let state = AppState {
        store: Arc::new(store),
        settings: Arc::new(Settings::load_from(None, Some(Default::default())).unwrap()),
        fhir_base: "http://localhost/fhir".into(),
        metrics: mhero::api::metrics::prometheus_handle(),
        contact_sync: Some(nudge.clone()),
        dispatch: None,
        flow_sync: None,
        schedule: None,
        index: Arc::new(index),
        index_health: Default::default(),
        index_sync: index_nudge.clone(),
    };
    let app = router(state);
    let send = |method: &str, uri: &str, body: &str| {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/fhir+json")
            .body(Body::from(body.to_string()))
            .unwrap();
        app.clone().oneshot(request)
    };
    let status = send(
        "POST",
        "/fhir/Organization",
        r#"{"resourceType":"Organization","name":"MoH"}"#,
    )
    .await
    .unwrap()
    .status();
    assert!(status.is_success());
    send("GET", "/fhir/Practitioner", "").await.unwrap();
    let refused = send("POST", "/fhir/Practitioner", "{not json")
        .await
        .unwrap()
        .status();
    assert!(refused.is_client_error());
    assert_eq!(nudge.times_nudged(), 0, "no person was written");
    assert_eq!(index_nudge.times_nudged(), 1, "only the Organization write");

    let created = send(
        "POST",
        "/fhir/Practitioner",
        r#"{"resourceType":"Practitioner","name":[{"text":"Fatu"}]}"#,
    )
    .await
    .unwrap()
    .status();
    assert!(created.is_success());
    assert_eq!(nudge.times_nudged(), 1);
    let bundle = r#"{"resourceType":"Bundle","type":"batch","entry":[]}"#;
    send("POST", "/fhir", bundle).await.unwrap();
    assert_eq!(nudge.times_nudged(), 2, "a Bundle may carry people");
    assert_eq!(index_nudge.times_nudged(), 3);
}
