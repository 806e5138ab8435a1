//! The contact search API on the iHRIS demo data: `GET /api/contacts`,
//! `GET /api/contacts/stats`, `POST /api/contacts/audience` (a Group that
//! the follower then indexes), 400s naming the bad parameter, the API key,
//! and the index's lag in `/health/ready`.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use mhero::api::{AppState, router};
use mhero::config::Settings;
use mhero::index::tantivy::TantivyIndex;
use mhero::jobs::index_sync::{IndexHealth, IndexSync};
use mhero::store::SharedStore;
use serde_json::{Value, json};
use tower::ServiceExt;

const KEY: &str = "officials-key";

struct Api {
    app: axum::Router,
    sync: IndexSync,
    store: SharedStore,
    _dir: tempfile::TempDir,
}

impl Api {
    /// The demo data, its index built by the follower's first pass.
    async fn demo() -> Api {
        let dir = tempfile::tempdir().unwrap();
        let (store, phones) = common::index_contract::demo_store(&dir).await;
        let index = Arc::new(TantivyIndex::open(&dir.path().join("index")).unwrap());
        let health = IndexHealth::default();
        let sync = IndexSync::new(
            Arc::clone(&store),
            index.clone(),
            phones,
            chrono::Duration::seconds(5),
            health.clone(),
        );
        let env = HashMap::from([("MHERO__AUTH__API_KEYS".to_string(), KEY.to_string())]);
        let state = AppState {
            store: Arc::clone(&store),
            settings: Arc::new(Settings::load_from(None, Some(env)).unwrap()),
            fhir_base: "http://localhost/fhir".into(),
            metrics: mhero::api::metrics::prometheus_handle(),
            contact_sync: None,
            dispatch: None,
            flow_sync: None,
            schedule: None,
            index,
            index_health: health,
            index_sync: Default::default(),
        };
        Api {
            app: router(state),
            sync,
            store,
            _dir: dir,
        }
    }

    async fn send(
        &self,
        method: &str,
        uri: &str,
        body: Option<Value>,
        key: bool,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(uri);
        if key {
            request = request.header("authorization", format!("Bearer {KEY}"));
        }
        let body = match body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                Body::from(body.to_string())
            }
            None => Body::empty(),
        };
        let response = self
            .app
            .clone()
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.send("GET", uri, None, true).await
    }
}

fn references(page: &Value) -> Vec<String> {
    let mut found: Vec<String> = page["contacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["reference"].as_str().unwrap().to_string())
        .collect();
    found.sort();
    found
}

#[tokio::test]
async fn officials_search_page_and_count_contacts() {
    let api = Api::demo().await;
    api.sync.run_once().await.unwrap();

    let (status, page) = api
        .get("/api/contacts?location=TF.N.BRB&page_size=1000")
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["total"], 14);
    assert_eq!(page["contacts"].as_array().unwrap().len(), 14);
    let first = &page["contacts"][0];
    assert!(
        first["places"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == "TF.N.BRB")
    );

    // Paging: 1-based, the pages together are the whole result.
    let (_, one) = api
        .get("/api/contacts?location=TF.N.BRB&page_size=10")
        .await;
    let (_, two) = api
        .get("/api/contacts?location=TF.N.BRB&page_size=10&page=2")
        .await;
    assert_eq!(
        (one["page"].clone(), two["page"].clone()),
        (json!(1), json!(2))
    );
    let mut both = references(&one);
    both.extend(references(&two));
    both.sort();
    assert_eq!(both, references(&page));

    // A name with a typo and without its accent; a phone the local way.
    let (_, found) = api.get("/api/contacts?q=thabo").await;
    assert_eq!(found["total"], 2);
    let (_, nurses) = api
        .get("/api/contacts?cadre=nurse&type=Practitioner&has_phone=true")
        .await;
    assert_eq!(nurses["total"], 40);

    let (status, stats) = api
        .get("/api/contacts/stats?by=district&location=TF.N")
        .await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    assert_eq!(stats["counts"]["Buraba"], 14);
    assert_eq!(stats["total"], 17);
    let (_, cadres) = api.get("/api/contacts/stats?by=cadre").await;
    assert_eq!(cadres["counts"]["nurse"], 40);
    assert_eq!(cadres["counts"]["unknown"], 10);
}

#[tokio::test]
async fn bad_filters_are_refused_naming_the_parameter() {
    let api = Api::demo().await;
    api.sync.run_once().await.unwrap();
    for (uri, parameter) in [
        ("/api/contacts?cadr=nurse", "cadr"),
        ("/api/contacts?opted_out=maybe", "opted_out"),
        ("/api/contacts?replied_since=last-week", "replied_since"),
        ("/api/contacts?type=Observation", "type"),
        ("/api/contacts?page=0", "page"),
        ("/api/contacts?page_size=5000", "page_size"),
        ("/api/contacts?cadre=nurse&cadre=doctor", "cadre"),
        ("/api/contacts?location=TF.N.NOWHERE", "location"),
        ("/api/contacts?group=no-such-group", "group"),
        ("/api/contacts/stats?by=shoe_size", "by"),
        ("/api/contacts/stats", "by"),
        ("/api/contacts/stats?by=cadre&page=2", "page"),
    ] {
        let (status, outcome) = api.get(uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {outcome}");
        assert_eq!(outcome["resourceType"], "OperationOutcome");
        assert_eq!(
            outcome["issue"][0]["expression"],
            json!([parameter]),
            "{uri}"
        );
        let diagnostics = outcome["issue"][0]["diagnostics"].as_str().unwrap();
        assert!(
            diagnostics.starts_with(&format!("{parameter}:")),
            "{uri}: {diagnostics}"
        );
    }
    let (status, outcome) = api.send("GET", "/api/contacts", None, false).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{outcome}");
    let (status, _) = api
        .send(
            "POST",
            "/api/contacts/audience",
            Some(json!({"cadre": "nurse"})),
            false,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn an_audience_becomes_a_group_the_follower_indexes() {
    let api = Api::demo().await;
    api.sync.run_once().await.unwrap();
    let (status, group) = api
        .send(
            "POST",
            "/api/contacts/audience",
            Some(json!({ "cadre": "nurse", "location": "TF.N.BRB", "name": "Nurses in Buraba" })),
            true,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{group}");
    assert_eq!(group["resourceType"], "Group");
    assert_eq!(group["type"], "practitioner");
    assert_eq!(group["name"], "Nurses in Buraba");
    assert_eq!(
        group["extension"][0]["valueString"],
        "cadre=nurse&location=TF.N.BRB"
    );
    let (_, matches) = api
        .get("/api/contacts?cadre=nurse&location=TF.N.BRB&page_size=1000")
        .await;
    let members: Vec<String> = group["member"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["entity"]["reference"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(members, references(&matches));
    assert_eq!(group["quantity"], members.len());
    let id = group["id"].as_str().unwrap();
    let stored = api.store.read("Group", id).await.unwrap();
    assert_eq!(stored.resource["member"], group["member"]);

    // The follower puts the members in the group; the group is a filter.
    api.sync.run_once().await.unwrap();
    let (_, in_group) = api
        .get(&format!("/api/contacts?group={id}&page_size=1000"))
        .await;
    assert_eq!(references(&in_group), members);

    // No match: refused, nothing written.
    let (status, outcome) = api
        .send(
            "POST",
            "/api/contacts/audience",
            Some(json!({ "q": "Zyxwvut" })),
            true,
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{outcome}");
    let (status, outcome) = api
        .send(
            "POST",
            "/api/contacts/audience",
            Some(json!({ "cadre": ["nurse"] })),
            true,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
    assert_eq!(outcome["issue"][0]["expression"], json!(["cadre"]));
    let (status, _) = api
        .send(
            "POST",
            "/api/contacts/audience",
            Some(json!({ "page": "2" })),
            true,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let groups = mhero::store::search_all(api.store.as_ref(), "Group", vec![])
        .await
        .unwrap();
    assert_eq!(groups.len(), 1, "only the one audience");
}

#[tokio::test]
async fn readiness_reports_the_index_lag() {
    let api = Api::demo().await;
    let (status, ready) = api.send("GET", "/health/ready", None, false).await;
    assert_eq!(status, StatusCode::OK);
    let index = &ready["backends"][1];
    assert_eq!(index["name"], "index (embedded)");
    assert_eq!(index["status"], "behind", "never followed yet: {index}");
    assert_eq!(index["lag_seconds"], Value::Null);

    api.sync.run_once().await.unwrap();
    let (_, ready) = api.send("GET", "/health/ready", None, false).await;
    let index = &ready["backends"][1];
    assert_eq!(index["status"], "ok", "{index}");
    assert!(index["lag_seconds"].as_i64().unwrap() <= 1);
    assert!(index["detail"].as_str().unwrap().starts_with("65 people"));
}
