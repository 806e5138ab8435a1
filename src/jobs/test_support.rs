//! Test support shared by the jobs' unit tests: a store that counts what
//! reaches it.

use async_trait::async_trait;
use serde_json::Value;

use crate::store::{FhirStore, HistoryRequest, SearchRequest, StoredResource};

/// Counts the reads and searches that reach the store.
pub(crate) struct Counting {
    pub(crate) inner: crate::store::sqlite::SqliteStore,
    pub(crate) reads: std::sync::atomic::AtomicUsize,
    pub(crate) searches: std::sync::atomic::AtomicUsize,
    /// Every search: (resource type, parameter names).
    pub(crate) searched: std::sync::Mutex<Vec<(String, Vec<String>)>>,
}

#[async_trait]
impl FhirStore for Counting {
    fn backend_name(&self) -> &'static str {
        "counting"
    }
    async fn create(
        &self,
        resource: Value,
        if_none_exist: Option<&str>,
    ) -> crate::store::StoreResult<crate::store::WriteOutcome> {
        self.inner.create(resource, if_none_exist).await
    }
    async fn update(
        &self,
        resource_type: &str,
        id: &str,
        resource: Value,
        if_match: Option<&str>,
    ) -> crate::store::StoreResult<crate::store::WriteOutcome> {
        self.inner
            .update(resource_type, id, resource, if_match)
            .await
    }
    async fn conditional_update(
        &self,
        resource_type: &str,
        query: &str,
        resource: Value,
        if_match: Option<&str>,
    ) -> crate::store::StoreResult<crate::store::WriteOutcome> {
        self.inner
            .conditional_update(resource_type, query, resource, if_match)
            .await
    }
    async fn read(
        &self,
        resource_type: &str,
        id: &str,
    ) -> crate::store::StoreResult<StoredResource> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.read(resource_type, id).await
    }
    async fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version_id: &str,
    ) -> crate::store::StoreResult<StoredResource> {
        self.inner.vread(resource_type, id, version_id).await
    }
    async fn delete(
        &self,
        resource_type: &str,
        id: &str,
        if_match: Option<&str>,
    ) -> crate::store::StoreResult<Option<String>> {
        self.inner.delete(resource_type, id, if_match).await
    }
    async fn search(
        &self,
        request: SearchRequest,
    ) -> crate::store::StoreResult<crate::store::SearchPage> {
        self.searches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut searched) = self.searched.lock() {
            searched.push((
                request.resource_type.clone(),
                request.params.iter().map(|(k, _)| k.clone()).collect(),
            ));
        }
        self.inner.search(request).await
    }
    async fn history(
        &self,
        request: HistoryRequest,
    ) -> crate::store::StoreResult<crate::store::HistoryPage> {
        self.inner.history(request).await
    }
    async fn process_bundle(&self, bundle: Value) -> crate::store::StoreResult<Value> {
        self.inner.process_bundle(bundle).await
    }
    async fn check(&self) -> crate::store::StoreResult<crate::store::BackendStatus> {
        self.inner.check().await
    }
}

impl Counting {
    pub(crate) fn over(inner: crate::store::sqlite::SqliteStore) -> Self {
        Counting {
            inner,
            reads: Default::default(),
            searches: Default::default(),
            searched: Default::default(),
        }
    }
}
