//! Intake rate and latency of `POST /rapidpro/webhook` (docs/flow-results.md,
//! docs/performance.md): the real application on a loopback port with the
//! embedded store, and `MHERO_BENCH_CONCURRENCY` clients posting
//! `MHERO_BENCH_EVENTS` distinct resthook payloads (the recorded goflow
//! payload, each with its own run uuid) as fast as they are answered. Each
//! event is stored as a Basic, recorded as a QuestionnaireResponse and its
//! state updated before the answer. A second round posts the same events
//! again (duplicates: one read each). Reports events/s and latency
//! percentiles; asserts only that every answer was a 2xx (a benchmark of a
//! failing endpoint is worthless). Targets (issue 5): >= 2,000 events/s on
//! 2 cores, p99 <= 50 ms.
//!
//! Run with `cargo bench --bench webhook`.
//!
//! - `MHERO_BENCH_EVENTS` (5000)
//! - `MHERO_BENCH_CONCURRENCY` (32)

#[path = "support/machine.rs"]
mod machine;
use machine::{cpu_model, env_usize, load_average, peak_rss_kib};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mhero::config::Settings;
use mhero::startup::Application;
use serde_json::Value;

const TOKEN: &str = "bench-token";

fn payload_template() -> Value {
    let beside = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/rapidpro/webhook/goflow-resthook-payload-example.json");
    let path = if beside.exists() {
        beside
    } else {
        "/work/shared/fixtures/rapidpro/webhook/goflow-resthook-payload-example.json".into()
    };
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1000.0
}

async fn round(
    client: &reqwest::Client,
    url: &str,
    bodies: Arc<Vec<String>>,
    concurrency: usize,
) -> (Duration, Vec<Duration>, HashMap<u16, usize>) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, url, bodies, next) = (
            client.clone(),
            url.to_string(),
            Arc::clone(&bodies),
            Arc::clone(&next),
        );
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut statuses: HashMap<u16, usize> = HashMap::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(body) = bodies.get(i) else { break };
                let t = Instant::now();
                let response = client
                    .post(&url)
                    .header("authorization", format!("Token {TOKEN}"))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .expect("post");
                let status = response.status().as_u16();
                let _ = response.bytes().await;
                latencies.push(t.elapsed());
                *statuses.entry(status).or_default() += 1;
            }
            (latencies, statuses)
        }));
    }
    let mut latencies = Vec::new();
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for worker in workers {
        let (l, s) = worker.await.expect("worker");
        latencies.extend(l);
        for (k, v) in s {
            *statuses.entry(k).or_default() += v;
        }
    }
    let elapsed = started.elapsed();
    latencies.sort();
    (elapsed, latencies, statuses)
}

fn main() {
    let events = env_usize("MHERO_BENCH_EVENTS", 5000);
    let concurrency = env_usize("MHERO_BENCH_CONCURRENCY", 32);
    mhero::install_tls_provider();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = HashMap::from([
            ("MHERO__SERVER__LISTEN".to_string(), "127.0.0.1:0".to_string()),
            (
                "MHERO__FHIR__EMBEDDED__PATH".to_string(),
                dir.path().join("fhir.sqlite").display().to_string(),
            ),
            (
                "MHERO__INDEX__EMBEDDED__PATH".to_string(),
                dir.path().join("index").display().to_string(),
            ),
            ("MHERO__AUTH__WEBHOOK_TOKEN".to_string(), TOKEN.to_string()),
        ]);
        let settings = Settings::load_from(None, Some(env)).expect("settings");
        let app = Application::build(settings).await.expect("app");
        let base = app.fhir_base().trim_end_matches("/fhir").to_string();
        let shutdown = app.shutdown_token();
        let server = tokio::spawn(app.run_until_stopped());
        let url = format!("{base}/rapidpro/webhook");
        let template = payload_template();
        let bodies: Vec<String> = (0..events)
            .map(|i| {
                let mut body = template.clone();
                body["run"]["uuid"] = Value::String(format!("01969b47-113b-76f8-95cf-{i:012}"));
                body.to_string()
            })
            .collect();
        let bodies = Arc::new(bodies);
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(concurrency)
            .build()
            .expect("client");
        println!(
            "webhook intake: {events} events, {concurrency} concurrent clients; CPU {}, load {:?}",
            cpu_model(),
            load_average()
        );
        for (name, bodies) in [("new events", &bodies), ("duplicates", &bodies)] {
            let (elapsed, latencies, statuses) =
                round(&client, &url, Arc::clone(bodies), concurrency).await;
            let ok: usize = statuses
                .iter()
                .filter(|(s, _)| (200..300).contains(*s))
                .map(|(_, n)| n)
                .sum();
            assert_eq!(ok, events, "every answer a 2xx: {statuses:?}");
            println!(
                "  {name:<11} {:>8.0} events/s  p50 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms  ({:.2} s)",
                events as f64 / elapsed.as_secs_f64(),
                percentile(&latencies, 0.50),
                percentile(&latencies, 0.99),
                percentile(&latencies, 1.0),
                elapsed.as_secs_f64()
            );
        }
        println!("  peak RSS {:?} KiB", peak_rss_kib());
        shutdown.cancel();
        let _ = server.await;
    });
}
