//! The conformance resources the connector publishes (`fhir-profiles/`:
//! StructureDefinitions of its profile and extensions, CodeSystems,
//! SearchParameters), compiled into the binary and written to the store at
//! start-up by id, so an unchanged file makes no new version. Also the
//! canonical URLs the flow sync and the CapabilityStatement use.

use serde_json::Value;

use crate::store::FhirStore;

/// The profile of the Basic written per RapidPro flow (iHRIS searches
/// `Basic?_profile=` this).
pub const WORKFLOWS_PROFILE: &str = "http://mhero.org/fhir/StructureDefinition/mhero-workflows";
/// The flow details extension on that Basic (emNutt's shape).
pub const WORKFLOWS_DETAILS_EXTENSION: &str =
    "http://mhero.org/fhir/StructureDefinition/mhero-workflows-details";
/// The run counts nested in the details.
pub const RUN_SUMMARY_EXTENSION: &str =
    "http://mhero.org/fhir/StructureDefinition/mhero-run-summary";
/// `Basic.code` system of mHero's Basic resources.
pub const RESOURCE_CODE_SYSTEM: &str = "http://mhero.org/fhir/CodeSystem/mhero-resource";
/// `Basic.code` of a workflow.
pub const WORKFLOWS_CODE: &str = "mHeroWorkflows";

/// Profiles listed as `supportedProfile` in the CapabilityStatement:
/// (resource type, profile).
pub const SUPPORTED_PROFILES: &[(&str, &str)] = &[("Basic", WORKFLOWS_PROFILE)];

/// Every file of `fhir-profiles/` (file name, content).
pub const PROFILE_FILES: &[(&str, &str)] = &[
    (
        "CodeSystem-mhero-delivery-failure.json",
        include_str!("../../fhir-profiles/CodeSystem-mhero-delivery-failure.json"),
    ),
    (
        "CodeSystem-mhero-resource.json",
        include_str!("../../fhir-profiles/CodeSystem-mhero-resource.json"),
    ),
    (
        "CodeSystem-mhero.json",
        include_str!("../../fhir-profiles/CodeSystem-mhero.json"),
    ),
    (
        "SearchParameter-communication-request-mHeroFlowStarts.json",
        include_str!(
            "../../fhir-profiles/SearchParameter-communication-request-mHeroFlowStarts.json"
        ),
    ),
    (
        "StructureDefinition-mhero-delivery.json",
        include_str!("../../fhir-profiles/StructureDefinition-mhero-delivery.json"),
    ),
    (
        "StructureDefinition-mhero-dispatch.json",
        include_str!("../../fhir-profiles/StructureDefinition-mhero-dispatch.json"),
    ),
    (
        "StructureDefinition-mhero-flow-params.json",
        include_str!("../../fhir-profiles/StructureDefinition-mhero-flow-params.json"),
    ),
    (
        "StructureDefinition-mhero-flow-start-options.json",
        include_str!("../../fhir-profiles/StructureDefinition-mhero-flow-start-options.json"),
    ),
    (
        "StructureDefinition-mhero-rapidpro-address.json",
        include_str!("../../fhir-profiles/StructureDefinition-mhero-rapidpro-address.json"),
    ),
    (
        "StructureDefinition-mhero-audience-query.json",
        include_str!("../../fhir-profiles/StructureDefinition-mhero-audience-query.json"),
    ),
    (
        "StructureDefinition-mhero-recipient-job.json",
        include_str!("../../fhir-profiles/StructureDefinition-mhero-recipient-job.json"),
    ),
    (
        "StructureDefinition-mhero-run-summary.json",
        include_str!("../../fhir-profiles/StructureDefinition-mhero-run-summary.json"),
    ),
    (
        "StructureDefinition-mhero-schedule-state.json",
        include_str!("../../fhir-profiles/StructureDefinition-mhero-schedule-state.json"),
    ),
    (
        "StructureDefinition-mhero-workflows-details.json",
        include_str!("../../fhir-profiles/StructureDefinition-mhero-workflows-details.json"),
    ),
    (
        "StructureDefinition-mhero-workflows.json",
        include_str!("../../fhir-profiles/StructureDefinition-mhero-workflows.json"),
    ),
    (
        "StructureDefinition-mhero-writeback.json",
        include_str!("../../fhir-profiles/StructureDefinition-mhero-writeback.json"),
    ),
    (
        "StructureDefinition-sms-cron-expression-schedule.json",
        include_str!("../../fhir-profiles/StructureDefinition-sms-cron-expression-schedule.json"),
    ),
];

/// A file of `fhir-profiles/` that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("fhir-profiles/{file}: {reason}")]
pub struct ProfileError {
    pub file: &'static str,
    pub reason: String,
    /// The store did not answer (as opposed to refusing the file): worth
    /// trying again later.
    pub unavailable: bool,
}

/// What a load did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProfilesLoaded {
    /// Written (new, or changed since the last start).
    pub written: usize,
    /// Already in the store as they are.
    pub unchanged: usize,
}

/// The resource in a profile file, with its type and id.
pub fn parse_profile(
    file: &'static str,
    text: &str,
) -> Result<(String, String, Value), ProfileError> {
    let error = |reason: String| ProfileError {
        file,
        reason,
        unavailable: false,
    };
    let resource: Value =
        serde_json::from_str(text).map_err(|e| error(format!("not JSON: {e}")))?;
    let resource_type = crate::fhir::resource_types::validate_resource(&resource, None)
        .map_err(|e| error(e.to_string()))?;
    let id = resource
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| error("the resource has no id".into()))?
        .to_string();
    Ok((resource_type, id, resource))
}

/// Write every profile file to `store` (PUT by id).
pub async fn load_profiles(store: &dyn FhirStore) -> Result<ProfilesLoaded, ProfileError> {
    let mut loaded = ProfilesLoaded::default();
    for (file, text) in PROFILE_FILES {
        let (resource_type, id, resource) = parse_profile(file, text)?;
        let outcome = store
            .update(&resource_type, &id, resource, None)
            .await
            .map_err(|e| ProfileError {
                file,
                unavailable: matches!(e, crate::store::StoreError::Unavailable { .. }),
                reason: e.to_string(),
            })?;
        match outcome.kind {
            crate::store::WriteKind::Unchanged => loaded.unchanged += 1,
            _ => loaded.written += 1,
        }
    }
    Ok(loaded)
}

/// [`load_profiles`] again until the store answers (waits doubling from
/// `first_wait` up to a minute), or until `cancel`. For a store that was
/// down at start-up; a file the store refuses ends the retries (logged).
pub async fn load_profiles_when_available(
    store: &dyn FhirStore,
    first_wait: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
) -> Option<ProfilesLoaded> {
    let mut wait = first_wait;
    loop {
        match load_profiles(store).await {
            Ok(loaded) => {
                tracing::info!(
                    written = loaded.written,
                    unchanged = loaded.unchanged,
                    "FHIR profiles loaded"
                );
                return Some(loaded);
            }
            Err(e) if e.unavailable => {
                tracing::warn!(error = %e, "FHIR profiles not loaded yet; the store does not answer");
            }
            Err(e) => {
                tracing::error!(error = %e, "FHIR profiles not loaded");
                return None;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(std::time::Duration::from_secs(60));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_of_the_folder_is_compiled_in_and_valid() {
        let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fhir-profiles");
        let mut on_disk: Vec<String> = std::fs::read_dir(folder)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".json"))
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = PROFILE_FILES.iter().map(|(n, _)| n.to_string()).collect();
        listed.sort();
        assert_eq!(
            on_disk, listed,
            "PROFILE_FILES must list fhir-profiles/*.json"
        );
        for (file, text) in PROFILE_FILES {
            let (resource_type, id, resource) = parse_profile(file, text).unwrap();
            assert_eq!(*file, format!("{resource_type}-{id}.json"));
            let url = resource["url"].as_str().unwrap();
            assert!(url.starts_with("http://mhero.org/"), "{file}: {url}");
            assert_eq!(resource["status"], "active", "{file}");
            if resource_type == "StructureDefinition" {
                for key in [
                    "name",
                    "kind",
                    "type",
                    "baseDefinition",
                    "derivation",
                    "differential",
                ] {
                    assert!(resource.get(key).is_some(), "{file}: no {key}");
                }
                assert_eq!(resource["abstract"], false, "{file}");
                assert_eq!(
                    url,
                    format!("http://mhero.org/fhir/StructureDefinition/{id}")
                );
                if resource["type"] == "Extension" {
                    assert!(
                        resource["context"]
                            .as_array()
                            .is_some_and(|c| !c.is_empty()),
                        "{file}"
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn a_store_that_does_not_answer_is_worth_retrying() {
        crate::install_tls_provider();
        let store = crate::store::http::HttpFhirStore::new(&crate::config::HttpFhirSettings {
            base_url: Some(url::Url::parse("http://127.0.0.1:9/fhir").unwrap()),
            username: None,
            password: None,
            bearer_token: None,
            timeout_secs: 2,
            max_retries: 0,
        })
        .unwrap();
        let error = load_profiles(&store).await.unwrap_err();
        assert!(error.unavailable, "{error}");
        assert!(error.to_string().starts_with("fhir-profiles/"), "{error}");
        let cancel = tokio_util::sync::CancellationToken::new();
        cancel.cancel();
        let retried =
            load_profiles_when_available(&store, std::time::Duration::from_secs(3600), cancel)
                .await;
        assert!(retried.is_none(), "stops on shutdown");
    }

    #[test]
    fn a_bad_file_is_named() {
        let error = parse_profile("X.json", "{").unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("fhir-profiles/X.json: not JSON")
        );
        let error = parse_profile("Y.json", r#"{"resourceType": "CodeSystem"}"#).unwrap_err();
        assert!(error.to_string().contains("no id"), "{error}");
    }
}
