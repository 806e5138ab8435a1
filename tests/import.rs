//! `mhero import` on real third-party data: iHRIS demo bundles and every
//! HL7 R4 example file. Supported resources read back JSON-equal (apart
//! from the store's `meta.versionId` / `meta.lastUpdated`); everything else
//! is reported with a reason, and nothing half-written.

mod common;

use std::path::PathBuf;

use common::{fixture, fixture_path, without_store_meta};
use mhero::cli::import::{ImportSummary, import_files};
use mhero::fhir::resource_types::is_supported;
use mhero::store::FhirStore;
use mhero::store::sqlite::SqliteStore;
use serde_json::Value;

async fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fhir.sqlite"))
        .await
        .unwrap();
    (dir, store)
}

async fn assert_reads_back(store: &dyn FhirStore, resource: &Value) {
    let resource_type = resource["resourceType"].as_str().unwrap();
    let id = resource["id"]
        .as_str()
        .expect("fixture resources carry ids");
    let stored = store
        .read(resource_type, id)
        .await
        .unwrap_or_else(|e| panic!("{resource_type}/{id}: {e}"));
    assert_eq!(
        without_store_meta(&stored.resource),
        without_store_meta(resource),
        "{resource_type}/{id} reads back equal"
    );
}

#[tokio::test]
async fn ihris_demo_data_imports_and_reads_back_equal() {
    let (_dir, store) = store().await;
    let files: Vec<PathBuf> = [
        "ihris/ihris-terminology-job-cadre.bundle.json",
        "ihris/ihris-demo-locations-open.bundle.json",
        "ihris/ihris-demo-practitioners-open.bundle.json",
        "ihris/SearchParameter-practitioner-phone.json",
    ]
    .iter()
    .map(|f| fixture_path(f))
    .collect();
    let summary = import_files(&store, &files).await;
    assert!(summary.failed.is_empty(), "{summary}");
    let expected_count: usize = files
        .iter()
        .map(|f| {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
            v["entry"].as_array().map(Vec::len).unwrap_or(1)
        })
        .sum();
    assert_eq!(summary.created, expected_count, "{summary}");

    for file in [
        "ihris/ihris-demo-locations-open.bundle.json",
        "ihris/ihris-demo-practitioners-open.bundle.json",
        "ihris/ihris-terminology-job-cadre.bundle.json",
    ] {
        for entry in fixture(file)["entry"].as_array().unwrap() {
            assert_reads_back(&store, &entry["resource"]).await;
        }
    }

    // Importing again changes nothing: same content, no new versions.
    let again = import_files(&store, &files).await;
    assert!(again.failed.is_empty(), "{again}");
    assert_eq!(again.created, 0, "{again}");
    let p = store.read("Practitioner", "P10335").await.unwrap();
    assert_eq!(p.version_id, "1");
}

fn summary_mentions(summary: &ImportSummary, needle: &str) -> bool {
    summary
        .failed
        .iter()
        .any(|(_, reason)| reason.contains(needle))
}

#[tokio::test]
async fn every_hl7_example_file_is_imported_or_refused_with_a_reason() {
    let (_dir, store) = store().await;
    let dir = fixture_path("fhir-r4-examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 25);
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let content: Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let summary = import_files(&store, std::slice::from_ref(&file)).await;
        let resource_type = content["resourceType"].as_str().unwrap_or("");
        match (resource_type, content["type"].as_str().unwrap_or("")) {
            ("", _) => assert!(
                summary_mentions(&summary, "no resourceType"),
                "{name}: {summary}"
            ),
            ("Bundle", "transaction") => {
                // The HL7 example calls ValueSet/$lookup and reads a patient
                // that does not exist: refused as a whole, naming the entry.
                assert!(summary_mentions(&summary, "$lookup"), "{name}: {summary}");
                assert_eq!(
                    summary.created + summary.updated,
                    0,
                    "{name}: nothing written"
                );
                for entry in content["entry"].as_array().unwrap() {
                    if let Some(id) = entry["resource"]["id"].as_str() {
                        assert!(
                            store.read("Patient", id).await.is_err(),
                            "{name}: Patient/{id} must not exist"
                        );
                    }
                }
            }
            ("Bundle", "batch") => {
                // Reads of unsupported types fail one by one; the batch runs.
                assert!(
                    summary_mentions(&summary, "MedicationStatement"),
                    "{name}: {summary}"
                );
            }
            ("Bundle", _) => {
                for entry in content["entry"].as_array().unwrap() {
                    let Some(resource) = entry.get("resource") else {
                        continue;
                    };
                    let t = resource["resourceType"].as_str().unwrap();
                    if is_supported(t) {
                        assert_reads_back(&store, resource).await;
                    } else {
                        assert!(
                            summary_mentions(&summary, &format!("'{t}' is not supported")),
                            "{name}: {summary}"
                        );
                    }
                }
            }
            ("CommunicationRequest", _) => {
                // HL7's example is `active` with neither recipient nor
                // payload: it could never be sent, so it is refused.
                assert!(
                    summary_mentions(&summary, "cannot be sent"),
                    "{name}: {summary}"
                );
                assert_eq!(summary.created + summary.updated, 0, "{name}");
            }
            (t, _) if is_supported(t) => {
                assert!(summary.failed.is_empty(), "{name}: {summary}");
                assert_eq!(
                    summary.created + summary.updated + summary.unchanged,
                    1,
                    "{name}"
                );
                assert_reads_back(&store, &content).await;
            }
            (t, _) => assert!(
                summary_mentions(&summary, &format!("'{t}' is not supported")),
                "{name}: {summary}"
            ),
        }
    }
}

#[tokio::test]
async fn ndjson_lines_are_imported_and_bad_lines_named() {
    let (dir, store) = store().await;
    let path = dir.path().join("people.ndjson");
    std::fs::write(
        &path,
        "{\"resourceType\":\"Patient\",\"id\":\"a\"}\n\n{\"resourceType\":\"Patient\"}\n{not json}\n{\"resourceType\":\"Claim\"}\n",
    )
    .unwrap();
    let summary = import_files(&store, &[path]).await;
    assert_eq!(summary.created, 2, "{summary}");
    assert_eq!(summary.failed.len(), 2, "{summary}");
    assert!(
        summary.failed[0].0.ends_with(":4"),
        "bad line is named by number: {summary}"
    );
    assert!(summary.failed[1].1.contains("Claim"), "{summary}");
    assert!(store.read("Patient", "a").await.is_ok());

    let missing = import_files(&store, &[dir.path().join("nope.json")]).await;
    assert!(missing.failed[0].1.contains("cannot read"), "{missing}");
}

#[tokio::test]
async fn openmrs_patient_with_an_object_identifier_is_kept_and_searchable() {
    // OpenMRS's web-test body has `identifier` as an object, not an array
    // (real but non-conformant). It is stored as sent and still indexed.
    let (_dir, store) = store().await;
    let summary = import_files(
        &store,
        &[fixture_path(
            "openmrs/openmrs-fhir2-PatientWebTest_create.json",
        )],
    )
    .await;
    assert!(summary.failed.is_empty(), "{summary}");
    assert_eq!(summary.created, 1);
    let page = store
        .search(mhero::store::SearchRequest {
            resource_type: "Patient".into(),
            params: vec![
                ("identifier".into(), "4444-6".into()),
                ("family".into(), "john".into()),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.matches.len(), 1);
    assert!(
        page.matches[0].resource["identifier"].is_object(),
        "kept as sent"
    );
}
