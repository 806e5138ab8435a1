//! `mhero check`.
