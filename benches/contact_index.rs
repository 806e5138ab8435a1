//! The embedded contact index (tantivy) at national scale (issue 6):
//! N generated health workers (`MHERO_BENCH_PEOPLE`, default 1,000,000)
//! spread over the sample country (4 regions, 12 districts, 50 facilities
//! each) and five jobs, indexed from scratch into a temporary directory.
//!
//! Reported: the build rate (documents/s, batches of 10,000 then one
//! commit), the latency of a filtered fuzzy search (a given name and a
//! family name with one letter wrong, within one cadre and one district:
//! 1,000 queries; the generated names repeat, so the person is one of
//! several equal matches) and of
//! statistics (by district within a cadre, and by cadre over everyone: 200
//! each), as p50/p99, the index size on disk and the process's peak RSS.
//! Targets (issue 6): >= 20,000 documents/s, search p99 <= 20 ms, stats
//! p99 <= 50 ms. Nothing about time is asserted; the result counts are
//! checked so a broken index cannot look fast.
//!
//! Run with `cargo bench --bench contact_index`.

#[path = "support/machine.rs"]
mod machine;
use machine::{cpu_model, env_usize, load_average, peak_rss_kib};

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mhero::fhir::sample;
use mhero::index::tantivy::TantivyIndex;
use mhero::index::{ContactDocument, ContactIndex, ContactQuery, JobRef, PlaceRef, StatsBy};
use serde_json::Value;

const FACILITIES_PER_DISTRICT: usize = 50;

/// id -> (name, level, parent)
fn places() -> HashMap<String, (String, String, Option<String>)> {
    sample::locations(FACILITIES_PER_DISTRICT)
        .into_iter()
        .map(|l| {
            let id = l["id"].as_str().unwrap().to_string();
            let level = l["type"][0]["coding"][0]["code"]
                .as_str()
                .unwrap()
                .to_string();
            let parent = l["partOf"]["reference"]
                .as_str()
                .map(|r| r.trim_start_matches("Location/").to_string());
            (id, (l["name"].as_str().unwrap().to_string(), level, parent))
        })
        .collect()
}

fn document(
    n: usize,
    facilities: &[String],
    places: &HashMap<String, (String, String, Option<String>)>,
) -> ContactDocument {
    let person: Value = sample::practitioner(n);
    let role = sample::practitioner_role(n, facilities);
    let coding = &role["code"][0]["coding"][0];
    let code = coding["code"].as_str().unwrap().to_string();
    let mut chain = Vec::new();
    let mut next = role["location"][0]["reference"]
        .as_str()
        .map(|r| r.trim_start_matches("Location/").to_string());
    while let Some(id) = next.take() {
        let (name, level, parent) = &places[&id];
        chain.push(PlaceRef {
            id: id.clone(),
            name: name.clone(),
            level: level.clone(),
        });
        next = parent.clone();
    }
    let name = &person["name"][0];
    ContactDocument {
        reference: format!("Practitioner/{}", person["id"].as_str().unwrap()),
        resource_type: "Practitioner".into(),
        id: person["id"].as_str().unwrap().into(),
        name: name["text"].as_str().map(str::to_string),
        names: vec![
            name["given"][0].as_str().unwrap().to_string(),
            name["family"].as_str().unwrap().to_string(),
        ],
        phones: vec![person["telecom"][0]["value"].as_str().unwrap().to_string()],
        urn_schemes: vec!["tel".into()],
        language: None,
        gender: person["gender"].as_str().map(str::to_string),
        active: true,
        opted_out: n % 50 == 0,
        rapidpro_contact: None,
        sync_state: "pending".into(),
        invalid_phones: 0,
        jobs: vec![JobRef {
            display: coding["display"].as_str().map(str::to_string),
            cadre: Some(code.clone()),
            cadre_display: None,
            code,
        }],
        places: chain,
        organizations: vec![],
        groups: vec![],
        last_message: None,
        // A third have replied, on one of the last 90 days.
        last_reply: (n % 3 == 0)
            .then(|| chrono::Utc::now() - chrono::Duration::days((n % 90) as i64)),
    }
}

fn percentiles(mut times: Vec<Duration>) -> (f64, f64) {
    times.sort();
    let at = |p: f64| {
        let i = ((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1;
        times[i].as_secs_f64() * 1000.0
    };
    (at(0.50), at(0.99))
}

fn dir_size(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

async fn run(people: usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index");
    let index = TantivyIndex::open(&path).unwrap();
    let facilities = sample::facility_ids(FACILITIES_PER_DISTRICT);
    let places = places();

    let started = Instant::now();
    let mut batch = Vec::with_capacity(10_000);
    for n in 1..=people {
        batch.push(document(n, &facilities, &places));
        if batch.len() == 10_000 {
            index.upsert(std::mem::take(&mut batch)).await.unwrap();
        }
    }
    index.upsert(batch).await.unwrap();
    index.commit(None).await.unwrap();
    let build = started.elapsed();
    assert_eq!(index.count().await.unwrap(), people as u64);
    println!(
        "  build: {people} documents in {:.1} s = {:.0} documents/s ({:.1} µs each); index {} MiB on disk",
        build.as_secs_f64(),
        people as f64 / build.as_secs_f64(),
        build.as_secs_f64() * 1e6 / people as f64,
        dir_size(&path) / (1024 * 1024)
    );

    // Filtered fuzzy search: a family name with its second letter changed,
    // within one cadre and one district.
    let mut times = Vec::new();
    let mut found = 0;
    let mut matched = true;
    for i in 0..1_000 {
        let doc = document(1 + (i * 7_919) % people, &facilities, &places);
        let family = &doc.names[1];
        // One letter wrong where the name is long enough to allow it (4+).
        let mut typo: Vec<char> = family.chars().collect();
        if typo.len() >= 4 {
            typo[1] = if typo[1] == 'x' { 'y' } else { 'x' };
        }
        let district = doc.places.iter().find(|p| p.level == "district").unwrap();
        let typo: String = typo.into_iter().collect();
        let query = ContactQuery {
            q: Some(format!("{} {typo}", doc.names[0])),
            cadre: doc.jobs[0].cadre.clone(),
            location: Some(district.id.clone()),
            page_size: 20,
            ..Default::default()
        };
        let t = Instant::now();
        let page = index.search(&query).await.unwrap();
        times.push(t.elapsed());
        found += page.contacts.iter().any(|c| c.reference == doc.reference) as usize;
        matched &= page.total > 0
            && page.contacts.iter().all(|c| {
                c.jobs[0].cadre == doc.jobs[0].cadre && c.places.iter().any(|p| p.id == district.id)
            });
    }
    assert!(matched, "a search returned someone outside its filters");
    let (p50, p99) = percentiles(times);
    println!(
        "  filtered fuzzy search: p50 {p50:.2} ms, p99 {p99:.2} ms (the person on the first page of 20 for {found} of 1000; every query matched: {matched})"
    );

    let mut by_district = Vec::new();
    let mut by_cadre = Vec::new();
    for i in 0..200 {
        let cadre = ["midwife", "nurse", "chw", "physician", "pa"][i % 5];
        let t = Instant::now();
        let counts = index
            .stats(
                &ContactQuery {
                    cadre: Some(cadre.into()),
                    ..Default::default()
                },
                StatsBy::District,
            )
            .await
            .unwrap();
        by_district.push(t.elapsed());
        assert_eq!(counts.len(), 12);
        let t = Instant::now();
        let counts = index
            .stats(&ContactQuery::default(), StatsBy::Cadre)
            .await
            .unwrap();
        by_cadre.push(t.elapsed());
        assert_eq!(counts.values().sum::<u64>(), people as u64);
    }
    let (d50, d99) = percentiles(by_district);
    let (c50, c99) = percentiles(by_cadre);
    println!(
        "  stats by district within a cadre: p50 {d50:.2} ms, p99 {d99:.2} ms; by cadre over everyone: p50 {c50:.2} ms, p99 {c99:.2} ms"
    );
    println!(
        "  peak RSS {} MiB",
        peak_rss_kib().map(|k| k / 1024).unwrap_or(0)
    );
}

fn main() {
    let people = env_usize("MHERO_BENCH_PEOPLE", 1_000_000);
    println!(
        "contact index benchmark: {people} people; CPU {}, load {:?}",
        cpu_model(),
        load_average()
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(run(people));
}
