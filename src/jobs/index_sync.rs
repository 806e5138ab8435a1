//! Keeping the contact index current (docs/contact-index.md): a full
//! rebuild from the store (`rebuild`, used by `mhero reindex` and by a
//! first start), and `IndexSync`, which follows the store's history from
//! the index's checkpoint and rewrites the documents each change touches:
//! the person; a role's practitioner; a group's members before and after;
//! everyone at or under a Location; a message's recipient or a reply's
//! sender. A change to the iHRIS job terminology, or more changed people
//! than an update is worth, rebuilds everything. The checkpoint is written
//! with the index commit, so the two cannot disagree after a crash. Every
//! pass re-reads an overlap before the checkpoint (a write committed late
//! by a concurrent writer); the versions already applied there are
//! remembered and skipped, so an idle connector neither rewrites nor
//! commits anything (after a restart they are applied once more, which is
//! harmless).

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::index::document::{Directory, affects_documents, all_documents, search_any_of};
use crate::index::{ContactQuery, IndexError, SharedIndex};
use crate::pipeline::contact::PERSON_TYPES;
use crate::pipeline::phone::PhoneNormalizer;
use crate::store::{HistoryMethod, HistoryRequest, SharedStore, StoreError};

/// More changed people than this in one pass: rebuild instead.
pub const REBUILD_ABOVE: usize = 20_000;
const BATCH: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum IndexSyncError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IndexSyncReport {
    /// Store changes read (the overlap included).
    pub changes: usize,
    pub updated: usize,
    pub removed: usize,
    /// A full rebuild was made, of this many people.
    pub rebuilt: Option<usize>,
}

impl std::fmt::Display for IndexSyncReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.rebuilt {
            Some(n) => write!(f, "rebuilt the contact index: {n} people"),
            None => write!(
                f,
                "{} store changes: {} documents updated, {} removed",
                self.changes, self.updated, self.removed
            ),
        }
    }
}

/// Clears `index` and writes every person of `store` in it, committed once
/// at the end (a failure part-way leaves the previous index). The
/// checkpoint is the store's newest change before the rebuild started.
/// `progress` is told each batch's size.
pub async fn rebuild(
    store: &SharedStore,
    index: &SharedIndex,
    phones: &PhoneNormalizer,
    progress: impl Fn(usize),
) -> Result<usize, IndexSyncError> {
    let checkpoint = newest_change(store).await?.unwrap_or_else(Utc::now);
    index.clear().await?;
    let count = all_documents(store.as_ref(), phones, BATCH, |documents| {
        let index = Arc::clone(index);
        let n = documents.len();
        progress(n);
        async move {
            index.upsert(documents).await?;
            Ok::<(), IndexSyncError>(())
        }
    })
    .await?;
    index.commit(Some(checkpoint)).await?;
    Ok(count)
}

async fn newest_change(store: &SharedStore) -> Result<Option<DateTime<Utc>>, StoreError> {
    let page = store
        .history(HistoryRequest {
            count: Some(1),
            ..Default::default()
        })
        .await?;
    Ok(page.entries.first().map(|e| e.last_updated))
}

/// How far behind the store the index is, for `GET /health/ready`.
#[derive(Debug, Clone, Default)]
pub struct IndexHealth {
    state: Arc<Mutex<HealthState>>,
}

#[derive(Debug, Clone, Default)]
pub struct HealthState {
    /// When the last successful pass started: every change before it is
    /// searchable.
    pub current_as_of: Option<DateTime<Utc>>,
    /// The last pass's error, until a pass succeeds.
    pub last_error: Option<String>,
}

impl IndexHealth {
    pub fn snapshot(&self) -> HealthState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn record<T>(&self, started: DateTime<Utc>, result: &Result<T, IndexSyncError>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(_) => {
                state.current_as_of = Some(started);
                state.last_error = None;
            }
            Err(e) => state.last_error = Some(e.to_string()),
        }
    }
}

/// Follows the store into the index.
pub struct IndexSync {
    store: SharedStore,
    index: SharedIndex,
    phones: PhoneNormalizer,
    /// Re-read this much history before where the last pass stood.
    overlap: chrono::Duration,
    health: IndexHealth,
    /// Versions (`Type/id/_history/v`) in the last pass's window: already
    /// in the index.
    applied: Mutex<HashSet<String>>,
    /// When the last successful pass started: every change committed
    /// before it was read, so the next pass reads from there (less the
    /// overlap) rather than from the checkpoint, which an idle store does
    /// not move.
    last_pass: Mutex<Option<DateTime<Utc>>>,
}

fn version_key(entry: &crate::store::HistoryEntry) -> String {
    format!(
        "{}/{}/_history/{}",
        entry.resource_type, entry.id, entry.version_id
    )
}

/// What a pass's changes touch.
#[derive(Default)]
struct Touched {
    people: BTreeSet<String>,
    locations: BTreeSet<String>,
    rebuild: bool,
}

fn is_person(reference: &str) -> bool {
    reference
        .split_once('/')
        .is_some_and(|(t, id)| PERSON_TYPES.contains(&t) && !id.is_empty() && !id.contains('/'))
}

/// The people a resource version names, for the types whose changes move
/// documents.
fn people_named(resource_type: &str, resource: &Value) -> Vec<String> {
    let references: Vec<&str> = match resource_type {
        "PractitionerRole" => resource["practitioner"]["reference"]
            .as_str()
            .into_iter()
            .collect(),
        "Group" => resource["member"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["entity"]["reference"].as_str())
            .collect(),
        "Communication" => resource["recipient"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["reference"].as_str())
            .chain(resource["sender"]["reference"].as_str())
            .collect(),
        _ => Vec::new(),
    };
    references
        .into_iter()
        .filter(|r| is_person(r))
        .map(str::to_string)
        .collect()
}

impl IndexSync {
    /// A follower of `store` into `index`, re-reading `overlap` of history
    /// each pass and reporting to `health`.
    pub fn new(
        store: SharedStore,
        index: SharedIndex,
        phones: PhoneNormalizer,
        overlap: chrono::Duration,
        health: IndexHealth,
    ) -> IndexSync {
        IndexSync {
            store,
            index,
            phones,
            overlap,
            health,
            applied: Mutex::default(),
            last_pass: Mutex::default(),
        }
    }

    pub async fn run_once(&self) -> Result<IndexSyncReport, IndexSyncError> {
        let started = Utc::now();
        let result = self.pass().await;
        self.health.record(started, &result);
        if result.is_ok() {
            *self.last_pass.lock().unwrap_or_else(|p| p.into_inner()) = Some(started);
        }
        result
    }

    /// One page of the store's history since `since` (newest first).
    async fn history_page(
        &self,
        since: DateTime<Utc>,
        cursor: Option<String>,
    ) -> Result<crate::store::HistoryPage, StoreError> {
        self.store
            .history(HistoryRequest {
                since: Some(since),
                count: Some(BATCH),
                cursor,
                ..Default::default()
            })
            .await
    }

    fn remember(&self, applied: HashSet<String>) {
        *self.applied.lock().unwrap_or_else(|p| p.into_inner()) = applied;
    }

    async fn full_rebuild(&self) -> Result<IndexSyncReport, IndexSyncError> {
        // The versions the rebuild will read, so the next pass's overlap
        // does not apply them (a terminology change there would rebuild
        // again).
        let mut applied = HashSet::new();
        if let Some(newest) = newest_change(&self.store).await? {
            let mut cursor = None;
            loop {
                let page = self.history_page(newest - self.overlap, cursor).await?;
                applied.extend(page.entries.iter().map(version_key));
                match page.next_cursor {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
        }
        let count = rebuild(&self.store, &self.index, &self.phones, |_| {}).await?;
        self.remember(applied);
        Ok(IndexSyncReport {
            rebuilt: Some(count),
            ..Default::default()
        })
    }

    async fn pass(&self) -> Result<IndexSyncReport, IndexSyncError> {
        let Some(checkpoint) = self.index.checkpoint().await? else {
            return self.full_rebuild().await;
        };
        let applied = self
            .applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // From the checkpoint, or from the last pass's start if later (both
        // less the overlap). The overlap covers writes committed after
        // their timestamp, and a store clock off by less than it.
        let last_pass = *self.last_pass.lock().unwrap_or_else(|p| p.into_inner());
        let since = last_pass.map_or(checkpoint, |p| p.max(checkpoint)) - self.overlap;
        // The entries are collected page by page (a page's notes need the
        // store), keeping only the versions not yet applied.
        let mut window = HashSet::new();
        let mut newest = checkpoint;
        let mut fresh = Vec::new();
        let mut touched = Touched::default();
        let mut changes = 0;
        let mut cursor = None;
        loop {
            let page = self.history_page(since, cursor).await?;
            for entry in page.entries {
                let key = version_key(&entry);
                newest = newest.max(entry.last_updated);
                if !applied.contains(&key) {
                    fresh.push(entry);
                }
                window.insert(key);
            }
            changes += fresh.len();
            for entry in fresh.drain(..) {
                self.note(&entry, &mut touched).await?;
            }
            if touched.rebuild || touched.people.len() > REBUILD_ABOVE {
                return self.full_rebuild().await;
            }
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        if changes == 0 {
            return Ok(IndexSyncReport::default());
        }
        for location in std::mem::take(&mut touched.locations) {
            self.people_under(&location, &mut touched.people).await?;
            if touched.people.len() > REBUILD_ABOVE {
                return self.full_rebuild().await;
            }
        }
        let mut report = IndexSyncReport {
            changes,
            ..Default::default()
        };
        if touched.people.is_empty() {
            self.remember(window);
            return Ok(report);
        }
        let directory = Directory::for_people(self.store.as_ref(), &touched.people).await?;
        let mut documents = Vec::new();
        let mut found = BTreeSet::new();
        for person_type in PERSON_TYPES {
            let prefix = format!("{person_type}/");
            let ids: Vec<String> = touched
                .people
                .iter()
                .filter_map(|r| r.strip_prefix(&prefix))
                .map(str::to_string)
                .collect();
            if ids.is_empty() {
                continue;
            }
            for person in search_any_of(self.store.as_ref(), person_type, "_id", &ids).await? {
                found.insert(person.reference());
                documents.push(directory.document(&person.resource, &self.phones));
            }
        }
        let gone: Vec<String> = touched.people.difference(&found).cloned().collect();
        report.updated = documents.len();
        report.removed = gone.len();
        for chunk in documents.chunks(BATCH) {
            self.index.upsert(chunk.to_vec()).await?;
        }
        if !gone.is_empty() {
            self.index.delete(gone).await?;
        }
        self.index.commit(Some(newest)).await?;
        self.remember(window);
        Ok(report)
    }

    /// Records what one history entry touches.
    async fn note(
        &self,
        entry: &crate::store::HistoryEntry,
        touched: &mut Touched,
    ) -> Result<(), IndexSyncError> {
        let resource_type = entry.resource_type.as_str();
        if PERSON_TYPES.contains(&resource_type) {
            touched
                .people
                .insert(format!("{resource_type}/{}", entry.id));
            return Ok(());
        }
        let is_delete = entry.method == HistoryMethod::Delete;
        match resource_type {
            "Location" => {
                touched.locations.insert(entry.id.clone());
            }
            "CodeSystem" => {
                let affects = match &entry.resource {
                    Some(resource) => affects_documents(resource),
                    None => self
                        .previous(entry)
                        .await?
                        .is_none_or(|previous| affects_documents(&previous)),
                };
                touched.rebuild |= affects;
            }
            "PractitionerRole" | "Group" | "Communication" => {
                if let Some(resource) = &entry.resource {
                    touched.people.extend(people_named(resource_type, resource));
                }
                // Whoever the previous version named may have lost the role
                // or membership. A message's recipient and sender do not
                // change, so only its deletion is looked back on.
                if is_delete || resource_type != "Communication" {
                    if let Some(previous) = self.previous(entry).await? {
                        touched
                            .people
                            .extend(people_named(resource_type, &previous));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The version before `entry`'s, if there is one.
    async fn previous(
        &self,
        entry: &crate::store::HistoryEntry,
    ) -> Result<Option<Value>, IndexSyncError> {
        let Some(previous) = entry
            .version_id
            .parse::<u64>()
            .ok()
            .and_then(|v| v.checked_sub(1))
            .filter(|v| *v > 0)
        else {
            return Ok(None);
        };
        match self
            .store
            .vread(&entry.resource_type, &entry.id, &previous.to_string())
            .await
        {
            Ok(stored) => Ok(Some(stored.resource)),
            Err(StoreError::NotFound { .. } | StoreError::Gone { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Everyone the index has at or under `location`.
    async fn people_under(
        &self,
        location: &str,
        people: &mut BTreeSet<String>,
    ) -> Result<(), IndexSyncError> {
        let query = ContactQuery {
            location: Some(location.to_string()),
            ..Default::default()
        };
        people.extend(self.index.references(&query).await?);
        Ok(())
    }
}

/// `IndexSync` as a `serve` job.
pub struct IndexSyncJob(pub IndexSync);

#[async_trait::async_trait]
impl crate::jobs::runner::Job for IndexSyncJob {
    fn name(&self) -> &'static str {
        "index_sync"
    }

    async fn run_once(&self) -> Result<String, String> {
        crate::jobs::runner::pass_outcome(self.0.run_once().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_people_are_named() {
        let message = json!({
            "recipient": [{"reference": "Practitioner/p1"}, {"reference": "Organization/o"}],
            "sender": {"reference": "Patient/x"}
        });
        assert_eq!(
            people_named("Communication", &message),
            vec!["Practitioner/p1", "Patient/x"]
        );
        let group = json!({"member": [{"entity": {"reference": "Location/l"}}, {"entity": {"reference": "Person/a"}}]});
        assert_eq!(people_named("Group", &group), vec!["Person/a"]);
        assert!(people_named("Location", &json!({})).is_empty());
        assert!(!is_person("Practitioner/"));
        assert!(!is_person("http://other/Practitioner/1"));
    }
}
