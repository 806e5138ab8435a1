//! The `FhirStore` contract suite against every backend that runs here.

mod common;

use common::contract;
use mhero::store::sqlite::SqliteStore;

#[tokio::test]
async fn sqlite_store_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    contract::run_all(&store).await;
}
