//! Command-line work that is more than starting the server: `import`
//! (Bundles and NDJSON into the store), `check` (reach every backend),
//! `demo`, and `sync contacts` (one contact sync pass).

pub mod check;
pub mod demo;
pub mod import;
pub mod sync;
