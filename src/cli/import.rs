//! `mhero import`.
