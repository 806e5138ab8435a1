//! The HTTP API (axum): the FHIR REST facade under `/fhir`, health and
//! metrics, authentication, request ids and request metrics. Handlers
//! validate, call the store and shape FHIR responses; errors go through
//! `error.rs`.
