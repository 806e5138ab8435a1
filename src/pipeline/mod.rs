//! From FHIR people to RapidPro contacts and back: phone normalisation
//! (`phone`) and the person -> contact mapping (`contact`).

pub mod contact;
pub mod phone;
pub mod work_context;
