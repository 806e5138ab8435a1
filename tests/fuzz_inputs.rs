//! Property tests over the FHIR JSON entry points: arbitrary bodies,
//! Bundles and search queries never make the server answer 5xx or panic;
//! every refusal is a 4xx OperationOutcome.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use mhero::api::{AppState, router};
use mhero::config::Settings;
use mhero::store::sqlite::SqliteStore;
use proptest::prelude::*;
use serde_json::{Value, json};
use tower::ServiceExt;

struct Harness {
    runtime: tokio::runtime::Runtime,
    app: axum::Router,
    _dir: tempfile::TempDir,
}

fn harness() -> Harness {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fhir.sqlite");
    let store = runtime.block_on(SqliteStore::open(&path)).unwrap();
    let settings = Settings::load_from(None, Some(Default::default())).unwrap();
    let state = AppState {
        store: Arc::new(store),
        settings: Arc::new(settings),
        fhir_base: "http://localhost/fhir".into(),
        metrics: mhero::api::metrics::prometheus_handle(),
        contact_sync: None,
        dispatch: None,
        flow_sync: None,
        schedule: None,
        index: Arc::new(
            mhero::index::tantivy::TantivyIndex::open(&dir.path().join("index")).unwrap(),
        ),
        index_health: Default::default(),
        index_sync: Default::default(),
    };
    Harness {
        runtime,
        app: router(state),
        _dir: dir,
    }
}

impl Harness {
    fn send(&self, method: &str, uri: &str, body: String) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/fhir+json")
            .body(Body::from(body))
            .unwrap();
        self.runtime.block_on(async {
            let response = self.app.clone().oneshot(request).await.unwrap();
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            (status, value)
        })
    }
}

fn assert_answer(status: StatusCode, body: &Value) {
    assert!(!status.is_server_error(), "5xx: {status} {body}");
    if status.is_client_error() {
        assert_eq!(body["resourceType"], "OperationOutcome", "{status} {body}");
        assert!(
            body["issue"][0]["diagnostics"]
                .as_str()
                .is_some_and(|d| !d.is_empty())
        );
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "[a-zA-Z0-9 /|:.#?-]{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("Patient"),
            Just("Practitioner"),
            Just("Bundle"),
            Just("urn:uuid:x"),
            Just("Patient/1"),
            Just("2024-01-01")
        ]
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("resourceType".to_string()),
                        Just("id".to_string()),
                        Just("meta".to_string()),
                        Just("name".to_string()),
                        Just("identifier".to_string()),
                        Just("reference".to_string()),
                        Just("entry".to_string()),
                        Just("request".to_string()),
                        Just("resource".to_string()),
                        Just("type".to_string()),
                        Just("method".to_string()),
                        Just("url".to_string()),
                        Just("fullUrl".to_string()),
                        "[a-z]{1,6}"
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
}

fn resource_body() -> impl Strategy<Value = Value> {
    (
        json_value(),
        prop_oneof![
            Just("Patient"),
            Just("Practitioner"),
            Just("Group"),
            Just("Claim"),
            Just("")
        ],
    )
        .prop_map(|(mut v, t)| {
            if let Value::Object(map) = &mut v
                && !t.is_empty()
            {
                map.insert("resourceType".into(), json!(t));
            }
            v
        })
}

fn bundle_body() -> impl Strategy<Value = Value> {
    let method = prop_oneof![
        Just("GET"),
        Just("POST"),
        Just("PUT"),
        Just("DELETE"),
        Just("PATCH"),
        Just("")
    ];
    let url = prop_oneof![
        Just("Patient"),
        Just("Patient/1"),
        Just("Patient?identifier=a|b"),
        Just("Patient/1/_history/1"),
        Just("Claim/1"),
        Just("ValueSet/$expand"),
        Just("/"),
        Just("http://x/fhir/Patient/2")
    ];
    let entry = (
        method,
        url,
        resource_body(),
        prop_oneof![
            Just(None),
            Just(Some("urn:uuid:1")),
            Just(Some("urn:uuid:2"))
        ],
    )
        .prop_map(|(m, u, r, full)| {
            let mut e = json!({ "request": { "method": m, "url": u }, "resource": r });
            if let Some(f) = full {
                e["fullUrl"] = json!(f);
            }
            e
        });
    (
        prop_oneof![Just("transaction"), Just("batch"), Just("collection")],
        prop::collection::vec(entry, 0..6),
    )
        .prop_map(|(t, entries)| json!({ "resourceType": "Bundle", "type": t, "entry": entries }))
}

fn query() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("name"),
        Just("name:exact"),
        Just("name:contains"),
        Just("name:missing"),
        Just("identifier"),
        Just("identifier:not"),
        Just("_id"),
        Just("_lastUpdated"),
        Just("_count"),
        Just("_sort"),
        Just("_total"),
        Just("_summary"),
        Just("_include"),
        Just("_revinclude:iterate"),
        Just("_cursor"),
        Just("active"),
        Just("phone"),
        Just("bogus"),
        Just("name:bogus")
    ];
    let value = prop_oneof![
        "[a-zA-Z0-9|,:.\\\\-]{0,10}",
        Just("ge2024-01-01".to_string()),
        Just("2024-13-45".to_string()),
        Just("true".to_string()),
        Just("-_lastUpdated".to_string()),
        Just("PractitionerRole:practitioner".to_string()),
        Just("n.x.1".to_string()),
        Just("u.abc.1".to_string()),
        Just("99999999999999999999".to_string())
    ];
    prop::collection::vec((key, value), 0..5).prop_map(|pairs| {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs {
            s.append_pair(k, &v);
        }
        s.finish()
    })
}

fn contact_query() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("q"),
        Just("type"),
        Just("cadre"),
        Just("location"),
        Just("group"),
        Just("opted_out"),
        Just("has_phone"),
        Just("replied_since"),
        Just("page"),
        Just("page_size"),
        Just("by"),
        Just("bogus")
    ];
    let value = prop_oneof![
        "\\PC{0,12}",
        Just("Practitioner".to_string()),
        Just("true".to_string()),
        Just("2026-11-01".to_string()),
        Just("2026-11-01T25:00:00Z".to_string()),
        Just("0".to_string()),
        Just("18446744073709551616".to_string()),
        Just("+231 77 000 1001".to_string())
    ];
    prop::collection::vec((key, value), 0..5).prop_map(|pairs| {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs {
            s.append_pair(k, &v);
        }
        s.finish()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_resource_bodies_get_a_clear_answer(body in resource_body(), raw in "[ -~]{0,20}") {
        let h = harness();
        let (status, answer) = h.send("POST", "/fhir/Patient", body.to_string());
        assert_answer(status, &answer);
        let (status, answer) = h.send("PUT", "/fhir/Patient/fuzz", body.to_string());
        assert_answer(status, &answer);
        let (status, answer) = h.send("POST", "/fhir/Patient", raw);
        assert_answer(status, &answer);
    }

    #[test]
    fn arbitrary_bundles_get_a_clear_answer(bundle in bundle_body()) {
        let h = harness();
        let (status, answer) = h.send("POST", "/fhir", bundle.to_string());
        assert_answer(status, &answer);
    }

    #[test]
    fn arbitrary_search_queries_get_a_clear_answer(q in query()) {
        let h = harness();
        let (status, answer) = h.send("GET", &format!("/fhir/Practitioner?{q}"), String::new());
        assert_answer(status, &answer);
        prop_assert!(status == StatusCode::OK || status == StatusCode::BAD_REQUEST, "{} {}", status, answer);
    }

    #[test]
    fn arbitrary_contact_searches_and_audiences_get_a_clear_answer(q in contact_query(), body in json_value()) {
        let h = harness();
        for path in ["/api/contacts", "/api/contacts/stats"] {
            let (status, answer) = h.send("GET", &format!("{path}?{q}"), String::new());
            assert_answer(status, &answer);
            prop_assert!(status == StatusCode::OK || status == StatusCode::BAD_REQUEST, "{} {}", status, answer);
        }
        // The index is empty: an audience is refused, never made or a 5xx.
        let (status, answer) = h.send("POST", "/api/contacts/audience", body.to_string());
        assert_answer(status, &answer);
        prop_assert!(status.is_client_error(), "{} {}", status, answer);
    }

    #[test]
    fn value_parsers_never_panic(s in "\\PC{0,40}") {
        let _ = mhero::fhir::extract::date_range(&s);
        let _ = mhero::fhir::extract::parse_reference(&s);
        let _ = mhero::fhir::extract::fold(&s);
        let _ = mhero::store::parse_etag(&s);
    }
}
