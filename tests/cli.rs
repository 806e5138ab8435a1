//! The `mhero` binary: exit codes, `check`, `import`, and configuration
//! errors that name the key.

use std::process::Command;

mod common;

fn mhero(dir: &tempfile::TempDir) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mhero"));
    command
        .env(
            "MHERO__FHIR__EMBEDDED__PATH",
            dir.path().join("fhir.sqlite"),
        )
        .env_remove("MHERO_CONFIG")
        .current_dir(dir.path());
    command
}

#[test]
fn check_reports_every_backend_and_succeeds_on_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let output = mhero(&dir).arg("check").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("fhir (embedded SQLite): ok"), "{stdout}");
    assert!(stdout.contains("rapidpro: ok: not configured"), "{stdout}");
    assert!(stdout.contains("index (embedded): ok"), "{stdout}");
    assert!(stdout.contains("not built yet"), "{stdout}");
}

#[test]
fn check_fails_when_the_remote_fhir_server_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = mhero(&dir)
        .arg("check")
        .env("MHERO__FHIR__BACKEND", "http")
        .env(
            "MHERO__FHIR__HTTP__BASE_URL",
            format!("http://127.0.0.1:{port}/fhir"),
        )
        .env("MHERO__FHIR__HTTP__MAX_RETRIES", "0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAILED"), "{stdout}");
}

#[test]
fn unknown_configuration_key_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mhero.toml");
    std::fs::write(&config, "[fhir]\nbackend = \"embedded\"\nbakend = \"x\"\n").unwrap();
    let output = mhero(&dir)
        .arg("--config")
        .arg(&config)
        .arg("check")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("fhir.bakend"));

    let missing = mhero(&dir)
        .args(["--config", "/nonexistent.toml", "check"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    let bad_value = mhero(&dir)
        .env("MHERO__SERVER__LOG_FORMAT", "xml")
        .arg("check")
        .output()
        .unwrap();
    assert_eq!(bad_value.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_value.stderr).contains("xml"));
}

#[test]
fn import_prints_a_summary_and_fails_on_failures() {
    let dir = tempfile::tempdir().unwrap();
    let locations = common::fixture_path("ihris/ihris-demo-locations-open.bundle.json");
    let ok = mhero(&dir).arg("import").arg(&locations).output().unwrap();
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{stdout}");
    assert!(stdout.contains("31 created"), "{stdout}");

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"resourceType\":\"Claim\"}").unwrap();
    let failed = mhero(&dir).arg("import").arg(&bad).output().unwrap();
    let stdout = String::from_utf8_lossy(&failed.stdout);
    assert_eq!(failed.status.code(), Some(1));
    assert!(
        stdout.contains("1 failed") && stdout.contains("Claim"),
        "{stdout}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        mhero(&dir).arg("import").output().unwrap().status.code(),
        Some(2),
        "import needs files"
    );
    assert_eq!(
        mhero(&dir)
            .arg("frobnicate")
            .output()
            .unwrap()
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn reindex_rebuilds_the_contact_index_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = common::fixture_path("ihris/ihris-demo-practitioners-open.bundle.json");
    let import = mhero(&dir).arg("import").arg(&bundle).output().unwrap();
    assert!(
        import.status.success(),
        "{}",
        String::from_utf8_lossy(&import.stderr)
    );
    let reindex = mhero(&dir).arg("reindex").output().unwrap();
    let stdout = String::from_utf8_lossy(&reindex.stdout);
    assert!(
        reindex.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&reindex.stderr)
    );
    let people: usize = stdout
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(people, 65, "{stdout}");
    // Again: the same count (a rebuild, not an addition).
    let again = mhero(&dir).arg("reindex").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&again.stdout), stdout);
    let check = mhero(&dir).arg("check").output().unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(report.contains("index (embedded): ok"), "{report}");
    assert!(report.contains(": 65 people, current to 20"), "{report}");
    let elastic = mhero(&dir)
        .arg("reindex")
        .env("MHERO__INDEX__BACKEND", "elasticsearch")
        .output()
        .unwrap();
    assert_eq!(elastic.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&elastic.stderr).contains("index.elasticsearch.url"),
        "{}",
        String::from_utf8_lossy(&elastic.stderr)
    );
}

/// The URL and JSON body of a banner `curl -X PUT ... 'URL' -d 'BODY'` line.
fn put_command(line: &str) -> (String, serde_json::Value) {
    let quoted: Vec<&str> = line.split('\'').skip(1).step_by(2).collect();
    let url = quoted
        .iter()
        .find(|q| q.starts_with("http://"))
        .expect("a URL")
        .to_string();
    let body = serde_json::from_str(quoted.last().expect("a body")).expect("a JSON body");
    (url, body)
}

#[test]
fn demo_sends_to_the_ihris_midwives_and_stops_gracefully_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = mhero(&dir)
        .args(["demo", "--data"])
        .arg(dir.path().join("demo"))
        .env("MHERO__SERVER__LISTEN", "127.0.0.1:0")
        .env_remove("MHERO__AUTH__API_KEYS")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The banner is printed once the listener is bound; it names the URL,
    // the key, the sandbox and the commands, and ends with "Stop with".
    let mut lines = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let banner: Vec<String> = lines
        .by_ref()
        .take_while(|line| !line.starts_with("Stop with"))
        .collect();
    let field = |name: &str| {
        banner
            .iter()
            .find_map(|line| line.trim().strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("the banner names {name}: {banner:?}"))
    };
    let fhir_base = field("FHIR API:");
    let key = field("API key:");
    assert!(
        uuid::Uuid::parse_str(&key).is_ok(),
        "a generated key: {key}"
    );
    let sandbox_url = field("RapidPro sandbox:")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let curls: Vec<&String> = banner
        .iter()
        .filter(|line| line.trim_start().starts_with("curl "))
        .collect();
    assert_eq!(curls.len(), 3, "three commands: {banner:?}");
    assert!(curls.iter().all(|c| c.contains(&format!("Bearer {key}"))));
    let (midwives_url, midwives) = put_command(curls[0]);
    assert!(curls[2].contains("based-on=CommunicationRequest/demo-midwives"));
    // Keep reading the rest so the demo's stdout stays open.
    let drain = std::thread::spawn(move || lines.count());

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = runtime.block_on(async {
        mhero::install_tls_provider();
        reqwest::Client::new()
    });
    let get = |url: String| {
        runtime.block_on(async {
            let response = client.get(url).bearer_auth(&key).send().await.unwrap();
            assert!(response.status().is_success(), "{}", response.status());
            response.json::<serde_json::Value>().await.unwrap()
        })
    };
    let unauthorized = runtime.block_on(async {
        client
            .get(format!("{fhir_base}/Practitioner"))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(unauthorized.as_u16(), 401, "the demo needs its key");
    let total = get(format!("{fhir_base}/Practitioner?_summary=count"))["total"].as_u64();
    assert_eq!(
        total,
        Some(mhero::cli::demo::demo_practitioner_count() as u64)
    );
    let workspace = runtime.block_on(async {
        client
            .get(format!("{sandbox_url}/api/v2/workspace.json"))
            .header("Authorization", "Token sandbox-token")
            .send()
            .await
            .unwrap()
            .status()
    });
    assert!(
        workspace.is_success(),
        "the sandbox answers with the printed token"
    );

    // The banner's first command: a message to Rushonga's midwives.
    let put = runtime.block_on(async {
        client
            .put(&midwives_url)
            .bearer_auth(&key)
            .header("Content-Type", "application/fhir+json")
            .json(&midwives)
            .send()
            .await
            .unwrap()
            .status()
    });
    assert!(put.is_success(), "PUT {midwives_url}: {put}");
    // Bounded poll (a black-box process): the dispatcher sends it.
    let outbox = format!("{fhir_base}/Communication?based-on=CommunicationRequest/demo-midwives");
    let mut communications = Vec::new();
    for _ in 0..100 {
        let bundle = get(outbox.clone());
        communications = bundle["entry"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e["resource"].clone())
            .collect();
        if !communications.is_empty() && communications.iter().all(|c| c["status"] == "in-progress")
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        !communications.is_empty(),
        "at least one midwife is messaged"
    );
    for c in &communications {
        assert_eq!(c["status"], "in-progress", "{c}");
        let recipient = c["recipient"][0]["reference"].as_str().unwrap_or_default();
        assert!(recipient.starts_with("Practitioner/"), "{c}");
    }

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM is a graceful stop");
    drain.join().unwrap();
}

#[test]
fn check_reaches_rapidpro_and_names_a_bad_token() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sandbox = runtime
        .block_on(mhero::rapidpro::sandbox::SandboxServer::start(
            Default::default(),
        ))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = |token: &str| {
        mhero(&dir)
            .arg("check")
            .env("MHERO__RAPIDPRO__BASE_URL", sandbox.base_url())
            .env("MHERO__RAPIDPRO__TOKEN", token)
            .env("MHERO__RAPIDPRO__MAX_RETRIES", "0")
            .output()
            .unwrap()
    };
    let ok = run("sandbox-token");
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{stdout}");
    assert!(
        stdout.contains("rapidpro (") && stdout.contains(": ok: workspace"),
        "{stdout}"
    );
    let bad = run("wrong-token");
    let stdout = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("rapidpro (") && stdout.contains("FAILED"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("wrong-token"),
        "the token is never printed"
    );
    runtime.block_on(sandbox.shutdown()).unwrap();
}

#[test]
fn sync_contacts_pushes_people_to_rapidpro_and_needs_it_configured() {
    let dir = tempfile::tempdir().unwrap();
    let people = dir.path().join("people.ndjson");
    std::fs::write(
        &people,
        "{\"resourceType\":\"Practitioner\",\"id\":\"hw1\",\"name\":[{\"text\":\"Musu Flomo\"}],\"telecom\":[{\"system\":\"phone\",\"value\":\"077 000 5001\"}]}\n",
    )
    .unwrap();
    assert!(
        mhero(&dir)
            .arg("import")
            .arg(&people)
            .output()
            .unwrap()
            .status
            .success()
    );

    for target in ["contacts", "groups", "all"] {
        let unconfigured = mhero(&dir).args(["sync", target]).output().unwrap();
        assert_eq!(unconfigured.status.code(), Some(2), "sync {target}");
        assert!(String::from_utf8_lossy(&unconfigured.stderr).contains("rapidpro.base_url"));
    }

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sandbox = runtime
        .block_on(mhero::rapidpro::sandbox::SandboxServer::start(
            Default::default(),
        ))
        .unwrap();
    let output = mhero(&dir)
        .args(["sync", "contacts"])
        .env("MHERO__RAPIDPRO__BASE_URL", sandbox.base_url())
        .env("MHERO__RAPIDPRO__TOKEN", sandbox.token())
        .env("MHERO__PHONE__DEFAULT_COUNTRY", "LR")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("1 created"), "{stdout}");
    assert!(
        stdout.contains("from RapidPro: 1 contacts read"),
        "{stdout}"
    );
    let state = sandbox.sandbox().state();
    assert_eq!(state["contacts"][0]["urns"][0], "tel:+231770005001");
    let all = mhero(&dir)
        .args(["sync", "all"])
        .env("MHERO__RAPIDPRO__BASE_URL", sandbox.base_url())
        .env("MHERO__RAPIDPRO__TOKEN", sandbox.token())
        .env("MHERO__PHONE__DEFAULT_COUNTRY", "LR")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&all.stdout);
    assert!(all.status.success(), "{stdout}");
    assert!(
        stdout.contains("0 created, 0 updated, 1 unchanged")
            && stdout.contains("groups: 0 examined"),
        "{stdout}"
    );
    runtime.block_on(sandbox.shutdown()).unwrap();
}

#[test]
fn sync_flows_writes_workflow_basics() {
    let dir = tempfile::tempdir().unwrap();
    for what in ["flows", "messages", "runs"] {
        let unconfigured = mhero(&dir).args(["sync", what]).output().unwrap();
        assert_eq!(unconfigured.status.code(), Some(2), "{what}");
        assert!(
            String::from_utf8_lossy(&unconfigured.stderr).contains("rapidpro.base_url"),
            "{what}"
        );
    }

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sandbox = runtime
        .block_on(mhero::rapidpro::sandbox::SandboxServer::start(
            Default::default(),
        ))
        .unwrap();
    sandbox
        .sandbox()
        .load_flow_export(&common::fixture("rapidpro/flows/color_v13.json"))
        .unwrap();
    let sync = |target: &str| {
        mhero(&dir)
            .args(["sync", target])
            .env("MHERO__RAPIDPRO__BASE_URL", sandbox.base_url())
            .env("MHERO__RAPIDPRO__TOKEN", sandbox.token())
            .env("MHERO__PHONE__DEFAULT_COUNTRY", "LR")
            .output()
            .unwrap()
    };
    let first = sync("flows");
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{stdout}");
    assert!(
        stdout.contains("flows: 1 read from RapidPro (0 archived): 1 created"),
        "{stdout}"
    );
    let all = sync("all");
    let stdout = String::from_utf8_lossy(&all.stdout);
    assert!(all.status.success(), "{stdout}");
    assert!(
        stdout.contains(
            "flows: 1 read from RapidPro (0 archived): 0 created, 0 updated, 1 unchanged"
        ),
        "{stdout}"
    );
    runtime.block_on(sandbox.shutdown()).unwrap();
}

#[test]
fn sync_runs_records_flow_results_once() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sandbox = runtime
        .block_on(mhero::rapidpro::sandbox::SandboxServer::start(
            Default::default(),
        ))
        .unwrap();
    sandbox
        .sandbox()
        .load_flow_export(&common::fixture("rapidpro/flows/color_v13.json"))
        .unwrap();
    // Someone writes in and is put in the flow (no flow start of ours).
    let contact = sandbox
        .sandbox()
        .receive_message("tel:+231770005001", "hi")
        .unwrap();
    let flow = common::fixture("rapidpro/flows/color_v13.json")["flows"][0]["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let client = runtime.block_on(common::rapidpro_client_for(&sandbox));
    runtime
        .block_on(
            client.create_flow_start(&mhero::rapidpro::types::FlowStartWrite {
                flow,
                contacts: vec![contact],
                ..Default::default()
            }),
        )
        .unwrap();
    sandbox.sandbox().process_flow_starts();
    let sync = || {
        mhero(&dir)
            .args(["sync", "runs"])
            .env("MHERO__RAPIDPRO__BASE_URL", sandbox.base_url())
            .env("MHERO__RAPIDPRO__TOKEN", sandbox.token())
            .output()
            .unwrap()
    };
    let first = sync();
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{stdout}");
    assert!(stdout.contains("runs: 1 examined: 1 created"), "{stdout}");
    let second = sync();
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(
        stdout.contains("runs: 1 examined: 0 created, 0 updated, 1 unchanged"),
        "{stdout}"
    );
    runtime.block_on(sandbox.shutdown()).unwrap();
}
