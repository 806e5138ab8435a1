//! `HttpFhirStore`: the `FhirStore` contract over FHIR R4 REST (HAPI FHIR
//! or any R4 server).

use async_trait::async_trait;
use serde_json::Value;

use super::*;
use crate::config::HttpFhirSettings;

pub struct HttpFhirStore {}

impl HttpFhirStore {
    pub fn new(_settings: &HttpFhirSettings) -> StoreResult<Self> {
        Err(StoreError::Internal("not implemented".into()))
    }
}

#[async_trait]
impl FhirStore for HttpFhirStore {
    fn backend_name(&self) -> &'static str {
        "http"
    }
    async fn create(
        &self,
        _resource: Value,
        _if_none_exist: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        todo!()
    }
    async fn update(
        &self,
        _t: &str,
        _id: &str,
        _resource: Value,
        _if_match: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        todo!()
    }
    async fn conditional_update(
        &self,
        _t: &str,
        _q: &str,
        _resource: Value,
        _if_match: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        todo!()
    }
    async fn read(&self, _t: &str, _id: &str) -> StoreResult<StoredResource> {
        todo!()
    }
    async fn vread(&self, _t: &str, _id: &str, _v: &str) -> StoreResult<StoredResource> {
        todo!()
    }
    async fn delete(
        &self,
        _t: &str,
        _id: &str,
        _if_match: Option<&str>,
    ) -> StoreResult<Option<String>> {
        todo!()
    }
    async fn search(&self, _request: SearchRequest) -> StoreResult<SearchPage> {
        todo!()
    }
    async fn history(&self, _request: HistoryRequest) -> StoreResult<HistoryPage> {
        todo!()
    }
    async fn process_bundle(&self, _bundle: Value) -> StoreResult<Value> {
        todo!()
    }
    async fn check(&self) -> StoreResult<BackendStatus> {
        todo!()
    }
}
