//! `mhero demo`: the iHRIS demo facilities, health workers and job
//! terminology (embedded from `config/demo/`, LGPL-3.0) loaded into an
//! embedded store (once; a second run finds them there), with made-up
//! Liberian mobile numbers for the workers who have no usable phone; the
//! RapidPro sandbox in-process with the mHero facility survey flow loaded;
//! the [`DemoResponder`], which answers messages and survey questions on the
//! health workers' behalf; and the banner with the API key, the URLs and
//! three commands to try.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::config::{Secret, Settings};
use crate::pipeline::contact;
use crate::pipeline::phone::PhoneNormalizer;
use crate::pipeline::request::{FLOW_PARAMS_EXTENSION, JOB_FILTER_EXTENSION};
use crate::rapidpro::sandbox::{Sandbox, SandboxServer, SandboxSettings, TickReport};
use crate::store::{FhirStore, SearchRequest, StoreError};

/// iHRIS demo country, regions, districts and facilities (Locations and
/// Organizations), a transaction Bundle.
pub const LOCATIONS_BUNDLE: &str =
    include_str!("../../config/demo/ihris-demo-locations-open.bundle.json");
/// iHRIS demo Practitioners and PractitionerRoles, a transaction Bundle.
pub const PRACTITIONERS_BUNDLE: &str =
    include_str!("../../config/demo/ihris-demo-practitioners-open.bundle.json");
/// iHRIS job/cadre CodeSystems and ValueSets, a collection Bundle.
pub const TERMINOLOGY_BUNDLE: &str =
    include_str!("../../config/demo/ihris-terminology-job-cadre.bundle.json");
/// The mHero facility survey, a RapidPro flow export (spec 13).
pub const SURVEY_FLOW_EXPORT: &str =
    include_str!("../../config/demo/flows/mhero_facility_survey_v13.json");
/// The survey's flow UUID (in [`SURVEY_FLOW_EXPORT`]).
pub const SURVEY_FLOW_UUID: &str = "4770818b-b91e-43a7-8781-a7ecb28a1d9e";

/// The district whose midwives the first banner command messages (Rushonga).
pub const MIDWIVES_DISTRICT: &str = "TF.W.RSH";
/// iHRIS job code "Nurse Midwife Aid".
pub const MIDWIFE_JOB_CODE: &str = "3232-2A";
const IHRIS_JOB_SYSTEM: &str = "http://ihris.org/fhir/CodeSystem/ihris-job";
/// The facility the survey command targets, and its name (a flow param).
pub const SURVEY_FACILITY: &str = "TF.N.MSZ.3";
pub const SURVEY_FACILITY_NAME: &str = "Musoza Hospital";
/// The ids of the two requests the banner's commands PUT.
pub const MIDWIVES_REQUEST_ID: &str = "demo-midwives";
pub const SURVEY_REQUEST_ID: &str = "demo-survey";

/// What can stop the demo data from loading.
#[derive(Debug, thiserror::Error)]
pub enum DemoDataError {
    #[error("the embedded demo data is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How many Practitioners the embedded demo data has.
pub fn demo_practitioner_count() -> usize {
    serde_json::from_str::<Value>(PRACTITIONERS_BUNDLE)
        .map(|bundle| {
            entries(&bundle)
                .filter(|e| e.pointer("/resource/resourceType") == Some(&json!("Practitioner")))
                .count()
        })
        .unwrap_or(0)
}

fn entries(bundle: &Value) -> impl Iterator<Item = &Value> {
    bundle
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// The made-up mobile number of the `n`th practitioner of the demo data:
/// `+231 77 000 1nnn` (a valid Liberian mobile number, deterministic).
pub fn demo_phone(n: usize) -> String {
    format!("+231 77 000 {:04}", 1000 + n % 9000)
}

/// Gives every Practitioner of `bundle` that has no phone number `phones`
/// can use a [`demo_phone`] (first, as a ranked mobile; the other numbers
/// are kept). Returns how many got one.
pub fn add_demo_phones(bundle: &mut Value, phones: &PhoneNormalizer) -> usize {
    let mut added = 0;
    let Some(list) = bundle.get_mut("entry").and_then(Value::as_array_mut) else {
        return 0;
    };
    let practitioners = list
        .iter_mut()
        .filter_map(|e| e.get_mut("resource"))
        .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some("Practitioner"));
    for (index, resource) in practitioners.enumerate() {
        let usable = contact::draft(resource, phones)
            .urns
            .iter()
            .any(|urn| urn.starts_with("tel:"));
        if usable {
            continue;
        }
        let Some(object) = resource.as_object_mut() else {
            continue;
        };
        let telecom = object.entry("telecom").or_insert_with(|| json!([]));
        if !telecom.is_array() {
            *telecom = json!([]);
        }
        if let Some(telecom) = telecom.as_array_mut() {
            telecom.insert(
                0,
                json!({"system": "phone", "value": demo_phone(index + 1), "use": "mobile", "rank": 1}),
            );
            added += 1;
        }
    }
    added
}

/// A collection Bundle as a transaction that PUTs each resource at its id.
fn as_transaction(bundle: &Value) -> Value {
    let entries: Vec<Value> = entries(bundle)
        .filter_map(|e| e.get("resource"))
        .filter_map(|r| {
            let url = format!(
                "{}/{}",
                r.get("resourceType")?.as_str()?,
                r.get("id")?.as_str()?
            );
            Some(json!({"fullUrl": url, "resource": r, "request": {"method": "PUT", "url": url}}))
        })
        .collect();
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

/// Loads the iHRIS demo data unless the store already has practitioners:
/// facilities, health workers (with [`add_demo_phones`]) and the job/cadre
/// terminology. Returns how many practitioners got a demo phone number
/// (None when the data was already there).
pub async fn load_demo_data(
    store: &dyn FhirStore,
    phones: &PhoneNormalizer,
) -> Result<Option<usize>, DemoDataError> {
    let existing = store
        .search(SearchRequest {
            resource_type: "Practitioner".into(),
            params: vec![("_summary".into(), "count".into())],
            ..Default::default()
        })
        .await?;
    if existing.total.unwrap_or(0) > 0 {
        return Ok(None);
    }
    let locations: Value = serde_json::from_str(LOCATIONS_BUNDLE)?;
    let mut people: Value = serde_json::from_str(PRACTITIONERS_BUNDLE)?;
    let terminology: Value = serde_json::from_str(TERMINOLOGY_BUNDLE)?;
    let added = add_demo_phones(&mut people, phones);
    store.process_bundle(as_transaction(&terminology)).await?;
    store.process_bundle(locations).await?;
    store.process_bundle(people).await?;
    Ok(Some(added))
}

/// The survey flow export (parsed from [`SURVEY_FLOW_EXPORT`]).
pub fn survey_export() -> Result<Value, serde_json::Error> {
    serde_json::from_str(SURVEY_FLOW_EXPORT)
}

/// The in-process RapidPro sandbox of the demo (Liberian workspace, throttle
/// raised so the first sync of the health workers is quick) with the survey
/// flow loaded.
pub async fn start_sandbox() -> std::io::Result<SandboxServer> {
    let mut settings = SandboxSettings::default()
        .with_throttle_rate(crate::rapidpro::sandbox::Rate::per_hour(360_000));
    settings.workspace.country = Some("LR".into());
    let server = SandboxServer::start(settings).await?;
    let export = survey_export().map_err(std::io::Error::other)?;
    server
        .sandbox()
        .load_flow_export(&export)
        .map_err(std::io::Error::other)?;
    Ok(server)
}

/// Point the connector at the sandbox (and read local numbers as Liberian).
pub fn point_at_sandbox(settings: &mut Settings, sandbox: &SandboxServer) {
    settings.rapidpro.base_url = sandbox.base_url().parse().ok();
    settings.rapidpro.token = Some(Secret::new(sandbox.token()));
    settings.rapidpro.rate_per_hour.v2 = 360_000;
    settings.rapidpro.rate_per_hour.contacts = 360_000;
    settings.rapidpro.rate_per_hour.messages = 360_000;
    settings.rapidpro.rate_per_hour.runs = 360_000;
    if settings.phone.default_country.is_none() {
        settings.phone.default_country = Some("LR".into());
    }
}

/// A fresh random API key for the demo unless `auth.api_keys` is set; the
/// key is added to the settings and returned (to be printed).
pub fn ensure_api_key(settings: &mut Settings) -> Option<String> {
    if !settings.auth.api_keys.is_empty() {
        return None;
    }
    let key = uuid::Uuid::new_v4().to_string();
    settings.auth.api_keys.push(Secret::new(key.clone()));
    Some(key)
}

/// The CommunicationRequest of the first banner command: a message to the
/// Nurse Midwife Aids of Rushonga district.
pub fn midwives_request() -> Value {
    json!({
        "resourceType": "CommunicationRequest",
        "id": MIDWIVES_REQUEST_ID,
        "status": "active",
        "recipient": [{"reference": format!("Location/{MIDWIVES_DISTRICT}")}],
        "extension": [{
            "url": JOB_FILTER_EXTENSION,
            "valueCoding": {"system": IHRIS_JOB_SYSTEM, "code": MIDWIFE_JOB_CODE, "display": "Nurse Midwife Aid"}
        }],
        "payload": [{"contentString": "Rushonga District Health Team: midwives meeting on Friday at 10:00 at Rushonga Hospital. Please attend."}]
    })
}

/// The CommunicationRequest of the second banner command: the facility
/// survey for the health workers of one facility.
pub fn survey_request() -> Value {
    json!({
        "resourceType": "CommunicationRequest",
        "id": SURVEY_REQUEST_ID,
        "status": "active",
        "recipient": [{"reference": format!("Location/{SURVEY_FACILITY}")}],
        "payload": [{
            "contentReference": {"reference": format!("Basic/{SURVEY_FLOW_UUID}")},
            "extension": [{
                "url": FLOW_PARAMS_EXTENSION,
                "extension": [{"url": "facility", "valueString": SURVEY_FACILITY_NAME}]
            }]
        }]
    })
}

/// The banner: the API address and key, the sandbox and its token, and
/// exactly three commands (send to midwives, start the survey, watch). With
/// `api_key` None (keys configured), the commands read `$MHERO_API_KEY`.
pub fn banner(fhir_base: &str, api_key: Option<&str>, sandbox: Option<&SandboxServer>) -> String {
    let base = fhir_base.trim_end_matches("/fhir");
    let (key_line, key) = match api_key {
        Some(key) => (key.to_string(), key.to_string()),
        None => (
            "one of auth.api_keys (export MHERO_API_KEY=... for the commands below)".to_string(),
            "$MHERO_API_KEY".to_string(),
        ),
    };
    let auth = format!("-H \"Authorization: Bearer {key}\"");
    let put = |id: &str, body: &Value| {
        format!(
            "curl -s -X PUT {auth} -H 'Content-Type: application/fhir+json' \
             '{fhir_base}/CommunicationRequest/{id}' -d '{body}'"
        )
    };
    let midwives = put(MIDWIVES_REQUEST_ID, &midwives_request());
    let survey = put(SURVEY_REQUEST_ID, &survey_request());
    let mut watch = format!(
        "curl -s {auth} \
         '{fhir_base}/Communication?based-on=CommunicationRequest/{MIDWIVES_REQUEST_ID}' \
         '{fhir_base}/Communication?based-on=CommunicationRequest/{SURVEY_REQUEST_ID}'"
    );
    let rapidpro = match sandbox {
        Some(sandbox) => {
            watch.push_str(&format!(
                " --next -s -H 'Authorization: Token {token}' '{url}/api/v2/runs.json?flow={SURVEY_FLOW_UUID}'",
                url = sandbox.base_url(),
                token = sandbox.token()
            ));
            format!(
                "\n  RapidPro sandbox: {url} (token {token}); the health workers are synced to it as contacts,\n  \
                 and the demo answers messages and survey questions on their behalf after a few seconds.\n",
                url = sandbox.base_url(),
                token = sandbox.token()
            )
        }
        None => String::new(),
    };
    format!(
        "mHero connector demo is running.\n\
         \n  FHIR API:        {fhir_base}\n  API key:         {key_line}\n  Health:          {base}/health/ready\n\
         {rapidpro}\
         \n1. Message the Nurse Midwife Aids of Rushonga district:\n  {midwives}\n\
         \n2. Start the facility survey for the health workers of {SURVEY_FACILITY_NAME}:\n  {survey}\n\
         \n3. Watch each recipient's status, and the survey answers:\n  {watch}\n\
         \nStop with Ctrl-C."
    )
}

/// How long a run waits before the responder answers for the contact.
pub const REPLY_AFTER: Duration = Duration::from_secs(3);
/// How often the spawned responder works.
pub const RESPONDER_EVERY: Duration = Duration::from_secs(2);
/// At most this many answers per run (a flow that keeps asking again,
/// e.g. because it wants an answer the responder cannot guess, is left).
const MAX_REPLIES_PER_RUN: usize = 3;

/// What one [`DemoResponder::run_once`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponderPass {
    pub tick: TickReport,
    /// Answers sent on the contacts' behalf.
    pub replies: usize,
    /// Webhook and resthook calls made.
    pub webhooks: usize,
}

/// Plays the health workers in the in-process sandbox: processes
/// broadcasts and flow starts, sends queued messages, answers every run
/// that has waited [`REPLY_AFTER`] for a reply with a plausible answer for
/// the question it waits at (the first word of a word test, mostly the
/// first case's, a number in range for a number test, read from the flow
/// definitions it was given; "yes" at a node it does not know), and
/// delivers the webhooks the runs reach.
pub struct DemoResponder {
    sandbox: Sandbox,
    reply_after: chrono::Duration,
    /// Waiting node UUID -> the answers its cases accept, in case order.
    answers: HashMap<String, Vec<Answer>>,
    /// Run UUID -> answers sent.
    replied: HashMap<String, usize>,
}

#[derive(Debug, Clone)]
enum Answer {
    Text(String),
    /// An integer in `lo..=hi`.
    Number {
        lo: i64,
        hi: i64,
    },
}

impl DemoResponder {
    /// A responder for `sandbox`, knowing the waits of the flows in `exports`.
    pub fn new(sandbox: Sandbox, exports: &[Value], reply_after: Duration) -> Self {
        let mut answers = HashMap::new();
        let nodes = exports
            .iter()
            .filter_map(|e| e.get("flows").and_then(Value::as_array))
            .flatten()
            .filter_map(|f| f.get("nodes").and_then(Value::as_array))
            .flatten();
        for node in nodes {
            let (Some(uuid), Some(router)) = (node["uuid"].as_str(), node.get("router")) else {
                continue;
            };
            if router.get("wait").is_none() {
                continue;
            }
            let cases: Vec<Answer> = router["cases"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(case_answer)
                .collect();
            answers.insert(uuid.to_string(), cases);
        }
        DemoResponder {
            sandbox,
            reply_after: chrono::Duration::from_std(reply_after)
                .unwrap_or(chrono::Duration::seconds(3)),
            answers,
            replied: HashMap::new(),
        }
    }

    /// One pass at `now`: tick, answer the runs that have waited long
    /// enough, deliver webhooks.
    pub async fn run_once(&mut self, now: DateTime<Utc>) -> ResponderPass {
        let tick = self.sandbox.tick();
        let state = self.sandbox.state();
        let mut due = Vec::new();
        for run in state["runs"].as_array().into_iter().flatten() {
            let waiting = &run["waiting_for"];
            if waiting["waiting_for"] != "msg" || !run["exit_type"].is_null() {
                continue;
            }
            let (Some(uuid), Some(urn), Some(node), Some(modified)) = (
                run["uuid"].as_str(),
                run["contact"]["urn"].as_str(),
                waiting["node"].as_str(),
                run["modified_on"]
                    .as_str()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok()),
            ) else {
                continue;
            };
            if modified.with_timezone(&Utc) + self.reply_after > now {
                continue;
            }
            let count = self.replied.entry(uuid.to_string()).or_insert(0);
            if *count >= MAX_REPLIES_PER_RUN {
                continue;
            }
            *count += 1;
            let contact = run["contact"]["uuid"].as_str().unwrap_or(uuid);
            let text = self.answer(node, contact);
            due.push((urn.to_string(), text));
        }
        let mut replies = 0;
        for (urn, text) in due {
            match self.sandbox.receive_message(&urn, &text) {
                Ok(_) => replies += 1,
                Err(e) => {
                    tracing::debug!(error = %crate::telemetry::redact_phones(&e), "demo responder: reply refused")
                }
            }
        }
        // Forget finished runs.
        let open: std::collections::HashSet<&str> = state["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["exit_type"].is_null())
            .filter_map(|r| r["uuid"].as_str())
            .collect();
        self.replied.retain(|uuid, _| open.contains(uuid.as_str()));
        let webhooks = self.sandbox.deliver_pending_webhooks().await.len();
        ResponderPass {
            tick,
            replies,
            webhooks,
        }
    }

    fn answer(&self, node: &str, contact: &str) -> String {
        let h = stable_hash(&format!("{contact}/{node}"));
        let Some(cases) = self.answers.get(node).filter(|c| !c.is_empty()) else {
            return "yes".to_string();
        };
        // Mostly the first case ("yes"), one contact in five another one.
        let pick = if cases.len() > 1 && h % 5 == 0 {
            &cases[1 + (h / 5) as usize % (cases.len() - 1)]
        } else {
            &cases[0]
        };
        match pick {
            Answer::Text(text) => text.clone(),
            Answer::Number { lo, hi } => {
                let span = (hi - lo).clamp(0, 480) as u64;
                (lo + ((h / 7) % (span + 1)) as i64).to_string()
            }
        }
    }

    /// Runs [`DemoResponder::run_once`] every `every` until `stop` is cancelled.
    pub fn spawn(
        mut self,
        every: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    pass = self.run_once(Utc::now()) => {
                        if pass.replies > 0 {
                            tracing::info!(replies = pass.replies, "demo responder answered for health workers");
                        }
                    }
                }
            }
        })
    }
}

/// The answer a router case accepts, if the responder can make one up.
fn case_answer(case: &Value) -> Option<Answer> {
    let arg = |i: usize| case["arguments"].get(i).and_then(Value::as_str);
    let number = |i: usize| arg(i).and_then(|a| a.trim().parse::<f64>().ok());
    let text = |s: &str| Some(Answer::Text(s.to_string()));
    match case["type"].as_str()? {
        "has_any_word" => text(arg(0)?.split_whitespace().next()?),
        "has_all_words" | "has_phrase" | "has_only_phrase" | "has_only_text" | "has_beginning" => {
            let words = arg(0)?.trim();
            if words.is_empty() { None } else { text(words) }
        }
        "has_text" => text("ok"),
        "has_number" => Some(Answer::Number { lo: 1, hi: 100 }),
        "has_number_between" => {
            let (lo, hi) = (number(0)?.ceil(), number(1)?.floor());
            (lo <= hi).then_some(Answer::Number {
                lo: lo as i64,
                hi: hi as i64,
            })
        }
        "has_number_lt" => number(0).map(|n| exact(n.ceil() - 1.0)),
        "has_number_gt" => number(0).map(|n| exact(n.floor() + 1.0)),
        "has_number_lte" | "has_number_gte" | "has_number_eq" => number(0).map(exact),
        _ => None,
    }
}

fn exact(n: f64) -> Answer {
    let n = n as i64;
    Answer::Number { lo: n, hi: n }
}

/// FNV-1a: the same answers on every run of the demo.
fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::request::{Delivery, MessageRequest, RecipientRef};

    fn lr() -> PhoneNormalizer {
        PhoneNormalizer::new(Some("LR")).unwrap()
    }

    #[test]
    fn every_demo_practitioner_gets_a_valid_unique_phone() {
        let mut bundle: Value = serde_json::from_str(PRACTITIONERS_BUNDLE).unwrap();
        let phones = lr();
        let added = add_demo_phones(&mut bundle, &phones);
        assert_eq!(
            added,
            demo_practitioner_count(),
            "no iHRIS demo phone is usable"
        );
        assert_eq!(demo_practitioner_count(), 65);
        let mut urns = std::collections::HashSet::new();
        for resource in entries(&bundle).map(|e| &e["resource"]) {
            if resource["resourceType"] != "Practitioner" {
                continue;
            }
            let draft = contact::draft(resource, &phones);
            let urn = draft.urns.first().expect("a usable phone").clone();
            assert!(urn.starts_with("tel:+23177000"), "{urn}");
            assert!(urns.insert(urn), "phones are unique");
        }
        // Deterministic, and a second pass adds nothing.
        assert_eq!(add_demo_phones(&mut bundle, &phones), 0);
        assert_eq!(phones.tel_urn(&demo_phone(1)).unwrap(), "tel:+231770001001");
    }

    #[test]
    fn the_banner_requests_are_valid_and_name_demo_data() {
        let locations: Value = serde_json::from_str(LOCATIONS_BUNDLE).unwrap();
        let ids: Vec<&str> = entries(&locations)
            .filter_map(|e| e["resource"]["id"].as_str())
            .collect();
        let midwives = MessageRequest::parse(&midwives_request()).unwrap();
        assert_eq!(midwives.job_filter[0].code, MIDWIFE_JOB_CODE);
        assert!(matches!(midwives.deliveries[0], Delivery::Message(_)));
        let survey = MessageRequest::parse(&survey_request()).unwrap();
        assert!(matches!(
            &survey.deliveries[0],
            Delivery::Flow { uuid, params, .. } if uuid == SURVEY_FLOW_UUID && params["facility"] == SURVEY_FACILITY_NAME
        ));
        for parsed in [&midwives, &survey] {
            let RecipientRef::Literal { id, .. } = &parsed.recipients[0] else {
                panic!("a literal reference")
            };
            assert!(ids.contains(&id.as_str()), "{id} is in the demo data");
        }
        let export = survey_export().unwrap();
        assert_eq!(export["flows"][0]["uuid"], SURVEY_FLOW_UUID);
        // The midwife code is used in the demo data at that district.
        assert!(PRACTITIONERS_BUNDLE.contains(MIDWIFE_JOB_CODE));

        let banner = banner("http://127.0.0.1:9/fhir", Some("k-123"), None);
        assert_eq!(banner.matches("curl ").count(), 3, "{banner}");
        assert_eq!(banner.matches("Bearer k-123").count(), 3, "{banner}");
        let configured = banner_without_key();
        assert!(configured.contains("$MHERO_API_KEY") && !configured.contains("k-123"));
    }

    fn banner_without_key() -> String {
        banner("http://127.0.0.1:9/fhir", None, None)
    }

    async fn post(server: &SandboxServer, endpoint: &str, body: Value) -> Value {
        reqwest::Client::new()
            .post(server.api_url(endpoint))
            .header("Authorization", format!("Token {}", server.token()))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn the_responder_answers_the_survey_until_it_completes() {
        crate::install_tls_provider();
        let server = start_sandbox().await.unwrap();
        let contact = post(
            &server,
            "contacts",
            json!({"name": "Musu Flomo", "urns": ["tel:+231770001001"]}),
        )
        .await["uuid"]
            .as_str()
            .unwrap()
            .to_string();
        post(
            &server,
            "flow_starts",
            json!({"flow": SURVEY_FLOW_UUID, "contacts": [contact], "params": {"facility": SURVEY_FACILITY_NAME}}),
        )
        .await;
        let mut responder = DemoResponder::new(
            server.sandbox().clone(),
            &[survey_export().unwrap()],
            REPLY_AFTER,
        );
        let run = |s: &Sandbox| s.state()["runs"][0].clone();

        // The start is processed; the run has not waited long enough yet.
        let first = responder.run_once(Utc::now()).await;
        assert_eq!(first.tick.flow_starts, 1);
        assert_eq!(first.replies, 0, "nobody answers before {REPLY_AFTER:?}");
        assert_eq!(run(server.sandbox())["waiting_for"]["waiting_for"], "msg");

        let later = Utc::now() + chrono::Duration::hours(1);
        assert_eq!(responder.run_once(later).await.replies, 1);
        let after_first = run(server.sandbox());
        assert!(after_first["exit_type"].is_null(), "{after_first}");
        assert_eq!(responder.run_once(later).await.replies, 1);
        let done = run(server.sandbox());
        assert_eq!(done["exit_type"], "completed", "{done}");
        let still = done["values"]["still_at_facility"]["category"].as_str();
        assert!(matches!(still, Some("Yes" | "No")), "{done}");
        assert_eq!(done["values"]["ors_stock"]["category"], "Valid", "{done}");
        let stock: i64 = done["values"]["ors_stock"]["value"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((0..=100_000).contains(&stock));
        // Nothing left to answer; the thanks goes out on the next tick.
        let last = responder.run_once(later).await;
        assert_eq!(last.replies, 0);
        assert!(last.tick.messages >= 1);
        let texts: Vec<String> = server.sandbox().state()["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["direction"] == "out")
            .filter_map(|m| m["text"].as_str().map(str::to_string))
            .collect();
        assert!(
            texts.iter().any(|t| t.contains("Musoza Hospital")),
            "{texts:?}"
        );
        assert!(
            texts
                .iter()
                .any(|t| t.contains(&format!("recorded {stock} ORS"))),
            "{texts:?}"
        );
        server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn the_spawned_responder_stops_on_cancel() {
        let sandbox = Sandbox::new(SandboxSettings::default());
        let stop = CancellationToken::new();
        let task = DemoResponder::new(sandbox, &[], REPLY_AFTER)
            .spawn(Duration::from_millis(10), stop.clone());
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops")
            .expect("no panic");
    }
}
