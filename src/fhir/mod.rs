//! FHIR R4 helpers shared by the API and the stores: supported types and
//! body checks, the search parameter table and index extraction, Bundle
//! construction, the CapabilityStatement, the conformance resources of
//! `fhir-profiles/` (loaded at start-up), and OperationOutcome values.

pub mod bundle;
pub mod capability;
pub mod extract;
pub mod profiles;
pub mod resource_types;
pub mod sample;
pub mod search_params;

use serde_json::{Value, json};

/// The FHIR media type used in every response.
pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// An OperationOutcome with one issue.
pub fn operation_outcome(severity: &str, code: &str, diagnostics: &str) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": severity, "code": code, "diagnostics": diagnostics }]
    })
}

/// Format an instant the way FHIR `instant` and `meta.lastUpdated` expect
/// (UTC, milliseconds, `Z`).
pub fn format_instant(instant: &chrono::DateTime<chrono::Utc>) -> String {
    instant.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
