//! Cost of the polling passes that bring RapidPro's answers back (issue 5):
//! the delivery poll over N sent messages and the inbound poll over N
//! replies, against the RapidPro sandbox in a *separate process* with
//! 20 ms of latency on every API call, and the embedded store.
//!
//! Run with `cargo bench --bench message_poll` (a release build). Set-up,
//! not timed: the sample country and N Practitioners, one request to the
//! whole country dispatched (N recipients, ceil(N/100) broadcasts), and,
//! for the inbound pass, every person given their contact's uuid and one
//! reply each in the sandbox inbox. Timed, each one `run_once()`:
//!
//! 1. delivery, **waiting**: RapidPro has not processed the broadcasts
//!    yet, so nothing moves (the cost of every pass while a send is out);
//! 2. delivery, **settling**: every message delivered, all N outbox
//!    Communications become `completed`;
//! 3. delivery, **idle**: nothing left open;
//! 4. inbound, **new**: N replies become Communications (sender, and
//!    `inResponseTo` the message sent to them);
//! 5. inbound, **overlap**: the same N read again through the overlap
//!    window, nothing written.
//!
//! Reported per pass: wall time, time per message, the connector's CPU time
//! (this process; the sandbox's own work, such as paging its in-memory
//! inbox, is in the wall time but not here), RapidPro calls by endpoint,
//! FHIR versions written, and the process's peak RSS at the end.
//! It checks each outcome and asserts nothing about time.
//!
//! - `MHERO_BENCH_MESSAGES` (10000): N.
//! - `MHERO_BENCH_LATENCY_MS` (20): sandbox latency per API call.

#[path = "support/machine.rs"]
mod machine;
use machine::{cpu_model, env_usize, load_average, peak_rss_kib, process_cpu_s};
#[path = "support/sandbox.rs"]
mod sandbox;
use sandbox::{
    calls_by_endpoint, client_for, country_request, load, start_sandbox, versions_since,
};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mhero::config::Settings;
use mhero::jobs::delivery_poll::DeliveryPoll;
use mhero::jobs::dispatch::Dispatcher;
use mhero::jobs::inbound_poll::InboundPoll;
use mhero::pipeline::phone::PhoneNormalizer;
use mhero::store::sqlite::SqliteStore;
use mhero::store::{SearchRequest, SharedStore};
use serde_json::{Value, json};

async fn count(store: &SharedStore, resource_type: &str, params: &[(&str, &str)]) -> u64 {
    let mut params: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    params.push(("_summary".into(), "count".into()));
    store
        .search(SearchRequest {
            resource_type: resource_type.into(),
            params,
            ..Default::default()
        })
        .await
        .unwrap()
        .total
        .unwrap_or(0)
}

/// Calls made since `before` (both from `calls_by_endpoint`).
fn calls_since(
    before: &BTreeMap<String, usize>,
    after: &BTreeMap<String, usize>,
) -> BTreeMap<String, usize> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

struct Bench {
    store: SharedStore,
    base: String,
    n: usize,
}

impl Bench {
    /// Times `pass`, and reports it with the calls and writes it made.
    async fn measure<F, Fut, R>(&self, name: &str, pass: F) -> (R, Value)
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = R>,
    {
        let calls_before = calls_by_endpoint(&self.base).await;
        let since = chrono::Utc::now() - chrono::Duration::milliseconds(1);
        let started = Instant::now();
        let cpu_before = process_cpu_s();
        let result = pass().await;
        let wall = started.elapsed();
        let cpu = process_cpu_s() - cpu_before;
        let writes = versions_since(self.store.as_ref(), since).await;
        let calls = calls_since(&calls_before, &calls_by_endpoint(&self.base).await);
        let total_calls: usize = calls.values().sum();
        let per_message_us = wall.as_secs_f64() * 1e6 / self.n as f64;
        println!(
            "  {name:<20} {:>7.2} s  {per_message_us:>6.0} µs/message  connector CPU {cpu:>5.2} s  {total_calls:>5} calls  {writes:>6} FHIR versions  {calls:?}",
            wall.as_secs_f64()
        );
        let figures = json!({
            "pass": name, "wall_s": wall.as_secs_f64(), "per_message_us": per_message_us, "connector_cpu_s": cpu,
            "calls": calls, "fhir_versions_written": writes,
        });
        (result, figures)
    }
}

async fn run(n: usize, latency_ms: u64) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    load(&sqlite, n).await;
    let store: SharedStore = Arc::new(sqlite);
    let (mut child, base) = start_sandbox(latency_ms);
    let client = client_for(&base);
    let mut settings = Settings::load_from(None, Some(Default::default())).unwrap();
    settings.messaging.organization_reference = "Organization/moh".into();
    store
        .update(
            "CommunicationRequest",
            "bench",
            country_request(
                "bench",
                "Please confirm you received the new malaria guidelines.",
            ),
            None,
        )
        .await
        .unwrap();
    let sent = Dispatcher::new(
        Arc::clone(&store),
        client.clone(),
        Arc::new(PhoneNormalizer::new(Some("LR")).unwrap()),
        settings.messaging.clone(),
    )
    .run_once()
    .await
    .unwrap();
    assert_eq!(sent.sent, n, "{sent:?}");

    let bench = Bench {
        store: Arc::clone(&store),
        base: base.clone(),
        n,
    };
    let http = reqwest::Client::new();
    let delivery = DeliveryPoll {
        store: Arc::clone(&store),
        client: client.clone(),
    };
    let mut figures = Vec::new();

    let (report, f) = bench
        .measure("delivery, waiting", || delivery.run_once())
        .await;
    let report = report.unwrap();
    assert_eq!((report.waiting, report.delivered), (n, 0), "{report:?}");
    figures.push(f);

    for _ in 0..4 {
        http.post(format!("{base}/_sandbox/tick"))
            .send()
            .await
            .unwrap();
    }
    let (report, f) = bench
        .measure("delivery, settling", || delivery.run_once())
        .await;
    let report = report.unwrap();
    assert_eq!(report.delivered, n, "{report:?}");
    assert_eq!(report.completed_requests, 1, "{report:?}");
    figures.push(f);

    let (report, f) = bench
        .measure("delivery, idle", || delivery.run_once())
        .await;
    assert_eq!(report.unwrap().broadcasts, 0);
    figures.push(f);

    // Every person knows their contact (as the contact sync writes it), and
    // each writes back once.
    let state: Value = http
        .get(format!("{base}/_sandbox/state"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let contacts = state["contacts"].as_array().unwrap();
    assert_eq!(contacts.len(), n);
    let mut entries = Vec::new();
    for contact in contacts {
        let urn = contact["urns"][0].as_str().unwrap();
        let number: usize = urn.trim_start_matches("tel:+2317").parse().unwrap();
        let id = format!("HW{:06}", number - 70_000_000);
        let mut person = store.read("Practitioner", &id).await.unwrap().resource;
        person["identifier"].as_array_mut().unwrap().push(
            json!({ "system": "http://app.rapidpro.io/contact-uuid", "value": contact["uuid"] }),
        );
        entries.push(json!({ "resource": person, "request": { "method": "PUT", "url": format!("Practitioner/{id}") } }));
        if entries.len() == 500 {
            let batch = std::mem::take(&mut entries);
            store
                .process_bundle(
                    json!({ "resourceType": "Bundle", "type": "transaction", "entry": batch }),
                )
                .await
                .unwrap();
        }
        http.post(format!("{base}/_sandbox/inbound"))
            .json(&json!({ "urn": urn, "text": "Received, thank you" }))
            .send()
            .await
            .unwrap();
    }
    if !entries.is_empty() {
        store
            .process_bundle(
                json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries }),
            )
            .await
            .unwrap();
    }
    let inbound = InboundPoll {
        store: Arc::clone(&store),
        client: client.clone(),
        settings: settings.messaging.clone(),
        overlap: Duration::from_secs(settings.rapidpro.contact_poll_overlap_secs),
    };
    let (report, f) = bench.measure("inbound, new", || inbound.run_once()).await;
    let report = report.unwrap();
    assert_eq!(
        (report.recorded, report.unknown_sender),
        (n, 0),
        "{report:?}"
    );
    assert_eq!(
        count(&store, "Communication", &[("sender:missing", "false")]).await,
        n as u64
    );
    figures.push(f);

    let (report, f) = bench
        .measure("inbound, overlap", || inbound.run_once())
        .await;
    let report = report.unwrap();
    assert_eq!((report.read, report.recorded), (n, 0), "{report:?}");
    figures.push(f);

    println!(
        "  peak RSS of the whole benchmark process (store loading included): {:?} MiB",
        peak_rss_kib().map(|k| k / 1024)
    );
    let _ = child.kill();
    let _ = child.wait();
    figures
}

fn main() {
    mhero::install_tls_provider();
    let n = env_usize("MHERO_BENCH_MESSAGES", 10_000);
    let latency_ms = env_usize("MHERO_BENCH_LATENCY_MS", 20) as u64;
    println!(
        "message polling benchmark: N = {n}, sandbox latency {latency_ms} ms; CPU {}, load {:?}",
        cpu_model(),
        load_average()
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let figures = runtime.block_on(run(n, latency_ms));
    if let Ok(path) = std::env::var("MHERO_BENCH_OUT") {
        std::fs::write(path, serde_json::to_vec_pretty(&figures).unwrap()).unwrap();
    }
}
