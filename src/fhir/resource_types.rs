//! Which FHIR R4 resource types the connector stores, and how a type name,
//! a logical id and a resource body are checked before anything is written.

use serde_json::Value;

use crate::store::StoreError;

/// Types the connector stores and serves. Other R4 types get a 404 naming
/// this list.
pub const SUPPORTED: &[&str] = &[
    "AuditEvent",
    "Basic",
    "CodeSystem",
    "Communication",
    "CommunicationRequest",
    "Group",
    "HealthcareService",
    "Location",
    "Organization",
    "Patient",
    "Person",
    "Practitioner",
    "PractitionerRole",
    "Provenance",
    "Questionnaire",
    "QuestionnaireResponse",
    "RelatedPerson",
    "SearchParameter",
    "StructureDefinition",
    "Subscription",
    "ValueSet",
];

pub fn is_supported(resource_type: &str) -> bool {
    SUPPORTED.contains(&resource_type)
}

/// A name shaped like a FHIR resource type (`Patient`), whether or not we
/// store it. Used to tell "unsupported type" (404) from "not a type" (400).
pub fn looks_like_type_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_alphanumeric())
        && name.len() <= 64
}

/// Fail unless `resource_type` is stored here.
pub fn ensure_supported(resource_type: &str) -> Result<(), StoreError> {
    if is_supported(resource_type) {
        Ok(())
    } else if looks_like_type_name(resource_type) {
        Err(StoreError::UnsupportedType(resource_type.to_string()))
    } else {
        Err(StoreError::Invalid(format!(
            "'{resource_type}' is not a FHIR resource type"
        )))
    }
}

/// FHIR `id`: 1 to 64 of `A-Z a-z 0-9 - .`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

pub fn ensure_valid_id(id: &str) -> Result<(), StoreError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "'{id}' is not a valid FHIR id (1-64 characters of A-Z, a-z, 0-9, '-' and '.')"
        )))
    }
}

/// Check a resource body before it is written: a JSON object with a
/// supported `resourceType` (equal to `expected_type` when given), a valid
/// `id` if present, an object `meta` if present, and, for an actionable
/// CommunicationRequest, something that can be sent
/// ([`check_writable`](crate::pipeline::request::check_writable), 422).
/// Returns the type.
pub fn validate_resource(
    resource: &Value,
    expected_type: Option<&str>,
) -> Result<String, StoreError> {
    let object = resource.as_object().ok_or_else(|| {
        StoreError::Invalid(format!(
            "the body must be a FHIR resource (a JSON object), not {}",
            json_kind(resource)
        ))
    })?;
    let resource_type = match object.get("resourceType") {
        Some(Value::String(t)) => t.as_str(),
        Some(_) => {
            return Err(StoreError::Invalid(
                "resourceType must be a string".to_string(),
            ));
        }
        None => {
            return Err(StoreError::Invalid(
                "the resource has no resourceType".to_string(),
            ));
        }
    };
    if let Some(expected) = expected_type
        && expected != resource_type
    {
        return Err(StoreError::Invalid(format!(
            "resourceType '{resource_type}' in the body does not match '{expected}' in the URL"
        )));
    }
    ensure_supported(resource_type)?;
    match object.get("id") {
        None => {}
        Some(Value::String(id)) => ensure_valid_id(id)?,
        Some(_) => return Err(StoreError::Invalid("id must be a string".to_string())),
    }
    match object.get("meta") {
        None | Some(Value::Object(_)) => {}
        Some(_) => return Err(StoreError::Invalid("meta must be an object".to_string())),
    }
    // A CommunicationRequest that could never be sent is refused whole.
    crate::pipeline::request::check_writable(resource)
        .map_err(|problem| StoreError::Unprocessable(problem.0))?;
    Ok(resource_type.to_string())
}

/// "an array", "a string", ... for error messages.
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unsupported_but_real_type_is_named_with_the_list() {
        let err = ensure_supported("MedicationRequest").unwrap_err();
        assert!(matches!(err, StoreError::UnsupportedType(_)));
        let text = err.to_string();
        assert!(text.contains("MedicationRequest") && text.contains("Practitioner"));
        assert!(matches!(
            ensure_supported("patient"),
            Err(StoreError::Invalid(_))
        ));
    }

    #[test]
    fn ids_follow_the_fhir_rule() {
        assert!(is_valid_id("P10335"));
        assert!(is_valid_id("a.b-c"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id(&"x".repeat(65)));
    }

    #[test]
    fn body_checks_name_the_problem() {
        let err = validate_resource(&json!([1]), None).unwrap_err();
        assert!(err.to_string().contains("an array"));
        let err = validate_resource(&json!({"resourceType": "Patient"}), Some("Practitioner"))
            .unwrap_err();
        assert!(err.to_string().contains("does not match"));
        let err = validate_resource(&json!({"name": []}), None).unwrap_err();
        assert!(err.to_string().contains("no resourceType"));
        assert_eq!(
            validate_resource(&json!({"resourceType": "Group"}), None).unwrap(),
            "Group"
        );
    }
}
