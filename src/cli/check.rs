//! `mhero check`: validate the configuration and reach every configured
//! backend, one line each; the caller exits non-zero if any fails.

use crate::config::{IndexBackendKind, Settings};
use crate::rapidpro::client::RapidProClient;
use crate::rapidpro::throttle::Throttle;
use crate::store::open_store;

/// One line of the report.
pub struct CheckLine {
    pub backend: String,
    pub ok: bool,
    pub detail: String,
}

pub async fn check_backends(settings: &Settings) -> Vec<CheckLine> {
    let mut lines = Vec::new();
    let fhir = match open_store(&settings.fhir).await {
        Ok(store) => match store.check().await {
            Ok(status) => CheckLine {
                backend: status.name,
                ok: true,
                detail: status.detail,
            },
            Err(e) => CheckLine {
                backend: format!("fhir ({})", store.backend_name()),
                ok: false,
                detail: e.to_string(),
            },
        },
        Err(e) => CheckLine {
            backend: "fhir".into(),
            ok: false,
            detail: e.to_string(),
        },
    };
    lines.push(fhir);
    let backend = match settings.index.backend {
        IndexBackendKind::Embedded => "embedded",
        IndexBackendKind::Elasticsearch => "elasticsearch",
    };
    lines.push(match crate::index::describe_index(&settings.index).await {
        Ok(detail) => CheckLine {
            backend: format!("index ({backend})"),
            ok: true,
            detail,
        },
        Err(e) => CheckLine {
            backend: format!("index ({backend})"),
            ok: false,
            detail: e.to_string(),
        },
    });
    lines.push(check_rapidpro(settings).await);
    lines
}

async fn check_rapidpro(settings: &Settings) -> CheckLine {
    let Some(url) = &settings.rapidpro.base_url else {
        return CheckLine {
            backend: "rapidpro".into(),
            ok: true,
            detail: "not configured (rapidpro.base_url is unset): sending is paused".into(),
        };
    };
    let backend = format!("rapidpro ({url})");
    crate::install_tls_provider();
    let client = match RapidProClient::from_settings(
        &settings.rapidpro,
        Throttle::new(&settings.rapidpro.rate_per_hour),
    ) {
        Ok(client) => client,
        Err(e) => {
            return CheckLine {
                backend,
                ok: false,
                detail: e.to_string(),
            };
        }
    };
    match client.workspace().await {
        Ok(workspace) => CheckLine {
            backend,
            ok: true,
            detail: format!(
                "workspace \"{}\" (country {})",
                workspace.name,
                workspace.country.as_deref().unwrap_or("unset")
            ),
        },
        Err(e) => CheckLine {
            backend,
            ok: false,
            detail: crate::telemetry::redact_phones(&e.to_string()),
        },
    }
}
