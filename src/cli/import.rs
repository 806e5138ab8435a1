//! `mhero import FILE...`: load FHIR Bundles (transaction, batch,
//! collection, searchset, ...) and NDJSON files into the store, with a
//! progress bar on a terminal and a summary of what was created, updated,
//! left unchanged, and what failed and why.
//!
//! Transaction and batch Bundles are processed as such (a failed
//! transaction writes nothing). Entries of other Bundles, single
//! resources and NDJSON lines are written one by one: with an `id` as an
//! update (create-on-update keeps the source system's id), without one as
//! a create.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::store::{FhirStore, WriteKind};

#[derive(Debug, Default, Clone)]
pub struct ImportSummary {
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
    /// (where, why)
    pub failed: Vec<(String, String)>,
}

impl ImportSummary {
    pub fn total(&self) -> usize {
        self.created + self.updated + self.unchanged + self.failed.len()
    }

    fn record_write(&mut self, kind: WriteKind) {
        match kind {
            WriteKind::Created => self.created += 1,
            WriteKind::Updated => self.updated += 1,
            WriteKind::Unchanged => self.unchanged += 1,
        }
    }
}

impl std::fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "imported {} resources: {} created, {} updated, {} unchanged, {} failed",
            self.total(),
            self.created,
            self.updated,
            self.unchanged,
            self.failed.len()
        )?;
        for (place, reason) in &self.failed {
            writeln!(f, "  failed: {place}: {reason}")?;
        }
        Ok(())
    }
}

/// One unit of work read from a file.
enum Item {
    Resource {
        place: String,
        resource: Value,
    },
    Bundle {
        place: String,
        bundle: Value,
        entries: usize,
    },
    Unreadable {
        place: String,
        reason: String,
    },
}

fn read_items(path: &Path) -> Vec<Item> {
    let name = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            return vec![Item::Unreadable {
                place: name,
                reason: format!("cannot read: {e}"),
            }];
        }
    };
    let is_ndjson = path.extension().is_some_and(|e| e == "ndjson");
    if !is_ndjson && let Ok(value) = serde_json::from_str::<Value>(&text) {
        return items_of_document(&name, value);
    }
    if !is_ndjson && text.lines().filter(|l| !l.trim().is_empty()).count() <= 1 {
        let reason = serde_json::from_str::<Value>(&text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        return vec![Item::Unreadable {
            place: name,
            reason: format!("not valid JSON: {reason}"),
        }];
    }
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            let place = format!("{name}:{}", n + 1);
            match serde_json::from_str::<Value>(line) {
                Ok(resource) => Item::Resource { place, resource },
                Err(e) => Item::Unreadable {
                    place,
                    reason: format!("not valid JSON: {e}"),
                },
            }
        })
        .collect()
}

fn items_of_document(name: &str, value: Value) -> Vec<Item> {
    let is_bundle = value.get("resourceType").and_then(Value::as_str) == Some("Bundle");
    if !is_bundle {
        return vec![Item::Resource {
            place: name.to_string(),
            resource: value,
        }];
    }
    let kind = value.get("type").and_then(Value::as_str).unwrap_or("");
    let entries = value
        .get("entry")
        .and_then(Value::as_array)
        .map(Vec::len)
        .unwrap_or(0);
    if kind == "transaction" || kind == "batch" {
        return vec![Item::Bundle {
            place: name.to_string(),
            bundle: value,
            entries,
        }];
    }
    value
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
        // Response entries without a resource carry nothing to import.
        .filter_map(|(i, entry)| {
            entry.get("resource").map(|resource| Item::Resource {
                place: format!("{name} entry {i}"),
                resource: resource.clone(),
            })
        })
        .collect()
}

async fn write_resource(
    store: &dyn FhirStore,
    resource: Value,
    summary: &mut ImportSummary,
    place: String,
) {
    let resource_type = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let id = resource
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string);
    let result = match id {
        Some(id) => store.update(&resource_type, &id, resource, None).await,
        None => store.create(resource, None).await,
    };
    match result {
        Ok(outcome) => summary.record_write(outcome.kind),
        Err(e) => summary.failed.push((place, e.to_string())),
    }
}

fn count_bundle_response(response: &Value, place: &str, summary: &mut ImportSummary) {
    for (i, entry) in response
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let status = entry
            .pointer("/response/status")
            .and_then(Value::as_str)
            .unwrap_or("");
        let code: u16 = status
            .split_whitespace()
            .next()
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        match code {
            201 => summary.created += 1,
            200..=299 => summary.updated += 1,
            _ => {
                let reason = entry
                    .pointer("/response/outcome/issue/0/diagnostics")
                    .and_then(Value::as_str)
                    .unwrap_or(status)
                    .to_string();
                summary.failed.push((format!("{place} entry {i}"), reason));
            }
        }
    }
}

/// Import `files` into `store`. Never stops at a bad item: every failure is
/// in the summary.
pub async fn import_files(store: &dyn FhirStore, files: &[PathBuf]) -> ImportSummary {
    let items: Vec<Item> = files.iter().flat_map(|f| read_items(f)).collect();
    let work: u64 = items
        .iter()
        .map(|i| match i {
            Item::Bundle { entries, .. } => *entries as u64,
            _ => 1,
        })
        .sum();
    let progress = if std::io::stderr().is_terminal() {
        ProgressBar::new(work)
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} importing [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut summary = ImportSummary::default();
    for item in items {
        match item {
            Item::Unreadable { place, reason } => {
                summary.failed.push((place, reason));
                progress.inc(1);
            }
            Item::Resource { place, resource } => {
                write_resource(store, resource, &mut summary, place).await;
                progress.inc(1);
            }
            Item::Bundle {
                place,
                bundle,
                entries,
            } => {
                match store.process_bundle(bundle).await {
                    Ok(response) => count_bundle_response(&response, &place, &mut summary),
                    Err(e) => summary.failed.push((place, e.to_string())),
                }
                progress.inc(entries as u64);
            }
        }
    }
    progress.finish_and_clear();
    summary
}
