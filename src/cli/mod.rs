//! Command-line work that is more than starting the server: `import`
//! (Bundles and NDJSON into the store), `check` (reach every backend),
//! `demo`, `sync` (one pass of a sync) and `reindex` (the contact index
//! rebuilt from the store).

pub mod check;
pub mod demo;
pub mod import;
pub mod reindex;
pub mod sync;
