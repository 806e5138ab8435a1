//! Phone numbers to E.164 and to RapidPro URNs, with libphonenumber's
//! rules (the `phonenumber` crate), never hand-written ones. A number is
//! accepted only if libphonenumber parses it *and* finds it valid for its
//! country; anything else is refused with a reason and never sent.

use std::str::FromStr;

use phonenumber::country::Id as CountryId;
use phonenumber::{Mode, PhoneNumber};

/// Why a phone value cannot become a URN. Messages never contain the
/// whole number (they end up in logs and sync statuses).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    #[error("'{0}' is not an ISO 3166 alpha-2 country code libphonenumber knows")]
    UnknownCountry(String),
    #[error("the number ending in {masked} cannot be read as a phone number{hint}")]
    Unparseable { masked: String, hint: String },
    #[error("the number ending in {masked} is not a valid number for {country}")]
    Invalid { masked: String, country: String },
}

fn last_three(raw: &str) -> String {
    let digits: Vec<char> = raw.chars().filter(char::is_ascii_digit).collect();
    let tail: String = digits[digits.len().saturating_sub(3)..].iter().collect();
    format!("…{tail}")
}

/// Which telecoms also give a `whatsapp:` or `telegram:` URN.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UrnMapping {
    /// `whatsapp` or `telegram`.
    pub scheme: String,
    /// `ContactPoint.system` to match (`phone`, `sms`, `other`, ...).
    pub system: String,
    /// `ContactPoint.use` to match; any use when absent.
    #[serde(default, rename = "use")]
    pub use_: Option<String>,
}

pub const URN_MAPPING_SCHEMES: &[&str] = &["whatsapp", "telegram"];

/// Turns local and international phone values into E.164.
#[derive(Debug, Clone)]
pub struct PhoneNormalizer {
    default_country: Option<CountryId>,
    urn_mappings: Vec<UrnMapping>,
}

impl PhoneNormalizer {
    /// `default_country` (e.g. `"LR"`) is used for numbers written without
    /// a country code; `None` accepts only international (`+...`) numbers.
    pub fn new(default_country: Option<&str>) -> Result<Self, PhoneError> {
        let default_country = default_country.map(parse_country).transpose()?;
        Ok(PhoneNormalizer {
            default_country,
            urn_mappings: Vec::new(),
        })
    }

    /// From `[phone]`: default country and URN mappings.
    pub fn from_settings(settings: &crate::config::PhoneSettings) -> Result<Self, PhoneError> {
        Ok(Self::new(settings.default_country.as_deref())?
            .with_urn_mappings(settings.urn_mappings.clone()))
    }

    /// Also make `whatsapp:` / `telegram:` URNs from matching telecoms.
    pub fn with_urn_mappings(mut self, mappings: Vec<UrnMapping>) -> Self {
        self.urn_mappings = mappings;
        self
    }

    /// The extra URNs a telecom gives under the configured mappings.
    pub fn mapped_urns(&self, telecom: &serde_json::Value) -> Vec<Result<String, PhoneError>> {
        let system = telecom
            .get("system")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        let use_ = telecom.get("use").and_then(serde_json::Value::as_str);
        let Some(value) = telecom.get("value").and_then(serde_json::Value::as_str) else {
            return Vec::new();
        };
        self.urn_mappings
            .iter()
            .filter(|m| m.system == system && (m.use_.is_none() || m.use_.as_deref() == use_))
            .map(|m| match m.scheme.as_str() {
                "telegram" => {
                    let id = value.trim().trim_start_matches("telegram:");
                    if !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()) {
                        Ok(format!("telegram:{id}"))
                    } else {
                        Err(PhoneError::Unparseable {
                            masked: last_three(value),
                            hint: " (a Telegram id is a number)".into(),
                        })
                    }
                }
                _ => self.whatsapp_urn(value),
            })
            .collect()
    }

    /// E.164 (`+231770123456`) of `raw`, read with `country` if given,
    /// else the default country.
    pub fn to_e164(&self, raw: &str, country: Option<&str>) -> Result<String, PhoneError> {
        let country = match country {
            Some(c) => Some(parse_country(c)?),
            None => self.default_country,
        };
        let masked = last_three(raw);
        let number: PhoneNumber =
            phonenumber::parse(country, raw.trim()).map_err(|e| PhoneError::Unparseable {
                masked: masked.clone(),
                hint: if country.is_none() && !raw.trim_start().starts_with('+') {
                    " (it has no country code and phone.default_country is not set)".to_string()
                } else {
                    format!(" ({e})")
                },
            })?;
        if !phonenumber::is_valid(&number) {
            let country = number
                .country()
                .id()
                .map(|id| format!("{id:?}"))
                .unwrap_or_else(|| format!("country code +{}", number.country().code()));
            return Err(PhoneError::Invalid { masked, country });
        }
        Ok(number.format().mode(Mode::E164).to_string())
    }

    /// The `tel:` URN RapidPro expects (`tel:+231770123456`).
    pub fn tel_urn(&self, raw: &str) -> Result<String, PhoneError> {
        Ok(format!("tel:{}", self.to_e164(raw, None)?))
    }

    /// A `whatsapp:` URN: the E.164 digits without `+`.
    pub fn whatsapp_urn(&self, raw: &str) -> Result<String, PhoneError> {
        Ok(format!(
            "whatsapp:{}",
            self.to_e164(raw, None)?.trim_start_matches('+')
        ))
    }
}

fn parse_country(code: &str) -> Result<CountryId, PhoneError> {
    CountryId::from_str(&code.trim().to_ascii_uppercase())
        .map_err(|_| PhoneError::UnknownCountry(code.to_string()))
}

/// Whether a telecom value without `system` looks like a phone number (as
/// OpenMRS sends them): only digits and phone punctuation, 6 to 15 digits.
pub fn looks_like_phone(value: &str) -> bool {
    let value = value.trim();
    let allowed = value
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '+' | ' ' | '-' | '.' | '(' | ')' | '/'));
    let digits = value.chars().filter(char::is_ascii_digit).count();
    allowed && (6..=15).contains(&digits) && value.find('+').is_none_or(|i| i == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_numbers_need_a_country() {
        let liberia = PhoneNormalizer::new(Some("LR")).unwrap();
        assert_eq!(
            liberia.to_e164("077 012 3456", None).unwrap(),
            "+231770123456"
        );
        assert_eq!(
            liberia.tel_urn("+231 77 012 3456").unwrap(),
            "tel:+231770123456"
        );
        assert_eq!(
            liberia.whatsapp_urn("0770123456").unwrap(),
            "whatsapp:231770123456"
        );
        let nowhere = PhoneNormalizer::new(None).unwrap();
        let err = nowhere.to_e164("077 012 3456", None).unwrap_err();
        assert!(err.to_string().contains("phone.default_country"), "{err}");
        assert!(
            !err.to_string().contains("0770123"),
            "no whole number in messages: {err}"
        );
        assert!(matches!(
            PhoneNormalizer::new(Some("XX")),
            Err(PhoneError::UnknownCountry(_))
        ));
    }

    #[test]
    fn mapped_telecoms_give_whatsapp_and_telegram_urns() {
        let phones = PhoneNormalizer::new(Some("LR"))
            .unwrap()
            .with_urn_mappings(vec![
                UrnMapping {
                    scheme: "whatsapp".into(),
                    system: "phone".into(),
                    use_: Some("mobile".into()),
                },
                UrnMapping {
                    scheme: "telegram".into(),
                    system: "other".into(),
                    use_: None,
                },
            ]);
        let mobile =
            serde_json::json!({"system": "phone", "use": "mobile", "value": "077 012 3456"});
        assert_eq!(
            phones.mapped_urns(&mobile),
            vec![Ok("whatsapp:231770123456".to_string())]
        );
        let work = serde_json::json!({"system": "phone", "use": "work", "value": "077 012 3456"});
        assert!(phones.mapped_urns(&work).is_empty());
        let telegram = serde_json::json!({"system": "other", "value": "123456789"});
        assert_eq!(
            phones.mapped_urns(&telegram),
            vec![Ok("telegram:123456789".to_string())]
        );
        assert!(
            phones.mapped_urns(&serde_json::json!({"system": "other", "value": "@handle"}))[0]
                .is_err()
        );
    }

    #[test]
    fn openmrs_style_values_are_recognised() {
        assert!(looks_like_phone("+256 712 345678"));
        assert!(looks_like_phone("(03) 5555 6473"));
        assert!(!looks_like_phone("someone@example.org"));
        assert!(!looks_like_phone("12"));
        assert!(!looks_like_phone("256+712345678"));
    }
}
