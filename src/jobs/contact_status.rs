//! RapidPro -> FHIR contact status: a contact that RapidPro reports as
//! `stopped` or `blocked` (the person sent STOP, or an operator blocked
//! them) gets the opt-out tag on its FHIR person (with a marker saying
//! RapidPro's status caused it); back to `active` removes an opt-out only
//! when RapidPro's status caused it, never one the person asked for through
//! the API, the emNutt route or a STOP keyword. `archived` says nothing about consent and changes nothing, and
//! neither does a block the connector made itself (a deactivated person).

use super::contact_writeback::blocked_by_connector;
use crate::pipeline::contact::with_rapidpro_opt_out;
use crate::store::{FhirStore, StoreResult, modify_resource};

/// What a RapidPro contact status means for consent.
pub fn opt_out_for_status(status: &str) -> Option<bool> {
    match status {
        "stopped" | "blocked" => Some(true),
        "active" => Some(false),
        _ => None,
    }
}

/// Apply `status` to `resource_type/id`; returns whether FHIR changed.
pub async fn apply_status(
    store: &dyn FhirStore,
    resource_type: &str,
    id: &str,
    status: &str,
) -> StoreResult<bool> {
    let Some(opted_out) = opt_out_for_status(status) else {
        return Ok(false);
    };
    let written = modify_resource(store, resource_type, id, |current| {
        if status == "blocked" && blocked_by_connector(current) {
            return None;
        }
        with_rapidpro_opt_out(current, opted_out)
    })
    .await?;
    Ok(written.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use serde_json::json;

    #[tokio::test]
    async fn stopped_opts_out_and_active_opts_back_in() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
            .await
            .unwrap();
        store
            .update(
                "Patient",
                "p",
                json!({"resourceType": "Patient", "id": "p", "active": true}),
                None,
            )
            .await
            .unwrap();
        assert!(
            apply_status(&store, "Patient", "p", "stopped")
                .await
                .unwrap()
        );
        assert!(
            !apply_status(&store, "Patient", "p", "blocked")
                .await
                .unwrap(),
            "already opted out"
        );
        let read = store.read("Patient", "p").await.unwrap();
        assert_eq!(read.resource["meta"]["tag"][0]["code"], "optedout");
        assert!(
            !apply_status(&store, "Patient", "p", "archived")
                .await
                .unwrap()
        );
        assert!(
            apply_status(&store, "Patient", "p", "active")
                .await
                .unwrap()
        );
        let read = store.read("Patient", "p").await.unwrap();
        assert!(read.resource["meta"].get("tag").is_none());
        assert_eq!(read.version_id, "3");
    }

    #[tokio::test]
    async fn the_connectors_own_block_is_not_an_opt_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
            .await
            .unwrap();
        let person = json!({"resourceType": "Practitioner", "id": "p", "active": false, "identifier": [{
            "system": crate::pipeline::contact::CONTACT_UUID_SYSTEM, "value": "u",
            "extension": [{"url": crate::jobs::contact_writeback::BLOCKED_BY_CONNECTOR_URL, "valueBoolean": true}]}]});
        store
            .update("Practitioner", "p", person, None)
            .await
            .unwrap();
        assert!(
            !apply_status(&store, "Practitioner", "p", "blocked")
                .await
                .unwrap()
        );
        assert!(
            apply_status(&store, "Practitioner", "p", "stopped")
                .await
                .unwrap(),
            "a STOP is still the person's own"
        );
    }

    #[tokio::test]
    async fn an_opt_out_the_person_asked_for_is_not_lifted_by_an_active_contact() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
            .await
            .unwrap();
        // Opted out through the API (emNutt route, STOP keyword): RapidPro
        // still has the contact active.
        let person = json!({"resourceType": "Practitioner", "id": "p", "active": true});
        let opted = crate::pipeline::contact::with_opt_out(&person, true).unwrap();
        store
            .update("Practitioner", "p", opted, None)
            .await
            .unwrap();
        assert!(
            !apply_status(&store, "Practitioner", "p", "active")
                .await
                .unwrap(),
            "RapidPro's active status does not undo the person's own opt-out"
        );
        let read = store.read("Practitioner", "p").await.unwrap();
        assert_eq!(read.resource["meta"]["tag"][0]["code"], "optedout");
        // A RapidPro stop on top changes nothing, and active still doesn't lift it.
        assert!(
            !apply_status(&store, "Practitioner", "p", "stopped")
                .await
                .unwrap()
        );
        assert!(
            !apply_status(&store, "Practitioner", "p", "active")
                .await
                .unwrap()
        );
    }
}
