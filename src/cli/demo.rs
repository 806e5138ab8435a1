//! `mhero demo`: sample facilities and health workers loaded into an
//! embedded store (once; a second run finds them there), and the banner
//! with URLs and commands to try.

use crate::config::{Secret, Settings};
use crate::fhir::sample;
use crate::rapidpro::sandbox::{SandboxServer, SandboxSettings};
use crate::store::{FhirStore, SearchRequest, StoreError};

pub const DEMO_PRACTITIONERS: usize = 200;
const FACILITIES_PER_DISTRICT: usize = 2;

/// Load the sample data unless the store already has practitioners.
pub async fn load_sample_data(store: &dyn FhirStore) -> Result<(), StoreError> {
    let existing = store
        .search(SearchRequest {
            resource_type: "Practitioner".into(),
            params: vec![("_summary".into(), "count".into())],
            ..Default::default()
        })
        .await?;
    if existing.total.unwrap_or(0) > 0 {
        return Ok(());
    }
    store
        .process_bundle(sample::transaction(sample::locations(
            FACILITIES_PER_DISTRICT,
        )))
        .await?;
    let facilities = sample::facility_ids(FACILITIES_PER_DISTRICT);
    let mut people = Vec::with_capacity(DEMO_PRACTITIONERS * 2);
    for n in 1..=DEMO_PRACTITIONERS {
        people.push(sample::practitioner(n));
        people.push(sample::practitioner_role(n, &facilities));
    }
    store.process_bundle(sample::transaction(people)).await?;
    Ok(())
}

/// The in-process RapidPro sandbox of the demo (Liberian workspace, throttle
/// raised so the first sync of the sample people is quick).
pub async fn start_sandbox() -> std::io::Result<SandboxServer> {
    let mut settings = SandboxSettings::default()
        .with_throttle_rate(crate::rapidpro::sandbox::Rate::per_hour(360_000));
    settings.workspace.country = Some("LR".into());
    SandboxServer::start(settings).await
}

/// Point the connector at the sandbox (and read local numbers as Liberian).
pub fn point_at_sandbox(settings: &mut Settings, sandbox: &SandboxServer) {
    settings.rapidpro.base_url = sandbox.base_url().parse().ok();
    settings.rapidpro.token = Some(Secret::new(sandbox.token()));
    settings.rapidpro.rate_per_hour.v2 = 360_000;
    settings.rapidpro.rate_per_hour.contacts = 360_000;
    settings.rapidpro.rate_per_hour.messages = 360_000;
    settings.rapidpro.rate_per_hour.runs = 360_000;
    if settings.phone.default_country.is_none() {
        settings.phone.default_country = Some("LR".into());
    }
}

pub fn banner(fhir_base: &str, sandbox: Option<&SandboxServer>) -> String {
    let rapidpro = match sandbox {
        Some(sandbox) => format!(
            "\n  RapidPro sandbox: {url} (token {token}); the sample health workers are synced to it as contacts:\n  \
             curl -H 'Authorization: Token {token}' '{url}/api/v2/contacts.json'\n",
            url = sandbox.base_url(),
            token = sandbox.token()
        ),
        None => String::new(),
    };
    format!(
        "mHero connector demo is running.\n\
         \n  FHIR API:        {fhir_base}\n  Capabilities:    {fhir_base}/metadata\n  Health:          {base}/health/ready\n\
         \nTry:\n  curl '{fhir_base}/Practitioner?name=kamara&_count=5'\n  \
         curl '{fhir_base}/PractitionerRole?location=Location/LR.1.1.1&_include=PractitionerRole:practitioner'\n  \
         curl '{fhir_base}/Location?partof=Location/LR.1&_revinclude=Location:partof'\n\
         {rapidpro}\nStop with Ctrl-C.",
        base = fhir_base.trim_end_matches("/fhir")
    )
}
