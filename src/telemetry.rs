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

/// Mask every phone-like run in free text (7 or more digits, possibly with
/// `+`, spaces, dots, dashes or brackets between them), keeping the last
/// three digits of each run. Used on error messages before they are logged:
/// a client's query or body may carry a phone number.
pub fn redact_phones(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let is_part = |c: char| c.is_ascii_digit() || matches!(c, '+' | ' ' | '-' | '.' | '(' | ')');
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_digit() && chars[i] != '+' && chars[i] != '(' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_part(chars[i]) {
            i += 1;
        }
        let run: String = chars[start..i].iter().collect();
        if run.chars().filter(char::is_ascii_digit).count() >= 7 && !looks_like_date(run.trim()) {
            out.push_str(&mask_phone(&run));
        } else {
            out.push_str(&run);
        }
    }
    out
}

/// `2024-01-31` or `2024-01` (a date in a message is not a phone number).
fn looks_like_date(run: &str) -> bool {
    let b = run.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    match b.len() {
        7 => digits(0..4) && b[4] == b'-' && digits(5..7),
        10 => digits(0..4) && b[4] == b'-' && digits(5..7) && b[7] == b'-' && digits(8..10),
        _ => false,
    }
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

    #[test]
    fn phone_runs_in_messages_are_masked_and_the_rest_kept() {
        assert_eq!(
            redact_phones("If-None-Exist phone=+231770123456 matches more than one Practitioner"),
            "If-None-Exist phone=+*********456 matches more than one Practitioner"
        );
        assert_eq!(
            redact_phones("tel:0770 123 456 and version 12"),
            "tel:**** *** 456 and version 12"
        );
        assert_eq!(
            redact_phones("Practitioner/HW000001 version 3"),
            "Practitioner/HW000001 version 3"
        );
        assert_eq!(
            redact_phones("'2024-13-45' is not a valid date"),
            "'2024-13-45' is not a valid date"
        );
    }
}
