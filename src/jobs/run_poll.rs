//! RapidPro runs -> FHIR (docs/flow-results.md): poll `runs.json` for runs
//! modified since a stored cursor (`Basic/mhero-cursor-rapidpro-runs`,
//! minus an overlap window so late updates are not missed) and record each
//! as its QuestionnaireResponse (`pipeline::flow_results`), whoever started
//! it (flow start, keyword, trigger, campaign). A flow's Questionnaire is
//! generated or refreshed once per flow per pass, from `definitions.json`
//! (typed items) or else from the flow's `results` list. The cursor moves
//! only after every run up to it is stored. The pass also retries webhook
//! events left `received` (the webhook answered but could not record).

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use futures::StreamExt;

use super::cursor::Cursor;
use crate::pipeline::flow_results::{self, RunRecord, Written};
use crate::pipeline::webhook_event::{self, STATE_TAG_SYSTEM, State};
use crate::pipeline::writeback::{self, WritebackConfig};
use crate::rapidpro::client::{RapidProClient, RapidProError, RunQuery, TimeQuery};
use crate::store::{FhirStore, StoreError, search_all};

const CURSOR_NAME: &str = "rapidpro-runs";

/// Why a run poll pass failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum RunPollError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    RapidPro(#[from] RapidProError),
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunPollReport {
    pub examined: usize,
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
    /// Questionnaires written (new or changed).
    pub questionnaires: usize,
    /// Outbox entries that became `completed` / `stopped`.
    pub outbox_closed: usize,
    /// Runs of contacts no FHIR person has.
    pub unknown_people: usize,
    /// Webhook events recorded by this pass.
    pub webhook_events: usize,
    /// Completed runs written back to their person (a Provenance each).
    pub written_back: usize,
    /// Elements changed by the write-back.
    pub elements_written: usize,
    /// Results the write-back refused (invalid or conflicting).
    pub writeback_rejected: usize,
    pub failures: Vec<String>,
}

impl std::fmt::Display for RunPollReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "runs: {} examined: {} created, {} updated, {} unchanged; {} questionnaires written, {} outbox entries closed, {} runs of unknown contacts, {} webhook events recorded; {} failed",
            self.examined,
            self.created,
            self.updated,
            self.unchanged,
            self.questionnaires,
            self.outbox_closed,
            self.unknown_people,
            self.webhook_events,
            self.failures.len()
        )?;
        if self.written_back > 0 {
            writeln!(
                f,
                "write-back: {} runs, {} elements written, {} results refused",
                self.written_back, self.elements_written, self.writeback_rejected
            )?;
        }
        for failure in &self.failures {
            writeln!(f, "  failed: {failure}")?;
        }
        Ok(())
    }
}

/// The run poll as a `serve` job.
pub struct RunPollJob {
    pub store: crate::store::SharedStore,
    pub client: RapidProClient,
    pub overlap: Duration,
    pub writeback: Option<WritebackConfig>,
}

#[async_trait::async_trait]
impl super::runner::Job for RunPollJob {
    fn name(&self) -> &'static str {
        "run-poll"
    }

    async fn run_once(&self) -> Result<String, String> {
        let poll = RunPoll {
            store: self.store.as_ref(),
            client: &self.client,
            overlap: self.overlap,
            writeback: self.writeback.as_ref(),
        };
        match poll.run_once().await {
            Ok(report) if report.failures.is_empty() => Ok(report.to_string().trim().to_string()),
            Ok(report) => Err(report.to_string().trim().to_string()),
            Err(e) => Err(crate::telemetry::redact_phones(&e.to_string())),
        }
    }
}

/// One pass of the run poll.
pub struct RunPoll<'a> {
    pub store: &'a dyn FhirStore,
    pub client: &'a RapidProClient,
    /// How far before the cursor to look again.
    pub overlap: Duration,
    /// Validation write-back of completed runs, when rules are configured.
    pub writeback: Option<&'a WritebackConfig>,
}

impl RunPoll<'_> {
    pub async fn run_once(&self) -> Result<RunPollReport, RunPollError> {
        self.run_with_progress(|| {}).await
    }

    /// A pass calling `tick` after each run.
    pub async fn run_with_progress(
        &self,
        tick: impl Fn() + Send + Sync,
    ) -> Result<RunPollReport, RunPollError> {
        let mut cursor = Cursor::load(self.store, CURSOR_NAME).await?;
        let after = cursor
            .position
            .as_deref()
            .and_then(|p| DateTime::parse_from_rfc3339(p).ok())
            .map(|p| p.with_timezone(&Utc) - self.overlap);
        let query = RunQuery {
            after,
            reverse: true,
            without_paths: true,
            ..Default::default()
        };
        let mut runs = self.client.runs(&query);
        let mut report = RunPollReport::default();
        let mut specs: HashMap<String, Vec<flow_results::ResultSpec>> = HashMap::new();
        let mut newest: Option<DateTime<Utc>> = None;
        while let Some(item) = runs.next().await {
            let run = match item {
                Ok(run) => run,
                Err(e) => {
                    report.failures.push(format!(
                        "listing runs: {}",
                        crate::telemetry::redact_phones(&e.to_string())
                    ));
                    break;
                }
            };
            report.examined += 1;
            tick();
            let Some(record) = RunRecord::from_run(&run) else {
                continue;
            };
            if !specs.contains_key(&record.flow_uuid) {
                match self.questionnaire(&record).await {
                    Ok((flow_specs, written)) => {
                        report.questionnaires += written as usize;
                        specs.insert(record.flow_uuid.clone(), flow_specs);
                    }
                    Err(e) => {
                        report.failures.push(format!(
                            "questionnaire of flow {}: {}",
                            record.flow_uuid,
                            crate::telemetry::redact_phones(&e)
                        ));
                        continue;
                    }
                }
            }
            let flow_specs = specs.get(&record.flow_uuid).map_or(&[][..], Vec::as_slice);
            match flow_results::record_run(self.store, &record, flow_specs, true).await {
                Ok(Some(recorded)) => {
                    match recorded.response {
                        Written::Created => report.created += 1,
                        Written::Updated => report.updated += 1,
                        Written::Unchanged => report.unchanged += 1,
                    }
                    report.outbox_closed += recorded.outbox_closed;
                    report.unknown_people += recorded.unknown_person as usize;
                    if let Err(e) = self.write_back(&record, &recorded, &mut report).await {
                        // The cursor stays: the next pass tries again.
                        report.failures.push(format!(
                            "write-back of run {}: {}",
                            record.run_uuid.as_deref().unwrap_or("?"),
                            crate::telemetry::redact_phones(&e.to_string())
                        ));
                        continue;
                    }
                    if run.modified_on > newest {
                        newest = run.modified_on;
                    }
                }
                Ok(None) => {}
                Err(e) => report.failures.push(format!(
                    "run {}: {}",
                    record.run_uuid.as_deref().unwrap_or("?"),
                    crate::telemetry::redact_phones(&e.to_string())
                )),
            }
        }
        if report.failures.is_empty()
            && let Some(newest) = newest
        {
            cursor
                .advance(self.store, &crate::fhir::format_instant(&newest))
                .await?;
        }
        self.retry_webhook_events(&mut report).await?;
        Ok(report)
    }

    /// The validation write-back of a completed run (docs/flow-results.md).
    async fn write_back(
        &self,
        record: &RunRecord,
        recorded: &flow_results::Recorded,
        report: &mut RunPollReport,
    ) -> Result<(), writeback::WritebackError> {
        let (Some(config), Some(person)) = (self.writeback, recorded.subject.as_deref()) else {
            return Ok(());
        };
        if let Some(done) = writeback::write_back(
            self.store,
            self.client,
            config,
            record,
            person,
            &recorded.response_id,
        )
        .await?
        {
            report.written_back += 1;
            report.elements_written += done.applied;
            report.writeback_rejected += done.rejected;
        }
        Ok(())
    }

    /// The flow's result specs, and whether its Questionnaire was written.
    async fn questionnaire(
        &self,
        record: &RunRecord,
    ) -> Result<(Vec<flow_results::ResultSpec>, bool), String> {
        let (name, specs) = match self.client.definitions(&record.flow_uuid).await {
            Ok(export) if export["flows"][0].is_object() => {
                let flow = &export["flows"][0];
                (
                    flow["name"].as_str().map(str::to_string),
                    flow_results::specs_from_definition(flow),
                )
            }
            _ => {
                let query = TimeQuery {
                    uuid: Some(record.flow_uuid.clone()),
                    ..Default::default()
                };
                let mut flows = self.client.flows(&query);
                match flows.next().await {
                    Some(Ok(flow)) => (
                        Some(flow.name.clone()),
                        flow_results::specs_from_flow(&flow),
                    ),
                    Some(Err(e)) => return Err(e.to_string()),
                    None => (None, Vec::new()),
                }
            }
        };
        let name = name
            .or_else(|| record.flow_name.clone())
            .unwrap_or_else(|| record.flow_uuid.clone());
        let questionnaire = flow_results::questionnaire(&record.flow_uuid, &name, &specs);
        let id = flow_results::id_for(&record.flow_uuid);
        let outcome = self
            .store
            .update("Questionnaire", &id, questionnaire, None)
            .await
            .map_err(|e| e.to_string())?;
        Ok((specs, outcome.kind != crate::store::WriteKind::Unchanged))
    }

    /// Events the webhook stored but could not record.
    async fn retry_webhook_events(&self, report: &mut RunPollReport) -> Result<(), StoreError> {
        let events = search_all(
            self.store,
            "Basic",
            vec![
                (
                    "_tag".into(),
                    format!("{STATE_TAG_SYSTEM}|{}", State::Received.code()),
                ),
                ("_count".into(), "200".into()),
            ],
        )
        .await?;
        for event in events {
            match webhook_event::process(self.store, &event).await {
                Ok(State::Processed) => report.webhook_events += 1,
                Ok(_) => {}
                Err(e) => report
                    .failures
                    .push(format!("webhook event Basic/{}: {e}", event.id)),
            }
        }
        Ok(())
    }
}
