//! From FHIR to what RapidPro is asked to do, and back: phone normalisation
//! (`phone`), the person -> contact mapping (`contact`, `work_context`),
//! reading CommunicationRequests (`request`), recipient resolution
//! (`recipients`) and the per-recipient outbox Communications (`outbox`).

pub mod contact;
pub mod flow_results;
pub mod outbox;
pub mod phone;
pub mod recipients;
pub mod request;
pub mod webhook_event;
pub mod work_context;
