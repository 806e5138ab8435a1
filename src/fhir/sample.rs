//! Generated sample data in the iHRIS/mCSD shape: a location hierarchy
//! (country, regions, districts, facilities), Practitioners with phones,
//! and PractitionerRoles tying them to facilities with an iHRIS job code.
//! Deterministic for a given size; used by the benchmarks
//! (`mhero demo` loads the iHRIS demo data instead).

use serde_json::{Value, json};

const GIVEN: &[&str] = &[
    "Aminata",
    "Joseph",
    "Fatu",
    "Emmanuel",
    "Comfort",
    "Moses",
    "Hawa",
    "Samuel",
    "Musu",
    "Prince",
    "Esther",
    "Varney",
    "Kebeh",
    "Momo",
    "Josephine",
    "Amos",
    "Siata",
    "Francis",
    "Korto",
    "Abraham",
    "Zoë",
    "Nyenpan",
    "Béatrice",
    "Tenneh",
];
const FAMILY: &[&str] = &[
    "Kamara",
    "Johnson",
    "Kollie",
    "Flomo",
    "Sirleaf",
    "Dolo",
    "Konneh",
    "Weah",
    "Tarr",
    "Kpoto",
    "Gbowee",
    "Massaquoi",
    "Sackor",
    "Toe",
    "Zinnah",
    "Cooper",
    "Freeman",
    "Pewee",
    "Nyumah",
    "Quaye",
    "Doe",
    "Boakai",
    "Fahnbulleh",
    "Kromah",
];
const JOBS: &[(&str, &str)] = &[
    ("midwife", "Midwife"),
    ("nurse", "Registered Nurse"),
    ("chw", "Community Health Worker"),
    ("physician", "Medical Doctor"),
    ("pa", "Physician Assistant"),
];
pub const JOB_SYSTEM: &str = "http://ihris.org/fhir/CodeSystem/ihris-job";

/// A deterministic pseudo-random sequence (no external crate needed).
struct Sequence(u64);

impl Sequence {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() as usize) % items.len()]
    }
}

fn location(id: &str, name: &str, kind: &str, part_of: Option<&str>) -> Value {
    let mut location = json!({
        "resourceType": "Location",
        "id": id,
        "status": "active",
        "name": name,
        "type": [{ "coding": [{ "system": "urn:ihe:iti:mcsd:2019:location-type", "code": kind }] }],
        "physicalType": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/location-physical-type", "code": if kind == "facility" { "bu" } else { "jdn" } }] }
    });
    if let Some(parent) = part_of {
        location["partOf"] = json!({ "reference": format!("Location/{parent}") });
    }
    location
}

/// The location hierarchy: 1 country, 4 regions, 3 districts each, `facilities_per_district` facilities each.
pub fn locations(facilities_per_district: usize) -> Vec<Value> {
    let mut out = vec![location("LR", "Liberia", "country", None)];
    for (r, region) in ["Western", "Northern", "Central", "Southeastern"]
        .iter()
        .enumerate()
    {
        let region_id = format!("LR.{}", r + 1);
        out.push(location(
            &region_id,
            &format!("{region} Region"),
            "region",
            Some("LR"),
        ));
        for d in 1..=3 {
            let district_id = format!("{region_id}.{d}");
            out.push(location(
                &district_id,
                &format!("{region} District {d}"),
                "district",
                Some(&region_id),
            ));
            for f in 1..=facilities_per_district {
                let facility_id = format!("{district_id}.{f}");
                out.push(location(
                    &facility_id,
                    &format!("{region} {d} Health Centre {f}"),
                    "facility",
                    Some(&district_id),
                ));
            }
        }
    }
    out
}

/// Facility ids of [`locations`].
pub fn facility_ids(facilities_per_district: usize) -> Vec<String> {
    let mut out = Vec::new();
    for r in 1..=4 {
        for d in 1..=3 {
            for f in 1..=facilities_per_district {
                out.push(format!("LR.{r}.{d}.{f}"));
            }
        }
    }
    out
}

/// Practitioner number `n` (ids `HW000001`...), with a Liberian mobile number.
pub fn practitioner(n: usize) -> Value {
    let mut seq = Sequence(n as u64 * 7919 + 17);
    let given = seq.pick(GIVEN);
    let family = seq.pick(FAMILY);
    let gender = if seq.next() % 2 == 0 {
        "female"
    } else {
        "male"
    };
    json!({
        "resourceType": "Practitioner",
        "id": format!("HW{n:06}"),
        "identifier": [{ "system": "http://ihris.org/fhir/id/employee", "value": format!("EMP-{n:06}") }],
        "active": true,
        "name": [{ "use": "official", "family": family, "given": [given], "text": format!("{given} {family}") }],
        "telecom": [{ "system": "phone", "value": format!("+2317{:08}", 70_000_000 + n), "use": "mobile" }],
        "gender": gender
    })
}

/// The role of practitioner `n` at one of `facilities`.
pub fn practitioner_role(n: usize, facilities: &[String]) -> Value {
    let mut seq = Sequence(n as u64 * 104729 + 3);
    let (code, display) = JOBS[(seq.next() as usize) % JOBS.len()];
    let facility = &facilities[(seq.next() as usize) % facilities.len().max(1)];
    json!({
        "resourceType": "PractitionerRole",
        "id": format!("HW{n:06}-role"),
        "active": true,
        "practitioner": { "reference": format!("Practitioner/HW{n:06}") },
        "location": [{ "reference": format!("Location/{facility}") }],
        "code": [{ "coding": [{ "system": JOB_SYSTEM, "code": code, "display": display }] }]
    })
}

/// A transaction Bundle that PUTs `resources` (each must have an id).
pub fn transaction(resources: Vec<Value>) -> Value {
    let entries: Vec<Value> = resources
        .into_iter()
        .map(|r| {
            let url = format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap_or(""),
                r["id"].as_str().unwrap_or("")
            );
            json!({ "fullUrl": url, "resource": r, "request": { "method": "PUT", "url": url } })
        })
        .collect();
    json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_data_is_deterministic_and_consistent() {
        assert_eq!(practitioner(5), practitioner(5));
        assert_ne!(practitioner(5)["telecom"], practitioner(6)["telecom"]);
        let facilities = facility_ids(2);
        assert_eq!(facilities.len(), 24);
        assert_eq!(locations(2).len(), 1 + 4 + 12 + 24);
        let role = practitioner_role(5, &facilities);
        let facility = role["location"][0]["reference"]
            .as_str()
            .unwrap()
            .trim_start_matches("Location/");
        assert!(facilities.iter().any(|f| f == facility));
    }
}
