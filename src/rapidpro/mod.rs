//! RapidPro: the connector's API v2 client (`client`, `types`,
//! `throttle`) and the RapidPro sandbox (`sandbox`), an in-memory
//! implementation of the same contract for tests, demos and integrators.
//! The contract is `shared/reference/rapidpro-api.md`.

pub mod client;
pub mod sandbox;
pub mod throttle;
pub mod types;
