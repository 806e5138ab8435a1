//! From FHIR people to RapidPro contacts and back: phone normalisation
//! (`phone`) and the contact mapping (`contact`).

pub mod phone;
