//! `mhero reindex`: rebuilds the contact index from the FHIR store (the
//! source of truth), with a progress spinner on a terminal. The embedded
//! (tantivy) index is rebuilt in place: cleared, every person written, one
//! commit at the end, so a failure part-way leaves the previous index.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::config::{IndexBackendKind, Settings};
use crate::index::document::all_documents;
use crate::index::tantivy::TantivyIndex;
use crate::index::{ContactIndex, IndexError};
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

/// Rebuilds the index; returns how many people it holds.
pub async fn reindex(settings: &Settings) -> Result<usize, ReindexError> {
    if settings.index.backend != IndexBackendKind::Embedded {
        return Err(ReindexError::Config(
            "index.backend = \"elasticsearch\" is not available yet; use \"embedded\"".into(),
        ));
    }
    let phones = PhoneNormalizer::from_settings(&settings.phone)
        .map_err(|e| ReindexError::Config(format!("phone.default_country: {e}")))?;
    let store = open_store(&settings.fhir).await?;
    let index = TantivyIndex::open(&settings.index.embedded.path)?;
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
    index.clear().await?;
    let count = all_documents(store.as_ref(), &phones, 1000, |documents| {
        let index = index.clone();
        let progress = progress.clone();
        async move {
            let n = documents.len() as u64;
            index.upsert(documents).await?;
            progress.inc(n);
            Ok::<(), ReindexError>(())
        }
    })
    .await;
    progress.finish_and_clear();
    let count = count?;
    index.commit().await?;
    Ok(count)
}
