//! Extraction of search index values from a resource, following the paths
//! of the search parameter table, and the value normalisations shared by
//! indexing and querying (string folding, date ranges, references).

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, TimeZone, Utc};
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

use super::search_params::{ParamKind, SearchParamDef};

/// One value to index for a parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexValue {
    Token {
        system: Option<String>,
        code: String,
    },
    String {
        folded: String,
        raw: String,
    },
    Reference {
        target_type: Option<String>,
        target_id: String,
    },
    /// Half-open range of epoch milliseconds `[low, high)`.
    Date {
        low: i64,
        high: i64,
    },
    Uri(String),
}

/// Walk `path` (see `search_params` for the syntax) and return the nodes.
pub fn select<'a>(resource: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut out = Vec::new();
    for alternative in path.split(" | ") {
        let mut current: Vec<&Value> = vec![resource];
        for segment in split_segments(alternative.trim()) {
            let mut next = Vec::new();
            if let Some(filter) = segment
                .strip_prefix("where(")
                .and_then(|s| s.strip_suffix(')'))
            {
                let (key, wanted) = parse_where(filter);
                for node in current {
                    if node.get(key).and_then(Value::as_str) == Some(wanted) {
                        next.push(node);
                    }
                }
            } else {
                for node in current {
                    match node.get(segment) {
                        Some(Value::Array(items)) => next.extend(items.iter()),
                        Some(Value::Null) | None => {}
                        Some(v) => next.push(v),
                    }
                }
            }
            current = next;
        }
        out.extend(current);
    }
    out
}

fn split_segments(path: &str) -> Vec<&str> {
    // Dots inside where(...) are not separators.
    let mut segments = Vec::new();
    let mut depth = 0usize;
    let mut start = 0usize;
    for (i, c) in path.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            '.' if depth == 0 => {
                segments.push(&path[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    segments.push(&path[start..]);
    segments
}

fn parse_where(filter: &str) -> (&str, &str) {
    let (key, value) = filter.split_once('=').unwrap_or((filter, ""));
    (key.trim(), value.trim().trim_matches('\''))
}

/// Index values of one parameter in a resource.
pub fn extract(resource: &Value, def: &SearchParamDef) -> Vec<IndexValue> {
    let mut values = Vec::new();
    for node in select(resource, def.path) {
        match def.kind {
            ParamKind::Token => tokens(node, &mut values),
            ParamKind::String => strings(node, &mut values),
            ParamKind::Reference => {
                if let Some(v) = node
                    .get("reference")
                    .and_then(Value::as_str)
                    .and_then(parse_reference)
                {
                    values.push(v);
                }
            }
            ParamKind::Date => {
                if let Some((low, high)) = date_node_range(node) {
                    values.push(IndexValue::Date { low, high });
                }
            }
            ParamKind::Uri => {
                if let Some(s) = node.as_str() {
                    values.push(IndexValue::Uri(s.to_string()));
                }
            }
        }
    }
    values.dedup();
    values
}

fn tokens(node: &Value, out: &mut Vec<IndexValue>) {
    match node {
        Value::String(s) => out.push(IndexValue::Token {
            system: None,
            code: s.clone(),
        }),
        Value::Bool(b) => out.push(IndexValue::Token {
            system: None,
            code: b.to_string(),
        }),
        Value::Object(map) => {
            if let Some(Value::Array(codings)) = map.get("coding") {
                for coding in codings {
                    tokens(coding, out);
                }
            } else if let Some(code) = map.get("code").and_then(Value::as_str) {
                out.push(IndexValue::Token {
                    system: map
                        .get("system")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    code: code.to_string(),
                });
            } else if let Some(value) = map.get("value").and_then(Value::as_str) {
                // Identifier (system|value) and ContactPoint (system is the kind).
                out.push(IndexValue::Token {
                    system: map
                        .get("system")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    code: value.to_string(),
                });
            }
        }
        _ => {}
    }
}

fn strings(node: &Value, out: &mut Vec<IndexValue>) {
    let mut push = |s: &str| {
        if !s.trim().is_empty() {
            out.push(IndexValue::String {
                folded: fold(s),
                raw: s.to_string(),
            });
        }
    };
    match node {
        Value::String(s) => push(s),
        Value::Object(map) => {
            // HumanName and Address parts.
            for key in [
                "text",
                "family",
                "given",
                "prefix",
                "suffix",
                "line",
                "city",
                "district",
                "state",
                "postalCode",
                "country",
            ] {
                match map.get(key) {
                    Some(Value::String(s)) => push(s),
                    Some(Value::Array(items)) => {
                        for item in items.iter().filter_map(Value::as_str) {
                            push(item);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// Case- and accent-insensitive form of a string: NFKD, combining marks
/// removed, lower case, whitespace collapsed.
pub fn fold(s: &str) -> String {
    let stripped: String = s
        .nfkd()
        .filter(|c| !unicode_normalization::char::is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .collect();
    stripped.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `Type/id`, `Type/id/_history/n` or `http://base/Type/id` into its parts.
/// Contained (`#x`) and `urn:` references are not indexed.
pub fn parse_reference(reference: &str) -> Option<IndexValue> {
    if reference.starts_with('#') || reference.starts_with("urn:") || reference.is_empty() {
        return None;
    }
    let path = reference.split(['?', '#']).next().unwrap_or(reference);
    let mut parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    if parts.len() >= 4 && parts[parts.len() - 2] == "_history" {
        parts.truncate(parts.len() - 2);
    }
    match parts.as_slice() {
        [.., t, id] if super::resource_types::looks_like_type_name(t) => {
            Some(IndexValue::Reference {
                target_type: Some((*t).to_string()),
                target_id: (*id).to_string(),
            })
        }
        [id] => Some(IndexValue::Reference {
            target_type: None,
            target_id: (*id).to_string(),
        }),
        _ => None,
    }
}

fn date_node_range(node: &Value) -> Option<(i64, i64)> {
    match node {
        Value::String(s) => date_range(s),
        Value::Object(map) => {
            let low = map
                .get("start")
                .and_then(Value::as_str)
                .and_then(date_range)
                .map(|r| r.0);
            let high = map
                .get("end")
                .and_then(Value::as_str)
                .and_then(date_range)
                .map(|r| r.1);
            if low.is_none() && high.is_none() {
                None
            } else {
                Some((low.unwrap_or(i64::MIN), high.unwrap_or(i64::MAX)))
            }
        }
        _ => None,
    }
}

/// The range of instants a FHIR date, dateTime or instant denotes, as
/// half-open epoch milliseconds: `2024` is the whole year, `2024-03-01` the
/// whole day (UTC), a dateTime with seconds the whole second.
pub fn date_range(text: &str) -> Option<(i64, i64)> {
    let text = text.trim();
    let ms = |d: DateTime<Utc>| d.timestamp_millis();
    match text.len() {
        4 => {
            let year: i32 = text.parse().ok()?;
            let start = Utc.with_ymd_and_hms(year, 1, 1, 0, 0, 0).single()?;
            let end = Utc.with_ymd_and_hms(year + 1, 1, 1, 0, 0, 0).single()?;
            Some((ms(start), ms(end)))
        }
        7 => {
            let date = NaiveDate::parse_from_str(&format!("{text}-01"), "%Y-%m-%d").ok()?;
            let (y, m) = if date.month() == 12 {
                (date.year() + 1, 1)
            } else {
                (date.year(), date.month() + 1)
            };
            let start = Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0)?);
            let end = Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).single()?;
            Some((ms(start), ms(end)))
        }
        10 => {
            let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
            let start = Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0)?);
            Some((ms(start), ms(start + Duration::days(1))))
        }
        _ => {
            let (instant, precision_ms) = parse_date_time(text)?;
            let low = ms(instant);
            Some((low, low + precision_ms))
        }
    }
}

/// A dateTime with a time part; returns the instant and its precision in ms.
fn parse_date_time(text: &str) -> Option<(DateTime<Utc>, i64)> {
    // Shortest form with a time: "2024-01-01T10:00" (16 ASCII characters).
    if text.len() < 16 || !text.is_ascii() || text.as_bytes()[10] != b'T' {
        return None;
    }
    let has_zone =
        text.ends_with('Z') || text[10..].contains('+') || text[10..].rfind('-').is_some();
    let fraction_digits = text
        .split_once('.')
        .map(|(_, rest)| rest.chars().take_while(char::is_ascii_digit).count())
        .unwrap_or(0);
    let seconds_given = text[11..]
        .split(['Z', '+', '-'])
        .next()
        .map(|t| t.matches(':').count() == 2)
        .unwrap_or(false);
    let precision = if fraction_digits > 0 {
        1
    } else if seconds_given {
        1000
    } else {
        60_000
    };
    if has_zone {
        let normalised = if seconds_given {
            text.to_string()
        } else {
            insert_seconds(text)
        };
        let instant = DateTime::parse_from_rfc3339(&normalised)
            .ok()?
            .with_timezone(&Utc);
        Some((instant, precision))
    } else {
        let naive = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
            .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M"))
            .ok()?;
        Some((Utc.from_utc_datetime(&naive), precision))
    }
}

fn insert_seconds(text: &str) -> String {
    // "2024-01-01T10:00Z" -> "2024-01-01T10:00:00Z"
    let zone_start = text[11..]
        .find(['Z', '+', '-'])
        .map(|i| i + 11)
        .unwrap_or(text.len());
    format!("{}:00{}", &text[..zone_start], &text[zone_start..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::search_params::find;
    use serde_json::json;

    #[test]
    fn folding_removes_case_and_accents() {
        assert_eq!(fold("  Zoë  DE  la Peña "), "zoe de la pena");
        assert_eq!(fold("ÉCOLE"), "ecole");
    }

    #[test]
    fn where_filters_select_phones_only() {
        let p = json!({"resourceType": "Practitioner", "telecom": [
            {"system": "phone", "value": "111"}, {"system": "email", "value": "a@b"},
            {"system": "sms", "value": "222"}]});
        let values = extract(&p, find("Practitioner", "phone").unwrap());
        assert_eq!(
            values,
            vec![
                IndexValue::Token {
                    system: Some("phone".into()),
                    code: "111".into()
                },
                IndexValue::Token {
                    system: Some("sms".into()),
                    code: "222".into()
                },
            ]
        );
    }

    #[test]
    fn human_names_give_every_part() {
        let p = json!({"resourceType": "Practitioner", "name": [{"family": "Núñez", "given": ["Ana", "María"]}]});
        let values = extract(&p, find("Practitioner", "name").unwrap());
        let folded: Vec<_> = values
            .iter()
            .map(|v| match v {
                IndexValue::String { folded, .. } => folded.as_str(),
                _ => "",
            })
            .collect();
        assert_eq!(folded, vec!["nunez", "ana", "maria"]);
    }

    #[test]
    fn references_parse_relative_absolute_and_versioned() {
        assert_eq!(
            parse_reference("Location/TF.W"),
            Some(IndexValue::Reference {
                target_type: Some("Location".into()),
                target_id: "TF.W".into()
            })
        );
        assert_eq!(
            parse_reference("http://x/fhir/Patient/1/_history/2"),
            Some(IndexValue::Reference {
                target_type: Some("Patient".into()),
                target_id: "1".into()
            })
        );
        assert_eq!(parse_reference("#contained"), None);
        assert_eq!(parse_reference("urn:uuid:1234"), None);
    }

    #[test]
    fn date_precision_gives_ranges() {
        let (lo, hi) = date_range("2024").unwrap();
        assert_eq!(hi - lo, 366 * 86_400_000);
        let (lo, hi) = date_range("2024-02").unwrap();
        assert_eq!(hi - lo, 29 * 86_400_000);
        let (lo, hi) = date_range("2024-02-03T10:00:00+01:00").unwrap();
        assert_eq!(hi - lo, 1000);
        assert_eq!(lo, date_range("2024-02-03T09:00:00Z").unwrap().0);
        assert_eq!(
            date_range("2024-02-03T09:00:00.250Z").unwrap().1
                - date_range("2024-02-03T09:00:00.250Z").unwrap().0,
            1
        );
        assert!(date_range("yesterday").is_none());
        assert!(date_range("2024-13-01").is_none());
    }

    #[test]
    fn periods_are_open_ended() {
        let role = json!({"resourceType": "PractitionerRole", "period": {"start": "2020-01-01"}});
        let values = extract(&role, find("PractitionerRole", "date").unwrap());
        assert!(matches!(values[0], IndexValue::Date { high: i64::MAX, .. }));
    }
}
