//! The `mhero` binary: command-line parsing and dispatch. Exit codes: 0 ok,
//! 1 runtime failure, 2 bad usage or configuration.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use mhero::config::{FhirBackendKind, Settings};
use mhero::startup::Application;
use mhero::store::open_store;

#[derive(Parser)]
#[command(
    name = "mhero",
    version,
    about = "mHero connector: FHIR R4 in, RapidPro out"
)]
struct Cli {
    /// Configuration file (TOML); also MHERO_CONFIG.
    #[arg(long, global = true, env = "MHERO_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the connector (HTTP API and background jobs) until SIGINT/SIGTERM.
    Serve,
    /// One-command tour on this machine: iHRIS demo health workers and facilities, the RapidPro sandbox, messages and a survey.
    Demo {
        /// Where the demo keeps its data.
        #[arg(long, default_value = "data/demo")]
        data: PathBuf,
    },
    /// Run the RapidPro API v2 sandbox alone.
    RapidproSandbox {
        /// Address to listen on (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: String,
        /// Accepted API token (repeatable); default "sandbox-token".
        #[arg(long)]
        token: Vec<String>,
        /// Throttle rate for every scope, DRF syntax (e.g. 3600/hour, 5/min).
        #[arg(long, default_value = "3600/hour")]
        throttle_rate: String,
        /// Latency added to every API request, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Fraction of API requests answered 500 (0.0 to 1.0).
        #[arg(long, default_value_t = 0.0)]
        error_rate: f64,
        /// RapidPro flow export (spec 13) to serve from flows.json (repeatable).
        #[arg(long)]
        flows: Vec<PathBuf>,
        /// Process broadcasts, flow starts and messages at once instead of on POST /_sandbox/tick.
        #[arg(long)]
        auto_process: bool,
    },
    /// One sync pass now.
    Sync {
        what: SyncTarget,
        #[arg(long)]
        full: bool,
    },
    /// Rebuild the contact index from the FHIR store.
    Reindex,
    /// Load FHIR Bundles (JSON) or NDJSON files into the store.
    Import {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Validate the configuration and reach every configured backend.
    Check,
}

#[derive(Clone, Copy, ValueEnum)]
enum SyncTarget {
    Contacts,
    Groups,
    Flows,
    Messages,
    Runs,
    All,
}

fn load_settings(path: Option<&std::path::Path>) -> Result<Settings, ExitCode> {
    Settings::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match load_settings(cli.config.as_deref()) {
        Ok(s) => s,
        Err(code) => return code,
    };
    mhero::telemetry::init(settings.server.log_format);
    match cli.command {
        Command::Serve => serve(settings).await,
        Command::Demo { data } => demo(settings, data).await,
        Command::RapidproSandbox {
            listen,
            token,
            throttle_rate,
            latency_ms,
            error_rate,
            flows,
            auto_process,
        } => {
            let options = SandboxOptions {
                auto_process,
                listen,
                tokens: token,
                throttle_rate,
                latency_ms,
                error_rate,
                flows,
            };
            rapidpro_sandbox(options).await
        }
        Command::Sync {
            what: SyncTarget::Contacts,
            full,
        } => sync_contacts(settings, full).await,
        Command::Sync {
            what: SyncTarget::Groups,
            full,
        } => sync_groups(&settings, full).await,
        Command::Sync {
            what: SyncTarget::All,
            full,
        } => {
            let contacts = sync_contacts(settings.clone(), full).await;
            if contacts != ExitCode::SUCCESS {
                return contacts;
            }
            let groups = sync_groups(&settings, full).await;
            if groups != ExitCode::SUCCESS {
                return groups;
            }
            sync_flows(&settings).await
        }
        Command::Sync {
            what: SyncTarget::Flows,
            ..
        } => sync_flows(&settings).await,
        Command::Sync {
            what: SyncTarget::Messages,
            ..
        } => sync_messages(&settings).await,
        Command::Sync {
            what: SyncTarget::Runs,
            ..
        } => sync_runs(&settings).await,
        Command::Reindex => reindex(&settings).await,
        Command::Import { files } => import(settings, files).await,
        Command::Check => check(settings).await,
    }
}

async fn serve(settings: Settings) -> ExitCode {
    let app = match Application::build(settings).await {
        Ok(app) => app,
        Err(mhero::startup::StartupError::Config(e)) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    match app.run_until_stopped().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("server error: {e}");
            ExitCode::from(1)
        }
    }
}

async fn demo(mut settings: Settings, data: PathBuf) -> ExitCode {
    use mhero::cli::demo;
    settings.fhir.backend = FhirBackendKind::Embedded;
    settings.fhir.embedded.path = data.join("fhir.sqlite");
    settings.index.embedded.path = data.join("index");
    if settings.phone.default_country.is_none() {
        settings.phone.default_country = Some("LR".into());
    }
    let phones = match mhero::pipeline::phone::PhoneNormalizer::from_settings(&settings.phone) {
        Ok(phones) => phones,
        Err(e) => {
            eprintln!("phone.default_country: {e}");
            return ExitCode::from(2);
        }
    };
    let store = match open_store(&settings.fhir).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("cannot open the demo store: {e}");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = demo::load_demo_data(store.as_ref(), &phones).await {
        eprintln!("cannot load the demo data: {e}");
        return ExitCode::from(1);
    }
    // The RapidPro sandbox, in-process, unless a real workspace is configured.
    let sandbox = if settings.rapidpro.base_url.is_none() {
        let sandbox = match demo::start_sandbox().await {
            Ok(sandbox) => sandbox,
            Err(e) => {
                eprintln!("cannot start the RapidPro sandbox: {e}");
                return ExitCode::from(1);
            }
        };
        demo::point_at_sandbox(&mut settings, &sandbox);
        Some(sandbox)
    } else {
        None
    };
    let api_key = demo::ensure_api_key(&mut settings);
    let app = match Application::build_with_store(settings, store).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    // The health workers' side of the conversation, in the sandbox only.
    let stop = app.shutdown_token();
    let responder = sandbox.as_ref().and_then(|sandbox| {
        let export = demo::survey_export().ok()?;
        Some(
            demo::DemoResponder::new(sandbox.sandbox().clone(), &[export], demo::REPLY_AFTER)
                .spawn(demo::RESPONDER_EVERY, stop.clone()),
        )
    });
    // A closed stdout (a pipe whose reader went away) must not stop the demo.
    let _ = writeln!(
        std::io::stdout(),
        "{}",
        demo::banner(app.fhir_base(), api_key.as_deref(), sandbox.as_ref())
    );
    let result = app.run_until_stopped().await;
    stop.cancel();
    if let Some(responder) = responder {
        let _ = responder.await;
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("server error: {e}");
            ExitCode::from(1)
        }
    }
}

struct SandboxOptions {
    listen: String,
    tokens: Vec<String>,
    throttle_rate: String,
    latency_ms: u64,
    error_rate: f64,
    flows: Vec<PathBuf>,
    auto_process: bool,
}

async fn rapidpro_sandbox(options: SandboxOptions) -> ExitCode {
    use mhero::rapidpro::sandbox::{Rate, SandboxServer, SandboxSettings};
    let SandboxOptions {
        listen,
        tokens,
        throttle_rate,
        latency_ms,
        error_rate,
        flows,
        auto_process,
    } = options;
    let mut exports = Vec::new();
    for path in &flows {
        let parsed = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                serde_json::from_str::<serde_json::Value>(&text).map_err(|e| e.to_string())
            });
        match parsed {
            Ok(export) => exports.push((path, export)),
            Err(e) => {
                eprintln!("--flows {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    let Ok(listen) = listen.parse() else {
        eprintln!("--listen {listen:?} is not an address like 127.0.0.1:8090");
        return ExitCode::from(2);
    };
    let rate: Rate = match throttle_rate.parse() {
        Ok(rate) => rate,
        Err(e) => {
            eprintln!("--throttle-rate: {e}");
            return ExitCode::from(2);
        }
    };
    if !(0.0..=1.0).contains(&error_rate) {
        eprintln!("--error-rate must be between 0.0 and 1.0");
        return ExitCode::from(2);
    }
    let mut settings = SandboxSettings {
        listen,
        latency: std::time::Duration::from_millis(latency_ms),
        error_rate,
        auto_process,
        ..SandboxSettings::default()
    }
    .with_throttle_rate(rate);
    if !tokens.is_empty() {
        settings.tokens = tokens;
    }
    let server = match SandboxServer::start(settings).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("cannot listen on {listen}: {e}");
            return ExitCode::from(1);
        }
    };
    for (path, export) in &exports {
        if let Err(e) = server.sandbox().load_flow_export(export) {
            eprintln!("--flows {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    let _ = writeln!(
        std::io::stdout(),
        "RapidPro API v2 sandbox listening on {base}/api/v2/\n  token: {token}\n  try: curl -H 'Authorization: Token {token}' {base}/api/v2/workspace.json\n  inspection: {base}/_sandbox/calls, /_sandbox/state, /_sandbox/knobs, POST /_sandbox/reset",
        base = server.base_url(),
        token = server.token()
    );
    let stop = server.shutdown_token();
    tokio::spawn(async move {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate => {}
        }
        stop.cancel();
    });
    match server.wait().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandbox error: {e}");
            ExitCode::from(1)
        }
    }
}

async fn import(settings: Settings, files: Vec<PathBuf>) -> ExitCode {
    let store = match open_store(&settings.fhir).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("cannot open the FHIR store: {e}");
            return ExitCode::from(1);
        }
    };
    let summary = mhero::cli::import::import_files(store.as_ref(), &files).await;
    print!("{summary}");
    if summary.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Prints what a sync pass wrote and gives its exit code: 0; 1 when the
/// pass failed or `clean` says it left something out; 2 for configuration.
fn sync_exit(result: Result<(String, bool), mhero::cli::sync::SyncCommandError>) -> ExitCode {
    match result {
        Ok((report, clean)) => {
            print!("{report}");
            if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(mhero::cli::sync::SyncCommandError::Config(e)) => {
            eprintln!("cannot sync: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("sync failed: {e}");
            ExitCode::from(1)
        }
    }
}

async fn sync_contacts(settings: Settings, full: bool) -> ExitCode {
    sync_exit(
        mhero::cli::sync::sync_contacts(&settings, full)
            .await
            .map(|(pushed, pulled)| {
                let clean = pushed.failures.is_empty() && pulled.failures.is_empty();
                (format!("{pushed}{pulled}"), clean)
            }),
    )
}

async fn sync_groups(settings: &Settings, full: bool) -> ExitCode {
    sync_exit(
        mhero::cli::sync::sync_groups(settings, full)
            .await
            .map(|r| (r.to_string(), r.failures.is_empty())),
    )
}

async fn sync_flows(settings: &Settings) -> ExitCode {
    sync_exit(
        mhero::cli::sync::sync_flows(settings)
            .await
            .map(|r| (r.to_string(), r.skipped.is_empty())),
    )
}

async fn sync_messages(settings: &Settings) -> ExitCode {
    sync_exit(
        mhero::cli::sync::sync_messages(settings)
            .await
            .map(|(delivery, inbound)| (format!("{delivery}{inbound}"), true)),
    )
}

async fn sync_runs(settings: &Settings) -> ExitCode {
    sync_exit(
        mhero::cli::sync::sync_runs(settings)
            .await
            .map(|r| (r.to_string(), r.failures.is_empty())),
    )
}

async fn reindex(settings: &Settings) -> ExitCode {
    match mhero::cli::reindex::reindex(settings).await {
        Ok(count) => {
            println!(
                "contact index rebuilt: {count} people in {}",
                settings.index.embedded.path.display()
            );
            ExitCode::SUCCESS
        }
        Err(mhero::cli::reindex::ReindexError::Config(e)) => {
            eprintln!("cannot reindex: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("reindex failed: {e}");
            ExitCode::from(1)
        }
    }
}

async fn check(settings: Settings) -> ExitCode {
    println!("configuration: ok");
    let lines = mhero::cli::check::check_backends(&settings).await;
    let mut failed = false;
    for line in &lines {
        println!(
            "{}: {}: {}",
            line.backend,
            if line.ok { "ok" } else { "FAILED" },
            line.detail
        );
        failed |= !line.ok;
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
