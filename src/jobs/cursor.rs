//! Durable job cursors ("synced up to here"), kept as FHIR `Basic`
//! resources so that the process stays stateless: `Basic/mhero-cursor-<name>`
//! with code `http://mhero.org/codesystem|sync-cursor` and the position in
//! an extension. A cursor only moves forward after the work before it is
//! stored, and `If-Match` keeps two replicas from moving it past each other.

use serde_json::json;

use crate::store::{FhirStore, StoreError, StoreResult};

pub const CURSOR_CODE_SYSTEM: &str = "http://mhero.org/codesystem";
pub const CURSOR_CODE: &str = "sync-cursor";
pub const CURSOR_VALUE_URL: &str = "http://mhero.org/fhir/StructureDefinition/sync-cursor-position";

/// A named cursor and the version it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub name: String,
    pub position: Option<String>,
    /// `None` when the cursor has never been saved.
    version_id: Option<String>,
}

fn resource_id(name: &str) -> String {
    format!("mhero-cursor-{name}")
}

impl Cursor {
    /// Read the cursor `name` (a missing one starts at the beginning).
    pub async fn load(store: &dyn FhirStore, name: &str) -> StoreResult<Cursor> {
        crate::fhir::resource_types::ensure_valid_id(&resource_id(name))?;
        match store.read("Basic", &resource_id(name)).await {
            Ok(stored) => {
                let position = stored.resource["extension"]
                    .as_array()
                    .and_then(|e| e.iter().find(|x| x["url"] == CURSOR_VALUE_URL))
                    .and_then(|x| x["valueString"].as_str())
                    .map(str::to_string);
                Ok(Cursor {
                    name: name.to_string(),
                    position,
                    version_id: Some(stored.version_id),
                })
            }
            Err(StoreError::NotFound { .. }) | Err(StoreError::Gone { .. }) => Ok(Cursor {
                name: name.to_string(),
                position: None,
                version_id: None,
            }),
            Err(e) => Err(e),
        }
    }

    /// Move the cursor to `position`. Fails with `VersionConflict` if
    /// someone else moved it since it was loaded.
    pub async fn advance(&mut self, store: &dyn FhirStore, position: &str) -> StoreResult<()> {
        let id = resource_id(&self.name);
        let body = json!({
            "resourceType": "Basic",
            "id": id,
            "code": { "coding": [{ "system": CURSOR_CODE_SYSTEM, "code": CURSOR_CODE, "display": "mHero sync cursor" }], "text": self.name },
            "extension": [{ "url": CURSOR_VALUE_URL, "valueString": position }]
        });
        // The first save creates the resource with its known id; later saves
        // must find the version they loaded.
        let outcome = store
            .update("Basic", &id, body, self.version_id.as_deref())
            .await?;
        self.position = Some(position.to_string());
        self.version_id = Some(outcome.stored.version_id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    #[tokio::test]
    async fn cursors_persist_and_refuse_a_stale_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
            .await
            .unwrap();
        let mut first = Cursor::load(&store, "contacts").await.unwrap();
        assert_eq!(first.position, None);
        first
            .advance(&store, "2026-11-22T06:00:00.000Z")
            .await
            .unwrap();
        let mut second = Cursor::load(&store, "contacts").await.unwrap();
        assert_eq!(second.position.as_deref(), Some("2026-11-22T06:00:00.000Z"));
        second
            .advance(&store, "2026-11-22T07:00:00.000Z")
            .await
            .unwrap();
        let stale = first
            .advance(&store, "2026-11-22T06:30:00.000Z")
            .await
            .unwrap_err();
        assert!(
            matches!(stale, StoreError::VersionConflict { .. }),
            "{stale}"
        );
        let reread = Cursor::load(&store, "contacts").await.unwrap();
        assert_eq!(reread.position.as_deref(), Some("2026-11-22T07:00:00.000Z"));
        assert!(
            Cursor::load(&store, "bad name").await.is_err(),
            "cursor names are FHIR ids"
        );
    }
}
