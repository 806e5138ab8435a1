//! Background work executed from FHIR state, idempotently: each job
//! exposes `run_once()` (tests drive it, never sleep) and `run(cancel)`.
//! Today: writing RapidPro contact UUIDs back onto FHIR people
//! (`contact_writeback`) and durable job cursors (`cursor`); the sync,
//! dispatch and reconcile jobs follow.

pub mod contact_status;
pub mod contact_status_poll;
pub mod contact_sync;
pub mod contact_writeback;
pub mod cursor;
pub mod group_sync;
pub mod rapidpro_directory;
pub mod runner;
pub mod sync_status;
#[cfg(test)]
mod test_support;
