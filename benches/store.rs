//! Throughput and latency of the embedded FHIR store (`SqliteStore`) at
//! the size of a national health-worker registry.
//!
//! Run with `cargo bench --bench store` (a release build). It loads the
//! sample location hierarchy (`sample::locations(5)`), then N Practitioners
//! and their N PractitionerRoles, and measures:
//!
//! 1. create rate through `FhirStore::update` (create-on-update with the
//!    sample ids) from a bounded number of concurrent tasks, and through
//!    `process_bundle` transactions of 1,000 entries (into a second
//!    database, so both paths start from the same state);
//! 2. read rate: random `read("Practitioner", id)` from concurrent tasks;
//! 3. sequential search latency: `name=<prefix>`, `identifier=system|value`
//!    and `PractitionerRole?location=...&_include=PractitionerRole:practitioner`.
//!
//! It prints a table and, if `MHERO_BENCH_OUT` is set, writes the figures
//! as JSON to that path. Nothing is asserted: the project's targets are
//! printed beside the figures.
//!
//! Environment knobs:
//!
//! - `MHERO_BENCH_PEOPLE` (100000): number of Practitioners (and roles).
//! - `MHERO_BENCH_CONCURRENCY` (8): concurrent tasks for writes and reads.
//! - `MHERO_BENCH_READS` (20000): number of timed reads.
//! - `MHERO_BENCH_QUERIES` (2000): timed queries per search kind.
//! - `MHERO_BENCH_SEARCH_BUDGET_S` (90): stop a search kind early after
//!   this many seconds (the number actually run is reported).
//! - `MHERO_BENCH_SKIP_BUNDLE` (unset): set to 1 to skip the transaction path.
//! - `MHERO_BENCH_KEEP` (unset): set to 1 to keep the databases for
//!   inspection (e.g. `EXPLAIN QUERY PLAN` in the sqlite3 CLI).
//! - `MHERO_BENCH_OUT` (unset): path of the JSON report.

#[path = "support/machine.rs"]
mod machine;
use machine::{cpu_model, env_usize, load_average, peak_rss_kib};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mhero::fhir::sample;
use mhero::store::sqlite::SqliteStore;
use mhero::store::{FhirStore, SearchRequest, WriteKind};
use serde_json::{Value, json};

const TARGET_CREATE_PER_S: f64 = 2_000.0;
const TARGET_READ_PER_S: f64 = 10_000.0;
const TARGET_SEARCH_P99_MS: f64 = 20.0;
const FACILITIES_PER_DISTRICT: usize = 5;
const BUNDLE_ENTRIES: usize = 1_000;
const EMPLOYEE_SYSTEM: &str = "http://ihris.org/fhir/id/employee";

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// A small deterministic generator (splitmix64), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-enough in `0..n` for a benchmark.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Latency statistics of a list of durations, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    n: usize,
    mean_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn stats(samples: &mut [Duration]) -> Stats {
    if samples.is_empty() {
        return Stats::default();
    }
    samples.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1_000.0;
    // Nearest-rank percentiles.
    let rank = |p: f64| {
        let r = (p * samples.len() as f64).ceil() as usize;
        samples[r.clamp(1, samples.len()) - 1]
    };
    let total: Duration = samples.iter().sum();
    Stats {
        n: samples.len(),
        mean_ms: ms(total) / samples.len() as f64,
        p50_ms: ms(rank(0.50)),
        p99_ms: ms(rank(0.99)),
        max_ms: ms(samples[samples.len() - 1]),
    }
}

fn stats_json(s: &Stats) -> Value {
    json!({ "n": s.n, "mean_ms": s.mean_ms, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "max_ms": s.max_ms })
}

/// Size of the database with its WAL, in MiB.
fn db_size_mib(path: &std::path::Path) -> f64 {
    let mut bytes = 0;
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        bytes += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
    }
    bytes as f64 / (1024.0 * 1024.0)
}

/// Practitioner ids are 1-based: `HW000001`...
fn practitioner_id(n: usize) -> String {
    format!("HW{n:06}")
}

async fn load_locations(store: &SqliteStore) {
    for location in sample::locations(FACILITIES_PER_DISTRICT) {
        let id = location["id"].as_str().expect("sample ids").to_string();
        store
            .update("Location", &id, location, None)
            .await
            .expect("location write");
    }
}

struct CreateResult {
    items: usize,
    elapsed: Duration,
    latencies: Stats,
}

/// Practitioner `n` and its role through `update`, `concurrency` tasks.
async fn create_with_update(
    store: Arc<SqliteStore>,
    people: usize,
    concurrency: usize,
) -> CreateResult {
    let facilities = Arc::new(sample::facility_ids(FACILITIES_PER_DISTRICT));
    let next = Arc::new(AtomicUsize::new(1));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (store, facilities, next) = (
            Arc::clone(&store),
            Arc::clone(&facilities),
            Arc::clone(&next),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(2 * people / concurrency + 2);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n > people {
                    break;
                }
                let practitioner = sample::practitioner(n);
                let role = sample::practitioner_role(n, &facilities);
                let id = practitioner_id(n);
                let t = Instant::now();
                let out = store
                    .update("Practitioner", &id, practitioner, None)
                    .await
                    .expect("practitioner write");
                latencies.push(t.elapsed());
                assert_eq!(out.kind, WriteKind::Created, "{id} should be new");
                let role_id = format!("{id}-role");
                let t = Instant::now();
                let out = store
                    .update("PractitionerRole", &role_id, role, None)
                    .await
                    .expect("role write");
                latencies.push(t.elapsed());
                assert_eq!(out.kind, WriteKind::Created, "{role_id} should be new");
            }
            latencies
        }));
    }
    let mut all = Vec::with_capacity(2 * people);
    for task in tasks {
        all.extend(task.await.expect("writer task"));
    }
    let elapsed = started.elapsed();
    CreateResult {
        items: all.len(),
        elapsed,
        latencies: stats(&mut all),
    }
}

struct BundleResult {
    items: usize,
    bundles: usize,
    /// Sum of `process_bundle` times (bundle construction excluded).
    in_store: Duration,
    /// Wall time including building the Bundles.
    wall: Duration,
    per_bundle: Stats,
}

/// The same data through transactions of `BUNDLE_ENTRIES` entries: each
/// Bundle holds `BUNDLE_ENTRIES / 2` Practitioners and their roles.
async fn create_with_transactions(store: &SqliteStore, people: usize) -> BundleResult {
    let facilities = sample::facility_ids(FACILITIES_PER_DISTRICT);
    let per_bundle = BUNDLE_ENTRIES / 2;
    let mut times = Vec::new();
    let mut items = 0;
    let started = Instant::now();
    let mut n = 1;
    while n <= people {
        let last = (n + per_bundle - 1).min(people);
        let mut resources = Vec::with_capacity(2 * (last - n + 1));
        for k in n..=last {
            resources.push(sample::practitioner(k));
        }
        for k in n..=last {
            resources.push(sample::practitioner_role(k, &facilities));
        }
        let entries = resources.len();
        let bundle = sample::transaction(resources);
        let t = Instant::now();
        let response = store.process_bundle(bundle).await.expect("transaction");
        times.push(t.elapsed());
        let answered = response["entry"].as_array().map_or(0, Vec::len);
        assert_eq!(answered, entries, "one response entry per request entry");
        items += entries;
        n = last + 1;
    }
    let wall = started.elapsed();
    BundleResult {
        items,
        bundles: times.len(),
        in_store: times.iter().sum(),
        wall,
        per_bundle: stats(&mut times),
    }
}

struct ReadResult {
    reads: usize,
    elapsed: Duration,
    latencies: Stats,
}

async fn random_reads(
    store: Arc<SqliteStore>,
    people: usize,
    reads: usize,
    concurrency: usize,
    seed: u64,
) -> ReadResult {
    let remaining = Arc::new(AtomicUsize::new(reads));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (store, remaining) = (Arc::clone(&store), Arc::clone(&remaining));
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ (t as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
            let mut latencies = Vec::with_capacity(reads / concurrency + 1);
            while remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1))
                .is_ok()
            {
                let id = practitioner_id(1 + rng.below(people));
                let t = Instant::now();
                let stored = store.read("Practitioner", &id).await.expect("read");
                latencies.push(t.elapsed());
                assert_eq!(stored.id, id);
            }
            latencies
        }));
    }
    let mut all = Vec::with_capacity(reads);
    for task in tasks {
        all.extend(task.await.expect("reader task"));
    }
    let elapsed = started.elapsed();
    ReadResult {
        reads: all.len(),
        elapsed,
        latencies: stats(&mut all),
    }
}

struct SearchResult {
    label: &'static str,
    example: String,
    latencies: Stats,
    mean_matches: f64,
    mean_total: f64,
    mean_included: f64,
    /// The queries most frequent in the slowest 1%: (query, count, total).
    slowest: Vec<(String, usize, u64)>,
    stopped_early: bool,
}

/// Run up to `queries` searches one after another (after a short warm-up),
/// stopping early when `budget` is spent.
async fn timed_searches(
    store: &SqliteStore,
    label: &'static str,
    queries: usize,
    budget: Duration,
    mut make: impl FnMut() -> (String, Vec<(String, String)>),
    check: impl Fn(usize, Option<u64>),
) -> SearchResult {
    let run = |resource_type: String, params: Vec<(String, String)>| {
        store.search(SearchRequest {
            resource_type,
            params,
            cursor: None,
            lenient: false,
        })
    };
    for _ in 0..20.min(queries) {
        let (t, p) = make();
        run(t, p).await.expect("warm-up search");
    }
    // (latency, query, total) of every timed search.
    let mut runs: Vec<(Duration, String, u64)> = Vec::with_capacity(queries);
    let (mut matches, mut included) = (0usize, 0usize);
    let started = Instant::now();
    let mut stopped_early = false;
    for _ in 0..queries {
        if started.elapsed() > budget {
            stopped_early = true;
            break;
        }
        let (resource_type, params) = make();
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let query = format!("{resource_type}?{}", query.join("&"));
        let t = Instant::now();
        let page = run(resource_type, params).await.expect("search");
        let elapsed = t.elapsed();
        check(page.matches.len(), page.total);
        matches += page.matches.len();
        included += page.included.len();
        runs.push((elapsed, query, page.total.unwrap_or(0)));
    }
    let n = runs.len().max(1) as f64;
    let example = runs.first().map(|r| r.1.clone()).unwrap_or_default();
    let mean_total = runs.iter().map(|r| r.2 as f64).sum::<f64>() / n;
    let mut times: Vec<Duration> = runs.iter().map(|r| r.0).collect();
    let latencies = stats(&mut times);
    // Which queries make up the slowest 1%: (query, occurrences, total).
    runs.sort_by_key(|r| std::cmp::Reverse(r.0));
    let mut tail: Vec<(String, usize, u64)> = Vec::new();
    for (_, query, total) in runs.iter().take(runs.len().div_ceil(100)) {
        match tail.iter_mut().find(|t| &t.0 == query) {
            Some(t) => t.1 += 1,
            None => tail.push((query.clone(), 1, *total)),
        }
    }
    tail.sort_by_key(|t| std::cmp::Reverse(t.1));
    tail.truncate(3);
    SearchResult {
        label,
        example,
        latencies,
        mean_matches: matches as f64 / n,
        mean_total,
        mean_included: included as f64 / n,
        slowest: tail,
        stopped_early,
    }
}

/// Name prefixes (first three letters of the family and given names that
/// occur in the sample data).
fn name_prefixes(people: usize) -> Vec<String> {
    let mut prefixes = Vec::new();
    for n in 1..=people.min(2_000) {
        let p = sample::practitioner(n);
        let name = &p["name"][0];
        let parts = [name["family"].as_str(), name["given"][0].as_str()];
        for part in parts.into_iter().flatten() {
            let prefix: String = part.chars().take(3).collect();
            if !prefixes.contains(&prefix) {
                prefixes.push(prefix);
            }
        }
    }
    prefixes.sort();
    prefixes
}

fn main() {
    let people = env_usize("MHERO_BENCH_PEOPLE", 100_000).max(1);
    let concurrency = env_usize("MHERO_BENCH_CONCURRENCY", 8).max(1);
    let reads = env_usize("MHERO_BENCH_READS", 20_000);
    let queries = env_usize("MHERO_BENCH_QUERIES", 2_000);
    let budget = Duration::from_secs(env_usize("MHERO_BENCH_SEARCH_BUDGET_S", 90) as u64);
    let skip_bundle = env_flag("MHERO_BENCH_SKIP_BUNDLE");
    let keep = env_flag("MHERO_BENCH_KEEP");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let model = cpu_model();
    let load_before = load_average();
    eprintln!(
        "mhero store benchmark: {people} practitioners + {people} roles, {concurrency} concurrent tasks, {cpus} CPUs ({model})"
    );

    let dir = tempfile::tempdir().expect("temporary directory");
    let update_db = dir.path().join("update.db");
    let bundle_db = dir.path().join("bundle.db");

    runtime.block_on(async {
        // Cost of generating the sample JSON alone (it is inside the
        // timed update loop; this tells how much of it is not the store).
        let facilities = sample::facility_ids(FACILITIES_PER_DISTRICT);
        let t = Instant::now();
        let mut sink = 0usize;
        for n in 1..=people.min(20_000) {
            sink += sample::practitioner(n).as_object().map_or(0, |o| o.len());
            sink += sample::practitioner_role(n, &facilities)
                .as_object()
                .map_or(0, |o| o.len());
        }
        let gen_us_per_item = t.elapsed().as_secs_f64() * 1e6 / (2 * people.min(20_000)) as f64;
        std::hint::black_box(sink);

        // 1a. Creates through update.
        let store = Arc::new(SqliteStore::open(&update_db).await.expect("open store"));
        load_locations(&store).await;
        eprintln!("[1/5] creating through update ...");
        let created = create_with_update(Arc::clone(&store), people, concurrency).await;
        let create_rate = created.items as f64 / created.elapsed.as_secs_f64();
        eprintln!(
            "      {} items in {:.1} s: {:.0} items/s",
            created.items,
            created.elapsed.as_secs_f64(),
            create_rate
        );
        let update_db_mib = db_size_mib(&update_db);

        // 1b. Creates through transactions, into a second database.
        let bundled = if skip_bundle {
            None
        } else {
            eprintln!("[2/5] creating through {BUNDLE_ENTRIES}-entry transactions ...");
            let bstore = SqliteStore::open(&bundle_db).await.expect("open store");
            load_locations(&bstore).await;
            let r = create_with_transactions(&bstore, people).await;
            eprintln!(
                "      {} items in {} transactions, {:.1} s in the store: {:.0} items/s",
                r.items,
                r.bundles,
                r.in_store.as_secs_f64(),
                r.items as f64 / r.in_store.as_secs_f64()
            );
            drop(bstore);
            if !keep {
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = bundle_db.as_os_str().to_owned();
                    p.push(suffix);
                    let _ = std::fs::remove_file(p);
                }
            }
            Some(r)
        };

        // 2. Random reads (after a warm-up that opens the reader pool).
        eprintln!("[3/5] {reads} random reads ...");
        random_reads(Arc::clone(&store), people, 1_000.min(reads), concurrency, 1).await;
        let read = random_reads(Arc::clone(&store), people, reads, concurrency, 42).await;
        let read_rate = read.reads as f64 / read.elapsed.as_secs_f64();
        eprintln!("      {:.0} reads/s", read_rate);

        // 3. Searches, sequential.
        eprintln!(
            "[4/5] searches ({queries} each, budget {} s each) ...",
            budget.as_secs()
        );
        let prefixes = name_prefixes(people);
        let mut rng = Rng(7);
        let by_name = timed_searches(
            &store,
            "Practitioner?name=<3-letter prefix>&_count=50",
            queries,
            budget,
            || {
                let prefix = prefixes[rng.below(prefixes.len())].clone();
                (
                    "Practitioner".into(),
                    vec![("name".into(), prefix), ("_count".into(), "50".into())],
                )
            },
            |matches, total| {
                assert!(
                    matches > 0 && total.unwrap_or(0) > 0,
                    "a sample prefix matches"
                )
            },
        )
        .await;
        let mut rng = Rng(11);
        let by_identifier = timed_searches(
            &store,
            "Practitioner?identifier=<system>|EMP-nnnnnn",
            queries,
            budget,
            || {
                let n = 1 + rng.below(people);
                (
                    "Practitioner".into(),
                    vec![("identifier".into(), format!("{EMPLOYEE_SYSTEM}|EMP-{n:06}"))],
                )
            },
            |matches, _| assert_eq!(matches, 1, "an employee number matches one practitioner"),
        )
        .await;
        let mut rng = Rng(13);
        let by_location = timed_searches(
            &store,
            "PractitionerRole?location=<facility>&_include=PR:practitioner",
            queries,
            budget,
            || {
                let facility = &facilities[rng.below(facilities.len())];
                (
                    "PractitionerRole".into(),
                    vec![
                        ("location".into(), format!("Location/{facility}")),
                        ("_include".into(), "PractitionerRole:practitioner".into()),
                    ],
                )
            },
            |_, _| {},
        )
        .await;
        let searches = [by_name, by_identifier, by_location];

        // 4. Report.
        eprintln!("[5/5] report");
        let peak_rss_mib = peak_rss_kib().map(|k| k as f64 / 1024.0);
        print_report(&Report {
            people,
            concurrency,
            cpus,
            model: &model,
            gen_us_per_item,
            created: &created,
            bundled: bundled.as_ref(),
            read: &read,
            searches: &searches,
            update_db_mib,
            peak_rss_mib,
            load: (load_before, load_average()),
        });
    });

    if keep {
        let path = dir.keep();
        eprintln!("kept the benchmark databases in {}", path.display());
    }
}

struct Report<'a> {
    people: usize,
    concurrency: usize,
    cpus: usize,
    model: &'a str,
    gen_us_per_item: f64,
    created: &'a CreateResult,
    bundled: Option<&'a BundleResult>,
    read: &'a ReadResult,
    searches: &'a [SearchResult],
    update_db_mib: f64,
    peak_rss_mib: Option<f64>,
    /// 1-minute load average before and after the run.
    load: (Option<f64>, Option<f64>),
}

fn print_report(r: &Report) {
    let create_rate = r.created.items as f64 / r.created.elapsed.as_secs_f64();
    let read_rate = r.read.reads as f64 / r.read.elapsed.as_secs_f64();
    println!();
    println!(
        "mhero embedded store: {} Practitioners + {} PractitionerRoles, {} tasks, {} CPUs ({})",
        r.people, r.people, r.concurrency, r.cpus, r.model
    );
    println!("{:-<122}", "");
    println!(
        "{:<62} {:>14} {:>14} {:>12} {:>14}",
        "measure", "rate", "per item", "p99", "target"
    );
    println!("{:-<122}", "");
    println!(
        "{:<62} {:>10.0} /s {:>11.1} µs {:>9.2} ms {:>14}",
        "create via update (practitioners + roles)",
        create_rate,
        1e6 / create_rate,
        r.created.latencies.p99_ms,
        format!(
            ">= {:.0}/s ({:.2}x)",
            TARGET_CREATE_PER_S,
            create_rate / TARGET_CREATE_PER_S
        )
    );
    if let Some(b) = r.bundled {
        let rate = b.items as f64 / b.in_store.as_secs_f64();
        println!(
            "{:<62} {:>10.0} /s {:>11.1} µs {:>9.2} ms {:>14}",
            format!("create via {BUNDLE_ENTRIES}-entry transactions"),
            rate,
            1e6 / rate,
            b.per_bundle.p99_ms,
            format!(
                ">= {:.0}/s ({:.2}x)",
                TARGET_CREATE_PER_S,
                rate / TARGET_CREATE_PER_S
            )
        );
        println!(
            "{:<62} {:>14} {:>11.1} ms {:>9.2} ms",
            "  one transaction (median per bundle)", "", b.per_bundle.p50_ms, b.per_bundle.p99_ms
        );
    }
    println!(
        "{:<62} {:>10.0} /s {:>11.1} µs {:>9.2} ms {:>14}",
        "read Practitioner by id",
        read_rate,
        1e6 / read_rate,
        r.read.latencies.p99_ms,
        format!(
            ">= {:.0}/s ({:.2}x)",
            TARGET_READ_PER_S,
            read_rate / TARGET_READ_PER_S
        )
    );
    println!("{:-<122}", "");
    println!(
        "{:<62} {:>14} {:>14} {:>12} {:>14}",
        "search (sequential)", "n", "p50", "p99", "target p99"
    );
    println!("{:-<122}", "");
    for s in r.searches {
        println!(
            "{:<62} {:>14} {:>11.2} ms {:>9.2} ms {:>14}",
            s.label,
            format!(
                "{}{}",
                s.latencies.n,
                if s.stopped_early { "*" } else { "" }
            ),
            s.latencies.p50_ms,
            s.latencies.p99_ms,
            format!(
                "<= {:.0} ms ({:.2}x)",
                TARGET_SEARCH_P99_MS,
                s.latencies.p99_ms / TARGET_SEARCH_P99_MS
            )
        );
        println!(
            "  mean: {:.1} matches, total {:.0}, {:.1} included",
            s.mean_matches, s.mean_total, s.mean_included
        );
        let tail_len = s.latencies.n.div_ceil(100);
        for (query, count, total) in &s.slowest {
            println!("  in the slowest 1% ({count} of {tail_len}): {query} (total {total})");
        }
    }
    println!("{:-<122}", "");
    println!(
        "sample JSON generation (inside the update loop): {:.1} µs/item; database after the update path: {:.0} MiB; peak RSS: {}",
        r.gen_us_per_item,
        r.update_db_mib,
        r.peak_rss_mib
            .map_or("n/a".into(), |m| format!("{m:.0} MiB"))
    );
    let show = |l: Option<f64>| l.map_or("n/a".into(), |l| format!("{l:.2}"));
    println!(
        "1-minute load average: {} before, {} after",
        show(r.load.0),
        show(r.load.1)
    );
    if r.searches.iter().any(|s| s.stopped_early) {
        println!("* stopped early: the time budget (MHERO_BENCH_SEARCH_BUDGET_S) was spent");
    }

    let report = json!({
        "people": r.people,
        "resources_written": 2 * r.people,
        "concurrency": r.concurrency,
        "cpus": r.cpus,
        "cpu_model": r.model,
        "targets": {
            "create_per_s": TARGET_CREATE_PER_S,
            "read_per_s": TARGET_READ_PER_S,
            "search_p99_ms": TARGET_SEARCH_P99_MS,
        },
        "create_update": {
            "items": r.created.items,
            "seconds": r.created.elapsed.as_secs_f64(),
            "items_per_s": create_rate,
            "us_per_item": 1e6 / create_rate,
            "latency": stats_json(&r.created.latencies),
            "sample_generation_us_per_item": r.gen_us_per_item,
        },
        "create_transaction": r.bundled.map(|b| json!({
            "entries_per_bundle": BUNDLE_ENTRIES,
            "items": b.items,
            "bundles": b.bundles,
            "seconds_in_store": b.in_store.as_secs_f64(),
            "seconds_wall": b.wall.as_secs_f64(),
            "items_per_s": b.items as f64 / b.in_store.as_secs_f64(),
            "us_per_item": b.in_store.as_secs_f64() * 1e6 / b.items as f64,
            "per_bundle": stats_json(&b.per_bundle),
        })),
        "read": {
            "reads": r.read.reads,
            "seconds": r.read.elapsed.as_secs_f64(),
            "reads_per_s": read_rate,
            "us_per_read": 1e6 / read_rate,
            "latency": stats_json(&r.read.latencies),
        },
        "search": r.searches.iter().map(|s| json!({
            "query": s.label,
            "example": s.example,
            "latency": stats_json(&s.latencies),
            "mean_matches": s.mean_matches,
            "mean_total": s.mean_total,
            "mean_included": s.mean_included,
            "slowest_1pct": s.slowest.iter().map(|(q, n, total)| json!({ "query": q, "count": n, "total": total })).collect::<Vec<_>>(),
            "stopped_early": s.stopped_early,
        })).collect::<Vec<_>>(),
        "update_db_mib": r.update_db_mib,
        "peak_rss_mib": r.peak_rss_mib,
        "load_average_1m": { "before": r.load.0, "after": r.load.1 },
    });
    if let Ok(path) = std::env::var("MHERO_BENCH_OUT") {
        let text = serde_json::to_string_pretty(&report).expect("report JSON");
        std::fs::write(&path, text + "\n").unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
        eprintln!("wrote {path}");
    }
}
