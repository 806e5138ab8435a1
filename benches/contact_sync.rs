//! Cost of the FHIR -> RapidPro contact sync (`ContactSync::run_once`)
//! end to end: the embedded store, the RapidPro client over real HTTP and
//! the in-process RapidPro sandbox, with the throttles raised out of the way
//! (the sandbox's to 1,000,000 requests/s per scope, the client's to
//! `u32::MAX` per hour).
//!
//! Run with `cargo bench --bench contact_sync` (a release build). It loads N
//! new Practitioners (`sample::practitioner(n)`, Liberian mobiles
//! `+23177...`) into a temporary SQLite store with 1,000-entry transaction
//! Bundles, then times four passes:
//!
//! 1. `run_once(false)`, everybody new: one lookup by URN and one create
//!    per person, plus the write-back of the contact UUID and hash;
//! 2. `run_once(true)`, nobody changed: no RapidPro call expected;
//! 3. after changing the phone of every tenth Practitioner (10 %),
//!    `run_once(false)`: one lookup by UUID and one update per changed
//!    person;
//! 4. `run_once(false)` again, nothing changed (the steady-state periodic
//!    pass).
//!
//! For each pass it reports wall time, CPU time (user + system of the whole
//! process from `/proc/self/stat`, and of the sandbox's own runtime thread
//! from `/proc/self/task/*/stat`), the RapidPro calls from the sandbox's
//! call log by method and endpoint, and where the connector's time went
//! (time inside the `ContactDirectory` calls, i.e. HTTP round trips to the
//! sandbox, and inside the store's search / read / update). The sandbox
//! runs in the same process: the process CPU includes it, so it is also
//! shown separately.
//!
//! Finally it pages through the sync's store query alone, with the default
//! `_total` and with `_total=none`, and converts each pass's
//! `contacts.json` calls into hours of RapidPro's default budget (3,600
//! requests/hour).
//!
//! It prints a table and, if `MHERO_BENCH_OUT` is set, writes the figures
//! as JSON to that path. Nothing is asserted beyond the sync's outcome
//! counts (a benchmark of a broken sync is worthless).
//!
//! Environment knobs:
//!
//! - `MHERO_BENCH_CONTACTS` (10000): number of Practitioners.
//! - `MHERO_BENCH_CHANGED` (N / 10): Practitioners whose phone changes
//!   before pass 3 (spread evenly).
//! - `MHERO_BENCH_PAGE_SIZE` (100): the sync's store page size (`mhero sync
//!   contacts` uses 100).
//! - `MHERO_BENCH_OUT` (unset): path of the JSON report.

#[path = "support/machine.rs"]
mod machine;
use machine::{cpu_model, env_usize, load_average, peak_rss_kib};

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mhero::config::Settings;
use mhero::fhir::sample;
use mhero::jobs::contact_sync::{
    ContactDirectory, ContactSync, RemoteContact, SyncError, SyncReport,
};
use mhero::jobs::rapidpro_directory::RapidProDirectory;
use mhero::pipeline::contact::ContactDraft;
use mhero::pipeline::phone::PhoneNormalizer;
use mhero::rapidpro::client::RapidProClient;
use mhero::rapidpro::sandbox::{CallRecord, Rate, SandboxServer, SandboxSettings};
use mhero::rapidpro::throttle::Throttle;
use mhero::store::sqlite::SqliteStore;
use mhero::store::{
    BackendStatus, FhirStore, HistoryPage, HistoryRequest, SearchPage, SearchRequest, StoreResult,
    StoredResource, WriteOutcome,
};
use serde_json::{Value, json};

const BUNDLE_ENTRIES: usize = 1_000;
/// The sandbox runtime's thread name (Linux keeps 15 bytes of it).
const SANDBOX_THREAD: &str = "rp-sandbox";
/// `USER_HZ`: the unit of utime/stime in `/proc/*/stat` (100 on Linux).
const CLOCK_TICKS_PER_S: f64 = 100.0;

/// utime + stime (seconds) from a `/proc/.../stat` line.
fn stat_cpu_s(stat: &str) -> Option<f64> {
    // The command name is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / CLOCK_TICKS_PER_S)
}

fn process_cpu_s() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| stat_cpu_s(&s))
        .unwrap_or(f64::NAN)
}

/// CPU seconds of the live threads whose name starts with `prefix`.
fn threads_cpu_s(prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return f64::NAN;
    };
    let mut total = 0.0;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let name = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map_or("", |(n, _)| n);
        if name.starts_with(prefix) {
            total += stat_cpu_s(&stat).unwrap_or(0.0);
        }
    }
    total
}

/// Count and total time of each timed operation.
#[derive(Default)]
struct Meter(Mutex<BTreeMap<&'static str, (usize, Duration)>>);

impl Meter {
    fn add(&self, op: &'static str, started: Instant) {
        let elapsed = started.elapsed();
        let mut ops = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let entry = ops.entry(op).or_default();
        entry.0 += 1;
        entry.1 += elapsed;
    }

    fn take(&self) -> BTreeMap<&'static str, (usize, Duration)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

macro_rules! timed {
    ($meter:expr, $op:literal, $call:expr) => {{
        let started = Instant::now();
        let result = $call.await;
        $meter.add($op, started);
        result
    }};
}

/// The store, timing what the sync uses (search, read, update).
struct TimedStore {
    inner: Arc<SqliteStore>,
    meter: Arc<Meter>,
}

#[async_trait]
impl FhirStore for TimedStore {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
    async fn create(
        &self,
        resource: Value,
        if_none_exist: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        self.inner.create(resource, if_none_exist).await
    }
    async fn update(
        &self,
        resource_type: &str,
        id: &str,
        resource: Value,
        if_match: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        timed!(
            self.meter,
            "store update",
            self.inner.update(resource_type, id, resource, if_match)
        )
    }
    async fn conditional_update(
        &self,
        resource_type: &str,
        query: &str,
        resource: Value,
        if_match: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        self.inner
            .conditional_update(resource_type, query, resource, if_match)
            .await
    }
    async fn read(&self, resource_type: &str, id: &str) -> StoreResult<StoredResource> {
        timed!(self.meter, "store read", self.inner.read(resource_type, id))
    }
    async fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version_id: &str,
    ) -> StoreResult<StoredResource> {
        self.inner.vread(resource_type, id, version_id).await
    }
    async fn delete(
        &self,
        resource_type: &str,
        id: &str,
        if_match: Option<&str>,
    ) -> StoreResult<Option<String>> {
        self.inner.delete(resource_type, id, if_match).await
    }
    async fn search(&self, request: SearchRequest) -> StoreResult<SearchPage> {
        timed!(self.meter, "store search", self.inner.search(request))
    }
    async fn history(&self, request: HistoryRequest) -> StoreResult<HistoryPage> {
        self.inner.history(request).await
    }
    async fn process_bundle(&self, bundle: Value) -> StoreResult<Value> {
        self.inner.process_bundle(bundle).await
    }
    async fn check(&self) -> StoreResult<BackendStatus> {
        self.inner.check().await
    }
}

/// The RapidPro directory, timing each call (HTTP round trip included).
struct TimedDirectory {
    inner: RapidProDirectory,
    meter: Arc<Meter>,
}

#[async_trait]
impl ContactDirectory for TimedDirectory {
    async fn find_by_uuid(&self, uuid: &str) -> Result<Option<RemoteContact>, SyncError> {
        timed!(
            self.meter,
            "rapidpro find_by_uuid",
            self.inner.find_by_uuid(uuid)
        )
    }
    async fn find_by_urn(&self, urn: &str) -> Result<Option<RemoteContact>, SyncError> {
        timed!(
            self.meter,
            "rapidpro find_by_urn",
            self.inner.find_by_urn(urn)
        )
    }
    async fn create(&self, draft: &ContactDraft) -> Result<RemoteContact, SyncError> {
        timed!(self.meter, "rapidpro create", self.inner.create(draft))
    }
    async fn update(&self, uuid: &str, draft: &ContactDraft) -> Result<RemoteContact, SyncError> {
        timed!(
            self.meter,
            "rapidpro update",
            self.inner.update(uuid, draft)
        )
    }
    async fn block(&self, uuid: &str) -> Result<(), SyncError> {
        timed!(self.meter, "rapidpro block", self.inner.block(uuid))
    }
    async fn unblock(&self, uuid: &str) -> Result<(), SyncError> {
        timed!(self.meter, "rapidpro unblock", self.inner.unblock(uuid))
    }
}

/// `GET contacts?urn`, `POST contacts`, `POST contacts?uuid`, ...: the
/// method, the endpoint and the names of the query parameters.
fn call_kind(call: &CallRecord) -> String {
    let endpoint = call
        .path
        .trim_start_matches("/api/v2/")
        .trim_end_matches(".json");
    let mut params: Vec<&str> = call
        .query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').map_or(p, |(k, _)| k))
        .collect();
    params.sort_unstable();
    params.dedup();
    if params.is_empty() {
        format!("{} {endpoint}", call.method)
    } else {
        format!("{} {endpoint}?{}", call.method, params.join("&"))
    }
}

struct Pass {
    label: &'static str,
    report: SyncReport,
    wall: Duration,
    cpu_process_s: f64,
    cpu_sandbox_s: f64,
    /// Call kind -> count, from the sandbox's call log.
    calls: BTreeMap<String, usize>,
    /// Calls answered with a status >= 400 (throttled, errors).
    failed_calls: usize,
    /// Operation -> (count, total time).
    ops: BTreeMap<&'static str, (usize, Duration)>,
}

impl Pass {
    fn total_calls(&self) -> usize {
        self.calls.values().sum()
    }

    /// The people this pass is "about": created, updated or unchanged.
    fn subject(&self) -> usize {
        let r = &self.report;
        if r.created + r.updated > 0 {
            r.created + r.updated
        } else {
            r.examined.max(1)
        }
    }

    fn op_time(&self, prefix: &str) -> Duration {
        self.ops
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.1)
            .sum()
    }
}

async fn run_pass(
    label: &'static str,
    sync: &ContactSync<'_>,
    full: bool,
    sandbox: &SandboxServer,
    meter: &Meter,
) -> Pass {
    sandbox.sandbox().clear_calls();
    meter.take();
    let (cpu0, sandbox_cpu0) = (process_cpu_s(), threads_cpu_s(SANDBOX_THREAD));
    let started = Instant::now();
    let report = sync.run_once(full).await.expect("sync pass");
    let wall = started.elapsed();
    let (cpu1, sandbox_cpu1) = (process_cpu_s(), threads_cpu_s(SANDBOX_THREAD));
    let ops = meter.take();
    let log = sandbox.sandbox().calls();
    let mut calls = BTreeMap::new();
    for call in &log {
        *calls.entry(call_kind(call)).or_insert(0) += 1;
    }
    let failed_calls = log.iter().filter(|c| c.status >= 400).count();
    assert!(
        report.failures.is_empty() && report.conflicts.is_empty(),
        "{label}: {} failures, {} conflicts; first: {:?}",
        report.failures.len(),
        report.conflicts.len(),
        report.failures.first().or(report.conflicts.first())
    );
    let pass = Pass {
        label,
        report,
        wall,
        cpu_process_s: cpu1 - cpu0,
        cpu_sandbox_s: sandbox_cpu1 - sandbox_cpu0,
        calls,
        failed_calls,
        ops,
    };
    eprintln!(
        "      {:.2} s wall, {:.2} s CPU ({:.2} s sandbox), {} RapidPro calls; {:?}",
        pass.wall.as_secs_f64(),
        pass.cpu_process_s,
        pass.cpu_sandbox_s,
        pass.total_calls(),
        pass.report
    );
    pass
}

async fn client_for(sandbox: &SandboxServer) -> RapidProClient {
    mhero::install_tls_provider();
    let env = std::collections::HashMap::from([
        (
            "MHERO__RAPIDPRO__BASE_URL".to_string(),
            sandbox.base_url().to_string(),
        ),
        (
            "MHERO__RAPIDPRO__TOKEN".to_string(),
            sandbox.token().to_string(),
        ),
    ]);
    let settings = Settings::load_from(None, Some(env)).expect("settings");
    RapidProClient::from_settings(&settings.rapidpro, Throttle::uniform(u32::MAX))
        .expect("RapidPro client")
}

/// Load practitioners `1..=people` with transaction Bundles.
async fn load_practitioners(store: &SqliteStore, people: usize) -> Duration {
    let started = Instant::now();
    let mut n = 1;
    while n <= people {
        let last = (n + BUNDLE_ENTRIES - 1).min(people);
        let resources = (n..=last).map(sample::practitioner).collect();
        store
            .process_bundle(sample::transaction(resources))
            .await
            .expect("load transaction");
        n = last + 1;
    }
    started.elapsed()
}

/// Give `changed` Practitioners (every `people / changed`-th) a new phone
/// (`+23188...`), keeping everything else, the written-back contact UUID
/// included. Returns the time it took.
async fn change_phones(store: &SqliteStore, people: usize, changed: usize) -> Duration {
    let started = Instant::now();
    if changed == 0 {
        return started.elapsed();
    }
    let step = (people / changed).max(1);
    let ids: Vec<usize> = (1..=people).step_by(step).take(changed).collect();
    for chunk in ids.chunks(BUNDLE_ENTRIES) {
        let mut resources = Vec::with_capacity(chunk.len());
        for &n in chunk {
            let mut p = store
                .read("Practitioner", &format!("HW{n:06}"))
                .await
                .expect("read practitioner")
                .resource;
            p["telecom"] = json!([{ "system": "phone", "value": format!("+2318{:08}", 80_000_000 + n), "use": "mobile" }]);
            resources.push(p);
        }
        store
            .process_bundle(sample::transaction(resources))
            .await
            .expect("change transaction");
    }
    started.elapsed()
}

/// One paging variant of the sync's store query: pages, matches, time.
struct Paging {
    label: &'static str,
    pages: usize,
    matches: usize,
    elapsed: Duration,
}

/// Page through `Practitioner?_sort=_lastUpdated&_count=<page_size>` plus
/// `extra`, as the sync does, and time it.
async fn page_through(
    store: &SqliteStore,
    label: &'static str,
    page_size: usize,
    extra: &[(&str, &str)],
) -> Paging {
    let mut params = vec![
        ("_sort".to_string(), "_lastUpdated".to_string()),
        ("_count".to_string(), page_size.to_string()),
    ];
    params.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let (mut pages, mut matches, mut cursor) = (0, 0, None);
    let started = Instant::now();
    loop {
        let page = store
            .search(SearchRequest {
                resource_type: "Practitioner".into(),
                params: params.clone(),
                cursor: cursor.take(),
                lenient: false,
            })
            .await
            .expect("paging search");
        pages += 1;
        matches += page.matches.len();
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Paging {
        label,
        pages,
        matches,
        elapsed: started.elapsed(),
    }
}

fn main() {
    let people = env_usize("MHERO_BENCH_CONTACTS", 10_000).max(1);
    let changed = env_usize("MHERO_BENCH_CHANGED", people / 10).min(people);
    let page_size = env_usize("MHERO_BENCH_PAGE_SIZE", 100).max(1);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-connector")
        .build()
        .expect("tokio runtime");
    // The sandbox gets its own runtime (one worker) so its CPU can be told
    // apart from the connector's.
    let sandbox_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name(SANDBOX_THREAD)
        .build()
        .expect("sandbox runtime");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let model = cpu_model();
    let load_before = load_average();
    eprintln!(
        "mhero contact sync benchmark: {people} practitioners, {changed} changed, page size {page_size}, {cpus} CPUs ({model})"
    );

    let settings = SandboxSettings::default().with_throttle_rate(Rate {
        requests: 1_000_000,
        per_secs: 1,
    });
    let sandbox = sandbox_runtime
        .block_on(SandboxServer::start(settings))
        .expect("start the sandbox");
    let dir = tempfile::tempdir().expect("temporary directory");

    let (load_time, change_time, passes, paging) = runtime.block_on(async {
        let store = Arc::new(
            SqliteStore::open(&dir.path().join("fhir.sqlite"))
                .await
                .expect("open store"),
        );
        eprintln!("[1/6] loading {people} practitioners ...");
        let load_time = load_practitioners(&store, people).await;
        eprintln!("      {:.2} s", load_time.as_secs_f64());

        let meter = Arc::new(Meter::default());
        let timed_store = TimedStore {
            inner: Arc::clone(&store),
            meter: Arc::clone(&meter),
        };
        let directory = TimedDirectory {
            inner: RapidProDirectory::new(client_for(&sandbox).await),
            meter: Arc::clone(&meter),
        };
        let phones = PhoneNormalizer::new(Some("LR")).expect("phone normalizer");
        let sync = ContactSync {
            store: &timed_store,
            directory: &directory,
            phones: &phones,
            page_size,
            progress: indicatif::ProgressBar::hidden(),
        };

        eprintln!("[2/6] pass 1: everybody new ...");
        let p1 = run_pass("1: all new", &sync, false, &sandbox, &meter).await;
        assert_eq!(p1.report.created, people, "every practitioner created");
        eprintln!("[3/6] pass 2: full, nothing changed ...");
        let p2 = run_pass("2: full, unchanged", &sync, true, &sandbox, &meter).await;
        assert_eq!(p2.report.unchanged, people, "nobody changed");
        eprintln!("[4/6] changing {changed} phones ...");
        let changed_since = mhero::fhir::format_instant(&chrono::Utc::now());
        let change_time = change_phones(&store, people, changed).await;
        eprintln!("      {:.2} s", change_time.as_secs_f64());
        eprintln!("[5/6] pass 3: {changed} changed ...");
        let p3 = run_pass("3: 10% phones changed", &sync, false, &sandbox, &meter).await;
        assert_eq!(p3.report.updated, changed, "every changed phone pushed");
        eprintln!("[6/6] pass 4: incremental, nothing changed ...");
        let p4 = run_pass("4: incremental, unchanged", &sync, false, &sandbox, &meter).await;
        // The sync's store query alone, with and without the total count.
        let since = format!("ge{changed_since}");
        let mut paging = Vec::new();
        for (label, extra) in [
            ("all, _total default (accurate)", vec![]),
            ("all, _total=none", vec![("_total", "none")]),
            (
                "_lastUpdated=ge<before the changes>, _total default",
                vec![("_lastUpdated", since.as_str())],
            ),
            (
                "_lastUpdated=ge<before the changes>, _total=none",
                vec![("_lastUpdated", since.as_str()), ("_total", "none")],
            ),
        ] {
            paging.push(page_through(&store, label, page_size, &extra).await);
        }
        (load_time, change_time, vec![p1, p2, p3, p4], paging)
    });
    let live_contacts = sandbox.sandbox().state()["contacts"]
        .as_array()
        .map_or(0, |c| c.iter().filter(|c| c["deleted"] == false).count());
    sandbox_runtime
        .block_on(sandbox.shutdown())
        .expect("sandbox shutdown");

    print_report(&Report {
        people,
        changed,
        page_size,
        cpus,
        model: &model,
        load_time,
        change_time,
        passes: &passes,
        paging: &paging,
        live_contacts,
        peak_rss_mib: peak_rss_kib().map(|k| k as f64 / 1024.0),
        load: (load_before, load_average()),
    });
}

struct Report<'a> {
    people: usize,
    changed: usize,
    page_size: usize,
    cpus: usize,
    model: &'a str,
    load_time: Duration,
    change_time: Duration,
    passes: &'a [Pass],
    paging: &'a [Paging],
    live_contacts: usize,
    peak_rss_mib: Option<f64>,
    /// 1-minute load average before and after the run.
    load: (Option<f64>, Option<f64>),
}

fn print_report(r: &Report) {
    let line = || println!("{:-<118}", "");
    println!();
    println!(
        "mhero contact sync: {} Practitioners, {} phones changed, page size {}, {} CPUs ({})",
        r.people, r.changed, r.page_size, r.cpus, r.model
    );
    line();
    println!(
        "{:<28} {:>8} {:>8} {:>8} {:>9} {:>9} {:>12} {:>12} {:>8} {:>8}",
        "pass",
        "examined",
        "created",
        "updated",
        "unchanged",
        "wall s",
        "wall µs/ct",
        "CPU µs/ct",
        "calls",
        "calls/ct"
    );
    line();
    for p in r.passes {
        let n = p.subject() as f64;
        println!(
            "{:<28} {:>8} {:>8} {:>8} {:>9} {:>9.2} {:>12.1} {:>12.1} {:>8} {:>8.2}",
            p.label,
            p.report.examined,
            p.report.created,
            p.report.updated,
            p.report.unchanged,
            p.wall.as_secs_f64(),
            p.wall.as_secs_f64() * 1e6 / n,
            p.cpu_process_s * 1e6 / n,
            p.total_calls(),
            p.total_calls() as f64 / n
        );
    }
    line();
    println!(
        "per contact (ct) = per created or updated person; for passes with neither, per examined person"
    );
    println!();
    println!("RapidPro calls by kind (sandbox call log):");
    for p in r.passes {
        let kinds: Vec<String> = p.calls.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        println!(
            "  pass {:<26} {}{}",
            p.label,
            if kinds.is_empty() {
                "none".to_string()
            } else {
                kinds.join(", ")
            },
            if p.failed_calls > 0 {
                format!(" ({} answered >= 400)", p.failed_calls)
            } else {
                String::new()
            }
        );
    }
    println!();
    println!("Where the wall time went (sequential pass, so the parts add up):");
    for p in r.passes {
        let wall = p.wall.as_secs_f64();
        let rapidpro = p.op_time("rapidpro").as_secs_f64();
        let store = p.op_time("store").as_secs_f64();
        let ops: Vec<String> = p
            .ops
            .iter()
            .map(|(k, (n, d))| {
                format!(
                    "{k} {n} x {:.0} µs",
                    d.as_secs_f64() * 1e6 / (*n).max(1) as f64
                )
            })
            .collect();
        println!(
            "  pass {:<26} RapidPro calls {:.0}%, store {:.0}%, other (draft, hash, JSON) {:.0}%",
            p.label,
            100.0 * rapidpro / wall,
            100.0 * store / wall,
            100.0 * (wall - rapidpro - store).max(0.0) / wall
        );
        if !ops.is_empty() {
            println!("      {}", ops.join("; "));
        }
        println!(
            "      CPU {:.2} s of which sandbox {:.2} s ({:.0}%); CPU / wall {:.2}",
            p.cpu_process_s,
            p.cpu_sandbox_s,
            100.0 * p.cpu_sandbox_s / p.cpu_process_s.max(1e-9),
            p.cpu_process_s / wall
        );
    }
    println!();
    println!(
        "The sync's store query alone (Practitioner?_sort=_lastUpdated&_count={}):",
        r.page_size
    );
    for p in r.paging {
        println!(
            "  {:<55} {:>4} pages, {:>6} matches, {:>8.1} ms, {:>6.2} ms/page",
            p.label,
            p.pages,
            p.matches,
            p.elapsed.as_secs_f64() * 1e3,
            p.elapsed.as_secs_f64() * 1e3 / p.pages as f64
        );
    }
    println!();
    println!(
        "At RapidPro's default throttle (3,600 requests/hour per scope; every call above is in v2.contacts or v2):"
    );
    for p in r.passes {
        let contacts_scope: usize = p
            .calls
            .iter()
            .filter(|(k, _)| k.contains(" contacts"))
            .map(|(_, n)| n)
            .sum();
        println!(
            "  pass {:<26} {:>6} contacts.json calls = {:.2} h of v2.contacts budget",
            p.label,
            contacts_scope,
            contacts_scope as f64 / 3600.0
        );
    }
    let (p1, p2, p3) = (&r.passes[0], &r.passes[1], &r.passes[2]);
    let per = |p: &Pass| p.wall.as_secs_f64() / p.subject() as f64;
    println!();
    println!(
        "ratios: unchanged full pass / all-new pass wall {:.3}; per changed contact (pass 3) / per new contact (pass 1) wall {:.2}; pass 3 / pass 1 wall {:.3}",
        p2.wall.as_secs_f64() / p1.wall.as_secs_f64(),
        per(p3) / per(p1),
        p3.wall.as_secs_f64() / p1.wall.as_secs_f64()
    );
    println!(
        "load: {} practitioners in {:.2} s; phone changes written in {:.2} s; sandbox holds {} live contacts; peak RSS {}",
        r.people,
        r.load_time.as_secs_f64(),
        r.change_time.as_secs_f64(),
        r.live_contacts,
        r.peak_rss_mib
            .map_or("n/a".into(), |m| format!("{m:.0} MiB"))
    );
    let show = |l: Option<f64>| l.map_or("n/a".into(), |l| format!("{l:.2}"));
    println!(
        "1-minute load average: {} before, {} after. CPU includes the in-process sandbox (shown separately).",
        show(r.load.0),
        show(r.load.1)
    );

    let report = json!({
        "contacts": r.people,
        "changed": r.changed,
        "page_size": r.page_size,
        "cpus": r.cpus,
        "cpu_model": r.model,
        "load_seconds": r.load_time.as_secs_f64(),
        "change_seconds": r.change_time.as_secs_f64(),
        "sandbox_live_contacts": r.live_contacts,
        "passes": r.passes.iter().map(|p| {
            let n = p.subject() as f64;
            json!({
                "pass": p.label,
                "examined": p.report.examined,
                "created": p.report.created,
                "updated": p.report.updated,
                "unchanged": p.report.unchanged,
                "per_contact_basis": n,
                "wall_seconds": p.wall.as_secs_f64(),
                "wall_us_per_contact": p.wall.as_secs_f64() * 1e6 / n,
                "cpu_seconds": p.cpu_process_s,
                "cpu_us_per_contact": p.cpu_process_s * 1e6 / n,
                "cpu_sandbox_seconds": p.cpu_sandbox_s,
                "calls": p.total_calls(),
                "calls_per_contact": p.total_calls() as f64 / n,
                "calls_by_kind": p.calls,
                "failed_calls": p.failed_calls,
                "operations": p.ops.iter().map(|(k, (count, d))| (k.to_string(), json!({
                    "count": count,
                    "seconds": d.as_secs_f64(),
                    "mean_us": d.as_secs_f64() * 1e6 / (*count).max(1) as f64,
                }))).collect::<serde_json::Map<String, Value>>(),
            })
        }).collect::<Vec<_>>(),
        "ratios": {
            "unchanged_full_over_all_new_wall": p2.wall.as_secs_f64() / p1.wall.as_secs_f64(),
            "per_changed_over_per_new_wall": per(p3) / per(p1),
        },
        "store_paging": r.paging.iter().map(|p| json!({
            "query": p.label,
            "pages": p.pages,
            "matches": p.matches,
            "ms": p.elapsed.as_secs_f64() * 1e3,
            "ms_per_page": p.elapsed.as_secs_f64() * 1e3 / p.pages as f64,
        })).collect::<Vec<_>>(),
        "peak_rss_mib": r.peak_rss_mib,
        "load_average_1m": { "before": r.load.0, "after": r.load.1 },
        "note": "CPU is the whole process: it includes the in-process RapidPro sandbox (cpu_sandbox_seconds)",
    });
    if let Ok(path) = std::env::var("MHERO_BENCH_OUT") {
        let text = serde_json::to_string_pretty(&report).expect("report JSON");
        std::fs::write(&path, text + "\n").unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
        eprintln!("wrote {path}");
    }
}
