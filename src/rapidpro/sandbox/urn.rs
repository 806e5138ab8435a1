//! URN normalisation and validation as RapidPro does it (reference §6):
//! allowed schemes, E.164-ish `tel:` numbers (with the workspace country for
//! local numbers), `whatsapp:` digits without `+`, digits-only `telegram:`,
//! lowercase `mailto:`/`twitter:`, free-form `ext:`. Phone numbers are
//! checked for a plausible length only, not with libphonenumber.

const SCHEMES: [&str; 20] = [
    "tel",
    "mailto",
    "bsuid",
    "ext",
    "facebook",
    "fcm",
    "freshchat",
    "instagram",
    "jiochat",
    "line",
    "rocketchat",
    "slack",
    "telegram",
    "twitterid",
    "twitter",
    "viber",
    "vk",
    "wechat",
    "webchat",
    "whatsapp",
];

/// Country -> (calling code, national number lengths).
fn country_info(country: &str) -> Option<(&'static str, std::ops::RangeInclusive<usize>)> {
    Some(match country.to_ascii_uppercase().as_str() {
        "RW" => ("250", 9..=9),
        "UG" => ("256", 9..=9),
        "KE" => ("254", 9..=10),
        "TZ" => ("255", 9..=9),
        "BI" => ("257", 8..=8),
        "CD" => ("243", 9..=9),
        "LR" => ("231", 7..=9),
        "SL" => ("232", 8..=8),
        "GN" => ("224", 8..=9),
        "NG" => ("234", 8..=10),
        "GH" => ("233", 9..=9),
        "ML" => ("223", 8..=8),
        "SN" => ("221", 9..=9),
        "ET" => ("251", 9..=9),
        "ZA" => ("27", 9..=9),
        "ZM" => ("260", 9..=9),
        "MW" => ("265", 7..=9),
        "MZ" => ("258", 8..=9),
        "US" | "CA" => ("1", 10..=10),
        "GB" => ("44", 9..=10),
        "FR" => ("33", 9..=9),
        _ => return None,
    })
}

/// Normalises and validates one URN. `Err` carries RapidPro's error text.
pub fn normalize_urn(input: &str, country: Option<&str>) -> Result<String, String> {
    let invalid = || format!("Invalid URN: {input}. Ensure phone numbers contain country codes.");
    if input.len() > 255 {
        return Err(invalid());
    }
    let (scheme, path) = input.split_once(':').ok_or_else(invalid)?;
    let scheme = scheme.trim().to_lowercase();
    if !SCHEMES.contains(&scheme.as_str()) {
        return Err(invalid());
    }
    // The `#display` fragment is not part of the identity.
    let path = path.split('#').next().unwrap_or("").trim();
    if path.is_empty() {
        return Err(invalid());
    }
    let path = match scheme.as_str() {
        "tel" => normalize_tel(path, country).ok_or_else(invalid)?,
        "whatsapp" => {
            if path.chars().all(|c| c.is_ascii_digit()) {
                path.to_string()
            } else {
                // Business-scoped ids: `CC.id`, country upper-cased.
                let (cc, id) = path.split_once('.').ok_or_else(invalid)?;
                if cc.len() == 2
                    && cc.chars().all(|c| c.is_ascii_alphabetic())
                    && (1..=128).contains(&id.len())
                    && id.chars().all(|c| c.is_ascii_alphanumeric())
                {
                    format!("{}.{id}", cc.to_ascii_uppercase())
                } else {
                    return Err(invalid());
                }
            }
        }
        "telegram" => {
            if path.chars().all(|c| c.is_ascii_digit()) {
                path.to_string()
            } else {
                return Err(invalid());
            }
        }
        "facebook" => {
            if path.chars().all(|c| c.is_ascii_digit())
                || path.strip_prefix("ref:").is_some_and(|r| !r.is_empty())
            {
                path.to_string()
            } else {
                return Err(invalid());
            }
        }
        "mailto" => {
            let lower = path.to_lowercase();
            let (local, domain) = lower.split_once('@').ok_or_else(invalid)?;
            if local.is_empty()
                || domain.is_empty()
                || !domain.contains('.')
                || domain.starts_with('.')
                || domain.ends_with('.')
                || lower.contains(char::is_whitespace)
                || domain.contains('@')
            {
                return Err(invalid());
            }
            lower
        }
        "twitter" => {
            let handle = path.trim_start_matches('@').to_lowercase();
            if (1..=15).contains(&handle.len())
                && handle
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                handle
            } else {
                return Err(invalid());
            }
        }
        _ => path.to_string(),
    };
    Ok(format!("{scheme}:{path}"))
}

fn normalize_tel(path: &str, country: Option<&str>) -> Option<String> {
    let plus = path.starts_with('+');
    let mut digits = String::new();
    for c in path.chars() {
        match c {
            '0'..='9' => digits.push(c),
            ' ' | '-' | '(' | ')' | '.' | '\t' => {}
            '+' if digits.is_empty() => {}
            _ => return None,
        }
    }
    if plus || (digits.len() >= 11 && !digits.starts_with('0')) {
        // International: E.164 allows at most 15 digits.
        if (8..=15).contains(&digits.len()) && !digits.starts_with('0') {
            return Some(format!("+{digits}"));
        }
        return None;
    }
    let (code, lengths) = country_info(country?)?;
    let national = digits.strip_prefix('0').unwrap_or(&digits);
    let national = if digits.starts_with('0') {
        national
    } else {
        // A number already carrying the calling code without `+`.
        digits
            .strip_prefix(code)
            .filter(|n| lengths.contains(&n.len()))
            .unwrap_or(national)
    };
    if lengths.contains(&national.len()) {
        Some(format!("+{code}{national}"))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_urn;

    #[test]
    fn reference_table() {
        let ok = [
            ("tel:+250-78-7777777", None, "tel:+250787777777"),
            ("tel:+1 (206) 555-1212", None, "tel:+12065551212"),
            ("tel:0788123123", Some("RW"), "tel:+250788123123"),
            ("tel:12065551212", None, "tel:+12065551212"),
            ("tel:2065551212", Some("US"), "tel:+12065551212"),
            ("whatsapp:250788123123", None, "whatsapp:250788123123"),
            ("whatsapp:us.abc123", None, "whatsapp:US.abc123"),
            ("telegram:12345", None, "telegram:12345"),
            ("facebook:12345", None, "facebook:12345"),
            ("facebook:ref:abc", None, "facebook:ref:abc"),
            ("mailto:Bob@Example.COM", None, "mailto:bob@example.com"),
            ("twitter:@JEAN", None, "twitter:jean"),
            ("ext:anything goes", None, "ext:anything goes"),
            ("TEL:+250788123123#Bob", None, "tel:+250788123123"),
        ];
        for (input, country, want) in ok {
            assert_eq!(
                normalize_urn(input, country).as_deref(),
                Ok(want),
                "{input}"
            );
        }
        let bad = [
            ("tel:0788123123", None),
            ("tel:2065551212", None),
            ("tel:123456", Some("RW")),
            ("whatsapp:+250788123123", None),
            ("telegram:abc", None),
            ("foo:bar", None),
            ("1234556789", None),
            ("tel:", None),
            ("mailto:nobody", None),
        ];
        for (input, country) in bad {
            assert_eq!(
                normalize_urn(input, country),
                Err(format!(
                    "Invalid URN: {input}. Ensure phone numbers contain country codes."
                )),
                "{input}"
            );
        }
    }
}
