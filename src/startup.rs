//! Building and running the application: open the store, bind the
//! listener, assemble the router, serve until SIGINT/SIGTERM (or a
//! cancellation token, for tests), then drain in-flight requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::config::{ConfigError, Settings};
use crate::store::metered::MeteredStore;
use crate::store::{SharedStore, StoreError, open_store};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the FHIR store: {0}")]
    Store(#[from] StoreError),
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
}

impl Application {
    /// Open the configured store and bind `server.listen` (port 0 picks a free port).
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        settings.validate_for_serving()?;
        let store = open_store(&settings.fhir).await?;
        Self::build_with_store(settings, store).await
    }

    /// Like [`Application::build`] with a store made by the caller.
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
        let state = AppState {
            store: Arc::new(MeteredStore::new(store)),
            settings: Arc::new(settings),
            fhir_base: format!("{public_base}/fhir"),
            metrics: api::metrics::prometheus_handle(),
        };
        Ok(Application {
            listener,
            address,
            state,
            shutdown: CancellationToken::new(),
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
        let router = api::router(self.state);
        let drain_token = token.clone();
        let server = axum::serve(self.listener, router)
            .with_graceful_shutdown(async move { drain_token.cancelled().await });
        let server = tokio::spawn(async move { server.await });
        token.cancelled().await;
        tracing::info!("shutting down: draining in-flight requests");
        match tokio::time::timeout(grace, server).await {
            Ok(joined) => joined.map_err(std::io::Error::other)?,
            Err(_) => {
                tracing::warn!(
                    grace_secs = grace.as_secs(),
                    "in-flight requests did not finish in time; stopping"
                );
                Ok(())
            }
        }
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
