//! From FHIR to what RapidPro is asked to do, and back: phone normalisation
//! (`phone`), the person -> contact mapping (`contact`, `work_context`),
//! reading CommunicationRequests (`request`), recipient resolution
//! (`recipients`) and the per-recipient outbox Communications (`outbox`);
//! back from RapidPro: flow runs as QuestionnaireResponses
//! (`flow_results`), webhook events kept as FHIR (`webhook_event`) and the
//! validation write-back of confirmed values with its Provenance
//! (`writeback`).

pub mod contact;
pub mod flow_results;
pub mod outbox;
pub mod phone;
pub mod recipients;
pub mod request;
pub mod webhook_event;
pub mod work_context;
pub mod writeback;
