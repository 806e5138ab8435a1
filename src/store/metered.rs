//! `MeteredStore`: a `FhirStore` decorator that counts every operation
//! (`store_operations_total{backend, operation, outcome}`) and times it
//! (`store_operation_duration_seconds`), whatever the backend.

use std::time::Instant;

use async_trait::async_trait;
use serde_json::Value;

use super::{
    BackendStatus, FhirStore, HistoryPage, HistoryRequest, SearchPage, SearchRequest, SharedStore,
    StoreResult, StoredResource, WriteOutcome,
};

pub struct MeteredStore {
    inner: SharedStore,
}

impl MeteredStore {
    pub fn new(inner: SharedStore) -> Self {
        MeteredStore { inner }
    }

    fn record<T>(&self, operation: &'static str, started: Instant, result: &StoreResult<T>) {
        let outcome = if result.is_ok() { "ok" } else { "error" };
        let backend = self.inner.backend_name();
        metrics::counter!("store_operations_total", "backend" => backend, "operation" => operation, "outcome" => outcome).increment(1);
        metrics::histogram!("store_operation_duration_seconds", "backend" => backend, "operation" => operation)
            .record(started.elapsed().as_secs_f64());
    }
}

macro_rules! metered {
    ($self:ident, $op:literal, $call:expr) => {{
        let started = Instant::now();
        let result = $call.await;
        $self.record($op, started, &result);
        result
    }};
}

#[async_trait]
impl FhirStore for MeteredStore {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
    async fn create(
        &self,
        resource: Value,
        if_none_exist: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        metered!(self, "create", self.inner.create(resource, if_none_exist))
    }
    async fn update(
        &self,
        resource_type: &str,
        id: &str,
        resource: Value,
        if_match: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        metered!(
            self,
            "update",
            self.inner.update(resource_type, id, resource, if_match)
        )
    }
    async fn conditional_update(
        &self,
        resource_type: &str,
        query: &str,
        resource: Value,
        if_match: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        metered!(
            self,
            "conditional_update",
            self.inner
                .conditional_update(resource_type, query, resource, if_match)
        )
    }
    async fn read(&self, resource_type: &str, id: &str) -> StoreResult<StoredResource> {
        metered!(self, "read", self.inner.read(resource_type, id))
    }
    async fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version_id: &str,
    ) -> StoreResult<StoredResource> {
        metered!(
            self,
            "vread",
            self.inner.vread(resource_type, id, version_id)
        )
    }
    async fn delete(
        &self,
        resource_type: &str,
        id: &str,
        if_match: Option<&str>,
    ) -> StoreResult<Option<String>> {
        metered!(
            self,
            "delete",
            self.inner.delete(resource_type, id, if_match)
        )
    }
    async fn search(&self, request: SearchRequest) -> StoreResult<SearchPage> {
        metered!(self, "search", self.inner.search(request))
    }
    async fn history(&self, request: HistoryRequest) -> StoreResult<HistoryPage> {
        metered!(self, "history", self.inner.history(request))
    }
    async fn process_bundle(&self, bundle: Value) -> StoreResult<Value> {
        metered!(self, "bundle", self.inner.process_bundle(bundle))
    }
    async fn check(&self) -> StoreResult<BackendStatus> {
        metered!(self, "check", self.inner.check())
    }
}
