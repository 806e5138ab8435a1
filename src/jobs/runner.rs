//! Running jobs in `mhero serve`: each job runs a pass, then waits for its
//! interval, a nudge (e.g. a person written through the API), or shutdown.
//! A failing pass is logged and counted; the next one tries again.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One periodic job. `run_once` does one pass and says what it did.
#[async_trait]
pub trait Job: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    async fn run_once(&self) -> Result<String, String>;
}

/// A pass's outcome as `Job::run_once` gives it: the report's summary, or
/// the error with phone numbers masked.
pub fn pass_outcome<R: std::fmt::Display, E: std::fmt::Display>(
    result: Result<R, E>,
) -> Result<String, String> {
    result
        .map(|report| report.to_string().trim().to_string())
        .map_err(|e| crate::telemetry::redact_phones(&e.to_string()))
}

/// Wakes a job before its interval is over.
#[derive(Clone, Default)]
pub struct Nudge {
    notify: Arc<Notify>,
    given: Arc<std::sync::atomic::AtomicUsize>,
}

impl Nudge {
    pub fn nudge(&self) {
        self.given
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Stores a permit if the job is busy, so the write is not missed.
        self.notify.notify_one();
    }

    /// How many nudges were given (for `/metrics`-style inspection and tests).
    pub fn times_nudged(&self) -> usize {
        self.given.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Start `job` on `tracker`: a pass now, then one per `interval` or nudge,
/// until `cancel`.
pub fn spawn(
    job: Arc<dyn Job>,
    interval: Duration,
    nudge: Nudge,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) {
    tracker.spawn(async move {
        loop {
            match job.run_once().await {
                Ok(summary) => {
                    metrics::counter!("job_passes_total", "job" => job.name(), "outcome" => "ok").increment(1);
                    tracing::info!(job = job.name(), %summary, "job pass done");
                }
                Err(error) => {
                    metrics::counter!("job_passes_total", "job" => job.name(), "outcome" => "error").increment(1);
                    tracing::warn!(job = job.name(), error = %crate::telemetry::redact_phones(&error), "job pass failed; will try again");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = nudge.notify.notified() => {}
                _ = tokio::time::sleep(interval) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    struct Counting(mpsc::UnboundedSender<()>);

    #[async_trait]
    impl Job for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        async fn run_once(&self) -> Result<String, String> {
            let _ = self.0.send(());
            Err("always fails, and is run again anyway".into())
        }
    }

    #[tokio::test]
    async fn a_job_runs_at_start_on_each_nudge_and_stops_on_cancel() {
        let (sender, mut passes) = mpsc::unbounded_channel();
        let nudge = Nudge::default();
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        // An interval far longer than the test: only nudges can start passes.
        spawn(
            Arc::new(Counting(sender)),
            Duration::from_secs(3600),
            nudge.clone(),
            cancel.clone(),
            &tracker,
        );
        passes.recv().await.expect("a pass at start");
        nudge.nudge();
        passes.recv().await.expect("a pass after a nudge");
        nudge.nudge();
        passes.recv().await.expect("a failing job keeps running");
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
        assert!(passes.try_recv().is_err(), "no pass after shutdown");
    }
}
