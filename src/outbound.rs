//! What the connector's outbound HTTP clients (the FHIR server client in
//! `store::http` and the RapidPro client) share: exponential backoff with
//! jitter between retries, and error texts without URLs (a URL may carry a
//! phone number in its query).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// No single backoff sleep is longer than this (plus jitter).
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// `base * 2^attempt`, capped at [`MAX_BACKOFF`], plus up to half of it
/// again as jitter (from the clock's nanoseconds; no random number
/// generator needed).
pub fn backoff_delay(base: Duration, attempt: u32) -> Duration {
    let delay = base
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(MAX_BACKOFF);
    let half = delay.as_nanos() as u64 / 2;
    if half == 0 {
        return delay;
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    delay + Duration::from_nanos(nanos % half)
}

/// An error and its sources, joined, with the request URL removed.
pub fn error_chain(error: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    if let Some(url) = error.url() {
        text = text.replace(&format!(" for url ({url})"), "");
        text = text.replace(url.as_str(), "<url>");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_capped() {
        let base = Duration::from_millis(100);
        let first = backoff_delay(base, 0);
        assert!(first >= base && first < base * 2, "{first:?}");
        let third = backoff_delay(base, 2);
        assert!(third >= base * 4 && third < base * 6, "{third:?}");
        assert!(backoff_delay(base, 40) <= MAX_BACKOFF + MAX_BACKOFF / 2);
        assert_eq!(backoff_delay(Duration::ZERO, 3), Duration::ZERO);
    }
}
