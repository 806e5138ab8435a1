//! The RapidPro API v2 client against wiremock servers answering with the
//! shared fixtures (`shared/fixtures/rapidpro`): paging, write bodies,
//! error mapping, retries and throttling. An ignored test runs against a
//! real workspace when `MHERO_TEST_RAPIDPRO_URL` and
//! `MHERO_TEST_RAPIDPRO_TOKEN` are set.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use mhero::config::Secret;
use mhero::rapidpro::client::{
    ClientOptions, ContactLookup, ContactQuery, MessageQuery, RapidProClient, RapidProError,
    RunQuery, TimeQuery, UpsertKind,
};
use mhero::rapidpro::throttle::{Scope, Throttle};
use mhero::rapidpro::types::*;
use serde_json::{Value, json};
use url::Url;
use wiremock::matchers::{body_json, header, method, path, query_param, query_param_is_missing};
use wiremock::{Mock, MockServer, ResponseTemplate};

use common::fixture;

const TOKEN: &str = "401f7ac837da42b97f613d789819ff93537bee6a";
const AUTH: &str = "Token 401f7ac837da42b97f613d789819ff93537bee6a";

fn docs(name: &str) -> Value {
    fixture(&format!("rapidpro/api-v2-docs/{name}"))
}

fn python(name: &str) -> Value {
    fixture(&format!("rapidpro/rapidpro-python/{name}"))
}

fn options() -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_secs(5),
        max_retries: 2,
        backoff: Duration::from_millis(10),
        max_throttle_wait: Duration::from_secs(2),
    }
}

fn client_with(server: &MockServer, options: ClientOptions, throttle: Throttle) -> RapidProClient {
    RapidProClient::new(
        &Url::parse(&server.uri()).unwrap(),
        &Secret::new(TOKEN),
        options,
        throttle,
    )
    .unwrap()
}

fn client(server: &MockServer) -> RapidProClient {
    client_with(server, options(), Throttle::default())
}

fn json_reply(status: u16, body: Value) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(body)
}

/// `page` with its `next` pointing at `cursor` on `server` (or null).
fn with_next(mut page: Value, server: &MockServer, endpoint: &str, cursor: Option<&str>) -> Value {
    page["next"] = match cursor {
        Some(c) => json!(format!(
            "{}/api/v2/{endpoint}.json?cursor={c}",
            server.uri()
        )),
        None => Value::Null,
    };
    page
}

/// Serve `first` for the request without a cursor and `second` for
/// `?cursor=<cursor>` (the cursor the first page's `next` names).
async fn serve_two_pages(
    server: &MockServer,
    endpoint: &str,
    first: Value,
    cursor: &str,
    second: Value,
) {
    Mock::given(method("GET"))
        .and(path(format!("/api/v2/{endpoint}.json")))
        .and(header("authorization", AUTH))
        .and(query_param_is_missing("cursor"))
        .respond_with(json_reply(200, first))
        .expect(1)
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/api/v2/{endpoint}.json")))
        .and(header("authorization", AUTH))
        .and(query_param("cursor", cursor))
        .respond_with(json_reply(200, second))
        .expect(1)
        .mount(server)
        .await;
}

fn assert_unique<'a>(ids: impl IntoIterator<Item = &'a str>, expected: usize) {
    let ids: Vec<&str> = ids.into_iter().collect();
    assert_eq!(ids.len(), expected, "{ids:?}");
    let set: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(set.len(), expected, "every item exactly once: {ids:?}");
}

// ----- paging -----------------------------------------------------------------

#[tokio::test]
async fn contacts_stream_follows_next_links() {
    let server = MockServer::start().await;
    let first = with_next(
        docs("contacts.get.response.1.json"),
        &server,
        "contacts",
        Some("cD0yMDE1"),
    );
    serve_two_pages(
        &server,
        "contacts",
        first,
        "cD0yMDE1",
        python("contacts.json"),
    )
    .await;
    let contacts: Vec<Contact> = client(&server)
        .contacts(&ContactQuery::default())
        .try_collect()
        .await
        .unwrap();
    assert_unique(contacts.iter().map(|c| c.uuid.as_str()), 4);
    assert_eq!(contacts[0].name.as_deref(), Some("Ben Haggerty"));
    assert_eq!(contacts[1].fields["age"].as_deref(), Some("34"));
    assert_eq!(contacts[3].status, Some(ContactStatus::Blocked));
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn contact_filters_are_sent_and_pages_can_be_walked_by_hand() {
    let server = MockServer::start().await;
    let after = parse_datetime("2020-08-11T13:05:57.576056+00:00").unwrap();
    let next = format!(
        "{}/api/v2/contacts.json?group=Customers&cursor=abc",
        server.uri()
    );
    Mock::given(method("GET"))
        .and(path("/api/v2/contacts.json"))
        .and(query_param("group", "Customers"))
        .and(query_param("after", "2020-08-11T13:05:57.576056Z"))
        .and(query_param("urn", "tel:+250788123123"))
        .and(query_param_is_missing("cursor"))
        .respond_with(json_reply(
            200,
            json!({"next": next, "previous": null, "results": []}),
        ))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/contacts.json"))
        .and(query_param("cursor", "abc"))
        .respond_with(json_reply(200, docs("contacts.get.response.1.json")))
        .expect(1)
        .mount(&server)
        .await;
    let client = client(&server);
    let query = ContactQuery {
        group: Some("Customers".into()),
        urn: Some("tel:+250788123123".into()),
        after: Some(after),
        ..ContactQuery::default()
    };
    let page = client.contacts_page(&query, None).await.unwrap();
    assert!(page.results.is_empty());
    let page = client
        .contacts_page(&query, page.next.as_deref())
        .await
        .unwrap();
    assert_eq!(page.results.len(), 1);
    assert_eq!(page.next, None);
}

#[tokio::test]
async fn groups_stream_follows_next_links() {
    let server = MockServer::start().await;
    let first = with_next(
        docs("groups.get.response.1.repaired.json"),
        &server,
        "groups",
        Some("g2"),
    );
    serve_two_pages(&server, "groups", first, "g2", python("groups.json")).await;
    let groups: Vec<Group> = client(&server).groups(None).try_collect().await.unwrap();
    assert_eq!(groups.len(), 3);
    assert_eq!(groups[0].status, Some(GroupStatus::Ready));
    assert_eq!(groups[2].query.as_deref(), Some("issupport = yes"));
    let names: HashSet<&str> = groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names.len(), 3);
}

/// The messages, runs and flow_starts fixtures carry RapidPro's own
/// `http://example.com/...` next links: they are followed on the
/// configured origin.
#[tokio::test]
async fn messages_stream_follows_the_fixture_next_link() {
    let server = MockServer::start().await;
    let first = docs("messages.get.response.1.repaired.json");
    let cursor = "cD0yMDE1LTExLTExKzExJTNBM40NjQlMkIwMCUzRv";
    let mut second = first.clone();
    second["next"] = Value::Null;
    second["results"][0]["id"] = json!(4105427);
    second["results"][0]["direction"] = json!("in");
    Mock::given(method("GET"))
        .and(path("/api/v2/messages.json"))
        .and(query_param("folder", "inbox"))
        .and(query_param_is_missing("cursor"))
        .respond_with(json_reply(200, first))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/messages.json"))
        .and(query_param("folder", "inbox"))
        .and(query_param("cursor", cursor))
        .respond_with(json_reply(200, second))
        .expect(1)
        .mount(&server)
        .await;
    let query = MessageQuery {
        folder: Some(MessageFolder::Inbox),
        ..MessageQuery::default()
    };
    let messages: Vec<Message> = client(&server)
        .messages(&query)
        .try_collect()
        .await
        .unwrap();
    let ids: Vec<i64> = messages.iter().filter_map(|m| m.id).collect();
    assert_eq!(ids, [4105426, 4105427]);
    assert_eq!(messages[0].status, Some(MessageStatus::Wired));
    assert_eq!(messages[1].direction, Some(MessageDirection::In));
}

#[tokio::test]
async fn runs_stream_follows_next_links() {
    let server = MockServer::start().await;
    let first = docs("runs.get.response.1.repaired.json");
    let mut second = first.clone();
    second["next"] = Value::Null;
    second["results"][0]["id"] = json!(12345679);
    second["results"][0]["exit_type"] = Value::Null;
    Mock::given(method("GET"))
        .and(path("/api/v2/runs.json"))
        .and(query_param("flow", "f5901b62-ba76-4003-9c62-72fdacc1b7b7"))
        .and(query_param_is_missing("cursor"))
        .respond_with(json_reply(200, first))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/runs.json"))
        .and(query_param(
            "cursor",
            "cD0yMDE1LTExLTExKzExJTNBM40NjQlMkIwMCUzRv",
        ))
        .respond_with(json_reply(200, second))
        .expect(1)
        .mount(&server)
        .await;
    let query = RunQuery {
        flow: Some("f5901b62-ba76-4003-9c62-72fdacc1b7b7".into()),
        ..RunQuery::default()
    };
    let runs: Vec<Run> = client(&server).runs(&query).try_collect().await.unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].exit_type, Some(ExitType::Completed));
    assert_eq!(runs[0].values["color"].value.as_deref(), Some("blue"));
    assert_eq!(runs[1].exit_type, None);
    assert_ne!(runs[0].id, runs[1].id);
}

#[tokio::test]
async fn flow_starts_stream_follows_next_links() {
    let server = MockServer::start().await;
    let first = docs("flowstarts.get.response.1.repaired.json");
    let mut second = json!({"next": null, "previous": null,
                            "results": [docs("flowstarts.post.response.3.json")]});
    second["results"][0]["uuid"] = json!("1c8ef8d5-0000-4000-8000-000000000002");
    second["results"][0]["status"] = json!("pending");
    Mock::given(method("GET"))
        .and(path("/api/v2/flow_starts.json"))
        .and(query_param_is_missing("cursor"))
        .respond_with(json_reply(200, first))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/flow_starts.json"))
        .and(query_param(
            "cursor",
            "cD0yMDE1LTExLTExKzExJTNBM40NjQlMkIwMCUzRv",
        ))
        .respond_with(json_reply(200, second))
        .expect(1)
        .mount(&server)
        .await;
    let starts: Vec<FlowStart> = client(&server)
        .flow_starts(&TimeQuery::default())
        .try_collect()
        .await
        .unwrap();
    assert_unique(starts.iter().map(|s| s.uuid.as_str()), 2);
    assert_eq!(starts[0].status, Some(JobStatus::Other("complete".into())));
    assert_eq!(starts[1].status, Some(JobStatus::Pending));
}

#[tokio::test]
async fn flows_fields_broadcasts_and_workspace_parse() {
    let server = MockServer::start().await;
    for (endpoint, body) in [
        ("flows", python("flows.json")),
        ("fields", docs("fields.get.response.1.repaired.json")),
        (
            "broadcasts",
            docs("broadcasts.get.response.1.repaired.json"),
        ),
        ("workspace", docs("workspace.get.response.1.json")),
    ] {
        Mock::given(method("GET"))
            .and(path(format!("/api/v2/{endpoint}.json")))
            .respond_with(json_reply(200, body))
            .expect(1)
            .mount(&server)
            .await;
    }
    let client = client(&server);
    let flows: Vec<Flow> = client
        .flows(&TimeQuery::default())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(flows.len(), 2);
    assert_eq!(flows[0].runs.completed, 123);
    assert!(flows[0].created_on.is_some(), "+00:00 form");
    let fields: Vec<Field> = client.fields(None).try_collect().await.unwrap();
    assert_eq!(fields[0].field_type, Some(FieldType::Text));
    let broadcasts: Vec<Broadcast> = client
        .broadcasts(&TimeQuery::default())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(broadcasts[0].id, Some(123456));
    let workspace = client.workspace().await.unwrap();
    assert_eq!(workspace.languages, ["eng", "fra"]);
    assert_eq!(workspace.country.as_deref(), Some("RW"));
}

// ----- writes -------------------------------------------------------------------

#[tokio::test]
async fn create_contact_sends_the_documented_body() {
    let server = MockServer::start().await;
    let request = docs("contacts.post.request.2.json");
    Mock::given(method("POST"))
        .and(path("/api/v2/contacts.json"))
        .and(query_param_is_missing("uuid"))
        .and(header("authorization", AUTH))
        .and(header("content-type", "application/json"))
        .and(body_json(&request))
        .respond_with(json_reply(201, docs("contacts.post.response.3.json")))
        .expect(1)
        .mount(&server)
        .await;
    let body: ContactWrite = serde_json::from_value(request).unwrap();
    let contact = client(&server).create_contact(&body).await.unwrap();
    assert_eq!(contact.uuid, "09d23a05-47fe-11e4-bfe9-b8f6b119e9ab");
    assert_eq!(contact.urns, ["tel:+250788123123", "twitter:ben"]);
}

#[tokio::test]
async fn update_contact_by_uuid_and_upsert_by_urn() {
    let server = MockServer::start().await;
    let response = docs("contacts.post.response.3.json");
    Mock::given(method("POST"))
        .and(path("/api/v2/contacts.json"))
        .and(query_param("uuid", "09d23a05-47fe-11e4-bfe9-b8f6b119e9ab"))
        .and(body_json(
            json!({"name": "Ben Haggerty", "groups": ["Devs"]}),
        ))
        .respond_with(json_reply(200, response.clone()))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v2/contacts.json"))
        .and(query_param("urn", "tel:+250783835665"))
        .and(body_json(docs("contacts.post.request.5.json")))
        .respond_with(json_reply(201, response))
        .expect(1)
        .mount(&server)
        .await;
    let client = client(&server);
    let by_uuid = ContactWrite {
        name: Some("Ben Haggerty".into()),
        groups: Some(vec!["Devs".into()]),
        ..ContactWrite::default()
    };
    let (kind, _) = client
        .update_contact(
            &ContactLookup::Uuid("09d23a05-47fe-11e4-bfe9-b8f6b119e9ab".into()),
            &by_uuid,
        )
        .await
        .unwrap();
    assert_eq!(kind, UpsertKind::Updated);
    let by_urn: ContactWrite =
        serde_json::from_value(docs("contacts.post.request.5.json")).unwrap();
    let (kind, contact) = client
        .update_contact(&ContactLookup::Urn("tel:+250783835665".into()), &by_urn)
        .await
        .unwrap();
    assert_eq!(kind, UpsertKind::Created);
    assert_eq!(contact.status, Some(ContactStatus::Active));
}

#[tokio::test]
async fn broadcast_flow_start_group_field_and_action_bodies() {
    let server = MockServer::start().await;
    let cases = [
        (
            "broadcasts",
            docs("broadcasts.post.request.2.json"),
            201,
            docs("broadcasts.post.response.3.repaired.json"),
        ),
        (
            "flow_starts",
            docs("flowstarts.post.request.2.json"),
            201,
            docs("flowstarts.post.response.3.json"),
        ),
        (
            "groups",
            docs("groups.post.request.2.json"),
            201,
            docs("groups.post.response.3.json"),
        ),
        (
            "fields",
            docs("fields.post.request.2.json"),
            201,
            docs("fields.post.response.3.json"),
        ),
        (
            "contact_actions",
            docs("contactactions.post.request.2.json"),
            204,
            Value::Null,
        ),
    ];
    for (endpoint, request, status, response) in &cases {
        let reply = if response.is_null() {
            ResponseTemplate::new(*status)
        } else {
            json_reply(*status, response.clone())
        };
        Mock::given(method("POST"))
            .and(path(format!("/api/v2/{endpoint}.json")))
            .and(header("authorization", AUTH))
            .and(body_json(request))
            .respond_with(reply)
            .expect(1)
            .mount(&server)
            .await;
    }
    let client = client(&server);
    let broadcast: BroadcastWrite = serde_json::from_value(cases[0].1.clone()).unwrap();
    assert_eq!(
        client.create_broadcast(&broadcast).await.unwrap().id,
        Some(1234)
    );
    let start: FlowStartWrite = serde_json::from_value(cases[1].1.clone()).unwrap();
    let created = client.create_flow_start(&start).await.unwrap();
    assert_eq!(created.flow.unwrap().name.as_deref(), Some("Thrift Shop"));
    let group = client.create_group("Reporters").await.unwrap();
    assert_eq!(group.count, Some(0));
    let field = client
        .create_field(&FieldWrite {
            name: "Nick name".into(),
            field_type: FieldType::Text,
        })
        .await
        .unwrap();
    assert_eq!(field.key, "nick_name");
    let action: ContactActionRequest = serde_json::from_value(cases[4].1.clone()).unwrap();
    client.contact_actions(&action).await.unwrap();
}

#[tokio::test]
async fn deletes_answer_no_content() {
    let server = MockServer::start().await;
    Mock::given(method("DELETE"))
        .and(path("/api/v2/contacts.json"))
        .and(query_param("urn", "tel:+250788123123"))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/api/v2/groups.json"))
        .and(query_param("uuid", "5f05311e-8f81-4a67-a5b5-1501b6d6496a"))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    let client = client(&server);
    client
        .delete_contact(&ContactLookup::Urn("tel:+250788123123".into()))
        .await
        .unwrap();
    client
        .delete_group("5f05311e-8f81-4a67-a5b5-1501b6d6496a")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_delete_whose_first_answer_was_lost_succeeds() {
    let server = MockServer::start().await;
    Mock::given(method("DELETE"))
        .and(path("/api/v2/contacts.json"))
        .respond_with(ResponseTemplate::new(502).set_body_string("Bad Gateway"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/api/v2/contacts.json"))
        .respond_with(json_reply(404, json!({"detail": "Not found."})))
        .expect(1)
        .mount(&server)
        .await;
    client(&server)
        .delete_contact(&ContactLookup::Uuid(
            "09d23a05-47fe-11e4-bfe9-b8f6b119e9ab".into(),
        ))
        .await
        .unwrap();
}

// ----- errors -------------------------------------------------------------------

#[tokio::test]
async fn a_400_names_the_urn_and_the_fields() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v2/contacts.json"))
        .respond_with(json_reply(
            400,
            json!({
                "language": ["Not a valid ISO639-3 language code."],
                "urns": {"1": ["Invalid URN: 1234556789. Ensure phone numbers contain country codes."]},
                "non_field_errors": ["Request body should be a single JSON object"]
            }),
        ))
        .expect(1)
        .mount(&server)
        .await;
    let body = ContactWrite {
        urns: Some(vec!["tel:+250788123123".into(), "1234556789".into()]),
        ..ContactWrite::default()
    };
    let err = client(&server).create_contact(&body).await.unwrap_err();
    let RapidProError::Invalid(errors) = &err else {
        panic!("{err:?}");
    };
    assert_eq!(errors.urn_errors().len(), 1);
    assert_eq!(errors.urn_errors()[0].0, 1);
    assert!(errors.urn_errors()[0].1.contains("Invalid URN: 1234556789"));
    assert_eq!(
        errors.for_field("language"),
        ["Not a valid ISO639-3 language code."]
    );
    assert_eq!(errors.non_field_errors.len(), 1);
    assert_eq!(err.status(), Some(400));
    assert!(!err.is_transient());
}

#[tokio::test]
async fn a_403_is_forbidden_and_not_retried() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/workspace.json"))
        .respond_with(json_reply(403, json!({"detail": "Invalid token"})))
        .expect(1)
        .mount(&server)
        .await;
    let err = client(&server).workspace().await.unwrap_err();
    match err {
        RapidProError::Forbidden { status, detail } => {
            assert_eq!(status, 403);
            assert_eq!(detail, "Invalid token");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_404_is_not_found() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v2/contacts.json"))
        .respond_with(json_reply(404, json!({"detail": "Not found."})))
        .expect(1)
        .mount(&server)
        .await;
    let err = client(&server)
        .update_contact(
            &ContactLookup::Uuid("09d23a05-47fe-11e4-bfe9-b8f6b119e9ab".into()),
            &ContactWrite::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RapidProError::NotFound { detail } if detail == "Not found."),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_409_is_a_conflict() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v2/groups.json"))
        .respond_with(json_reply(
            409,
            json!({"detail": "Cannot create object because workspace has reached limit."}),
        ))
        .expect(1)
        .mount(&server)
        .await;
    let err = client(&server).create_group("More").await.unwrap_err();
    assert!(matches!(err, RapidProError::Conflict { .. }), "{err:?}");
}

#[tokio::test]
async fn a_plain_text_500_on_a_read_is_retried_then_reported() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/groups.json"))
        .respond_with(
            ResponseTemplate::new(500)
                .set_body_string("Server Error. Site administrators have been notified."),
        )
        .expect(3) // the first attempt and max_retries = 2 retries
        .mount(&server)
        .await;
    let err = client(&server)
        .groups(None)
        .try_collect::<Vec<_>>()
        .await
        .unwrap_err();
    match &err {
        RapidProError::Server { status, message } => {
            assert_eq!(*status, 500);
            assert_eq!(
                message,
                "Server Error. Site administrators have been notified."
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_transient());
}

#[tokio::test]
async fn a_read_recovers_after_a_transient_500() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/workspace.json"))
        .respond_with(ResponseTemplate::new(503).set_body_string("down"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/workspace.json"))
        .respond_with(json_reply(200, python("org.json")))
        .expect(1)
        .mount(&server)
        .await;
    let workspace = client(&server).workspace().await.unwrap();
    assert_eq!(workspace.name, "Nyaruka");
}

#[tokio::test]
async fn creates_answered_500_are_never_re_sent() {
    let server = MockServer::start().await;
    for endpoint in ["contacts", "broadcasts", "flow_starts"] {
        Mock::given(method("POST"))
            .and(path(format!("/api/v2/{endpoint}.json")))
            .respond_with(
                ResponseTemplate::new(500)
                    .set_body_string("Server Error. Site administrators have been notified."),
            )
            .expect(1)
            .mount(&server)
            .await;
    }
    let client = client(&server);
    let err = client
        .create_contact(&ContactWrite {
            name: Some("Ann".into()),
            ..ContactWrite::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, RapidProError::Server { status: 500, .. }),
        "{err:?}"
    );
    let err = client
        .create_broadcast(&BroadcastWrite {
            urns: vec!["tel:+250788123123".into()],
            text: Some(Translated::Plain("hi".into())),
            ..BroadcastWrite::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(500));
    let err = client
        .create_flow_start(&FlowStartWrite {
            flow: "f5901b62-ba76-4003-9c62-72fdacc1b7b7".into(),
            urns: vec!["tel:+250788123123".into()],
            ..FlowStartWrite::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(500));
    // The mocks' `expect(1)` is verified when the server drops; check now too.
    assert_eq!(server.received_requests().await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_create_that_times_out_is_reported_once() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v2/broadcasts.json"))
        .respond_with(
            json_reply(201, docs("broadcasts.post.response.3.repaired.json"))
                .set_delay(Duration::from_secs(2)),
        )
        .expect(1)
        .mount(&server)
        .await;
    let options = ClientOptions {
        timeout: Duration::from_millis(200),
        ..options()
    };
    let client = client_with(&server, options, Throttle::default());
    let started = Instant::now();
    let err = client
        .create_broadcast(&BroadcastWrite {
            groups: vec!["Reporters".into()],
            text: Some(Translated::Plain("hi".into())),
            ..BroadcastWrite::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, RapidProError::Timeout(_)), "{err:?}");
    assert!(err.is_transient());
    assert!(started.elapsed() < Duration::from_millis(1500));
}

#[tokio::test]
async fn a_create_that_cannot_connect_is_a_connection_error() {
    // A port nothing listens on: bind, take the address, close.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let client = RapidProClient::new(
        &Url::parse(&format!("http://{address}")).unwrap(),
        &Secret::new(TOKEN),
        options(),
        Throttle::default(),
    )
    .unwrap();
    let err = client.create_group("x").await.unwrap_err();
    assert!(matches!(err, RapidProError::Connection(_)), "{err:?}");
    assert!(!err.to_string().contains(TOKEN));
}

// ----- throttling ---------------------------------------------------------------

#[tokio::test]
async fn a_429_with_retry_after_pauses_the_scope_then_retries() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v2/broadcasts.json"))
        .respond_with(
            json_reply(
                429,
                json!({"detail": "Request was throttled. Expected available in 1 seconds."}),
            )
            .insert_header("Retry-After", "1"),
        )
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v2/broadcasts.json"))
        .respond_with(json_reply(
            201,
            docs("broadcasts.post.response.3.repaired.json"),
        ))
        .expect(1)
        .mount(&server)
        .await;
    let throttle = Throttle::default();
    let client = client_with(&server, options(), throttle.clone());
    let body: BroadcastWrite =
        serde_json::from_value(docs("broadcasts.post.request.2.json")).unwrap();

    // Another task watches the shared throttle while the request waits.
    let watcher = {
        let throttle = throttle.clone();
        tokio::spawn(async move {
            for _ in 0..100 {
                if throttle.paused_until(Scope::V2).await.is_some() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        })
    };
    let started = Instant::now();
    let broadcast = client.create_broadcast(&body).await.unwrap();
    assert_eq!(broadcast.id, Some(1234));
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "{:?}",
        started.elapsed()
    );
    assert!(
        watcher.await.unwrap(),
        "the v2 scope was paused for everyone"
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_429_with_only_a_body_is_honoured() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/contacts.json"))
        .respond_with(json_reply(
            429,
            json!({"detail": "Request was throttled. Expected available in 1 seconds."}),
        ))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/contacts.json"))
        .respond_with(json_reply(200, python("empty.json")))
        .expect(1)
        .mount(&server)
        .await;
    let started = Instant::now();
    let contacts: Vec<Contact> = client(&server)
        .contacts(&ContactQuery::default())
        .try_collect()
        .await
        .unwrap();
    assert!(contacts.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(950));
}

#[tokio::test]
async fn a_429_without_retries_left_is_returned_and_the_scope_stays_paused() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/runs.json"))
        .respond_with(json_reply(
            429,
            json!({"detail": "Request was throttled. Expected available in 1 seconds."}),
        ))
        .expect(1)
        .mount(&server)
        .await;
    let throttle = Throttle::default();
    let no_retries = ClientOptions {
        max_retries: 0,
        ..options()
    };
    let client = client_with(&server, no_retries, throttle.clone());
    let err = client
        .runs(&RunQuery::default())
        .try_collect::<Vec<_>>()
        .await
        .unwrap_err();
    match err {
        RapidProError::Throttled { scope, retry_after } => {
            assert_eq!(scope, Scope::Runs);
            assert_eq!(retry_after, Some(Duration::from_secs(1)));
        }
        other => panic!("{other:?}"),
    }
    assert!(throttle.paused_until(Scope::Runs).await.is_some());
    assert!(throttle.paused_until(Scope::Contacts).await.is_none());
}

#[tokio::test]
async fn a_429_asking_for_too_long_a_wait_is_returned() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/messages.json"))
        .respond_with(
            json_reply(
                429,
                json!({"detail": "Request was throttled. Expected available in 1234 seconds."}),
            )
            .insert_header("Retry-After", "1234"),
        )
        .expect(1)
        .mount(&server)
        .await;
    let throttle = Throttle::default();
    let client = client_with(&server, options(), throttle.clone());
    let err = client
        .messages(&MessageQuery::default())
        .try_collect::<Vec<_>>()
        .await
        .unwrap_err();
    assert!(
        matches!(err, RapidProError::Throttled { scope: Scope::Messages, retry_after: Some(d) } if d == Duration::from_secs(1234)),
        "{err:?}"
    );
    let until = throttle.paused_until(Scope::Messages).await.unwrap();
    assert!(until > tokio::time::Instant::now() + Duration::from_secs(1200));
}

// ----- secrets ------------------------------------------------------------------

#[tokio::test]
async fn the_token_is_sent_but_never_shown() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/workspace.json"))
        .and(header("authorization", AUTH))
        .respond_with(json_reply(200, docs("workspace.get.response.1.json")))
        .expect(1)
        .mount(&server)
        .await;
    let client = client(&server);
    client.workspace().await.unwrap();
    let debug = format!("{client:?}");
    assert!(!debug.contains(TOKEN), "{debug}");
    let received = server.received_requests().await.unwrap();
    assert!(received[0].url.path().ends_with(".json"));
}

// ----- a real workspace -----------------------------------------------------------

/// Runs against a real RapidPro when `MHERO_TEST_RAPIDPRO_URL` and
/// `MHERO_TEST_RAPIDPRO_TOKEN` are set (read-only: workspace, contacts,
/// groups).
#[tokio::test]
#[ignore = "needs a RapidPro workspace: MHERO_TEST_RAPIDPRO_URL and MHERO_TEST_RAPIDPRO_TOKEN"]
async fn live_workspace_contacts_and_groups() {
    let (Ok(url), Ok(token)) = (
        std::env::var("MHERO_TEST_RAPIDPRO_URL"),
        std::env::var("MHERO_TEST_RAPIDPRO_TOKEN"),
    ) else {
        eprintln!("MHERO_TEST_RAPIDPRO_URL / MHERO_TEST_RAPIDPRO_TOKEN not set; skipped");
        return;
    };
    let client = RapidProClient::new(
        &Url::parse(&url).expect("MHERO_TEST_RAPIDPRO_URL is a URL"),
        &Secret::new(token),
        ClientOptions::default(),
        Throttle::default(),
    )
    .unwrap();
    let workspace = client.workspace().await.unwrap();
    assert!(!workspace.name.is_empty());
    let page = client
        .contacts_page(&ContactQuery::default(), None)
        .await
        .unwrap();
    assert!(page.results.len() <= 250);
    let groups: Vec<Group> = client.groups(None).try_collect().await.unwrap();
    assert!(groups.iter().all(|g| !g.uuid.is_empty()));
}

#[tokio::test]
async fn a_429_holds_back_other_tasks_of_the_same_scope_only() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/flows.json"))
        .respond_with(
            json_reply(
                429,
                json!({"detail": "Request was throttled. Expected available in 1 seconds."}),
            )
            .insert_header("Retry-After", "1"),
        )
        .expect(1)
        .mount(&server)
        .await;
    for endpoint in ["groups", "contacts"] {
        Mock::given(method("GET"))
            .and(path(format!("/api/v2/{endpoint}.json")))
            .respond_with(json_reply(200, python("empty.json")))
            .expect(1)
            .mount(&server)
            .await;
    }
    let no_retries = ClientOptions {
        max_retries: 0,
        ..options()
    };
    let client = client_with(&server, no_retries, Throttle::default());
    let started = Instant::now();
    let err = client
        .flows(&TimeQuery::default())
        .try_collect::<Vec<_>>()
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        RapidProError::Throttled {
            scope: Scope::V2,
            ..
        }
    ));

    // Another task, another endpoint of scope v2: it waits for the pause.
    let other = client.clone();
    let groups = tokio::spawn(async move {
        other.groups(None).try_collect::<Vec<_>>().await.unwrap();
        Instant::now()
    });
    // Scope v2.contacts is not paused.
    client
        .contacts(&ContactQuery::default())
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_millis(800));
    let groups_done = groups.await.unwrap();
    assert!(
        groups_done - started >= Duration::from_millis(950),
        "{:?}",
        groups_done - started
    );
}

#[tokio::test]
async fn a_delete_throttled_then_not_found_is_not_found() {
    let server = MockServer::start().await;
    Mock::given(method("DELETE"))
        .and(path("/api/v2/groups.json"))
        .respond_with(
            json_reply(
                429,
                json!({"detail": "Request was throttled. Expected available in 0 seconds."}),
            )
            .insert_header("Retry-After", "0"),
        )
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/api/v2/groups.json"))
        .respond_with(json_reply(404, json!({"detail": "Not found."})))
        .expect(1)
        .mount(&server)
        .await;
    let err = client(&server)
        .delete_group("5f05311e-8f81-4a67-a5b5-1501b6d6496a")
        .await
        .unwrap_err();
    assert!(matches!(err, RapidProError::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn an_urn_upsert_with_urns_in_the_body_is_refused_before_sending() {
    let server = MockServer::start().await;
    let err = client(&server)
        .update_contact(
            &ContactLookup::Urn("tel:+250783835665".into()),
            &ContactWrite {
                urns: Some(vec!["tel:+250783835665".into()]),
                ..ContactWrite::default()
            },
        )
        .await
        .unwrap_err();
    let RapidProError::Invalid(errors) = err else {
        panic!("{err:?}");
    };
    assert_eq!(
        errors.for_field("urns"),
        ["Field not allowed when using URN in URL"]
    );
    assert!(server.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_next_link_to_the_same_page_stops_paging() {
    let server = MockServer::start().await;
    let page = json!({
        "next": format!("{}/api/v2/groups.json?cursor=same", server.uri()),
        "previous": null,
        "results": [{"uuid": "5f05311e-8f81-4a67-a5b5-1501b6d6496a", "name": "Reporters"}]
    });
    Mock::given(method("GET"))
        .and(path("/api/v2/groups.json"))
        .respond_with(json_reply(200, page))
        .expect(2)
        .mount(&server)
        .await;
    let results: Vec<_> = client(&server).groups(None).collect().await;
    assert_eq!(results.len(), 3, "two items, then the error");
    assert!(results[0].is_ok() && results[1].is_ok());
    assert!(matches!(results[2], Err(RapidProError::Decode(_))));
}

#[tokio::test]
async fn a_group_rename_posts_the_name_by_uuid_and_is_retried_after_a_5xx() {
    let server = MockServer::start().await;
    let uuid = "5f05311e-8f81-4a67-a5b5-1501b6d6496a";
    Mock::given(method("POST"))
        .and(path("/api/v2/groups.json"))
        .and(query_param("uuid", uuid))
        .and(body_json(json!({"name": "Nurses"})))
        .respond_with(ResponseTemplate::new(502).set_body_string("Bad Gateway"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v2/groups.json"))
        .and(query_param("uuid", uuid))
        .and(body_json(json!({"name": "Nurses"})))
        .respond_with(json_reply(
            200,
            json!({"uuid": uuid, "name": "Nurses", "query": null, "status": "ready", "system": false, "count": 3}),
        ))
        .expect(1)
        .mount(&server)
        .await;
    let group = client(&server).update_group(uuid, "Nurses").await.unwrap();
    assert_eq!(group.uuid, uuid);
    assert_eq!(group.name, "Nurses");
    assert_eq!(group.count, Some(3));
}

#[tokio::test]
async fn a_refused_group_name_is_invalid_and_not_retried() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v2/groups.json"))
        .and(query_param("uuid", "5f05311e-8f81-4a67-a5b5-1501b6d6496a"))
        .respond_with(json_reply(
            400,
            json!({"name": ["This field must be unique."]}),
        ))
        .expect(1)
        .mount(&server)
        .await;
    let err = client(&server)
        .update_group("5f05311e-8f81-4a67-a5b5-1501b6d6496a", "Reporters")
        .await
        .unwrap_err();
    match &err {
        RapidProError::Invalid(errors) => {
            assert_eq!(errors.for_field("name"), vec!["This field must be unique."]);
        }
        other => panic!("{other:?}"),
    }
    assert!(!err.is_transient());
}
