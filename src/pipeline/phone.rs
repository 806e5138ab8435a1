//! Phone numbers to E.164 URNs.
