//! Writing the RapidPro contact UUID back: survives a concurrent writer
//! (412, re-read, retry), changes nothing else, and is a no-op when done.

use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use mhero::jobs::contact_writeback::{WrittenBack, content_hash, pushed_hash, write_back};
use mhero::pipeline::contact::draft;
use mhero::pipeline::phone::PhoneNormalizer;
use mhero::store::sqlite::SqliteStore;
use mhero::store::*;
use serde_json::{Value, json};

/// Delegates to a real store; the first update is preceded by a write of
/// another client, so it meets a version conflict exactly once.
struct Interfering {
    inner: SqliteStore,
    interfered: AtomicBool,
}

#[async_trait]
impl FhirStore for Interfering {
    fn backend_name(&self) -> &'static str {
        "embedded"
    }
    async fn create(&self, r: Value, c: Option<&str>) -> StoreResult<WriteOutcome> {
        self.inner.create(r, c).await
    }
    async fn update(
        &self,
        t: &str,
        id: &str,
        r: Value,
        m: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        if !self.interfered.swap(true, Ordering::SeqCst) {
            let mut other = self.inner.read(t, id).await?.resource;
            other["name"] = json!([{ "family": "Renamed", "given": ["Fatu"] }]);
            self.inner.update(t, id, other, None).await?;
        }
        self.inner.update(t, id, r, m).await
    }
    async fn conditional_update(
        &self,
        t: &str,
        q: &str,
        r: Value,
        m: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        self.inner.conditional_update(t, q, r, m).await
    }
    async fn read(&self, t: &str, id: &str) -> StoreResult<StoredResource> {
        self.inner.read(t, id).await
    }
    async fn vread(&self, t: &str, id: &str, v: &str) -> StoreResult<StoredResource> {
        self.inner.vread(t, id, v).await
    }
    async fn delete(&self, t: &str, id: &str, m: Option<&str>) -> StoreResult<Option<String>> {
        self.inner.delete(t, id, m).await
    }
    async fn search(&self, r: SearchRequest) -> StoreResult<SearchPage> {
        self.inner.search(r).await
    }
    async fn history(&self, r: HistoryRequest) -> StoreResult<HistoryPage> {
        self.inner.history(r).await
    }
    async fn process_bundle(&self, b: Value) -> StoreResult<Value> {
        self.inner.process_bundle(b).await
    }
    async fn check(&self) -> StoreResult<BackendStatus> {
        self.inner.check().await
    }
}

#[tokio::test]
async fn write_back_retries_after_a_concurrent_change_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let inner = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    let practitioner = json!({ "resourceType": "Practitioner", "id": "hw1", "name": [{ "family": "Kollie", "given": ["Fatu"] }],
                               "telecom": [{ "system": "phone", "value": "077 012 3456" }] });
    inner
        .update("Practitioner", "hw1", practitioner.clone(), None)
        .await
        .unwrap();
    let store = Interfering {
        inner,
        interfered: AtomicBool::new(false),
    };

    let hash = content_hash(&draft(
        &practitioner,
        &PhoneNormalizer::new(Some("LR")).unwrap(),
    ));
    let wrote = write_back(
        &store,
        "Practitioner",
        "hw1",
        &WrittenBack {
            uuid: "5f5a0b0e-contact",
            hash: &hash,
            blocked_by_connector: false,
        },
    )
    .await
    .unwrap();
    assert!(wrote);

    let stored = store.read("Practitioner", "hw1").await.unwrap();
    assert_eq!(
        stored.version_id, "3",
        "v2 = the other writer, v3 = the write-back after a retry"
    );
    assert_eq!(
        stored.resource["name"][0]["family"], "Renamed",
        "the concurrent change survived"
    );
    assert_eq!(
        stored.resource["telecom"][0]["value"], "077 012 3456",
        "the source's phone value is not rewritten"
    );
    assert_eq!(
        stored.resource["identifier"][0]["value"],
        "5f5a0b0e-contact"
    );
    assert_eq!(
        pushed_hash(&stored.resource).as_deref(),
        Some(hash.as_str())
    );

    let again = write_back(
        &store,
        "Practitioner",
        "hw1",
        &WrittenBack {
            uuid: "5f5a0b0e-contact",
            hash: &hash,
            blocked_by_connector: false,
        },
    )
    .await
    .unwrap();
    assert!(!again, "writing the same UUID and hash again is a no-op");
    assert_eq!(
        store.read("Practitioner", "hw1").await.unwrap().version_id,
        "3"
    );
}

#[tokio::test]
async fn write_back_to_a_missing_person_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    let err = write_back(
        &store,
        "Practitioner",
        "nobody",
        &WrittenBack {
            uuid: "u",
            hash: "h",
            blocked_by_connector: false,
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
}

#[test]
fn the_hash_follows_what_rapidpro_would_see() {
    let phones = PhoneNormalizer::new(Some("LR")).unwrap();
    let a = json!({ "resourceType": "Practitioner", "id": "hw1", "name": [{ "text": "Fatu Kollie" }], "telecom": [{ "system": "phone", "value": "0770123456" }] });
    let mut same_number_other_format = a.clone();
    same_number_other_format["telecom"][0]["value"] = json!("+231 77 012 3456");
    let mut new_number = a.clone();
    new_number["telecom"][0]["value"] = json!("0886123456");
    let hash = |r: &Value| content_hash(&draft(r, &phones));
    assert_eq!(
        hash(&a),
        hash(&same_number_other_format),
        "formatting alone changes nothing for RapidPro"
    );
    assert_ne!(hash(&a), hash(&new_number));
    let mut with_uuid = a.clone();
    with_uuid["identifier"] =
        json!([{ "system": "http://app.rapidpro.io/contact-uuid", "value": "x" }]);
    assert_eq!(
        hash(&a),
        hash(&with_uuid),
        "the write-back itself does not count as a change"
    );
}
