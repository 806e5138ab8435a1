//! `mhero sync contacts|groups|flows|messages|all [--full]`: one sync pass now,
//! with a progress bar on a terminal and a summary.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Settings;
use crate::jobs::contact_status_poll::{ContactStatusPoll, StatusPollReport};
use crate::jobs::contact_sync::{ContactSync, SyncReport};
use crate::jobs::delivery_poll::{DeliveryPoll, DeliveryReport};
use crate::jobs::flow_sync::{FlowSync, FlowSyncReport};
use crate::jobs::group_sync::{GroupSync, GroupSyncReport};
use crate::jobs::inbound_poll::{InboundPoll, InboundReport};
use crate::jobs::rapidpro_directory::RapidProDirectory;
use crate::pipeline::phone::PhoneNormalizer;
use crate::rapidpro::client::RapidProClient;
use crate::rapidpro::throttle::Throttle;
use crate::store::open_store;

/// Why a sync could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum SyncCommandError {
    /// Bad or missing configuration (exit 2).
    #[error("{0}")]
    Config(String),
    /// A backend failed (exit 1).
    #[error("{0}")]
    Runtime(String),
}

/// The group sync: `groups.source` decides the direction; `full`
/// re-checks every group against RapidPro (undoing hand edits there).
pub async fn sync_groups(
    settings: &Settings,
    full: bool,
) -> Result<GroupSyncReport, SyncCommandError> {
    crate::install_tls_provider();
    let client = RapidProClient::from_settings(
        &settings.rapidpro,
        Throttle::new(&settings.rapidpro.rate_per_hour),
    )
    .map_err(|e| SyncCommandError::Config(e.to_string()))?;
    let directory = RapidProDirectory::new(client);
    let store = open_store(&settings.fhir)
        .await
        .map_err(|e| SyncCommandError::Runtime(e.to_string()))?;
    let sync = GroupSync {
        store: store.as_ref(),
        directory: &directory,
        source: settings.groups.source,
    };
    let report = if full {
        sync.reconcile().await
    } else {
        sync.run_once().await
    };
    report.map_err(|e| SyncCommandError::Runtime(e.to_string()))
}

/// What the RapidPro passes need: the client, the store, and a spinner on
/// a terminal (hidden otherwise).
async fn client_store_and_spinner(
    settings: &Settings,
) -> Result<(RapidProClient, crate::store::SharedStore, ProgressBar), SyncCommandError> {
    crate::install_tls_provider();
    let client = RapidProClient::from_settings(
        &settings.rapidpro,
        Throttle::new(&settings.rapidpro.rate_per_hour),
    )
    .map_err(|e| SyncCommandError::Config(e.to_string()))?;
    let store = open_store(&settings.fhir)
        .await
        .map_err(|e| SyncCommandError::Runtime(e.to_string()))?;
    let progress = if std::io::stderr().is_terminal() {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    Ok((client, store, progress))
}

/// The flow sync: every RapidPro flow -> a FHIR Basic (mHeroWorkflows).
/// Every pass reads all flows, so `--full` changes nothing.
pub async fn sync_flows(settings: &Settings) -> Result<FlowSyncReport, SyncCommandError> {
    let (client, store, progress) = client_store_and_spinner(settings).await?;
    progress.set_style(
        ProgressStyle::with_template("{spinner} syncing flows: {pos} read from RapidPro")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    progress.enable_steady_tick(std::time::Duration::from_millis(120));
    let sync = FlowSync {
        store: store.as_ref(),
        client: &client,
    };
    let report = sync.run_with_progress(&progress).await;
    progress.finish_and_clear();
    report.map_err(|e| SyncCommandError::Runtime(e.to_string()))
}

/// The message polls: RapidPro's delivery status into the outbox of every
/// request still being delivered, then replies outside flows (and
/// STOP/START).
pub async fn sync_messages(
    settings: &Settings,
) -> Result<(DeliveryReport, InboundReport), SyncCommandError> {
    let (client, store, progress) = client_store_and_spinner(settings).await?;
    progress.set_message("reading delivery status from RapidPro");
    progress.enable_steady_tick(std::time::Duration::from_millis(120));
    let failed = |e: &dyn std::fmt::Display| {
        SyncCommandError::Runtime(crate::telemetry::redact_phones(&e.to_string()))
    };
    let delivery = DeliveryPoll {
        store: std::sync::Arc::clone(&store),
        client: client.clone(),
    }
    .run_once()
    .await
    .map_err(|e| failed(&e));
    let inbound = InboundPoll {
        store,
        client,
        settings: settings.messaging.clone(),
        overlap: std::time::Duration::from_secs(settings.rapidpro.contact_poll_overlap_secs),
    }
    .run_once()
    .await
    .map_err(|e| failed(&e));
    progress.finish_and_clear();
    Ok((delivery?, inbound?))
}

/// The run poll: flow runs changed since its cursor -> QuestionnaireResponses
/// (docs/flow-results.md), with a spinner counting runs.
pub async fn sync_runs(
    settings: &Settings,
) -> Result<crate::jobs::run_poll::RunPollReport, SyncCommandError> {
    let (client, store, progress) = client_store_and_spinner(settings).await?;
    progress.set_style(
        ProgressStyle::with_template("{spinner} syncing runs: {pos} read from RapidPro")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    progress.enable_steady_tick(std::time::Duration::from_millis(120));
    let writeback = crate::pipeline::writeback::WritebackConfig::from_settings(settings)
        .map_err(|e| SyncCommandError::Config(e.to_string()))?;
    let poll = crate::jobs::run_poll::RunPoll {
        store: store.as_ref(),
        client: &client,
        overlap: chrono::Duration::seconds(settings.messaging.run_poll_overlap_secs as i64),
        writeback: writeback.as_ref(),
    };
    let report = poll.run_with_progress(|| progress.inc(1)).await;
    progress.finish_and_clear();
    report.map_err(|e| SyncCommandError::Runtime(e.to_string()))
}

impl std::fmt::Display for GroupSyncReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "groups: {} examined: {} created, {} updated, {} unchanged, {} emptied, {} ignored; {} members not yet synced, {} not messageable; {} conflicts, {} failed",
            self.examined,
            self.created,
            self.updated,
            self.unchanged,
            self.emptied,
            self.ignored,
            self.not_yet_synced,
            self.not_messageable,
            self.conflicts.len(),
            self.failures.len()
        )?;
        for conflict in &self.conflicts {
            writeln!(f, "  conflict: {conflict}")?;
        }
        for failure in &self.failures {
            writeln!(f, "  failed: {failure}")?;
        }
        Ok(())
    }
}

/// Both directions: FHIR -> RapidPro, then RapidPro -> FHIR statuses.
pub async fn sync_contacts(
    settings: &Settings,
    full: bool,
) -> Result<(SyncReport, StatusPollReport), SyncCommandError> {
    let phones = PhoneNormalizer::from_settings(&settings.phone)
        .map_err(|e| SyncCommandError::Config(format!("phone.default_country: {e}")))?;
    crate::install_tls_provider();
    let client = RapidProClient::from_settings(
        &settings.rapidpro,
        Throttle::new(&settings.rapidpro.rate_per_hour),
    )
    .map_err(|e| SyncCommandError::Config(e.to_string()))?;
    let directory = RapidProDirectory::new(client.clone())
        .with_extra_fields(settings.rapidpro.extra_fields.clone());
    let store = open_store(&settings.fhir)
        .await
        .map_err(|e| SyncCommandError::Runtime(e.to_string()))?;
    let progress = if std::io::stderr().is_terminal() {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template("{spinner} syncing contacts: {pos} people ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    progress.enable_steady_tick(std::time::Duration::from_millis(120));
    let sync = ContactSync {
        store: store.as_ref(),
        directory: &directory,
        phones: &phones,
        page_size: 100,
        progress: progress.clone(),
    };
    let pushed = sync
        .run_once(full)
        .await
        .map_err(|e| SyncCommandError::Runtime(e.to_string()));
    progress.finish_and_clear();
    let pushed = pushed?;
    let poll = ContactStatusPoll {
        store: store.as_ref(),
        client: &client,
        import_unknown_contacts: settings.rapidpro.import_unknown_contacts,
        overlap: chrono::Duration::seconds(settings.rapidpro.contact_poll_overlap_secs as i64),
    };
    let pulled = poll
        .run_once()
        .await
        .map_err(|e| SyncCommandError::Runtime(e.to_string()))?;
    Ok((pushed, pulled))
}

impl std::fmt::Display for StatusPollReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "from RapidPro: {} contacts read, {} consent changes, {} unknown to FHIR ({} imported), {} naming a missing person, {} failed",
            self.examined,
            self.consent_changes,
            self.unknown,
            self.imported,
            self.missing_people,
            self.failures.len()
        )?;
        for failure in &self.failures {
            writeln!(f, "  failed: {failure}")?;
        }
        Ok(())
    }
}

impl std::fmt::Display for SyncReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "to RapidPro: {} people examined: {} created, {} updated, {} unchanged, {} blocked (inactive), {} without a usable phone, {} conflicts, {} failed",
            self.examined,
            self.created,
            self.updated,
            self.unchanged,
            self.blocked,
            self.no_phone,
            self.conflicts.len(),
            self.failures.len()
        )?;
        for conflict in &self.conflicts {
            writeln!(f, "  conflict: {conflict}")?;
        }
        for failure in &self.failures {
            writeln!(f, "  failed: {failure}")?;
        }
        Ok(())
    }
}
