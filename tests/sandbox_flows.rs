//! The RapidPro sandbox's flow engine over real HTTP: runs walk their flow
//! definitions (messages, waits, routers, results, contact actions),
//! inbound replies resume them, `call_webhook` POSTs the editor's default
//! body to a local server, waiting runs expire on the sandbox's clock or are
//! interrupted; and the `timeout_rate` / `drop_rate` fault knobs as a
//! client sees them. Background work is driven with `tick` and
//! `deliver_pending_webhooks`, never waited for.

use std::path::PathBuf;
use std::time::Duration;

use mhero::rapidpro::client::{ClientOptions, RapidProClient, RapidProError};
use mhero::rapidpro::sandbox::{KnobsUpdate, SandboxServer, SandboxSettings};
use mhero::rapidpro::throttle::Throttle;
use reqwest::StatusCode;
use serde_json::{Value, json};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const COLORS: &str = "ca45c8dd-d882-4f56-8522-1cdda67fd5b5";
const COLOR_WAIT_NODE: &str = "9a4dca3c-5381-4f0d-8e20-dac3b1e962a2";
const SURVEY: &str = "5b0e3a8c-2f5e-4c55-9a43-7f2d8f0b6a11";

struct Sb {
    server: SandboxServer,
    http: reqwest::Client,
}

impl Sb {
    async fn start() -> Sb {
        mhero::install_tls_provider();
        let server = SandboxServer::start(SandboxSettings::default())
            .await
            .expect("sandbox starts");
        Sb {
            server,
            http: reqwest::Client::new(),
        }
    }

    async fn get(&self, endpoint_and_query: &str) -> Value {
        let url = format!("{}/api/v2/{endpoint_and_query}", self.server.base_url());
        let response = self
            .http
            .get(url)
            .header("Authorization", format!("Token {}", self.server.token()))
            .send()
            .await
            .expect("GET");
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("JSON")
    }

    async fn post(&self, endpoint: &str, body: Value) -> Value {
        let response = self
            .http
            .post(self.server.api_url(endpoint))
            .header("Authorization", format!("Token {}", self.server.token()))
            .json(&body)
            .send()
            .await
            .expect("POST");
        assert!(response.status().is_success(), "{}", response.status());
        response.json().await.expect("JSON")
    }

    async fn control(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}/_sandbox/{path}", self.server.base_url()))
            .json(&body)
            .send()
            .await
            .expect("POST");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn contact(&self, name: &str, urn: &str, language: Option<&str>) -> String {
        let mut body = json!({"name": name, "urns": [urn]});
        if let Some(l) = language {
            body["language"] = json!(l);
        }
        self.post("contacts", body).await["uuid"]
            .as_str()
            .expect("contact uuid")
            .to_string()
    }

    async fn start_flow(&self, flow: &str, contact: &str, params: Value) {
        self.post(
            "flow_starts",
            json!({"flow": flow, "contacts": [contact], "params": params}),
        )
        .await;
        self.server.sandbox().tick();
    }

    async fn run_of(&self, contact: &str) -> Value {
        self.get(&format!("runs.json?contact={contact}")).await["results"][0].clone()
    }

    /// Outgoing texts to a contact, oldest first.
    async fn texts_to(&self, contact: &str) -> Vec<String> {
        let messages = self.get(&format!("messages.json?contact={contact}")).await;
        let mut texts: Vec<String> = messages["results"]
            .as_array()
            .expect("results")
            .iter()
            .filter(|m| m["direction"] == "out")
            .map(|m| m["text"].as_str().unwrap_or_default().to_string())
            .collect();
        texts.reverse();
        texts
    }
}

fn color_export() -> Value {
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/rapidpro/flows/color_v13.json");
    let path = if local.exists() {
        local
    } else {
        PathBuf::from("/work/shared/fixtures/rapidpro/flows/color_v13.json")
    };
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("JSON")
}

fn survey_export() -> Value {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/flows/stock_survey_v13.json"),
    )
    .expect("survey fixture");
    serde_json::from_str(&text).expect("JSON")
}

#[tokio::test]
async fn the_color_flow_asks_waits_and_completes_on_a_reply() {
    let sb = Sb::start().await;
    let sandbox = sb.server.sandbox().clone();
    sandbox.load_flow_export(&color_export()).unwrap();
    let ann = sb.contact("Ann", "tel:+250788000001", None).await;
    let bob = sb.contact("Bob", "tel:+250788000002", None).await;
    let cleo = sb.contact("Cléo", "tel:+250788000003", Some("fra")).await;
    for c in [&ann, &bob, &cleo] {
        sb.start_flow(COLORS, c, json!({})).await;
    }

    // The first node's send_msg went out (queued, then sent by the tick),
    // localized for Cléo; the run waits at the router.
    let sent = sb.get(&format!("messages.json?contact={ann}")).await;
    let question = &sent["results"][0];
    assert_eq!(question["text"], "What is your favorite color?");
    assert_eq!(question["status"], "sent");
    assert_eq!(question["direction"], "out");
    assert_eq!(question["flow"], json!({"uuid": COLORS, "name": "Colors"}));
    assert_eq!(
        sb.texts_to(&cleo).await,
        ["Quelle est votre couleur préférée?"]
    );
    let run = sb.run_of(&ann).await;
    assert_eq!(run["exit_type"], Value::Null);
    assert_eq!(run["responded"], false);
    let nodes: Vec<&Value> = run["path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["node"])
        .collect();
    assert_eq!(
        nodes,
        [
            &json!("e50ac2d5-0704-4970-a450-690b1d03e77f"),
            &json!(COLOR_WAIT_NODE)
        ]
    );

    // Ann's reply matches has_all_words "orange", case-insensitively.
    sandbox
        .receive_message("tel:+250788000001", "I like ORANGE!")
        .unwrap();
    let run = sb.run_of(&ann).await;
    assert_eq!(run["exit_type"], "completed");
    assert!(run["exited_on"].is_string());
    assert_eq!(run["responded"], true);
    assert_eq!(run["values"]["color"]["name"], "Color");
    assert_eq!(run["values"]["color"]["value"], "ORANGE");
    assert_eq!(run["values"]["color"]["category"], "Orange");
    assert_eq!(run["values"]["color"]["node"], COLOR_WAIT_NODE);
    assert_eq!(
        run["path"].as_array().map(Vec::len),
        Some(3),
        "the Orange branch's node"
    );
    sandbox.tick();
    let texts = sb.texts_to(&ann).await;
    assert_eq!(
        texts[1],
        "I love orange too! You said: I like ORANGE! which is category: Orange \
         You are: @(format_urn(urns.tel)) SMS: I like ORANGE! Flow: @results",
        "known expressions are substituted, the others left as written"
    );
    let flows_folder = sb.get("messages.json?folder=flows").await;
    assert_eq!(flows_folder["results"][0]["text"], "I like ORANGE!");
    assert_eq!(
        flows_folder["results"][0]["flow"],
        json!({"uuid": COLORS, "name": "Colors"})
    );
    let inbox = sb.get("messages.json?folder=inbox").await;
    assert_eq!(
        inbox["results"],
        json!([]),
        "a consumed reply is not in the inbox"
    );

    // Bob's reply matches no case: the router's default category (this
    // fixture's is "Nothing", whose exit ends the flow).
    sandbox
        .receive_message("tel:+250788000002", "purple")
        .unwrap();
    let run = sb.run_of(&bob).await;
    assert_eq!(run["values"]["color"]["category"], "Nothing");
    assert_eq!(run["values"]["color"]["value"], "purple");
    assert_eq!(run["exit_type"], "completed");
    assert_eq!(sb.texts_to(&bob).await.len(), 1);

    // With no waiting run, a message goes to the inbox.
    sandbox
        .receive_message("tel:+250788000002", "hello?")
        .unwrap();
    let inbox = sb.get("messages.json?folder=inbox").await;
    assert_eq!(inbox["results"][0]["text"], "hello?");
    assert_eq!(inbox["results"][0]["flow"], Value::Null);
    let flows = sb.get(&format!("flows.json?uuid={COLORS}")).await;
    assert_eq!(flows["results"][0]["runs"]["completed"], 2);
    assert_eq!(flows["results"][0]["runs"]["waiting"], 1);
}

#[tokio::test]
async fn a_survey_posts_both_answers_to_its_webhook_and_branches_on_the_status() {
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/survey"))
        .and(header("content-type", "application/json"))
        .and(header("user-agent", "Mailroom/26.3"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"ok": true})))
        .mount(&receiver)
        .await;
    Mock::given(method("POST"))
        .and(path("/broken"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&receiver)
        .await;

    let sb = Sb::start().await;
    let sandbox = sb.server.sandbox().clone();
    let mut export = survey_export();
    // The fixture's webhook URL names a host this test replaces.
    let url = export["flows"][0]["nodes"][4]["actions"][2]["url"]
        .as_str()
        .unwrap()
        .replace("http://receiver.invalid", &receiver.uri());
    export["flows"][0]["nodes"][4]["actions"][2]["url"] = json!(url);
    sandbox.load_flow_export(&export).unwrap();
    let ann = sb.contact("Ann Uwase", "tel:+250788000001", None).await;
    sb.start_flow(SURVEY, &ann, json!({"item": "ORS sachets"}))
        .await;
    assert_eq!(
        sb.texts_to(&ann).await,
        ["Hi Ann, how many ORS sachets are in stock?"]
    );

    // Not a number in range: the question is asked again.
    sandbox
        .receive_message("tel:+250788000001", "lots")
        .unwrap();
    assert_eq!(sb.run_of(&ann).await["exit_type"], Value::Null);
    sandbox
        .receive_message("tel:+250788000001", "42 boxes")
        .unwrap();
    sandbox.tick();
    let texts = sb.texts_to(&ann).await;
    assert_eq!(
        texts[1..],
        [
            "Please send a number between 0 and 10000.",
            "Got 42. Are any expired? (yes/no)"
        ]
    );
    assert!(sandbox.deliver_pending_webhooks().await.is_empty());

    // The last answer reaches the webhook: queued, the run waits for it.
    sandbox.receive_message("tel:+250788000001", "No.").unwrap();
    assert_eq!(sandbox.pending_webhooks(), 1);
    assert_eq!(sb.run_of(&ann).await["exit_type"], Value::Null);
    let calls = sandbox.deliver_pending_webhooks().await;
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].status, Some(200));
    assert_eq!(calls[0].url, format!("{}/survey?c={ann}", receiver.uri()));
    let received = receiver.received_requests().await.unwrap();
    assert_eq!(received.len(), 1);
    let body: Value = serde_json::from_slice(&received[0].body).unwrap();
    assert_eq!(
        body,
        json!({
            "contact": {"uuid": ann, "name": "Ann Uwase", "urn": "tel:+250788000001"},
            "flow": {"uuid": SURVEY, "name": "Stock survey"},
            "results": {
                "stock": {"value": "42", "category": "Valid"},
                "expired": {"value": "No", "category": "No"},
            }
        })
    );
    let run = sb.run_of(&ann).await;
    assert_eq!(run["exit_type"], "completed");
    assert_eq!(run["values"]["upload"]["value"], "200");
    assert_eq!(run["values"]["upload"]["category"], "Success");
    sandbox.tick();
    assert_eq!(
        sb.texts_to(&ann).await.last().map(String::as_str),
        Some("Thanks! Reference ok=true, status 200.")
    );
    let contact = &sb.get(&format!("contacts.json?uuid={ann}")).await["results"][0];
    assert_eq!(contact["fields"]["last_stock"], "42");
    assert_eq!(contact["groups"][0]["name"], "Reporters");
    assert_eq!(contact["flow"], Value::Null);

    // Every webhook pointed at a failing server: the Failure branch. The
    // reply goes through HTTP, whose handler delivers the webhook.
    sandbox
        .set_knobs(KnobsUpdate {
            webhook_url_override: Some(format!("{}/broken", receiver.uri())),
            ..KnobsUpdate::default()
        })
        .unwrap();
    let bob = sb.contact("Bob", "tel:+250788000002", None).await;
    sb.start_flow(SURVEY, &bob, json!({"item": "gloves"})).await;
    sandbox.receive_message("tel:+250788000002", "7").unwrap();
    let (status, answer) = sb
        .control(
            "inbound",
            json!({"urn": "tel:+250788000002", "text": "yes"}),
        )
        .await;
    assert_eq!((status, &answer["webhooks"]), (StatusCode::OK, &json!(1)));
    let run = sb.run_of(&bob).await;
    assert_eq!(run["values"]["expired"]["category"], "Yes");
    assert_eq!(run["values"]["upload"]["category"], "Failure");
    assert_eq!(run["exit_type"], "completed");
    sandbox.tick();
    assert_eq!(
        sb.texts_to(&bob).await.last().map(String::as_str),
        Some("Sorry, the upload failed (500).")
    );
    assert_eq!(sandbox.webhook_calls()[1].status, Some(500));
}

#[tokio::test]
async fn waiting_runs_expire_on_the_sandbox_clock_and_can_be_interrupted() {
    let sb = Sb::start().await;
    let sandbox = sb.server.sandbox().clone();
    sandbox.load_flow_export(&color_export()).unwrap();
    let ann = sb.contact("Ann", "tel:+250788000001", None).await;
    sb.start_flow(COLORS, &ann, json!({})).await;

    // The flow expires after 720 minutes of waiting.
    sandbox.advance_clock(Duration::from_secs(719 * 60));
    assert_eq!(sandbox.tick().expired_runs, 0);
    assert_eq!(sb.run_of(&ann).await["exit_type"], Value::Null);
    let (status, _) = sb.control("clock", json!({"advance_secs": 120})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sandbox.tick().expired_runs, 1);
    let run = sb.run_of(&ann).await;
    assert_eq!(run["exit_type"], "expired");
    assert!(run["exited_on"].is_string());
    sandbox
        .receive_message("tel:+250788000001", "orange")
        .unwrap();
    assert_eq!(
        sb.run_of(&ann).await["values"],
        json!({}),
        "an expired run takes no more input"
    );

    // Interruption through the control API.
    sb.start_flow(COLORS, &ann, json!({})).await;
    assert_eq!(sb.run_of(&ann).await["exit_type"], Value::Null);
    let (status, body) = sb.control("interrupt", json!({"contact": ann})).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"interrupted": 1})));
    assert_eq!(sb.run_of(&ann).await["exit_type"], "interrupted");
    assert_eq!(
        sandbox.interrupt_contact(&ann),
        0,
        "nothing left to interrupt"
    );

    // The explicit hook expires runs older than a given age.
    sb.start_flow(COLORS, &ann, json!({})).await;
    assert_eq!(sandbox.expire_waiting_runs(Duration::from_secs(3600)), 0);
    sandbox.advance_clock(Duration::from_secs(3601));
    assert_eq!(sandbox.expire_waiting_runs(Duration::from_secs(3600)), 1);
    assert_eq!(sb.run_of(&ann).await["exit_type"], "expired");
}

#[tokio::test]
async fn malformed_flows_end_their_runs_without_breaking_the_sandbox() {
    let sb = Sb::start().await;
    let sandbox = sb.server.sandbox().clone();
    let export = json!({"version": "13.0.0", "flows": [
        {"uuid": "0f9c8a4e-1111-4c2a-9a43-000000000001", "name": "Dangling", "type": "messaging",
         "nodes": [
            {"uuid": "n1", "actions": [{"type": "no_such_action"}, {"type": "send_msg"}, {"type": "enter_flow", "flow": {"uuid": "x"}}],
             "exits": [{"uuid": "e1", "destination_uuid": "missing"}]}]},
        {"uuid": "0f9c8a4e-1111-4c2a-9a43-000000000002", "name": "Broken router", "type": "messaging",
         "nodes": [
            {"uuid": "n1", "actions": [], "router": {"type": "switch", "operand": "@input",
              "cases": [{"type": "has_number_between", "arguments": ["x"], "category_uuid": "nope"}]},
             "exits": []}]},
        {"uuid": "0f9c8a4e-1111-4c2a-9a43-000000000003", "name": "Loop", "type": "messaging",
         "nodes": [{"uuid": "n1", "actions": [], "exits": [{"uuid": "e1", "destination_uuid": "n1"}]}]},
        {"uuid": "0f9c8a4e-1111-4c2a-9a43-000000000004", "name": "Empty", "type": "messaging", "nodes": []}
    ]});
    sandbox.load_flow_export(&export).unwrap();
    let ann = sb.contact("Ann", "tel:+250788000001", None).await;
    let mut exits = Vec::new();
    for n in 1..=4 {
        sb.start_flow(
            &format!("0f9c8a4e-1111-4c2a-9a43-00000000000{n}"),
            &ann,
            json!({}),
        )
        .await;
        exits.push(sb.run_of(&ann).await["exit_type"].clone());
    }
    assert_eq!(
        exits,
        [
            json!("completed"),
            json!("completed"),
            json!("failed"),
            json!("completed")
        ]
    );
    // The send_msg without text still sent (an empty message), nothing else.
    assert_eq!(sb.texts_to(&ann).await, [""]);
}

fn client_for(sb: &Sb, timeout: Duration) -> RapidProClient {
    RapidProClient::new(
        &url::Url::parse(sb.server.base_url()).unwrap(),
        &mhero::config::Secret::new(sb.server.token()),
        ClientOptions {
            timeout,
            max_retries: 0,
            backoff: Duration::from_millis(1),
            max_throttle_wait: Duration::from_secs(1),
        },
        Throttle::uniform(1_000_000),
    )
    .unwrap()
}

#[tokio::test]
async fn the_timeout_knob_hangs_requests_past_the_client_timeout() {
    let sb = Sb::start().await;
    let (status, knobs) = sb.control("knobs", json!({"timeout_rate": 1.0})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(knobs["timeout_rate"], 1.0);
    let client = client_for(&sb, Duration::from_millis(300));
    let began = std::time::Instant::now();
    let result = client.workspace().await;
    assert!(
        matches!(result, Err(RapidProError::Timeout(_))),
        "{result:?}"
    );
    assert!(began.elapsed() < Duration::from_secs(10));

    sb.server
        .sandbox()
        .set_knobs(KnobsUpdate {
            timeout_rate: Some(0.0),
            ..KnobsUpdate::default()
        })
        .unwrap();
    assert!(client.workspace().await.is_ok());

    for bad in [
        json!({"timeout_rate": 1.5}),
        json!({"drop_rate": -0.1}),
        json!({"webhook_url_override": "ftp://x"}),
    ] {
        let (status, _) = sb.control("knobs", bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
    assert_eq!(sb.server.sandbox().knobs().drop_rate, 0.0);
}

#[tokio::test]
async fn the_drop_knob_closes_connections_without_any_status() {
    let sb = Sb::start().await;
    let sandbox = sb.server.sandbox().clone();
    sandbox
        .set_knobs(KnobsUpdate {
            drop_rate: Some(1.0),
            ..KnobsUpdate::default()
        })
        .unwrap();
    let raw = sb
        .http
        .get(sb.server.api_url("workspace"))
        .header("Authorization", format!("Token {}", sb.server.token()))
        .send()
        .await;
    let error = raw.expect_err("no HTTP response at all");
    assert!(error.status().is_none());
    assert!(!error.is_timeout(), "{error:?}");

    let client = client_for(&sb, Duration::from_secs(5));
    let result = client.workspace().await;
    assert!(
        matches!(result, Err(RapidProError::Connection(_))),
        "{result:?}"
    );
    let calls = sandbox.calls();
    assert_eq!(calls.len(), 2);
    assert!(calls.iter().all(|c| c.status == 0));

    sandbox
        .set_knobs(KnobsUpdate {
            drop_rate: Some(0.0),
            ..KnobsUpdate::default()
        })
        .unwrap();
    assert!(client.workspace().await.is_ok());
}
