//! The server's CapabilityStatement, generated from the supported types,
//! the search parameter table and the include table, so it can never
//! disagree with what the store actually does.

use serde_json::{Value, json};

use super::profiles::SUPPORTED_PROFILES;
use super::resource_types::SUPPORTED;
use super::search_params::{COLUMN_PARAMS, INCLUDES, params_for};

pub fn capability_statement(base_url: &str) -> Value {
    let resources: Vec<Value> = SUPPORTED
        .iter()
        .map(|resource_type| {
            let search_params: Vec<Value> = COLUMN_PARAMS
                .iter()
                .chain(params_for(resource_type))
                .map(|p| {
                    json!({
                        "name": p.name,
                        "type": p.kind.fhir_code(),
                        "documentation": p.description
                    })
                })
                .collect();
            let includes: Vec<String> = INCLUDES
                .iter()
                .filter(|i| i.source == *resource_type)
                .map(|i| format!("{}:{}", i.source, i.param))
                .collect();
            let rev_includes: Vec<String> = INCLUDES
                .iter()
                .filter(|i| i.targets.contains(resource_type))
                .map(|i| format!("{}:{}", i.source, i.param))
                .collect();
            let interactions: Vec<Value> = [
                "read",
                "vread",
                "update",
                "delete",
                "history-instance",
                "history-type",
                "create",
                "search-type",
            ]
            .iter()
            .map(|code| json!({ "code": code }))
            .collect();
            let profiles: Vec<&str> = SUPPORTED_PROFILES
                .iter()
                .filter(|(t, _)| t == resource_type)
                .map(|(_, profile)| *profile)
                .collect();
            let mut resource = json!({
                "type": resource_type,
                "interaction": interactions,
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalUpdate": true,
                "conditionalRead": "not-supported",
                "conditionalDelete": "not-supported",
                "searchInclude": includes,
                "searchRevInclude": rev_includes,
                "searchParam": search_params
            });
            if !profiles.is_empty() {
                resource["supportedProfile"] = json!(profiles);
            }
            resource
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-22",
        "publisher": "mHero connector",
        "kind": "instance",
        "software": { "name": "mhero", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": "mHero connector FHIR R4 API", "url": base_url },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "security": {
                "description": "Authorization: Bearer <api key>, or HTTP Basic with the api key as password. GET /metadata is open."
            },
            "resource": resources,
            "interaction": [{ "code": "transaction" }, { "code": "batch" }, { "code": "history-system" }]
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_type_is_listed_with_its_parameters() {
        let cs = capability_statement("http://localhost/fhir");
        let resources = cs["rest"][0]["resource"].as_array().unwrap();
        assert_eq!(resources.len(), SUPPORTED.len());
        let role = resources
            .iter()
            .find(|r| r["type"] == "PractitionerRole")
            .unwrap();
        let names: Vec<&str> = role["searchParam"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"practitioner") && names.contains(&"_lastUpdated"));
        let basic = resources.iter().find(|r| r["type"] == "Basic").unwrap();
        assert_eq!(
            basic["supportedProfile"],
            json!([super::super::profiles::WORKFLOWS_PROFILE])
        );
        assert!(role.get("supportedProfile").is_none());
        assert_eq!(role["searchInclude"][0], "PractitionerRole:practitioner");
        let practitioner = resources
            .iter()
            .find(|r| r["type"] == "Practitioner")
            .unwrap();
        assert!(
            practitioner["searchRevInclude"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v == "PractitionerRole:practitioner")
        );
    }
}
