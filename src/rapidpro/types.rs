//! Typed RapidPro API v2 requests and responses.
