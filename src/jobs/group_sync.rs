//! FHIR Group <-> RapidPro group sync.
