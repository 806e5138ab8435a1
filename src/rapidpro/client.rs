//! RapidPro API v2 client.
