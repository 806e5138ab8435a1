//! Keeping the contact index current from the embedded FHIR store (issue
//! 6): N generated health workers (`MHERO_BENCH_PEOPLE`, default 100,000)
//! with one role each at one of 600 facilities, loaded into a temporary
//! SQLite store, then:
//!
//! 1. `mhero reindex`'s rebuild from the store (`rebuild`): people/s, with
//!    the store reads included (the index-only rate is in the
//!    `contact_index` benchmark);
//! 2. a follower pass with nothing new (the idle periodic pass);
//! 3. `MHERO_BENCH_CHANGED` people (default 1,000) renamed, then a pass;
//! 4. as many outbox entries (Communications) written for as many people,
//!    then a pass (last message status);
//! 5. one district renamed (everyone under it rewritten), then a pass;
//! 6. an audience: every match of one district (`references`).
//!
//! Reported: wall time, per changed person, and the peak RSS. Nothing
//! about time is asserted; the results are checked so a broken follower
//! cannot look fast. Run with `cargo bench --bench index_follow`.

#[path = "support/machine.rs"]
mod machine;
use machine::{cpu_model, env_usize, load_average, peak_rss_kib};

use std::sync::Arc;
use std::time::Instant;

use mhero::fhir::sample;
use mhero::index::tantivy::TantivyIndex;
use mhero::index::{ContactQuery, SharedIndex};
use mhero::jobs::index_sync::{IndexSync, rebuild};
use mhero::pipeline::phone::PhoneNormalizer;
use mhero::store::SharedStore;
use mhero::store::sqlite::SqliteStore;
use serde_json::json;

const FACILITIES_PER_DISTRICT: usize = 50;

async fn load(store: &SharedStore, resources: Vec<serde_json::Value>) {
    for chunk in resources.chunks(1000) {
        store
            .process_bundle(sample::transaction(chunk.to_vec()))
            .await
            .expect("load transaction");
    }
}

fn report(step: &str, seconds: f64, items: usize, what: &str) {
    if items == 0 {
        println!("  {step}: {:.1} ms", seconds * 1e3);
    } else {
        println!(
            "  {step}: {seconds:.2} s for {items} {what} = {:.0} µs each",
            seconds * 1e6 / items as f64
        );
    }
}

async fn run(people: usize, changed: usize) {
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore = Arc::new(
        SqliteStore::open(&dir.path().join("fhir.sqlite"))
            .await
            .unwrap(),
    );
    let facilities = sample::facility_ids(FACILITIES_PER_DISTRICT);
    let t = Instant::now();
    load(&store, sample::locations(FACILITIES_PER_DISTRICT)).await;
    load(&store, (1..=people).map(sample::practitioner).collect()).await;
    load(
        &store,
        (1..=people)
            .map(|n| sample::practitioner_role(n, &facilities))
            .collect(),
    )
    .await;
    println!(
        "  store loaded: {people} people and roles in {:.1} s (peak RSS so far {} MiB)",
        t.elapsed().as_secs_f64(),
        peak_rss_kib().map(|k| k / 1024).unwrap_or(0)
    );

    let index: SharedIndex = Arc::new(TantivyIndex::open(&dir.path().join("index")).unwrap());
    let phones = PhoneNormalizer::new(Some("LR")).unwrap();
    let t = Instant::now();
    let count = rebuild(&store, &index, &phones, |_| {}).await.unwrap();
    let seconds = t.elapsed().as_secs_f64();
    assert_eq!(count, people);
    println!(
        "  rebuild from the store: {seconds:.1} s = {:.0} people/s (peak RSS so far {} MiB)",
        people as f64 / seconds,
        peak_rss_kib().map(|k| k / 1024).unwrap_or(0)
    );

    let follower = IndexSync::new(
        Arc::clone(&store),
        Arc::clone(&index),
        phones,
        chrono::Duration::seconds(5),
        Default::default(),
    );
    // The first pass re-reads the rebuild's overlap once.
    follower.run_once().await.unwrap();
    let t = Instant::now();
    let idle = follower.run_once().await.unwrap();
    assert_eq!(idle.changes, 0);
    report("idle pass", t.elapsed().as_secs_f64(), 0, "");

    let step = (people / changed).max(1);
    let renamed: Vec<usize> = (1..=people).step_by(step).take(changed).collect();
    let resources = renamed
        .iter()
        .map(|&n| {
            let mut person = sample::practitioner(n);
            person["name"][0]["family"] = json!("Renamed");
            person
        })
        .collect();
    load(&store, resources).await;
    let t = Instant::now();
    let pass = follower.run_once().await.unwrap();
    assert_eq!(pass.updated, renamed.len());
    report(
        "pass after renames",
        t.elapsed().as_secs_f64(),
        renamed.len(),
        "people",
    );
    let found = index
        .search(&ContactQuery {
            q: Some("Renamed".into()),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(found.total, renamed.len());

    let messages = renamed
        .iter()
        .map(|&n| {
            json!({
                "resourceType": "Communication", "id": format!("out-{n}"), "status": "completed",
                "extension": [{ "url": mhero::pipeline::outbox::DELIVERY_EXTENSION, "valueString": "message" }],
                "recipient": [{ "reference": format!("Practitioner/HW{n:06}") }]
            })
        })
        .collect();
    load(&store, messages).await;
    let t = Instant::now();
    let pass = follower.run_once().await.unwrap();
    assert_eq!(pass.updated, renamed.len());
    report(
        "pass after outbox entries",
        t.elapsed().as_secs_f64(),
        renamed.len(),
        "messages",
    );

    let district = ContactQuery {
        location: Some("LR.2.1".into()),
        ..Default::default()
    };
    let under = index.references(&district).await.unwrap().len();
    let mut location = store.read("Location", "LR.2.1").await.unwrap().resource;
    location["name"] = json!("Northern District One");
    store
        .update("Location", "LR.2.1", location, None)
        .await
        .unwrap();
    let t = Instant::now();
    let pass = follower.run_once().await.unwrap();
    assert_eq!(pass.updated, under);
    report(
        "pass after a district rename",
        t.elapsed().as_secs_f64(),
        under,
        "people under it",
    );

    let t = Instant::now();
    let audience = index.references(&district).await.unwrap();
    assert_eq!(audience.len(), under);
    report(
        "audience of one district (references)",
        t.elapsed().as_secs_f64(),
        under,
        "people",
    );
    println!(
        "  peak RSS {} MiB",
        peak_rss_kib().map(|k| k / 1024).unwrap_or(0)
    );
}

fn main() {
    let people = env_usize("MHERO_BENCH_PEOPLE", 100_000);
    let changed = env_usize("MHERO_BENCH_CHANGED", 1_000);
    println!(
        "index follower benchmark: {people} people, {changed} changed; CPU {}, load {:?}",
        cpu_model(),
        load_average()
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(run(people, changed));
}
