//! `mhero reindex`: rebuilds the contact index from the FHIR store (the
//! source of truth), with a progress spinner on a terminal. The index is
//! rebuilt in place: cleared, every person written, one commit at the end,
//! so a failure part-way leaves the previous index. A running `mhero serve`
//! holds the embedded index and keeps it current itself.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Settings;
use crate::index::{IndexError, open_index};
use crate::jobs::index_sync::{IndexSyncError, rebuild};
use crate::pipeline::phone::PhoneNormalizer;
use crate::store::{StoreError, open_store};

/// Why a rebuild failed.
#[derive(Debug, thiserror::Error)]
pub enum ReindexError {
    /// Bad or missing configuration (exit 2).
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Index(#[from] IndexError),
}

impl From<IndexSyncError> for ReindexError {
    fn from(error: IndexSyncError) -> Self {
        match error {
            IndexSyncError::Store(e) => ReindexError::Store(e),
            IndexSyncError::Index(e) => ReindexError::Index(e),
        }
    }
}

/// Rebuilds the index; returns how many people it holds.
pub async fn reindex(settings: &Settings) -> Result<usize, ReindexError> {
    let phones = PhoneNormalizer::from_settings(&settings.phone)
        .map_err(|e| ReindexError::Config(format!("phone.default_country: {e}")))?;
    let store = open_store(&settings.fhir).await?;
    let index = open_index(&settings.index).await.map_err(|e| match e {
        IndexError::Config(reason) => ReindexError::Config(reason),
        other => ReindexError::Index(other),
    })?;
    let progress = if std::io::stderr().is_terminal() {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template("{spinner} reindexing: {pos} people")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    progress.enable_steady_tick(std::time::Duration::from_millis(120));
    let count = rebuild(&store, &index, &phones, |n| progress.inc(n as u64)).await;
    progress.finish_and_clear();
    Ok(count?)
}
