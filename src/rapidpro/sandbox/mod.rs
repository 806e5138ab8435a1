//! The RapidPro API v2 sandbox: in-memory state behind the same HTTP contract.
