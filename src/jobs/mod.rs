//! Background work executed from FHIR state, idempotently: each job
//! exposes `run_once()` (tests drive it, never sleep) and `run(cancel)`.
//! The contact and group syncs (`contact_sync`, `contact_status_poll`,
//! `group_sync`, with `contact_writeback`, `rapidpro_directory`,
//! `sync_status`), the flow sync (`flow_sync`, RapidPro flows -> FHIR
//! Basic), the messaging dispatcher (`dispatch`), the cron scheduler and
//! `$cancel` (`schedule`), durable job
//! cursors (`cursor`), the contact index follower (`index_sync`) and the
//! `serve` job runner (`runner`).

pub mod contact_status;
pub mod contact_status_poll;
pub mod contact_sync;
pub mod contact_writeback;
pub mod cursor;
pub mod delivery_poll;
pub mod dispatch;
pub mod flow_sync;
pub mod group_sync;
pub mod inbound_poll;
pub mod index_sync;
pub mod rapidpro_directory;
pub mod run_poll;
pub mod runner;
pub mod schedule;
pub mod sync_status;
#[cfg(test)]
mod test_support;
