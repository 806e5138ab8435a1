//! Every case of `shared/fixtures/phone/phone-numbers-open.json` (checked
//! against libphonenumber upstream) gives its `expected_e164`, or is
//! refused when that is null.

mod common;

use mhero::pipeline::phone::PhoneNormalizer;

#[test]
fn every_fixture_number_normalises_as_libphonenumber_says() {
    let fixture = common::fixture("phone/phone-numbers-open.json");
    let entries = fixture["entries"].as_array().unwrap();
    assert!(entries.len() >= 40);
    let normalizer = PhoneNormalizer::new(None).unwrap();
    let mut failures = Vec::new();
    for entry in entries {
        let input = entry["input"].as_str().unwrap();
        let country = entry["country"].as_str();
        let expected = entry["expected_e164"].as_str();
        let got = normalizer.to_e164(input, country);
        match (expected, &got) {
            (Some(e), Ok(g)) if e == g => {}
            (None, Err(_)) => {}
            _ => failures.push(format!(
                "{input:?} ({country:?}): expected {expected:?}, got {got:?}"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
