//! The RapidPro sandbox over real HTTP: response shapes against the
//! documented API v2 examples, auth and `.json` rules, cursor paging,
//! contact/group/field/contact_action semantics, throttling, the error knob
//! and the inspection API.

use std::path::PathBuf;

use mhero::rapidpro::sandbox::{KnobsUpdate, Rate, SandboxServer, SandboxSettings};
use reqwest::StatusCode;
use serde_json::{Value, json};

struct Sb {
    server: SandboxServer,
    http: reqwest::Client,
}

impl Sb {
    async fn start() -> Sb {
        Sb::with(SandboxSettings::default()).await
    }

    async fn with(settings: SandboxSettings) -> Sb {
        mhero::install_tls_provider();
        let server = SandboxServer::start(settings)
            .await
            .expect("sandbox starts");
        Sb {
            server,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, endpoint: &str) -> String {
        self.server.api_url(endpoint)
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        rb.header("Authorization", format!("Token {}", self.server.token()))
    }

    async fn get(&self, endpoint_and_query: &str) -> (StatusCode, Value) {
        let url = format!("{}/api/v2/{endpoint_and_query}", self.server.base_url());
        self.get_url(&url).await
    }

    async fn get_url(&self, url: &str) -> (StatusCode, Value) {
        let response = self.auth(self.http.get(url)).send().await.expect("GET");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, endpoint_and_query: &str, body: Value) -> (StatusCode, Value) {
        let url = format!("{}/api/v2/{endpoint_and_query}", self.server.base_url());
        let response = self
            .auth(self.http.post(url))
            .json(&body)
            .send()
            .await
            .expect("POST");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn delete(&self, endpoint_and_query: &str) -> (StatusCode, String) {
        let url = format!("{}/api/v2/{endpoint_and_query}", self.server.base_url());
        let response = self
            .auth(self.http.delete(url))
            .send()
            .await
            .expect("DELETE");
        let status = response.status();
        (status, response.text().await.unwrap_or_default())
    }

    async fn create_contact(&self, body: Value) -> Value {
        let (status, contact) = self.post("contacts.json", body).await;
        assert_eq!(status, StatusCode::CREATED, "{contact}");
        contact
    }
}

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/rapidpro")
        .join(name);
    let path = if path.exists() {
        path
    } else {
        PathBuf::from("/work/shared/fixtures/rapidpro").join(name)
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Every key of the documented example is in ours with the same JSON kind
/// (when both are non-null), recursively; `data_keys` are maps keyed by data
/// (e.g. contact `fields`), whose own keys are not structure.
fn assert_structure(doc: &Value, ours: &Value, at: &str, data_keys: &[&str]) {
    match (doc, ours) {
        (Value::Object(d), Value::Object(o)) => {
            for (k, dv) in d {
                let ov = o
                    .get(k)
                    .unwrap_or_else(|| panic!("{at}.{k} missing from {ours}"));
                if data_keys.contains(&k.as_str()) {
                    assert_eq!(kind(dv), kind(ov), "{at}.{k}");
                    continue;
                }
                assert_structure(dv, ov, &format!("{at}.{k}"), data_keys);
            }
        }
        (Value::Array(d), Value::Array(o)) => {
            if let (Some(d0), Some(o0)) = (d.first(), o.first()) {
                assert_structure(d0, o0, &format!("{at}[0]"), data_keys);
            }
        }
        (Value::Null, _) | (_, Value::Null) => {}
        (d, o) => assert_eq!(kind(d), kind(o), "{at}: doc {d} vs ours {o}"),
    }
}

fn keys(v: &Value) -> Vec<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn list_shapes_match_the_documented_examples() {
    let sb = Sb::start().await;
    for name in ["Nickname", "Side Kick"] {
        let (s, _) = sb
            .post("fields.json", json!({"name": name, "type": "text"}))
            .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let (s, group) = sb.post("groups.json", json!({"name": "Customers"})).await;
    assert_eq!(s, StatusCode::CREATED);
    sb.create_contact(json!({
        "name": "Ben Haggerty", "language": "eng", "urns": ["tel:+250788123123"],
        "groups": [group["uuid"]], "fields": {"nickname": "Macklemore", "side_kick": "Ryan Lewis"}
    }))
    .await;

    let (s, contacts) = sb.get("contacts.json").await;
    assert_eq!(s, StatusCode::OK);
    let doc = fixture("api-v2-docs/contacts.get.response.1.json");
    assert_eq!(keys(&contacts), keys(&doc), "envelope");
    assert_structure(&doc, &contacts, "contacts", &["fields"]);
    // The serializer's full key order (reference §5.1).
    assert_eq!(
        keys(&contacts["results"][0]),
        [
            "uuid",
            "name",
            "status",
            "language",
            "urns",
            "groups",
            "notes",
            "fields",
            "flow",
            "created_on",
            "modified_on",
            "last_seen_on",
            "blocked",
            "stopped"
        ]
    );
    assert_eq!(
        contacts["results"][0]["fields"],
        json!({"nickname": "Macklemore", "side_kick": "Ryan Lewis"})
    );
    let python = fixture("rapidpro-python/contacts.json");
    assert_eq!(keys(&contacts), keys(&python));
    for key in keys(&python["results"][0]) {
        assert!(contacts["results"][0].get(&key).is_some(), "{key}");
    }

    let (_, groups) = sb.get("groups.json").await;
    let doc = fixture("api-v2-docs/groups.get.response.1.repaired.json");
    assert_structure(&doc, &groups, "groups", &[]);
    assert_eq!(keys(&groups["results"][0]), keys(&doc["results"][0]));
    assert_eq!(groups["results"][0]["count"], 1);

    let (_, fields) = sb.get("fields.json").await;
    let doc = fixture("api-v2-docs/fields.get.response.1.repaired.json");
    assert_structure(&doc, &fields, "fields", &[]);
    assert_eq!(fields["results"].as_array().map(Vec::len), Some(2));

    let (s, workspace) = sb.get("workspace.json").await;
    assert_eq!(s, StatusCode::OK);
    assert_structure(
        &fixture("api-v2-docs/workspace.get.response.1.json"),
        &workspace,
        "workspace",
        &[],
    );
    assert_eq!(workspace["country"], "RW");
}

#[tokio::test]
async fn authentication_failures_are_403_with_the_exact_bodies() {
    let sb = Sb::start().await;
    let url = sb.url("contacts");
    let cases = [
        (None, "Authentication credentials were not provided."),
        (Some("Token wrong-token".to_string()), "Invalid token"),
        (
            Some("Token".to_string()),
            "Invalid token header. No credentials provided.",
        ),
        (
            Some("Token a b".to_string()),
            "Invalid token header. Token string should not contain spaces.",
        ),
        (
            Some("Basic c2FuZGJveEBleGFtcGxlLmNvbTpub3Bl".to_string()),
            "Invalid token or email",
        ),
    ];
    for (header, detail) in cases {
        let mut rb = sb.http.get(&url);
        if let Some(h) = &header {
            rb = rb.header("Authorization", h);
        }
        let response = rb.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{header:?}");
        assert!(response.headers().get("www-authenticate").is_none());
        assert!(response.headers().get("x-temba-workspace").is_none());
        assert_eq!(
            response.json::<Value>().await.unwrap(),
            json!({ "detail": detail })
        );
    }
    // The keyword is case-insensitive; Basic email:token works too.
    for header in [
        "token sandbox-token".to_string(),
        format!("Basic {}", base64_of("sandbox@example.com:sandbox-token")),
    ] {
        let response = sb
            .http
            .get(&url)
            .header("Authorization", &header)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{header}");
        assert_eq!(
            response
                .headers()
                .get("x-temba-workspace")
                .and_then(|v| v.to_str().ok()),
            Some("6a44ca78-a4c2-4862-a7d3-2932f9b3a7c3")
        );
    }
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test]
async fn json_suffix_method_and_unknown_endpoint_rules() {
    let sb = Sb::start().await;
    sb.create_contact(json!({"name": "A"})).await;
    let base = sb.server.base_url().to_string();
    let (s, body) = sb.get_url(&format!("{base}/api/v2/contacts")).await;
    assert_eq!((s, body), (StatusCode::OK, json!([])));
    let response = sb
        .auth(sb.http.post(format!("{base}/api/v2/contacts")))
        .json(&json!({"name": "B"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let response = sb
        .auth(sb.http.put(sb.url("contacts")))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"detail": "Method \"PUT\" not allowed."})
    );
    let (s, body) = sb.delete("fields.json?key=x").await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    let (s, body) = sb.get("nothing_here.json").await;
    assert_eq!(
        (s, body),
        (StatusCode::NOT_FOUND, json!({"detail": "Not found."}))
    );
    // Only the one contact from the POST with the suffix exists.
    let (_, list) = sb.get("contacts.json").await;
    assert_eq!(list["results"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn paging_over_600_contacts_gives_three_pages_and_every_contact_once() {
    let sb = Sb::start().await;
    let mut created = std::collections::HashSet::new();
    for i in 0..600 {
        let c = sb
            .create_contact(
                json!({"name": format!("C{i}"), "urns": [format!("tel:+2507880{i:05}")]}),
            )
            .await;
        created.insert(c["uuid"].as_str().unwrap().to_string());
    }
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut pages = Vec::new();
    let mut url = sb.url("contacts");
    loop {
        let (s, page) = sb.get_url(&url).await;
        assert_eq!(s, StatusCode::OK);
        let results = page["results"].as_array().unwrap();
        sizes.push(results.len());
        seen.extend(
            results
                .iter()
                .map(|c| c["uuid"].as_str().unwrap().to_string()),
        );
        pages.push(page.clone());
        match page["next"].as_str() {
            Some(next) => {
                assert!(next.contains("cursor="), "{next}");
                url = next.to_string();
            }
            None => break,
        }
    }
    assert_eq!(sizes, [250, 250, 100]);
    assert_eq!(seen.len(), 600);
    assert_eq!(
        seen.iter()
            .cloned()
            .collect::<std::collections::HashSet<_>>(),
        created
    );
    assert!(pages[0]["previous"].is_null());
    // Newest first: the last contact created leads the first page.
    assert_eq!(pages[0]["results"][0]["name"], "C599");
    // `previous` of the last page is the middle page again.
    let (_, back) = sb.get_url(pages[2]["previous"].as_str().unwrap()).await;
    assert_eq!(back["results"], pages[1]["results"]);
    // An invalid cursor is a 404.
    let (s, body) = sb.get("contacts.json?cursor=bm9wZQ%3D%3D").await;
    assert_eq!(
        (s, body),
        (StatusCode::NOT_FOUND, json!({"detail": "Invalid cursor"}))
    );
}

#[tokio::test]
async fn create_returns_201_with_normalised_urns_groups_and_all_fields() {
    let sb = Sb::start().await;
    sb.post("fields.json", json!({"name": "Nickname", "type": "text"}))
        .await;
    sb.post("fields.json", json!({"name": "Age", "type": "number"}))
        .await;
    let (_, devs) = sb.post("groups.json", json!({"name": "Devs"})).await;
    let contact = sb
        .create_contact(json!({
            "name": "Ben Haggerty",
            "language": "eng",
            "urns": ["tel:+250 (78) 812-3123", "whatsapp:250788123123", "mailto:Ben@Example.COM"],
            "groups": ["devs"],
            "fields": {"nickname": "Macklemore"}
        }))
        .await;
    let doc = fixture("api-v2-docs/contacts.post.response.3.json");
    assert_structure(&doc, &contact, "contact", &["fields"]);
    assert_eq!(
        contact["urns"],
        json!([
            "tel:+250788123123",
            "whatsapp:250788123123",
            "mailto:ben@example.com"
        ])
    );
    assert_eq!(
        contact["groups"],
        json!([{"uuid": devs["uuid"], "name": "Devs"}])
    );
    assert_eq!(
        contact["fields"],
        json!({"nickname": "Macklemore", "age": null})
    );
    assert_eq!(contact["status"], "active");
    let created_on = contact["created_on"].as_str().unwrap();
    assert_eq!(
        created_on.len(),
        "2015-11-11T13:05:57.457742Z".len(),
        "{created_on}"
    );
    assert!(created_on.ends_with('Z'));
    // `{}` creates an empty contact.
    let empty = sb.create_contact(json!({})).await;
    assert_eq!(empty["urns"], json!([]));
    assert!(empty["name"].is_null());
}

#[tokio::test]
async fn a_urn_taken_by_another_contact_is_a_400_keyed_by_index() {
    let sb = Sb::start().await;
    sb.create_contact(json!({"urns": ["tel:+250788123123"]}))
        .await;
    let (s, body) = sb
        .post(
            "contacts.json",
            json!({"name": "Dup", "urns": ["tel:+250788999999", "tel:0788123123"]}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"urns": {"1": ["URN is in use by another contact."]}})
    );
    let (_, list) = sb.get("contacts.json").await;
    assert_eq!(list["results"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn invalid_urns_and_other_fields_give_one_400_with_every_error() {
    let sb = Sb::start().await;
    let (s, body) = sb
        .post(
            "contacts.json",
            json!({
                "language": "xx",
                "urns": ["tel:+250788123123", "foo:bar", "1234556789"],
                "groups": ["59686b4e-14bc-4160-9376-b649b218c806"],
                "fields": {"hmmm": "x"}
            }),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({
            "language": ["Ensure this field has at least 3 characters."],
            "urns": {
                "1": ["Invalid URN: foo:bar. Ensure phone numbers contain country codes."],
                "2": ["Invalid URN: 1234556789. Ensure phone numbers contain country codes."]
            },
            "groups": ["No such object: 59686b4e-14bc-4160-9376-b649b218c806"],
            "fields": ["Invalid contact field key: hmmm"]
        })
    );
    let urns: Vec<String> = (0..101).map(|i| format!("tel:+25078800{i:04}")).collect();
    let (s, body) = sb.post("contacts.json", json!({ "urns": urns })).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"urns": ["Ensure this field has no more than 100 elements."]})
    );
    let (s, body) = sb
        .post("contacts.json", json!(["not", "an", "object"]))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"non_field_errors": ["Request body should be a single JSON object"]})
    );
}

#[tokio::test]
async fn update_by_urn_creates_then_updates_and_by_uuid_merges_fields() {
    let sb = Sb::start().await;
    sb.post("fields.json", json!({"name": "Nickname", "type": "text"}))
        .await;
    sb.post("fields.json", json!({"name": "District", "type": "text"}))
        .await;
    let (s, created) = sb
        .post(
            "contacts.json?urn=tel%3A%2B250788000001",
            json!({"name": "Ann", "fields": {"nickname": "A"}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert_eq!(created["urns"], json!(["tel:+250788000001"]));
    let (s, updated) = sb
        .post(
            "contacts.json?urn=tel%3A%2B250788000001",
            json!({"fields": {"district": "Gasabo"}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(updated["uuid"], created["uuid"]);
    assert_eq!(updated["name"], "Ann");
    assert_eq!(
        updated["fields"],
        json!({"nickname": "A", "district": "Gasabo"})
    );
    assert!(updated["modified_on"].as_str() > created["modified_on"].as_str());
    let (s, body) = sb
        .post(
            "contacts.json?urn=tel%3A%2B250788000001",
            json!({"urns": ["tel:+250788000002"]}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"urns": ["Field not allowed when using URN in URL"]})
    );

    let uuid = created["uuid"].as_str().unwrap();
    let (s, updated) = sb
        .post(
            &format!("contacts.json?uuid={uuid}"),
            json!({"fields": {"nickname": null}, "note": "hi"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        updated["fields"],
        json!({"nickname": null, "district": "Gasabo"})
    );
    assert_eq!(updated["notes"][0]["text"], "hi");
    // On update a URN owned by someone else is silently dropped.
    sb.create_contact(json!({"urns": ["tel:+250788000009"]}))
        .await;
    let (s, updated) = sb
        .post(
            &format!("contacts.json?uuid={uuid}"),
            json!({"urns": ["tel:+250788000009", "tel:+250788000003"]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(updated["urns"], json!(["tel:+250788000003"]));

    let (s, body) = sb
        .post(
            "contacts.json?uuid=09d23a05-47fe-11e4-bfe9-b8f6b119e9ab",
            json!({"name": "X"}),
        )
        .await;
    assert_eq!(
        (s, body),
        (StatusCode::NOT_FOUND, json!({"detail": "Not found."}))
    );
    let (s, body) = sb.post("contacts.json?uuid=xyz", json!({})).await;
    assert_eq!(
        (s, body),
        (
            StatusCode::BAD_REQUEST,
            json!({"detail": "Param 'uuid': xyz is not a valid UUID."})
        )
    );
    let (s, body) = sb
        .post(&format!("contacts.json?uuid={uuid}&urn=tel:+1"), json!({}))
        .await;
    assert_eq!(
        (s, body),
        (
            StatusCode::BAD_REQUEST,
            json!({"detail": "URL can only contain one of the following parameters: urn, uuid"})
        )
    );
}

#[tokio::test]
async fn delete_is_204_then_404_and_frees_the_urn() {
    let sb = Sb::start().await;
    let c = sb
        .create_contact(json!({"name": "Gone", "urns": ["tel:+250788123123"]}))
        .await;
    let uuid = c["uuid"].as_str().unwrap();
    let (s, body) = sb.delete(&format!("contacts.json?uuid={uuid}")).await;
    assert_eq!((s, body.as_str()), (StatusCode::NO_CONTENT, ""));
    let (s, _) = sb.delete(&format!("contacts.json?uuid={uuid}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, body) = sb.delete("contacts.json").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"detail": "URL must contain one of the following parameters: urn, uuid"})
    );
    let (_, live) = sb.get("contacts.json").await;
    assert_eq!(live["results"], json!([]));
    let (_, deleted) = sb.get("contacts.json?deleted=true").await;
    let d = &deleted["results"][0];
    assert_eq!(d["uuid"], uuid);
    assert!(d["name"].is_null() && d["status"].is_null() && d["blocked"].is_null());
    assert_eq!(d["urns"], json!([]));
    let (s, body) = sb
        .post(
            &format!("contacts.json?uuid={uuid}"),
            json!({"name": "Back"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"non_field_errors": ["Deleted contacts can't be modified."]})
    );
    sb.create_contact(json!({"urns": ["tel:+250788123123"]}))
        .await;
}

#[tokio::test]
async fn contact_actions_drive_group_membership_and_status() {
    let sb = Sb::start().await;
    let (s, testers) = sb.post("groups.json", json!({"name": "Testers"})).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(
        keys(&testers),
        ["uuid", "name", "query", "status", "system", "count"]
    );
    let (s, body) = sb.post("groups.json", json!({"name": "TESTERS"})).await;
    assert_eq!(
        (s, body),
        (
            StatusCode::BAD_REQUEST,
            json!({"name": ["This field must be unique."]})
        )
    );
    let a = sb
        .create_contact(json!({"name": "A", "urns": ["tel:+250783835665"]}))
        .await;
    let b = sb.create_contact(json!({"name": "B"})).await;
    let (a_uuid, b_uuid) = (a["uuid"].as_str().unwrap(), b["uuid"].as_str().unwrap());

    let (s, body) = sb
        .post(
            "contact_actions.json",
            json!({"contacts": [b_uuid, "tel:+250783835665"], "action": "add", "group": "testers"}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    let (_, members) = sb
        .get(&format!(
            "contacts.json?group={}",
            testers["uuid"].as_str().unwrap()
        ))
        .await;
    assert_eq!(members["results"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        members["results"][0]["groups"],
        json!([{"uuid": testers["uuid"], "name": "Testers"}])
    );
    let (_, groups) = sb.get("groups.json?name=testers").await;
    assert_eq!(groups["results"][0]["count"], 2);

    let (s, _) = sb
        .post(
            "contact_actions.json",
            json!({"contacts": [b_uuid], "action": "remove", "group": testers["uuid"]}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, bc) = sb.get(&format!("contacts.json?uuid={b_uuid}")).await;
    assert_eq!(bc["results"][0]["groups"], json!([]));

    let (s, _) = sb
        .post(
            "contact_actions.json",
            json!({"contacts": [a_uuid], "action": "block"}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, ac) = sb.get(&format!("contacts.json?uuid={a_uuid}")).await;
    assert_eq!(ac["results"][0]["status"], "blocked");
    assert_eq!(ac["results"][0]["blocked"], true);
    assert_eq!(ac["results"][0]["groups"], json!([]));
    let (s, body) = sb
        .post(
            "contact_actions.json",
            json!({"contacts": [a_uuid], "action": "add", "group": "Testers"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"non_field_errors": [format!("Non-active contacts cannot be added to groups: {a_uuid}")]})
    );
    let (s, _) = sb
        .post(
            "contact_actions.json",
            json!({"contacts": [a_uuid], "action": "unblock"}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, ac) = sb.get(&format!("contacts.json?uuid={a_uuid}")).await;
    assert_eq!(ac["results"][0]["status"], "active");
    assert_eq!(
        ac["results"][0]["groups"],
        json!([]),
        "unblock does not restore groups"
    );

    for (body, want) in [
        (
            json!({"contacts": [a_uuid], "action": "add"}),
            json!({"non_field_errors": ["For action \"add\" you should also specify a group"]}),
        ),
        (
            json!({"contacts": [a_uuid], "action": "block", "group": "Testers"}),
            json!({"non_field_errors": ["For action \"block\" you should not specify a group"]}),
        ),
        (
            json!({"contacts": [], "action": "block"}),
            json!({"contacts": ["Contacts can't be empty."]}),
        ),
        (
            json!({"contacts": ["tel:+250700000000"], "action": "like"}),
            json!({"contacts": ["No such object: tel:+250700000000"], "action": ["\"like\" is not a valid choice."]}),
        ),
    ] {
        let (s, got) = sb.post("contact_actions.json", body).await;
        assert_eq!((s, got), (StatusCode::BAD_REQUEST, want));
    }
    let many: Vec<String> = (0..101).map(|_| a_uuid.to_string()).collect();
    let (s, body) = sb
        .post(
            "contact_actions.json",
            json!({"contacts": many, "action": "block"}),
        )
        .await;
    assert_eq!(
        (s, body),
        (
            StatusCode::BAD_REQUEST,
            json!({"contacts": ["Ensure this field has no more than 100 elements."]})
        )
    );

    let (s, _) = sb
        .post(
            "contact_actions.json",
            json!({"contacts": [a_uuid], "action": "delete"}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, live) = sb.get("contacts.json").await;
    assert_eq!(live["results"].as_array().map(Vec::len), Some(1));

    let (s, _) = sb
        .delete(&format!(
            "groups.json?uuid={}",
            testers["uuid"].as_str().unwrap()
        ))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, groups) = sb.get("groups.json").await;
    assert_eq!(groups["results"], json!([]));
}

#[tokio::test]
async fn fields_follow_the_key_and_name_rules() {
    let sb = Sb::start().await;
    let (s, f) = sb
        .post("fields.json", json!({"name": "Nick name", "type": "text"}))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_structure(
        &fixture("api-v2-docs/fields.post.response.3.json"),
        &f,
        "field",
        &[],
    );
    assert_eq!(
        (f["key"].as_str(), f["type"].as_str()),
        (Some("nick_name"), Some("text"))
    );
    let cases = [
        (
            json!({"name": "nick NAME", "type": "text"}),
            json!({"name": ["This field must be unique."]}),
        ),
        (
            json!({"name": "Bad!", "type": "text"}),
            json!({"name": ["Can only contain letters, numbers and hypens."]}),
        ),
        (
            json!({"name": "Has", "type": "text"}),
            json!({"name": ["Generated key \"has\" is invalid or a reserved name."]}),
        ),
        (
            json!({"name": "Age"}),
            json!({"non_field_errors": ["Field 'type' is required."]}),
        ),
        (
            json!({"name": "Age", "type": "int"}),
            json!({"type": ["\"int\" is not a valid choice."]}),
        ),
    ];
    for (body, want) in cases {
        let (s, got) = sb.post("fields.json", body.clone()).await;
        assert_eq!((s, got), (StatusCode::BAD_REQUEST, want), "{body}");
    }
    let (s, f) = sb
        .post(
            "fields.json?key=nick_name",
            json!({"name": "Nickname", "type": "number"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (f["name"].as_str(), f["value_type"].as_str()),
        (Some("Nickname"), Some("numeric"))
    );
    let (_, list) = sb.get("fields.json?key=nick_name").await;
    assert_eq!(list["results"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn the_sixth_call_in_a_scope_is_throttled_with_retry_after() {
    let sb = Sb::with(SandboxSettings::default().with_throttle_rate(Rate::per_hour(5))).await;
    // Rejected (403) requests do not count.
    let response = sb.http.get(sb.url("contacts")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    for _ in 0..5 {
        let (s, _) = sb.get("contacts.json").await;
        assert_eq!(s, StatusCode::OK);
    }
    let response = sb
        .auth(sb.http.get(sb.url("contacts")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((3590..=3600).contains(&retry), "{retry}");
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"detail": format!("Request was throttled. Expected available in {retry} seconds.")})
    );
    // Another scope has its own bucket.
    let (s, _) = sb.get("groups.json").await;
    assert_eq!(s, StatusCode::OK);
    // Lowering a rate below the history: throttled without Retry-After.
    sb.server
        .sandbox()
        .set_throttle_rate("v2.contacts", Rate::per_hour(2));
    let response = sb
        .auth(sb.http.get(sb.url("contacts")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.headers().get("retry-after").is_none());
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"detail": "Request was throttled."})
    );
}

#[tokio::test]
async fn error_rate_one_answers_500_plain_text_until_turned_off() {
    let sb = Sb::start().await;
    sb.server.sandbox().set_error_rate(1.0);
    let response = sb
        .auth(sb.http.get(sb.url("contacts")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(
        response.text().await.unwrap(),
        "Server Error. Site administrators have been notified."
    );
    let knobs: Value = sb
        .http
        .post(format!("{}/_sandbox/knobs", sb.server.base_url()))
        .json(&json!({"error_rate": 0.0, "throttle": {"v2": "7/min"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(knobs["error_rate"], 0.0);
    assert_eq!(knobs["throttle"]["v2"], "7/minute");
    let (s, _) = sb.get("contacts.json").await;
    assert_eq!(s, StatusCode::OK);
    let response = sb
        .http
        .post(format!("{}/_sandbox/knobs", sb.server.base_url()))
        .json(&json!({"error_rate": 2.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let knobs = sb
        .server
        .sandbox()
        .set_knobs(KnobsUpdate {
            latency_ms: Some(5),
            ..KnobsUpdate::default()
        })
        .unwrap();
    assert_eq!(knobs.latency_ms, 5);
    assert_eq!(knobs.error_rate, 0.0);
}

#[tokio::test]
async fn the_inspection_api_records_calls_and_shows_and_resets_state() {
    let sb = Sb::start().await;
    sb.create_contact(json!({"name": "Inspected", "urns": ["tel:+250788123123"]}))
        .await;
    let (s, _) = sb.get("contacts.json?urn=tel%3A%2B250788123123").await;
    assert_eq!(s, StatusCode::OK);
    let unauthenticated = sb.http.get(sb.url("groups")).send().await.unwrap();
    assert_eq!(unauthenticated.status(), StatusCode::FORBIDDEN);

    let calls: Value = sb
        .http
        .get(format!("{}/_sandbox/calls", sb.server.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let calls = calls["calls"].as_array().unwrap().clone();
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[0]["method"], "POST");
    assert_eq!(calls[0]["path"], "/api/v2/contacts.json");
    assert_eq!(calls[0]["body"]["name"], "Inspected");
    assert_eq!(calls[0]["status"], 201);
    assert_eq!(calls[1]["query"], "urn=tel%3A%2B250788123123");
    assert_eq!(calls[2]["status"], 403);
    assert!(calls[2]["time"].as_str().unwrap().ends_with('Z'));
    let records = sb.server.sandbox().calls();
    assert_eq!(records.len(), 3);
    assert_eq!(records[1].status, 200);

    let state: Value = sb
        .http
        .get(format!("{}/_sandbox/state", sb.server.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["contacts"][0]["name"], "Inspected");
    assert_eq!(state, sb.server.sandbox().state());

    let response = sb
        .http
        .post(format!("{}/_sandbox/reset", sb.server.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(sb.server.sandbox().state()["contacts"], json!([]));
    assert!(sb.server.sandbox().calls().is_empty());
}

#[tokio::test]
async fn list_filters_and_statuses() {
    let sb = Sb::start().await;
    let (_, g) = sb.post("groups.json", json!({"name": "Nurses"})).await;
    let a = sb
        .create_contact(json!({"name": "A", "urns": ["tel:+250788000001"], "groups": ["Nurses"]}))
        .await;
    let b = sb
        .create_contact(json!({"name": "B", "urns": ["tel:0788000002"]}))
        .await;
    let (_, by_urn) = sb.get("contacts.json?urn=tel%3A0788000002").await;
    assert_eq!(by_urn["results"][0]["uuid"], b["uuid"]);
    let (s, body) = sb.get("contacts.json?urn=12345").await;
    assert_eq!(
        (s, body),
        (
            StatusCode::BAD_REQUEST,
            json!({"detail": "Invalid URN: 12345"})
        )
    );
    let (_, unknown_group) = sb.get("contacts.json?group=Nobody").await;
    assert_eq!(unknown_group["results"], json!([]));
    let (_, bad_date) = sb.get("contacts.json?after=yesterday").await;
    assert_eq!(bad_date["results"], json!([]));
    let since = b["modified_on"].as_str().unwrap();
    let (_, after) = sb.get(&format!("contacts.json?after={since}")).await;
    assert_eq!(
        after["results"].as_array().map(Vec::len),
        Some(1),
        "after is inclusive"
    );
    let (_, before) = sb.get(&format!("contacts.json?before={since}")).await;
    assert_eq!(
        before["results"].as_array().map(Vec::len),
        Some(2),
        "before is inclusive"
    );
    let (_, reversed) = sb.get("contacts.json?reverse=true").await;
    assert_eq!(reversed["results"][0]["uuid"], a["uuid"]);

    // Stopping (only possible outside the API) lists the contact, empties its groups.
    assert!(
        sb.server
            .sandbox()
            .set_contact_status(a["uuid"].as_str().unwrap(), "stopped")
    );
    let (_, list) = sb
        .get(&format!(
            "contacts.json?uuid={}",
            a["uuid"].as_str().unwrap()
        ))
        .await;
    assert_eq!(list["results"][0]["status"], "stopped");
    assert_eq!(list["results"][0]["stopped"], true);
    assert_eq!(list["results"][0]["groups"], json!([]));
    let (_, groups) = sb
        .get(&format!("groups.json?uuid={}", g["uuid"].as_str().unwrap()))
        .await;
    assert_eq!(groups["results"][0]["count"], 0);
    assert!(!sb.server.sandbox().set_contact_status("nope", "stopped"));
}

#[tokio::test]
async fn the_server_shuts_down_on_request() {
    let sb = Sb::start().await;
    let url = sb.url("workspace");
    let (s, _) = sb.get("workspace.json").await;
    assert_eq!(s, StatusCode::OK);
    sb.server.shutdown().await.expect("clean shutdown");
    assert!(sb.http.get(url).send().await.is_err());
}

#[tokio::test]
async fn flows_come_from_flow_exports() {
    let sb = Sb::start().await;
    let uuids = sb
        .server
        .sandbox()
        .load_flow_export(&fixture("flows/color_v13.json"))
        .unwrap();
    assert_eq!(uuids, ["ca45c8dd-d882-4f56-8522-1cdda67fd5b5"]);
    sb.server
        .sandbox()
        .load_flow_export(&fixture("flows/send_only_v13.json"))
        .unwrap();
    let legacy = sb
        .server
        .sandbox()
        .load_flow_export(&fixture("flows/sms_form.json"));
    assert!(legacy.unwrap_err().contains("legacy"));

    let (s, flows) = sb.get("flows.json").await;
    assert_eq!(s, StatusCode::OK);
    let doc = fixture("api-v2-docs/flows.get.response.1.repaired.json");
    assert_structure(&doc, &flows, "flows", &[]);
    assert_eq!(flows["results"].as_array().map(Vec::len), Some(2));
    let (_, colors) = sb
        .get("flows.json?uuid=ca45c8dd-d882-4f56-8522-1cdda67fd5b5")
        .await;
    let colors = &colors["results"][0];
    assert_eq!(colors["name"], "Colors");
    assert_eq!(colors["type"], "message");
    assert_eq!(colors["expires"], 720);
    assert_eq!(
        colors["results"],
        json!([{"key": "color", "name": "Color", "categories": ["Orange", "Blue", "Other", "Nothing"],
                "node_uuids": ["9a4dca3c-5381-4f0d-8e20-dac3b1e962a2"]}])
    );
    assert_eq!(
        keys(&colors["runs"]),
        [
            "active",
            "waiting",
            "completed",
            "interrupted",
            "expired",
            "failed"
        ]
    );
    let (_, none) = sb.get("flows.json?type=voice").await;
    assert_eq!(none["results"], json!([]));
}

#[tokio::test]
async fn the_rapidpro_sandbox_command_serves_with_its_flags() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let flows = PathBuf::from("/work/shared/fixtures/rapidpro/flows/color_v13.json");
    let flows = if flows.exists() {
        flows
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/rapidpro/flows/color_v13.json")
    };
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mhero"))
        .args([
            "rapidpro-sandbox",
            "--listen",
            "127.0.0.1:0",
            "--token",
            "cli-token",
            "--flows",
        ])
        .arg(&flows)
        .env_remove("MHERO_CONFIG")
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let banner = lines.next().and_then(Result::ok).unwrap_or_default();
    let token_line = lines.next().and_then(Result::ok).unwrap_or_default();
    let base = banner
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .map(|w| w.trim_end_matches("/api/v2/").to_string());
    let result = async {
        let base = base.ok_or(format!("no URL in {banner:?}"))?;
        if !token_line.contains("cli-token") {
            return Err(format!("token not printed: {token_line:?}"));
        }
        mhero::install_tls_provider();
        let http = reqwest::Client::new();
        let flows: Value = http
            .get(format!("{base}/api/v2/flows.json"))
            .header("Authorization", "Token cli-token")
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let refused = http
            .get(format!("{base}/api/v2/flows.json"))
            .header("Authorization", "Token sandbox-token")
            .send()
            .await
            .map_err(|e| e.to_string())?
            .status();
        Ok::<_, String>((flows, refused))
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let (flows, refused) = result.unwrap();
    assert_eq!(flows["results"][0]["name"], "Colors");
    assert_eq!(
        refused,
        StatusCode::FORBIDDEN,
        "only the given token is accepted"
    );

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_mhero"))
        .args([
            "rapidpro-sandbox",
            "--listen",
            "127.0.0.1:0",
            "--throttle-rate",
            "lots",
        ])
        .env_remove("MHERO_CONFIG")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

#[tokio::test]
async fn broadcasts_create_one_message_per_recipient_when_processed() {
    let sb = Sb::start().await;
    let (_, nurses) = sb.post("groups.json", json!({"name": "Nurses"})).await;
    let ann = sb
        .create_contact(
            json!({"name": "Ann Mugisha", "urns": ["tel:+250788000001"], "groups": ["Nurses"]}),
        )
        .await;
    let bob = sb
        .create_contact(json!({"name": "Bob", "urns": ["tel:+250788000002"], "language": "fra"}))
        .await;
    let (s, _) = sb
        .post(
            "contact_actions.json",
            json!({"contacts": [bob["uuid"]], "action": "block"}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    let (s, b) = sb
        .post(
            "broadcasts.json",
            json!({"text": "Hello @contact.first_name", "contacts": [bob["uuid"]], "urns": ["tel:+250788000003"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    // The docstring still shows `text` as a string; the serializer and its
    // tests (reference §5.7) return a translations object, as checked below.
    let mut doc = fixture("api-v2-docs/broadcasts.post.response.3.repaired.json");
    doc.as_object_mut().unwrap().remove("text");
    assert_structure(&doc, &b, "broadcast", &[]);
    assert_eq!(b["status"], "pending");
    assert_eq!(b["progress"], json!({"total": -1, "started": 0}));
    assert_eq!(b["text"], json!({"eng": "Hello @contact.first_name"}));
    let (s, to_group) = sb
        .post("broadcasts.json", json!({"text": {"eng": "Hi @contact.name", "fra": "Salut"}, "groups": [nurses["uuid"]]}))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    // Nothing is sent before processing (mailroom is asynchronous).
    let (_, messages) = sb.get("messages.json").await;
    assert_eq!(messages["results"], json!([]));

    assert_eq!(sb.server.sandbox().process_broadcasts(), 2);
    let (_, b) = sb
        .get(&format!(
            "broadcasts.json?uuid={}",
            b["uuid"].as_str().unwrap()
        ))
        .await;
    assert_eq!(b["results"][0]["status"], "completed");
    assert_eq!(
        b["results"][0]["progress"],
        json!({"total": 2, "started": 2})
    );

    let (_, messages) = sb.get("messages.json").await;
    let messages = messages["results"].as_array().unwrap().clone();
    assert_eq!(messages.len(), 3);
    let find = |urn: &str| messages.iter().find(|m| m["urn"] == urn).cloned().unwrap();
    let to_bob = find("tel:+250788000002");
    assert_eq!(
        (to_bob["status"].as_str(), to_bob["text"].as_str()),
        (Some("failed"), Some("Hello Bob"))
    );
    let to_new = find("tel:+250788000003");
    assert_eq!(to_new["status"], "sent");
    assert_eq!(to_new["direction"], "out");
    let to_ann = find("tel:+250788000001");
    assert_eq!(to_ann["text"], "Hi Ann Mugisha");
    assert_eq!(to_ann["broadcast"], to_group["id"]);
    assert_eq!(
        to_ann["contact"],
        json!({"uuid": ann["uuid"], "name": "Ann Mugisha"})
    );
    // The unknown URN became a contact.
    let (_, created) = sb.get("contacts.json?urn=tel%3A%2B250788000003").await;
    assert_eq!(created["results"].as_array().map(Vec::len), Some(1));
    let (_, failed) = sb.get("messages.json?folder=failed").await;
    assert_eq!(failed["results"].as_array().map(Vec::len), Some(1));
    let (_, sent) = sb.get("messages.json?folder=SENT").await;
    assert_eq!(sent["results"].as_array().map(Vec::len), Some(2));
    let (s, body) = sb.get("messages.json?folder=sent&contact=x").await;
    assert_eq!(
        (s, body),
        (
            StatusCode::BAD_REQUEST,
            json!({"detail": "You may only specify one of the contact, folder, label, broadcast parameters"})
        )
    );

    for (body, want) in [
        (
            json!({"text": "x"}),
            json!({"non_field_errors": ["Must provide either urns, contacts or groups."]}),
        ),
        (
            json!({"urns": ["tel:+250788000001"]}),
            json!({"non_field_errors": ["Must provide either text or attachments."]}),
        ),
        (
            json!({"text": {}, "urns": ["tel:+250788000001"]}),
            json!({"text": ["This dictionary may not be empty."]}),
        ),
        (
            json!({"text": "x", "urns": ["bad"]}),
            json!({"urns": {"0": ["Invalid URN: bad. Ensure phone numbers contain country codes."]}}),
        ),
        (
            json!({"text": "x", "contacts": ["tel:+250799999999"]}),
            json!({"contacts": ["No such object: tel:+250799999999"]}),
        ),
        (
            json!({"text": {"eng": "x"}, "base_language": "fra", "urns": ["tel:+250788000001"]}),
            json!({"non_field_errors": ["No text translation provided in base language."]}),
        ),
    ] {
        let (s, got) = sb.post("broadcasts.json", body.clone()).await;
        assert_eq!((s, got), (StatusCode::BAD_REQUEST, want), "{body}");
    }
}

#[tokio::test]
async fn an_inbound_message_reactivates_a_stopped_contact() {
    let sb = Sb::start().await;
    let c = sb
        .create_contact(json!({"urns": ["tel:+250788000001"]}))
        .await;
    let uuid = c["uuid"].as_str().unwrap();
    assert!(sb.server.sandbox().set_contact_status(uuid, "stopped"));
    let response = sb
        .http
        .post(format!("{}/_sandbox/inbound", sb.server.base_url()))
        .json(&json!({"urn": "tel:0788000001", "text": "hello again"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"contact": uuid, "webhooks": 0})
    );
    let (_, list) = sb.get(&format!("contacts.json?uuid={uuid}")).await;
    assert_eq!(list["results"][0]["status"], "active");
    assert!(list["results"][0]["last_seen_on"].is_string());
    let (_, inbox) = sb.get("messages.json?folder=inbox").await;
    assert_eq!(inbox["results"][0]["text"], "hello again");
    assert_eq!(inbox["results"][0]["direction"], "in");
}

#[tokio::test]
async fn garbage_input_never_breaks_the_sandbox() {
    // A rate high enough that no request is answered 429 instead of being exercised.
    let sb =
        Sb::with(SandboxSettings::default().with_throttle_rate(Rate::per_hour(1_000_000))).await;
    sb.post("groups.json", json!({"name": "G"})).await;
    sb.post("fields.json", json!({"name": "F", "type": "number"}))
        .await;
    let c = sb
        .create_contact(json!({"urns": ["tel:+250788000001"]}))
        .await;
    let uuid = c["uuid"].as_str().unwrap().to_string();
    let bodies = [
        "",
        "null",
        "[]",
        "{",
        "\"x\"",
        "5",
        "{\"urns\": 5}",
        "{\"urns\": [null, 5, {}]}",
        "{\"groups\": [{}, null, 5]}",
        "{\"groups\": \"G\"}",
        "{\"fields\": []}",
        "{\"fields\": {\"f\": [1]}}",
        "{\"fields\": {\"f\": \"abc\"}}",
        "{\"name\": 5, \"language\": [], \"note\": {}}",
        "{\"contacts\": \"x\", \"action\": 5, \"group\": []}",
        "{\"contacts\": [null], \"action\": \"add\", \"group\": \"G\"}",
        "{\"text\": [], \"urns\": {}, \"contacts\": 3, \"quick_replies\": 7, \"attachments\": \"x\"}",
        "{\"name\": \"\\u0000\", \"type\": null, \"label\": 5}",
        "{\"name\": \"   \"}",
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    ];
    let queries = [
        "".to_string(),
        "?cursor=%%%".to_string(),
        "?cursor=cD0xXzI%3D&reverse=true".to_string(),
        "?uuid=".to_string(),
        "?urn=".to_string(),
        "?urn=tel:".to_string(),
        "?after=&before=".to_string(),
        "?key=".to_string(),
        format!("?uuid={uuid}"),
        "?urn=tel%3A%2B250788000001".to_string(),
        "?group=&deleted=true".to_string(),
        "?folder=inbox&contact=".to_string(),
        "?id=-1&broadcast=x".to_string(),
    ];
    let endpoints = [
        "contacts",
        "contact_actions",
        "groups",
        "fields",
        "workspace",
        "flows",
        "flow_starts",
        "runs",
        "broadcasts",
        "messages",
        "resthooks",
        "resthook_subscribers",
        "resthook_events",
        "archives",
    ];
    for endpoint in endpoints {
        for query in &queries {
            let url = format!("{}{query}", sb.url(endpoint));
            for body in bodies {
                let response = sb
                    .auth(sb.http.post(&url))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("POST {url} {body}: {e}"));
                assert!(
                    response.status().as_u16() < 500,
                    "POST {url} {body}: {}",
                    response.status()
                );
            }
            for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
                let response = sb
                    .auth(sb.http.request(method.clone(), &url))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
                assert!(
                    response.status().as_u16() < 500,
                    "{method} {url}: {}",
                    response.status()
                );
            }
        }
    }
    let (s, _) = sb.get("workspace.json").await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn flow_starts_create_waiting_runs_that_complete_with_results() {
    let sb = Sb::start().await;
    let sandbox = sb.server.sandbox();
    sandbox
        .load_flow_export(&fixture("flows/color_v13.json"))
        .unwrap();
    sandbox
        .load_flow_export(&fixture("flows/send_only_v13.json"))
        .unwrap();
    let colors = "ca45c8dd-d882-4f56-8522-1cdda67fd5b5";
    let send_only = "1a737778-2cef-4e2f-830e-33a9d3921741";
    let ann = sb
        .create_contact(json!({"name": "Ann", "urns": ["tel:+250788000001"]}))
        .await;
    let ann_uuid = ann["uuid"].as_str().unwrap();

    let (s, start) = sb
        .post("flow_starts.json", json!({"flow": colors, "contacts": [ann_uuid], "urns": ["tel:+250788000002"], "params": {"round": 1}}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{start}");
    assert_eq!(
        keys(&start),
        [
            "uuid",
            "flow",
            "status",
            "progress",
            "groups",
            "contacts",
            "params",
            "created_on",
            "modified_on",
            "id",
            "extra",
            "restart_participants",
            "exclude_active"
        ]
    );
    assert_eq!(start["status"], "pending");
    assert_eq!(start["flow"], json!({"uuid": colors, "name": "Colors"}));
    assert!(start.get("urns").is_none(), "urns are not echoed");
    let (_, runs) = sb.get("runs.json").await;
    assert_eq!(runs["results"], json!([]));

    assert_eq!(sandbox.process_flow_starts(), 1);
    let (_, starts) = sb.get("flow_starts.json").await;
    assert_eq!(starts["results"][0]["status"], "completed");
    assert_eq!(
        starts["results"][0]["progress"],
        json!({"total": 2, "started": 2})
    );
    let (_, runs) = sb.get(&format!("runs.json?contact={ann_uuid}")).await;
    let run = runs["results"][0].clone();
    assert_eq!(run["exit_type"], Value::Null);
    assert_eq!(run["start"], json!({"uuid": start["uuid"]}));
    assert_eq!(run["contact"]["urn"], "tel:+250788000001");
    let (_, contact) = sb.get(&format!("contacts.json?uuid={ann_uuid}")).await;
    assert_eq!(
        contact["results"][0]["flow"],
        json!({"uuid": colors, "name": "Colors"})
    );

    assert!(sandbox.complete_run(run["uuid"].as_str().unwrap(), &[("Color", "red", "Other")]));
    assert!(
        !sandbox.complete_run(run["uuid"].as_str().unwrap(), &[]),
        "already completed"
    );
    let (_, runs) = sb
        .get(&format!("runs.json?flow={colors}&responded=true"))
        .await;
    let done = &runs["results"][0];
    assert_eq!(runs["results"].as_array().map(Vec::len), Some(1));
    assert_eq!(done["exit_type"], "completed");
    assert_eq!(done["values"]["color"]["value"], "red");
    assert_eq!(
        done["values"]["color"]["node"],
        "9a4dca3c-5381-4f0d-8e20-dac3b1e962a2"
    );
    assert_eq!(
        keys(&done["values"]["color"]),
        ["name", "value", "category", "node", "time"]
    );
    let (_, no_paths) = sb
        .get(&format!(
            "runs.json?uuid={}&paths=false",
            done["uuid"].as_str().unwrap()
        ))
        .await;
    assert!(no_paths["results"][0]["path"].is_null());
    let (_, flows) = sb.get(&format!("flows.json?uuid={colors}")).await;
    assert_eq!(flows["results"][0]["runs"]["completed"], 1);
    assert_eq!(flows["results"][0]["runs"]["waiting"], 1);

    // restart_participants=false skips Ann (already in Colors); a messaging
    // flow interrupts the other contact's waiting run.
    let (s, _) = sb
        .post(
            "flow_starts.json",
            json!({"flow": colors, "contacts": [ann_uuid], "restart_participants": false}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = sb
        .post(
            "flow_starts.json",
            json!({"flow": send_only, "urns": ["tel:+250788000002"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(sandbox.process_flow_starts(), 2);
    let (_, starts) = sb.get("flow_starts.json").await;
    let totals: Vec<Value> = starts["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["progress"]["total"].clone())
        .collect();
    assert_eq!(totals, [json!(1), json!(0), json!(2)]);
    let (_, interrupted) = sb
        .get(&format!("runs.json?flow={colors}&responded=false"))
        .await;
    assert_eq!(interrupted["results"][0]["exit_type"], "interrupted");

    for (body, want) in [
        (
            json!({"contacts": [ann_uuid]}),
            json!({"flow": ["This field is required."]}),
        ),
        (
            json!({"flow": "f5901b62-ba76-4003-9c62-72fdacc1b7b7", "contacts": [ann_uuid]}),
            json!({"flow": ["No such object: f5901b62-ba76-4003-9c62-72fdacc1b7b7"]}),
        ),
        (
            json!({"flow": colors}),
            json!({"non_field_errors": ["Must specify at least one group, contact or URN"]}),
        ),
        (
            json!({"flow": colors, "urns": ["tel:+250788000001"], "params": "x"}),
            json!({"params": ["Must be a valid JSON object"]}),
        ),
    ] {
        let (s, got) = sb.post("flow_starts.json", body.clone()).await;
        assert_eq!((s, got), (StatusCode::BAD_REQUEST, want), "{body}");
    }
    let (s, body) = sb
        .get(&format!("runs.json?flow={colors}&contact={ann_uuid}"))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    let (s, body) = sb.get("runs.json?flow=invalid").await;
    assert_eq!(
        (s, body),
        (
            StatusCode::BAD_REQUEST,
            json!({"detail": "Param 'flow': invalid is not a valid UUID."})
        )
    );
}

#[tokio::test]
async fn latency_knob_delays_api_answers() {
    let sb = Sb::start().await;
    sb.server
        .sandbox()
        .set_latency(std::time::Duration::from_millis(200));
    let started = std::time::Instant::now();
    let (s, _) = sb.get("workspace.json").await;
    assert_eq!(s, StatusCode::OK);
    assert!(started.elapsed() >= std::time::Duration::from_millis(200));
    assert_eq!(sb.server.sandbox().knobs().latency_ms, 200);
}

#[tokio::test]
async fn group_limits_names_and_field_values() {
    let sb = Sb::start().await;
    for (body, want) in [
        (json!({}), json!({"name": ["This field is required."]})),
        (
            json!({"name": ""}),
            json!({"name": ["This field may not be blank."]}),
        ),
        (
            json!({"name": "x".repeat(65)}),
            json!({"name": ["Ensure this field has no more than 64 characters."]}),
        ),
    ] {
        let (s, got) = sb.post("groups.json", body.clone()).await;
        assert_eq!((s, got), (StatusCode::BAD_REQUEST, want), "{body}");
    }
    for i in 0..250 {
        let (s, _) = sb
            .post("groups.json", json!({"name": format!("Group {i}")}))
            .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let (s, body) = sb
        .post("groups.json", json!({"name": "One too many"}))
        .await;
    assert_eq!(
        (s, body),
        (
            StatusCode::CONFLICT,
            json!({"detail": "Cannot create object because workspace has reached limit."})
        )
    );
    let (_, page) = sb.get("groups.json").await;
    assert_eq!(page["results"].as_array().map(Vec::len), Some(250));
    assert!(page["next"].is_null());
    let uuid = page["results"][0]["uuid"].as_str().unwrap().to_string();
    let (s, renamed) = sb
        .post(
            &format!("groups.json?uuid={uuid}"),
            json!({"name": "Renamed"}),
        )
        .await;
    assert_eq!(
        (s, renamed["name"].as_str()),
        (StatusCode::OK, Some("Renamed"))
    );

    sb.post("fields.json", json!({"name": "Age", "type": "number"}))
        .await;
    sb.post("fields.json", json!({"name": "Born", "type": "datetime"}))
        .await;
    let c = sb
        .create_contact(json!({"fields": {"age": "not a number", "born": "2001-02-03T04:05:06Z"}}))
        .await;
    assert_eq!(
        c["fields"],
        json!({"age": null, "born": "2001-02-03T04:05:06Z"})
    );
    let c = sb.create_contact(json!({"fields": {"age": 34}})).await;
    assert_eq!(c["fields"]["age"], "34");
    let (s, body) = sb
        .post("contacts.json", json!({"fields": {"age": "1\u{0}"}}))
        .await;
    assert_eq!(
        (s, body),
        (
            StatusCode::BAD_REQUEST,
            json!({"fields": {"age": ["Null characters are not allowed."]}})
        )
    );
}

#[tokio::test]
async fn a_single_message_is_queued_then_sent_by_a_tick() {
    let sb = Sb::start().await;
    let ann = sb
        .create_contact(json!({"name": "Ann", "urns": ["tel:+250788000001"]}))
        .await;
    let nobody = sb.create_contact(json!({"name": "No URN"})).await;
    let (s, m) = sb
        .post(
            "messages.json",
            json!({"contact": "tel:+250788000001", "text": "How are you?"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{m}");
    assert_eq!(
        (m["status"].as_str(), m["direction"].as_str()),
        (Some("queued"), Some("out"))
    );
    assert_eq!(m["contact"], json!({"uuid": ann["uuid"], "name": "Ann"}));
    assert_eq!(
        keys(&m),
        [
            "uuid",
            "id",
            "contact",
            "urn",
            "channel",
            "direction",
            "type",
            "status",
            "archived",
            "visibility",
            "text",
            "labels",
            "flow",
            "attachments",
            "quick_replies",
            "created_on",
            "sent_on",
            "modified_on",
            "media",
            "broadcast"
        ]
    );
    let (s, failed) = sb
        .post(
            "messages.json",
            json!({"contact": nobody["uuid"], "text": "Hi"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(failed["status"], "failed");
    assert!(failed["urn"].is_null() && failed["channel"].is_null());
    let (s, body) = sb
        .post("messages.json", json!({"contact": ann["uuid"]}))
        .await;
    assert_eq!(
        (s, body),
        (
            StatusCode::BAD_REQUEST,
            json!({"non_field_errors": ["Must provide either text or attachments."]})
        )
    );

    let tick: Value = sb
        .http
        .post(format!("{}/_sandbox/tick", sb.server.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        tick,
        json!({"broadcasts": 0, "flow_starts": 0, "messages": 1, "expired_runs": 0, "webhooks": 0})
    );
    let (_, sent) = sb.get("messages.json?folder=sent").await;
    assert_eq!(sent["results"][0]["uuid"], m["uuid"]);
    assert!(sent["results"][0]["sent_on"].is_string());
}

#[tokio::test]
async fn webhooks_and_resthooks_post_mailroom_payloads() {
    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .and(header("user-agent", "Mailroom/26.3"))
        .and(header("x-mailroom-mode", "normal"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&receiver)
        .await;
    Mock::given(method("POST"))
        .and(path("/gone"))
        .respond_with(ResponseTemplate::new(410))
        .mount(&receiver)
        .await;

    let sb = Sb::start().await;
    let sandbox = sb.server.sandbox().clone();
    sandbox
        .load_flow_export(&fixture("flows/color_v13.json"))
        .unwrap();
    let ann = sb
        .create_contact(json!({"name": "Ann", "urns": ["tel:+250788000001"]}))
        .await;
    sb.post(
        "flow_starts.json",
        json!({"flow": "ca45c8dd-d882-4f56-8522-1cdda67fd5b5", "contacts": [ann["uuid"]]}),
    )
    .await;
    sandbox.process_flow_starts();
    let (_, runs) = sb.get("runs.json").await;
    let run_uuid = runs["results"][0]["uuid"].as_str().unwrap().to_string();
    assert!(sandbox.complete_run(&run_uuid, &[("Color", "red", "Other")]));

    let hook_url = format!("{}/hook", receiver.uri());
    let (s2, r2) = (sandbox.clone(), run_uuid.clone());
    let call = tokio::spawn(async move { s2.call_webhook(&r2, &hook_url).await })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(call.status, Some(200));
    assert_eq!(
        call.payload,
        json!({
            "contact": {"uuid": ann["uuid"], "name": "Ann", "urn": "tel:+250788000001"},
            "flow": {"uuid": "ca45c8dd-d882-4f56-8522-1cdda67fd5b5", "name": "Colors"},
            "results": {"color": {"value": "red", "category": "Other"}}
        })
    );
    let received = receiver.received_requests().await.unwrap();
    assert_eq!(received.len(), 1);
    assert_eq!(
        serde_json::from_slice::<Value>(&received[0].body).unwrap(),
        call.payload
    );

    sandbox.add_resthook("new-report");
    let (_, hooks) = sb.get("resthooks.json").await;
    assert_eq!(hooks["results"][0]["resthook"], "new-report");
    for target in ["hook", "gone"] {
        let (s, sub) = sb
            .post("resthook_subscribers.json", json!({"resthook": "new-report", "target_url": format!("{}/{target}", receiver.uri())}))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{sub}");
    }
    let (s, body) = sb
        .post(
            "resthook_subscribers.json",
            json!({"resthook": "new-report", "target_url": format!("{}/hook", receiver.uri())}),
        )
        .await;
    assert_eq!(
        (s, body),
        (
            StatusCode::BAD_REQUEST,
            json!({"non_field_errors": ["URL is already subscribed to this event."]})
        )
    );
    let (s, body) = sb
        .post(
            "resthook_subscribers.json",
            json!({"resthook": "spam", "target_url": "nope"}),
        )
        .await;
    assert_eq!(
        (s, body),
        (
            StatusCode::BAD_REQUEST,
            json!({"resthook": ["No resthook with slug: spam"], "target_url": ["Enter a valid URL."]})
        )
    );

    let calls = sandbox
        .fire_resthook(&run_uuid, "new-report")
        .await
        .unwrap();
    let statuses: Vec<Option<u16>> = calls.iter().map(|c| c.status).collect();
    assert_eq!(statuses, [Some(200), Some(410)]);
    let payload = &calls[0].payload;
    assert_eq!(
        keys(payload),
        [
            "channel", "contact", "flow", "input", "path", "results", "run"
        ]
    );
    assert_eq!(
        payload["results"]["color"]["node_uuid"],
        "9a4dca3c-5381-4f0d-8e20-dac3b1e962a2"
    );
    assert_eq!(payload["run"]["uuid"], run_uuid.as_str());
    let (_, subs) = sb.get("resthook_subscribers.json").await;
    assert_eq!(
        subs["results"].as_array().map(Vec::len),
        Some(1),
        "410 unsubscribes"
    );
    let (_, events) = sb.get("resthook_events.json").await;
    assert_eq!(&events["results"][0]["data"], payload);
    assert_eq!(sandbox.webhook_calls().len(), 3);
    let logged: Value = sb
        .http
        .get(format!("{}/_sandbox/webhooks", sb.server.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(logged["calls"][2]["status"], 410);

    let id = subs["results"][0]["id"].as_u64().unwrap();
    let (s, _) = sb
        .delete(&format!("resthook_subscribers.json?id={id}"))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = sb
        .delete(&format!("resthook_subscribers.json?id={id}"))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn auto_process_expand_urns_and_archives() {
    let sb = Sb::with(SandboxSettings {
        auto_process: true,
        ..SandboxSettings::default()
    })
    .await;
    assert!(sb.server.sandbox().knobs().auto_process);
    sb.create_contact(json!({"name": "Ann", "urns": ["tel:+250788000001"]}))
        .await;
    let (s, b) = sb
        .post(
            "broadcasts.json",
            json!({"text": "Hi", "urns": ["tel:+250788000001"]}),
        )
        .await;
    assert_eq!(
        (s, b["status"].as_str()),
        (StatusCode::CREATED, Some("pending"))
    );
    let (_, sent) = sb.get("messages.json?folder=sent").await;
    assert_eq!(
        sent["results"].as_array().map(Vec::len),
        Some(1),
        "processed without a tick"
    );
    assert_eq!(
        sb.server.sandbox().tick(),
        mhero::rapidpro::sandbox::TickReport {
            broadcasts: 0,
            flow_starts: 0,
            messages: 0,
            expired_runs: 0
        }
    );

    let (_, expanded) = sb.get("contacts.json?expand_urns=true").await;
    assert_eq!(
        expanded["results"][0]["urns"][0],
        json!({"channel": {"uuid": "9a8b001e-a913-486c-80f4-1356e23f582e", "name": "Sandbox"},
               "scheme": "tel", "path": "+250788000001", "display": null})
    );
    let (s, archives) = sb.get("archives.json").await;
    assert_eq!(
        (s, archives),
        (
            StatusCode::OK,
            json!({"count": 0, "next": null, "previous": null, "results": []})
        )
    );
}
