//! Logging: the tracing subscriber (human text on a terminal, JSON lines
//! with `server.log_format = "json"`), and the masking of phone numbers so
//! that no full number ever reaches a log line.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Install the global subscriber once. `RUST_LOG` overrides the default
/// filter (`info`). Calling it again is harmless.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tower_http=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    // Already installed (tests, or a second call): keep the first one.
    let _ = result;
}

/// Mask a phone number (or any URN carrying one) for logs: every digit but
/// the last three becomes `*`.
///
/// ```
/// assert_eq!(mhero::telemetry::mask_phone("tel:+231770123456"), "tel:+*********456");
/// ```
pub fn mask_phone(value: &str) -> String {
    let total_digits = value.chars().filter(char::is_ascii_digit).count();
    let keep_from = total_digits.saturating_sub(3);
    let mut seen = 0;
    value
        .chars()
        .map(|c| {
            if c.is_ascii_digit() {
                seen += 1;
                if seen <= keep_from { '*' } else { c }
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_three_digits_survive() {
        assert_eq!(mask_phone("tel:+231770123456"), "tel:+*********456");
        assert_eq!(mask_phone("12"), "12");
        assert_eq!(mask_phone("+1 (555) 010-9999"), "+* (***) ***-*999");
    }
}
