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
    /// One-command tour on this machine: embedded store with sample health workers and facilities.
    Demo {
        /// Where the demo keeps its data.
        #[arg(long, default_value = "data/demo")]
        data: PathBuf,
    },
    /// Run the RapidPro API v2 sandbox alone.
    RapidproSandbox {
        #[arg(long)]
        listen: Option<String>,
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

fn not_yet(command: &str) -> ExitCode {
    eprintln!("`mhero {command}` is not yet available in this version; see README.md for what is.");
    ExitCode::from(1)
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
        Command::RapidproSandbox { .. } => not_yet("rapidpro-sandbox"),
        Command::Sync {
            what: SyncTarget::Contacts,
            full,
        } => sync_contacts(settings, full).await,
        Command::Sync { .. } => not_yet("sync groups|flows|messages|runs|all"),
        Command::Reindex => not_yet("reindex"),
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
    settings.fhir.backend = FhirBackendKind::Embedded;
    settings.fhir.embedded.path = data.join("fhir.sqlite");
    settings.index.embedded.path = data.join("index");
    let store = match open_store(&settings.fhir).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("cannot open the demo store: {e}");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = mhero::cli::demo::load_sample_data(store.as_ref()).await {
        eprintln!("cannot load the demo data: {e}");
        return ExitCode::from(1);
    }
    let app = match Application::build_with_store(settings, store).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    // A closed stdout (a pipe whose reader went away) must not stop the demo.
    let _ = writeln!(
        std::io::stdout(),
        "{}",
        mhero::cli::demo::banner(app.fhir_base())
    );
    match app.run_until_stopped().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("server error: {e}");
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

async fn sync_contacts(settings: Settings, full: bool) -> ExitCode {
    match mhero::cli::sync::sync_contacts(&settings, full).await {
        Ok(report) => {
            print!("{report}");
            if report.failures.is_empty() {
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
