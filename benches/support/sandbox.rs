//! The RapidPro sandbox in its own process and the sample country, shared by
//! the benchmarks that talk to RapidPro (`dispatch`, `message_poll`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use mhero::config::Secret;
use mhero::fhir::sample;
use mhero::rapidpro::client::{ClientOptions, RapidProClient};
use mhero::rapidpro::throttle::Throttle;
use mhero::store::sqlite::SqliteStore;
use mhero::store::{FhirStore, HistoryRequest};
use serde_json::{Value, json};

/// Facilities per district of the sample country.
pub const FACILITIES_PER_DISTRICT: usize = 4;

/// `mhero rapidpro-sandbox` in its own process; returns it and its base URL.
pub fn start_sandbox(latency_ms: u64) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mhero"))
        .args([
            "rapidpro-sandbox",
            "--listen",
            "127.0.0.1:0",
            "--throttle-rate",
            "100000000/hour",
            "--latency-ms",
            &latency_ms.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the mhero binary runs the sandbox");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
    let line = lines
        .find(|l| l.contains("listening on"))
        .expect("the sandbox prints its address");
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .trim_end_matches("/api/v2/")
        .to_string();
    std::thread::spawn(move || lines.count());
    (child, base)
}

/// The sample country and `people` Practitioners with one role each.
pub async fn load(store: &SqliteStore, people: usize) {
    store
        .process_bundle(sample::transaction(sample::locations(
            FACILITIES_PER_DISTRICT,
        )))
        .await
        .unwrap();
    let facilities = sample::facility_ids(FACILITIES_PER_DISTRICT);
    for first in (1..=people).step_by(500) {
        let last = (first + 499).min(people);
        let mut resources = Vec::with_capacity(1000);
        for n in first..=last {
            resources.push(sample::practitioner(n));
            resources.push(sample::practitioner_role(n, &facilities));
        }
        store
            .process_bundle(sample::transaction(resources))
            .await
            .unwrap();
    }
}

/// FHIR resource versions written since `since` (from the store's history).
pub async fn versions_since(store: &dyn FhirStore, since: chrono::DateTime<chrono::Utc>) -> u64 {
    store
        .history(HistoryRequest {
            since: Some(since),
            count: Some(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .total
        .unwrap_or(0)
}

/// The sandbox's calls so far, counted by `METHOD path`.
pub async fn calls_by_endpoint(base: &str) -> BTreeMap<String, usize> {
    let calls: Value = reqwest::get(format!("{base}/_sandbox/calls"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut counts = BTreeMap::new();
    for call in calls["calls"].as_array().into_iter().flatten() {
        let key = format!(
            "{} {}",
            call["method"].as_str().unwrap_or("?"),
            call["path"].as_str().unwrap_or("?")
        );
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

/// A client of the sandbox at `base`, with the throttle out of the way.
pub fn client_for(base: &str) -> RapidProClient {
    mhero::install_tls_provider();
    RapidProClient::new(
        &base.parse().unwrap(),
        &Secret::new("sandbox-token"),
        ClientOptions::default(),
        Throttle::uniform(u32::MAX),
    )
    .unwrap()
}

/// An active request `id` to everyone in the sample country.
pub fn country_request(id: &str, text: &str) -> Value {
    json!({ "resourceType": "CommunicationRequest", "id": id, "status": "active",
        "recipient": [{ "reference": "Location/LR" }],
        "payload": [{ "contentString": text }] })
}
