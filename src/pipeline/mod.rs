//! From FHIR people to RapidPro contacts and back: phone normalisation
//! (`phone`); the contact mapping follows.

pub mod phone;
