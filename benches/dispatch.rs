//! Cost of sending one CommunicationRequest to N health workers
//! (`Dispatcher::run_once`) end to end: the embedded store, the RapidPro
//! client over real HTTP, and the RapidPro sandbox in a *separate process*
//! (`mhero rapidpro-sandbox`, so its memory is not counted as the
//! connector's) with 20 ms of latency on every call and the throttle out
//! of the way.
//!
//! Run with `cargo bench --bench dispatch` (a release build). For each N it
//! loads the sample country (`sample::locations`) and N Practitioners with
//! one PractitionerRole each into a temporary SQLite store, writes one
//! request addressed to the country's Location (so recipients are resolved
//! through the location hierarchy and the roles, the mCSD way), and times
//! one dispatcher pass from writing the request to every batch accepted by
//! RapidPro. The pass runs in a fresh child process (the benchmark re-runs
//! itself) so that its memory is the connector's alone, not the loading's.
//!
//! Reported per N: wall time and time per recipient, RapidPro calls by
//! endpoint (must be ceil(N/100) broadcasts), FHIR resource versions
//! written (from the store's history), process CPU time, and peak RSS of
//! the connector process (and its RSS when it started). It checks the outcome (every recipient
//! `in-progress`) and asserts nothing about time.
//!
//! Environment knobs:
//! - `MHERO_BENCH_RECIPIENTS` (`10000,100000`): the N to run.
//! - `MHERO_BENCH_LATENCY_MS` (20): sandbox latency per call.
//! - `MHERO_BENCH_CONCURRENCY` (4): `messaging.max_concurrent_calls`.
//! - `MHERO_BENCH_OUT` (unset): path of a JSON report.

#[path = "support/machine.rs"]
mod machine;
use machine::{cpu_model, env_usize, load_average, peak_rss_kib, process_cpu_s};
#[path = "support/sandbox.rs"]
mod sandbox;
use sandbox::{
    calls_by_endpoint, client_for, country_request, load, start_sandbox, versions_since,
};

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use mhero::config::Settings;
use mhero::jobs::dispatch::Dispatcher;
use mhero::pipeline::phone::PhoneNormalizer;
use mhero::store::sqlite::SqliteStore;
use mhero::store::{SearchRequest, SharedStore};
use serde_json::{Value, json};

/// Parent side: load the store, start the sandbox, run the dispatch in a
/// fresh child process (so its RSS is the connector's alone, not the
/// loading's), then check the outcome and count calls and writes.
async fn run(people: usize, latency_ms: u64, concurrency: usize) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fhir.sqlite");
    let load_started = Instant::now();
    {
        let sqlite = SqliteStore::open(&db).await.unwrap();
        load(&sqlite, people).await;
    }
    let load_time = load_started.elapsed();
    let (mut sandbox, base) = start_sandbox(latency_ms);
    let since = chrono::Utc::now() - chrono::Duration::milliseconds(1);

    let output = Command::new(std::env::current_exe().unwrap())
        .env("MHERO_BENCH_CHILD_DB", &db)
        .env("MHERO_BENCH_CHILD_SANDBOX", &base)
        .env("MHERO_BENCH_CONCURRENCY", concurrency.to_string())
        .output()
        .expect("the benchmark re-runs itself as the connector");
    let child: Value = serde_json::from_slice(
        output
            .stdout
            .split(|b| *b == b'\n')
            .rfind(|l| l.starts_with(b"{"))
            .unwrap_or_else(|| panic!("child said: {}", String::from_utf8_lossy(&output.stderr))),
    )
    .unwrap();

    let store: SharedStore = Arc::new(SqliteStore::open(&db).await.unwrap());
    assert_eq!(child["sent"], people, "every recipient accepted: {child}");
    let open = store
        .search(SearchRequest {
            resource_type: "Communication".into(),
            params: vec![
                ("status".into(), "in-progress".into()),
                ("_summary".into(), "count".into()),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .total;
    assert_eq!(open, Some(people as u64));
    let writes = versions_since(store.as_ref(), since).await;
    let calls = calls_by_endpoint(&base).await;
    let broadcasts = calls
        .get("POST /api/v2/broadcasts.json")
        .copied()
        .unwrap_or(0);
    let _ = sandbox.kill();
    let _ = sandbox.wait();

    let wall = child["wall_s"].as_f64().unwrap();
    let per_recipient_us = wall * 1e6 / people as f64;
    println!(
        "N = {people:>7}: {wall:>6.2} s wall ({per_recipient_us:.0} µs/recipient), {:.2} s CPU, \
         {broadcasts} broadcasts (ceil(N/100) = {}), {writes} FHIR versions written, \
         connector RSS {} MiB at start, peak {} MiB; load {load_time:.1?}; calls {calls:?}",
        child["cpu_s"].as_f64().unwrap_or(0.0),
        people.div_ceil(100),
        child["start_rss_mib"],
        child["peak_rss_mib"],
    );
    json!({
        "recipients": people,
        "wall_s": wall,
        "per_recipient_us": per_recipient_us,
        "cpu_s": child["cpu_s"],
        "broadcasts": broadcasts,
        "expected_broadcasts": people.div_ceil(100),
        "fhir_versions_written": writes,
        "start_rss_mib": child["start_rss_mib"],
        "peak_rss_mib": child["peak_rss_mib"],
        "rapidpro_calls": calls,
        "load_s": load_time.as_secs_f64(),
    })
}

/// Child side: the connector's part alone. Opens the loaded store, writes
/// the request and runs one dispatcher pass; prints its figures as JSON.
async fn dispatch_in_child(db: &str, base: &str, concurrency: usize) {
    let store: SharedStore = Arc::new(SqliteStore::open(std::path::Path::new(db)).await.unwrap());
    let client = client_for(base);
    let mut settings = Settings::load_from(None, Some(Default::default()))
        .unwrap()
        .messaging;
    settings.max_concurrent_calls = concurrency;
    let dispatcher = Dispatcher::new(
        Arc::clone(&store),
        client,
        Arc::new(PhoneNormalizer::new(Some("LR")).unwrap()),
        settings,
    );
    let start_rss = current_rss_kib();
    let cpu_before = process_cpu_s();
    let started = Instant::now();
    store
        .update(
            "CommunicationRequest",
            "bench",
            country_request(
                "bench",
                "National alert: report suspected cases to the district team today.",
            ),
            None,
        )
        .await
        .unwrap();
    let report = dispatcher.run_once().await.unwrap();
    let wall = started.elapsed();
    println!(
        "{}",
        json!({
            "sent": report.sent,
            "wall_s": wall.as_secs_f64(),
            "cpu_s": process_cpu_s() - cpu_before,
            "start_rss_mib": start_rss.map(|k| k / 1024),
            "peak_rss_mib": peak_rss_kib().map(|k| k / 1024),
        })
    );
}

/// Resident set size now, in KiB.
fn current_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn main() {
    mhero::install_tls_provider();
    if let (Ok(db), Ok(base)) = (
        std::env::var("MHERO_BENCH_CHILD_DB"),
        std::env::var("MHERO_BENCH_CHILD_SANDBOX"),
    ) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(dispatch_in_child(
            &db,
            &base,
            env_usize("MHERO_BENCH_CONCURRENCY", 4),
        ));
        return;
    }
    let recipients: Vec<usize> = std::env::var("MHERO_BENCH_RECIPIENTS")
        .unwrap_or_else(|_| "10000,100000".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let latency_ms = env_usize("MHERO_BENCH_LATENCY_MS", 20) as u64;
    let concurrency = env_usize("MHERO_BENCH_CONCURRENCY", 4);
    println!(
        "dispatch benchmark: sandbox latency {latency_ms} ms, {concurrency} calls in flight; CPU {}, load {:?}",
        cpu_model(),
        load_average()
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let results: Vec<Value> = recipients
        .iter()
        .map(|n| runtime.block_on(run(*n, latency_ms, concurrency)))
        .collect();
    if let Ok(path) = std::env::var("MHERO_BENCH_OUT") {
        let report = json!({ "latency_ms": latency_ms, "concurrency": concurrency, "runs": results, "cpu": cpu_model() });
        std::fs::write(path, serde_json::to_vec_pretty(&report).unwrap()).unwrap();
    }
}
