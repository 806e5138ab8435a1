//! Building and running the application: open the store, bind the
//! listener, assemble the router, serve until SIGINT/SIGTERM (or a
//! cancellation token, for tests), then drain in-flight requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState};
use crate::config::{ConfigError, Settings};
use crate::jobs::contact_sync::ContactSyncJob;
use crate::jobs::delivery_poll::{DeliveryPoll, DeliveryPollJob};
use crate::jobs::dispatch::{DispatchJob, Dispatcher};
use crate::jobs::flow_sync::FlowSyncJob;
use crate::jobs::inbound_poll::{InboundPoll, InboundPollJob};
use crate::jobs::index_sync::{IndexHealth, IndexSync, IndexSyncJob};
use crate::jobs::rapidpro_directory::RapidProDirectory;
use crate::jobs::runner::{self, Nudge};
use crate::jobs::schedule::{ScheduleJob, Scheduler};
use crate::pipeline::phone::PhoneNormalizer;
use crate::pipeline::writeback::WritebackConfig;
use crate::rapidpro::client::RapidProClient;
use crate::rapidpro::throttle::Throttle;
use crate::store::metered::MeteredStore;
use crate::store::{SharedStore, StoreError, open_store};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the FHIR store: {0}")]
    Store(#[from] StoreError),
    /// A file of `fhir-profiles/` could not be written to the store.
    #[error("cannot load the FHIR profiles: {0}")]
    Profiles(#[from] crate::fhir::profiles::ProfileError),
    #[error("cannot open the contact index: {0}")]
    Index(#[from] crate::index::IndexError),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Application {
    listener: TcpListener,
    address: SocketAddr,
    state: AppState,
    shutdown: CancellationToken,
    /// The store did not answer at build time: load `fhir-profiles/` in
    /// `run_until_stopped`, once it does.
    profiles_pending: bool,
    /// The contact sync, the dispatcher and the flow sync, when RapidPro is
    /// configured.
    jobs: Option<RapidProJobs>,
    /// Follows the store into the contact index.
    index_sync: Arc<IndexSyncJob>,
}

/// The jobs that talk to RapidPro, sharing one client (and so one throttle
/// budget), each with the nudge that starts a pass at once.
struct RapidProJobs {
    contact_sync: (Arc<ContactSyncJob>, Nudge),
    dispatch: (Arc<DispatchJob>, Nudge),
    flow_sync: (Arc<FlowSyncJob>, Nudge),
    /// Creates the requests of due cron firings; nudges `dispatch`.
    schedule: (Arc<ScheduleJob>, Nudge),
    /// RapidPro's delivery status into the outbox.
    delivery_poll: Arc<DeliveryPollJob>,
    /// Replies outside flows, and STOP/START.
    inbound_poll: Arc<InboundPollJob>,
    /// Flow results (runs -> QuestionnaireResponses).
    run_poll: Arc<crate::jobs::run_poll::RunPollJob>,
}

/// The RapidPro jobs, if `rapidpro.base_url` and `rapidpro.token` are set.
fn rapidpro_jobs(
    settings: &Settings,
    store: &SharedStore,
) -> Result<Option<RapidProJobs>, StartupError> {
    let rapidpro = &settings.rapidpro;
    if rapidpro.base_url.is_none() || rapidpro.token.is_none() {
        tracing::warn!(
            "rapidpro.base_url or rapidpro.token is not set: contact sync and sending are paused"
        );
        return Ok(None);
    }
    let phones = PhoneNormalizer::from_settings(&settings.phone)
        .map_err(|e| ConfigError(format!("phone.default_country: {e}")))?;
    crate::install_tls_provider();
    let throttle = Throttle::new(&rapidpro.rate_per_hour);
    let client = RapidProClient::from_settings(rapidpro, throttle)
        .map_err(|e| ConfigError(e.to_string()))?;
    let directory =
        RapidProDirectory::new(client.clone()).with_extra_fields(rapidpro.extra_fields.clone());
    let delivery_client = client.clone();
    let dispatcher = Dispatcher::new(
        Arc::clone(store),
        client.clone(),
        Arc::new(phones.clone()),
        settings.messaging.clone(),
    );
    let run_poll = crate::jobs::run_poll::RunPollJob {
        store: Arc::clone(store),
        client: client.clone(),
        overlap: chrono::Duration::seconds(settings.messaging.run_poll_overlap_secs as i64),
        writeback: (!settings.writeback.is_empty()).then(|| WritebackConfig {
            rules: settings.writeback.clone(),
            phones: phones.clone(),
        }),
    };
    let flow_sync = FlowSyncJob {
        store: Arc::clone(store),
        client: client.clone(),
    };
    let contact_sync = ContactSyncJob {
        store: Arc::clone(store),
        client,
        directory,
        phones,
        import_unknown_contacts: rapidpro.import_unknown_contacts,
        poll_overlap: chrono::Duration::seconds(rapidpro.contact_poll_overlap_secs as i64),
        groups_source: settings.groups.source,
    };
    let dispatch_nudge = Nudge::default();
    let schedule = ScheduleJob {
        scheduler: Scheduler {
            store: Arc::clone(store),
            settings: settings.messaging.clone(),
        },
        dispatch: Some(dispatch_nudge.clone()),
    };
    Ok(Some(RapidProJobs {
        contact_sync: (Arc::new(contact_sync), Nudge::default()),
        flow_sync: (Arc::new(flow_sync), Nudge::default()),
        dispatch: (Arc::new(DispatchJob(dispatcher)), dispatch_nudge),
        schedule: (Arc::new(schedule), Nudge::default()),
        delivery_poll: Arc::new(DeliveryPollJob(DeliveryPoll {
            store: Arc::clone(store),
            client: delivery_client.clone(),
        })),
        inbound_poll: Arc::new(InboundPollJob(InboundPoll {
            store: Arc::clone(store),
            client: delivery_client,
            settings: settings.messaging.clone(),
            overlap: Duration::from_secs(rapidpro.contact_poll_overlap_secs),
        })),
        run_poll: Arc::new(run_poll),
    }))
}

impl Application {
    /// Open the configured store and bind `server.listen` (port 0 picks a free port).
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        settings.validate_for_serving()?;
        let store = open_store(&settings.fhir).await?;
        Self::build_with_store(settings, store).await
    }

    /// Like [`Application::build`] with a store made by the caller. The
    /// conformance resources of `fhir-profiles/` are written to the store
    /// first (unchanged ones make no new version).
    pub async fn build_with_store(
        settings: Settings,
        store: SharedStore,
    ) -> Result<Self, StartupError> {
        settings.validate_for_serving()?;
        let address = settings.server.listen;
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| StartupError::Bind { address, source })?;
        let address = listener
            .local_addr()
            .map_err(|source| StartupError::Bind { address, source })?;
        let public_base = match &settings.server.public_base_url {
            Some(url) => url.as_str().trim_end_matches('/').to_string(),
            None => format!("http://{address}"),
        };
        // A store that does not answer yet (HAPI starting) is no reason
        // not to start: `serve` loads the profiles once it answers. A file
        // the store refuses is.
        let profiles_pending = match crate::fhir::profiles::load_profiles(store.as_ref()).await {
            Ok(loaded) => {
                tracing::info!(
                    written = loaded.written,
                    unchanged = loaded.unchanged,
                    "FHIR profiles loaded"
                );
                false
            }
            Err(e) if e.unavailable => {
                tracing::warn!(error = %e, "the FHIR store does not answer; the FHIR profiles will be loaded when it does");
                true
            }
            Err(e) => return Err(e.into()),
        };
        let store: SharedStore = Arc::new(MeteredStore::new(store));
        let jobs = rapidpro_jobs(&settings, &store)?;
        let index = crate::index::open_index(&settings.index).await?;
        let index_health = IndexHealth::default();
        let index_sync = Arc::new(IndexSyncJob(IndexSync::new(
            Arc::clone(&store),
            Arc::clone(&index),
            PhoneNormalizer::from_settings(&settings.phone)
                .map_err(|e| ConfigError(format!("phone.default_country: {e}")))?,
            chrono::Duration::seconds(settings.index.follow_overlap_secs as i64),
            index_health.clone(),
        )));
        let state = AppState {
            store,
            settings: Arc::new(settings),
            fhir_base: format!("{public_base}/fhir"),
            metrics: api::metrics::prometheus_handle(),
            contact_sync: jobs.as_ref().map(|j| j.contact_sync.1.clone()),
            dispatch: jobs.as_ref().map(|j| j.dispatch.1.clone()),
            flow_sync: jobs.as_ref().map(|j| j.flow_sync.1.clone()),
            schedule: jobs.as_ref().map(|j| j.schedule.1.clone()),
            index,
            index_health,
            index_sync: Nudge::default(),
        };
        Ok(Application {
            listener,
            address,
            state,
            shutdown: CancellationToken::new(),
            profiles_pending,
            jobs,
            index_sync,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// Absolute base of the FHIR API (`http://host:port/fhir`).
    pub fn fhir_base(&self) -> &str {
        &self.state.fhir_base
    }

    /// Cancelling this token stops the server gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serve until SIGINT/SIGTERM or the shutdown token, then let in-flight
    /// requests finish (at most `server.shutdown_grace_secs`).
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let grace = Duration::from_secs(self.state.settings.server.shutdown_grace_secs);
        let token = self.shutdown.clone();
        let signal_token = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown_signal() => signal_token.cancel(),
                _ = signal_token.cancelled() => {}
            }
        });
        tracing::info!(address = %self.address, fhir_base = %self.state.fhir_base, backend = self.state.store.backend_name(), "mHero connector listening");
        let jobs = TaskTracker::new();
        if self.profiles_pending {
            let store = Arc::clone(&self.state.store);
            let cancel = token.clone();
            jobs.spawn(async move {
                crate::fhir::profiles::load_profiles_when_available(
                    store.as_ref(),
                    Duration::from_secs(1),
                    cancel,
                )
                .await;
            });
        }
        runner::spawn(
            self.index_sync,
            Duration::from_secs(self.state.settings.index.follow_interval_secs.max(1)),
            self.state.index_sync.clone(),
            token.clone(),
            &jobs,
        );
        if let Some(RapidProJobs {
            contact_sync,
            dispatch,
            flow_sync,
            schedule,
            delivery_poll,
            inbound_poll,
            run_poll,
        }) = self.jobs
        {
            let settings = &self.state.settings;
            let interval = Duration::from_secs(settings.rapidpro.contact_sync_interval_secs);
            runner::spawn(
                contact_sync.0,
                interval,
                contact_sync.1,
                token.clone(),
                &jobs,
            );
            let interval = Duration::from_secs(settings.messaging.dispatch_interval_secs);
            runner::spawn(dispatch.0, interval, dispatch.1, token.clone(), &jobs);
            // Nothing in the connector changes flows: no nudge, the interval only.
            let interval = Duration::from_secs(settings.messaging.flow_sync_interval_secs);
            runner::spawn(flow_sync.0, interval, flow_sync.1, token.clone(), &jobs);
            let interval = Duration::from_secs(settings.messaging.schedule_interval_secs);
            runner::spawn(schedule.0, interval, schedule.1, token.clone(), &jobs);
            let interval = Duration::from_secs(settings.messaging.delivery_poll_interval_secs);
            runner::spawn(
                delivery_poll,
                interval,
                Nudge::default(),
                token.clone(),
                &jobs,
            );
            runner::spawn(
                inbound_poll,
                interval,
                Nudge::default(),
                token.clone(),
                &jobs,
            );
            let interval = Duration::from_secs(settings.messaging.run_poll_interval_secs);
            runner::spawn(run_poll, interval, Nudge::default(), token.clone(), &jobs);
        }
        jobs.close();
        let router = api::router(self.state);
        let drain_token = token.clone();
        let server = axum::serve(self.listener, router)
            .with_graceful_shutdown(async move { drain_token.cancelled().await });
        let server = tokio::spawn(async move { server.await });
        token.cancelled().await;
        tracing::info!("shutting down: draining in-flight requests");
        let served = match tokio::time::timeout(grace, server).await {
            Ok(joined) => joined.map_err(std::io::Error::other)?,
            Err(_) => {
                tracing::warn!(
                    grace_secs = grace.as_secs(),
                    "in-flight requests did not finish in time; stopping"
                );
                Ok(())
            }
        };
        // Jobs stop between passes; a pass under way may finish (and
        // release what it holds, such as the index writer).
        if tokio::time::timeout(grace, jobs.wait()).await.is_err() {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "a job pass did not finish in time; stopping"
            );
        }
        served
    }
}

async fn shutdown_signal() {
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
}
