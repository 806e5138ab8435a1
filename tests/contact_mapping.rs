//! The person -> RapidPro contact mapping on real data: OpenMRS, HL7 and
//! iHRIS resources.

mod common;

use mhero::pipeline::contact::draft;
use mhero::pipeline::phone::PhoneNormalizer;

#[test]
fn openmrs_patient_gets_a_dutch_urn_and_language() {
    let patient = common::fixture("openmrs/openmrs-fhir2-patient-example.json");
    let d = draft(&patient, &PhoneNormalizer::new(Some("NL")).unwrap());
    assert_eq!(d.urns, vec!["tel:+31648352638"]);
    assert_eq!(d.language.as_deref(), Some("nld"));
    assert_eq!(d.name.as_deref(), Some("Pieter van de Heuvel"));
    assert_eq!(d.entity_type, "Patient");
    assert!(d.reachable());
}

#[test]
fn hl7_patient_uses_ranked_current_phones_and_the_official_name() {
    let patient = common::fixture("fhir-r4-examples/Patient-example.json");
    let d = draft(&patient, &PhoneNormalizer::new(Some("AU")).unwrap());
    assert_eq!(d.name.as_deref(), Some("Peter James Chalmers"));
    assert_eq!(
        d.urns,
        vec!["tel:+61355556473", "tel:+61334105613"],
        "rank order; the 'old' number is left out"
    );
    assert_eq!(d.global_id, "example");
}

#[test]
fn ihris_placeholder_phones_are_refused_not_sent() {
    let bundle = common::fixture("ihris/ihris-demo-practitioners-open.bundle.json");
    let practitioner = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .find(|r| r["id"] == "P10335")
        .unwrap();
    let d = draft(practitioner, &PhoneNormalizer::new(Some("US")).unwrap());
    assert_eq!(d.name.as_deref(), Some("Lorne Green"));
    assert!(
        d.urns.is_empty(),
        "111-111-1111 and friends are not valid numbers"
    );
    assert_eq!(
        d.rejected_phones.len(),
        3,
        "the fax is not a phone; three phones refused"
    );
    assert!(!d.reachable());
}

#[test]
fn a_mobile_also_gives_a_whatsapp_urn_when_mapped() {
    use mhero::pipeline::phone::UrnMapping;
    let phones = PhoneNormalizer::new(Some("NL"))
        .unwrap()
        .with_urn_mappings(vec![UrnMapping {
            scheme: "whatsapp".into(),
            system: "phone".into(),
            use_: Some("mobile".into()),
        }]);
    let patient = common::fixture("openmrs/openmrs-fhir2-patient-example.json");
    let d = draft(&patient, &phones);
    assert_eq!(
        d.urns,
        vec!["tel:+31648352638", "whatsapp:31648352638"],
        "tel first, then the mapped URN"
    );
}
