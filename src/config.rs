//! Typed settings of the connector.
//!
//! Owns loading and validating configuration: the compiled-in defaults
//! (`config/default.toml`, embedded verbatim), an optional file, then
//! `MHERO__SECTION__KEY` environment variables. Unknown keys and invalid
//! values are errors that name the key. Secrets are wrapped in [`Secret`],
//! whose `Debug` never shows the value.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use url::Url;

/// The documented defaults, compiled in.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// A secret string (token, password, API key). `Debug` and `Display` print
/// `***`; use [`Secret::expose`] where the value is really needed.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub auth: AuthSettings,
    pub fhir: FhirSettings,
    pub index: IndexSettings,
    pub rapidpro: RapidProSettings,
    pub phone: PhoneSettings,
    pub groups: GroupsSettings,
    pub messaging: MessagingSettings,
    /// Validation write-back rules (`[[writeback]]`; none by default).
    #[serde(default)]
    pub writeback: Vec<WritebackRule>,
}

/// A flow result that confirms an element of the person's own record
/// (docs/flow-results.md, `pipeline::writeback`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WritebackRule {
    /// The flow's uuid, or `*` for any flow.
    #[serde(default = "any_flow")]
    pub flow: String,
    /// The result key (RapidPro's snake case, e.g. `confirmed_phone`).
    pub result: String,
    pub element: PersonElement,
}

fn any_flow() -> String {
    "*".into()
}

/// The elements a write-back can set.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PersonElement {
    /// The first `telecom` phone (E.164).
    Phone,
    /// The first `telecom` email.
    Email,
    Gender,
    BirthDate,
    Active,
    /// `communication[0].language` (BCP 47 / ISO 639 code).
    Language,
}

impl PersonElement {
    pub fn as_str(self) -> &'static str {
        match self {
            PersonElement::Phone => "phone",
            PersonElement::Email => "email",
            PersonElement::Gender => "gender",
            PersonElement::BirthDate => "birth_date",
            PersonElement::Active => "active",
            PersonElement::Language => "language",
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub public_base_url: Option<Url>,
    pub log_format: LogFormat,
    pub max_body_bytes: usize,
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub api_keys: Vec<Secret>,
    pub webhook_token: Option<Secret>,
    pub protect_metrics: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FhirBackendKind {
    Embedded,
    Http,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FhirSettings {
    pub backend: FhirBackendKind,
    pub embedded: EmbeddedFhirSettings,
    pub http: HttpFhirSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedFhirSettings {
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFhirSettings {
    pub base_url: Option<Url>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub bearer_token: Option<Secret>,
    pub timeout_secs: u64,
    pub max_retries: u32,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IndexBackendKind {
    Embedded,
    Elasticsearch,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexSettings {
    pub backend: IndexBackendKind,
    /// Seconds between passes of the index follower in `serve` (a write
    /// through the API starts one at once).
    pub follow_interval_secs: u64,
    /// Seconds of store history before the index checkpoint read again by
    /// each pass (writes committed late by a concurrent writer).
    pub follow_overlap_secs: u64,
    pub embedded: EmbeddedIndexSettings,
    pub elasticsearch: ElasticsearchSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedIndexSettings {
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElasticsearchSettings {
    pub url: Option<Url>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub index_prefix: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RapidProSettings {
    pub base_url: Option<Url>,
    pub token: Option<Secret>,
    pub import_unknown_contacts: bool,
    /// Seconds to wait for one RapidPro answer.
    pub timeout_secs: u64,
    /// Retries of a request that may be repeated (reads, updates by
    /// `?uuid=`/`?urn=`, deletes) after a connection error or a 5xx, and
    /// of any request answered 429. Creates are never re-sent.
    pub max_retries: u32,
    /// Longest `Retry-After` (seconds) a request waits out before retrying;
    /// a longer one is returned as a throttling error.
    pub max_throttle_wait_secs: u64,
    /// Extra contact fields derived from the person's work (see
    /// `pipeline::work_context::KNOWN_FIELDS`).
    pub extra_fields: Vec<String>,
    /// Seconds between contact sync passes in `serve`.
    pub contact_sync_interval_secs: u64,
    /// Overlap window of the RapidPro -> FHIR contact poll.
    pub contact_poll_overlap_secs: u64,
    /// Client-side request budget per RapidPro throttle scope.
    pub rate_per_hour: RapidProRates,
}

/// Requests per hour per RapidPro throttle scope (RapidPro's default is
/// 3600 for each; a workspace may have other rates).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RapidProRates {
    /// Scope `v2`: every endpoint except the three below.
    pub v2: u32,
    /// Scope `v2.contacts`: `/contacts.json`.
    pub contacts: u32,
    /// Scope `v2.messages`: `/messages.json`.
    pub messages: u32,
    /// Scope `v2.runs`: `/runs.json`.
    pub runs: u32,
}

impl Default for RapidProRates {
    fn default() -> Self {
        RapidProRates {
            v2: 3600,
            contacts: 3600,
            messages: 3600,
            runs: 3600,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhoneSettings {
    pub default_country: Option<String>,
    /// Telecoms that also give `whatsapp:` / `telegram:` URNs.
    #[serde(default)]
    pub urn_mappings: Vec<crate::pipeline::phone::UrnMapping>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GroupsSource {
    Fhir,
    Rapidpro,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupsSettings {
    pub source: GroupsSource,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessagingSettings {
    /// Seconds between dispatcher passes in `serve`.
    pub dispatch_interval_secs: u64,
    /// Recipients per broadcast / flow start (1..=100).
    pub batch_size: usize,
    /// RapidPro send calls in flight at once.
    pub max_concurrent_calls: usize,
    /// Lifetime of a claim on a request without renewal.
    pub claim_lease_secs: u64,
    /// This replica's name in claims; empty = `<hostname>-<pid>`.
    pub instance_id: String,
    /// IANA time zone of cron schedules.
    pub schedule_time_zone: String,
    /// Seconds between flow sync passes in `serve` (RapidPro flows ->
    /// FHIR Basic).
    pub flow_sync_interval_secs: u64,
    /// Seconds between scheduler passes in `serve`.
    pub schedule_interval_secs: u64,
    /// Seconds between delivery status polls in `serve`.
    pub delivery_poll_interval_secs: u64,
    /// Inbound texts (trimmed, any case) that opt the sender out.
    pub stop_keywords: Vec<String>,
    /// Inbound texts that opt the sender back in.
    pub start_keywords: Vec<String>,
    /// A reply is linked (`inResponseTo`) to the last message sent to that
    /// person within this many hours.
    pub reply_window_hours: u64,
    /// `Communication.recipient` of inbound messages (e.g.
    /// `Organization/moh`); empty = none.
    pub organization_reference: String,
    /// What to do with firings that fell while the connector was down.
    pub missed_firings: MissedFirings,
    /// A firing found this many seconds after its time counts as missed.
    pub missed_firing_grace_secs: u64,
    /// Seconds between run poll passes in `serve` (flow results ->
    /// QuestionnaireResponses; docs/flow-results.md), and how far before
    /// its cursor a pass looks again.
    pub run_poll_interval_secs: u64,
    pub run_poll_overlap_secs: u64,
}

/// What the scheduler does with firings it finds long past their time
/// (the connector was down): see `docs/scheduling.md`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MissedFirings {
    /// All missed firings together become one late firing.
    SendOnce,
    /// Missed firings are not sent; the schedule waits for its next time.
    Skip,
}

impl MessagingSettings {
    /// `schedule_time_zone`, read (validated at load).
    pub fn time_zone(&self) -> Result<chrono_tz::Tz, ConfigError> {
        self.schedule_time_zone.trim().parse().map_err(|_| {
            ConfigError(format!(
                "messaging.schedule_time_zone {:?} is not an IANA time zone name such as \"Africa/Monrovia\" or \"UTC\"",
                self.schedule_time_zone
            ))
        })
    }

    /// The name this replica writes into its claims.
    pub fn instance_name(&self) -> String {
        if self.instance_id.trim().is_empty() {
            let host = std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "mhero".to_string());
            format!("{host}-{}", std::process::id())
        } else {
            self.instance_id.trim().to_string()
        }
    }
}

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(pub String);

impl Settings {
    /// Defaults, then `file` (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_from(file, None)
    }

    /// Like [`Settings::load`], with an explicit environment (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError(format!(
                    "configuration file {} does not exist",
                    path.display()
                )));
            }
            builder = builder.add_source(
                config::File::from(path.to_path_buf()).format(config::FileFormat::Toml),
            );
        }
        let environment = config::Environment::with_prefix("MHERO")
            .prefix_separator("__")
            .separator("__")
            .list_separator(",")
            .with_list_parse_key("auth.api_keys")
            .with_list_parse_key("rapidpro.extra_fields")
            .with_list_parse_key("messaging.stop_keywords")
            .with_list_parse_key("messaging.start_keywords")
            .try_parsing(true)
            .source(env);
        builder = builder.add_source(environment);
        let raw = builder
            .build()
            .map_err(|e| ConfigError(describe_config_error(e)))?;
        let settings: Settings = raw
            .try_deserialize()
            .map_err(|e| ConfigError(describe_config_error(e)))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Cross-field rules serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.fhir.backend == FhirBackendKind::Http && self.fhir.http.base_url.is_none() {
            return Err(ConfigError(
                "fhir.http.base_url is required when fhir.backend = \"http\"".into(),
            ));
        }
        if self.fhir.http.password.is_some() && self.fhir.http.bearer_token.is_some() {
            return Err(ConfigError(
                "fhir.http.password and fhir.http.bearer_token are exclusive: set one".into(),
            ));
        }
        if self.fhir.http.password.is_some() != self.fhir.http.username.is_some() {
            return Err(ConfigError(
                "fhir.http.username and fhir.http.password must be set together".into(),
            ));
        }
        if self.fhir.http.timeout_secs == 0 {
            return Err(ConfigError(
                "fhir.http.timeout_secs must be at least 1".into(),
            ));
        }
        if self.rapidpro.timeout_secs == 0 {
            return Err(ConfigError(
                "rapidpro.timeout_secs must be at least 1".into(),
            ));
        }
        let rates = &self.rapidpro.rate_per_hour;
        for (name, rate) in [
            ("v2", rates.v2),
            ("contacts", rates.contacts),
            ("messages", rates.messages),
            ("runs", rates.runs),
        ] {
            if rate == 0 {
                return Err(ConfigError(format!(
                    "rapidpro.rate_per_hour.{name} must be at least 1"
                )));
            }
        }
        if let Some(unknown) = self
            .rapidpro
            .extra_fields
            .iter()
            .find(|f| !crate::pipeline::work_context::KNOWN_FIELDS.contains(&f.as_str()))
        {
            return Err(ConfigError(format!(
                "rapidpro.extra_fields: unknown field {unknown:?}; known: {}",
                crate::pipeline::work_context::KNOWN_FIELDS.join(", ")
            )));
        }
        if let Some(mapping) = self
            .phone
            .urn_mappings
            .iter()
            .find(|m| !crate::pipeline::phone::URN_MAPPING_SCHEMES.contains(&m.scheme.as_str()))
        {
            return Err(ConfigError(format!(
                "phone.urn_mappings: scheme {:?} is not supported (use whatsapp or telegram)",
                mapping.scheme
            )));
        }
        if self.rapidpro.contact_sync_interval_secs == 0 {
            return Err(ConfigError(
                "rapidpro.contact_sync_interval_secs must be at least 1".into(),
            ));
        }
        let messaging = &self.messaging;
        if !(1..=100).contains(&messaging.batch_size) {
            return Err(ConfigError(format!(
                "messaging.batch_size must be between 1 and 100 (RapidPro's limit), got {}",
                messaging.batch_size
            )));
        }
        for (name, value) in [
            ("dispatch_interval_secs", messaging.dispatch_interval_secs),
            ("claim_lease_secs", messaging.claim_lease_secs),
            ("flow_sync_interval_secs", messaging.flow_sync_interval_secs),
            ("schedule_interval_secs", messaging.schedule_interval_secs),
            ("run_poll_interval_secs", messaging.run_poll_interval_secs),
            (
                "delivery_poll_interval_secs",
                messaging.delivery_poll_interval_secs,
            ),
            (
                "max_concurrent_calls",
                messaging.max_concurrent_calls as u64,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError(format!("messaging.{name} must be at least 1")));
            }
        }
        messaging.time_zone()?;
        for (i, rule) in self.writeback.iter().enumerate() {
            if rule.result.trim().is_empty() {
                return Err(ConfigError(format!("writeback[{i}].result is empty")));
            }
            if rule.flow != "*" && uuid::Uuid::parse_str(&rule.flow).is_err() {
                return Err(ConfigError(format!(
                    "writeback[{i}].flow must be a flow uuid or \"*\", got {:?}",
                    rule.flow
                )));
            }
        }
        if self.server.max_body_bytes == 0 {
            return Err(ConfigError(
                "server.max_body_bytes must be at least 1".into(),
            ));
        }
        if self
            .auth
            .api_keys
            .iter()
            .any(|k| k.expose().trim().is_empty())
        {
            return Err(ConfigError("auth.api_keys contains an empty key".into()));
        }
        if let Some(country) = &self.phone.default_country
            && (country.len() != 2 || !country.chars().all(|c| c.is_ascii_alphabetic()))
        {
            return Err(ConfigError(format!(
                "phone.default_country must be an ISO 3166 alpha-2 code such as \"LR\", got {country:?}"
            )));
        }
        Ok(())
    }

    /// Refuse an unauthenticated API on a non-loopback address.
    pub fn validate_for_serving(&self) -> Result<(), ConfigError> {
        if self.auth.api_keys.is_empty() && !self.server.listen.ip().is_loopback() {
            return Err(ConfigError(format!(
                "auth.api_keys is empty and server.listen = {} is not a loopback address; \
                 set auth.api_keys (or MHERO__AUTH__API_KEYS) before listening on the network",
                self.server.listen
            )));
        }
        Ok(())
    }
}

/// The `config` crate's messages, made to name the offending key plainly.
fn describe_config_error(error: config::ConfigError) -> String {
    let message = error.to_string();
    // serde reports unknown keys as "unknown field `x`, expected ..."; the
    // config crate appends the path as "for key `section`".
    if let Some(start) = message.find("unknown field `") {
        let rest = &message[start + "unknown field `".len()..];
        let field = rest.split('`').next().unwrap_or("");
        let section = message
            .split("for key `")
            .nth(1)
            .and_then(|s| s.split('`').next())
            .filter(|s| !s.is_empty());
        let key = match section {
            Some(section) => format!("{section}.{field}"),
            None => field.to_string(),
        };
        return format!("unknown key '{key}' ({message})");
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn compiled_in_defaults_load() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.fhir.backend, FhirBackendKind::Embedded);
        assert_eq!(s.server.max_body_bytes, 32 * 1024 * 1024);
        assert!(s.auth.api_keys.is_empty());
        assert!(s.rapidpro.base_url.is_none());
    }

    #[test]
    fn environment_overrides_nested_keys_and_lists() {
        let s = Settings::load_from(
            None,
            env(&[
                ("MHERO__SERVER__LISTEN", "0.0.0.0:9000"),
                ("MHERO__AUTH__API_KEYS", "alpha,beta"),
                ("MHERO__RAPIDPRO__TOKEN", "tok"),
                ("MHERO__FHIR__EMBEDDED__PATH", "/tmp/x.sqlite"),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(s.auth.api_keys.len(), 2);
        assert_eq!(s.auth.api_keys[1].expose(), "beta");
        assert_eq!(s.rapidpro.token.as_ref().unwrap().expose(), "tok");
        assert_eq!(s.fhir.embedded.path, PathBuf::from("/tmp/x.sqlite"));
    }

    #[test]
    fn rapidpro_defaults_and_overrides() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.rapidpro.rate_per_hour, RapidProRates::default());
        assert_eq!(s.rapidpro.timeout_secs, 30);
        assert_eq!(s.rapidpro.max_retries, 3);
        let s = Settings::load_from(
            None,
            env(&[
                ("MHERO__RAPIDPRO__RATE_PER_HOUR__CONTACTS", "15000"),
                ("MHERO__RAPIDPRO__MAX_RETRIES", "0"),
            ]),
        )
        .unwrap();
        assert_eq!(s.rapidpro.rate_per_hour.contacts, 15000);
        assert_eq!(s.rapidpro.rate_per_hour.v2, 3600);
        assert_eq!(s.rapidpro.max_retries, 0);
        let err = Settings::load_from(None, env(&[("MHERO__RAPIDPRO__RATE_PER_HOUR__RUNS", "0")]))
            .unwrap_err();
        assert!(
            err.to_string().contains("rapidpro.rate_per_hour.runs"),
            "{err}"
        );
    }

    #[test]
    fn the_flow_sync_interval_defaults_to_five_minutes_and_is_at_least_one() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.messaging.flow_sync_interval_secs, 300);
        let err = Settings::load_from(
            None,
            env(&[("MHERO__MESSAGING__FLOW_SYNC_INTERVAL_SECS", "0")]),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("messaging.flow_sync_interval_secs must be at least 1"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_in_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:1\"\nlistne = 3\n").unwrap();
        let err = Settings::load_from(Some(&path), env(&[])).unwrap_err();
        assert!(err.to_string().contains("server.listne"), "{err}");
    }

    #[test]
    fn unknown_section_in_environment_is_named() {
        let err = Settings::load_from(None, env(&[("MHERO__SERVR__LISTEN", "x")])).unwrap_err();
        assert!(err.to_string().contains("servr"), "{err}");
    }

    #[test]
    fn invalid_value_is_named() {
        let err = Settings::load_from(None, env(&[("MHERO__FHIR__BACKEND", "mongo")])).unwrap_err();
        assert!(err.to_string().contains("mongo"), "{err}");
        let err =
            Settings::load_from(None, env(&[("MHERO__SERVER__LISTEN", "nowhere")])).unwrap_err();
        assert!(err.to_string().contains("server.listen"), "{err}");
    }

    #[test]
    fn extra_contact_fields_are_checked_by_name() {
        let s = Settings::load_from(
            None,
            env(&[("MHERO__RAPIDPRO__EXTRA_FIELDS", "job,district")]),
        )
        .unwrap();
        assert_eq!(s.rapidpro.extra_fields, vec!["job", "district"]);
        let err = Settings::load_from(
            None,
            env(&[("MHERO__RAPIDPRO__EXTRA_FIELDS", "job,shoe_size")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("shoe_size"), "{err}");
    }

    #[test]
    fn urn_mappings_come_from_the_file_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[[phone.urn_mappings]]\nscheme = \"whatsapp\"\nsystem = \"phone\"\nuse = \"mobile\"\n",
        )
        .unwrap();
        let s = Settings::load_from(Some(&path), env(&[])).unwrap();
        assert_eq!(s.phone.urn_mappings[0].use_.as_deref(), Some("mobile"));
        std::fs::write(
            &path,
            "[[phone.urn_mappings]]\nscheme = \"signal\"\nsystem = \"phone\"\n",
        )
        .unwrap();
        let err = Settings::load_from(Some(&path), env(&[])).unwrap_err();
        assert!(err.to_string().contains("signal"), "{err}");
    }

    #[test]
    fn writeback_rules_come_from_the_file_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[[writeback]]\nresult = \"confirmed_phone\"\nelement = \"phone\"\n\n[[writeback]]\nflow = \"0c7d1f0e-3a51-4c57-8f0a-6a1d2b9e4c21\"\nresult = \"still_working\"\nelement = \"active\"\n",
        )
        .unwrap();
        let s = Settings::load_from(Some(&path), env(&[])).unwrap();
        assert_eq!(s.writeback.len(), 2);
        assert_eq!(s.writeback[0].flow, "*");
        assert_eq!(s.writeback[1].element, PersonElement::Active);
        assert!(
            Settings::load_from(None, env(&[]))
                .unwrap()
                .writeback
                .is_empty()
        );
        std::fs::write(
            &path,
            "[[writeback]]\nresult = \"x\"\nelement = \"shoe_size\"\n",
        )
        .unwrap();
        let err = Settings::load_from(Some(&path), env(&[])).unwrap_err();
        assert!(err.to_string().contains("shoe_size"), "{err}");
        std::fs::write(
            &path,
            "[[writeback]]\nflow = \"survey\"\nresult = \"x\"\nelement = \"email\"\n",
        )
        .unwrap();
        let err = Settings::load_from(Some(&path), env(&[])).unwrap_err();
        assert!(err.to_string().contains("writeback[0].flow"), "{err}");
    }

    #[test]
    fn schedule_settings_are_read_and_checked() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.messaging.missed_firings, MissedFirings::SendOnce);
        assert_eq!(s.messaging.time_zone().unwrap(), chrono_tz::UTC);
        let s = Settings::load_from(
            None,
            env(&[
                ("MHERO__MESSAGING__SCHEDULE_TIME_ZONE", "Africa/Monrovia"),
                ("MHERO__MESSAGING__MISSED_FIRINGS", "skip"),
            ]),
        )
        .unwrap();
        assert_eq!(
            s.messaging.time_zone().unwrap(),
            chrono_tz::Africa::Monrovia
        );
        assert_eq!(s.messaging.missed_firings, MissedFirings::Skip);
        let err = Settings::load_from(
            None,
            env(&[("MHERO__MESSAGING__SCHEDULE_TIME_ZONE", "Liberia/Monrovia")]),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("messaging.schedule_time_zone"),
            "{err}"
        );
        let err = Settings::load_from(
            None,
            env(&[("MHERO__MESSAGING__MISSED_FIRINGS", "resend-all")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("resend-all"), "{err}");
    }

    #[test]
    fn http_backend_needs_a_base_url() {
        let err = Settings::load_from(None, env(&[("MHERO__FHIR__BACKEND", "http")])).unwrap_err();
        assert!(err.to_string().contains("fhir.http.base_url"), "{err}");
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let s = Settings::load_from(
            None,
            env(&[
                ("MHERO__AUTH__API_KEYS", "very-secret-key"),
                ("MHERO__RAPIDPRO__TOKEN", "rapidpro-secret"),
            ]),
        )
        .unwrap();
        let debug = format!("{s:?}");
        assert!(!debug.contains("very-secret-key"));
        assert!(!debug.contains("rapidpro-secret"));
        assert!(debug.contains("Secret(***)"));
    }

    #[test]
    fn no_keys_on_a_public_address_is_refused() {
        let s = Settings::load_from(None, env(&[("MHERO__SERVER__LISTEN", "0.0.0.0:80")])).unwrap();
        let err = s.validate_for_serving().unwrap_err();
        assert!(err.to_string().contains("auth.api_keys"));
        let s = Settings::load_from(
            None,
            env(&[
                ("MHERO__SERVER__LISTEN", "0.0.0.0:80"),
                ("MHERO__AUTH__API_KEYS", "k"),
            ]),
        )
        .unwrap();
        s.validate_for_serving().unwrap();
    }
}
