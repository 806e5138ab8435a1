//! mHero connector: a FHIR-native messaging connector for ministries of
//! health. FHIR R4 resources come in (iHRIS, OpenMRS, integrators), a FHIR
//! store keeps them as the source of truth, and RapidPro reaches health
//! workers on basic phones.
//!
//! # Layout
//!
//! - [`config`]: typed settings (compiled-in defaults, file, environment).
//! - [`telemetry`]: tracing subscriber, JSON logs, phone masking.
//! - [`error`]: `ApiError`, the only place errors become HTTP responses.
//! - [`fhir`]: resource types, the search parameter table, index
//!   extraction, Bundles, the CapabilityStatement, the conformance
//!   resources of `fhir-profiles/` (loaded at start-up).
//! - [`store`]: the `FhirStore` trait; `SqliteStore` (embedded) and
//!   `HttpFhirStore` (HAPI or any FHIR R4 server).
//! - [`index`]: the contact index for targeting: the `ContactIndex` trait,
//!   documents built from the store, `TantivyIndex` (embedded).
//! - [`api`]: axum routers: `/fhir`, health, metrics, authentication.
//! - [`startup`]: building and running the application; graceful shutdown.
//! - [`cli`]: the `import`, `check`, `demo`, `sync` and `reindex` commands.
//! - [`rapidpro`]: the RapidPro API v2 client and the RapidPro sandbox.
//! - [`pipeline`]: phone normalisation, the person -> contact mapping,
//!   requests, recipients, the outbox, flow results and the write-back.
//! - [`jobs`]: background work: the contact, group and flow syncs, the
//!   messaging dispatcher, and the `serve` job runner.
//!
//! `docs/architecture.md` describes the design.

pub mod api;
pub mod cli;
pub mod config;
pub mod error;
pub mod fhir;
pub mod index;
pub mod jobs;
pub mod outbound;
pub mod pipeline;
pub mod rapidpro;
pub mod startup;
pub mod store;
pub mod telemetry;

/// Install rustls' `ring` crypto provider for the process (reqwest is built
/// without a default provider). Safe to call any number of times; call it
/// before building any `reqwest::Client`.
pub fn install_tls_provider() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // Err means another provider is already installed, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
