//! Command-line work that is more than starting the server: `import`
//! (Bundles and NDJSON into the store) and `check` (reach every backend).

pub mod check;
pub mod demo;
pub mod import;
